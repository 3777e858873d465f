//! The request-node API of hosted switchboards under `/switchboard/v1` (on `server.listen`, beside the
//! agent API): start a verification, long-poll its status, cancel it. Answers are flat string
//! variables, as JSON, as `application/x-www-form-urlencoded` or as `key=value` lines.
//!
//! Invariants: each switchboard has its own bearer token, checked like the agent API's (hashed once,
//! compared with every configured hash in constant time); the personal number is read only from a POST
//! body, never from a URL, and never logged; a malformed request is answered 400 before anything starts.

pub mod openapi;

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, PathRejection};
use axum::extract::{DefaultBodyLimit, Path, Query, State};
use axum::http::header::{ACCEPT, CONTENT_TYPE};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, MethodRouter};
use axum::Router;

use super::agent::auth::{bearer, equal, sha256};
use super::ops::Readiness;
use super::ApiError;
use crate::calls::live::TypedNumber;
use crate::config::Config;
use crate::switchboard::{self, Answer, CancelError, StartRequest, Switchboards};

/// What the router needs.
#[derive(Clone)]
pub struct SwitchboardState {
    pub engine: Arc<Switchboards>,
    pub tokens: Arc<BoardTokens>,
    pub readiness: Arc<Readiness>,
    pub max_body: usize,
}

/// The switchboards' token hashes.
#[derive(Debug, Default)]
pub struct BoardTokens {
    entries: Vec<([u8; 32], String)>,
}

impl BoardTokens {
    pub fn from_config(cfg: &Config) -> BoardTokens {
        BoardTokens {
            entries: cfg
                .switchboards
                .iter()
                .map(|(name, b)| (b.token_sha256, name.clone()))
                .collect(),
        }
    }

    /// The switchboard of a request's `Authorization: Bearer <token>`; every hash is compared.
    pub fn authenticate(&self, headers: &HeaderMap) -> Result<String, ApiError> {
        let value = headers
            .get(axum::http::header::AUTHORIZATION)
            .ok_or_else(|| ApiError::Unauthorized("a bearer token is required".into()))?;
        let token = bearer(value.as_bytes()).ok_or_else(|| {
            ApiError::Unauthorized("the Authorization header must be \"Bearer <token>\"".into())
        })?;
        let digest = sha256(token);
        let mut found = None;
        for (hash, name) in &self.entries {
            if equal(hash, &digest) {
                found = Some(name.clone());
            }
        }
        found.ok_or_else(|| ApiError::Unauthorized("unknown token".into()))
    }
}

/// Every route: method, path (as in the OpenAPI document and the README), handler. The router is
/// built from this table and a test checks it against the document.
pub fn routes() -> Vec<(Method, &'static str, MethodRouter<SwitchboardState>)> {
    vec![
        (Method::POST, "/switchboard/v1/verifications", post(start)),
        (
            Method::GET,
            "/switchboard/v1/verifications/{id}",
            get(status),
        ),
        (
            Method::POST,
            "/switchboard/v1/verifications/{id}/cancel",
            post(cancel),
        ),
        (
            Method::GET,
            "/switchboard/v1/openapi.json",
            get(openapi_document),
        ),
    ]
}

/// The routes of [`routes`] with the body limit.
pub fn router(state: SwitchboardState) -> Router {
    let max_body = state.max_body;
    let mut r = Router::new();
    for (_, path, method_router) in routes() {
        r = r.route(path, method_router);
    }
    r.layer(DefaultBodyLimit::max(max_body)).with_state(state)
}

async fn openapi_document() -> axum::Json<serde_json::Value> {
    axum::Json(openapi::document())
}

/// How an answer is written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Json,
    /// `application/x-www-form-urlencoded`.
    Form,
    /// `text/plain`, one `key=value` per line.
    Lines,
}

impl Format {
    /// `?format=json|form|text` wins; otherwise the `Accept` header; JSON by default.
    pub fn choose(
        query: &HashMap<String, String>,
        headers: &HeaderMap,
    ) -> Result<Format, ApiError> {
        if let Some(f) = query.get("format") {
            return match f.as_str() {
                "json" => Ok(Format::Json),
                "form" => Ok(Format::Form),
                "text" => Ok(Format::Lines),
                _ => Err(ApiError::BadRequest(
                    "format must be json, form or text".into(),
                )),
            };
        }
        let accept = headers
            .get(ACCEPT)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_ascii_lowercase();
        Ok(if accept.contains("application/json") {
            Format::Json
        } else if accept.contains("application/x-www-form-urlencoded") {
            Format::Form
        } else if accept.contains("text/plain") {
            Format::Lines
        } else {
            Format::Json
        })
    }
}

/// Writes the flat variables (with `verification_id` first) in a format.
pub fn write(answer: &Answer, format: Format) -> Response {
    let mut vars = vec![("verification_id".to_owned(), answer.id.clone())];
    vars.extend(answer.variables());
    match format {
        Format::Json => {
            let map: serde_json::Map<String, serde_json::Value> = vars
                .into_iter()
                .map(|(k, v)| (k, serde_json::Value::String(v)))
                .collect();
            axum::Json(serde_json::Value::Object(map)).into_response()
        }
        Format::Form => {
            let mut s = form_urlencoded::Serializer::new(String::new());
            for (k, v) in &vars {
                s.append_pair(k, v);
            }
            text(
                s.finish(),
                HeaderValue::from_static("application/x-www-form-urlencoded"),
            )
        }
        Format::Lines => {
            let mut out = String::new();
            for (k, v) in &vars {
                let v: String = v
                    .chars()
                    .map(|c| if c.is_control() { ' ' } else { c })
                    .collect();
                out.push_str(k);
                out.push('=');
                out.push_str(&v);
                out.push('\n');
            }
            text(out, HeaderValue::from_static("text/plain; charset=utf-8"))
        }
    }
}

fn text(body: String, content_type: HeaderValue) -> Response {
    let mut r = (StatusCode::OK, body).into_response();
    r.headers_mut().insert(CONTENT_TYPE, content_type);
    r
}

/// The fields of a start request, from a JSON object or a form body.
fn start_fields(headers: &HeaderMap, body: &[u8]) -> Result<HashMap<String, String>, ApiError> {
    let content_type = headers
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_ascii_lowercase();
    if content_type.starts_with("application/x-www-form-urlencoded") {
        return Ok(form_urlencoded::parse(body).into_owned().collect());
    }
    let value: serde_json::Value = serde_json::from_slice(body).map_err(|_| {
        ApiError::BadRequest(
            "the body must be a JSON object or application/x-www-form-urlencoded".into(),
        )
    })?;
    let serde_json::Value::Object(map) = value else {
        return Err(ApiError::BadRequest(
            "the body must be a JSON object".into(),
        ));
    };
    let mut out = HashMap::new();
    for (k, v) in map {
        let v = match v {
            serde_json::Value::String(s) => s,
            serde_json::Value::Number(n) => n.to_string(),
            serde_json::Value::Null => continue,
            _ => {
                return Err(ApiError::BadRequest(format!(
                    "{} must be a string",
                    field_name(&k)
                )))
            }
        };
        out.insert(k, v);
    }
    Ok(out)
}

/// A field name fit to quote back: one of ours, else a placeholder.
fn field_name(k: &str) -> &'static str {
    match k {
        "call_id" => "call_id",
        "queue" => "queue",
        "number" => "number",
        "caller" => "caller",
        "language" => "language",
        "attempt" => "attempt",
        _ => "each field",
    }
}

/// Parses a start request's fields.
pub fn start_request(mut f: HashMap<String, String>) -> Result<StartRequest, ApiError> {
    let mut required = |name: &'static str| {
        f.remove(name)
            .ok_or_else(|| ApiError::BadRequest(format!("{name} is required")))
    };
    let call_id = required("call_id")?;
    let queue = required("queue")?;
    let number = required("number")?;
    let caller = f.remove("caller").unwrap_or_default();
    let language = f.remove("language").filter(|l| !l.is_empty());
    let attempt = match f.remove("attempt").filter(|a| !a.is_empty()) {
        None => 0,
        Some(a) => a
            .parse::<u32>()
            .map_err(|_| ApiError::BadRequest(switchboard::BadStart::Attempt.to_string()))?,
    };
    Ok(StartRequest {
        call_id,
        queue,
        number: TypedNumber(number),
        caller,
        language,
        attempt,
    })
}

async fn start(
    State(s): State<SwitchboardState>,
    Query(query): Query<HashMap<String, String>>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let board = s.tokens.authenticate(&headers)?;
    let format = Format::choose(&query, &headers)?;
    if query.contains_key("number") {
        return Err(ApiError::BadRequest(
            "the number goes in the request body, never in the URL".into(),
        ));
    }
    let body = body.map_err(|e| {
        if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::TooLarge(s.max_body)
        } else {
            ApiError::BadRequest("the request body could not be read".into())
        }
    })?;
    let fields = start_fields(&headers, &body)?;
    drop(body);
    let request = start_request(fields)?;
    if s.readiness.draining.load(Ordering::SeqCst) {
        return Err(ApiError::Unavailable("draining".into()));
    }
    let answer = s
        .engine
        .start(&board, request)
        .await
        .map_err(|e| ApiError::BadRequest(e.to_string()))?;
    Ok(write(&answer, format))
}

async fn status(
    State(s): State<SwitchboardState>,
    path: Result<Path<String>, PathRejection>,
    Query(query): Query<HashMap<String, String>>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let board = s.tokens.authenticate(&headers)?;
    let format = Format::choose(&query, &headers)?;
    let Path(id) = path.map_err(|_| ApiError::BadRequest("bad verification id".into()))?;
    let wait = match query.get("wait") {
        None => 0,
        Some(w) => w
            .parse::<u64>()
            .map_err(|_| ApiError::BadRequest("wait must be a whole number of seconds".into()))?,
    };
    let until_final = match query.get("until").map(String::as_str) {
        None | Some("change") => false,
        Some("final") => true,
        Some(_) => return Err(ApiError::BadRequest("until must be change or final".into())),
    };
    let answer = s
        .engine
        .wait(&board, &id, switchboard::bounded_wait(wait), until_final)
        .await
        .ok_or_else(|| ApiError::NotFound("no such verification".into()))?;
    Ok(write(&answer, format))
}

async fn cancel(
    State(s): State<SwitchboardState>,
    path: Result<Path<String>, PathRejection>,
    Query(query): Query<HashMap<String, String>>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let board = s.tokens.authenticate(&headers)?;
    let format = Format::choose(&query, &headers)?;
    let Path(id) = path.map_err(|_| ApiError::BadRequest("bad verification id".into()))?;
    match s.engine.cancel_anywhere(&board, &id).await {
        Ok(()) => {}
        Err(CancelError::Unknown) => return Err(ApiError::NotFound("no such verification".into())),
        Err(CancelError::OwnerUnreachable) => {
            return Err(ApiError::Refused(
                crate::calls::live::Refusal::OwnerUnreachable,
            ))
        }
    }
    // The order's cancel is quick; answer the final state when it is there, bounded.
    let answer = s
        .engine
        .wait(&board, &id, CANCEL_WAIT, true)
        .await
        .ok_or_else(|| ApiError::NotFound("no such verification".into()))?;
    Ok(write(&answer, format))
}

/// How long a cancel waits for the verification's final state.
const CANCEL_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

#[cfg(test)]
mod tests {
    use super::*;
    use crate::outcome::Outcome;
    use crate::switchboard::State as VState;
    use crate::verify::Stage;

    fn pending() -> Answer {
        Answer {
            id: "v-1".into(),
            state: VState {
                stage: Some(Stage::AwaitingApp),
                outcome: None,
                fields: Vec::new(),
            },
        }
    }

    fn verified() -> Answer {
        Answer {
            id: "v-1".into(),
            state: VState {
                stage: Some(Stage::Done),
                outcome: Some(Outcome::Verified),
                fields: vec![
                    ("status".into(), "verified".into()),
                    ("reason".into(), String::new()),
                    ("ref".into(), "v-1".into()),
                    ("name".into(), "Anna Andersson".into()),
                ],
            },
        }
    }

    async fn body(r: Response) -> (String, String) {
        let ct = r
            .headers()
            .get(CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_owned();
        let b = axum::body::to_bytes(r.into_body(), 1 << 16).await.unwrap();
        (ct, String::from_utf8(b.to_vec()).unwrap())
    }

    #[test]
    fn the_openapi_document_lists_exactly_the_routes_and_no_number_parameter() {
        let doc = openapi::document();
        assert_eq!(doc["openapi"], "3.1.0");
        let mut documented = std::collections::BTreeSet::new();
        for (path, item) in doc["paths"].as_object().unwrap() {
            assert!(!path.contains("number"), "{path}");
            for (method, op) in item.as_object().unwrap() {
                documented.insert((method.to_uppercase(), path.clone()));
                assert!(op["summary"].as_str().is_some(), "{method} {path}");
                assert!(op["responses"]["200"].is_object(), "{method} {path}");
                let params: Vec<&str> = op["parameters"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .map(|p| p["name"].as_str().unwrap())
                    .collect();
                assert!(!params.contains(&"number"), "{method} {path}");
                if path.contains("{id}") {
                    assert!(params.contains(&"id"), "{method} {path}");
                }
                let responses = op["responses"].as_object().unwrap();
                if !path.ends_with("openapi.json") {
                    assert!(responses.contains_key("401"), "{method} {path}");
                }
                for (code, r) in responses {
                    if code.starts_with('4') || code.starts_with('5') {
                        assert_eq!(
                            r["content"]["application/json"]["schema"]["$ref"],
                            "#/components/schemas/Error",
                            "{method} {path} {code}"
                        );
                    }
                }
            }
        }
        let routed: std::collections::BTreeSet<(String, String)> = routes()
            .into_iter()
            .map(|(m, p, _)| (m.as_str().to_owned(), p.to_owned()))
            .collect();
        assert_eq!(documented, routed);
        // The error codes the document lists are the ones the API's error type uses here.
        let codes = doc["components"]["schemas"]["Error"]["properties"]["error"]["enum"]
            .as_array()
            .unwrap()
            .clone();
        for e in [
            ApiError::BadRequest(String::new()),
            ApiError::Unauthorized(String::new()),
            ApiError::NotFound(String::new()),
            ApiError::TooLarge(1),
            ApiError::Unavailable(String::new()),
            ApiError::Refused(crate::calls::live::Refusal::OwnerUnreachable),
        ] {
            assert!(codes.contains(&serde_json::json!(e.code().1)), "{e:?}");
        }
    }

    #[test]
    fn pending_variables_carry_no_identity() {
        let vars = pending().variables();
        assert_eq!(
            vars,
            vec![
                ("callgate_status".into(), "pending".into()),
                ("callgate_reason".into(), String::new()),
                ("callgate_ref".into(), "v-1".into()),
                ("callgate_stage".into(), "awaiting_app".into()),
            ]
        );
    }

    /// What an instance that does not run a verification answers, from its replicated view, is what
    /// the instance running it answers.
    #[test]
    fn a_replicated_view_renders_the_same_variables_as_the_running_verification() {
        use crate::calls::live::{CheckMethod, StartedBy, VerificationView};
        let at = std::time::UNIX_EPOCH + std::time::Duration::from_secs(1_700_000_000);
        let mut view = VerificationView {
            id: "v-1".into(),
            call_id: "c-1".into(),
            queue: "support".into(),
            idp: "bankid".into(),
            method: CheckMethod::Ivr,
            started_by: StartedBy::Switchboard("tvx".into()),
            started_at: at,
            ended_at: None,
            stages: vec![(Stage::OrderCreated, at), (Stage::AwaitingApp, at)],
            outcome: None,
            fields: Vec::new(),
            limit: None,
            word_pair: None,
        };
        assert_eq!(Answer::of_view(&view), pending());
        assert_eq!(Answer::of_view(&view).variables(), pending().variables());
        view.stages.push((Stage::Done, at));
        view.outcome = Some(Outcome::Verified);
        view.ended_at = Some(at);
        view.fields = verified().state.fields;
        assert_eq!(Answer::of_view(&view).variables(), verified().variables());
        // Before the first stage: pending at `starting`, as a claimed start answers.
        let fresh = VerificationView {
            stages: Vec::new(),
            outcome: None,
            fields: Vec::new(),
            ..view
        };
        let vars = Answer::of_view(&fresh).variables();
        assert!(vars.contains(&("callgate_stage".into(), "starting".into())));
        assert_eq!(
            vars,
            Answer {
                id: "v-1".into(),
                state: VState::default()
            }
            .variables()
        );
    }

    #[tokio::test]
    async fn formats() {
        let (ct, json) = body(write(&verified(), Format::Json)).await;
        assert!(ct.starts_with("application/json"));
        let v: serde_json::Value = serde_json::from_str(&json).unwrap();
        assert_eq!(v["callgate_status"], "verified");
        assert_eq!(v["callgate_name"], "Anna Andersson");
        assert_eq!(v["callgate_stage"], "done");
        assert_eq!(v["verification_id"], "v-1");

        let (ct, form) = body(write(&verified(), Format::Form)).await;
        assert_eq!(ct, "application/x-www-form-urlencoded");
        assert!(form.contains("callgate_name=Anna+Andersson"), "{form}");
        assert!(form.contains("callgate_status=verified&"), "{form}");

        let (ct, lines) = body(write(&verified(), Format::Lines)).await;
        assert!(ct.starts_with("text/plain"));
        assert!(lines.contains("\ncallgate_status=verified\n"), "{lines}");
        assert!(
            lines.contains("\ncallgate_name=Anna Andersson\n"),
            "{lines}"
        );
    }

    #[test]
    fn format_choice() {
        let mut h = HeaderMap::new();
        let q = HashMap::new();
        assert_eq!(Format::choose(&q, &h).unwrap(), Format::Json);
        h.insert(ACCEPT, HeaderValue::from_static("text/plain"));
        assert_eq!(Format::choose(&q, &h).unwrap(), Format::Lines);
        h.insert(
            ACCEPT,
            HeaderValue::from_static("application/x-www-form-urlencoded"),
        );
        assert_eq!(Format::choose(&q, &h).unwrap(), Format::Form);
        let q: HashMap<String, String> = [("format".to_owned(), "json".to_owned())].into();
        assert_eq!(Format::choose(&q, &h).unwrap(), Format::Json);
        let q: HashMap<String, String> = [("format".to_owned(), "xml".to_owned())].into();
        assert!(Format::choose(&q, &h).is_err());
    }

    #[test]
    fn start_fields_from_json_and_form() {
        let mut h = HeaderMap::new();
        let f = start_fields(
            &h,
            br#"{"call_id":"c1","queue":"support","number":"198112189876","attempt":2}"#,
        )
        .unwrap();
        let r = start_request(f).unwrap();
        assert_eq!((r.call_id.as_str(), r.attempt), ("c1", 2));
        h.insert(
            CONTENT_TYPE,
            HeaderValue::from_static("application/x-www-form-urlencoded"),
        );
        let f = start_fields(
            &h,
            b"call_id=c2&queue=support&number=198112189876&caller=%2B46701234567",
        )
        .unwrap();
        let r = start_request(f).unwrap();
        assert_eq!(
            (r.call_id.as_str(), r.caller.as_str()),
            ("c2", "+46701234567")
        );
        // Missing fields and bad attempts are named; the number is never quoted.
        let e = start_request(start_fields(&h, b"call_id=c&queue=q").unwrap()).unwrap_err();
        assert_eq!(e.to_string(), "number is required");
        let e = start_request(start_fields(&h, b"call_id=c&queue=q&number=1&attempt=x").unwrap())
            .unwrap_err();
        assert!(e.to_string().contains("attempt"));
        let h = HeaderMap::new();
        let e = start_fields(&h, br#"{"number": 198112189876.5e3, "x": [1]}"#).unwrap_err();
        assert!(!e.to_string().contains("1981"));
    }
}
