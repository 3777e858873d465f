//! The agent/CRM API under `/v1` on `server.listen`: calls in progress, starting and cancelling
//! checks on them, verifications by id, and the live stream (Server-Sent Events).
//!
//! The API reads `calls::Live` and reaches a call task only through `Registry::send`
//! (`CallEvent::StartCheck` / `CancelCheck`, each answered on a oneshot); it never changes call state
//! itself.
//!
//! Invariants: every route but the OpenAPI document needs a bearer token (`auth`); agents see and act
//! on their own calls only; a personal number arrives only in a POST body, is never logged or echoed,
//! and leaves this module only as a `TypedNumber` inside the request to the call; every call and
//! verification is rendered by `render`; every REST answer that shows identity fields is recorded
//! in the audit trail (who, which verification, which field names); the routes and the OpenAPI document are checked against
//! each other by a test.

pub mod auth;
pub mod openapi;
pub mod render;
pub mod stream;

#[cfg(test)]
mod tests;

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, PathRejection};
use axum::extract::{DefaultBodyLimit, MatchedPath, Path, Query, State};
use axum::http::{header, HeaderValue, Method, Request, StatusCode, Uri};
use axum::response::sse::{KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post, MethodRouter};
use axum::{Json, Router};
use serde_json::{json, Value};
use tokio::sync::oneshot;
use tokio_util::sync::CancellationToken;

use self::auth::{Auth, Principal, Tokens};
use self::stream::{Feed, Scope};
use super::ops::Readiness;
use super::widget::{self, Embedding};
use super::ApiError;
use crate::audit::{Audit, Event};
use crate::calls::live::{
    CallView, CancelRequest, CheckRequest, Refusal, TypedNumber, VerificationView,
};
use crate::calls::{CallEvent, Live, Registry};
use crate::config::Role;
use crate::state::{wire, Shared};

/// Longest accepted typed number, in characters (a personal number with separators fits easily).
const MAX_NUMBER_LEN: usize = 32;

/// Bounds and timings of the API.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Largest accepted request body, in bytes.
    pub max_body: usize,
    /// How long a start or cancel waits for the call's answer before 503.
    pub answer_timeout: Duration,
    /// Interval of keep-alive comments on the live stream.
    pub keep_alive: Duration,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            max_body: 16 * 1024,
            answer_timeout: Duration::from_secs(5),
            keep_alive: Duration::from_secs(15),
        }
    }
}

/// What the handlers share.
#[derive(Clone)]
pub struct AgentState {
    pub live: Arc<Live>,
    pub registry: Registry,
    pub tokens: Arc<Tokens>,
    pub limits: Limits,
    /// New checks are refused (503) while draining.
    pub readiness: Arc<Readiness>,
    /// Ends every live stream (the server stops).
    pub stop: CancellationToken,
    /// Where reads of identity fields are recorded.
    pub audit: Option<Audit>,
    /// With several instances: the shared state, through which requests for other instances'
    /// calls are forwarded and older verifications read.
    pub shared: Option<Arc<Shared>>,
}

impl AgentState {
    /// Records that `who` read identity fields of a verification (their names, never the values).
    fn viewed(&self, who: &Principal, v: &VerificationView) {
        let Some(audit) = &self.audit else { return };
        let fields = render::identity_fields(v);
        if fields.is_empty() {
            return;
        }
        audit.note(Event::IdentityViewed {
            reference: v.id.clone(),
            call_id: v.call_id.clone(),
            by: who.started_by().to_string(),
            fields,
        });
    }
}

/// Every route: method, path (as in the OpenAPI document), handler. The router is built from this
/// table and a test checks it against the document.
pub fn routes() -> Vec<(Method, &'static str, MethodRouter<AgentState>)> {
    vec![
        (Method::GET, "/v1/calls", get(list_calls)),
        (Method::GET, "/v1/calls/{id}", get(get_call)),
        (
            Method::POST,
            "/v1/calls/{id}/verifications",
            post(start_verification),
        ),
        (
            Method::DELETE,
            "/v1/calls/{id}/verification",
            delete(cancel_verification),
        ),
        (Method::GET, "/v1/calls/{id}/events", get(call_events)),
        (Method::GET, "/v1/events", get(events)),
        (Method::GET, "/v1/verifications/{id}", get(get_verification)),
        (Method::GET, "/v1/openapi.json", get(openapi_document)),
    ]
}

/// The agent API with its body limit, JSON fallbacks, CORS for the configured origins, the widget's
/// routes beside it (`api::widget`, not part of `/v1`) and request tracing (method, matched route and
/// token name; never a URI, header or body).
pub fn router(state: AgentState, embedding: &Embedding) -> Router {
    let max_body = state.limits.max_body;
    let mut v1 = Router::new();
    for (_, path, method_router) in routes() {
        v1 = v1.route(path, method_router);
    }
    let mut v1 = v1
        .fallback(|| async { ApiError::NoRoute })
        .method_not_allowed_fallback(|| async { ApiError::MethodNotAllowed })
        .layer(DefaultBodyLimit::max(max_body));
    if let Some(cors) = embedding.cors() {
        v1 = v1.layer(cors);
    }
    v1.with_state(state).merge(widget::router(embedding)).layer(
        tower_http::trace::TraceLayer::new_for_http()
            .make_span_with(|req: &Request<_>| {
                let route = req
                    .extensions()
                    .get::<MatchedPath>()
                    .map_or("-", MatchedPath::as_str);
                tracing::debug_span!(
                    "api",
                    method = %req.method(),
                    route,
                    token = tracing::field::Empty,
                )
            })
            .on_failure(tower_http::trace::DefaultOnFailure::new().level(tracing::Level::DEBUG)),
    )
}

#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct QueueFilter {
    queue: Option<String>,
}

/// The optional `?queue=` of list routes; any other parameter is refused (its value is not echoed).
fn queue_filter(uri: &Uri) -> Result<Option<String>, ApiError> {
    Query::<QueueFilter>::try_from_uri(uri)
        .map(|q| q.0.queue)
        .map_err(|_| ApiError::Invalid("the only query parameter here is \"queue\"".into()))
}

/// Routes without query parameters refuse any, so nothing that belongs in a body is taken from a URL.
fn no_query(uri: &Uri) -> Result<(), ApiError> {
    match uri.query() {
        None | Some("") => Ok(()),
        Some(_) => Err(ApiError::Invalid(
            "this route takes no query parameters".into(),
        )),
    }
}

fn path_id(path: Result<Path<String>, PathRejection>) -> Result<String, ApiError> {
    path.map(|p| p.0)
        .map_err(|_| ApiError::Invalid("the id in the path is not valid".into()))
}

/// A live call the principal may see: 404 when unknown, 403 when it is another agent's.
fn visible_call(s: &AgentState, who: &Principal, id: &str) -> Result<CallView, ApiError> {
    let call = s
        .live
        .call(id)
        .ok_or_else(|| ApiError::NotFound("no call in progress with this id".into()))?;
    if who.sees(&call) {
        Ok(call)
    } else {
        Err(ApiError::Forbidden("this call is not yours".into()))
    }
}

async fn list_calls(
    State(s): State<AgentState>,
    Auth(who): Auth,
    uri: Uri,
) -> Result<Json<Value>, ApiError> {
    let queue = queue_filter(&uri)?;
    let calls: Vec<Value> = s
        .live
        .calls()
        .iter()
        .filter(|c| who.sees(c) && queue.as_ref().is_none_or(|q| q == &c.queue))
        .map(|c| {
            if let Some(v) = &c.verification {
                s.viewed(&who, v);
            }
            render::call(c)
        })
        .collect();
    Ok(Json(json!({ "calls": calls })))
}

async fn get_call(
    State(s): State<AgentState>,
    Auth(who): Auth,
    path: Result<Path<String>, PathRejection>,
    uri: Uri,
) -> Result<Json<Value>, ApiError> {
    no_query(&uri)?;
    let call = visible_call(&s, &who, &path_id(path)?)?;
    if let Some(v) = &call.verification {
        s.viewed(&who, v);
    }
    Ok(Json(render::call(&call)))
}

/// How the start request says where the number comes from.
#[derive(Debug, PartialEq, Eq)]
enum Source {
    Keypad,
    Typed(TypedNumber),
}

/// Reads `{"collect": "keypad"}` or `{"number": "<digits>"}`. Messages never quote the body.
fn start_body(body: &[u8]) -> Result<Source, ApiError> {
    let invalid = |m: &str| ApiError::Invalid(m.to_owned());
    let shape = "the body must be {\"collect\": \"keypad\"} or {\"number\": \"<personal number>\"}";
    let value: Value = serde_json::from_slice(body).map_err(|_| invalid(shape))?;
    let Value::Object(mut map) = value else {
        return Err(invalid(shape));
    };
    if map.keys().any(|k| k != "collect" && k != "number") || map.len() != 1 {
        return Err(invalid(shape));
    }
    match (map.remove("collect"), map.remove("number")) {
        (Some(Value::String(c)), None) if c == "keypad" => Ok(Source::Keypad),
        (None, Some(Value::String(n))) => {
            if n.is_empty() || n.chars().count() > MAX_NUMBER_LEN {
                Err(invalid("\"number\" must be a personal number"))
            } else {
                Ok(Source::Typed(TypedNumber(n)))
            }
        }
        _ => Err(invalid(shape)),
    }
}

/// Sends a start or cancel to the instance owning a call another instance owns; `None` when the
/// call is this process's own.
async fn forward(
    s: &AgentState,
    call: &CallView,
    by: crate::calls::live::StartedBy,
    op: wire::Op,
) -> Option<Result<String, ApiError>> {
    let shared = s.shared.as_ref()?;
    if s.live.is_local(call) {
        return None;
    }
    let owner = call.owner.as_ref()?;
    if owner.lost {
        return Some(Err(ApiError::Refused(Refusal::OwnerUnreachable)));
    }
    Some(
        shared
            .forward(&owner.instance, &call.call_id, by, op)
            .await
            .map_err(ApiError::Refused),
    )
}

/// Delivers a request to a call task and waits (bounded) for its answer.
async fn ask(
    s: &AgentState,
    call_id: &str,
    event: CallEvent,
    reply: oneshot::Receiver<Result<String, Refusal>>,
) -> Result<String, ApiError> {
    s.registry
        .ask(call_id, event, reply, s.limits.answer_timeout)
        .await
        .map_err(ApiError::Refused)
}

fn accepted(verification_id: &str, call_id: &str, status: &str) -> Response {
    let location = render::verification_link(verification_id);
    let body = json!({
        "verification_id": verification_id,
        "call_id": call_id,
        "status": status,
        "links": {
            "verification": location,
            "call": render::call_link(call_id),
            "events": format!("/v1/calls/{call_id}/events"),
        },
    });
    let mut response = (StatusCode::ACCEPTED, Json(body)).into_response();
    if let Ok(v) = HeaderValue::from_str(&location) {
        response.headers_mut().insert(header::LOCATION, v);
    }
    response
}

fn may_verify(who: &Principal) -> Result<(), ApiError> {
    if who.may_verify() {
        Ok(())
    } else {
        Err(ApiError::Forbidden(format!(
            "role {} may not start or cancel verifications",
            who.role.code()
        )))
    }
}

async fn start_verification(
    State(s): State<AgentState>,
    Auth(who): Auth,
    path: Result<Path<String>, PathRejection>,
    uri: Uri,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    may_verify(&who)?;
    no_query(&uri)?;
    let call = visible_call(&s, &who, &path_id(path)?)?;
    let body = body.map_err(|e| {
        if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::TooLarge(s.limits.max_body)
        } else {
            ApiError::BadRequest("the request body could not be read".into())
        }
    })?;
    let source = start_body(&body)?;
    drop(body);
    if s.readiness.draining.load(Ordering::SeqCst) {
        return Err(ApiError::Unavailable("draining".into()));
    }
    let method = match &source {
        Source::Keypad => "keypad",
        Source::Typed(_) => "agent_typed",
    };
    let number = match source {
        Source::Keypad => None,
        Source::Typed(n) => Some(n),
    };
    let op = wire::Op::Start {
        number: number.clone(),
    };
    let id = match forward(&s, &call, who.started_by(), op).await {
        Some(answer) => answer?,
        None => {
            let (tx, rx) = oneshot::channel();
            let request = CheckRequest {
                by: who.started_by(),
                number,
                reply: tx,
            };
            ask(&s, &call.call_id, CallEvent::StartCheck(request), rx).await?
        }
    };
    tracing::info!(call.id = %call.call_id, verification = %id, method, "verification started through the api");
    Ok(accepted(&id, &call.call_id, "in_progress"))
}

async fn cancel_verification(
    State(s): State<AgentState>,
    Auth(who): Auth,
    path: Result<Path<String>, PathRejection>,
    uri: Uri,
) -> Result<Response, ApiError> {
    may_verify(&who)?;
    no_query(&uri)?;
    let call = visible_call(&s, &who, &path_id(path)?)?;
    let id = match forward(&s, &call, who.started_by(), wire::Op::Cancel).await {
        Some(answer) => answer?,
        None => {
            let (tx, rx) = oneshot::channel();
            let request = CancelRequest {
                by: who.started_by(),
                reply: tx,
            };
            ask(&s, &call.call_id, CallEvent::CancelCheck(request), rx).await?
        }
    };
    tracing::info!(call.id = %call.call_id, verification = %id, "verification cancelled through the api");
    Ok(accepted(&id, &call.call_id, "cancelling"))
}

async fn get_verification(
    State(s): State<AgentState>,
    Auth(who): Auth,
    path: Result<Path<String>, PathRejection>,
    uri: Uri,
) -> Result<Json<Value>, ApiError> {
    no_query(&uri)?;
    let id = path_id(path)?;
    let known = match s.live.verification_with_agent(&id) {
        Some(found) => Some(found),
        // Several instances: one that ended before this instance knew it is read from Redis.
        None => match &s.shared {
            Some(shared) => crate::state::replica::read_verification(shared, &id)
                .await
                .map_err(|_| ApiError::Unavailable("the shared state cannot be read".into()))?,
            None => None,
        },
    };
    let (view, agent) =
        known.ok_or_else(|| ApiError::NotFound("no verification with this id".into()))?;
    if who.role == Role::Agent && !who.owns(agent.as_deref()) {
        return Err(ApiError::Forbidden(
            "this verification is of a call that was not yours".into(),
        ));
    }
    s.viewed(&who, &view);
    Ok(Json(render::verification(&view)))
}

fn sse(s: &AgentState, feed: Feed) -> Response {
    Sse::new(feed.into_stream())
        .keep_alive(KeepAlive::new().interval(s.limits.keep_alive))
        .into_response()
}

async fn call_events(
    State(s): State<AgentState>,
    Auth(who): Auth,
    path: Result<Path<String>, PathRejection>,
    uri: Uri,
) -> Result<Response, ApiError> {
    no_query(&uri)?;
    let id = path_id(path)?;
    // Subscribe before reading the state, so nothing falls between.
    let rx = s.live.subscribe();
    let call = visible_call(&s, &who, &id)?;
    let scope = Scope::Call(call.call_id);
    let feed = Feed::new(
        rx,
        scope,
        who,
        Arc::clone(&s.live),
        s.stop.clone(),
        s.audit.clone(),
    );
    Ok(sse(&s, feed))
}

async fn events(
    State(s): State<AgentState>,
    Auth(who): Auth,
    uri: Uri,
) -> Result<Response, ApiError> {
    let queue = queue_filter(&uri)?;
    let rx = s.live.subscribe();
    let feed = Feed::new(
        rx,
        Scope::All { queue },
        who,
        Arc::clone(&s.live),
        s.stop.clone(),
        s.audit.clone(),
    );
    Ok(sse(&s, feed))
}

async fn openapi_document() -> Json<Value> {
    Json(openapi::document())
}
