//! The simulator's HTTP side: an accept loop (plain or mutual TLS), one hyper HTTP/1.1 connection task
//! per client, and the BankID RP v6 endpoints over a shared order table.
//!
//! Invariants: the order-table lock is never held across an `.await`; at most one live order exists per
//! personal number; every order either ends (complete / failed / cancelled / expired) or is dropped when
//! the simulator shuts down; nothing here logs a personal number or a body.

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use base64::Engine as _;
use bytes::Bytes;
use http_body_util::{BodyExt as _, Full, Limited};
use hyper::body::Incoming;
use hyper::header::{HeaderValue, CONTENT_TYPE};
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde::Serialize;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use super::scenario::{
    is_valid_number, name_for, other_person, Phase, Scenario, RATE_LIMIT_RESET_SECS, SLOW_DELAY,
};
use crate::idp::bankid::wire::{
    CancelResponse, CollectResponse, CompletionData, Device, ErrorBody, ErrorCode, HintCode,
    OrderRefRequest, PhoneAuthRequest, PhoneAuthResponse, Status, User,
};
use crate::idp::bankid::MAX_VISIBLE_DATA_B64;

/// The path prefix of every endpoint.
pub(crate) const BASE_PATH: &str = "/rp/v6.0/";
/// Request bodies larger than this are refused.
const MAX_REQUEST_BYTES: usize = 64 * 1024;
/// An open order not collected for this many steps expires; an ended one is forgotten after as many.
const IDLE_STEPS: u32 = 30;

/// The simulator's clock.
#[allow(clippy::disallowed_methods)] // the simulator is an adapter: order lifetimes are wall-clock based
pub(crate) fn now() -> Instant {
    Instant::now()
}

struct SimOrder {
    number: String,
    scenario: Scenario,
    script: Vec<Phase>,
    /// Index into `script` of the current phase.
    idx: usize,
    /// When the current phase was entered.
    entered: Instant,
    /// Whether a collect has reported the current phase.
    seen: bool,
    last_activity: Instant,
    /// The final answer once the order has ended, and when it ended.
    end: Option<(CollectResponse, Instant)>,
}

/// The simulator's order figures: open orders, `phone/auth` and `cancel` requests received.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct OrderCounts {
    pub open: usize,
    pub starts: usize,
    pub cancels: usize,
}

#[derive(Default)]
pub(crate) struct State {
    orders: HashMap<String, SimOrder>,
    pub(crate) starts: usize,
    pub(crate) cancels: usize,
    pub(crate) collect_times: HashMap<String, Vec<Instant>>,
}

impl State {
    fn open_orders(&self) -> usize {
        self.orders.values().filter(|o| o.end.is_none()).count()
    }
}

/// State shared by the accept loop, connections, reapers and the `Simulator` handle.
pub(crate) struct Shared {
    pub(crate) step: Duration,
    state: Mutex<State>,
    pub(crate) open: watch::Sender<usize>,
    /// Open orders and requests received so far, republished after every change.
    pub(crate) counts: watch::Sender<OrderCounts>,
    pub(crate) shutdown: CancellationToken,
}

impl Shared {
    pub(crate) fn new(step: Duration, shutdown: CancellationToken) -> Shared {
        Shared {
            step,
            state: Mutex::new(State::default()),
            open: watch::Sender::new(0),
            counts: watch::Sender::new(OrderCounts::default()),
            shutdown,
        }
    }

    pub(crate) fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn idle(&self) -> Duration {
        self.step * IDLE_STEPS
    }

    /// Publishes the open-order count (call after every change, without holding the lock).
    fn publish(&self) {
        let (open, counts) = {
            let state = self.lock();
            let open = state.open_orders();
            let counts = OrderCounts {
                open,
                starts: state.starts,
                cancels: state.cancels,
            };
            (open, counts)
        };
        self.counts.send_if_modified(|v| {
            let changed = *v != counts;
            *v = counts;
            changed
        });
        self.open.send_if_modified(|v| {
            let changed = *v != open;
            *v = open;
            changed
        });
    }
}

/// Accepts connections until shutdown; `tls` makes every connection mutual TLS.
pub(crate) async fn serve(listener: TcpListener, tls: Option<TlsAcceptor>, shared: Arc<Shared>) {
    loop {
        let accepted = tokio::select! {
            r = listener.accept() => r,
            () = shared.shutdown.cancelled() => return,
        };
        let stream = match accepted {
            Ok((stream, _peer)) => stream,
            Err(e) => {
                warn!(error = %e, "bankid simulator accept failed");
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        let shared = shared.clone();
        let tls = tls.clone();
        tokio::spawn(async move {
            let token = shared.shutdown.clone();
            match tls {
                Some(acceptor) => {
                    let handshake = tokio::select! {
                        r = acceptor.accept(stream) => r,
                        () = token.cancelled() => return,
                    };
                    match handshake {
                        Ok(stream) => serve_connection(TokioIo::new(stream), shared).await,
                        Err(e) => debug!(error = %e, "bankid simulator tls handshake refused"),
                    }
                }
                None => serve_connection(TokioIo::new(stream), shared).await,
            }
        });
    }
}

async fn serve_connection<I>(io: I, shared: Arc<Shared>)
where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let token = shared.shutdown.clone();
    let service = service_fn(move |req| handle(shared.clone(), req));
    let conn = hyper::server::conn::http1::Builder::new().serve_connection(io, service);
    tokio::select! {
        r = conn => if let Err(e) = r { debug!(error = %e, "bankid simulator connection ended") },
        () = token.cancelled() => {}
    }
}

fn respond(status: StatusCode, body: &impl Serialize) -> Response<Full<Bytes>> {
    let bytes = serde_json::to_vec(body).unwrap_or_default();
    let mut response = Response::new(Full::new(Bytes::from(bytes)));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    response
}

fn error(status: StatusCode, code: ErrorCode, details: &str) -> Response<Full<Bytes>> {
    debug!(status = status.as_u16(), error_code = %code, "bankid simulator error answer");
    respond(
        status,
        &ErrorBody {
            error_code: code,
            details: details.to_owned(),
        },
    )
}

fn invalid(details: &str) -> Response<Full<Bytes>> {
    error(
        StatusCode::BAD_REQUEST,
        ErrorCode::InvalidParameters,
        details,
    )
}

async fn handle(
    shared: Arc<Shared>,
    req: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    if req.method() != Method::POST {
        return Ok(error(
            StatusCode::METHOD_NOT_ALLOWED,
            ErrorCode::MethodNotAllowed,
            "Only POST is supported.",
        ));
    }
    let json = HeaderValue::from_static("application/json");
    if req.headers().get(CONTENT_TYPE) != Some(&json) {
        return Ok(error(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            ErrorCode::UnsupportedMediaType,
            "Content-Type must be exactly application/json.",
        ));
    }
    let path = req.uri().path().to_owned();
    let Some(endpoint) = path.strip_prefix(BASE_PATH).map(str::to_owned) else {
        return Ok(error(
            StatusCode::NOT_FOUND,
            ErrorCode::NotFound,
            "No such endpoint.",
        ));
    };
    let body = match Limited::new(req.into_body(), MAX_REQUEST_BYTES)
        .collect()
        .await
    {
        Ok(collected) => collected.to_bytes(),
        Err(_) => return Ok(invalid("Unreadable body.")),
    };
    let response = match endpoint.as_str() {
        "phone/auth" => phone_auth(&shared, &body).await,
        "collect" => collect(&shared, &body),
        "cancel" => cancel(&shared, &body),
        _ => error(
            StatusCode::NOT_FOUND,
            ErrorCode::NotFound,
            "No such endpoint.",
        ),
    };
    shared.publish();
    Ok(response)
}

fn visible_data_ok(request: &PhoneAuthRequest) -> bool {
    match &request.user_visible_data {
        None => true,
        Some(data) => {
            (1..=MAX_VISIBLE_DATA_B64).contains(&data.len())
                && base64::engine::general_purpose::STANDARD
                    .decode(data)
                    .is_ok_and(|text| String::from_utf8(text).is_ok())
        }
    }
}

async fn phone_auth(shared: &Arc<Shared>, body: &[u8]) -> Response<Full<Bytes>> {
    shared.lock().starts += 1;
    let Ok(request) = serde_json::from_slice::<PhoneAuthRequest>(body) else {
        return invalid("Malformed phone/auth request.");
    };
    if !is_valid_number(&request.personal_number) {
        return invalid("Invalid personalNumber.");
    }
    if !visible_data_ok(&request) {
        return invalid("Invalid userVisibleData.");
    }
    let scenario = Scenario::of_number(&request.personal_number).unwrap_or(Scenario::Approve);
    let script = match (scenario, scenario.script()) {
        (Scenario::AlreadyInProgress, _) => {
            return error(
                StatusCode::BAD_REQUEST,
                ErrorCode::AlreadyInProgress,
                "An order for this person is already in progress.",
            )
        }
        (Scenario::Maintenance, _) => {
            return error(
                StatusCode::SERVICE_UNAVAILABLE,
                ErrorCode::Maintenance,
                "Simulated maintenance.",
            )
        }
        (Scenario::RateLimited, _) => {
            let mut response = error(
                StatusCode::TOO_MANY_REQUESTS,
                ErrorCode::TooManyRequests,
                "Too many requests.",
            );
            let headers = response.headers_mut();
            headers.insert("RateLimit-Limit", HeaderValue::from_static("10"));
            headers.insert("RateLimit-Remaining", HeaderValue::from_static("0"));
            headers.insert("RateLimit-Reset", HeaderValue::from(RATE_LIMIT_RESET_SECS));
            return response;
        }
        (_, Some(script)) => script,
        (_, None) => {
            return error(
                StatusCode::INTERNAL_SERVER_ERROR,
                ErrorCode::InternalError,
                "Simulated internal error.",
            )
        }
    };
    let order_ref = uuid::Uuid::new_v4().to_string();
    {
        let mut state = shared.lock();
        let now = now();
        let live = state
            .orders
            .iter_mut()
            .find(|(_, o)| o.end.is_none() && o.number == request.personal_number);
        if let Some((live_ref, live)) = live {
            // BankID: the earlier order is aborted and no new one is created.
            let answer = failed(live_ref, HintCode::Cancelled);
            live.end = Some((answer, now));
            debug!(order_ref = %live_ref, "bankid simulator cancelled the earlier order of the same person");
            return error(
                StatusCode::BAD_REQUEST,
                ErrorCode::AlreadyInProgress,
                "An order for this person is already in progress.",
            );
        }
        state.orders.insert(
            order_ref.clone(),
            SimOrder {
                number: request.personal_number,
                scenario,
                script,
                idx: 0,
                entered: now,
                seen: false,
                last_activity: now,
                end: None,
            },
        );
    }
    tokio::spawn(reap(shared.clone(), order_ref.clone()));
    debug!(order_ref = %order_ref, "bankid simulator order started");
    if scenario == Scenario::Slow {
        shared.publish();
        tokio::select! {
            () = tokio::time::sleep(SLOW_DELAY) => {}
            () = shared.shutdown.cancelled() => {
                return error(StatusCode::SERVICE_UNAVAILABLE, ErrorCode::Maintenance, "Shutting down.");
            }
        }
    }
    respond(StatusCode::OK, &PhoneAuthResponse { order_ref })
}

fn failed(order_ref: &str, hint: HintCode) -> CollectResponse {
    CollectResponse {
        order_ref: order_ref.to_owned(),
        status: Status::Failed,
        hint_code: Some(hint),
        completion_data: None,
    }
}

fn completion(order_ref: &str, order: &SimOrder) -> CompletionData {
    let number = if order.scenario == Scenario::WrongPerson {
        other_person(&order.number)
    } else {
        order.number.clone()
    };
    let (given, surname) = name_for(&number);
    let b64 = |s: String| base64::engine::general_purpose::STANDARD.encode(s);
    CompletionData {
        user: User {
            name: Some(format!("{given} {surname}")),
            given_name: Some(given.to_owned()),
            surname: Some(surname.to_owned()),
            personal_number: number,
        },
        device: Some(Device {
            ip_address: Some("127.0.0.1".into()),
            uhi: Some(format!("sim-{}", &order_ref[..8.min(order_ref.len())])),
        }),
        bank_id_issue_date: Some("2020-01-01".into()),
        step_up: None,
        signature: b64(format!(
            "<Signature>simulated for order {order_ref}</Signature>"
        )),
        ocsp_response: b64(format!("simulated OCSP response for order {order_ref}")),
        risk: None,
    }
}

fn collect(shared: &Shared, body: &[u8]) -> Response<Full<Bytes>> {
    let Ok(request) = serde_json::from_slice::<OrderRefRequest>(body) else {
        return invalid("Malformed collect request.");
    };
    let step = shared.step;
    let mut state = shared.lock();
    let now = now();
    state
        .collect_times
        .entry(request.order_ref.clone())
        .or_default()
        .push(now);
    let Some(order) = state.orders.get_mut(&request.order_ref) else {
        return invalid("No such order.");
    };
    if let Some((answer, _)) = &order.end {
        return respond(StatusCode::OK, answer);
    }
    order.last_activity = now;
    if let Some(Phase::Pending(_, steps)) = order.script.get(order.idx) {
        if order.seen && now.duration_since(order.entered) >= step * *steps {
            order.idx += 1;
            order.entered = now;
            order.seen = false;
        }
    }
    order.seen = true;
    let order_ref = request.order_ref;
    let answer = match order.script.get(order.idx).cloned() {
        Some(Phase::Pending(hint, _)) => CollectResponse {
            order_ref: order_ref.clone(),
            status: Status::Pending,
            hint_code: Some(hint),
            completion_data: None,
        },
        Some(Phase::Failed(hint)) => failed(&order_ref, hint),
        Some(Phase::Complete) | None => CollectResponse {
            completion_data: Some(completion(&order_ref, order)),
            order_ref: order_ref.clone(),
            status: Status::Complete,
            hint_code: None,
        },
    };
    if answer.status != Status::Pending {
        order.end = Some((answer.clone(), now));
    }
    debug!(
        order_ref = %order_ref,
        collect_status = ?answer.status,
        hint_code = answer.hint_code.as_ref().map(HintCode::as_str),
        "bankid simulator collect"
    );
    respond(StatusCode::OK, &answer)
}

fn cancel(shared: &Shared, body: &[u8]) -> Response<Full<Bytes>> {
    let Ok(request) = serde_json::from_slice::<OrderRefRequest>(body) else {
        return invalid("Malformed cancel request.");
    };
    let mut state = shared.lock();
    state.cancels += 1;
    let now = now();
    match state.orders.get_mut(&request.order_ref) {
        Some(order) if order.end.is_none() => {
            order.end = Some((failed(&request.order_ref, HintCode::Cancelled), now));
            debug!(order_ref = %request.order_ref, "bankid simulator order cancelled");
            respond(StatusCode::OK, &CancelResponse {})
        }
        _ => invalid("No such live order."),
    }
}

/// Expires an order that is not collected for [`IDLE_STEPS`] steps, and forgets it as many steps after
/// it ended.
async fn reap(shared: Arc<Shared>, order_ref: String) {
    loop {
        let deadline = {
            let state = shared.lock();
            match state.orders.get(&order_ref) {
                None => return,
                Some(order) => match &order.end {
                    None => order.last_activity + shared.idle(),
                    Some((_, ended)) => *ended + shared.idle(),
                },
            }
        };
        tokio::select! {
            () = tokio::time::sleep_until(deadline) => {}
            () = shared.shutdown.cancelled() => return,
        }
        let forgotten = {
            let mut state = shared.lock();
            let now = now();
            let idle = shared.idle();
            let Some(order) = state.orders.get_mut(&order_ref) else {
                return;
            };
            match &order.end {
                None if now >= order.last_activity + idle => {
                    order.end = Some((failed(&order_ref, HintCode::ExpiredTransaction), now));
                    debug!(order_ref = %order_ref, "bankid simulator order expired uncollected");
                    false
                }
                Some((_, ended)) if now >= *ended + idle => {
                    state.orders.remove(&order_ref);
                    true
                }
                _ => false,
            }
        };
        shared.publish();
        if forgotten {
            return;
        }
    }
}
