//! Signed webhooks to CRMs: events of a call (a check completed, a fraud warning, the call ended) as
//! versioned JSON, signed with HMAC-SHA256, delivered with retries from a durable outbox.
//!
//! Flow: a call task calls [`Webhooks::call_event`] where the outcome is known. That builds the body
//! once per event (the call and its verification as the agent API renders them, so identity fields are
//! exactly what the queue's `disclose` policy let through `outcome::render`) and hands one delivery per
//! interested target to the outbox writer without waiting ([`outbox`]). The writer appends and fsyncs
//! (group commit), then passes the deliveries to the dispatcher ([`deliver`]), which POSTs them, retries
//! with backoff and marks each delivered or given up in the outbox.
//!
//! Invariants:
//! - A call task never waits for webhooks: the hand-over is a bounded `try_send`; when it is full the
//!   event is dropped, logged and counted.
//! - A delivery is on disk before its first attempt; one that is neither delivered nor given up when the
//!   process stops is attempted again at the next start (at least once; receivers de-duplicate by
//!   `id`).
//! - Bodies and secrets are never logged; logs name the target, event id and type only.

use std::path::Path;
use std::sync::Arc;
use std::time::SystemTime;

use serde_json::json;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::api::agent::render;
use crate::calls::live::{is_fraud, CallView, LiveKind};
use crate::config::{WebhookTarget, Webhooks as Settings};
use crate::outcome::rfc3339;
use crate::telemetry::Metrics;

pub mod deliver;
pub mod outbox;

#[cfg(test)]
mod tests;

/// The payload's schema version.
pub const VERSION: u32 = 1;
/// The signature header.
pub const SIGNATURE_HEADER: &str = "Callgate-Signature";
/// The event id header (the same as the body's `id`).
pub const EVENT_ID_HEADER: &str = "Callgate-Event-Id";
/// The event type header (the same as the body's `type`).
pub const EVENT_TYPE_HEADER: &str = "Callgate-Event-Type";

/// What a webhook reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum EventType {
    /// A check ended (the gate's or one during the call), whatever its outcome.
    VerificationCompleted,
    /// A check ended `declined_call`: the person said in their app they are not on a call with us.
    FraudWarning,
    /// The call ended (hang-up, or routed on in the dialplan).
    CallEnded,
}

impl EventType {
    pub const ALL: [EventType; 3] = [
        EventType::VerificationCompleted,
        EventType::FraudWarning,
        EventType::CallEnded,
    ];
    /// What a target receives when it lists no `events`.
    pub const DEFAULT: [EventType; 2] = [EventType::VerificationCompleted, EventType::FraudWarning];

    pub fn code(self) -> &'static str {
        match self {
            EventType::VerificationCompleted => "verification_completed",
            EventType::FraudWarning => "fraud_warning",
            EventType::CallEnded => "call_ended",
        }
    }

    pub fn from_code(code: &str) -> Option<EventType> {
        EventType::ALL.into_iter().find(|e| e.code() == code)
    }
}

/// A handle for enqueueing events. Cheap to clone.
#[derive(Clone)]
pub struct Webhooks {
    targets: Arc<[WebhookTarget]>,
    tx: mpsc::Sender<outbox::Op>,
    metrics: Arc<Metrics>,
}

impl std::fmt::Debug for Webhooks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Webhooks")
            .field("targets", &self.targets.len())
            .finish_non_exhaustive()
    }
}

/// The running webhooks: the handle, and the dispatcher task (ends when `stop` fires).
pub struct Started {
    pub webhooks: Webhooks,
    pub dispatcher: JoinHandle<()>,
}

impl Webhooks {
    /// Opens the outbox in `data_dir` (delivering again what the previous process left undelivered)
    /// and starts the writer thread and the dispatcher. `None` when no target is configured.
    pub fn start(
        settings: &Settings,
        data_dir: &Path,
        metrics: Arc<Metrics>,
        stop: CancellationToken,
    ) -> anyhow::Result<Option<Started>> {
        if settings.targets.is_empty() {
            return Ok(None);
        }
        let (to_dispatcher, from_writer) = mpsc::unbounded_channel();
        let (tx, left) =
            outbox::Outbox::open(data_dir, settings, Arc::clone(&metrics), to_dispatcher)?;
        if !left.is_empty() {
            tracing::warn!(
                deliveries = left.len(),
                "webhook deliveries left undelivered by the previous run: delivering them again"
            );
        }
        let dispatcher = deliver::Dispatcher::new(settings, Arc::clone(&metrics), tx.clone())?;
        let task = tokio::spawn(dispatcher.run(left, from_writer, stop));
        Ok(Some(Started {
            webhooks: Webhooks {
                targets: settings.targets.clone().into(),
                tx,
                metrics,
            },
            dispatcher: task,
        }))
    }

    /// A call's event as the live view publishes it: `Completed` becomes `verification_completed`
    /// (and `fraud_warning` after it for `declined_call`), `CallEnded` becomes `call_ended`; other
    /// kinds send nothing. `at` is when it happened. Never waits.
    pub fn call_event(&self, kind: LiveKind, call: &CallView, at: SystemTime) {
        let types: &[EventType] = match kind {
            LiveKind::Completed
                if call
                    .verification
                    .as_ref()
                    .and_then(|v| v.outcome)
                    .is_some_and(is_fraud) =>
            {
                &[EventType::VerificationCompleted, EventType::FraudWarning]
            }
            LiveKind::Completed => &[EventType::VerificationCompleted],
            LiveKind::CallEnded => &[EventType::CallEnded],
            _ => &[],
        };
        for &event in types {
            self.enqueue(event, call, at);
        }
    }

    fn enqueue(&self, event: EventType, call: &CallView, at: SystemTime) {
        let targets: Vec<&WebhookTarget> = self
            .targets
            .iter()
            .filter(|t| t.wants(&call.queue, event))
            .collect();
        if targets.is_empty() {
            return;
        }
        let id = uuid::Uuid::new_v4().to_string();
        let body = payload(&id, event, call, at).to_string();
        let created_ms = crate::calls::task::unix_ms(at);
        let entries: Vec<outbox::Entry> = targets
            .iter()
            .map(|t| outbox::Entry {
                id: id.clone(),
                target: t.name.clone(),
                event: event.code().to_owned(),
                body: body.clone(),
                created_ms,
            })
            .collect();
        if let Err(e) = self.tx.try_send(outbox::Op::Add(entries)) {
            let entries = match e {
                mpsc::error::TrySendError::Full(outbox::Op::Add(x))
                | mpsc::error::TrySendError::Closed(outbox::Op::Add(x)) => x,
                _ => Vec::new(),
            };
            for entry in entries {
                tracing::error!(target_name = %entry.target, event.id = %entry.id, event.kind = %entry.event, "webhook outbox not accepting events: event dropped");
                self.metrics.webhook_delivery(&entry.target, "dropped");
            }
        }
    }

    /// Waits until every event enqueued so far is on disk. `false` if it is not.
    pub async fn flush(&self) -> bool {
        let (ack, done) = tokio::sync::oneshot::channel();
        if self.tx.send(outbox::Op::Flush(ack)).await.is_err() {
            return false;
        }
        done.await.unwrap_or(false)
    }
}

/// The body of one event: version 1.
pub fn payload(id: &str, event: EventType, call: &CallView, at: SystemTime) -> serde_json::Value {
    json!({
        "version": VERSION,
        "id": id,
        "type": event.code(),
        "occurred_at": rfc3339(at),
        "call": render::call(call),
        "verification": call.verification.as_ref().map(render::verification),
    })
}

/// The `Callgate-Signature` value: `t=<unix seconds>,v1=<hex HMAC-SHA256(secret, "<t>.<body>")>`.
pub fn sign(secret: &[u8], t: u64, body: &[u8]) -> String {
    format!("t={t},v1={}", hex(&mac(secret, t, body)))
}

fn mac(secret: &[u8], t: u64, body: &[u8]) -> ring::hmac::Tag {
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, secret);
    let mut ctx = ring::hmac::Context::with_key(&key);
    ctx.update(t.to_string().as_bytes());
    ctx.update(b".");
    ctx.update(body);
    ctx.sign()
}

/// What a receiver does: parse the header, reject a timestamp more than `tolerance_secs` away from
/// `now_secs`, and compare the HMAC in constant time. (callgate itself only signs; this is the
/// reference the README's snippet follows, and what the tests check signatures with.)
pub fn verify(
    secret: &[u8],
    header: &str,
    body: &[u8],
    now_secs: u64,
    tolerance_secs: u64,
) -> bool {
    let mut t = None;
    let mut sigs = Vec::new();
    for part in header.split(',') {
        match part.trim().split_once('=') {
            Some(("t", v)) => t = v.parse::<u64>().ok(),
            Some(("v1", v)) => sigs.push(v),
            _ => {}
        }
    }
    let Some(t) = t else { return false };
    if t.abs_diff(now_secs) > tolerance_secs {
        return false;
    }
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, secret);
    let mut msg = t.to_string().into_bytes();
    msg.push(b'.');
    msg.extend_from_slice(body);
    sigs.iter()
        .any(|s| unhex(s).is_some_and(|tag| ring::hmac::verify(&key, &msg, &tag).is_ok()))
}

fn hex(bytes: &ring::hmac::Tag) -> String {
    bytes.as_ref().iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(s: &str) -> Option<Vec<u8>> {
    if s.len() % 2 != 0 {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}
