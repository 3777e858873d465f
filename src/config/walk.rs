//! Phase two helpers: reading typed values out of the raw tree while collecting every problem.
//!
//! Invariant: no reader stops at the first problem. Each returns `None` after recording an [`Issue`] with
//! the full dotted path of the offending key, so one pass reports everything that is wrong.

use std::time::Duration;

use ::config::{Map, Value, ValueKind};

use super::{duration, source, Issue};

/// `path.key`, or `key` at the top level.
pub fn join(path: &str, key: &str) -> String {
    if path.is_empty() {
        key.to_owned()
    } else {
        format!("{path}.{key}")
    }
}

/// The keys of a table in a stable (sorted) order; the `config` crate's map is unordered.
pub fn sorted_keys(t: &Map<String, Value>) -> Vec<&String> {
    let mut keys: Vec<&String> = t.keys().collect();
    keys.sort();
    keys
}

/// Collects issues and resolves `${VAR}` references.
pub struct Ctx<'a> {
    pub issues: Vec<Issue>,
    lookup: &'a dyn Fn(&str) -> Option<String>,
}

impl<'a> Ctx<'a> {
    pub fn new(lookup: &'a dyn Fn(&str) -> Option<String>) -> Self {
        Ctx {
            issues: Vec::new(),
            lookup,
        }
    }

    pub fn issue(&mut self, path: impl Into<String>, message: impl Into<String>) {
        self.issues.push(Issue {
            path: path.into(),
            message: message.into(),
        });
    }

    /// Reports every key of `t` that is not in `known`, with a suggestion when one is close.
    pub fn known_keys(&mut self, path: &str, t: &Map<String, Value>, known: &[&str]) {
        for key in sorted_keys(t) {
            if known.contains(&key.as_str()) {
                continue;
            }
            let hint = known
                .iter()
                .map(|k| (edit_distance(key, k), *k))
                .filter(|(d, _)| *d <= 2)
                .min()
                .map(|(_, k)| format!(" (did you mean {k:?}?)"))
                .unwrap_or_default();
            self.issue(join(path, key), format!("unknown key{hint}"));
        }
    }

    /// The value as a table, or an issue.
    pub fn table<'v>(&mut self, path: &str, v: &'v Value) -> Option<&'v Map<String, Value>> {
        match &v.kind {
            ValueKind::Table(t) => Some(t),
            other => {
                self.issue(path, format!("expected a table, found {}", describe(other)));
                None
            }
        }
    }

    /// A scalar as text with `${VAR}` references resolved. Numbers and booleans are accepted as their
    /// text, since environment overrides are always strings.
    pub fn text(&mut self, path: &str, v: &Value) -> Option<String> {
        let raw = match &v.kind {
            ValueKind::String(s) => s.clone(),
            ValueKind::Boolean(b) => b.to_string(),
            ValueKind::I64(n) => n.to_string(),
            ValueKind::I128(n) => n.to_string(),
            ValueKind::U64(n) => n.to_string(),
            ValueKind::U128(n) => n.to_string(),
            ValueKind::Float(n) => n.to_string(),
            other => {
                self.issue(
                    path,
                    format!("expected a single value, found {}", describe(other)),
                );
                return None;
            }
        };
        match source::interpolate(&raw, self.lookup) {
            Ok(s) => Some(s),
            Err(message) => {
                self.issue(path, message);
                None
            }
        }
    }

    /// Text converted by `f`; `f`'s message is reported as is.
    pub fn parsed<T>(
        &mut self,
        path: &str,
        v: &Value,
        f: impl FnOnce(&str) -> Result<T, String>,
    ) -> Option<T> {
        let text = self.text(path, v)?;
        match f(&text) {
            Ok(t) => Some(t),
            Err(message) => {
                self.issue(path, message);
                None
            }
        }
    }

    pub fn boolean(&mut self, path: &str, v: &Value) -> Option<bool> {
        self.parsed(path, v, |s| match s.to_ascii_lowercase().as_str() {
            "true" => Ok(true),
            "false" => Ok(false),
            _ => Err(format!("expected true or false, found {s:?}")),
        })
    }

    /// A whole number in `min..=max`.
    pub fn number(&mut self, path: &str, v: &Value, min: u64, max: u64) -> Option<u64> {
        self.parsed(path, v, |s| {
            let range = if max == u64::MAX {
                format!("at least {min}")
            } else {
                format!("from {min} to {max}")
            };
            match s.parse::<u64>() {
                Ok(n) if (min..=max).contains(&n) => Ok(n),
                _ => Err(format!("expected a whole number {range}, found {s}")),
            }
        })
    }

    /// A duration string; zero is rejected unless `allow_zero`.
    pub fn duration(&mut self, path: &str, v: &Value, allow_zero: bool) -> Option<Duration> {
        self.parsed(path, v, |s| {
            let d = duration::parse(s)?;
            if d.is_zero() && !allow_zero {
                return Err("must be longer than zero".to_owned());
            }
            Ok(d)
        })
    }

    /// A list of texts: a TOML array, or (as environment overrides give) one comma-separated string.
    pub fn list(&mut self, path: &str, v: &Value) -> Option<Vec<String>> {
        match &v.kind {
            ValueKind::Array(items) => {
                let mut out = Vec::with_capacity(items.len());
                let mut ok = true;
                for (i, item) in items.iter().enumerate() {
                    match self.text(&format!("{path}[{i}]"), item) {
                        Some(s) => out.push(s),
                        None => ok = false,
                    }
                }
                ok.then_some(out)
            }
            ValueKind::Table(_) | ValueKind::Nil => {
                self.issue(
                    path,
                    format!("expected a list, found {}", describe(&v.kind)),
                );
                None
            }
            _ => {
                let text = self.text(path, v)?;
                Some(
                    text.split(',')
                        .map(str::trim)
                        .filter(|s| !s.is_empty())
                        .map(str::to_owned)
                        .collect(),
                )
            }
        }
    }

    /// A list whose items are codes of a closed set, converted by `from_code`; duplicates are reported.
    pub fn codes<T: PartialEq>(
        &mut self,
        path: &str,
        v: &Value,
        what: &str,
        known: &[&str],
        from_code: impl Fn(&str) -> Option<T>,
    ) -> Option<Vec<T>> {
        let items = self.list(path, v)?;
        let mut out = Vec::with_capacity(items.len());
        let mut ok = true;
        for item in &items {
            match from_code(item) {
                Some(t) if out.contains(&t) => {
                    self.issue(path, format!("{item:?} is listed twice"));
                    ok = false;
                }
                Some(t) => out.push(t),
                None => {
                    self.issue(
                        path,
                        format!("unknown {what} {item:?} (known: {})", known.join(", ")),
                    );
                    ok = false;
                }
            }
        }
        ok.then_some(out)
    }
}

/// What a value is, for "expected …, found …" messages.
fn describe(kind: &ValueKind) -> &'static str {
    match kind {
        ValueKind::Nil => "nothing",
        ValueKind::Boolean(_) => "a boolean",
        ValueKind::I64(_) | ValueKind::I128(_) | ValueKind::U64(_) | ValueKind::U128(_) => {
            "a number"
        }
        ValueKind::Float(_) => "a number",
        ValueKind::String(_) => "a string",
        ValueKind::Table(_) => "a table",
        ValueKind::Array(_) => "a list",
    }
}

/// Levenshtein distance, for "did you mean" hints on short key names.
fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut prev = row[0];
        row[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let cur = row[j + 1];
            row[j + 1] = if ca == *cb {
                prev
            } else {
                1 + prev.min(cur).min(row[j])
            };
            prev = cur;
        }
    }
    row[b.len()]
}
