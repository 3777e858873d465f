//! ARI REST client: the channel, playback, bridge and application calls callgate makes.
//!
//! Invariant: every request has a hard deadline (`Settings::request_timeout`); every answer maps to a
//! `Result` without panicking, whatever the body; errors never carry URLs, query values or bodies
//! other than Asterisk's short `message`, so they are safe to log.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;
use std::time::Duration;

use reqwest::{Method, StatusCode, Url};
use serde::de::DeserializeOwned;

use super::wire::{
    Application, AsteriskInfo, Bridge, Channel, ErrorBody, Playback, Sound, Variable,
};
use super::Settings;
use crate::secret::Secret;
use crate::telemetry::ErrorChain;

/// Longest `message` kept from an error body.
const MAX_MESSAGE: usize = 200;
/// Asterisk's message for a path it has no resource for (an older Asterisk without a newer call).
const RESOURCE_NOT_FOUND: &str = "Resource not found";
/// Asterisk's message for a sound file it does not have (`GET /sounds/{id}`).
const SOUND_NOT_FOUND: &str = "Sound not found";
/// Requests in flight at once. Each needs its own HTTP connection, and Asterisk serves at most
/// `sessionlimit` (http.conf, default 100) sessions, the events websocket included: beyond that it
/// drops new connections and the requests fail. Further requests wait for a slot (within their
/// timeout).
const MAX_IN_FLIGHT: usize = 48;
/// Idle pooled connections are closed before Asterisk closes them (`session_keep_alive`, default
/// 15 s), so a request is never sent on a connection Asterisk is closing.
const POOL_IDLE: Duration = Duration::from_secs(10);
/// Pause before a request that failed on its connection is sent again.
const RESEND_AFTER: Duration = Duration::from_millis(20);

/// What went wrong with an ARI request. Says which side failed and whether retrying can help.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    /// 404 on a channel (hung up / destroyed), or 400 on `addChannel`/`removeChannel` (unknown
    /// channel id). The call is over: do not retry.
    #[error("channel is gone")]
    ChannelGone,
    /// 409: the channel (or bridge) exists but is not in a Stasis application, e.g. after `continue`.
    /// Only `DELETE /channels/{id}` still works. Also used for 422 on `addChannel` (channel not in
    /// Stasis).
    #[error("channel is not in the Stasis application")]
    NotInStasis,
    /// 412: channel in a state that refuses the operation (`Down`, `Ringing`, …); wait for `Up`.
    #[error("channel is in an invalid state")]
    NotUp,
    /// 404 on something that is not a channel (bridge, application, playback).
    #[error("not found: {0}")]
    NotFound(String),
    /// 422: semantically impossible request (configuration or programming error).
    #[error("unprocessable: {0}")]
    Unprocessable(String),
    /// 400: bad or missing parameter.
    #[error("bad request: {0}")]
    BadRequest(String),
    /// 5xx or any other unexpected status.
    #[error("server error {status}: {msg}")]
    Server { status: u16, msg: String },
    /// 401/403: bad credentials or a read-only user.
    #[error("unauthorized")]
    Unauthorized,
    /// No complete answer within the request timeout; the request may or may not have taken effect.
    #[error("request timed out")]
    Timeout,
    /// Connection-level failure (refused, reset, TLS).
    #[error("transport: {0}")]
    Transport(String),
    /// A success status with a body that does not decode.
    #[error("decode: {0}")]
    Decode(String),
    /// The client could not be built (bad URL, TLS setup).
    #[error("configuration: {0}")]
    Config(String),
}

impl Error {
    /// The channel is no longer ours to drive (hung up, or left Stasis).
    pub fn is_gone(&self) -> bool {
        matches!(self, Error::ChannelGone | Error::NotInStasis)
    }

    /// Asterisk could not be reached or did not answer in time; a retry may succeed.
    pub fn is_transient(&self) -> bool {
        matches!(self, Error::Timeout | Error::Transport(_))
    }
}

/// A failed exchange, and whether the request surely never reached Asterisk.
struct Failed {
    error: Error,
    unsent: bool,
}

impl Failed {
    fn sent(error: Error) -> Failed {
        Failed {
            error,
            unsent: false,
        }
    }
}

/// What a request addresses; decides what a 404 means.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Target {
    Channel,
    Other,
}

/// Parameters of `POST /channels/{channelId}` (originate into the application).
#[derive(Clone, Default)]
pub struct Originate {
    /// e.g. `Local/agent@acc-agents/n`.
    pub endpoint: String,
    /// Id of the new channel (the `;1` half for Local channels).
    pub channel_id: String,
    /// Id of the `;2` half of a Local channel.
    pub other_channel_id: Option<String>,
    /// `appArgs`: arrive as `StasisStart.args`.
    pub app_args: Vec<String>,
    /// `callerId`, e.g. `Name <number>`.
    pub caller_id: Option<String>,
    /// Id of the channel this one is created on behalf of.
    pub originator: Option<String>,
    /// Dial timeout in seconds (`-1` = none).
    pub timeout_secs: Option<i64>,
    /// Channel variables (use the `__` prefix to make them inheritable).
    pub variables: BTreeMap<String, String>,
}

impl fmt::Debug for Originate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Originate")
            .field("endpoint", &self.endpoint)
            .field("channel_id", &self.channel_id)
            .field("other_channel_id", &self.other_channel_id)
            .field("variables", &self.variables.keys().collect::<Vec<_>>())
            .finish_non_exhaustive()
    }
}

/// ARI REST client. Cheap to clone (shares the connection pool).
#[derive(Clone)]
pub struct Client {
    http: reqwest::Client,
    base: Url,
    app: String,
    username: String,
    password: Secret,
    timeout: Duration,
    /// Whether this Asterisk has `POST /channels/{id}/variables`: unknown until the first try, then
    /// shared by every clone.
    batch_variables: Arc<AtomicU8>,
    in_flight: Arc<tokio::sync::Semaphore>,
}

const BATCH_UNKNOWN: u8 = 0;
const BATCH_YES: u8 = 1;
const BATCH_NO: u8 = 2;

impl fmt::Debug for Client {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Client")
            .field("base", &self.base.as_str())
            .field("app", &self.app)
            .finish_non_exhaustive()
    }
}

struct Answer {
    status: StatusCode,
    body: bytes::Bytes,
}

impl Answer {
    fn message(&self) -> String {
        let mut msg = serde_json::from_slice::<ErrorBody>(&self.body)
            .map(|b| b.message)
            .unwrap_or_default();
        if msg.len() > MAX_MESSAGE {
            let mut cut = MAX_MESSAGE;
            while !msg.is_char_boundary(cut) {
                cut -= 1;
            }
            msg.truncate(cut);
        }
        msg
    }

    fn error(&self, target: Target) -> Error {
        let msg = self.message();
        match self.status.as_u16() {
            400 => Error::BadRequest(msg),
            401 | 403 => Error::Unauthorized,
            404 if target == Target::Channel => Error::ChannelGone,
            404 => Error::NotFound(msg),
            409 => Error::NotInStasis,
            412 => Error::NotUp,
            422 => Error::Unprocessable(msg),
            status => Error::Server { status, msg },
        }
    }

    fn empty(self, target: Target) -> Result<(), Error> {
        if self.status.is_success() {
            Ok(())
        } else {
            Err(self.error(target))
        }
    }

    fn json<T: DeserializeOwned>(self, target: Target) -> Result<T, Error> {
        if !self.status.is_success() {
            return Err(self.error(target));
        }
        serde_json::from_slice(&self.body).map_err(|e| Error::Decode(e.to_string()))
    }
}

impl Client {
    /// Builds a client for `settings.url` + `/ari`.
    pub fn new(settings: &Settings) -> Result<Client, Error> {
        let mut base = Url::parse(&settings.url).map_err(|e| Error::Config(e.to_string()))?;
        if !matches!(base.scheme(), "http" | "https") {
            return Err(Error::Config("url must be http or https".into()));
        }
        base.path_segments_mut()
            .map_err(|_| Error::Config("url cannot be a base".into()))?
            .pop_if_empty()
            .push("ari");
        let tls = super::tls::client_config().map_err(|e| Error::Config(e.to_string()))?;
        let http = reqwest::Client::builder()
            .tls_backend_preconfigured((*tls).clone())
            .timeout(settings.request_timeout)
            .connect_timeout(settings.request_timeout)
            .pool_idle_timeout(POOL_IDLE)
            .pool_max_idle_per_host(MAX_IN_FLIGHT)
            .build()
            .map_err(|e| Error::Config(e.without_url().to_string()))?;
        Ok(Client {
            http,
            base,
            app: settings.app.clone(),
            username: settings.username.clone(),
            password: settings.password.clone(),
            timeout: settings.request_timeout,
            batch_variables: Arc::new(AtomicU8::new(BATCH_UNKNOWN)),
            in_flight: Arc::new(tokio::sync::Semaphore::new(MAX_IN_FLIGHT)),
        })
    }

    /// The application name requests are made for.
    pub fn app(&self) -> &str {
        &self.app
    }

    /// Sends a request. It is sent once more after a transport failure when that is safe: the request
    /// never left (the connection was refused or cut before it was written), or it is safe to repeat
    /// (reads, and writes that set a state rather than create something), e.g. a pooled connection
    /// Asterisk closed, a new one refused at its `sessionlimit`, or a link reset by a proxy.
    async fn send(
        &self,
        method: Method,
        path: &[&str],
        query: &[(&str, &str)],
        body: Option<serde_json::Value>,
    ) -> Result<Answer, Error> {
        let repeatable = method != Method::POST
            || matches!(
                path.last().copied(),
                // Not `continue`: `AriControl` retries it, knowing that a repeat after it took
                // effect answers 409.
                Some("answer" | "moh" | "variable" | "variables")
            );
        let mut url = self.base.clone();
        url.path_segments_mut()
            .map_err(|_| Error::Config("url cannot be a base".into()))?
            .extend(path);
        let mut answer = self.exchange(&method, &url, query, body.as_ref()).await;
        if let Err(Failed {
            error: Error::Transport(e),
            unsent,
        }) = &answer
        {
            if repeatable || *unsent {
                tracing::debug!(%method, resource = path.first().copied().unwrap_or(""), error = %e,
                    "ari request failed on the connection; sending it again");
                tokio::time::sleep(RESEND_AFTER).await;
                answer = self.exchange(&method, &url, query, body.as_ref()).await;
            }
        }
        let answer = answer.map_err(|f| f.error);
        match &answer {
            Ok(a) => tracing::debug!(%method, resource = path.first().copied().unwrap_or(""),
                status = a.status.as_u16(), "ari request"),
            Err(e) => tracing::debug!(%method, resource = path.first().copied().unwrap_or(""),
                error = %crate::telemetry::ErrorChain(e), "ari request failed"),
        }
        answer
    }

    async fn exchange(
        &self,
        method: &Method,
        url: &Url,
        query: &[(&str, &str)],
        body: Option<&serde_json::Value>,
    ) -> Result<Answer, Failed> {
        let mut request = self
            .http
            .request(method.clone(), url.clone())
            .basic_auth(&self.username, Some(self.password.expose()));
        if !query.is_empty() {
            request = request.query(query);
        }
        if let Some(body) = body {
            request = request.json(body);
        }
        let exchange = async {
            // Never closed, so acquiring cannot fail; without a permit the request goes anyway.
            let _slot = self.in_flight.acquire().await.ok();
            let response = request.send().await?;
            let status = response.status();
            let body = response.bytes().await?;
            Ok::<_, reqwest::Error>(Answer { status, body })
        };
        match tokio::time::timeout(self.timeout, exchange).await {
            Err(_) => Err(Failed::sent(Error::Timeout)),
            Ok(Err(e)) if e.is_timeout() => Err(Failed::sent(Error::Timeout)),
            Ok(Err(e)) => {
                let unsent = e.is_connect();
                Err(Failed {
                    error: Error::Transport(ErrorChain(&e.without_url()).to_string()),
                    unsent,
                })
            }
            Ok(Ok(answer)) => Ok(answer),
        }
    }

    /// `POST /channels/{ch}/answer`.
    pub async fn answer(&self, ch: &str) -> Result<(), Error> {
        self.send(Method::POST, &["channels", ch, "answer"], &[], None)
            .await?
            .empty(Target::Channel)
    }

    /// `POST /channels/{ch}/play/{playback_id}?media=…&lang=…`. Playbacks on one channel queue.
    pub async fn play(
        &self,
        ch: &str,
        playback_id: &str,
        media: &str,
        lang: Option<&str>,
    ) -> Result<Playback, Error> {
        let mut query = vec![("media", media)];
        if let Some(lang) = lang {
            query.push(("lang", lang));
        }
        self.send(
            Method::POST,
            &["channels", ch, "play", playback_id],
            &query,
            None,
        )
        .await?
        .json(Target::Channel)
    }

    /// `GET /playbacks/{pb}`: whether the playback still exists (it is gone once it has finished).
    pub async fn playback_exists(&self, pb: &str) -> Result<bool, Error> {
        let answer = self
            .send(Method::GET, &["playbacks", pb], &[], None)
            .await?;
        if answer.status == StatusCode::NOT_FOUND {
            return Ok(false);
        }
        answer.empty(Target::Other).map(|()| true)
    }

    /// `DELETE /playbacks/{pb}`. A playback that is already gone (404) counts as stopped.
    pub async fn stop_playback(&self, pb: &str) -> Result<(), Error> {
        let answer = self
            .send(Method::DELETE, &["playbacks", pb], &[], None)
            .await?;
        if answer.status == StatusCode::NOT_FOUND {
            return Ok(());
        }
        answer.empty(Target::Other)
    }

    /// `POST /channels/{ch}/moh?mohClass=…`.
    pub async fn start_moh(&self, ch: &str, class: Option<&str>) -> Result<(), Error> {
        let query: Vec<(&str, &str)> = class.map(|c| ("mohClass", c)).into_iter().collect();
        self.send(Method::POST, &["channels", ch, "moh"], &query, None)
            .await?
            .empty(Target::Channel)
    }

    /// `DELETE /channels/{ch}/moh`.
    pub async fn stop_moh(&self, ch: &str) -> Result<(), Error> {
        self.send(Method::DELETE, &["channels", ch, "moh"], &[], None)
            .await?
            .empty(Target::Channel)
    }

    /// `POST /channels/{ch}/mute?direction=in` (`on`) or `DELETE …/mute?direction=in`: the channel's
    /// audio towards its bridge.
    pub async fn mute_in(&self, ch: &str, on: bool) -> Result<(), Error> {
        let method = if on { Method::POST } else { Method::DELETE };
        self.send(
            method,
            &["channels", ch, "mute"],
            &[("direction", "in")],
            None,
        )
        .await?
        .empty(Target::Channel)
    }

    /// `GET /bridges/{id}`; `None` when there is no such bridge.
    pub async fn get_bridge(&self, id: &str) -> Result<Option<Bridge>, Error> {
        let answer = self.send(Method::GET, &["bridges", id], &[], None).await?;
        if answer.status == StatusCode::NOT_FOUND {
            return Ok(None);
        }
        answer.json(Target::Other).map(Some)
    }

    /// `POST /channels/{ch}/variable?variable=…&value=…` (prefix `__` to make it inheritable).
    pub async fn set_variable(&self, ch: &str, name: &str, value: &str) -> Result<(), Error> {
        self.send(
            Method::POST,
            &["channels", ch, "variable"],
            &[("variable", name), ("value", value)],
            None,
        )
        .await?
        .empty(Target::Channel)
    }

    /// Sets `vars` on the channel in as few requests as this Asterisk allows: one
    /// `POST /channels/{ch}/variables` (22.10+), else one `POST …/variable` each. Returns, per
    /// variable, the error that kept it from being set (empty: all set). A channel found gone is
    /// `Err` at once.
    pub async fn set_all_variables(
        &self,
        ch: &str,
        vars: &[(String, String)],
    ) -> Result<Vec<(usize, Error)>, Error> {
        if self.batch_variables.load(Ordering::Relaxed) != BATCH_NO {
            match self.set_variables(ch, vars).await {
                Ok(true) => {
                    self.batch_variables.store(BATCH_YES, Ordering::Relaxed);
                    return Ok(Vec::new());
                }
                Ok(false) => {
                    if self.batch_variables.swap(BATCH_NO, Ordering::Relaxed) != BATCH_NO {
                        tracing::info!("this Asterisk has no POST /channels/{{id}}/variables (before 22.10); setting variables one by one");
                    }
                }
                Err(e) if e.is_gone() => return Err(e),
                // Timed out or refused: one by one, so that what can be set is set.
                Err(e) => {
                    tracing::warn!(error = %crate::telemetry::ErrorChain(&e), "setting the variables in one request failed; setting them one by one")
                }
            }
        }
        let mut failed = Vec::new();
        for (i, (name, value)) in vars.iter().enumerate() {
            match self.set_variable(ch, name, value).await {
                Ok(()) => {}
                Err(e) if e.is_gone() => return Err(e),
                Err(e) => failed.push((i, e)),
            }
        }
        Ok(failed)
    }

    /// `POST /channels/{ch}/variables` with body `{"variables":{…}}` (Asterisk 22.10+): sets every
    /// variable (and writable function, e.g. `TIMEOUT(absolute)`) in one request. `Ok(false)` when
    /// this Asterisk has no such resource (404 `Resource not found`, or 405): set them one by one.
    pub async fn set_variables(&self, ch: &str, vars: &[(String, String)]) -> Result<bool, Error> {
        let map: serde_json::Map<String, serde_json::Value> = vars
            .iter()
            .map(|(k, v)| (k.clone(), serde_json::Value::String(v.clone())))
            .collect();
        let answer = self
            .send(
                Method::POST,
                &["channels", ch, "variables"],
                &[],
                Some(serde_json::json!({ "variables": map })),
            )
            .await?;
        let unsupported = answer.status == StatusCode::METHOD_NOT_ALLOWED
            || (answer.status == StatusCode::NOT_FOUND && answer.message() == RESOURCE_NOT_FOUND);
        if unsupported {
            return Ok(false);
        }
        answer.empty(Target::Channel).map(|()| true)
    }

    /// `GET /channels/{ch}/variable?variable=…` (also dialplan functions such as
    /// `DIALPLAN_EXISTS(ctx,ext,1)`). An unset variable is `Ok(None)`; a missing channel is
    /// [`Error::ChannelGone`] (both are 404; the message tells them apart).
    pub async fn get_variable(&self, ch: &str, name: &str) -> Result<Option<String>, Error> {
        let answer = self
            .send(
                Method::GET,
                &["channels", ch, "variable"],
                &[("variable", name)],
                None,
            )
            .await?;
        if answer.status == StatusCode::NOT_FOUND
            && answer.message().contains("variable was not found")
        {
            return Ok(None);
        }
        answer
            .json::<Variable>(Target::Channel)
            .map(|v| Some(v.value))
    }

    /// `POST /channels/{ch}/continue`: leave Stasis for `context,extension,priority`. Asynchronous:
    /// `StasisEnd` follows. The target is not validated by Asterisk.
    pub async fn continue_in_dialplan(
        &self,
        ch: &str,
        context: &str,
        extension: &str,
        priority: u32,
    ) -> Result<(), Error> {
        let priority = priority.to_string();
        self.send(
            Method::POST,
            &["channels", ch, "continue"],
            &[
                ("context", context),
                ("extension", extension),
                ("priority", &priority),
            ],
            None,
        )
        .await?
        .empty(Target::Channel)
    }

    /// `DELETE /channels/{ch}?reason=…`. A channel that is already gone (404) counts as hung up.
    pub async fn hangup(&self, ch: &str, reason: Option<&str>) -> Result<(), Error> {
        let query: Vec<(&str, &str)> = reason.map(|r| ("reason", r)).into_iter().collect();
        let answer = self
            .send(Method::DELETE, &["channels", ch], &query, None)
            .await?;
        if answer.status == StatusCode::NOT_FOUND {
            return Ok(());
        }
        answer.empty(Target::Channel)
    }

    /// `GET /channels/{ch}`; `None` when it does not exist.
    pub async fn get_channel(&self, ch: &str) -> Result<Option<Channel>, Error> {
        let answer = self.send(Method::GET, &["channels", ch], &[], None).await?;
        if answer.status == StatusCode::NOT_FOUND {
            return Ok(None);
        }
        answer.json(Target::Channel).map(Some)
    }

    /// `GET /channels`: every channel in Asterisk, not only the application's.
    pub async fn list_channels(&self) -> Result<Vec<Channel>, Error> {
        self.send(Method::GET, &["channels"], &[], None)
            .await?
            .json(Target::Other)
    }

    /// `GET /applications/{app}`; `None` when the application does not exist.
    pub async fn get_application(&self, app: &str) -> Result<Option<Application>, Error> {
        let answer = self
            .send(Method::GET, &["applications", app], &[], None)
            .await?;
        if answer.status == StatusCode::NOT_FOUND {
            return Ok(None);
        }
        answer.json(Target::Other).map(Some)
    }

    /// `PUT /applications/{app}/eventFilter`: Asterisk stops sending the application events of the
    /// `disallowed` types (for every channel it has). The application must exist (be connected).
    pub async fn set_event_filter(&self, app: &str, disallowed: &[&str]) -> Result<(), Error> {
        let types: Vec<serde_json::Value> = disallowed
            .iter()
            .map(|t| serde_json::json!({ "type": t }))
            .collect();
        self.send(
            Method::PUT,
            &["applications", app, "eventFilter"],
            &[],
            Some(serde_json::json!({ "disallowed": types })),
        )
        .await?
        .empty(Target::Other)
    }

    /// `GET /asterisk/ping`: Asterisk is up and the credentials work.
    pub async fn ping(&self) -> Result<(), Error> {
        self.send(Method::GET, &["asterisk", "ping"], &[], None)
            .await?
            .empty(Target::Other)
    }

    /// `GET /asterisk/info`: the version and entity of this Asterisk (also proves the credentials).
    pub async fn info(&self) -> Result<AsteriskInfo, Error> {
        self.send(Method::GET, &["asterisk", "info"], &[], None)
            .await?
            .json(Target::Other)
    }

    /// `GET /sounds/{id}` (e.g. `callgate/enter-number`); `None` when Asterisk has no such sound in
    /// any language (404 `Sound not found`; any other 404, e.g. without `res_ari_sounds`, is an error).
    pub async fn sound(&self, id: &str) -> Result<Option<Sound>, Error> {
        let answer = self.send(Method::GET, &["sounds", id], &[], None).await?;
        if answer.status == StatusCode::NOT_FOUND && answer.message() == SOUND_NOT_FOUND {
            return Ok(None);
        }
        answer.json(Target::Other).map(Some)
    }

    /// `POST /channels/create?endpoint=…&app=…&channelId=…`: a channel in application `app`, in state
    /// `Down`, that is never dialled unless asked to (`POST /channels/{id}/dial`). For a `Local`
    /// endpoint no dialplan runs.
    pub async fn create_channel(
        &self,
        endpoint: &str,
        app: &str,
        channel_id: &str,
    ) -> Result<Channel, Error> {
        self.send(
            Method::POST,
            &["channels", "create"],
            &[
                ("endpoint", endpoint),
                ("app", app),
                ("channelId", channel_id),
            ],
            None,
        )
        .await?
        .json(Target::Other)
    }

    /// `POST /bridges/{id}?type=…&name={id}`; `types` e.g. `["mixing", "dtmf_events"]`.
    pub async fn create_bridge(&self, id: &str, types: &[&str]) -> Result<Bridge, Error> {
        let types = types.join(",");
        self.send(
            Method::POST,
            &["bridges", id],
            &[("type", &types), ("name", id)],
            None,
        )
        .await?
        .json(Target::Other)
    }

    /// `POST /bridges/{bridge}/addChannel`. Unknown channel (400) → [`Error::ChannelGone`]; channel
    /// not in Stasis (422) → [`Error::NotInStasis`]; unknown bridge → [`Error::NotFound`].
    pub async fn add_channel(
        &self,
        bridge: &str,
        ch: &str,
        absorb_dtmf: bool,
        mute: bool,
    ) -> Result<(), Error> {
        let mut query = vec![("channel", ch)];
        if absorb_dtmf {
            query.push(("absorbDTMF", "true"));
        }
        if mute {
            query.push(("mute", "true"));
        }
        let answer = self
            .send(
                Method::POST,
                &["bridges", bridge, "addChannel"],
                &query,
                None,
            )
            .await?;
        match answer.status.as_u16() {
            400 => Err(Error::ChannelGone),
            422 => Err(Error::NotInStasis),
            _ => answer.empty(Target::Other),
        }
    }

    /// `POST /bridges/{bridge}/removeChannel`. Unknown channel (400) → [`Error::ChannelGone`];
    /// channel not in this bridge → [`Error::Unprocessable`].
    pub async fn remove_channel(&self, bridge: &str, ch: &str) -> Result<(), Error> {
        let answer = self
            .send(
                Method::POST,
                &["bridges", bridge, "removeChannel"],
                &[("channel", ch)],
                None,
            )
            .await?;
        if answer.status == StatusCode::BAD_REQUEST {
            return Err(Error::ChannelGone);
        }
        answer.empty(Target::Other)
    }

    /// `DELETE /bridges/{bridge}`. Idempotent: 404 (gone) and 409 (teardown in progress) are `Ok`.
    pub async fn destroy_bridge(&self, bridge: &str) -> Result<(), Error> {
        let answer = self
            .send(Method::DELETE, &["bridges", bridge], &[], None)
            .await?;
        if matches!(answer.status.as_u16(), 404 | 409) {
            return Ok(());
        }
        answer.empty(Target::Other)
    }

    /// `POST /channels/{channel_id}?endpoint=…&app=<our app>&appArgs=…`: a new channel that enters
    /// our application when answered (`StasisStart` with `args` = `app_args`). A taken channel id
    /// (409) is reported as [`Error::BadRequest`], not as [`Error::NotInStasis`].
    pub async fn originate(&self, o: &Originate) -> Result<Channel, Error> {
        let app_args = o.app_args.join(",");
        let timeout = o.timeout_secs.map(|t| t.to_string());
        let mut query = vec![
            ("endpoint", o.endpoint.as_str()),
            ("app", self.app.as_str()),
        ];
        if !app_args.is_empty() {
            query.push(("appArgs", &app_args));
        }
        if let Some(other) = &o.other_channel_id {
            query.push(("otherChannelId", other));
        }
        if let Some(caller_id) = &o.caller_id {
            query.push(("callerId", caller_id));
        }
        if let Some(originator) = &o.originator {
            query.push(("originator", originator));
        }
        if let Some(timeout) = &timeout {
            query.push(("timeout", timeout));
        }
        let body =
            (!o.variables.is_empty()).then(|| serde_json::json!({ "variables": o.variables }));
        let answer = self
            .send(Method::POST, &["channels", &o.channel_id], &query, body)
            .await?;
        if answer.status == StatusCode::CONFLICT {
            return Err(Error::BadRequest(answer.message()));
        }
        answer.json(Target::Other)
    }
}
