// Prints the prompt catalogue of src/prompts.rs as deploy/prompts/prompts.tsv (id, lang, text; tab-separated,
// no header, one prompt per line, catalogue order).
// Built stand-alone by export-tsv.sh with rustc; src/prompts.rs depends on std only.
#![allow(dead_code)]

#[path = "../../src/prompts.rs"]
mod prompts;

use prompts::{Language, PromptId};

fn main() {
    for p in PromptId::ALL {
        for l in Language::ALL {
            println!("{}\t{}\t{}", p.code(), l.code(), p.text(l));
        }
    }
}
