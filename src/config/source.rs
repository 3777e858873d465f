//! Phase one of loading: the raw value tree (TOML text merged with `CALLGATE__…` environment overrides)
//! and `${VAR}` interpolation of string values.
//!
//! Invariant: nothing here reads the process environment; overrides and variable lookups are injected,
//! so tests never call `set_var`.

use std::collections::HashMap;

use ::config::{Config as Builder, Environment, File, FileFormat, Map, Source, Value};

/// Prefix of override variables, followed by `__`; `__` also separates nested keys.
pub const ENV_PREFIX: &str = "CALLGATE";
/// Separator between the prefix and key segments in override variable names.
pub const ENV_SEPARATOR: &str = "__";

/// Merges the TOML text with the overrides in `env` (only names starting with `CALLGATE__` are used).
/// Override keys are lowercased by the `config` crate; override values are always strings.
pub fn raw_tree(
    toml_text: &str,
    env: &HashMap<String, String>,
) -> Result<Map<String, Value>, String> {
    let overrides: Map<String, String> = env.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
    let built = Builder::builder()
        .add_source(File::from_str(toml_text, FileFormat::Toml))
        .add_source(
            Environment::with_prefix(ENV_PREFIX)
                .prefix_separator(ENV_SEPARATOR)
                .separator(ENV_SEPARATOR)
                .source(Some(overrides)),
        )
        .build()
        .map_err(|e| e.to_string())?;
    built.collect().map_err(|e| e.to_string())
}

/// Expands `${VAR}` (error when unset) and `${VAR:-fallback}` (fallback when unset or empty); `$$` is a
/// literal `$`; any other `$` is kept. The fallback is taken literally. Errors never quote the value.
pub fn interpolate(s: &str, lookup: &dyn Fn(&str) -> Option<String>) -> Result<String, String> {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(i) = rest.find('$') {
        out.push_str(&rest[..i]);
        let after = &rest[i + 1..];
        if let Some(tail) = after.strip_prefix('$') {
            out.push('$');
            rest = tail;
        } else if let Some(body) = after.strip_prefix('{') {
            let Some(end) = body.find('}') else {
                return Err("unterminated \"${\" (write \"$$\" for a literal \"$\")".to_owned());
            };
            let reference = &body[..end];
            let (name, fallback) = match reference.split_once(":-") {
                Some((name, fallback)) => (name, Some(fallback)),
                None => (reference, None),
            };
            let valid = name
                .chars()
                .next()
                .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
                && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
            if !valid {
                return Err(format!(
                    "\"${{{name}}}\" is not a variable reference (names are letters, digits and '_')"
                ));
            }
            match (lookup(name), fallback) {
                (Some(v), Some(f)) if v.is_empty() => out.push_str(f),
                (Some(v), _) => out.push_str(&v),
                (None, Some(f)) => out.push_str(f),
                (None, None) => {
                    return Err(format!(
                        "environment variable {name} is not set (write \"${{{name}:-fallback}}\" for a fallback)"
                    ))
                }
            }
            rest = &body[end + 1..];
        } else {
            out.push('$');
            rest = after;
        }
    }
    out.push_str(rest);
    Ok(out)
}
