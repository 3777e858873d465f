//! The audit trail: one JSON line per verification (the gate's check, every check during the call,
//! and calls passed on without a check) and per agent action (a check started or cancelled, identity
//! fields viewed through the API), appended to `<data_dir>/audit/audit-YYYY-MM-DD.jsonl`.
//!
//! Invariants:
//! - Pseudonymised: a record names a person only by the HMAC pseudonym of their number (under
//!   `server.pseudonym_key`, or the trail's own `audit.key` when that is not set), never by number
//!   or name; an identity view records field names, never values.
//! - Hash-chained: every line carries `seq` (its position, counted from 1 across all files) and
//!   `prev` (SHA-256 hex of the previous line's exact bytes, 64 zeros for the very first). The chain
//!   runs across the daily files and across restarts (the last line is read at open).
//! - One writer thread owns the files. Records that queued up are written together and fsynced once
//!   (group commit) before any of them is acknowledged; [`Audit::record`] waits for that, bounded
//!   by [`WAIT`], so a stalled disk never holds a caller.
//! - Files roll when the writer's clock passes 00:00 UTC; files whose day is more than
//!   `retention_days` before today are deleted at open, at each roll and on [`Audit::sweep`]. The
//!   clock is injected, so tests cross midnight without waiting.

pub mod chain;
pub mod cli;
#[cfg(test)]
mod tests;

use std::fs::{File, OpenOptions};
use std::future::Future;
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use serde::Serialize;
use time::format_description::well_known::Rfc3339;
use time::{Date, OffsetDateTime};
use tokio::sync::{mpsc, oneshot};

use crate::pnr::{PersonalNumber, PseudonymKey};

/// How long a caller of [`Audit::record`] waits for its record to be on disk before it goes on.
pub const WAIT: Duration = Duration::from_secs(2);
/// Default `[audit] retention_days`.
pub const DEFAULT_RETENTION_DAYS: u32 = 365;
/// `prev` of the first record ever written.
pub const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";
/// The trail's directory under the data directory.
pub const DIR: &str = "audit";
/// The trail's own pseudonym key, used when `server.pseudonym_key` is not set.
pub const KEY_FILE: &str = "audit.key";

/// The writer's clock (UTC). Injected so tests can cross midnight.
pub type Clock = Arc<dyn Fn() -> OffsetDateTime + Send + Sync>;

/// A verification's record: what a check ended with, or a call passed on without one.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Entry {
    pub reference: String,
    pub call_id: String,
    pub queue: String,
    pub status: &'static str,
    pub reason: &'static str,
    pub method: String,
    /// Who started the check: `gate`, `api:<token name>`, `agent_keys`; empty without a check.
    pub started_by: String,
    /// HMAC pseudonym of the verified person (empty unless verified).
    pub person: String,
    /// Hex SHA-256 of the provider's signature and OCSP response (empty unless verified).
    pub evidence: String,
    pub stages: Vec<&'static str>,
    /// Where the call was sent: a dialplan location, `agent`, `next priority`, `-` (gone).
    pub destination: String,
    pub duration_ms: u64,
}

/// Where a check was made, for [`Entry::of_check`].
pub struct CheckContext<'a> {
    pub call_id: &'a str,
    pub queue: &'a str,
    pub started_by: String,
    pub stages: &'a [crate::verify::Stage],
    pub destination: String,
    pub duration: Duration,
}

impl Entry {
    /// The record of a check that ended with `record`: the person (a pseudonym under the trail's key)
    /// and the evidence only when verified, never a number.
    pub fn of_check(audit: &Audit, record: &crate::outcome::Record, at: CheckContext<'_>) -> Entry {
        let outcome = record.outcome;
        let verified = record
            .identity
            .as_ref()
            .filter(|_| outcome == crate::outcome::Outcome::Verified);
        Entry {
            reference: record.reference.clone(),
            call_id: at.call_id.to_owned(),
            queue: at.queue.to_owned(),
            status: outcome.status().code(),
            reason: outcome.reason().map(|r| r.code()).unwrap_or(""),
            method: record.method.clone(),
            started_by: at.started_by,
            person: verified
                .map(|i| audit.person(&i.number))
                .unwrap_or_default(),
            evidence: verified
                .and_then(|i| i.evidence_digest.clone())
                .unwrap_or_default(),
            stages: at.stages.iter().map(|s| s.code()).collect(),
            destination: at.destination,
            duration_ms: u64::try_from(at.duration.as_millis()).unwrap_or(u64::MAX),
        }
    }
}

/// What one record says. `kind` on the line is the variant's snake_case name.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Event {
    /// A verification ended, or a call was passed on without one.
    Verification(Entry),
    /// An agent started a check during the call.
    CheckStarted {
        reference: String,
        call_id: String,
        queue: String,
        by: String,
        method: String,
    },
    /// An agent cancelled the check in progress.
    CheckCancelled {
        reference: String,
        call_id: String,
        queue: String,
        by: String,
    },
    /// An API client read a call or verification whose answer held identity fields (names only).
    IdentityViewed {
        reference: String,
        call_id: String,
        by: String,
        fields: Vec<String>,
    },
    /// The call did not reach the destination its verification record names (the route failed,
    /// the caller hung up meanwhile).
    Rerouted {
        reference: String,
        call_id: String,
        destination: String,
    },
}

/// How the trail is kept.
#[derive(Clone)]
pub struct Settings {
    pub retention_days: u32,
    /// The pseudonym key; `None`: the trail's own key file (created once, mode 0600).
    pub key: Option<PseudonymKey>,
    pub clock: Clock,
}

impl Settings {
    pub fn new(retention_days: u32, key: Option<PseudonymKey>) -> Settings {
        Settings {
            retention_days,
            key,
            clock: Arc::new(utc_now),
        }
    }
}

#[allow(clippy::disallowed_methods)] // the audit writer's production clock; tests inject their own
fn utc_now() -> OffsetDateTime {
    OffsetDateTime::now_utc()
}

enum Op {
    Append {
        at: Option<OffsetDateTime>,
        event: Box<Event>,
        ack: Option<oneshot::Sender<bool>>,
    },
    /// Everything queued before is on disk once this is answered.
    Flush(oneshot::Sender<bool>),
    /// Delete files past retention.
    Sweep,
    /// Test hook: the writer says it is held, then waits here until released.
    #[cfg(test)]
    Hold(std::sync::mpsc::Receiver<()>, std::sync::mpsc::Sender<()>),
}

/// A handle to the writer thread. Cheap to clone.
#[derive(Clone)]
pub struct Audit {
    tx: mpsc::UnboundedSender<Op>,
    dir: PathBuf,
    key: PseudonymKey,
    syncs: Arc<AtomicU64>,
}

impl std::fmt::Debug for Audit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Audit")
            .field("dir", &self.dir)
            .finish_non_exhaustive()
    }
}

impl Audit {
    /// Opens (creates) the trail under `<data_dir>/audit`, finds the end of the chain, applies
    /// retention and starts the writer thread.
    pub fn open(data_dir: &Path, settings: Settings) -> std::io::Result<Audit> {
        let dir = data_dir.join(DIR);
        create_private_dir(&dir)?;
        let key = match settings.key {
            Some(k) => k,
            None => crate::durable::load_or_create_key(&dir.join(KEY_FILE), "audit key")?,
        };
        let (seq, prev) = chain_head(&dir)?;
        let syncs = Arc::new(AtomicU64::new(0));
        let writer = Writer {
            dir: dir.clone(),
            retention_days: settings.retention_days,
            clock: settings.clock,
            file: None,
            seq,
            prev,
            syncs: Arc::clone(&syncs),
        };
        let today = (writer.clock)().date();
        sweep(&dir, today, writer.retention_days);
        let (tx, rx) = mpsc::unbounded_channel();
        std::thread::Builder::new()
            .name("audit-writer".into())
            .spawn(move || writer.run(rx))?;
        Ok(Audit {
            tx,
            dir,
            key,
            syncs,
        })
    }

    /// The directory of the daily files.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The trail's pseudonym of a person.
    pub fn person(&self, number: &PersonalNumber) -> String {
        number.pseudonym(&self.key)
    }

    /// Appends a record dated `at` and waits (at most [`WAIT`]) until it is fsynced. `false` if it
    /// is not known to be on disk; the error is logged here. The record is queued before this
    /// returns, so records queued one after the other keep their order.
    pub fn record(&self, at: SystemTime, event: Event) -> impl Future<Output = bool> + 'static {
        let (ack, done) = oneshot::channel();
        let sent = self
            .tx
            .send(Op::Append {
                at: Some(OffsetDateTime::from(at)),
                event: Box::new(event),
                ack: Some(ack),
            })
            .is_ok();
        async move {
            if !sent {
                tracing::error!("audit writer has stopped; record lost");
                return false;
            }
            match tokio::time::timeout(WAIT, done).await {
                Ok(Ok(true)) => true,
                Ok(Ok(false)) => {
                    tracing::error!("audit record could not be written durably");
                    false
                }
                Ok(Err(_)) => {
                    tracing::error!("audit writer has stopped; record lost");
                    false
                }
                Err(_) => {
                    tracing::error!(
                        wait_ms = WAIT.as_millis() as u64,
                        "audit record not on disk in time; going on without waiting"
                    );
                    false
                }
            }
        }
    }

    /// Appends a record dated by the writer's clock, without waiting.
    pub fn note(&self, event: Event) {
        if self
            .tx
            .send(Op::Append {
                at: None,
                event: Box::new(event),
                ack: None,
            })
            .is_err()
        {
            tracing::error!("audit writer has stopped; record lost");
        }
    }

    /// Waits until everything queued so far is on disk. `false` if it is not.
    pub async fn flush(&self) -> bool {
        let (ack, done) = oneshot::channel();
        if self.tx.send(Op::Flush(ack)).is_err() {
            return false;
        }
        done.await.unwrap_or(false)
    }

    /// Deletes the files past retention (the app calls this hourly; the writer also does at each roll).
    pub fn sweep(&self) {
        let _ = self.tx.send(Op::Sweep);
    }

    /// How many fsyncs the writer has done.
    pub fn syncs(&self) -> u64 {
        self.syncs.load(Ordering::Relaxed)
    }

    #[cfg(test)]
    /// Stops the writer until the returned sender is used; returns once the writer is held (so
    /// whatever is queued from now on waits for the release).
    fn hold(&self) -> std::sync::mpsc::Sender<()> {
        let (release, wait) = std::sync::mpsc::channel();
        let (held_tx, held) = std::sync::mpsc::channel();
        let _ = self.tx.send(Op::Hold(wait, held_tx));
        let _ = held.recv();
        release
    }
}

struct Writer {
    dir: PathBuf,
    retention_days: u32,
    clock: Clock,
    /// The open day file.
    file: Option<(Date, File)>,
    /// `seq` of the last record written (0: none yet).
    seq: u64,
    /// Hash of the last record's line.
    prev: String,
    syncs: Arc<AtomicU64>,
}

/// One line: position, link to the previous, time, then the event's fields.
#[derive(Serialize)]
struct Line<'a> {
    seq: u64,
    prev: &'a str,
    at: &'a str,
    #[serde(flatten)]
    event: &'a Event,
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
            let mut ok = true;
            for op in batch {
                match op {
                    Op::Append { at, event, ack } => {
                        let now = (self.clock)();
                        if self.file.as_ref().map(|(d, _)| *d) != Some(now.date()) {
                            // Midnight (UTC) passed, or the first record: finish the old file first.
                            ok &= self.commit(&mut buf);
                            if let Err(e) = self.roll(now.date()) {
                                tracing::error!(dir = %self.dir.display(), error = %crate::telemetry::ErrorChain(&e), "audit file could not be opened");
                                ok = false;
                            }
                        }
                        self.append(&mut buf, at.unwrap_or(now), &event);
                        if let Some(ack) = ack {
                            acks.push(ack);
                        }
                    }
                    Op::Flush(ack) => acks.push(ack),
                    Op::Sweep => sweep(&self.dir, (self.clock)().date(), self.retention_days),
                    #[cfg(test)]
                    Op::Hold(wait, held) => {
                        let _ = held.send(());
                        let _ = wait.recv();
                    }
                }
            }
            ok &= self.commit(&mut buf);
            for ack in acks {
                let _ = ack.send(ok);
            }
        }
        if let Some((_, file)) = &self.file {
            let _ = file.sync_all();
        }
    }

    /// Serialises one record onto `buf` and advances the chain.
    fn append(&mut self, buf: &mut Vec<u8>, at: OffsetDateTime, event: &Event) {
        let at = at
            .replace_nanosecond(0)
            .ok()
            .and_then(|t| t.format(&Rfc3339).ok())
            .unwrap_or_default();
        let seq = self.seq + 1;
        let line = Line {
            seq,
            prev: &self.prev,
            at: &at,
            event,
        };
        let Ok(bytes) = serde_json::to_vec(&line) else {
            tracing::error!("audit record could not be serialised");
            return;
        };
        self.prev = chain::hash(&bytes);
        self.seq = seq;
        buf.extend_from_slice(&bytes);
        buf.push(b'\n');
    }

    /// Writes `buf` to the open file and fsyncs it. `true` when it is on disk (or there was nothing).
    fn commit(&mut self, buf: &mut Vec<u8>) -> bool {
        if buf.is_empty() {
            return true;
        }
        let Some((_, file)) = self.file.as_mut() else {
            buf.clear();
            return false;
        };
        let ok = file.write_all(buf).is_ok() && file.sync_data().is_ok();
        buf.clear();
        self.syncs.fetch_add(1, Ordering::Relaxed);
        if !ok {
            tracing::error!(dir = %self.dir.display(), "audit write failed");
        }
        ok
    }

    /// Opens the file of `day` (appending); at a change of day, applies retention.
    fn roll(&mut self, day: Date) -> std::io::Result<()> {
        let rolled = self.file.is_some();
        self.file = None;
        let path = self.dir.join(file_name(day));
        let mut options = OpenOptions::new();
        options.create(true).append(true);
        #[cfg(unix)]
        {
            use std::os::unix::fs::OpenOptionsExt as _;
            options.mode(0o600);
        }
        let file = options.open(&path)?;
        // The new file's directory entry must survive a crash too.
        if let Ok(d) = File::open(&self.dir) {
            let _ = d.sync_all();
        }
        self.file = Some((day, file));
        if rolled {
            tracing::info!(file = %path.display(), "audit trail rolled to a new day");
            sweep(&self.dir, day, self.retention_days);
        }
        Ok(())
    }
}

/// `audit-YYYY-MM-DD.jsonl`.
pub fn file_name(day: Date) -> String {
    format!(
        "audit-{:04}-{:02}-{:02}.jsonl",
        day.year(),
        u8::from(day.month()),
        day.day()
    )
}

/// The day of a trail file's name, `None` for any other file.
pub fn file_day(name: &str) -> Option<Date> {
    let d = name.strip_prefix("audit-")?.strip_suffix(".jsonl")?;
    let format = time::macros::format_description!("[year]-[month]-[day]");
    Date::parse(d, &format).ok()
}

/// The trail's files, oldest first.
pub fn files(dir: &Path) -> std::io::Result<Vec<(Date, PathBuf)>> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let name = entry.file_name();
        if let Some(day) = name.to_str().and_then(file_day) {
            out.push((day, entry.path()));
        }
    }
    out.sort();
    Ok(out)
}

/// Deletes the files whose day is more than `retention_days` before `today`.
fn sweep(dir: &Path, today: Date, retention_days: u32) {
    let Some(oldest_kept) = today.checked_sub(time::Duration::days(i64::from(retention_days)))
    else {
        return;
    };
    let Ok(all) = files(dir) else { return };
    for (day, path) in all {
        if day < oldest_kept {
            match std::fs::remove_file(&path) {
                Ok(()) => {
                    tracing::info!(file = %path.display(), "audit file past retention deleted")
                }
                Err(e) => {
                    tracing::warn!(file = %path.display(), error = %crate::telemetry::ErrorChain(&e), "audit file past retention could not be deleted")
                }
            }
        }
    }
}

/// The end of the chain: the last record's `seq` and hash (0 and [`GENESIS`] for an empty trail). A
/// torn last line (a crash in the middle of a write: never acknowledged) is cut off.
fn chain_head(dir: &Path) -> std::io::Result<(u64, String)> {
    for (_, path) in files(dir)?.iter().rev() {
        let mut file = OpenOptions::new().read(true).write(true).open(path)?;
        let mut bytes = Vec::new();
        file.read_to_end(&mut bytes)?;
        if !bytes.is_empty() && !bytes.ends_with(b"\n") {
            let keep = bytes.iter().rposition(|b| *b == b'\n').map_or(0, |i| i + 1);
            tracing::warn!(file = %path.display(), "audit file ends in a torn record; cutting it off");
            file.set_len(keep as u64)?;
            file.seek(SeekFrom::End(0))?;
            file.sync_all()?;
            bytes.truncate(keep);
        }
        let lines: Vec<&[u8]> = bytes
            .split(|b| *b == b'\n')
            .filter(|l| !l.is_empty())
            .collect();
        let Some(last) = lines.last() else { continue };
        // The position of the last record: its own `seq`, or, if it has none (a damaged line),
        // counted on from the last record that has one. `callgate audit verify` will name the damage;
        // callers are not refused for it.
        let seq_of = |l: &[u8]| {
            serde_json::from_slice::<serde_json::Value>(l)
                .ok()
                .and_then(|v| v.get("seq").and_then(serde_json::Value::as_u64))
        };
        let seq = match seq_of(last) {
            Some(seq) => seq,
            None => {
                tracing::error!(file = %path.display(), "the last audit record is damaged; the chain continues after it (run callgate audit verify)");
                let (after, base) = lines
                    .iter()
                    .rev()
                    .enumerate()
                    .find_map(|(i, l)| seq_of(l).map(|s| (i, s)))
                    .unwrap_or((lines.len(), 0));
                base + after as u64
            }
        };
        return Ok((seq, chain::hash(last)));
    }
    Ok((0, GENESIS.to_owned()))
}

fn create_private_dir(dir: &Path) -> std::io::Result<()> {
    let mut builder = std::fs::DirBuilder::new();
    builder.recursive(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::DirBuilderExt as _;
        builder.mode(0o700);
    }
    builder.create(dir)
}
