//! Checking the audit trail's hash chain over all its files, and reading its records.
//!
//! Invariant: read-only; a record is judged by its exact line bytes, never by a re-serialisation.

use std::fmt;
use std::path::{Path, PathBuf};

use serde_json::Value;

/// Lowercase hex SHA-256 of a record's line (without its newline).
pub fn hash(line: &[u8]) -> String {
    let digest = ring::digest::digest(&ring::digest::SHA256, line);
    let mut out = String::with_capacity(64);
    for b in digest.as_ref() {
        out.push_str(&format!("{b:02x}"));
    }
    out
}

/// Where a record is: file name and line number (from 1).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Place {
    pub file: String,
    pub line: usize,
}

impl fmt::Display for Place {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} line {}", self.file, self.line)
    }
}

/// The first record at which the chain breaks, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Broken {
    pub at: Place,
    pub seq: Option<u64>,
    pub why: String,
}

impl fmt::Display for Broken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.seq {
            Some(seq) => write!(f, "{} (seq {seq}): {}", self.at, self.why),
            None => write!(f, "{}: {}", self.at, self.why),
        }
    }
}

/// An intact chain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Intact {
    pub records: u64,
    pub files: usize,
    /// `seq` of the first record kept (above 1 once retention deleted older files).
    pub first_seq: u64,
    /// Hash of the last record: note it elsewhere to pin the end of the chain.
    pub head: String,
}

/// One record as read back.
#[derive(Debug, Clone)]
pub struct Read {
    pub at: Place,
    pub bytes: Vec<u8>,
    pub value: Value,
}

/// Every record of the trail under `dir`, oldest first; a line that is not a JSON object is an error.
pub fn read_all(dir: &Path) -> Result<Vec<Read>, Broken> {
    let mut out = Vec::new();
    for (_, path) in files_or_broken(dir)? {
        let name = file_label(&path);
        let bytes = std::fs::read(&path).map_err(|e| Broken {
            at: Place {
                file: name.clone(),
                line: 0,
            },
            seq: None,
            why: format!("cannot be read: {e}"),
        })?;
        let torn = !bytes.is_empty() && !bytes.ends_with(b"\n");
        let lines: Vec<&[u8]> = bytes.split(|b| *b == b'\n').collect();
        let count = lines.len();
        for (i, line) in lines.into_iter().enumerate() {
            let at = Place {
                file: name.clone(),
                line: i + 1,
            };
            if i + 1 == count && line.is_empty() {
                break;
            }
            if i + 1 == count && torn {
                return Err(Broken {
                    at,
                    seq: None,
                    why: "the last line is incomplete (no newline)".into(),
                });
            }
            let value: Value = match serde_json::from_slice(line) {
                Ok(v @ Value::Object(_)) => v,
                _ => {
                    return Err(Broken {
                        at,
                        seq: None,
                        why: "not a JSON record".into(),
                    })
                }
            };
            out.push(Read {
                at,
                bytes: line.to_vec(),
                value,
            });
        }
    }
    Ok(out)
}

/// Checks the chain over every file under `dir`.
pub fn verify(dir: &Path) -> Result<Intact, Broken> {
    let records = read_all(dir)?;
    let files = files_or_broken(dir)?.len();
    let mut first_seq = 0;
    for (i, r) in records.iter().enumerate() {
        let seq = r.value.get("seq").and_then(Value::as_u64);
        let prev = r.value.get("prev").and_then(Value::as_str);
        let (Some(seq), Some(prev)) = (seq, prev) else {
            return Err(Broken {
                at: r.at.clone(),
                seq,
                why: "no seq or prev".into(),
            });
        };
        let Some(before) = i.checked_sub(1).map(|j| &records[j]) else {
            // The oldest record kept: its predecessor may have been deleted by retention.
            if seq == 1 && prev != super::GENESIS {
                return Err(Broken {
                    at: r.at.clone(),
                    seq: Some(seq),
                    why: "the first record does not start the chain".into(),
                });
            }
            first_seq = seq;
            continue;
        };
        let before_seq = before.value.get("seq").and_then(Value::as_u64).unwrap_or(0);
        if prev != hash(&before.bytes) {
            if seq == before_seq + 1 {
                // Either the record before was changed, or this one's `prev` was: the next
                // record tells which (it still matches this one only if this one is untouched).
                let this_changed = records
                    .get(i + 1)
                    .and_then(|next| next.value.get("prev").and_then(Value::as_str))
                    .is_some_and(|p| p != hash(&r.bytes));
                if this_changed {
                    return Err(Broken {
                        at: r.at.clone(),
                        seq: Some(seq),
                        why: "changed: its prev and the next record's prev both disagree".into(),
                    });
                }
                return Err(Broken {
                    at: before.at.clone(),
                    seq: Some(before_seq),
                    why: format!(
                        "changed: its hash does not match the prev of the next record ({})",
                        r.at
                    ),
                });
            }
            let later = records[i + 1..].iter().any(|l| {
                l.value
                    .get("seq")
                    .and_then(Value::as_u64)
                    .is_some_and(|s| s > before_seq && s < seq)
            });
            if seq > before_seq + 1 && !later {
                return Err(Broken {
                    at: r.at.clone(),
                    seq: Some(seq),
                    why: format!(
                        "records {} to {} are missing before it",
                        before_seq + 1,
                        seq - 1
                    ),
                });
            }
            return Err(Broken {
                at: r.at.clone(),
                seq: Some(seq),
                why: format!("out of order: comes after seq {before_seq}"),
            });
        }
        if seq != before_seq + 1 {
            return Err(Broken {
                at: r.at.clone(),
                seq: Some(seq),
                why: format!("changed: its seq should be {}", before_seq + 1),
            });
        }
    }
    Ok(Intact {
        records: records.len() as u64,
        files,
        first_seq,
        head: records
            .last()
            .map_or_else(|| super::GENESIS.to_owned(), |r| hash(&r.bytes)),
    })
}

fn files_or_broken(dir: &Path) -> Result<Vec<(time::Date, PathBuf)>, Broken> {
    super::files(dir).map_err(|e| Broken {
        at: Place {
            file: dir.display().to_string(),
            line: 0,
        },
        seq: None,
        why: format!("cannot be listed: {e}"),
    })
}

fn file_label(path: &Path) -> String {
    path.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}
