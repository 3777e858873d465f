//! The agent API against a `Live` the tests publish to and fake call tasks registered in a `Registry`
//! that answer start and cancel requests as scripted. Requests go through the router in process.

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use axum::body::Body;
use axum::http::{HeaderMap, Method, Request, StatusCode};
use axum::Router;
use http_body_util::BodyExt as _;
use serde_json::Value;
use tokio::sync::{mpsc, oneshot, watch};
use tokio_util::sync::CancellationToken;
use tower::ServiceExt as _;

use super::auth::{sha256, Tokens};
use super::{router, routes, AgentState, Limits};
use crate::api::ops::Readiness;
use crate::api::widget::Embedding;
use crate::calls::live::{
    CallState, CallView, CheckMethod, LiveKind, Refusal, StartedBy, TypedNumber, VerificationView,
};
use crate::calls::registry::{Entry, Handle};
use crate::calls::{CallEvent, Live, Registry, Snapshot};
use crate::config::{Api, ApiToken, Role};
use crate::outcome::{Outcome, Reason};
use crate::verify::Stage;

const AGENT_1: &str = "token-agent-1001";
const AGENT_2: &str = "token-agent-1002";
const LEAD: &str = "token-lead";
const OPS: &str = "token-ops";
/// Stands for a personal number an agent types; the fake task never checks it.
const TYPED: &str = "194107086995";

// ---- harness ----

struct Harness {
    router: Router,
    live: Arc<Live>,
    registry: Registry,
    readiness: Arc<Readiness>,
    stop: CancellationToken,
}

fn tokens() -> Tokens {
    let mut api = Api::default();
    for (name, token, role, agent) in [
        ("desk-1001", AGENT_1, Role::Agent, Some("PJSIP/1001")),
        ("desk-1002", AGENT_2, Role::Agent, Some("PJSIP/1002")),
        ("lead", LEAD, Role::Supervisor, None),
        ("ops", OPS, Role::Ops, None),
    ] {
        api.tokens.insert(
            name.to_owned(),
            ApiToken {
                sha256: sha256(token.as_bytes()),
                role,
                agent: agent.map(str::to_owned),
            },
        );
    }
    Tokens::from_config(&api)
}

fn harness_with(limits: Limits, keep: Duration) -> Harness {
    harness_embedding(limits, keep, &Embedding::default())
}

fn harness_embedding(limits: Limits, keep: Duration, embedding: &Embedding) -> Harness {
    harness_audited(limits, keep, embedding, None)
}

fn harness_audited(
    limits: Limits,
    keep: Duration,
    embedding: &Embedding,
    audit: Option<crate::audit::Audit>,
) -> Harness {
    let embedding = embedding.clone();
    let live = Arc::new(Live::new(keep));
    let registry = Registry::new();
    let readiness = Arc::new(Readiness::default());
    let stop = CancellationToken::new();
    let router = router(
        AgentState {
            shared: None,
            live: Arc::clone(&live),
            registry: registry.clone(),
            tokens: Arc::new(tokens()),
            limits,
            readiness: Arc::clone(&readiness),
            stop: stop.clone(),
            audit,
        },
        &embedding,
    );
    Harness {
        router,
        live,
        registry,
        readiness,
        stop,
    }
}

fn harness() -> Harness {
    harness_with(
        Limits {
            max_body: 1024,
            ..Limits::default()
        },
        Duration::from_secs(3600),
    )
}

fn request(method: Method, path: &str, token: Option<&str>, body: Option<&str>) -> Request<Body> {
    let mut b = Request::builder().method(method).uri(path);
    if let Some(t) = token {
        b = b.header("authorization", format!("Bearer {t}"));
    }
    match body {
        Some(text) => b
            .header("content-type", "application/json")
            .body(Body::from(text.to_owned()))
            .unwrap(),
        None => b.body(Body::empty()).unwrap(),
    }
}

struct Answer {
    status: StatusCode,
    headers: HeaderMap,
    text: String,
    json: Value,
}

impl Harness {
    async fn send(&self, req: Request<Body>) -> Answer {
        let response = self.router.clone().oneshot(req).await.unwrap();
        let status = response.status();
        let headers = response.headers().clone();
        let bytes = response.into_body().collect().await.unwrap().to_bytes();
        let text = String::from_utf8_lossy(&bytes).into_owned();
        let json = serde_json::from_str(&text).unwrap_or(Value::Null);
        Answer {
            status,
            headers,
            text,
            json,
        }
    }

    async fn call(
        &self,
        method: Method,
        path: &str,
        token: Option<&str>,
        body: Option<&str>,
    ) -> Answer {
        self.send(request(method, path, token, body)).await
    }

    async fn get(&self, path: &str, token: &str) -> Answer {
        self.call(Method::GET, path, Some(token), None).await
    }

    async fn stream(&self, path: &str, token: &str) -> SseReader {
        let response = self
            .router
            .clone()
            .oneshot(request(Method::GET, path, Some(token), None))
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::OK, "{path}");
        assert_eq!(
            response.headers()["content-type"],
            "text/event-stream",
            "{path}"
        );
        SseReader {
            body: response.into_body(),
            buf: String::new(),
        }
    }
}

fn assert_error(a: &Answer, status: StatusCode, code: &str) {
    assert_eq!(a.status, status, "{}", a.text);
    assert_eq!(a.json["error"], code, "{}", a.text);
    assert!(a.json["reason"].as_str().is_some_and(|r| !r.is_empty()));
}

/// Reads Server-Sent Events off a response body.
struct SseReader {
    body: Body,
    buf: String,
}

impl SseReader {
    /// The next event's name and data (keep-alive comments skipped); `None` when the stream ended.
    async fn next(&mut self) -> Option<(String, Value)> {
        tokio::time::timeout(Duration::from_secs(10), self.next_inner())
            .await
            .expect("no event within 10 s")
    }

    async fn next_inner(&mut self) -> Option<(String, Value)> {
        loop {
            while let Some(end) = self.buf.find("\n\n") {
                let block: String = self.buf.drain(..end + 2).collect();
                let mut name = None;
                let mut data = String::new();
                for line in block.lines() {
                    if let Some(v) = line.strip_prefix("event:") {
                        name = Some(v.trim().to_owned());
                    } else if let Some(v) = line.strip_prefix("data:") {
                        data.push_str(v.trim_start());
                    }
                }
                if let Some(name) = name {
                    return Some((name, serde_json::from_str(&data).unwrap()));
                }
            }
            let frame = self.body.frame().await?.unwrap();
            if let Ok(data) = frame.into_data() {
                self.buf.push_str(&String::from_utf8_lossy(&data));
            }
        }
    }

    async fn expect(&mut self, name: &str) -> Value {
        let (got, data) = self.next().await.expect("the stream ended");
        assert_eq!(got, name, "{data}");
        data
    }
}

fn at(secs: u64) -> SystemTime {
    SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000 + secs)
}

fn view(id: &str, queue: &str, state: CallState, agent: Option<&str>) -> CallView {
    CallView {
        call_id: id.to_owned(),
        queue: queue.to_owned(),
        state,
        agent: agent.map(str::to_owned),
        aliases: vec![format!("{id}-linked")],
        started_at: at(0),
        can_verify: state == CallState::Talking,
        verification: None,
        keypad: true,
        owner: None,
    }
}

fn check(id: &str, call: &str, stages: &[Stage], outcome: Option<Outcome>) -> VerificationView {
    VerificationView {
        id: id.to_owned(),
        call_id: call.to_owned(),
        queue: "support".to_owned(),
        idp: "bankid".to_owned(),
        method: CheckMethod::Keypad,
        started_by: StartedBy::Api("desk-1001".to_owned()),
        started_at: at(10),
        ended_at: outcome.map(|_| at(40)),
        stages: stages
            .iter()
            .enumerate()
            .map(|(i, s)| (*s, at(11 + i as u64)))
            .collect(),
        outcome,
        fields: match outcome {
            Some(o) => vec![
                ("status".into(), o.status().code().into()),
                (
                    "reason".into(),
                    o.reason().map(|r| r.code()).unwrap_or("").into(),
                ),
                ("ref".into(), id.into()),
                ("name".into(), "Ada Lind".into()),
            ],
            None => Vec::new(),
        },
        limit: None,
        word_pair: None,
    }
}

/// A call with agent `agent` talking, published.
fn talking(h: &Harness, id: &str, agent: &str) -> CallView {
    let c = view(id, "support", CallState::Talking, Some(agent));
    h.live.publish(LiveKind::AgentConnected, c.clone());
    c
}

/// What a fake call task was asked.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Seen {
    Start(StartedBy, Option<TypedNumber>),
    Cancel(StartedBy),
}

/// A fake call task registered under `id`: it records each request and answers it with `answer`
/// (`None`: keeps the request unanswered).
struct FakeCall {
    _entry: Entry,
    seen: Arc<Mutex<Vec<Seen>>>,
}

type Answerer = fn(&Seen) -> Option<Result<String, Refusal>>;

fn fake_call(registry: &Registry, id: &str, answer: Answerer) -> FakeCall {
    let (tx, mut rx) = mpsc::channel(8);
    let (_snap_tx, snap_rx) = watch::channel(Snapshot {
        call_id: id.to_owned(),
        queue: "support".to_owned(),
        reference: String::new(),
        stage: None,
        outcome: None,
        started_at: at(0),
    });
    let entry = registry
        .insert(
            id,
            Handle {
                inbox: tx,
                snapshot: snap_rx,
                cancel: CancellationToken::new(),
            },
        )
        .unwrap();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let log = Arc::clone(&seen);
    tokio::spawn(async move {
        let mut held: Vec<oneshot::Sender<Result<String, Refusal>>> = Vec::new();
        while let Some(event) = rx.recv().await {
            let (s, reply) = match event {
                CallEvent::StartCheck(req) => (Seen::Start(req.by, req.number), req.reply),
                CallEvent::CancelCheck(req) => (Seen::Cancel(req.by), req.reply),
                _ => continue,
            };
            let a = answer(&s);
            log.lock().unwrap().push(s);
            match a {
                Some(a) => {
                    let _ = reply.send(a);
                }
                None => held.push(reply),
            }
        }
    });
    FakeCall {
        _entry: entry,
        seen,
    }
}

fn accept(s: &Seen) -> Option<Result<String, Refusal>> {
    Some(Ok(match s {
        Seen::Start(..) => "v-new".to_owned(),
        Seen::Cancel(..) => "v-old".to_owned(),
    }))
}

// ---- authentication and visibility ----

#[tokio::test]
async fn no_token_malformed_or_unknown_token_is_401_with_a_bearer_challenge() {
    let h = harness();
    for auth in [
        None,
        Some("Basic dXNlcjpwYXNz"),
        Some("Bearer"),
        Some("Bearer not-a-token"),
        Some("Bearer token-agent-1001x"),
    ] {
        let mut b = Request::builder().uri("/v1/calls");
        if let Some(a) = auth {
            b = b.header("authorization", a);
        }
        let a = h.send(b.body(Body::empty()).unwrap()).await;
        assert_error(&a, StatusCode::UNAUTHORIZED, "unauthorized");
        assert!(a.headers["www-authenticate"]
            .to_str()
            .unwrap()
            .starts_with("Bearer"));
    }
    // Every route but the document needs a token.
    for (method, path, _) in routes() {
        if path == "/v1/openapi.json" {
            continue;
        }
        let path = path.replace("{id}", "c1");
        let a = h.call(method.clone(), &path, None, Some("{}")).await;
        assert_eq!(a.status, StatusCode::UNAUTHORIZED, "{method} {path}");
    }
    // The scheme is case-insensitive.
    let a = h
        .send(
            Request::builder()
                .uri("/v1/calls")
                .header("authorization", format!("bearer {LEAD}"))
                .body(Body::empty())
                .unwrap(),
        )
        .await;
    assert_eq!(a.status, StatusCode::OK);
}

#[tokio::test]
async fn agents_list_their_own_calls_supervisors_and_ops_all_by_queue() {
    let h = harness();
    talking(&h, "c1", "PJSIP/1001");
    talking(&h, "c2", "PJSIP/1002");
    h.live.publish(
        LiveKind::CallStarted,
        view("c3", "sales", CallState::WaitingForAgent, None),
    );
    let ids = |a: &Answer| -> Vec<String> {
        a.json["calls"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c["call_id"].as_str().unwrap().to_owned())
            .collect()
    };
    assert_eq!(ids(&h.get("/v1/calls", AGENT_1).await), ["c1"]);
    assert_eq!(ids(&h.get("/v1/calls", AGENT_2).await), ["c2"]);
    let mut all = ids(&h.get("/v1/calls", LEAD).await);
    all.sort();
    assert_eq!(all, ["c1", "c2", "c3"]);
    assert_eq!(ids(&h.get("/v1/calls", OPS).await).len(), 3);
    assert_eq!(ids(&h.get("/v1/calls?queue=sales", LEAD).await), ["c3"]);
    assert_eq!(
        ids(&h.get("/v1/calls?queue=sales", AGENT_1).await),
        Vec::<String>::new()
    );
    let a = h.get("/v1/calls?queu=sales", LEAD).await;
    assert_error(&a, StatusCode::UNPROCESSABLE_ENTITY, "invalid_request");
}

#[tokio::test]
async fn a_call_by_id_or_alias_for_its_agent_403_for_another_404_when_unknown() {
    let h = harness();
    talking(&h, "c1", "PJSIP/1001");
    let a = h.get("/v1/calls/c1", AGENT_1).await;
    assert_eq!(a.status, StatusCode::OK, "{}", a.text);
    assert_eq!(a.json["call_id"], "c1");
    let a = h.get("/v1/calls/c1-linked", AGENT_1).await;
    assert_eq!(a.json["call_id"], "c1", "{}", a.text);
    assert_eq!(h.get("/v1/calls/c1", LEAD).await.status, StatusCode::OK);
    assert_eq!(h.get("/v1/calls/c1", OPS).await.status, StatusCode::OK);
    assert_error(
        &h.get("/v1/calls/c1", AGENT_2).await,
        StatusCode::FORBIDDEN,
        "forbidden",
    );
    assert_error(
        &h.get("/v1/calls/c1-linked", AGENT_2).await,
        StatusCode::FORBIDDEN,
        "forbidden",
    );
    assert_error(
        &h.get("/v1/calls/nope", LEAD).await,
        StatusCode::NOT_FOUND,
        "not_found",
    );
    // Before an agent answered, the call is nobody's.
    h.live.publish(
        LiveKind::CallStarted,
        view("c2", "support", CallState::WaitingForAgent, None),
    );
    assert_error(
        &h.get("/v1/calls/c2", AGENT_1).await,
        StatusCode::FORBIDDEN,
        "forbidden",
    );
    // Unknown routes and methods answer JSON too.
    assert_error(
        &h.get("/v1/nothing", LEAD).await,
        StatusCode::NOT_FOUND,
        "no_route",
    );
    let a = h.call(Method::PUT, "/v1/calls/c1", Some(LEAD), None).await;
    assert_error(&a, StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed");
}

#[tokio::test]
async fn call_and_verification_json() {
    let h = harness();
    let mut c = view("c1", "support", CallState::Talking, Some("PJSIP/1001"));
    c.verification = Some(check(
        "v1",
        "c1",
        &[Stage::OrderCreated, Stage::AwaitingApp, Stage::Done],
        Some(Outcome::NotVerified(Reason::DeclinedCall)),
    ));
    h.live.publish(LiveKind::Completed, c);
    let a = h.get("/v1/calls/c1", AGENT_1).await;
    let j = &a.json;
    assert_eq!(j["state"], "talking");
    assert_eq!(j["agent"], "PJSIP/1001");
    assert_eq!(j["aliases"][0], "c1-linked");
    assert_eq!(j["started_at"], "2023-11-14T22:13:20Z");
    assert_eq!(j["can_verify"], true);
    assert_eq!(j["links"]["events"], "/v1/calls/c1/events");
    let v = &j["verification"];
    assert_eq!(v["verification_id"], "v1");
    assert_eq!(v["method"], "keypad");
    assert_eq!(v["started_by"], "api:desk-1001");
    assert_eq!(v["stage"], "done");
    assert_eq!(v["stages"][1]["stage"], "awaiting_app");
    assert_eq!(v["stages"][1]["at"], "2023-11-14T22:13:32Z");
    assert_eq!(v["status"], "failed");
    assert_eq!(v["reason"], "declined_call");
    assert_eq!(v["fraud"], true);
    assert_eq!(v["ended_at"], "2023-11-14T22:14:00Z");
    assert_eq!(v["fields"]["name"], "Ada Lind");
    assert_eq!(v["fields"]["reason"], "declined_call");
    assert_eq!(v["links"]["self"], "/v1/verifications/v1");

    let mut c = view("c2", "support", CallState::Talking, Some("PJSIP/1001"));
    c.verification = Some(check("v2", "c2", &[], None));
    h.live.publish(LiveKind::Progress, c);
    let v = h.get("/v1/verifications/v2", AGENT_1).await.json;
    assert_eq!(v["status"], "in_progress");
    assert_eq!(v["reason"], Value::Null);
    assert_eq!(v["stage"], Value::Null);
    assert_eq!(v["ended_at"], Value::Null);
    assert_eq!(v["fraud"], false);
    assert_eq!(v["fields"], serde_json::json!({}));
}

#[tokio::test]
async fn reads_that_show_identity_fields_are_recorded_in_the_audit_trail() {
    let data = std::env::temp_dir().join(format!("callgate-api-audit-{}", uuid::Uuid::new_v4()));
    let audit = crate::audit::Audit::open(
        &data,
        crate::audit::Settings::new(30, Some(crate::pnr::PseudonymKey::new(vec![7; 32]))),
    )
    .unwrap();
    let h = harness_audited(
        Limits::default(),
        Duration::from_secs(3600),
        &Embedding::default(),
        Some(audit.clone()),
    );
    let mut c = view("c1", "support", CallState::Talking, Some("PJSIP/1001"));
    c.verification = Some(check("v1", "c1", &[Stage::Done], Some(Outcome::Verified)));
    h.live.publish(LiveKind::Completed, c);
    let mut c = view("c2", "support", CallState::Talking, Some("PJSIP/1001"));
    c.verification = Some(check("v2", "c2", &[], None));
    h.live.publish(LiveKind::Progress, c);

    // Status only (a check in progress): nothing to record.
    assert_eq!(
        h.get("/v1/verifications/v2", AGENT_1).await.status,
        StatusCode::OK
    );
    assert_eq!(
        h.get("/v1/verifications/v1", AGENT_1).await.status,
        StatusCode::OK
    );
    assert_eq!(h.get("/v1/calls/c1", LEAD).await.status, StatusCode::OK);
    // The stream records the first showing of a verification once per feed.
    let mut stream = h.stream("/v1/calls/c1/events", AGENT_1).await;
    assert_eq!(stream.next().await.unwrap().0, "snapshot");
    let mut c = view("c1", "support", CallState::Talking, Some("PJSIP/1001"));
    c.verification = Some(check("v1", "c1", &[Stage::Done], Some(Outcome::Verified)));
    h.live.publish(LiveKind::Progress, c);
    assert_eq!(stream.next().await.unwrap().0, "verification_progress");
    assert!(audit.flush().await);

    let records = crate::audit::chain::read_all(&data.join("audit")).unwrap();
    let seen: Vec<String> = records
        .iter()
        .map(|r| {
            let v = &r.value;
            format!(
                "{} {} {} {}",
                v["kind"].as_str().unwrap(),
                v["reference"].as_str().unwrap(),
                v["by"].as_str().unwrap(),
                v["fields"]
            )
        })
        .collect();
    assert_eq!(
        seen,
        [
            "identity_viewed v1 api:desk-1001 [\"name\"]",
            "identity_viewed v1 api:lead [\"name\"]",
            "identity_viewed v1 api:desk-1001 [\"name\"]",
        ]
    );
    assert!(records
        .iter()
        .all(|r| !String::from_utf8_lossy(&r.bytes).contains("Ada Lind")));
    let _ = std::fs::remove_dir_all(&data);
}

// ---- starting and cancelling ----

#[tokio::test]
async fn start_by_keypad_and_by_typed_number_reach_the_call_task() {
    let h = harness();
    talking(&h, "c1", "PJSIP/1001");
    let fake = fake_call(&h.registry, "c1", accept);
    let a = h
        .call(
            Method::POST,
            "/v1/calls/c1/verifications",
            Some(AGENT_1),
            Some(r#"{"collect": "keypad"}"#),
        )
        .await;
    assert_eq!(a.status, StatusCode::ACCEPTED, "{}", a.text);
    assert_eq!(a.json["verification_id"], "v-new");
    assert_eq!(a.json["call_id"], "c1");
    assert_eq!(a.json["status"], "in_progress");
    assert_eq!(a.json["links"]["verification"], "/v1/verifications/v-new");
    assert_eq!(a.headers["location"], "/v1/verifications/v-new");

    // By alias, by a supervisor, with a typed number.
    let body = format!(r#"{{"number": "{TYPED}"}}"#);
    let a = h
        .call(
            Method::POST,
            "/v1/calls/c1-linked/verifications",
            Some(LEAD),
            Some(&body),
        )
        .await;
    assert_eq!(a.status, StatusCode::ACCEPTED, "{}", a.text);
    assert_eq!(
        *fake.seen.lock().unwrap(),
        [
            Seen::Start(StartedBy::Api("desk-1001".into()), None),
            Seen::Start(
                StartedBy::Api("lead".into()),
                Some(TypedNumber(TYPED.into()))
            ),
        ]
    );
    assert!(!a.text.contains(TYPED));
}

#[tokio::test]
async fn ops_may_not_start_or_cancel_and_agents_not_on_others_calls() {
    let h = harness();
    talking(&h, "c1", "PJSIP/1001");
    let fake = fake_call(&h.registry, "c1", accept);
    let keypad = Some(r#"{"collect": "keypad"}"#);
    for (method, path) in [
        (Method::POST, "/v1/calls/c1/verifications"),
        (Method::DELETE, "/v1/calls/c1/verification"),
    ] {
        let a = h.call(method.clone(), path, Some(OPS), keypad).await;
        assert_error(&a, StatusCode::FORBIDDEN, "forbidden");
        assert!(a.json["reason"].as_str().unwrap().contains("ops"));
        let a = h.call(method.clone(), path, Some(AGENT_2), keypad).await;
        assert_error(&a, StatusCode::FORBIDDEN, "forbidden");
    }
    let a = h
        .call(
            Method::POST,
            "/v1/calls/gone/verifications",
            Some(LEAD),
            keypad,
        )
        .await;
    assert_error(&a, StatusCode::NOT_FOUND, "not_found");
    assert!(fake.seen.lock().unwrap().is_empty());
}

#[tokio::test]
async fn a_start_body_is_one_of_two_forms_else_422() {
    let h = harness();
    talking(&h, "c1", "PJSIP/1001");
    let fake = fake_call(&h.registry, "c1", accept);
    let number = format!(r#""{TYPED}""#);
    for body in [
        String::new(),
        "not json".into(),
        "[]".into(),
        "{}".into(),
        r#"{"collect": "voice"}"#.into(),
        format!(r#"{{"collect": "keypad", "number": {number}}}"#),
        format!(r#"{{"number": {number}, "extra": 1}}"#),
        format!(r#"{{"number": {TYPED}}}"#),
        r#"{"number": ""}"#.into(),
        format!(r#"{{"number": "{}"}}"#, "1".repeat(33)),
    ] {
        let a = h
            .call(
                Method::POST,
                "/v1/calls/c1/verifications",
                Some(AGENT_1),
                Some(&body),
            )
            .await;
        assert_error(&a, StatusCode::UNPROCESSABLE_ENTITY, "invalid_request");
        assert!(!a.text.contains(TYPED), "the answer echoes the number");
    }
    // A number in the query is refused, not used.
    let a = h
        .call(
            Method::POST,
            &format!("/v1/calls/c1/verifications?number={TYPED}"),
            Some(AGENT_1),
            Some(r#"{"collect": "keypad"}"#),
        )
        .await;
    assert_error(&a, StatusCode::UNPROCESSABLE_ENTITY, "invalid_request");
    assert!(!a.text.contains(TYPED));
    assert!(fake.seen.lock().unwrap().is_empty());
}

#[tokio::test]
async fn a_body_over_the_limit_is_413() {
    let h = harness();
    talking(&h, "c1", "PJSIP/1001");
    let _fake = fake_call(&h.registry, "c1", accept);
    let body = format!(r#"{{"collect": "keypad", "pad": "{}"}}"#, "x".repeat(2000));
    let a = h
        .call(
            Method::POST,
            "/v1/calls/c1/verifications",
            Some(AGENT_1),
            Some(&body),
        )
        .await;
    assert_error(&a, StatusCode::PAYLOAD_TOO_LARGE, "body_too_large");
    // Without a length announced, too.
    let stream = futures_util::stream::iter(
        [body.clone(), body].map(|s| Ok::<_, std::io::Error>(axum::body::Bytes::from(s))),
    );
    let req = Request::builder()
        .method(Method::POST)
        .uri("/v1/calls/c1/verifications")
        .header("authorization", format!("Bearer {AGENT_1}"))
        .body(Body::from_stream(stream))
        .unwrap();
    assert_error(
        &h.send(req).await,
        StatusCode::PAYLOAD_TOO_LARGE,
        "body_too_large",
    );
}

#[tokio::test]
async fn refusals_of_the_call_map_to_status_codes() {
    let h = harness_with(
        Limits {
            max_body: 1024,
            answer_timeout: Duration::from_millis(200),
            ..Limits::default()
        },
        Duration::from_secs(3600),
    );
    let cases: [(&str, Answerer, StatusCode, &str); 5] = [
        (
            "c-gate",
            |_| Some(Err(Refusal::NotAnchored)),
            StatusCode::CONFLICT,
            "not_with_agent",
        ),
        (
            "c-bad",
            |_| Some(Err(Refusal::InvalidNumber)),
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_number",
        ),
        (
            "c-ended",
            |_| Some(Err(Refusal::Ended)),
            StatusCode::NOT_FOUND,
            "call_ended",
        ),
        (
            "c-none",
            |_| Some(Err(Refusal::NothingToCancel)),
            StatusCode::CONFLICT,
            "nothing_to_cancel",
        ),
        (
            "c-stuck",
            |_| None,
            StatusCode::SERVICE_UNAVAILABLE,
            "call_unavailable",
        ),
    ];
    let mut fakes = Vec::new();
    let body = format!(r#"{{"number": "{TYPED}"}}"#);
    for (id, answer, status, code) in cases {
        talking(&h, id, "PJSIP/1001");
        fakes.push(fake_call(&h.registry, id, answer));
        let a = h
            .call(
                Method::POST,
                &format!("/v1/calls/{id}/verifications"),
                Some(AGENT_1),
                Some(&body),
            )
            .await;
        assert_error(&a, status, code);
        assert!(!a.text.contains(TYPED));
    }
    // Published but without a task (it just ended).
    talking(&h, "c-orphan", "PJSIP/1001");
    let a = h
        .call(
            Method::DELETE,
            "/v1/calls/c-orphan/verification",
            Some(AGENT_1),
            None,
        )
        .await;
    assert_error(&a, StatusCode::NOT_FOUND, "call_ended");
    // Draining: no new checks.
    talking(&h, "c-ok", "PJSIP/1001");
    let fake = fake_call(&h.registry, "c-ok", accept);
    h.readiness
        .draining
        .store(true, std::sync::atomic::Ordering::SeqCst);
    let a = h
        .call(
            Method::POST,
            "/v1/calls/c-ok/verifications",
            Some(AGENT_1),
            Some(&body),
        )
        .await;
    assert_error(&a, StatusCode::SERVICE_UNAVAILABLE, "unavailable");
    assert!(fake.seen.lock().unwrap().is_empty());
}

#[tokio::test]
async fn cancel_reaches_the_call_task() {
    let h = harness();
    talking(&h, "c1", "PJSIP/1001");
    let fake = fake_call(&h.registry, "c1", accept);
    let a = h
        .call(
            Method::DELETE,
            "/v1/calls/c1/verification",
            Some(AGENT_1),
            None,
        )
        .await;
    assert_eq!(a.status, StatusCode::ACCEPTED, "{}", a.text);
    assert_eq!(a.json["verification_id"], "v-old");
    assert_eq!(a.json["status"], "cancelling");
    assert_eq!(
        *fake.seen.lock().unwrap(),
        [Seen::Cancel(StartedBy::Api("desk-1001".into()))]
    );
}

#[tokio::test(start_paused = true)]
async fn a_verification_is_readable_after_its_call_ended_until_keep_is_over() {
    let keep = Duration::from_secs(600);
    let h = harness_with(Limits::default(), keep);
    let mut c = view("c1", "support", CallState::Talking, Some("PJSIP/1001"));
    c.verification = Some(check("v1", "c1", &[Stage::Done], Some(Outcome::Verified)));
    h.live.publish(LiveKind::Completed, c.clone());
    c.state = CallState::Ended;
    h.live.publish(LiveKind::CallEnded, c);
    assert_error(
        &h.get("/v1/calls/c1", AGENT_1).await,
        StatusCode::NOT_FOUND,
        "not_found",
    );
    let a = h.get("/v1/verifications/v1", AGENT_1).await;
    assert_eq!(a.status, StatusCode::OK, "{}", a.text);
    assert_eq!(a.json["status"], "verified");
    assert_eq!(
        h.get("/v1/verifications/v1", LEAD).await.status,
        StatusCode::OK
    );
    assert_error(
        &h.get("/v1/verifications/v1", AGENT_2).await,
        StatusCode::FORBIDDEN,
        "forbidden",
    );
    tokio::time::advance(keep + Duration::from_secs(1)).await;
    assert_error(
        &h.get("/v1/verifications/v1", AGENT_1).await,
        StatusCode::NOT_FOUND,
        "not_found",
    );
    assert_error(
        &h.get("/v1/verifications/v1", LEAD).await,
        StatusCode::NOT_FOUND,
        "not_found",
    );
}

#[tokio::test]
async fn a_gate_check_is_readable_by_the_agent_who_got_the_call() {
    let h = harness();
    let mut c = view("c1", "support", CallState::Gate, None);
    c.verification = Some(check("v0", "c1", &[Stage::Done], Some(Outcome::Verified)));
    h.live.publish(LiveKind::Completed, c.clone());
    assert_error(
        &h.get("/v1/verifications/v0", AGENT_1).await,
        StatusCode::FORBIDDEN,
        "forbidden",
    );
    c.state = CallState::Talking;
    c.agent = Some("PJSIP/1001".into());
    h.live.publish(LiveKind::AgentConnected, c);
    assert_eq!(
        h.get("/v1/verifications/v0", AGENT_1).await.status,
        StatusCode::OK
    );
}

// ---- the live stream ----

#[tokio::test]
async fn a_call_stream_sends_the_state_then_progress_completed_fraud_and_the_end() {
    let h = harness();
    let mut c = talking(&h, "c1", "PJSIP/1001");
    let mut s = h.stream("/v1/calls/c1-linked/events", AGENT_1).await;
    let snap = s.expect("snapshot").await;
    assert_eq!(snap["call_id"], "c1");
    assert_eq!(snap["verification"], Value::Null);

    c.verification = Some(check("v1", "c1", &[Stage::Starting], None));
    h.live.publish(LiveKind::Progress, c.clone());
    // Another call's events do not show.
    talking(&h, "c2", "PJSIP/1001");
    c.verification = Some(check(
        "v1",
        "c1",
        &[Stage::Starting, Stage::AwaitingApp],
        None,
    ));
    h.live.publish(LiveKind::Progress, c.clone());
    c.verification = Some(check(
        "v1",
        "c1",
        &[Stage::Starting, Stage::AwaitingApp, Stage::Done],
        Some(Outcome::NotVerified(Reason::DeclinedCall)),
    ));
    h.live.publish(LiveKind::Completed, c.clone());
    c.state = CallState::Ended;
    h.live.publish(LiveKind::CallEnded, c);

    let e = s.expect("verification_progress").await;
    assert_eq!(e["verification"]["stage"], "starting");
    let e = s.expect("verification_progress").await;
    assert_eq!(e["verification"]["stage"], "awaiting_app");
    let e = s.expect("verification_completed").await;
    assert_eq!(e["verification"]["reason"], "declined_call");
    let e = s.expect("fraud_warning").await;
    assert_eq!(e["verification"]["fraud"], true);
    let e = s.expect("call_ended").await;
    assert_eq!(e["state"], "ended");
    assert!(
        s.next().await.is_none(),
        "the stream goes on after call_ended"
    );
}

#[tokio::test]
async fn a_call_stream_is_for_those_who_may_see_the_call() {
    let h = harness();
    talking(&h, "c1", "PJSIP/1001");
    assert_error(
        &h.get("/v1/calls/c1/events", AGENT_2).await,
        StatusCode::FORBIDDEN,
        "forbidden",
    );
    assert_error(
        &h.get("/v1/calls/nope/events", LEAD).await,
        StatusCode::NOT_FOUND,
        "not_found",
    );
    // No token in the URL.
    let a = h
        .call(
            Method::GET,
            &format!("/v1/calls/c1/events?token={AGENT_1}"),
            None,
            None,
        )
        .await;
    assert_error(&a, StatusCode::UNAUTHORIZED, "unauthorized");
    let a = h
        .call(
            Method::GET,
            &format!("/v1/events?token={AGENT_1}"),
            None,
            None,
        )
        .await;
    assert_error(&a, StatusCode::UNAUTHORIZED, "unauthorized");
}

#[tokio::test]
async fn an_agents_stream_shows_only_its_calls_from_agent_connected_on() {
    let h = harness();
    talking(&h, "mine-before", "PJSIP/1001");
    talking(&h, "theirs-before", "PJSIP/1002");
    let mut agent = h.stream("/v1/events", AGENT_1).await;
    let mut lead = h.stream("/v1/events?queue=support", LEAD).await;
    assert_eq!(agent.expect("snapshot").await["call_id"], "mine-before");
    assert_eq!(agent.expect("snapshot_complete").await["calls"], 1);
    for _ in 0..2 {
        lead.expect("snapshot").await;
    }
    assert_eq!(lead.expect("snapshot_complete").await["calls"], 2);

    let waiting = view("new", "support", CallState::WaitingForAgent, None);
    h.live.publish(LiveKind::CallStarted, waiting.clone());
    h.live.publish(
        LiveKind::CallStarted,
        view("sales-1", "sales", CallState::WaitingForAgent, None),
    );
    talking(&h, "theirs", "PJSIP/1002");
    talking(&h, "new", "PJSIP/1001");
    let mut ended = view("new", "support", CallState::Ended, Some("PJSIP/1001"));
    ended.can_verify = false;
    h.live.publish(LiveKind::CallEnded, ended);

    let e = agent.expect("agent_connected").await;
    assert_eq!(e["call_id"], "new");
    assert_eq!(e["agent"], "PJSIP/1001");
    assert_eq!(agent.expect("call_ended").await["call_id"], "new");

    let mut got = Vec::new();
    for _ in 0..4 {
        let (name, data) = lead.next().await.unwrap();
        got.push(format!("{name} {}", data["call_id"].as_str().unwrap()));
    }
    assert_eq!(
        got,
        [
            "call_started new",
            "agent_connected theirs",
            "agent_connected new",
            "call_ended new"
        ]
    );
}

#[tokio::test]
async fn a_reconnecting_client_gets_the_current_state_first() {
    let h = harness();
    let mut c = talking(&h, "c1", "PJSIP/1001");
    let mut s = h.stream("/v1/events", AGENT_1).await;
    s.expect("snapshot").await;
    s.expect("snapshot_complete").await;
    c.verification = Some(check("v1", "c1", &[Stage::AwaitingApp], None));
    h.live.publish(LiveKind::Progress, c.clone());
    s.expect("verification_progress").await;
    drop(s);
    // Meanwhile the check went on.
    c.verification = Some(check(
        "v1",
        "c1",
        &[Stage::AwaitingApp, Stage::Identifying],
        None,
    ));
    h.live.publish(LiveKind::Progress, c.clone());
    for path in ["/v1/events", "/v1/calls/c1/events"] {
        let mut s = h.stream(path, AGENT_1).await;
        let snap = s.expect("snapshot").await;
        assert_eq!(snap["verification"]["stage"], "identifying", "{path}");
    }
}

#[tokio::test]
async fn a_stream_that_fell_behind_gets_the_state_again() {
    let h = harness();
    let mut c = talking(&h, "c1", "PJSIP/1001");
    let mut s = h.stream("/v1/events", LEAD).await;
    s.expect("snapshot").await;
    s.expect("snapshot_complete").await;
    // More events than the channel holds, unread.
    for i in 0..1100u64 {
        c.started_at = at(i);
        h.live.publish(LiveKind::Progress, c.clone());
    }
    let mut names = Vec::new();
    loop {
        let (name, data) = s.next().await.unwrap();
        if name == "snapshot" {
            // The current state: the last published view.
            assert_eq!(
                data["started_at"],
                serde_json::json!(crate::outcome::rfc3339(at(1099)))
            );
            break;
        }
        names.push(name);
    }
    assert!(names.is_empty(), "events before the gap: {names:?}");
    s.expect("snapshot_complete").await;
}

#[tokio::test]
async fn streams_end_when_the_server_stops() {
    let h = harness();
    talking(&h, "c1", "PJSIP/1001");
    let mut all = h.stream("/v1/events", OPS).await;
    let mut one = h.stream("/v1/calls/c1/events", OPS).await;
    all.expect("snapshot").await;
    all.expect("snapshot_complete").await;
    one.expect("snapshot").await;
    h.stop.cancel();
    assert!(all.next().await.is_none());
    assert!(one.next().await.is_none());
}

#[tokio::test(start_paused = true)]
async fn an_idle_stream_sends_keep_alive_comments() {
    let h = harness();
    let mut s = h.stream("/v1/events", LEAD).await;
    s.expect("snapshot_complete").await;
    // Nothing happens; the paused clock runs on to the keep-alive.
    let frame = tokio::time::timeout(Duration::from_secs(60), s.body.frame())
        .await
        .expect("no keep-alive")
        .unwrap()
        .unwrap();
    let data = frame.into_data().unwrap();
    assert!(data.starts_with(b":"), "{data:?}");
}

// ---- browsers on other origins ----

#[tokio::test]
async fn cors_answers_preflights_for_configured_origins_only() {
    let h = harness_embedding(
        Limits::default(),
        Duration::from_secs(60),
        &Embedding {
            frame_ancestors: Vec::new(),
            cors_origins: vec!["https://crm.example.com".into()],
        },
    );
    let preflight = |origin: &str| {
        Request::builder()
            .method(Method::OPTIONS)
            .uri("/v1/calls/c1/verifications")
            .header("origin", origin)
            .header("access-control-request-method", "POST")
            .header(
                "access-control-request-headers",
                "authorization, content-type",
            )
            .body(Body::empty())
            .unwrap()
    };
    let a = h.send(preflight("https://crm.example.com")).await;
    assert_eq!(a.status, StatusCode::OK, "{}", a.text);
    assert_eq!(
        a.headers["access-control-allow-origin"],
        "https://crm.example.com"
    );
    let methods = a.headers["access-control-allow-methods"].to_str().unwrap();
    for m in ["GET", "POST", "DELETE"] {
        assert!(methods.contains(m), "{methods}");
    }
    let allowed = a.headers["access-control-allow-headers"]
        .to_str()
        .unwrap()
        .to_ascii_lowercase();
    assert!(
        allowed.contains("authorization") && allowed.contains("content-type"),
        "{allowed}"
    );
    // Another origin gets no grant.
    let a = h.send(preflight("https://evil.example.net")).await;
    assert!(!a.headers.contains_key("access-control-allow-origin"));
    // A real request from the allowed origin carries the grant, and still needs its token.
    talking(&h, "c1", "PJSIP/1001");
    let mut req = request(Method::GET, "/v1/calls", Some(AGENT_1), None);
    req.headers_mut()
        .insert("origin", "https://crm.example.com".parse().unwrap());
    let a = h.send(req).await;
    assert_eq!(a.status, StatusCode::OK);
    assert_eq!(
        a.headers["access-control-allow-origin"],
        "https://crm.example.com"
    );
    let mut req = request(Method::GET, "/v1/calls", None, None);
    req.headers_mut()
        .insert("origin", "https://crm.example.com".parse().unwrap());
    assert_eq!(h.send(req).await.status, StatusCode::UNAUTHORIZED);
}

#[tokio::test]
async fn without_cors_origins_no_grant_is_given_and_the_widget_sits_beside_the_api() {
    let h = harness();
    let a = h
        .send(
            Request::builder()
                .method(Method::OPTIONS)
                .uri("/v1/calls")
                .header("origin", "https://crm.example.com")
                .header("access-control-request-method", "GET")
                .body(Body::empty())
                .unwrap(),
        )
        .await;
    assert!(!a.headers.contains_key("access-control-allow-origin"));
    // The widget's routes answer without a token and are not in the API's route table.
    for (path, content_type) in crate::api::widget::paths() {
        let a = h.send(request(Method::GET, path, None, None)).await;
        assert_eq!(a.status, StatusCode::OK, "{path}");
        assert_eq!(a.headers["content-type"], content_type);
        assert!(routes().iter().all(|(_, p, _)| *p != path));
    }
}

// ---- the document ----

#[tokio::test]
async fn the_openapi_document_lists_exactly_the_routes() {
    let h = harness();
    let a = h.call(Method::GET, "/v1/openapi.json", None, None).await;
    assert_eq!(a.status, StatusCode::OK);
    let doc = a.json;
    assert_eq!(doc["openapi"], "3.1.0");
    let mut documented = BTreeSet::new();
    for (path, item) in doc["paths"].as_object().unwrap() {
        for (method, op) in item.as_object().unwrap() {
            documented.insert((method.to_uppercase(), path.clone()));
            assert!(op["summary"].as_str().is_some(), "{method} {path}");
            assert!(op["responses"]["200"].is_object() || op["responses"]["202"].is_object());
            // Every path parameter is declared.
            if path.contains("{id}") {
                let params = op["parameters"].as_array().unwrap();
                assert!(params
                    .iter()
                    .any(|p| p["name"] == "id" && p["in"] == "path"));
            }
            // Every error answer refers to the error schema; every route with a token has 401.
            let responses = op["responses"].as_object().unwrap();
            if path != "/v1/openapi.json" {
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
    let routed: BTreeSet<(String, String)> = routes()
        .into_iter()
        .map(|(m, p, _)| (m.as_str().to_owned(), p.to_owned()))
        .collect();
    assert_eq!(documented, routed);

    // Each documented route answers on the real router: neither "no route" nor a wrong method.
    talking(&h, "c1", "PJSIP/1001");
    let _fake = fake_call(&h.registry, "c1", accept);
    for (method, path) in &documented {
        let concrete = path.replace("{id}", "c1");
        let method = Method::from_bytes(method.as_bytes()).unwrap();
        let body = (method == Method::POST).then_some(r#"{"collect": "keypad"}"#);
        let response = h
            .router
            .clone()
            .oneshot(request(method.clone(), &concrete, Some(LEAD), body))
            .await
            .unwrap();
        let status = response.status();
        assert_ne!(status, StatusCode::METHOD_NOT_ALLOWED, "{method} {path}");
        if status == StatusCode::NOT_FOUND {
            let bytes = response.into_body().collect().await.unwrap().to_bytes();
            let j: Value = serde_json::from_slice(&bytes).unwrap();
            assert_ne!(j["error"], "no_route", "{method} {path}");
        }
    }
}

#[test]
fn no_route_takes_a_personal_number_in_its_path_or_query() {
    let doc = super::openapi::document();
    let mut bodies = 0;
    for (path, item) in doc["paths"].as_object().unwrap() {
        assert!(!path.contains("number") && !path.contains("pnr"), "{path}");
        for (method, op) in item.as_object().unwrap() {
            for p in op["parameters"].as_array().into_iter().flatten() {
                let name = p["name"].as_str().unwrap();
                assert!(
                    ["id", "queue"].contains(&name),
                    "{method} {path} takes parameter {name}"
                );
            }
            if op.get("requestBody").is_some() {
                assert_eq!(method, "post", "{path}");
                bodies += 1;
            }
        }
    }
    assert_eq!(bodies, 1);
    // The only parameters the router reads: the path id and `queue` on the list routes; every
    // other route refuses a query string (`a_start_body_is_one_of_two_forms_else_422`).
    let schema = doc["components"]["schemas"]["StartRequest"].to_string();
    assert!(schema.contains("\"number\""));
}

// ---- privacy ----

#[derive(Clone, Default)]
struct Capture(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for Capture {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for Capture {
    type Writer = Capture;
    fn make_writer(&'a self) -> Capture {
        self.clone()
    }
}

/// Runs on the test's one thread, so the subscriber set for it sees the spans and events of the requests.
#[tokio::test(flavor = "current_thread")]
async fn a_typed_number_reaches_no_log_and_no_answer() {
    let capture = Capture::default();
    let subscriber = tracing_subscriber::fmt()
        .with_env_filter("trace")
        .with_ansi(false)
        .with_writer(capture.clone())
        .finish();
    let _guard = tracing::subscriber::set_default(subscriber);

    let h = harness();
    let mut c = talking(&h, "c1", "PJSIP/1001");
    let fake = fake_call(&h.registry, "c1", accept);
    let mut s = h.stream("/v1/calls/c1/events", AGENT_1).await;
    let mut answers = Vec::new();
    answers.push(s.expect("snapshot").await.to_string());
    let body = format!(r#"{{"number": "{TYPED}"}}"#);
    for (path, body) in [
        ("/v1/calls/c1/verifications".to_owned(), body.clone()),
        (
            format!("/v1/calls/c1/verifications?number={TYPED}"),
            body.clone(),
        ),
        (
            "/v1/calls/c1/verifications".to_owned(),
            format!(r#"{{"number": {TYPED}}}"#),
        ),
        (
            "/v1/calls/c1/verifications".to_owned(),
            format!(r#"{{"number": "{TYPED}", "x": 1}}"#),
        ),
        (
            "/v1/calls/c1/verifications".to_owned(),
            format!(r#"{{"number": "{TYPED}""#),
        ),
    ] {
        let a = h
            .call(Method::POST, &path, Some(AGENT_1), Some(&body))
            .await;
        answers.push(format!("{:?} {}", a.headers, a.text));
    }
    let a = h
        .call(
            Method::POST,
            "/v1/calls/c1/verifications",
            Some(AGENT_1),
            Some(&format!(
                r#"{{"number": "{TYPED}", "pad": "{}"}}"#,
                "x".repeat(2000)
            )),
        )
        .await;
    assert_eq!(a.status, StatusCode::PAYLOAD_TOO_LARGE);
    answers.push(a.text);
    c.verification = Some(check(
        "v-new",
        "c1",
        &[Stage::Done],
        Some(Outcome::Verified),
    ));
    h.live.publish(LiveKind::Completed, c);
    answers.push(s.expect("verification_completed").await.to_string());
    answers.push(h.get("/v1/verifications/v-new", AGENT_1).await.text);
    answers.push(h.get("/v1/calls", AGENT_1).await.text);

    // The number did reach the call, once.
    assert_eq!(
        fake.seen
            .lock()
            .unwrap()
            .iter()
            .filter(|s| matches!(s, Seen::Start(_, Some(n)) if n.0 == TYPED))
            .count(),
        1
    );
    // Other tests install their own subscribers at the same time, which can make tracing skip some
    // callsites here; the end-to-end privacy test proves the capture on the whole app.
    let logs = String::from_utf8_lossy(&capture.0.lock().unwrap()).into_owned();
    for form in [TYPED, &TYPED[2..]] {
        assert!(!logs.contains(form), "the number reached the logs");
        for a in &answers {
            assert!(!a.contains(form), "the number reached an answer: {a}");
        }
    }
}
