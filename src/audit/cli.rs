//! `callgate audit verify | export | tail`: the operator's and the data-protection officer's view
//! of the trail.
//!
//! Invariant: a personal number is read only from standard input, turned into its pseudonym at
//! once and never printed; the commands never write to the trail.

use std::io::Write;
use std::path::{Path, PathBuf};

use serde_json::Value;

use super::chain;
use crate::pnr::{Kind, ParseOptions, PersonalNumber, PseudonymKey};

/// Exit code when the chain is broken.
pub const EXIT_BROKEN: u8 = 1;
/// Exit code of a usage or configuration problem.
pub const EXIT_USAGE: u8 = 64;

/// Where the trail is: `<data_dir>/audit` of a config file, or a directory given as is.
pub struct Location {
    pub dir: PathBuf,
    /// The configured `server.pseudonym_key`, when the config sets one.
    pub key: Option<PseudonymKey>,
}

/// Finds the trail from `--config FILE` or `--dir DIR` (exactly one). Problems are printed to `err`.
pub fn locate(
    config: Option<&Path>,
    dir: Option<&Path>,
    err: &mut dyn Write,
) -> Result<Location, u8> {
    match (config, dir) {
        (Some(file), None) => match crate::config::load_file(file) {
            Ok(cfg) => Ok(Location {
                dir: cfg.server.data_dir.join(super::DIR),
                key: (!cfg.server.pseudonym_key.is_empty()).then(|| {
                    PseudonymKey::new(cfg.server.pseudonym_key.expose().as_bytes().to_vec())
                }),
            }),
            Err(issues) => {
                for i in issues {
                    let _ = writeln!(err, "{i}");
                }
                Err(EXIT_USAGE)
            }
        },
        (None, Some(dir)) => Ok(Location {
            dir: dir.to_path_buf(),
            key: None,
        }),
        _ => {
            let _ = writeln!(err, "give either --config FILE or --dir DIR");
            Err(EXIT_USAGE)
        }
    }
}

/// `audit verify`: exit 0 and a count when intact, 1 and the first broken record when not.
pub fn verify(dir: &Path, out: &mut dyn Write) -> u8 {
    match chain::verify(dir) {
        Ok(ok) => {
            let _ = writeln!(
                out,
                "intact: {} records in {} files (seq {} to {}), head {}",
                ok.records,
                ok.files,
                ok.first_seq,
                ok.first_seq + ok.records.saturating_sub(1),
                ok.head
            );
            0
        }
        Err(broken) => {
            let _ = writeln!(out, "broken: {broken}");
            EXIT_BROKEN
        }
    }
}

/// `audit export`: the records of the person whose number is `input` (from standard input): their
/// verifications (found by the pseudonym) and the agent actions on those verifications.
pub fn export(
    loc: &Location,
    input: &str,
    out: &mut dyn Write,
    err: &mut dyn Write,
) -> Result<usize, u8> {
    let key = match &loc.key {
        Some(k) => k.clone(),
        None => match std::fs::read(loc.dir.join(super::KEY_FILE)) {
            Ok(bytes) if bytes.len() >= 32 => PseudonymKey::new(bytes),
            _ => {
                let _ = writeln!(
                    err,
                    "no pseudonym key: the config sets no server.pseudonym_key and {} has no readable {}",
                    loc.dir.display(),
                    super::KEY_FILE
                );
                return Err(EXIT_USAGE);
            }
        },
    };
    let options = ParseOptions {
        kinds: &Kind::ALL,
        accept_10_digits: true,
        today: super::utc_now().date(),
    };
    let Ok(number) = PersonalNumber::parse(input.trim(), &options) else {
        let _ = writeln!(err, "standard input is not a valid personal number");
        return Err(EXIT_USAGE);
    };
    let person = number.pseudonym(&key);
    drop(number);
    let records = chain::read_all(&loc.dir).map_err(|b| {
        let _ = writeln!(err, "cannot read the trail: {b}");
        EXIT_BROKEN
    })?;
    let field = |v: &Value, name: &str| v.get(name).and_then(Value::as_str).map(str::to_owned);
    let references: std::collections::HashSet<String> = records
        .iter()
        .filter(|r| field(&r.value, "person").as_deref() == Some(person.as_str()))
        .filter_map(|r| field(&r.value, "reference"))
        .collect();
    let mut count = 0;
    for r in &records {
        let mine = field(&r.value, "person").as_deref() == Some(person.as_str())
            || field(&r.value, "reference").is_some_and(|x| references.contains(&x));
        if mine {
            let _ = out.write_all(&r.bytes);
            let _ = out.write_all(b"\n");
            count += 1;
        }
    }
    Ok(count)
}

/// `audit tail`: the last `n` records (across files).
pub fn tail(dir: &Path, n: usize, out: &mut dyn Write) -> Result<(), u8> {
    let records = chain::read_all(dir).map_err(|b| {
        let _ = writeln!(out, "cannot read the trail: {b}");
        EXIT_BROKEN
    })?;
    for r in &records[records.len().saturating_sub(n)..] {
        let _ = out.write_all(&r.bytes);
        let _ = out.write_all(b"\n");
    }
    Ok(())
}

/// `audit tail --follow`: prints records as they are written (checking every half second, following
/// the roll to a new day's file) until the process is stopped. Starts after the last `n` records.
pub fn follow(dir: &Path, n: usize, out: &mut dyn Write) -> Result<(), u8> {
    tail(dir, n, out)?;
    let _ = out.flush();
    let mut current = super::files(dir).ok().and_then(|f| f.last().cloned());
    let mut offset = current
        .as_ref()
        .and_then(|(_, p)| std::fs::metadata(p).ok())
        .map_or(0, |m| m.len());
    loop {
        std::thread::sleep(std::time::Duration::from_millis(500));
        let newest = super::files(dir).ok().and_then(|f| f.last().cloned());
        if let Some((_, path)) = &current {
            offset = print_from(path, offset, out);
        }
        if newest.is_some() && newest != current {
            current = newest;
            offset = 0;
            if let Some((_, path)) = &current {
                offset = print_from(path, offset, out);
            }
        }
        let _ = out.flush();
    }
}

/// Prints the complete lines of `path` from `offset`; the new offset.
fn print_from(path: &Path, offset: u64, out: &mut dyn Write) -> u64 {
    let Ok(bytes) = std::fs::read(path) else {
        return offset;
    };
    let start = usize::try_from(offset)
        .unwrap_or(usize::MAX)
        .min(bytes.len());
    let end = bytes[start..]
        .iter()
        .rposition(|b| *b == b'\n')
        .map_or(start, |i| start + i + 1);
    let _ = out.write_all(&bytes[start..end]);
    end as u64
}
