//! The webhook outbox: `<data_dir>/webhooks.outbox`, JSON Lines (mode 0600), one line per delivery
//! added (`{"op":"add","id","target","event","body","created_ms"}`) and one per delivery finished
//! (`{"op":"done","id","target"}`: delivered, failed for good, or dropped).
//!
//! Invariants:
//! - One writer thread owns the file. Adds are group-committed: everything that queued up is written
//!   with one fsync, and only then handed to the dispatcher, so no attempt is made for an event that a
//!   crash could lose. Done lines are written without an fsync of their own (a done lost in a crash only
//!   makes the next start deliver that event once more; receivers de-duplicate by `id`).
//! - Bounded: at most `outbox_max` deliveries are pending. Adding past it drops the oldest pending
//!   ones (error log, `callgate_webhook_deliveries_total{result="dropped"}`): new events are never
//!   refused, and the oldest are the least useful to a CRM.
//! - At open, the file is replayed; deliveries older than `max_age` or for targets no longer configured
//!   are dropped, and the file is rewritten with the pending deliveries only (temp file, fsync,
//!   rename). It is rewritten again whenever enough done lines have piled up.

use std::collections::{BTreeMap, HashMap};
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot};

use crate::config::Webhooks as Settings;
use crate::telemetry::Metrics;

/// The file's name in the data directory.
pub const FILE: &str = "webhooks.outbox";
/// How many events the call tasks may queue up ahead of the writer before new ones are dropped.
const QUEUE: usize = 4096;
/// Done lines that may pile up in the file before it is rewritten (at least the pending count).
const COMPACT_AFTER: usize = 1000;

/// One delivery: an event for one target.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    /// The event id (the same for every target of the event).
    pub id: String,
    /// The target's name.
    pub target: String,
    /// The event type code.
    pub event: String,
    /// The exact JSON body that is signed and sent.
    pub body: String,
    /// When the event occurred (Unix milliseconds, UTC).
    pub created_ms: u64,
}

impl Entry {
    pub fn key(&self) -> Key {
        (self.id.clone(), self.target.clone())
    }
}

impl std::fmt::Debug for Entry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the body: it may hold disclosed identity fields.
        f.debug_struct("Entry")
            .field("id", &self.id)
            .field("target", &self.target)
            .field("event", &self.event)
            .finish_non_exhaustive()
    }
}

/// A delivery's identity: event id and target name.
pub type Key = (String, String);

#[derive(Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
enum Line {
    Add(Entry),
    Done { id: String, target: String },
}

/// What the writer is asked to do.
pub enum Op {
    /// New deliveries (one event, its targets).
    Add(Vec<Entry>),
    /// A delivery is finished (delivered, failed or dropped by the dispatcher).
    Done(Key),
    /// Answered once everything sent before is on disk.
    Flush(oneshot::Sender<bool>),
}

/// What the writer tells the dispatcher.
#[derive(Debug)]
pub enum ToDispatcher {
    /// On disk: deliver it.
    New(Entry),
    /// Dropped to keep the outbox bounded: stop trying.
    Evicted(Key),
}

pub struct Outbox;

impl Outbox {
    /// Opens (creates) the outbox, replays it and starts the writer thread. Returns the writer's
    /// queue and the deliveries left pending by the previous process, oldest first.
    pub fn open(
        data_dir: &Path,
        settings: &Settings,
        metrics: Arc<Metrics>,
        to_dispatcher: mpsc::UnboundedSender<ToDispatcher>,
    ) -> std::io::Result<(mpsc::Sender<Op>, Vec<Entry>)> {
        std::fs::create_dir_all(data_dir)?;
        let path = data_dir.join(FILE);
        let read = read(&path)?;
        let now_ms = crate::calls::task::unix_ms(wall_clock());
        let max_age_ms = u64::try_from(settings.max_age.as_millis()).unwrap_or(u64::MAX);
        let mut pending = BTreeMap::new();
        let mut index = HashMap::new();
        let mut seq = 0u64;
        for entry in read {
            if !settings.targets.iter().any(|t| t.name == entry.target) {
                tracing::warn!(target_name = %entry.target, event.id = %entry.id, "webhook for a target no longer configured: dropped");
                metrics.webhook_delivery(&entry.target, "dropped");
                continue;
            }
            if now_ms.saturating_sub(entry.created_ms) > max_age_ms {
                tracing::error!(target_name = %entry.target, event.id = %entry.id, "webhook older than webhooks.max_age: dropped");
                metrics.webhook_delivery(&entry.target, "dropped");
                continue;
            }
            index.insert(entry.key(), seq);
            pending.insert(seq, entry);
            seq += 1;
        }
        let mut writer = Writer {
            path: path.clone(),
            file: None,
            pending,
            index,
            seq,
            done: 0,
            max: settings.outbox_max,
            metrics,
            to_dispatcher,
        };
        writer.evict_over_bound(&mut Vec::new());
        rewrite(&path, writer.pending.values())?;
        writer.file = Some(OpenOptions::new().append(true).open(&path)?);
        writer.gauge();
        let left: Vec<Entry> = writer.pending.values().cloned().collect();
        let (tx, rx) = mpsc::channel(QUEUE);
        std::thread::Builder::new()
            .name("webhook-outbox".into())
            .spawn(move || writer.run(rx))?;
        Ok((tx, left))
    }
}

struct Writer {
    path: PathBuf,
    file: Option<File>,
    /// Pending deliveries in the order they were added.
    pending: BTreeMap<u64, Entry>,
    index: HashMap<Key, u64>,
    seq: u64,
    /// Done lines in the file since it was last rewritten.
    done: usize,
    max: usize,
    metrics: Arc<Metrics>,
    to_dispatcher: mpsc::UnboundedSender<ToDispatcher>,
}

impl Writer {
    fn run(mut self, mut rx: mpsc::Receiver<Op>) {
        while let Some(first) = rx.blocking_recv() {
            let mut batch = vec![first];
            while let Ok(more) = rx.try_recv() {
                batch.push(more);
            }
            let mut buf = Vec::new();
            let mut acks = Vec::new();
            let mut added = Vec::new();
            let mut sync = false;
            for op in batch {
                match op {
                    Op::Add(entries) => {
                        sync = true;
                        for entry in entries {
                            push_line(&mut buf, &Line::Add(entry.clone()));
                            self.index.insert(entry.key(), self.seq);
                            self.pending.insert(self.seq, entry.clone());
                            self.seq += 1;
                            added.push(entry);
                        }
                    }
                    Op::Done(key) => {
                        if let Some(seq) = self.index.remove(&key) {
                            self.pending.remove(&seq);
                            self.done += 1;
                            push_line(
                                &mut buf,
                                &Line::Done {
                                    id: key.0,
                                    target: key.1,
                                },
                            );
                        }
                    }
                    Op::Flush(ack) => {
                        sync = true;
                        acks.push(ack);
                    }
                }
            }
            let evicted = self.evict_over_bound(&mut buf);
            let ok = self.write(&buf, sync);
            for ack in acks {
                let _ = ack.send(ok);
            }
            // Only what is on disk is attempted; what could not be written is still attempted (the
            // call is over, the event is all there is), it just would not survive a crash.
            for entry in added {
                if !evicted.contains(&entry.key()) {
                    let _ = self.to_dispatcher.send(ToDispatcher::New(entry));
                }
            }
            for key in evicted {
                let _ = self.to_dispatcher.send(ToDispatcher::Evicted(key));
            }
            if self.done >= COMPACT_AFTER.max(self.pending.len()) {
                self.compact();
            }
            self.gauge();
        }
    }

    /// Drops the oldest pending deliveries past the bound, with a done line each.
    fn evict_over_bound(&mut self, buf: &mut Vec<u8>) -> Vec<Key> {
        let mut evicted = Vec::new();
        while self.pending.len() > self.max {
            let Some((_, entry)) = self.pending.pop_first() else {
                break;
            };
            self.index.remove(&entry.key());
            tracing::error!(target_name = %entry.target, event.id = %entry.id, event.kind = %entry.event, "webhook outbox full (webhooks.outbox_max): oldest undelivered event dropped");
            self.metrics.webhook_delivery(&entry.target, "dropped");
            push_line(
                buf,
                &Line::Done {
                    id: entry.id.clone(),
                    target: entry.target.clone(),
                },
            );
            self.done += 1;
            evicted.push(entry.key());
        }
        evicted
    }

    fn write(&mut self, buf: &[u8], sync: bool) -> bool {
        let Some(file) = self.file.as_mut() else {
            return false;
        };
        let mut ok = buf.is_empty() || file.write_all(buf).is_ok();
        if sync {
            ok = ok && file.sync_data().is_ok();
        }
        if !ok {
            tracing::error!(path = %self.path.display(), "webhook outbox write failed");
        }
        ok
    }

    fn compact(&mut self) {
        let reopened = rewrite(&self.path, self.pending.values())
            .and_then(|()| OpenOptions::new().append(true).open(&self.path));
        match reopened {
            Ok(file) => {
                self.file = Some(file);
                self.done = 0;
            }
            Err(e) => {
                tracing::error!(path = %self.path.display(), error = %crate::telemetry::ErrorChain(&e), "webhook outbox compaction failed")
            }
        }
    }

    fn gauge(&self) {
        self.metrics
            .set_gauge("callgate_webhook_outbox_size", self.pending.len() as f64);
    }
}

fn push_line(buf: &mut Vec<u8>, line: &Line) {
    if serde_json::to_writer(&mut *buf, line).is_ok() {
        buf.push(b'\n');
    }
}

/// Replays the file: the deliveries added and not done, oldest first. Unparsable lines (a torn last
/// line after a crash) are skipped.
fn read(path: &Path) -> std::io::Result<Vec<Entry>> {
    let file = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    let mut order: BTreeMap<u64, Entry> = BTreeMap::new();
    let mut index: HashMap<Key, u64> = HashMap::new();
    let mut skipped = 0usize;
    for (n, line) in BufReader::new(file).lines().enumerate() {
        let line = line?;
        if line.trim().is_empty() {
            continue;
        }
        match serde_json::from_str::<Line>(&line) {
            Ok(Line::Add(entry)) => {
                let seq = n as u64;
                if let Some(old) = index.insert(entry.key(), seq) {
                    order.remove(&old);
                }
                order.insert(seq, entry);
            }
            Ok(Line::Done { id, target }) => {
                if let Some(seq) = index.remove(&(id, target)) {
                    order.remove(&seq);
                }
            }
            Err(_) => skipped += 1,
        }
    }
    if skipped > 0 {
        tracing::warn!(path = %path.display(), lines = skipped, "webhook outbox: unreadable lines skipped");
    }
    Ok(order.into_values().collect())
}

/// Atomically replaces the file with these pending deliveries (mode 0600).
fn rewrite<'a>(path: &Path, entries: impl Iterator<Item = &'a Entry>) -> std::io::Result<()> {
    let mut buf = Vec::new();
    for e in entries {
        serde_json::to_writer(&mut buf, &Line::Add(e.clone()))?;
        buf.push(b'\n');
    }
    crate::durable::replace(path, &buf)
}

#[allow(clippy::disallowed_methods)] // the age of deliveries left by the previous process
fn wall_clock() -> SystemTime {
    SystemTime::now()
}

/// How old an entry is at `now`.
pub fn age(entry: &Entry, now: SystemTime) -> Duration {
    Duration::from_millis(crate::calls::task::unix_ms(now).saturating_sub(entry.created_ms))
}
