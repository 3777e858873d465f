//! The dispatcher: POSTs each pending delivery to its target, signed, and decides what an answer
//! means.
//!
//! - 2xx: delivered. 4xx other than 408 and 429, and 3xx (redirects are not followed, so a body never
//!   goes where it was not configured to): failed for good, logged, counted, marked done.
//! - 408, 429, 5xx, timeouts and connection errors: attempted again after a backoff of
//!   `initial_backoff × 2^(n-1)` capped at `max_backoff`, with jitter (a random half to all of it); a
//!   `Retry-After` (seconds or an HTTP date) replaces the backoff, capped at `max_backoff`. After
//!   `max_attempts` attempts, or once the event is older than `max_age`, it is given up.
//!
//! Invariants: at most [`CONCURRENCY`] requests in flight; each bounded by `timeout`; every finished
//! delivery is reported to the outbox writer; the body is sent exactly as stored (the signature covers
//! those bytes) and is never logged.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::outbox::{self, Entry, Key, Op, ToDispatcher};
use crate::config::Webhooks as Settings;
use crate::secret::Secret;
use crate::telemetry::Metrics;

/// Requests in flight at most, over all targets.
pub const CONCURRENCY: usize = 32;

/// What one attempt came to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Attempt {
    Delivered,
    /// Not worth repeating (the receiver refused it).
    Permanent(String),
    /// Worth repeating; `after`: the receiver's `Retry-After`.
    Retry {
        why: String,
        after: Option<Duration>,
    },
}

struct Target {
    url: String,
    secret: Secret,
}

struct Pending {
    entry: Entry,
    /// Attempts made so far.
    attempts: u32,
    due: Instant,
    in_flight: bool,
}

pub struct Dispatcher {
    http: reqwest::Client,
    targets: HashMap<String, Arc<Target>>,
    settings: Settings,
    metrics: Arc<Metrics>,
    outbox: mpsc::Sender<Op>,
    pending: HashMap<Key, Pending>,
}

impl Dispatcher {
    pub fn new(
        settings: &Settings,
        metrics: Arc<Metrics>,
        outbox: mpsc::Sender<Op>,
    ) -> anyhow::Result<Dispatcher> {
        let tls = crate::pbx::ari::tls::client_config()?;
        let http = reqwest::Client::builder()
            .tls_backend_preconfigured((*tls).clone())
            .timeout(settings.timeout)
            .connect_timeout(settings.timeout)
            .redirect(reqwest::redirect::Policy::none())
            .user_agent(concat!("callgate/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| anyhow::anyhow!("building the webhook client: {}", e.without_url()))?;
        let targets = settings
            .targets
            .iter()
            .map(|t| {
                (
                    t.name.clone(),
                    Arc::new(Target {
                        url: t.url.clone(),
                        secret: t.secret.clone(),
                    }),
                )
            })
            .collect();
        Ok(Dispatcher {
            http,
            targets,
            settings: settings.clone(),
            metrics,
            outbox,
            pending: HashMap::new(),
        })
    }

    /// Delivers `left` and what the writer passes on, until `stop`. What is still pending then stays
    /// in the outbox for the next start.
    pub async fn run(
        mut self,
        left: Vec<Entry>,
        mut from_writer: mpsc::UnboundedReceiver<ToDispatcher>,
        stop: CancellationToken,
    ) {
        let now = instant_now();
        for entry in left {
            self.add(entry, now);
        }
        let mut flights: JoinSet<(Key, Attempt)> = JoinSet::new();
        loop {
            self.launch(&mut flights);
            let next = self
                .pending
                .values()
                .filter(|p| !p.in_flight)
                .map(|p| p.due)
                .min();
            let saturated = flights.len() >= CONCURRENCY;
            tokio::select! {
                _ = stop.cancelled() => break,
                msg = from_writer.recv() => match msg {
                    Some(ToDispatcher::New(entry)) => self.add(entry, instant_now()),
                    Some(ToDispatcher::Evicted(key)) => {
                        self.pending.remove(&key);
                    }
                    None => break,
                },
                Some(done) = flights.join_next(), if !flights.is_empty() => {
                    if let Ok((key, attempt)) = done {
                        self.answered(key, attempt).await;
                    }
                }
                _ = sleep_until(next), if next.is_some() && !saturated => {}
            }
        }
        flights.abort_all();
    }

    fn add(&mut self, entry: Entry, now: Instant) {
        if !self.targets.contains_key(&entry.target) {
            return;
        }
        self.pending.insert(
            entry.key(),
            Pending {
                entry,
                attempts: 0,
                due: now,
                in_flight: false,
            },
        );
    }

    /// Starts the due deliveries, up to the concurrency cap.
    fn launch(&mut self, flights: &mut JoinSet<(Key, Attempt)>) {
        let now = instant_now();
        let mut due: Vec<(&Key, &mut Pending)> = self
            .pending
            .iter_mut()
            .filter(|(_, p)| !p.in_flight && p.due <= now)
            .collect();
        due.sort_by_key(|(_, p)| (p.due, p.entry.created_ms));
        for (key, p) in due {
            if flights.len() >= CONCURRENCY {
                break;
            }
            let Some(target) = self.targets.get(&p.entry.target).cloned() else {
                continue;
            };
            p.in_flight = true;
            p.attempts += 1;
            let http = self.http.clone();
            let metrics = Arc::clone(&self.metrics);
            let key = key.clone();
            let entry = p.entry.clone();
            flights.spawn(async move {
                let started = instant_now();
                let attempt = post(&http, &target, &entry).await;
                metrics.webhook_latency(&entry.target, started.elapsed());
                (key, attempt)
            });
        }
    }

    async fn answered(&mut self, key: Key, attempt: Attempt) {
        let Some(p) = self.pending.get_mut(&key) else {
            // Evicted while in flight: the outbox has already marked it done.
            return;
        };
        p.in_flight = false;
        let (id, target, event) = (&p.entry.id, &p.entry.target, &p.entry.event);
        let finished = match attempt {
            Attempt::Delivered => {
                tracing::debug!(target_name = %target, event.id = %id, event.kind = %event, attempts = p.attempts, "webhook delivered");
                self.metrics.webhook_delivery(target, "delivered");
                true
            }
            Attempt::Permanent(why) => {
                tracing::error!(target_name = %target, event.id = %id, event.kind = %event, attempts = p.attempts, why = %why, "webhook refused by its target: dropped");
                self.metrics.webhook_delivery(target, "failed");
                true
            }
            Attempt::Retry { why, after } => {
                let too_old = outbox::age(&p.entry, wall_clock()) > self.settings.max_age;
                if p.attempts >= self.settings.max_attempts || too_old {
                    tracing::error!(target_name = %target, event.id = %id, event.kind = %event, attempts = p.attempts, why = %why, "webhook not delivered: given up");
                    self.metrics.webhook_delivery(target, "failed");
                    true
                } else {
                    let wait = after
                        .map(|a| a.min(self.settings.max_backoff))
                        .unwrap_or_else(|| backoff(&self.settings, p.attempts));
                    tracing::warn!(target_name = %target, event.id = %id, event.kind = %event, attempts = p.attempts, why = %why, retry_in_ms = wait.as_millis() as u64, "webhook attempt failed: will retry");
                    self.metrics.webhook_delivery(target, "retried");
                    p.due = instant_now() + wait;
                    false
                }
            }
        };
        if finished {
            self.pending.remove(&key);
            let _ = self.outbox.send(Op::Done(key)).await;
        }
    }
}

/// The wait after the `attempts`-th failed attempt: exponential, capped, jittered to a random point
/// between half and all of it.
pub fn backoff(settings: &Settings, attempts: u32) -> Duration {
    let exp = 2u32.saturating_pow(attempts.saturating_sub(1).min(30));
    let full = settings
        .initial_backoff
        .saturating_mul(exp)
        .min(settings.max_backoff);
    crate::backoff::jittered(full)
}

/// One signed POST.
async fn post(http: &reqwest::Client, target: &Target, entry: &Entry) -> Attempt {
    let t = crate::calls::task::unix_ms(wall_clock()) / 1000;
    let signature = super::sign(target.secret.expose().as_bytes(), t, entry.body.as_bytes());
    let sent = http
        .post(&target.url)
        .header(reqwest::header::CONTENT_TYPE, "application/json")
        .header(super::SIGNATURE_HEADER, signature)
        .header(super::EVENT_ID_HEADER, &entry.id)
        .header(super::EVENT_TYPE_HEADER, &entry.event)
        .body(entry.body.clone())
        .send()
        .await;
    let response = match sent {
        Ok(r) => r,
        Err(e) if e.is_timeout() => {
            return Attempt::Retry {
                why: "timed out".into(),
                after: None,
            }
        }
        Err(e) => {
            return Attempt::Retry {
                why: crate::telemetry::ErrorChain(&e.without_url()).to_string(),
                after: None,
            }
        }
    };
    let status = response.status();
    let after = response
        .headers()
        .get(reqwest::header::RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| retry_after(v, wall_clock()));
    // The answer's body is not needed; reading it lets the connection be reused, bounded by `timeout`.
    let _ = response.bytes().await;
    classify(status.as_u16(), after)
}

/// What a status means.
pub fn classify(status: u16, after: Option<Duration>) -> Attempt {
    match status {
        200..=299 => Attempt::Delivered,
        408 | 429 | 500..=599 => Attempt::Retry {
            why: format!("HTTP {status}"),
            after,
        },
        _ => Attempt::Permanent(format!("HTTP {status}")),
    }
}

/// A `Retry-After` value: delay seconds, or an HTTP date (then the time until it, zero if past).
pub fn retry_after(value: &str, now: SystemTime) -> Option<Duration> {
    let value = value.trim();
    if let Ok(secs) = value.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    let at =
        time::OffsetDateTime::parse(value, &time::format_description::well_known::Rfc2822).ok()?;
    let at = SystemTime::from(at);
    Some(at.duration_since(now).unwrap_or(Duration::ZERO))
}

async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

#[allow(clippy::disallowed_methods)] // the dispatcher's retry timers, an adapter
fn instant_now() -> Instant {
    Instant::now()
}

#[allow(clippy::disallowed_methods)] // signature timestamps and event ages, an adapter
fn wall_clock() -> SystemTime {
    SystemTime::now()
}
