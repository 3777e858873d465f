//! A hosted switchboard's call-event feed: a websocket callgate connects out to, whose JSON events
//! (call started, queued, answered, transferred, ended) say which agent has which call and when a
//! call ends.
//!
//! [`map`] turns one message into a [`FeedEvent`] without any I/O; [`run`] keeps the websocket up:
//! `Authorization: Bearer` on connect, a ping every `keepalive` (no frame for two intervals after a
//! ping is a dead link), jittered exponential reconnect between `reconnect_min` and `reconnect_max`,
//! messages larger than `max_message` refused by the websocket layer.
//!
//! Invariants: nothing read from the network can panic the task (malformed or unknown events are
//! counted and skipped); the token is only ever put in the request header; logs carry the
//! switchboard's name, the event type and sizes, never an event's content.

use std::time::Duration;

use futures_util::{SinkExt as _, StreamExt as _};
use serde_json::Value;
use tokio::sync::{mpsc, watch};
use tokio_tungstenite::tungstenite::client::IntoClientRequest as _;
use tokio_tungstenite::tungstenite::http::{header, HeaderValue};
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::Message;
use tokio_util::sync::CancellationToken;

pub use crate::config::feed::{Feed, FeedEventKind, Fields, Mapping};
use crate::telemetry::{ErrorChain, Metrics};

/// Longest accepted id, agent, queue or caller value.
const MAX_VALUE: usize = 128;
/// A connection that stayed up this long was accepted and worked: losing it reconnects at once.
const PROVEN_AFTER: Duration = Duration::from_secs(10);

/// One call event, in callgate's words.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FeedEvent {
    pub kind: FeedEventKind,
    /// The switchboard's call id (the same one its IVR's request nodes send).
    pub call_id: String,
    /// The agent who has the call (for `answered` and `transferred`).
    pub agent: Option<String>,
    pub queue: Option<String>,
    /// The caller's line (only for the limits, never shown).
    pub caller: Option<String>,
}

/// Why a message was skipped (its code is the metric's `reason` label).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Skip {
    /// Not a JSON object.
    Malformed,
    /// No event type, or one the mapping does not list.
    Unknown,
    /// No usable call id.
    NoCallId,
}

impl Skip {
    pub fn code(self) -> &'static str {
        match self {
            Skip::Malformed => "malformed",
            Skip::Unknown => "unknown",
            Skip::NoCallId => "no_call_id",
        }
    }
}

/// The value at a dotted path, as text (strings as they are, numbers in decimal).
fn lookup(root: &Value, path: &str) -> Option<String> {
    let mut at = root;
    for part in path.split('.') {
        at = at.as_object()?.get(part)?;
    }
    let text = match at {
        Value::String(s) => s.clone(),
        Value::Number(n) => n.to_string(),
        _ => return None,
    };
    let text = text.trim();
    if text.is_empty() || text.len() > MAX_VALUE || text.chars().any(char::is_control) {
        return None;
    }
    Some(text.to_owned())
}

/// One message of the feed → a call event (pure).
pub fn map(mapping: &Mapping, text: &str) -> Result<FeedEvent, Skip> {
    let Mapping::GenericJson { fields, events } = mapping;
    let value: Value = serde_json::from_str(text).map_err(|_| Skip::Malformed)?;
    if !value.is_object() {
        return Err(Skip::Malformed);
    }
    let kind = lookup(&value, &fields.event)
        .and_then(|t| events.get(&t).copied())
        .ok_or(Skip::Unknown)?;
    let call_id = lookup(&value, &fields.call_id).ok_or(Skip::NoCallId)?;
    Ok(FeedEvent {
        kind,
        call_id,
        agent: lookup(&value, &fields.agent),
        queue: lookup(&value, &fields.queue),
        caller: lookup(&value, &fields.caller),
    })
}

/// What the feed task reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Incoming {
    /// A (re)connect succeeded.
    Connected,
    /// The link dropped; the task is reconnecting.
    Disconnected,
    Event(FeedEvent),
}

/// Keeps the feed connected until `shutdown`, delivering what it hears to `tx`; `up` says whether
/// it is connected now.
pub async fn run(
    board: String,
    feed: Feed,
    tx: mpsc::Sender<Incoming>,
    up: watch::Sender<bool>,
    metrics: std::sync::Arc<Metrics>,
    shutdown: CancellationToken,
) {
    let mut backoff = feed.reconnect_min;
    loop {
        let mut retry_now = false;
        let attempt =
            tokio::time::timeout(feed.keepalive.max(Duration::from_secs(5)), connect(&feed));
        let attempt = tokio::select! {
            biased;
            _ = shutdown.cancelled() => break,
            a = attempt => a,
        };
        match attempt {
            Ok(Ok(socket)) => {
                tracing::info!(switchboard = %board, "switchboard feed connected");
                up.send_replace(true);
                metrics.set_feed_connected(&board, true);
                if tx.send(Incoming::Connected).await.is_err() {
                    break;
                }
                let opened = clock();
                let end = session(socket, &board, &feed, &tx, &metrics, &shutdown).await;
                up.send_replace(false);
                metrics.set_feed_connected(&board, false);
                match end {
                    End::Shutdown => break,
                    End::Lost { healthy } => {
                        tracing::warn!(switchboard = %board, "switchboard feed connection lost");
                        if tx.send(Incoming::Disconnected).await.is_err() {
                            break;
                        }
                        if healthy || opened.elapsed() >= PROVEN_AFTER {
                            backoff = feed.reconnect_min;
                            retry_now = true;
                        }
                    }
                }
            }
            Ok(Err(error)) => {
                tracing::warn!(switchboard = %board, %error, "switchboard feed connect failed");
            }
            Err(_) => tracing::warn!(switchboard = %board, "switchboard feed connect timed out"),
        }
        if retry_now {
            continue;
        }
        let delay = crate::backoff::jittered(backoff);
        backoff = backoff.saturating_mul(2).min(feed.reconnect_max);
        tokio::select! {
            biased;
            _ = shutdown.cancelled() => break,
            _ = tokio::time::sleep(delay) => {}
        }
    }
    up.send_replace(false);
    metrics.set_feed_connected(&board, false);
    tracing::info!(switchboard = %board, "switchboard feed stopped");
}

#[allow(clippy::disallowed_methods)] // how long a connection lived decides the reconnect delay
fn clock() -> tokio::time::Instant {
    tokio::time::Instant::now()
}

type Socket = tokio_tungstenite::WebSocketStream<Box<dyn crate::pbx::ari::events::Io>>;

async fn connect(feed: &Feed) -> Result<Socket, String> {
    let url = reqwest::Url::parse(&feed.url).map_err(|e| e.to_string())?;
    let host = url.host_str().ok_or("url has no host")?.to_owned();
    let port = url.port_or_known_default().ok_or("url has no port")?;
    let mut request = url
        .as_str()
        .into_client_request()
        .map_err(|e| ErrorChain(&e).to_string())?;
    let mut auth = HeaderValue::from_str(&format!("Bearer {}", feed.token.expose()))
        .map_err(|_| "the token is not a valid header value".to_string())?;
    auth.set_sensitive(true);
    request.headers_mut().insert(header::AUTHORIZATION, auth);
    let tcp = tokio::net::TcpStream::connect((host.trim_matches(['[', ']']), port))
        .await
        .map_err(|e| ErrorChain(&e).to_string())?;
    let _ = tcp.set_nodelay(true);
    let io: Box<dyn crate::pbx::ari::events::Io> = if url.scheme() == "wss" {
        let tls = crate::pbx::ari::tls::client_config().map_err(|e| ErrorChain(&e).to_string())?;
        let name =
            rustls::pki_types::ServerName::try_from(host.trim_matches(['[', ']']).to_owned())
                .map_err(|e| ErrorChain(&e).to_string())?;
        let stream = tokio_rustls::TlsConnector::from(tls)
            .connect(name, tcp)
            .await
            .map_err(|e| ErrorChain(&e).to_string())?;
        Box::new(stream)
    } else {
        Box::new(tcp)
    };
    let config = WebSocketConfig::default()
        .max_message_size(Some(feed.max_message))
        .max_frame_size(Some(feed.max_message));
    let (socket, _) = tokio_tungstenite::client_async_with_config(request, io, Some(config))
        .await
        .map_err(|e| ErrorChain(&e).to_string())?;
    Ok(socket)
}

enum End {
    Shutdown,
    Lost { healthy: bool },
}

async fn session(
    mut socket: Socket,
    board: &str,
    feed: &Feed,
    tx: &mpsc::Sender<Incoming>,
    metrics: &Metrics,
    shutdown: &CancellationToken,
) -> End {
    let mut ticker = tokio::time::interval(feed.keepalive);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    ticker.reset();
    let mut idle_ticks = 0u32;
    let mut healthy = false;
    let end = loop {
        tokio::select! {
            biased;
            _ = shutdown.cancelled() => break End::Shutdown,
            frame = socket.next() => {
                let message = match frame {
                    None => break End::Lost { healthy },
                    Some(Err(error)) => {
                        tracing::debug!(switchboard = board, error = %ErrorChain(&error), "switchboard feed read failed");
                        break End::Lost { healthy };
                    }
                    Some(Ok(m)) => m,
                };
                idle_ticks = 0;
                match message {
                    Message::Text(text) => {
                        healthy = true;
                        match map(&feed.mapping, text.as_str()) {
                            Ok(event) => {
                                tracing::debug!(switchboard = board, event = event.kind.code(), "switchboard feed event");
                                if tx.send(Incoming::Event(event)).await.is_err() {
                                    break End::Shutdown;
                                }
                            }
                            Err(skip) => {
                                metrics.feed_event_skipped(board, skip.code());
                                tracing::debug!(switchboard = board, reason = skip.code(), size = text.len(), "switchboard feed message skipped");
                            }
                        }
                    }
                    Message::Binary(data) => {
                        metrics.feed_event_skipped(board, Skip::Malformed.code());
                        tracing::debug!(switchboard = board, size = data.len(), "switchboard feed binary message skipped");
                    }
                    Message::Close(_) => break End::Lost { healthy },
                    Message::Ping(_) | Message::Pong(_) | Message::Frame(_) => {}
                }
            }
            _ = ticker.tick() => {
                idle_ticks += 1;
                if idle_ticks > 2 {
                    tracing::warn!(switchboard = board, "switchboard feed: no answer to ping; declaring the link dead");
                    break End::Lost { healthy };
                }
                let ping = socket.send(Message::Ping(Default::default()));
                match tokio::time::timeout(feed.keepalive, ping).await {
                    Ok(Ok(())) => {}
                    _ => break End::Lost { healthy },
                }
            }
        }
    };
    let _ = tokio::time::timeout(Duration::from_millis(500), socket.close(None)).await;
    end
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    fn telavox_style() -> Mapping {
        let events: BTreeMap<String, FeedEventKind> = [
            ("CALL_RINGING", FeedEventKind::Started),
            ("CALL_QUEUED", FeedEventKind::Queued),
            ("CALL_ANSWERED", FeedEventKind::Answered),
            ("CALL_TRANSFERRED", FeedEventKind::Transferred),
            ("CALL_HANGUP", FeedEventKind::Ended),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect();
        Mapping::GenericJson {
            fields: Fields {
                event: "type".into(),
                call_id: "call.id".into(),
                agent: "call.agent.extension".into(),
                queue: "call.queue".into(),
                caller: "call.from".into(),
            },
            events,
        }
    }

    #[test]
    fn nested_fields_and_event_values_map_onto_call_events() {
        let m = telavox_style();
        let answered = r#"{"type":"CALL_ANSWERED","ts":"2026-11-30T10:00:00Z",
            "call":{"id":"tvx-81","queue":"Support","from":"+46701234567",
                    "agent":{"extension":"agent-204","name":"Eva"}}}"#;
        assert_eq!(
            map(&m, answered),
            Ok(FeedEvent {
                kind: FeedEventKind::Answered,
                call_id: "tvx-81".into(),
                agent: Some("agent-204".into()),
                queue: Some("Support".into()),
                caller: Some("+46701234567".into()),
            })
        );
        // Numbers are taken as text; absent optional fields are None.
        let ended = r#"{"type":"CALL_HANGUP","call":{"id":81}}"#;
        let e = map(&m, ended).unwrap();
        assert_eq!((e.kind, e.call_id.as_str()), (FeedEventKind::Ended, "81"));
        assert_eq!((e.agent, e.queue, e.caller), (None, None, None));
    }

    #[test]
    fn malformed_unknown_and_idless_messages_are_skipped_with_a_reason() {
        let m = telavox_style();
        let cases = [
            ("not json", Skip::Malformed),
            ("[1,2]", Skip::Malformed),
            ("\"CALL_HANGUP\"", Skip::Malformed),
            (r#"{"call":{"id":"x"}}"#, Skip::Unknown),
            (r#"{"type":"CALL_PARKED","call":{"id":"x"}}"#, Skip::Unknown),
            (r#"{"type":{"nested":1},"call":{"id":"x"}}"#, Skip::Unknown),
            (r#"{"type":"CALL_HANGUP"}"#, Skip::NoCallId),
            (r#"{"type":"CALL_HANGUP","call":"x"}"#, Skip::NoCallId),
            (r#"{"type":"CALL_HANGUP","call":{"id":""}}"#, Skip::NoCallId),
            (
                r#"{"type":"CALL_HANGUP","call":{"id":"a\nb"}}"#,
                Skip::NoCallId,
            ),
        ];
        for (text, skip) in cases {
            assert_eq!(map(&m, text), Err(skip), "{text}");
        }
        let long = format!(
            r#"{{"type":"CALL_HANGUP","call":{{"id":"{}"}}}}"#,
            "x".repeat(200)
        );
        assert_eq!(map(&m, &long), Err(Skip::NoCallId));
    }

    fn lab_mapping() -> Mapping {
        let toml = format!(
            "[switchboards.lab.feed]\n{}",
            crate::switchboard::sim::FEED_MAPPING
        );
        let value: toml::Value = toml::from_str(&toml).unwrap();
        let feed = &value["switchboards"]["lab"]["feed"];
        let fields = &feed["fields"];
        let field = |k: &str| fields[k].as_str().unwrap().to_owned();
        Mapping::GenericJson {
            fields: Fields {
                event: field("event"),
                call_id: field("call_id"),
                agent: field("agent"),
                queue: field("queue"),
                caller: field("caller"),
            },
            events: feed["events"]
                .as_table()
                .unwrap()
                .iter()
                .map(|(k, v)| {
                    (
                        k.clone(),
                        FeedEventKind::from_code(v.as_str().unwrap()).unwrap(),
                    )
                })
                .collect(),
        }
    }

    /// Against the feed simulator on loopback: events arrive, an oversized message drops the link
    /// (and callgate reconnects), the token goes in the header.
    #[tokio::test]
    async fn the_client_receives_events_and_an_oversized_message_drops_the_link() {
        use crate::switchboard::sim::{feed_event, FeedSim};
        let stop = CancellationToken::new();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let sim = FeedSim::start(listener, "t0ken", stop.clone()).unwrap();
        let mut feed = Feed::defaults(
            sim.url(),
            crate::secret::Secret::new("t0ken"),
            lab_mapping(),
        );
        feed.max_message = 1024;
        feed.reconnect_min = Duration::from_millis(10);
        feed.reconnect_max = Duration::from_millis(50);
        let (tx, mut rx) = mpsc::channel(16);
        let (up, _up_rx) = watch::channel(false);
        let metrics = std::sync::Arc::new(Metrics::new());
        let task = tokio::spawn(run(
            "lab".into(),
            feed,
            tx,
            up,
            std::sync::Arc::clone(&metrics),
            stop.clone(),
        ));
        assert_eq!(next(&mut rx).await, Incoming::Connected);
        sim.wait_for_connections(1).await;
        sim.push(&feed_event("CALL_ANSWERED", "c1", Some("a1")));
        let Incoming::Event(e) = next(&mut rx).await else {
            panic!("expected an event")
        };
        assert_eq!(
            (e.kind, e.agent.as_deref()),
            (FeedEventKind::Answered, Some("a1"))
        );
        // Larger than max_message: the link is dropped, then reconnected.
        let mut big = feed_event("CALL_ANSWERED", "c2", Some("a1"));
        big["padding"] = serde_json::Value::String("x".repeat(4096));
        sim.push(&big);
        assert_eq!(next(&mut rx).await, Incoming::Disconnected);
        assert_eq!(next(&mut rx).await, Incoming::Connected);
        assert_eq!(sim.unauthorized(), 0);
        stop.cancel();
        task.await.unwrap();
    }

    async fn next(rx: &mut mpsc::Receiver<Incoming>) -> Incoming {
        tokio::time::timeout(Duration::from_secs(10), rx.recv())
            .await
            .unwrap()
            .unwrap()
    }

    #[test]
    fn the_default_field_names_are_flat() {
        let m = Mapping::GenericJson {
            fields: Fields::default(),
            events: [("hangup".to_owned(), FeedEventKind::Ended)].into(),
        };
        let e = map(&m, r#"{"event":"hangup","call_id":"c1","agent":"a1"}"#).unwrap();
        assert_eq!(e.agent.as_deref(), Some("a1"));
    }
}
