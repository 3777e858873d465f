//! The order journal: which identity orders are open right now, kept durably in
//! `<data_dir>/orders.journal` so that a callgate that crashed (or was restarted) can resume the
//! orders whose callers are still waiting, and cancel the others, instead of leaving a request on a
//! person's phone for a call that has moved on.
//!
//! Invariants:
//! - An order is journalled (written and fsynced) before the caller is told to open the app: the call
//!   task awaits [`Journal::opened`] before it hands the provider's answer to the dialogue.
//! - No personal number is written: the person is an HMAC under a key of the journal's own
//!   (`journal.key`, created once, mode 0600), used only to check after a restart that the identity
//!   the provider returns is the person the order was for.
//! - One writer thread owns the file. Opens are group-committed (one fsync for all that queued up);
//!   closes are appended without waiting (a close lost in a crash only makes the next start cancel an
//!   order that had ended already, which is harmless). The file is rewritten with the open orders only
//!   (temp file, fsync, rename) at start and whenever enough closed orders have piled up.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot};

use crate::pnr::{PersonalNumber, PseudonymKey};

/// One open order.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    /// The provider's order reference (BankID `orderRef`).
    pub order: String,
    /// The caller's channel id.
    pub call: String,
    pub queue: String,
    /// The provider's name in the config (`[idp.<name>]`).
    pub idp: String,
    /// The verification id (`CALLGATE_REF`).
    pub reference: String,
    /// HMAC of the person's number under the journal key.
    pub person: String,
    /// When the order was created (Unix milliseconds, UTC).
    pub started_ms: u64,
}

impl std::fmt::Debug for Entry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Entry")
            .field("order", &self.order)
            .field("call", &self.call)
            .field("queue", &self.queue)
            .field("idp", &self.idp)
            .finish_non_exhaustive()
    }
}

#[derive(Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
enum Line {
    Open(Entry),
    Close { order: String },
}

enum Op {
    Open(Entry, oneshot::Sender<bool>),
    Close(String),
    Compact,
    /// Everything sent before is on disk once this is answered.
    Flush(oneshot::Sender<bool>),
}

/// How many closed orders may pile up in the file before it is rewritten.
const COMPACT_AFTER: usize = 1000;

/// A handle to the journal's writer. Cheap to clone.
#[derive(Clone)]
pub struct Journal {
    tx: mpsc::UnboundedSender<Op>,
    key: PseudonymKey,
    path: PathBuf,
}

impl std::fmt::Debug for Journal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Journal")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

impl Journal {
    /// Opens (creates) the journal under `data_dir`, reads what the previous process left open and
    /// starts the writer. Returns the journal and the orders left open, oldest first.
    pub fn open(data_dir: &Path) -> std::io::Result<(Journal, Vec<Entry>)> {
        std::fs::create_dir_all(data_dir)?;
        let key = crate::durable::load_or_create_key(&data_dir.join("journal.key"), "journal key")?;
        let path = data_dir.join("orders.journal");
        let open = read(&path)?;
        let mut left: Vec<Entry> = open.values().cloned().collect();
        left.sort_by_key(|e| e.started_ms);
        rewrite(&path, open.values())?;
        let file = OpenOptions::new().create(true).append(true).open(&path)?;
        let (tx, rx) = mpsc::unbounded_channel();
        let writer = Writer {
            path: path.clone(),
            file,
            open,
            closed: 0,
        };
        std::thread::Builder::new()
            .name("order-journal".into())
            .spawn(move || writer.run(rx))?;
        Ok((Journal { tx, key, path }, left))
    }

    /// The key of the journal's pseudonyms.
    pub fn key(&self) -> &PseudonymKey {
        &self.key
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The journal's pseudonym of a person (never the number itself).
    pub fn person(&self, number: &PersonalNumber) -> String {
        number.pseudonym(&self.key)
    }

    /// Records an open order and waits until it is on disk. `false` if it could not be written (the
    /// order then cannot be resumed after a crash; the call goes on).
    pub async fn opened(&self, entry: Entry) -> bool {
        let (ack, done) = oneshot::channel();
        if self.tx.send(Op::Open(entry, ack)).is_err() {
            return false;
        }
        done.await.unwrap_or(false)
    }

    /// Records that an order ended (completed, failed or cancelled). Does not wait.
    pub fn closed(&self, order: &str) {
        let _ = self.tx.send(Op::Close(order.to_owned()));
    }

    /// Rewrites the file with the open orders only.
    pub fn compact(&self) {
        let _ = self.tx.send(Op::Compact);
    }

    /// Waits until everything recorded so far is on disk (closes included). `false` if it is not.
    pub async fn flush(&self) -> bool {
        let (ack, done) = oneshot::channel();
        if self.tx.send(Op::Flush(ack)).is_err() {
            return false;
        }
        done.await.unwrap_or(false)
    }
}

struct Writer {
    path: PathBuf,
    file: File,
    open: HashMap<String, Entry>,
    closed: usize,
}

impl Writer {
    fn run(mut self, mut rx: mpsc::UnboundedReceiver<Op>) {
        while let Some(first) = rx.blocking_recv() {
            let mut batch = vec![first];
            while let Ok(more) = rx.try_recv() {
                batch.push(more);
            }
            let mut buf = Vec::new();
            let mut acks = Vec::new();
            let mut compact = false;
            for op in batch {
                let line = match op {
                    Op::Open(entry, ack) => {
                        acks.push(ack);
                        self.open.insert(entry.order.clone(), entry.clone());
                        Line::Open(entry)
                    }
                    Op::Close(order) => {
                        if self.open.remove(&order).is_none() {
                            continue;
                        }
                        self.closed += 1;
                        Line::Close { order }
                    }
                    Op::Compact => {
                        compact = true;
                        continue;
                    }
                    Op::Flush(ack) => {
                        acks.push(ack);
                        continue;
                    }
                };
                if serde_json::to_writer(&mut buf, &line).is_ok() {
                    buf.push(b'\n');
                }
            }
            let mut ok = self.file.write_all(&buf).is_ok();
            if !acks.is_empty() {
                ok = ok && self.file.sync_data().is_ok();
            }
            if !ok {
                tracing::error!(path = %self.path.display(), "order journal write failed");
            }
            for ack in acks {
                let _ = ack.send(ok);
            }
            if compact || self.closed >= COMPACT_AFTER {
                self.compact();
            }
        }
    }

    fn compact(&mut self) {
        let reopened = rewrite(&self.path, self.open.values()).and_then(|()| {
            OpenOptions::new()
                .create(true)
                .append(true)
                .open(&self.path)
        });
        match reopened {
            Ok(file) => {
                self.file = file;
                self.closed = 0;
            }
            Err(e) => {
                tracing::error!(path = %self.path.display(), error = %crate::telemetry::ErrorChain(&e), "order journal compaction failed")
            }
        }
    }
}

/// Replays the file: the orders opened and not closed. Lines that do not parse (a torn last line
/// after a crash) are skipped.
fn read(path: &Path) -> std::io::Result<HashMap<String, Entry>> {
    let mut open = HashMap::new();
    let file = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(open),
        Err(e) => return Err(e),
    };
    let mut skipped = 0usize;
    for line in BufReader::new(file).lines() {
        let line = line?;
        if line.trim().is_empty() {
            continue;
        }
        match serde_json::from_str::<Line>(&line) {
            Ok(Line::Open(entry)) => {
                open.insert(entry.order.clone(), entry);
            }
            Ok(Line::Close { order }) => {
                open.remove(&order);
            }
            Err(_) => skipped += 1,
        }
    }
    if skipped > 0 {
        tracing::warn!(path = %path.display(), lines = skipped, "order journal: unreadable lines skipped");
    }
    Ok(open)
}

/// Atomically replaces the file with these open orders.
fn rewrite<'a>(path: &Path, entries: impl Iterator<Item = &'a Entry>) -> std::io::Result<()> {
    let mut buf = Vec::new();
    for e in entries {
        serde_json::to_writer(&mut buf, &Line::Open(e.clone()))?;
        buf.push(b'\n');
    }
    crate::durable::replace(path, &buf)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(order: &str, call: &str, at: u64) -> Entry {
        Entry {
            order: order.into(),
            call: call.into(),
            queue: "support".into(),
            idp: "bankid".into(),
            reference: format!("ref-{order}"),
            person: "p".into(),
            started_ms: at,
        }
    }

    #[tokio::test]
    async fn open_orders_survive_a_restart_and_closed_ones_do_not() {
        let dir = tempdir();
        let (j, left) = Journal::open(&dir).unwrap();
        assert!(left.is_empty());
        assert!(j.opened(entry("o1", "c1", 2)).await);
        assert!(j.opened(entry("o2", "c2", 1)).await);
        assert!(j.opened(entry("o3", "c3", 3)).await);
        j.closed("o1");
        // A later open is acknowledged only after the close before it was written.
        assert!(j.opened(entry("o4", "c4", 4)).await);
        j.closed("o4");
        assert!(j.flush().await);
        drop(j);
        // A crash can tear the last line.
        let mut f = OpenOptions::new()
            .append(true)
            .open(dir.join("orders.journal"))
            .unwrap();
        f.write_all(b"{\"op\":\"open\",\"ord").unwrap();
        drop(f);

        let (_j, left) = Journal::open(&dir).unwrap();
        let orders: Vec<_> = left.iter().map(|e| e.order.as_str()).collect();
        assert_eq!(orders, ["o2", "o3"]);
        // Compacted at open: only the open orders remain in the file.
        let text = std::fs::read_to_string(dir.join("orders.journal")).unwrap();
        assert_eq!(text.lines().count(), 2);
        assert!(!text.contains("o1") && !text.contains("o4"));
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[tokio::test]
    async fn the_key_is_kept_and_the_person_is_never_the_number() {
        let dir = tempdir();
        let number = PersonalNumber::parse_swedish_12("199908072391").unwrap();
        let (j, _) = Journal::open(&dir).unwrap();
        let p1 = j.person(&number);
        drop(j);
        let (j, _) = Journal::open(&dir).unwrap();
        assert_eq!(j.person(&number), p1);
        assert!(!p1.contains("199908072391") && !p1.contains("9908072391"));
        assert!(j.opened(entry("o1", "c1", 1)).await);
        let text = std::fs::read_to_string(dir.join("orders.journal")).unwrap();
        assert!(!text.contains("9908072391"));
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt as _;
            let mode = std::fs::metadata(dir.join("journal.key"))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o077, 0);
        }
        let _ = std::fs::remove_dir_all(&dir);
    }

    fn tempdir() -> PathBuf {
        let dir = std::env::temp_dir().join(format!("callgate-journal-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }
}
