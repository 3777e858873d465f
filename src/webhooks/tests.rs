//! Webhooks against a loopback receiver (axum on 127.0.0.1:0): signatures, retries, permanent
//! refusals, `Retry-After`, timeouts, the outbox across a restart and its bound.

use std::collections::VecDeque;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use axum::http::{HeaderMap, StatusCode};
use axum::response::IntoResponse;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::*;
use crate::calls::live::{CallState, CheckMethod, StartedBy, VerificationView};
use crate::config::{WebhookTarget, Webhooks as Settings};
use crate::outcome::{Outcome, Reason};
use crate::secret::Secret;

const SECRET: &str = "test-secret-0123456789";

/// What the receiver answers to one request.
#[derive(Clone)]
struct Answer {
    status: u16,
    retry_after: Option<&'static str>,
    delay: Duration,
}

fn status(status: u16) -> Answer {
    Answer {
        status,
        retry_after: None,
        delay: Duration::ZERO,
    }
}

#[derive(Clone)]
struct Received {
    headers: HeaderMap,
    body: Vec<u8>,
    at: tokio::time::Instant,
}

#[derive(Clone)]
struct Receiver {
    script: Arc<Mutex<VecDeque<Answer>>>,
    seen: Arc<Mutex<Vec<Received>>>,
    count: watch::Sender<usize>,
    url: String,
}

impl Receiver {
    /// Answers with `script` in order, then 200 for ever.
    async fn start(script: Vec<Answer>) -> Receiver {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (count, _) = watch::channel(0);
        let r = Receiver {
            script: Arc::new(Mutex::new(script.into())),
            seen: Arc::new(Mutex::new(Vec::new())),
            count,
            url: format!("http://{addr}/hook"),
        };
        let state = r.clone();
        let app = axum::Router::new().route(
            "/hook",
            axum::routing::post(move |headers: HeaderMap, body: axum::body::Bytes| {
                let state = state.clone();
                async move {
                    let answer = state
                        .script
                        .lock()
                        .unwrap()
                        .pop_front()
                        .unwrap_or(status(200));
                    state.seen.lock().unwrap().push(Received {
                        headers,
                        body: body.to_vec(),
                        at: now(),
                    });
                    state.count.send_modify(|n| *n += 1);
                    tokio::time::sleep(answer.delay).await;
                    let mut response = StatusCode::from_u16(answer.status).unwrap().into_response();
                    if let Some(v) = answer.retry_after {
                        response
                            .headers_mut()
                            .insert("retry-after", v.parse().unwrap());
                    }
                    response
                }
            }),
        );
        tokio::spawn(async move { axum::serve(listener, app).await });
        r
    }

    async fn wait_for(&self, n: usize) {
        let mut rx = self.count.subscribe();
        tokio::time::timeout(Duration::from_secs(10), rx.wait_for(|c| *c >= n))
            .await
            .expect("requests did not arrive")
            .unwrap();
    }

    fn seen(&self) -> Vec<Received> {
        self.seen.lock().unwrap().clone()
    }
}

#[allow(clippy::disallowed_methods)] // test clock
fn now() -> tokio::time::Instant {
    tokio::time::Instant::now()
}

#[allow(clippy::disallowed_methods)] // test clock
fn wall() -> SystemTime {
    SystemTime::now()
}

fn settings(url: &str) -> Settings {
    Settings {
        max_attempts: 5,
        initial_backoff: Duration::from_millis(10),
        max_backoff: Duration::from_millis(100),
        timeout: Duration::from_secs(2),
        outbox_max: 100,
        max_age: Duration::from_secs(3600),
        targets: vec![WebhookTarget {
            name: "crm".into(),
            url: url.to_owned(),
            secret: Secret::new(SECRET),
            queues: Vec::new(),
            events: EventType::DEFAULT.to_vec(),
        }],
    }
}

fn tempdir() -> PathBuf {
    let dir = std::env::temp_dir().join(format!("callgate-webhooks-{}", uuid::Uuid::new_v4()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

struct Running {
    webhooks: Webhooks,
    metrics: Arc<Metrics>,
    stop: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

impl Running {
    fn start(settings: &Settings, dir: &std::path::Path) -> Running {
        let metrics = Arc::new(Metrics::new());
        let stop = CancellationToken::new();
        let started = Webhooks::start(settings, dir, Arc::clone(&metrics), stop.clone())
            .unwrap()
            .unwrap();
        Running {
            webhooks: started.webhooks,
            metrics,
            stop,
            task: started.dispatcher,
        }
    }

    /// Stops the dispatcher as a crash would: nothing more is attempted or marked.
    async fn crash(self) {
        self.stop.cancel();
        self.task.await.unwrap();
    }

    fn count(&self, result: &str) -> u64 {
        let text = self.metrics.render();
        let prefix =
            format!("callgate_webhook_deliveries_total{{result=\"{result}\",target=\"crm\"}} ");
        let alt =
            format!("callgate_webhook_deliveries_total{{target=\"crm\",result=\"{result}\"}} ");
        text.lines()
            .find_map(|l| l.strip_prefix(&prefix).or_else(|| l.strip_prefix(&alt)))
            .map_or(0, |v| v.parse().unwrap())
    }

    async fn wait_count(&self, result: &str, n: u64) {
        let deadline = now() + Duration::from_secs(10);
        while self.count(result) < n {
            assert!(now() < deadline, "{result} never reached {n}");
            tokio::task::yield_now().await;
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    fn outbox_size(&self) -> f64 {
        let text = self.metrics.render();
        text.lines()
            .find_map(|l| l.strip_prefix("callgate_webhook_outbox_size "))
            .map_or(-1.0, |v| v.parse().unwrap())
    }
}

fn verification(outcome: Outcome, fields: &[(&str, &str)]) -> VerificationView {
    VerificationView {
        id: "ver-1".into(),
        call_id: "call-1".into(),
        queue: "support".into(),
        idp: "bankid".into(),
        method: CheckMethod::Ivr,
        started_by: StartedBy::Gate,
        started_at: SystemTime::UNIX_EPOCH + Duration::from_secs(1_795_000_000),
        ended_at: Some(SystemTime::UNIX_EPOCH + Duration::from_secs(1_795_000_030)),
        stages: Vec::new(),
        outcome: Some(outcome),
        fields: fields
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect(),
        limit: None,
        word_pair: None,
    }
}

fn call(v: Option<VerificationView>) -> CallView {
    CallView {
        call_id: "call-1".into(),
        queue: "support".into(),
        state: CallState::Gate,
        agent: None,
        aliases: Vec::new(),
        started_at: SystemTime::UNIX_EPOCH + Duration::from_secs(1_795_000_000),
        can_verify: false,
        verification: v,
        keypad: true,
        owner: None,
    }
}

fn verified() -> CallView {
    call(Some(verification(
        Outcome::Verified,
        &[("status", "verified"), ("name", "Anna Andersson")],
    )))
}

fn body_json(r: &Received) -> serde_json::Value {
    serde_json::from_slice(&r.body).unwrap()
}

fn unix(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH).unwrap().as_secs()
}

#[test]
fn a_signature_verifies_and_a_changed_body_or_an_old_timestamp_does_not() {
    let body = br#"{"version":1}"#;
    let header = sign(SECRET.as_bytes(), 1_800_000_000, body);
    assert!(header.starts_with("t=1800000000,v1="));
    assert_eq!(header.len(), "t=1800000000,v1=".len() + 64);
    assert!(verify(SECRET.as_bytes(), &header, body, 1_800_000_100, 300));
    assert!(!verify(
        SECRET.as_bytes(),
        &header,
        br#"{"version":2}"#,
        1_800_000_100,
        300
    ));
    assert!(!verify(
        b"another-secret",
        &header,
        body,
        1_800_000_100,
        300
    ));
    assert!(!verify(
        SECRET.as_bytes(),
        &header,
        body,
        1_800_000_301,
        300
    ));
    assert!(!verify(
        SECRET.as_bytes(),
        "v1=00",
        body,
        1_800_000_000,
        300
    ));
    // The same HMAC a receiver computes with openssl over "<t>.<body>".
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, SECRET.as_bytes());
    let tag = ring::hmac::sign(&key, b"1800000000.{\"version\":1}");
    let hex: String = tag.as_ref().iter().map(|b| format!("{b:02x}")).collect();
    assert!(header.ends_with(&hex));
    // The value the README's Python and openssl snippets compute for this secret, t and body.
    assert_eq!(
        header,
        "t=1800000000,v1=d3fa884bee5fbe30a64d00e2e802ab30258d9a6b1cc81a4e0fd5b24b66b02d49"
    );
}

#[test]
fn status_codes_and_retry_after_are_classified() {
    assert_eq!(deliver::classify(200, None), deliver::Attempt::Delivered);
    assert_eq!(deliver::classify(204, None), deliver::Attempt::Delivered);
    for permanent in [301, 400, 401, 403, 404, 410, 422] {
        assert!(matches!(
            deliver::classify(permanent, None),
            deliver::Attempt::Permanent(_)
        ));
    }
    for retried in [408, 429, 500, 502, 503, 504] {
        assert!(matches!(
            deliver::classify(retried, None),
            deliver::Attempt::Retry { .. }
        ));
    }
    let now = SystemTime::UNIX_EPOCH + Duration::from_secs(784_111_777); // Sun, 06 Nov 1994 08:49:37 GMT
    assert_eq!(deliver::retry_after("7", now), Some(Duration::from_secs(7)));
    assert_eq!(
        deliver::retry_after("Sun, 06 Nov 1994 08:50:07 GMT", now),
        Some(Duration::from_secs(30))
    );
    assert_eq!(
        deliver::retry_after("Sun, 06 Nov 1994 08:00:00 GMT", now),
        Some(Duration::ZERO)
    );
    assert_eq!(deliver::retry_after("soon", now), None);
    let s = settings("http://127.0.0.1:1/");
    for attempts in 1..=10 {
        let full = s
            .initial_backoff
            .saturating_mul(2u32.pow(attempts - 1))
            .min(s.max_backoff);
        let b = deliver::backoff(&s, attempts);
        assert!(b >= full / 2 && b <= full, "{attempts}: {b:?}");
    }
}

#[test]
fn the_payload_is_versioned_and_carries_what_the_api_shows() {
    let at = SystemTime::UNIX_EPOCH + Duration::from_secs(1_795_000_031);
    let view = verified();
    let p = payload("evt-1", EventType::VerificationCompleted, &view, at);
    assert_eq!(p["version"], 1);
    assert_eq!(p["id"], "evt-1");
    assert_eq!(p["type"], "verification_completed");
    assert_eq!(p["occurred_at"], "2026-11-18T11:07:11Z");
    assert_eq!(p["call"], render::call(&view));
    assert_eq!(
        p["verification"],
        render::verification(view.verification.as_ref().unwrap())
    );
    assert_eq!(p["verification"]["fields"]["name"], "Anna Andersson");
    assert_eq!(p["verification"]["status"], "verified");
}

#[tokio::test]
async fn a_signed_event_is_retried_after_5xx_then_delivered_and_marked_done() {
    let rx = Receiver::start(vec![status(503), status(500)]).await;
    let dir = tempdir();
    let hooks = Running::start(&settings(&rx.url), &dir);
    let before = unix(wall());
    hooks
        .webhooks
        .call_event(LiveKind::Completed, &verified(), wall());
    rx.wait_for(3).await;
    hooks.wait_count("delivered", 1).await;
    assert_eq!(hooks.count("retried"), 2);
    let seen = rx.seen();
    assert_eq!(seen.len(), 3);
    let first = body_json(&seen[0]);
    for r in &seen {
        // The same event (same id) each time, signed afresh, verifiable by a receiver.
        assert_eq!(body_json(r), first);
        let sig = r.headers[SIGNATURE_HEADER].to_str().unwrap();
        assert!(verify(SECRET.as_bytes(), sig, &r.body, unix(wall()), 300));
        let t: u64 = sig[2..sig.find(',').unwrap()].parse().unwrap();
        assert!(t >= before);
        assert_eq!(r.headers[EVENT_ID_HEADER], first["id"].as_str().unwrap());
        assert_eq!(r.headers[EVENT_TYPE_HEADER], "verification_completed");
        assert_eq!(r.headers["content-type"], "application/json");
    }
    assert_eq!(first["type"], "verification_completed");
    // Delivered: done in the outbox; a restart sends nothing again.
    assert!(hooks.webhooks.flush().await);
    let deadline = now() + Duration::from_secs(5);
    while hooks.outbox_size() != 0.0 {
        assert!(now() < deadline);
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    hooks.crash().await;
    let again = Running::start(&settings(&rx.url), &dir);
    assert!(again.webhooks.flush().await);
    assert_eq!(again.outbox_size(), 0.0);
    assert_eq!(rx.seen().len(), 3);
    again.crash().await;
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn a_declined_call_sends_the_completion_then_a_fraud_warning() {
    let rx = Receiver::start(Vec::new()).await;
    let dir = tempdir();
    let mut s = settings(&rx.url);
    s.targets[0].events = EventType::ALL.to_vec();
    let hooks = Running::start(&s, &dir);
    let declined = call(Some(verification(
        Outcome::NotVerified(Reason::DeclinedCall),
        &[("status", "failed"), ("reason", "declined_call")],
    )));
    hooks
        .webhooks
        .call_event(LiveKind::Completed, &declined, wall());
    hooks
        .webhooks
        .call_event(LiveKind::Progress, &declined, wall());
    let mut ended = declined.clone();
    ended.state = CallState::Ended;
    hooks
        .webhooks
        .call_event(LiveKind::CallEnded, &ended, wall());
    rx.wait_for(3).await;
    hooks.wait_count("delivered", 3).await;
    let mut types: Vec<String> = rx
        .seen()
        .iter()
        .map(|r| body_json(r)["type"].as_str().unwrap().to_owned())
        .collect();
    types.sort();
    assert_eq!(
        types,
        ["call_ended", "fraud_warning", "verification_completed"]
    );
    let ids: std::collections::BTreeSet<String> = rx
        .seen()
        .iter()
        .map(|r| body_json(r)["id"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(ids.len(), 3, "each event has its own id");
    let fraud = rx
        .seen()
        .into_iter()
        .map(|r| body_json(&r))
        .find(|b| b["type"] == "fraud_warning")
        .unwrap();
    assert_eq!(fraud["verification"]["fraud"], true);
    assert_eq!(fraud["verification"]["reason"], "declined_call");
    hooks.crash().await;
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn queues_and_events_a_target_does_not_want_are_not_sent() {
    let rx = Receiver::start(Vec::new()).await;
    let dir = tempdir();
    let mut s = settings(&rx.url);
    s.targets[0].queues = vec!["care".into()];
    let hooks = Running::start(&s, &dir);
    hooks
        .webhooks
        .call_event(LiveKind::Completed, &verified(), wall());
    let mut care = verified();
    care.queue = "care".into();
    hooks
        .webhooks
        .call_event(LiveKind::CallEnded, &care, wall());
    hooks
        .webhooks
        .call_event(LiveKind::Completed, &care, wall());
    rx.wait_for(1).await;
    hooks.wait_count("delivered", 1).await;
    assert!(hooks.webhooks.flush().await);
    let seen = rx.seen();
    assert_eq!(seen.len(), 1);
    assert_eq!(body_json(&seen[0])["call"]["queue"], "care");
    assert_eq!(body_json(&seen[0])["type"], "verification_completed");
    hooks.crash().await;
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn a_4xx_is_a_permanent_failure_and_408_is_retried() {
    let rx = Receiver::start(vec![status(408), status(400)]).await;
    let dir = tempdir();
    let hooks = Running::start(&settings(&rx.url), &dir);
    hooks
        .webhooks
        .call_event(LiveKind::Completed, &verified(), wall());
    hooks.wait_count("failed", 1).await;
    assert_eq!(hooks.count("retried"), 1);
    assert_eq!(hooks.count("delivered"), 0);
    assert_eq!(rx.seen().len(), 2);
    // The end of the delivery is written behind the count: wait for it, then for the disk.
    let deadline = now() + Duration::from_secs(5);
    while hooks.outbox_size() != 0.0 {
        assert!(now() < deadline);
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert!(hooks.webhooks.flush().await);
    hooks.crash().await;
    // Given up means done: not sent again after a restart.
    let again = Running::start(&settings(&rx.url), &dir);
    assert!(again.webhooks.flush().await);
    assert_eq!(again.outbox_size(), 0.0);
    again.crash().await;
    assert_eq!(rx.seen().len(), 2);
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn attempts_are_bounded_by_max_attempts() {
    let rx = Receiver::start(vec![status(503); 10]).await;
    let dir = tempdir();
    let mut s = settings(&rx.url);
    s.max_attempts = 3;
    let hooks = Running::start(&s, &dir);
    hooks
        .webhooks
        .call_event(LiveKind::Completed, &verified(), wall());
    hooks.wait_count("failed", 1).await;
    assert_eq!(hooks.count("retried"), 2);
    assert_eq!(rx.seen().len(), 3);
    hooks.crash().await;
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn retry_after_is_honoured_within_max_backoff() {
    // 1 s asked, backoff alone would be 10 ms: the receiver's wish wins.
    let rx = Receiver::start(vec![Answer {
        retry_after: Some("1"),
        ..status(429)
    }])
    .await;
    let dir = tempdir();
    let mut s = settings(&rx.url);
    s.max_backoff = Duration::from_secs(5);
    let hooks = Running::start(&s, &dir);
    hooks
        .webhooks
        .call_event(LiveKind::Completed, &verified(), wall());
    hooks.wait_count("delivered", 1).await;
    let seen = rx.seen();
    assert!(seen[1].at - seen[0].at >= Duration::from_millis(950));
    hooks.crash().await;

    // An hour asked, but max_backoff is 100 ms: delivered well before.
    let rx = Receiver::start(vec![Answer {
        retry_after: Some("3600"),
        ..status(503)
    }])
    .await;
    let hooks = Running::start(&settings(&rx.url), &dir);
    hooks
        .webhooks
        .call_event(LiveKind::Completed, &verified(), wall());
    hooks.wait_count("delivered", 1).await;
    let seen = rx.seen();
    assert!(seen[1].at - seen[0].at < Duration::from_secs(3));
    hooks.crash().await;
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn a_receiver_slower_than_the_timeout_gets_the_event_again() {
    let rx = Receiver::start(vec![Answer {
        delay: Duration::from_secs(3),
        ..status(200)
    }])
    .await;
    let dir = tempdir();
    let mut s = settings(&rx.url);
    s.timeout = Duration::from_millis(200);
    let hooks = Running::start(&s, &dir);
    hooks
        .webhooks
        .call_event(LiveKind::Completed, &verified(), wall());
    hooks.wait_count("delivered", 1).await;
    assert_eq!(hooks.count("retried"), 1);
    assert_eq!(rx.seen().len(), 2);
    hooks.crash().await;
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn an_undelivered_event_survives_a_crash_and_is_delivered_once_after_it() {
    // Nobody listens at first: every attempt fails to connect.
    let closed = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let dead_url = format!("http://{}/hook", closed.local_addr().unwrap());
    drop(closed);
    let dir = tempdir();
    let mut s = settings(&dead_url);
    s.initial_backoff = Duration::from_secs(60);
    s.max_backoff = Duration::from_secs(60);
    let hooks = Running::start(&s, &dir);
    hooks
        .webhooks
        .call_event(LiveKind::Completed, &verified(), wall());
    hooks.wait_count("retried", 1).await;
    assert_eq!(hooks.outbox_size(), 1.0);
    hooks.crash().await;

    // Started again, now with a receiver: the event arrives, once.
    let rx = Receiver::start(Vec::new()).await;
    let mut s = settings(&rx.url);
    s.initial_backoff = Duration::from_secs(60);
    s.max_backoff = Duration::from_secs(60);
    let hooks = Running::start(&s, &dir);
    rx.wait_for(1).await;
    hooks.wait_count("delivered", 1).await;
    assert!(hooks.webhooks.flush().await);
    hooks.crash().await;
    let again = Running::start(&s, &dir);
    assert!(again.webhooks.flush().await);
    again.crash().await;
    let seen = rx.seen();
    assert_eq!(seen.len(), 1);
    assert_eq!(
        body_json(&seen[0])["verification"]["fields"]["name"],
        "Anna Andersson"
    );
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt as _;
        let mode = std::fs::metadata(dir.join(outbox::FILE))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o077, 0, "the outbox may hold identity fields");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn a_full_outbox_drops_the_oldest_undelivered_events() {
    let closed = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let dead_url = format!("http://{}/hook", closed.local_addr().unwrap());
    drop(closed);
    let dir = tempdir();
    let mut s = settings(&dead_url);
    s.outbox_max = 3;
    s.initial_backoff = Duration::from_secs(60);
    s.max_backoff = Duration::from_secs(60);
    let hooks = Running::start(&s, &dir);
    let mut ids = Vec::new();
    for n in 0..5 {
        let mut view = verified();
        view.call_id = format!("call-{n}");
        hooks
            .webhooks
            .call_event(LiveKind::Completed, &view, wall());
        // One at a time, so that "oldest" is well defined.
        assert!(hooks.webhooks.flush().await);
        ids.push(view.call_id);
    }
    assert_eq!(hooks.count("dropped"), 2);
    assert_eq!(hooks.outbox_size(), 3.0);
    hooks.crash().await;

    let rx = Receiver::start(Vec::new()).await;
    let mut s = settings(&rx.url);
    s.outbox_max = 3;
    let hooks = Running::start(&s, &dir);
    rx.wait_for(3).await;
    hooks.wait_count("delivered", 3).await;
    let mut calls: Vec<String> = rx
        .seen()
        .iter()
        .map(|r| body_json(r)["call"]["call_id"].as_str().unwrap().to_owned())
        .collect();
    calls.sort();
    assert_eq!(calls, ids[2..]);
    hooks.crash().await;
    let _ = std::fs::remove_dir_all(&dir);
}
