//! The audit trail: one JSON line per gated call, appended to `<data_dir>/audit.jsonl` and synced to
//! disk before the next.
//!
//! Invariant: pseudonymised — a record carries the HMAC pseudonym of the verified person, never the
//! number or the name; writes happen on one writer task, so call tasks never wait on the disk.

use std::path::{Path, PathBuf};

use serde::Serialize;
use tokio::io::AsyncWriteExt;
use tokio::sync::mpsc;

/// One line of the audit trail.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Entry {
    pub at: String,
    pub reference: String,
    pub call_id: String,
    pub queue: String,
    pub status: &'static str,
    pub reason: &'static str,
    pub method: String,
    /// HMAC pseudonym of the verified person (empty unless verified).
    pub person: String,
    /// Hex SHA-256 of the provider's signature and OCSP response (empty unless verified).
    pub evidence: String,
    pub stages: Vec<&'static str>,
    pub destination: String,
    pub duration_ms: u64,
}

/// A handle to the writer task. Cloning is cheap.
#[derive(Debug, Clone)]
pub struct Audit {
    tx: mpsc::Sender<Entry>,
    path: PathBuf,
}

impl Audit {
    /// Opens (creates) the trail under `data_dir` and starts its writer task.
    pub async fn open(data_dir: &Path) -> std::io::Result<Audit> {
        tokio::fs::create_dir_all(data_dir).await?;
        let path = data_dir.join("audit.jsonl");
        let mut file = tokio::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .await?;
        let (tx, mut rx) = mpsc::channel::<Entry>(1024);
        let shown = path.display().to_string();
        tokio::spawn(async move {
            while let Some(entry) = rx.recv().await {
                let Ok(mut line) = serde_json::to_vec(&entry) else {
                    continue;
                };
                line.push(b'\n');
                if let Err(e) = file.write_all(&line).await {
                    tracing::error!(path = %shown, error = %crate::telemetry::ErrorChain(&e), "audit write failed");
                    continue;
                }
                if let Err(e) = file.flush().await {
                    tracing::error!(path = %shown, error = %crate::telemetry::ErrorChain(&e), "audit flush failed");
                }
                // Durable before the next record: an outcome is not lost to a crash or power cut.
                if let Err(e) = file.sync_data().await {
                    tracing::error!(path = %shown, error = %crate::telemetry::ErrorChain(&e), "audit sync failed");
                }
            }
            let _ = file.sync_all().await;
        });
        Ok(Audit { tx, path })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Queues a record; waits if the writer is behind.
    pub async fn record(&self, entry: Entry) {
        if self.tx.send(entry).await.is_err() {
            tracing::error!("audit writer has stopped; record lost");
        }
    }
}
