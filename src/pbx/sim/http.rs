//! The fake Asterisk's HTTP surface: `/ari/events` (websocket) and the REST subset, on one port.
//!
//! Invariant: every REST answer is `(status, {"message": …})` or a JSON body exactly as Asterisk
//! shapes it; each exchange is appended to the REST log (method, path, status — no query values).

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::extract::{Query, State};
use axum::http::{header, HeaderMap, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use base64::Engine as _;
use serde_json::json;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::model::{error, timestamp, OriginateReq, Reply, Shared, WsOut, NO_CHANNEL, NO_PLAYBACK};
use super::{Origination, Party, RestEntry};

type Params = HashMap<String, String>;

pub(super) fn router(shared: Arc<Shared>, stop: CancellationToken) -> Router {
    Router::new()
        .route("/ari/events", get(events))
        .fallback(rest)
        .with_state((shared, stop))
}

fn authorized(shared: &Shared, headers: &HeaderMap, params: &Params) -> bool {
    let opts = &shared.opts;
    if opts.username.is_empty() {
        return true;
    }
    let expected = format!("{}:{}", opts.username, opts.password);
    let basic = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Basic "))
        .and_then(|b| base64::engine::general_purpose::STANDARD.decode(b).ok());
    match basic {
        Some(decoded) => decoded == expected.as_bytes(),
        None => params.get("api_key") == Some(&expected),
    }
}

fn reply((status, body): Reply) -> Response {
    let status = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    match body {
        Some(body) => (status, Json(body)).into_response(),
        None => status.into_response(),
    }
}

async fn events(
    State((shared, stop)): State<(Arc<Shared>, CancellationToken)>,
    headers: HeaderMap,
    Query(params): Query<Params>,
    ws: WebSocketUpgrade,
) -> Response {
    if !authorized(&shared, &headers, &params) {
        return reply(error(401, "Authentication required"));
    }
    if !shared.read(|st| st.accepting) {
        return reply(error(503, "Service Unavailable"));
    }
    let Some(app) = params.get("app").filter(|a| !a.is_empty()).cloned() else {
        return reply(error(400, "Missing parameter app"));
    };
    ws.on_upgrade(move |socket| serve_socket(shared, stop, socket, app))
}

async fn serve_socket(
    shared: Arc<Shared>,
    stop: CancellationToken,
    mut socket: WebSocket,
    app: String,
) {
    let (tx, mut rx) = mpsc::unbounded_channel();
    let id = if app == shared.opts.app {
        shared.with(|ctx| ctx.connect_socket(tx))
    } else {
        shared.with(|ctx| ctx.connect_other_socket(&app, tx))
    };
    loop {
        tokio::select! {
            _ = stop.cancelled() => break,
            out = rx.recv() => match out {
                Some(WsOut::Text(text)) => {
                    if socket.send(Message::Text(text.into())).await.is_err() {
                        break;
                    }
                }
                Some(WsOut::Close) | None => {
                    let _ = socket.send(Message::Close(None)).await;
                    break;
                }
                Some(WsOut::Stall) => {
                    shared.with(|ctx| ctx.socket_closed(id));
                    stop.cancelled().await;
                    break;
                }
            },
            incoming = socket.recv() => match incoming {
                None | Some(Err(_)) | Some(Ok(Message::Close(_))) => break,
                Some(Ok(Message::Ping(_))) => shared.with(|ctx| ctx.st.pings += 1),
                Some(Ok(_)) => {}
            },
        }
    }
    shared.with(|ctx| ctx.socket_closed(id));
}

fn decode_segment(segment: &str) -> String {
    fn hex(b: u8) -> Option<u8> {
        (b as char).to_digit(16).and_then(|d| u8::try_from(d).ok())
    }
    let bytes = segment.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' && i + 2 < bytes.len() {
            if let (Some(hi), Some(lo)) = (hex(bytes[i + 1]), hex(bytes[i + 2])) {
                out.push(hi * 16 + lo);
                i += 3;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

async fn rest(
    State((shared, _stop)): State<(Arc<Shared>, CancellationToken)>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    Query(params): Query<Params>,
    body: Bytes,
) -> Response {
    let path = uri.path().to_owned();
    let answer = if !authorized(&shared, &headers, &params) {
        error(401, "Authentication required")
    } else {
        let delay = shared.read(|st| st.rest_delay);
        if !delay.is_zero() {
            tokio::time::sleep(delay).await;
        }
        let body: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
        let segments: Vec<String> = path
            .strip_prefix("/ari/")
            .unwrap_or("")
            .split('/')
            .map(decode_segment)
            .collect();
        let segments: Vec<&str> = segments.iter().map(String::as_str).collect();
        shared.with(|ctx| dispatch(ctx, &method, &segments, &params, &body))
    };
    shared.with(|ctx| {
        ctx.st.rest_log.push(RestEntry {
            method: method.to_string(),
            path: path.strip_prefix("/ari").unwrap_or(&path).to_owned(),
            status: answer.0,
        })
    });
    reply(answer)
}

fn dispatch(
    ctx: &mut super::model::Ctx<'_>,
    method: &Method,
    segments: &[&str],
    params: &Params,
    body: &serde_json::Value,
) -> Reply {
    let p = |name: &str| params.get(name).map(String::as_str);
    let m = method.as_str();
    match (m, segments) {
        ("GET", ["asterisk", "ping"]) => (
            200,
            Some(
                json!({ "asterisk_id": ctx.shared.opts.asterisk_id, "ping": "pong",
                "timestamp": timestamp() }),
            ),
        ),
        ("GET", ["asterisk", "info"]) => (
            200,
            Some(
                json!({ "system": { "entity_id": ctx.shared.opts.asterisk_id,
                "version": ctx.shared.opts.version } }),
            ),
        ),
        // Global variables only: Asterisk evaluates no dialplan function here (`""` for any).
        ("GET", ["asterisk", "variable"]) => match p("variable") {
            None | Some("") => error(400, "Variable name is required"),
            Some(_) => (200, Some(json!({ "value": "" }))),
        },
        ("GET", ["applications", app]) => ctx.application(app),
        ("PUT", ["applications", app, "eventFilter"]) => ctx.event_filter(app, body),
        ("GET", ["channels"]) => {
            let all: Vec<_> = ctx.st.channels.values().map(|c| &c.snapshot).collect();
            (200, serde_json::to_value(all).ok())
        }
        ("GET", ["channels", id]) => match ctx.st.channels.get(*id) {
            Some(c) => (200, serde_json::to_value(&c.snapshot).ok()),
            None => error(404, NO_CHANNEL),
        },
        ("DELETE", ["channels", id]) => ctx.hangup(id, Party::App),
        ("POST", ["channels"]) | ("POST", ["channels", _]) => {
            let create = segments.get(1) == Some(&"create");
            let id = match segments.get(1) {
                Some(id) if !create => (*id).to_owned(),
                _ => p("channelId").map_or_else(
                    || format!("sim-orig-{}", ctx.st.next_call + 1),
                    str::to_owned,
                ),
            };
            let variables: BTreeMap<String, String> = body
                .get("variables")
                .and_then(|v| serde_json::from_value(v.clone()).ok())
                .unwrap_or_default();
            ctx.st.originations.push(Origination {
                channel_id: id.clone(),
                params: params
                    .iter()
                    .filter(|(k, _)| k.as_str() != "api_key")
                    .map(|(k, v)| (k.clone(), v.clone()))
                    .collect(),
                variables: variables.clone(),
            });
            ctx.originate(OriginateReq {
                id,
                other: p("otherChannelId"),
                endpoint: p("endpoint").unwrap_or_default(),
                app_args: p("appArgs"),
                into_app: p("app").is_some(),
                app: p("app"),
                dial: !create,
                caller_id: p("callerId"),
                originator: p("originator"),
                variables,
            })
        }
        ("POST", ["channels", id, "mute"]) => ctx.mute(id, p("direction"), true),
        ("DELETE", ["channels", id, "mute"]) => ctx.mute(id, p("direction"), false),
        ("POST", ["channels", id, "answer"]) => match ctx.control(id, false) {
            Err(e) => e,
            Ok(()) => {
                ctx.set_state(id, crate::pbx::ari::wire::ChannelState::Up);
                (204, None)
            }
        },
        ("POST", ["channels", id, "play"]) => {
            let pb = p("playbackId")
                .map_or_else(|| format!("sim-pb-{}", uuid::Uuid::new_v4()), str::to_owned);
            ctx.play(id, &pb, p("media").unwrap_or_default(), p("lang"))
        }
        ("POST", ["channels", id, "play", pb]) => {
            ctx.play(id, pb, p("media").unwrap_or_default(), p("lang"))
        }
        ("POST", ["channels", id, "moh"]) => ctx.moh(id, true),
        ("DELETE", ["channels", id, "moh"]) => ctx.moh(id, false),
        ("POST", ["channels", id, "variable"]) => ctx.set_variable(
            id,
            p("variable").unwrap_or_default(),
            p("value").unwrap_or_default(),
        ),
        (_, ["channels", _, "variables"]) if !ctx.shared.opts.multi_variables => {
            error(404, "Resource not found")
        }
        ("POST", ["channels", id, "variables"]) => ctx.set_variables(id, body.get("variables")),
        ("GET", ["channels", id, "variables"]) => {
            ctx.get_variables(id, p("variables").unwrap_or_default())
        }
        (_, ["channels", _, "variables"]) => error(405, "Invalid method"),
        ("GET", ["channels", id, "variable"]) => {
            ctx.get_variable(id, p("variable").unwrap_or_default())
        }
        ("POST", ["channels", id, "continue"]) => {
            let priority = p("priority").and_then(|v| v.parse().ok());
            ctx.continue_in_dialplan(id, p("context"), p("extension"), priority)
        }
        ("GET", ["playbacks", pb]) => match ctx.st.playbacks.get(*pb) {
            Some(pb) => (200, serde_json::to_value(&pb.playback).ok()),
            None => error(404, NO_PLAYBACK),
        },
        ("DELETE", ["playbacks", pb]) => ctx.stop_playback(pb),
        ("GET", ["bridges"]) => ctx.list_bridges(),
        ("GET", ["bridges", id]) => ctx.get_bridge(id),
        ("POST", ["bridges", id]) => {
            ctx.create_bridge(id, p("type"), p("name").unwrap_or_default(), true)
        }
        ("POST", ["bridges"]) => {
            let id = p("bridgeId").map_or_else(|| uuid::Uuid::new_v4().to_string(), str::to_owned);
            ctx.create_bridge(&id, p("type"), p("name").unwrap_or(""), false)
        }
        ("DELETE", ["bridges", id]) => ctx.destroy_bridge(id),
        ("GET", ["sounds", id]) => ctx.sound(id),
        ("POST", ["bridges", id, "addChannel"]) => ctx.add_channel(
            id,
            p("channel").unwrap_or_default(),
            p("absorbDTMF") == Some("true"),
            p("mute") == Some("true"),
        ),
        ("POST", ["bridges", id, "removeChannel"]) => {
            ctx.remove_channel(id, p("channel").unwrap_or_default())
        }
        _ => error(404, "Resource not found"),
    }
}
