//! A switchboard simulator for tests and the demo: an IVR's HTTP request nodes calling
//! `/switchboard/v1` the way a hosted switchboard does (form answers, a loop node long-polling until
//! the status is final, a cancel when the caller hangs up).
//!
//! Invariant: the number travels only in the start request's body.

use std::collections::HashMap;

/// One switchboard's HTTP request nodes.
#[derive(Clone)]
pub struct Ivr {
    http: reqwest::Client,
    base: String,
    token: String,
}

/// What an IVR asks for when the caller typed their number.
#[derive(Clone)]
pub struct Typed<'a> {
    pub call_id: &'a str,
    pub queue: &'a str,
    pub number: &'a str,
    pub caller: &'a str,
    pub attempt: u32,
}

impl std::fmt::Debug for Typed<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Typed")
            .field("call_id", &self.call_id)
            .field("queue", &self.queue)
            .field("number", &"<redacted>")
            .field("attempt", &self.attempt)
            .finish_non_exhaustive()
    }
}

/// An HTTP answer: its status and the variables it set (or the error body's fields).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeAnswer {
    pub status: u16,
    pub vars: HashMap<String, String>,
}

impl NodeAnswer {
    pub fn var(&self, name: &str) -> &str {
        self.vars.get(name).map(String::as_str).unwrap_or("")
    }
}

impl Ivr {
    /// Nodes calling `base` (e.g. `http://127.0.0.1:8080`) with the switchboard's bearer token.
    pub fn new(base: &str, token: &str) -> Result<Ivr, reqwest::Error> {
        let builder = reqwest::Client::builder();
        let builder = match crate::pbx::ari::tls::client_config() {
            Ok(tls) => builder.tls_backend_preconfigured((*tls).clone()),
            Err(_) => builder,
        };
        Ok(Ivr {
            http: builder.build()?,
            base: base.trim_end_matches('/').to_owned(),
            token: token.to_owned(),
        })
    }

    /// The HTTP client the nodes use (for requests a node would not make).
    pub fn http(&self) -> &reqwest::Client {
        &self.http
    }

    /// The HTTP request node after "save keypad input": a form POST, answered as a form.
    pub async fn start(&self, t: &Typed<'_>) -> Result<NodeAnswer, reqwest::Error> {
        let attempt = t.attempt.to_string();
        let form = [
            ("call_id", t.call_id),
            ("queue", t.queue),
            ("number", t.number),
            ("caller", t.caller),
            ("attempt", attempt.as_str()),
        ];
        let r = self
            .http
            .post(format!("{}/switchboard/v1/verifications", self.base))
            .bearer_auth(&self.token)
            .header(reqwest::header::ACCEPT, "application/x-www-form-urlencoded")
            .form(&form)
            .send()
            .await?;
        answer(r).await
    }

    /// The loop node: one long-poll of up to `wait` seconds.
    pub async fn status(
        &self,
        id: &str,
        wait: u64,
        until_final: bool,
    ) -> Result<NodeAnswer, reqwest::Error> {
        let until = if until_final { "final" } else { "change" };
        let r = self
            .http
            .get(format!(
                "{}/switchboard/v1/verifications/{id}?wait={wait}&until={until}&format=form",
                self.base
            ))
            .bearer_auth(&self.token)
            .send()
            .await?;
        answer(r).await
    }

    /// The node the switchboard runs when the caller hangs up.
    pub async fn cancel(&self, id: &str) -> Result<NodeAnswer, reqwest::Error> {
        let r = self
            .http
            .post(format!(
                "{}/switchboard/v1/verifications/{id}/cancel?format=form",
                self.base
            ))
            .bearer_auth(&self.token)
            .send()
            .await?;
        answer(r).await
    }

    /// The whole flow: start, then loop on status until it is final (at most `rounds` polls).
    pub async fn verify(&self, t: &Typed<'_>, rounds: u32) -> Result<NodeAnswer, reqwest::Error> {
        let mut a = self.start(t).await?;
        let id = a.var("callgate_ref").to_owned();
        let mut n = 0;
        while a.status == 200 && a.var("callgate_status") == "pending" && n < rounds {
            a = self.status(&id, 20, true).await?;
            n += 1;
        }
        Ok(a)
    }
}

async fn answer(r: reqwest::Response) -> Result<NodeAnswer, reqwest::Error> {
    let status = r.status().as_u16();
    let form = r
        .headers()
        .get(reqwest::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/x-www-form-urlencoded"));
    let body = r.bytes().await?;
    let vars = if form {
        form_urlencoded::parse(&body).into_owned().collect()
    } else {
        match serde_json::from_slice::<serde_json::Value>(&body) {
            Ok(serde_json::Value::Object(m)) => m
                .into_iter()
                .map(|(k, v)| (k, v.as_str().map(str::to_owned).unwrap_or_default()))
                .collect(),
            _ => HashMap::new(),
        }
    };
    Ok(NodeAnswer { status, vars })
}

/// The bearer token of the lab's switchboard feed.
pub const FEED_TOKEN: &str = "lab-feed-token-not-for-production";

/// The mapping of the simulated feed's events, as `[switchboards.<name>.feed]` keys (a Telavox-style
/// JSON shape: `{"type": "CALL_ANSWERED", "call": {"id", "queue", "from", "agent": {"extension"}}}`).
pub const FEED_MAPPING: &str = r#"mapping = "generic_json"

[switchboards.lab.feed.fields]
event = "type"
call_id = "call.id"
agent = "call.agent.extension"
queue = "call.queue"
caller = "call.from"

[switchboards.lab.feed.events]
CALL_RINGING = "started"
CALL_QUEUED = "queued"
CALL_ANSWERED = "answered"
CALL_TRANSFERRED = "transferred"
CALL_HANGUP = "ended"
"#;

/// A call event of the simulated feed (see [`FEED_MAPPING`]); `kind` is one of `CALL_RINGING`,
/// `CALL_QUEUED`, `CALL_ANSWERED`, `CALL_TRANSFERRED`, `CALL_HANGUP` (or anything, to test skipping).
pub fn feed_event(kind: &str, call_id: &str, agent: Option<&str>) -> serde_json::Value {
    let mut call = serde_json::json!({
        "id": call_id,
        "queue": "support",
        "from": "+46701234567",
    });
    if let Some(a) = agent {
        call["agent"] = serde_json::json!({ "extension": a, "name": "Lab Agent" });
    }
    serde_json::json!({ "type": kind, "call": call })
}

/// A switchboard's call-event feed on loopback: checks the bearer token, sends what tests push to
/// every connected client, and can drop connections or refuse new ones.
#[derive(Clone)]
pub struct FeedSim {
    addr: std::net::SocketAddr,
    shared: std::sync::Arc<FeedShared>,
}

struct FeedShared {
    token: std::sync::Mutex<String>,
    refusing: std::sync::atomic::AtomicBool,
    events: tokio::sync::broadcast::Sender<String>,
    /// Bumped to drop every current connection.
    drops: tokio::sync::watch::Sender<u64>,
    /// Connections open now.
    open: tokio::sync::watch::Sender<usize>,
    /// Connects refused for a bad token.
    unauthorized: tokio::sync::watch::Sender<u64>,
    /// Connections accepted so far.
    accepted: tokio::sync::watch::Sender<u64>,
    /// While set, connections neither read (so pings get no pong) nor send.
    stalled: tokio::sync::watch::Sender<bool>,
}

impl FeedSim {
    /// Serves on `listener` (bind `127.0.0.1:0`) until `stop`.
    pub fn start(
        listener: tokio::net::TcpListener,
        token: &str,
        stop: tokio_util::sync::CancellationToken,
    ) -> std::io::Result<FeedSim> {
        let addr = listener.local_addr()?;
        let shared = std::sync::Arc::new(FeedShared {
            token: std::sync::Mutex::new(token.to_owned()),
            refusing: std::sync::atomic::AtomicBool::new(false),
            events: tokio::sync::broadcast::channel(256).0,
            drops: tokio::sync::watch::channel(0).0,
            open: tokio::sync::watch::channel(0).0,
            unauthorized: tokio::sync::watch::channel(0).0,
            accepted: tokio::sync::watch::channel(0).0,
            stalled: tokio::sync::watch::channel(false).0,
        });
        let app = axum::Router::new()
            .route("/feed", axum::routing::get(feed_socket))
            .with_state((std::sync::Arc::clone(&shared), stop.clone()));
        tokio::spawn(async move {
            let _ = axum::serve(listener, app)
                .with_graceful_shutdown(async move { stop.cancelled().await })
                .await;
        });
        Ok(FeedSim { addr, shared })
    }

    /// `ws://127.0.0.1:<port>/feed`.
    pub fn url(&self) -> String {
        format!("ws://{}/feed", self.addr)
    }

    /// Sends an event to every connected client (lost when none is connected, as on a live feed).
    pub fn push(&self, event: &serde_json::Value) {
        let _ = self.shared.events.send(event.to_string());
    }

    /// Sends a raw text message (to test skipping of malformed messages).
    pub fn push_raw(&self, text: &str) {
        let _ = self.shared.events.send(text.to_owned());
    }

    /// Drops every current connection.
    pub fn drop_connections(&self) {
        self.shared.drops.send_modify(|n| *n += 1);
    }

    /// While `on`, every connection goes silent: no events, no answer to pings.
    pub fn stall(&self, on: bool) {
        self.shared.stalled.send_replace(on);
    }

    /// Refuses (503) new connections while `on`.
    pub fn refuse(&self, on: bool) {
        self.shared
            .refusing
            .store(on, std::sync::atomic::Ordering::SeqCst);
    }

    /// Changes the token the feed accepts.
    pub fn set_token(&self, token: &str) {
        if let Ok(mut t) = self.shared.token.lock() {
            *t = token.to_owned();
        }
    }

    /// Connects refused for a bad token so far.
    pub fn unauthorized(&self) -> u64 {
        *self.shared.unauthorized.borrow()
    }

    /// Connections accepted so far.
    pub fn accepted(&self) -> u64 {
        *self.shared.accepted.borrow()
    }

    /// Waits until at least `n` connections were accepted.
    pub async fn wait_for_accepted(&self, n: u64) {
        let mut rx = self.shared.accepted.subscribe();
        let _ = rx.wait_for(|seen| *seen >= n).await;
    }

    /// Connections open now.
    pub fn connections(&self) -> usize {
        *self.shared.open.borrow()
    }

    /// Waits until exactly `n` connections are open.
    pub async fn wait_for_connections(&self, n: usize) {
        let mut rx = self.shared.open.subscribe();
        let _ = rx.wait_for(|open| *open == n).await;
    }

    /// Waits until at least `n` connects were refused for a bad token.
    pub async fn wait_for_unauthorized(&self, n: u64) {
        let mut rx = self.shared.unauthorized.subscribe();
        let _ = rx.wait_for(|seen| *seen >= n).await;
    }
}

type FeedState = (
    std::sync::Arc<FeedShared>,
    tokio_util::sync::CancellationToken,
);

async fn feed_socket(
    axum::extract::State((shared, stop)): axum::extract::State<FeedState>,
    headers: axum::http::HeaderMap,
    ws: axum::extract::ws::WebSocketUpgrade,
) -> axum::response::Response {
    use axum::response::IntoResponse as _;
    let expected = shared
        .token
        .lock()
        .map(|t| format!("Bearer {t}"))
        .unwrap_or_default();
    let given = headers
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    if given != expected {
        shared.unauthorized.send_modify(|n| *n += 1);
        return axum::http::StatusCode::UNAUTHORIZED.into_response();
    }
    if shared.refusing.load(std::sync::atomic::Ordering::SeqCst) {
        return axum::http::StatusCode::SERVICE_UNAVAILABLE.into_response();
    }
    ws.on_upgrade(move |socket| serve_feed(shared, stop, socket))
}

async fn serve_feed(
    shared: std::sync::Arc<FeedShared>,
    stop: tokio_util::sync::CancellationToken,
    mut socket: axum::extract::ws::WebSocket,
) {
    use axum::extract::ws::Message;
    let mut events = shared.events.subscribe();
    let mut drops = shared.drops.subscribe();
    drops.borrow_and_update();
    let mut stalled = shared.stalled.subscribe();
    shared.open.send_modify(|n| *n += 1);
    shared.accepted.send_modify(|n| *n += 1);
    loop {
        let silent = *stalled.borrow_and_update();
        tokio::select! {
            _ = stop.cancelled() => break,
            _ = drops.changed() => break,
            _ = stalled.changed() => {}
            e = events.recv(), if !silent => match e {
                Ok(text) => {
                    if socket.send(Message::Text(text.into())).await.is_err() {
                        break;
                    }
                }
                Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {}
                Err(_) => break,
            },
            incoming = socket.recv(), if !silent => match incoming {
                None | Some(Err(_)) | Some(Ok(Message::Close(_))) => break,
                Some(Ok(_)) => {}
            },
        }
    }
    shared.open.send_modify(|n| *n = n.saturating_sub(1));
}
