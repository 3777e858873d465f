//! The ARI events websocket: one task that keeps `…/ari/events?app=NAME&subscribeAll=false` open,
//! decodes frames and forwards them as [`Incoming`] values.
//!
//! Invariants:
//! - The socket is read continuously on its own task (Asterisk drops a socket whose writes block for
//!   more than ~100 ms); decoding happens there, and a frame that does not decode is logged by
//!   type/size only and skipped. Event bodies are never logged (DTMF digits are personal-number digits).
//! - The task pings every `ping_interval`; a connection on which nothing (pong or frame) arrived for
//!   two intervals after a ping is declared dead.
//! - After every successful (re)connect it emits [`Incoming::Connected`] (the consumer reconciles:
//!   events during a gap are lost, Asterisk does not queue them); after losing an established
//!   connection it emits [`Incoming::Disconnected`]. After losing a connection that had proven
//!   itself (it stayed up for [`PROVEN_AFTER`] or delivered a frame) the first reconnect is
//!   immediate and the backoff starts over; only failing attempts make it grow (jittered,
//!   exponential, between `reconnect_min` and `reconnect_max`). While no socket is connected
//!   Asterisk drops our events and fails new calls into the dialplan fallback, so an accepted
//!   connection that is cut later must never push the next attempt seconds away.
//! - On `ApplicationReplaced` (another connection took the application over) the event is forwarded,
//!   the state becomes [`ConnState::Replaced`] and nothing more is forwarded; the task **does not
//!   reconnect** (that would steal the application back and the two instances would flap). It keeps
//!   the replaced socket open, reading and discarding, until shutdown or until Asterisk closes it:
//!   closing it ourselves makes Asterisk unregister the application name, which could disturb the
//!   instance that now owns it. The consumer decides what to do (stop acting on calls, alert, or
//!   call [`spawn`] again after shutting this task down).

use std::time::Duration;

use base64::Engine as _;
use futures_util::{SinkExt as _, StreamExt as _};
use reqwest::Url;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio_tungstenite::tungstenite::client::IntoClientRequest as _;
use tokio_tungstenite::tungstenite::http::{header, HeaderValue};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;
use tokio_util::sync::CancellationToken;

use super::wire::{self, Event};
use super::Settings;

/// What the events task hands to the application.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Incoming {
    /// A (re)connect succeeded: reconcile local state with `GET /applications/{app}`.
    Connected,
    /// An established connection was lost; the task is reconnecting.
    Disconnected,
    /// One decoded event (boxed: events carry whole channel snapshots).
    Event(Box<Event>),
}

/// Connection state, published on a `watch` channel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConnState {
    Connecting,
    Connected,
    /// Not connected: between attempts, or stopped by shutdown.
    Disconnected,
    /// Another connection owns the application; the task has ended.
    Replaced,
}

/// A connection that stayed up this long had been accepted and worked: losing it is a cut link,
/// not a failing server, so the reconnect is immediate.
pub const PROVEN_AFTER: Duration = Duration::from_secs(1);

pub(crate) trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

pub(crate) type Socket = WebSocketStream<Box<dyn Io>>;

enum SessionEnd {
    Shutdown,
    Replaced,
    ReceiverGone,
    Lost { healthy: bool },
}

/// Starts the events task. It runs until `shutdown` is cancelled, the receiver of `tx` is dropped,
/// or the application is replaced. `tx` should be generously sized and its consumer must only route
/// events (never await REST calls inline): while `tx` is full the socket is not read.
pub fn spawn(
    settings: Settings,
    tx: mpsc::Sender<Incoming>,
    shutdown: CancellationToken,
) -> (JoinHandle<()>, watch::Receiver<ConnState>) {
    let (state, state_rx) = watch::channel(ConnState::Connecting);
    let handle = tokio::spawn(run(settings, tx, shutdown, state));
    (handle, state_rx)
}

/// `http(s)://host:port[/prefix]` → `ws(s)://host:port[/prefix]/ari/events?app=NAME&subscribeAll=false`.
pub fn events_url(settings: &Settings) -> Result<Url, String> {
    let mut url =
        Url::parse(&settings.url).map_err(|e| crate::telemetry::ErrorChain(&e).to_string())?;
    let scheme = match url.scheme() {
        "http" => "ws",
        "https" => "wss",
        _ => return Err("url must be http or https".into()),
    };
    url.set_scheme(scheme)
        .map_err(|_| "cannot derive websocket url".to_string())?;
    url.path_segments_mut()
        .map_err(|_| "url cannot be a base".to_string())?
        .pop_if_empty()
        .extend(["ari", "events"]);
    url.set_query(None);
    url.query_pairs_mut()
        .append_pair("app", &settings.app)
        .append_pair("subscribeAll", "false");
    Ok(url)
}

async fn run(
    settings: Settings,
    tx: mpsc::Sender<Incoming>,
    shutdown: CancellationToken,
    state: watch::Sender<ConnState>,
) {
    let url = match events_url(&settings) {
        Ok(url) => url,
        Err(error) => {
            tracing::error!(%error, "ari events: invalid url; not connecting");
            state.send_replace(ConnState::Disconnected);
            return;
        }
    };
    let mut backoff = settings.reconnect_min;
    loop {
        // Set when a proven connection was lost: the next attempt goes out at once.
        let mut retry_now = false;
        state.send_replace(ConnState::Connecting);
        let attempt = tokio::time::timeout(settings.request_timeout, connect(&url, &settings));
        let attempt = tokio::select! {
            biased;
            _ = shutdown.cancelled() => break,
            attempt = attempt => attempt,
        };
        match attempt {
            Ok(Ok(socket)) => {
                tracing::info!(app = %settings.app, "ari events connected");
                state.send_replace(ConnState::Connected);
                if !deliver(&tx, &shutdown, Incoming::Connected).await {
                    break;
                }
                let opened = clock();
                match session(socket, &settings, &tx, &shutdown, &state).await {
                    SessionEnd::Shutdown | SessionEnd::ReceiverGone => break,
                    SessionEnd::Replaced => {
                        tracing::info!(app = %settings.app, "ari events stopped after replacement");
                        return;
                    }
                    SessionEnd::Lost { healthy } => {
                        tracing::warn!(app = %settings.app, "ari events connection lost");
                        state.send_replace(ConnState::Disconnected);
                        if !deliver(&tx, &shutdown, Incoming::Disconnected).await {
                            break;
                        }
                        if healthy || opened.elapsed() >= PROVEN_AFTER {
                            backoff = settings.reconnect_min;
                            retry_now = true;
                        }
                    }
                }
            }
            Ok(Err(error)) => {
                tracing::warn!(%error, "ari events connect failed");
                state.send_replace(ConnState::Disconnected);
            }
            Err(_) => {
                tracing::warn!("ari events connect timed out");
                state.send_replace(ConnState::Disconnected);
            }
        }
        if retry_now {
            tracing::debug!("ari events reconnecting at once");
            continue;
        }
        let delay = crate::backoff::jittered(backoff);
        backoff = backoff.saturating_mul(2).min(settings.reconnect_max);
        tracing::debug!(
            delay_ms = delay.as_millis() as u64,
            "ari events reconnect scheduled"
        );
        tokio::select! {
            biased;
            _ = shutdown.cancelled() => break,
            _ = tokio::time::sleep(delay) => {}
        }
    }
    state.send_replace(ConnState::Disconnected);
    tracing::info!(app = %settings.app, "ari events stopped");
}

#[allow(clippy::disallowed_methods)] // how long a connection lived decides the reconnect delay
fn clock() -> tokio::time::Instant {
    tokio::time::Instant::now()
}

async fn deliver(
    tx: &mpsc::Sender<Incoming>,
    shutdown: &CancellationToken,
    item: Incoming,
) -> bool {
    tokio::select! {
        biased;
        _ = shutdown.cancelled() => false,
        sent = tx.send(item) => sent.is_ok(),
    }
}

/// Opens the events websocket at `url` with the credentials of `settings`.
pub(crate) async fn connect(url: &Url, settings: &Settings) -> Result<Socket, String> {
    let host = url.host_str().ok_or("url has no host")?.to_owned();
    let port = url.port_or_known_default().ok_or("url has no port")?;
    let mut request = url
        .as_str()
        .into_client_request()
        .map_err(|e| crate::telemetry::ErrorChain(&e).to_string())?;
    let credentials = base64::engine::general_purpose::STANDARD.encode(format!(
        "{}:{}",
        settings.username,
        settings.password.expose()
    ));
    let mut auth = HeaderValue::from_str(&format!("Basic {credentials}"))
        .map_err(|_| "credentials are not a valid header".to_string())?;
    auth.set_sensitive(true);
    request.headers_mut().insert(header::AUTHORIZATION, auth);

    let tcp = tokio::net::TcpStream::connect((host.as_str(), port))
        .await
        .map_err(|e| crate::telemetry::ErrorChain(&e).to_string())?;
    let _ = tcp.set_nodelay(true);
    let io: Box<dyn Io> = if url.scheme() == "wss" {
        let tls = super::tls::client_config()
            .map_err(|e| crate::telemetry::ErrorChain(&e).to_string())?;
        let name = rustls::pki_types::ServerName::try_from(host)
            .map_err(|e| crate::telemetry::ErrorChain(&e).to_string())?;
        let stream = tokio_rustls::TlsConnector::from(tls)
            .connect(name, tcp)
            .await
            .map_err(|e| crate::telemetry::ErrorChain(&e).to_string())?;
        Box::new(stream)
    } else {
        Box::new(tcp)
    };
    let (socket, _response) = tokio_tungstenite::client_async(request, io)
        .await
        .map_err(|e| crate::telemetry::ErrorChain(&e).to_string())?;
    Ok(socket)
}

fn lost(replaced: bool, healthy: bool) -> SessionEnd {
    if replaced {
        SessionEnd::Replaced
    } else {
        SessionEnd::Lost { healthy }
    }
}

async fn session(
    mut socket: Socket,
    settings: &Settings,
    tx: &mpsc::Sender<Incoming>,
    shutdown: &CancellationToken,
    state: &watch::Sender<ConnState>,
) -> SessionEnd {
    let mut ticker = tokio::time::interval(settings.ping_interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    ticker.reset();
    // Ticks since the last frame arrived; more than two means two intervals passed since a ping
    // without any answer.
    let mut idle_ticks = 0u32;
    let mut ticks = 0u64;
    let mut healthy = false;
    let mut replaced = false;
    let end = loop {
        tokio::select! {
            biased;
            _ = shutdown.cancelled() => break SessionEnd::Shutdown,
            frame = socket.next() => {
                let message = match frame {
                    None => break lost(replaced, healthy),
                    Some(Err(error)) => {
                        tracing::debug!(%error, "ari events read failed");
                        break lost(replaced, healthy);
                    }
                    Some(Ok(message)) => message,
                };
                if replaced {
                    continue;
                }
                idle_ticks = 0;
                if ticks > 0 {
                    healthy = true;
                }
                match message {
                    Message::Text(text) => match wire::decode(text.as_str()) {
                        Ok(event) => {
                            let takeover = matches!(event, Event::ApplicationReplaced(_));
                            if takeover {
                                tracing::warn!(app = %settings.app,
                                    "ari application replaced by another connection; events stopped");
                                replaced = true;
                                state.send_replace(ConnState::Replaced);
                            }
                            if !deliver(tx, shutdown, Incoming::Event(Box::new(event))).await {
                                break if shutdown.is_cancelled() {
                                    SessionEnd::Shutdown
                                } else {
                                    SessionEnd::ReceiverGone
                                };
                            }
                        }
                        Err(wire::DecodeError::Invalid { kind }) => {
                            tracing::warn!(kind = %kind, size = text.len(),
                                "ari event does not decode; skipped");
                        }
                        Err(wire::DecodeError::NotAnEvent) => {
                            tracing::warn!(size = text.len(), "ari frame is not an event; skipped");
                        }
                    },
                    Message::Binary(data) => {
                        tracing::warn!(size = data.len(), "ari binary frame; skipped");
                    }
                    Message::Close(_) => break lost(replaced, healthy),
                    Message::Ping(_) | Message::Pong(_) | Message::Frame(_) => {}
                }
            }
            _ = ticker.tick() => {
                ticks += 1;
                idle_ticks += 1;
                if idle_ticks > 2 {
                    tracing::warn!("ari events: no answer to ping; declaring the connection dead");
                    break lost(replaced, healthy);
                }
                let ping = socket.send(Message::Ping(Default::default()));
                match tokio::time::timeout(settings.ping_interval, ping).await {
                    Ok(Ok(())) => {}
                    _ => break lost(replaced, healthy),
                }
            }
        }
    };
    // Best effort: tell the server we are going; never wait long for it.
    if !matches!(end, SessionEnd::Replaced) {
        let _ = tokio::time::timeout(Duration::from_millis(500), socket.close(None)).await;
    }
    end
}
