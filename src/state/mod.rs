//! State shared by several callgate instances, on Redis (`[state] kind = "redis"`).
//!
//! One callgate runs per Asterisk (an ARI application belongs to one Asterisk); the instances share
//! one Redis:
//! - **limits** (`limits`): one live order per person, the per-number, per-line, per-agent and
//!   per-queue windows and the declined-call cool-down, each decided by one Lua script, so they hold
//!   across instances;
//! - **the live view** (`replica`): each instance writes its calls' snapshots (sealed, with a TTL its
//!   heartbeat refreshes) and publishes its live events; every instance applies the others' events
//!   to its own `calls::Live`, and reloads every snapshot whenever its subscription (re)connects, so
//!   any instance answers the agent API and its live stream for every call;
//! - **commands**: a start or cancel for a call another instance owns is published to that
//!   instance's channel and answered on the asker's within `command_timeout` (else 503);
//! - **heartbeats**: an instance whose key expired is lost; its calls are shown as such.
//!
//! Invariants: every value and message is sealed (`seal`) under a key derived from the pseudonym key,
//! which all instances must share (checked by a fingerprint at start); key names carry call ids,
//! queue names and HMACs of persons, lines and agents, never a number; no call task ever waits on
//! Redis except for the one limits decision before an order, bounded by `response_timeout`; when
//! Redis is unreachable calls go on, and new orders follow `state.on_unavailable`.

pub mod limits;
pub mod local;
pub mod replica;
pub mod seal;
pub mod wire;

#[cfg(test)]
mod tests;

use std::future::Future;
use std::sync::atomic::{AtomicU8, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use dashmap::DashMap;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use ring::hmac;
use tokio::sync::{oneshot, watch};

use crate::calls::live::{Refusal, StartedBy};
use crate::config::{OnUnavailable, RedisSettings};
use crate::pnr::PseudonymKey;
use crate::telemetry::Metrics;

pub use seal::Seal;

/// A failed operation on the shared store.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("redis: {0}")]
    Redis(#[from] redis::RedisError),
    #[error("redis did not answer in time")]
    Timeout,
    #[error("a value could not be sealed or read")]
    Corrupt,
}

/// What the key fingerprint check found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyCheck {
    /// The store knows this key (or learnt it now).
    Same,
    /// Another instance wrote with a different pseudonym key: nothing it sealed can be read here.
    Different,
}

/// The shared store of one instance.
pub struct Shared {
    settings: RedisSettings,
    instance: String,
    client: redis::Client,
    conns: Vec<ConnectionManager>,
    next: AtomicUsize,
    seal: Seal,
    names: hmac::Key,
    fingerprint: String,
    /// `UNKNOWN` until the first operation, then `UP` or `DOWN` after each.
    up: AtomicU8,
    metrics: Arc<Metrics>,
    /// Forwarded commands waiting for their reply, by request id.
    pending: DashMap<String, oneshot::Sender<Result<String, Refusal>>>,
    /// How long a finished verification's snapshot stays readable (`api.keep_verifications`).
    keep: Duration,
    /// Whether this instance's subscription (events, commands, replies) is up.
    subscribed: watch::Sender<bool>,
    /// Wakes the subscription's reconnect wait.
    wake: tokio::sync::Notify,
}

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shared")
            .field("instance", &self.instance)
            .field("prefix", &self.settings.key_prefix)
            .finish_non_exhaustive()
    }
}

impl Shared {
    /// Builds the connections (lazily: nothing is dialled until the first use, so a Redis that is
    /// down at start does not keep callgate from starting).
    pub fn new(
        settings: &RedisSettings,
        instance: &str,
        key: &PseudonymKey,
        metrics: Arc<Metrics>,
        keep: Duration,
    ) -> anyhow::Result<Arc<Shared>> {
        let client = redis::Client::open(settings.url.expose())
            .map_err(|_| anyhow::anyhow!("state.url is not a valid Redis URL"))?;
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(settings.connect_timeout))
            .set_response_timeout(Some(settings.response_timeout))
            .set_number_of_retries(1)
            .set_min_delay(Duration::from_millis(50))
            .set_max_delay(Duration::from_secs(1));
        let mut conns = Vec::with_capacity(settings.pool_size);
        for _ in 0..settings.pool_size.max(1) {
            conns.push(ConnectionManager::new_lazy_with_config(
                client.clone(),
                config.clone(),
            )?);
        }
        let seal = Seal::new(key).ok_or_else(|| anyhow::anyhow!("no seal key"))?;
        let names = hmac::Key::new(
            hmac::HMAC_SHA256,
            &key.derive("callgate shared state names v1"),
        );
        let fingerprint = hex(&key.derive("callgate shared state fingerprint v1")[..16]);
        metrics.set_gauge("callgate_state_up", 0.0);
        metrics.set_gauge("callgate_state_subscribed", 0.0);
        Ok(Arc::new(Shared {
            settings: settings.clone(),
            instance: instance.to_owned(),
            client,
            conns,
            next: AtomicUsize::new(0),
            seal,
            names,
            fingerprint,
            up: AtomicU8::new(UNKNOWN),
            metrics,
            pending: DashMap::new(),
            keep,
            subscribed: watch::Sender::new(false),
            wake: tokio::sync::Notify::new(),
        }))
    }

    pub fn instance(&self) -> &str {
        &self.instance
    }

    pub fn settings(&self) -> &RedisSettings {
        &self.settings
    }

    pub fn on_unavailable(&self) -> OnUnavailable {
        self.settings.on_unavailable
    }

    /// Whether the last operation reached Redis.
    pub fn is_up(&self) -> bool {
        self.up.load(Ordering::SeqCst) == UP
    }

    /// Whether the last operation failed: a caller about to wait on Redis decides without it until
    /// the heartbeat (every `heartbeat_interval`) reaches it again.
    pub fn is_known_down(&self) -> bool {
        self.up.load(Ordering::SeqCst) == DOWN
    }

    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    pub(crate) fn seal(&self) -> &Seal {
        &self.seal
    }

    pub(crate) fn client(&self) -> &redis::Client {
        &self.client
    }

    /// A key or channel name: the prefix and the parts, joined by `:`.
    pub fn key(&self, parts: &[&str]) -> String {
        let mut k = self.settings.key_prefix.clone();
        for p in parts {
            k.push(':');
            k.push_str(p);
        }
        k
    }

    /// How a person, line or agent appears in key names: an HMAC under a key derived from the
    /// pseudonym key (unlinkable to the pseudonyms shown to agents, not reversible to a number).
    pub fn name(&self, x: &str) -> String {
        hex(&hmac::sign(&self.names, x.as_bytes()).as_ref()[..16])
    }

    fn conn(&self) -> ConnectionManager {
        let i = self.next.fetch_add(1, Ordering::Relaxed) % self.conns.len().max(1);
        self.conns[i].clone()
    }

    /// Runs one operation on a pooled connection, bounded by `response_timeout` (plus the connect
    /// timeout when it has to dial), and keeps `callgate_state_up` and the error counter current.
    pub async fn run<T, F, Fut>(&self, op: &'static str, f: F) -> Result<T, StateError>
    where
        F: FnOnce(ConnectionManager) -> Fut,
        Fut: Future<Output = redis::RedisResult<T>>,
    {
        let bound = self.settings.response_timeout + self.settings.connect_timeout;
        let result = match tokio::time::timeout(bound, f(self.conn())).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => Err(StateError::Redis(e)),
            Err(_) => Err(StateError::Timeout),
        };
        match &result {
            Ok(_) => self.set_up(true),
            Err(e) => {
                self.metrics.state_error(op);
                if self.up.load(Ordering::SeqCst) != DOWN {
                    tracing::warn!(op, error = %e, "shared state unreachable");
                }
                self.set_up(false);
            }
        }
        result
    }

    pub(crate) fn set_up(&self, up: bool) {
        let now = if up { UP } else { DOWN };
        let was = self.up.swap(now, Ordering::SeqCst);
        if was != now {
            self.metrics
                .set_gauge("callgate_state_up", if up { 1.0 } else { 0.0 });
            if up {
                tracing::info!("shared state reachable");
            }
        }
    }

    /// Makes sure every instance seals with the same key: the first instance writes a fingerprint
    /// of its pseudonym key, the others compare theirs.
    pub async fn check_key(&self) -> Result<KeyCheck, StateError> {
        let key = self.key(&["key-fingerprint"]);
        let fingerprint = self.fingerprint.clone();
        let stored: String = self
            .run("check_key", |mut c| async move {
                // `SET … NX` answers nil when the key exists.
                let _: Option<String> = redis::cmd("SET")
                    .arg(&key)
                    .arg(&fingerprint)
                    .arg("NX")
                    .query_async(&mut c)
                    .await?;
                redis::cmd("GET").arg(&key).query_async(&mut c).await
            })
            .await?;
        Ok(if stored == self.fingerprint {
            KeyCheck::Same
        } else {
            KeyCheck::Different
        })
    }

    /// Asks the instance owning a call to start or cancel a check, and waits (bounded by
    /// `command_timeout`) for its answer. `OwnerUnreachable` when no instance of that name listens
    /// or it did not answer in time.
    pub async fn forward(
        &self,
        owner: &str,
        call_id: &str,
        by: StartedBy,
        op: wire::Op,
    ) -> Result<String, Refusal> {
        let id = uuid::Uuid::new_v4().to_string();
        let command = wire::Command {
            id: id.clone(),
            from: self.instance.clone(),
            call_id: call_id.to_owned(),
            by,
            op,
        };
        let wait = !matches!(command.op, wire::Op::Superseded);
        let Some(sealed) = serde_json::to_vec(&wire::command_to_json(&command))
            .ok()
            .and_then(|plain| self.seal.seal("command", &plain))
        else {
            return Err(Refusal::OwnerUnreachable);
        };
        let (tx, rx) = oneshot::channel();
        if wait {
            self.pending.insert(id.clone(), tx);
        }
        let channel = self.key(&["cmd", owner]);
        let receivers: Result<i64, StateError> = self
            .run("forward", |mut c| async move {
                redis::cmd("PUBLISH")
                    .arg(&channel)
                    .arg(sealed)
                    .query_async(&mut c)
                    .await
            })
            .await;
        let outcome = match receivers {
            Ok(n) if n > 0 && !wait => Ok(String::new()),
            Ok(n) if n > 0 => match tokio::time::timeout(self.settings.command_timeout, rx).await {
                Ok(Ok(answer)) => answer,
                _ => Err(Refusal::OwnerUnreachable),
            },
            _ => Err(Refusal::OwnerUnreachable),
        };
        self.pending.remove(&id);
        self.metrics.state_forwarded(match &outcome {
            Ok(_) => "answered",
            Err(Refusal::OwnerUnreachable) => "unreachable",
            Err(_) => "refused",
        });
        outcome
    }

    /// A reply to one of our forwarded commands arrived.
    pub(crate) fn replied(&self, id: &str, answer: Result<String, Refusal>) {
        if let Some((_, tx)) = self.pending.remove(id) {
            let _ = tx.send(answer);
        }
    }

    /// How long a finished verification's snapshot stays readable.
    pub fn keep(&self) -> Duration {
        self.keep
    }

    pub(crate) fn set_subscribed(&self, on: bool) {
        self.subscribed.send_replace(on);
        self.metrics
            .set_gauge("callgate_state_subscribed", if on { 1.0 } else { 0.0 });
    }

    /// Wakes a subscription waiting to reconnect (a beat just reached Redis).
    pub(crate) fn wake(&self) {
        self.wake.notify_one();
    }

    pub(crate) async fn woken(&self) {
        self.wake.notified().await;
    }

    /// Whether this instance listens for the others' events and forwarded requests now.
    pub fn is_subscribed(&self) -> bool {
        *self.subscribed.borrow()
    }

    /// Waits until this instance listens (tests; callers bound it).
    pub async fn wait_subscribed(&self) {
        let mut rx = self.subscribed.subscribe();
        let _ = rx.wait_for(|on| *on).await;
    }
}

const UNKNOWN: u8 = 0;
const UP: u8 = 1;
const DOWN: u8 = 2;

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
