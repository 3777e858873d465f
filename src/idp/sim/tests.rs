//! The BankID client against the simulator, one test per scenario row, plus the BankID rules the
//! simulator keeps (one live order per person, 405/415/400 answers, expiry, cancel idempotence).

use std::time::Duration;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use super::*;
use crate::idp::bankid::Client;
use crate::idp::Provider;
use crate::outcome::{Identity, Reason};
use crate::pnr::PersonalNumber;
use crate::verify::{Initiator, Order, OrderRef, Poll, ProviderError, Stage};

const STEP: Duration = Duration::from_millis(25);
/// Upper bound on polls per order (the longest script needs a handful of steps).
const MAX_POLLS: usize = 400;

struct Harness {
    sim: Simulator,
    client: Client,
    token: CancellationToken,
}

async fn harness_with(step: Duration, request_timeout: Duration) -> Harness {
    let token = CancellationToken::new();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let sim = start(
        listener,
        SimOptions {
            tls: false,
            step,
            cert_dir: None,
        },
        token.clone(),
    )
    .await
    .unwrap();
    let mut settings = sim.settings();
    settings.request_timeout = request_timeout;
    let client = Client::new(&settings).unwrap();
    Harness { sim, client, token }
}

async fn harness() -> Harness {
    harness_with(STEP, Duration::from_secs(5)).await
}

fn order(number: &str) -> Order {
    Order {
        number: PersonalNumber::parse_swedish_12(number).unwrap(),
        initiator: Initiator::Caller,
        text: Some("Kundtjänst".into()),
        pin_code: false,
    }
}

/// Polls every half step until the order ends; returns the distinct stages seen, in order, and the end.
async fn run(client: &Client, order_ref: &OrderRef) -> (Vec<Stage>, Poll) {
    let mut stages = Vec::new();
    for _ in 0..MAX_POLLS {
        match client.poll(order_ref).await.unwrap() {
            Poll::Pending(stage) => {
                if stages.last() != Some(&stage) {
                    stages.push(stage);
                }
                tokio::time::sleep(STEP / 2).await;
            }
            end => return (stages, end),
        }
    }
    panic!("order did not end within {MAX_POLLS} polls");
}

async fn scenario(h: &Harness, s: Scenario) -> (Vec<Stage>, Poll) {
    let started = h.client.start(&order(&s.number())).await.unwrap();
    assert_eq!(h.sim.open_orders(), 1);
    let result = run(&h.client, &started.order).await;
    assert_eq!(h.sim.open_orders(), 0, "{s:?} left an open order");
    result
}

fn identity(end: Poll) -> Identity {
    match end {
        Poll::Complete(identity) => identity,
        other => panic!("not complete: {other:?}"),
    }
}

#[tokio::test]
async fn approve() {
    let h = harness().await;
    let number = Scenario::Approve.number();
    let (stages, end) = scenario(&h, Scenario::Approve).await;
    assert_eq!(
        stages,
        [
            Stage::AwaitingApp,
            Stage::ConfirmingCall,
            Stage::Identifying
        ]
    );
    let id = identity(end);
    assert_eq!(id.number.expose_for_idp(), number);
    let (given, surname) = (id.given_name.unwrap(), id.surname.unwrap());
    assert_eq!(id.name, Some(format!("{given} {surname}")));
    assert_eq!(id.evidence_digest.map(|d| d.len()), Some(64));
    // Deterministic name; any serial without a row approves.
    let other = number_with_serial("19751231", 456);
    assert_eq!(Scenario::of_number(&other), Some(Scenario::Approve));
    let started = h.client.start(&order(&other)).await.unwrap();
    let again = identity(run(&h.client, &started.order).await.1);
    assert_eq!(again.number.expose_for_idp(), other);
    let started = h.client.start(&order(&number)).await.unwrap();
    let third = identity(run(&h.client, &started.order).await.1);
    assert_eq!(third.given_name.as_deref(), Some(given.as_str()));
    assert_eq!(third.surname.as_deref(), Some(surname.as_str()));
}

#[tokio::test]
async fn user_cancels() {
    let h = harness().await;
    let (stages, end) = scenario(&h, Scenario::UserCancels).await;
    assert_eq!(stages, [Stage::AwaitingApp, Stage::ConfirmingCall]);
    assert_eq!(end, Poll::Failed(Reason::UserCancelled));
}

#[tokio::test]
async fn declines_call() {
    let h = harness().await;
    let (stages, end) = scenario(&h, Scenario::DeclinesCall).await;
    assert_eq!(stages, [Stage::AwaitingApp, Stage::ConfirmingCall]);
    assert_eq!(end, Poll::Failed(Reason::DeclinedCall));
}

#[tokio::test]
async fn expires() {
    let h = harness().await;
    let (stages, end) = scenario(&h, Scenario::Expires).await;
    assert_eq!(stages, [Stage::AwaitingApp]);
    assert_eq!(end, Poll::Failed(Reason::Expired));
}

#[tokio::test]
async fn blocked_id() {
    let h = harness().await;
    let (_, end) = scenario(&h, Scenario::BlockedId).await;
    assert_eq!(end, Poll::Failed(Reason::IdBlocked));
}

#[tokio::test]
async fn unknown_hint_then_complete() {
    let h = harness().await;
    let (stages, end) = scenario(&h, Scenario::UnknownHint).await;
    assert_eq!(stages, [Stage::AwaitingApp, Stage::Identifying]);
    identity(end);
}

#[tokio::test]
async fn unknown_failure() {
    let h = harness().await;
    let (_, end) = scenario(&h, Scenario::UnknownFailure).await;
    assert_eq!(end, Poll::Failed(Reason::ProviderError));
}

#[tokio::test]
async fn wrong_person() {
    let h = harness().await;
    let number = Scenario::WrongPerson.number();
    let (_, end) = scenario(&h, Scenario::WrongPerson).await;
    let id = identity(end);
    assert_ne!(id.number.expose_for_idp(), number);
    assert!(is_valid_number(id.number.expose_for_idp()));
}

#[tokio::test]
async fn start_errors() {
    let h = harness().await;
    let cases = [
        (
            Scenario::AlreadyInProgress,
            ProviderError::Rejected(Reason::AlreadyInProgress),
        ),
        (Scenario::Maintenance, ProviderError::Unavailable),
        (Scenario::InternalError, ProviderError::OutcomeUnknown),
        (
            Scenario::RateLimited,
            ProviderError::RateLimited {
                retry_after: Some(Duration::from_secs(RATE_LIMIT_RESET_SECS)),
            },
        ),
    ];
    for (s, expected) in cases {
        let result = h.client.start(&order(&s.number())).await;
        assert_eq!(result.map(|_| ()), Err(expected), "{s:?}");
    }
    assert_eq!(h.sim.starts(), 4);
    assert_eq!(h.sim.open_orders(), 0);
}

#[tokio::test]
async fn slow_start_times_out_but_the_order_exists() {
    let h = harness_with(STEP, Duration::from_millis(300)).await;
    let result = h.client.start(&order(&Scenario::Slow.number())).await;
    assert_eq!(result.map(|_| ()), Err(ProviderError::OutcomeUnknown));
    h.sim.wait_for_open_orders(1).await;
    // A retry for the same person is refused and aborts the hidden order.
    let retry = h.client.start(&order(&Scenario::Slow.number())).await;
    assert_eq!(
        retry.map(|_| ()),
        Err(ProviderError::Rejected(Reason::AlreadyInProgress))
    );
    h.sim.wait_for_open_orders(0).await;
    // Shutdown ends the delayed answer.
    h.token.cancel();
}

#[test]
fn scenario_table_numbers_are_valid_and_select_their_row() {
    let table = scenario_table();
    assert_eq!(table.len(), Scenario::ALL.len());
    for (s, (number, description)) in Scenario::ALL.into_iter().zip(table) {
        assert!(is_valid_number(&number), "{number}");
        assert!(PersonalNumber::parse_swedish_12(&number).is_ok());
        assert_eq!(Scenario::of_number(&number), Some(s));
        assert_eq!(s.description(), description);
    }
    // Numbers from public examples (Luhn-checked by hand).
    assert!(is_valid_number("199908072391"));
    assert!(is_valid_number("196802020575"));
    assert!(!is_valid_number("191234567890"));
    assert!(!is_valid_number("19800101123x"));
    assert_eq!(number_with_serial("1980010", 1), "");
    assert_eq!(luhn_check_digit("800101123"), Some(1));
}

#[tokio::test]
async fn second_start_for_a_person_cancels_the_first() {
    let h = harness().await;
    let number = Scenario::Approve.number();
    let first = h.client.start(&order(&number)).await.unwrap();
    assert_eq!(
        h.client.start(&order(&number)).await.map(|_| ()),
        Err(ProviderError::Rejected(Reason::AlreadyInProgress))
    );
    assert_eq!(h.sim.open_orders(), 0);
    assert_eq!(
        h.client.poll(&first.order).await,
        Ok(Poll::Failed(Reason::Superseded))
    );
    // The person can start again now.
    let again = h.client.start(&order(&number)).await.unwrap();
    assert_ne!(again.order, first.order);
    assert_eq!(h.sim.open_orders(), 1);
}

#[tokio::test]
async fn cancel_is_idempotent_and_ends_the_order() {
    let h = harness().await;
    let started = h
        .client
        .start(&order(&Scenario::Approve.number()))
        .await
        .unwrap();
    h.sim.wait_for_open_orders(1).await;
    assert_eq!(h.client.cancel(&started.order).await, Ok(()));
    h.sim.wait_for_open_orders(0).await;
    assert_eq!(
        h.client.poll(&started.order).await,
        Ok(Poll::Failed(Reason::Superseded))
    );
    // Second cancel: the simulator answers 400 invalidParameters, the client treats it as done.
    assert_eq!(h.client.cancel(&started.order).await, Ok(()));
    assert_eq!(h.sim.cancels(), 2);
}

#[tokio::test]
async fn order_counts_follow_starts_cancels_and_open_orders() {
    let h = harness().await;
    let mut counts = h.sim.counts();
    assert_eq!(*counts.borrow_and_update(), OrderCounts::default());
    let started = h
        .client
        .start(&order(&Scenario::Approve.number()))
        .await
        .unwrap();
    let seen = *counts.wait_for(|c| c.open == 1).await.unwrap();
    assert_eq!(
        seen,
        OrderCounts {
            open: 1,
            starts: 1,
            cancels: 0
        }
    );
    assert_eq!(h.client.cancel(&started.order).await, Ok(()));
    let seen = *counts.wait_for(|c| c.open == 0).await.unwrap();
    assert_eq!(
        seen,
        OrderCounts {
            open: 0,
            starts: 1,
            cancels: 1
        }
    );
}

#[tokio::test]
async fn collect_of_an_unknown_order_is_fatal() {
    let h = harness().await;
    assert_eq!(
        h.client.poll(&OrderRef("no-such-order".into())).await,
        Err(ProviderError::Fatal)
    );
    assert_eq!(h.sim.collect_times("no-such-order").len(), 1);
}

#[tokio::test]
async fn invalid_number_is_rejected_as_invalid_number() {
    let h = harness().await;
    // 12 digits, wrong check digit: a PersonalNumber cannot hold it, so send the wire body directly.
    let (status, body) = raw(
        &h.sim,
        reqwest::Method::POST,
        "phone/auth",
        Some("application/json"),
        r#"{"personalNumber":"198001011232","callInitiator":"user"}"#,
    )
    .await;
    assert_eq!(status, 400);
    assert_eq!(body["errorCode"], "invalidParameters");
    assert_eq!(h.sim.open_orders(), 0);
}

#[tokio::test]
async fn uncollected_orders_expire() {
    let h = harness_with(Duration::from_millis(5), Duration::from_secs(5)).await;
    let started = h
        .client
        .start(&order(&Scenario::Approve.number()))
        .await
        .unwrap();
    h.sim.wait_for_open_orders(1).await;
    tokio::time::timeout(Duration::from_secs(10), h.sim.wait_for_open_orders(0))
        .await
        .unwrap();
    assert_eq!(
        h.client.poll(&started.order).await,
        Ok(Poll::Failed(Reason::Expired))
    );
}

#[tokio::test]
async fn collect_times_are_recorded_per_order() {
    let h = harness().await;
    let started = h
        .client
        .start(&order(&Scenario::UserCancels.number()))
        .await
        .unwrap();
    let mut polls = 0;
    loop {
        polls += 1;
        if !matches!(h.client.poll(&started.order).await, Ok(Poll::Pending(_))) {
            break;
        }
        assert!(polls < MAX_POLLS);
        tokio::time::sleep(STEP / 2).await;
    }
    let times = h.sim.collect_times(&started.order.0);
    assert_eq!(times.len(), polls);
    assert!(times.windows(2).all(|w| w[0] <= w[1]));
}

/// Sends a raw request to the simulator.
async fn raw(
    sim: &Simulator,
    method: reqwest::Method,
    path: &str,
    content_type: Option<&str>,
    body: &str,
) -> (u16, serde_json::Value) {
    let tls = crate::idp::bankid::tls_for_tests(None, None);
    let client = reqwest::Client::builder()
        .tls_backend_preconfigured(tls)
        .build()
        .unwrap();
    let mut request = client
        .request(method, format!("{}{path}", sim.url()))
        .body(body.to_owned());
    if let Some(ct) = content_type {
        request = request.header("content-type", ct);
    }
    let response = request.send().await.unwrap();
    let status = response.status().as_u16();
    let body = response.json().await.unwrap_or(serde_json::Value::Null);
    (status, body)
}

/// method, path, content type, body, expected status, expected errorCode.
type RawCase<'a> = (
    reqwest::Method,
    &'a str,
    Option<&'a str>,
    &'a str,
    u16,
    &'a str,
);

#[tokio::test]
async fn protocol_errors_match_bankid() {
    let h = harness().await;
    let json = Some("application/json");
    let start = format!(
        r#"{{"personalNumber":"{}","callInitiator":"user"}}"#,
        Scenario::Approve.number()
    );
    let cases: Vec<RawCase<'_>> = vec![
        (
            reqwest::Method::GET,
            "collect",
            json,
            "{}",
            405,
            "methodNotAllowed",
        ),
        (
            reqwest::Method::PUT,
            "phone/auth",
            json,
            &start,
            405,
            "methodNotAllowed",
        ),
        (
            reqwest::Method::POST,
            "phone/auth",
            Some("application/json; charset=utf-8"),
            &start,
            415,
            "unsupportedMediaType",
        ),
        (
            reqwest::Method::POST,
            "phone/auth",
            None,
            &start,
            415,
            "unsupportedMediaType",
        ),
        (
            reqwest::Method::POST,
            "phone/auth",
            Some("text/plain"),
            &start,
            415,
            "unsupportedMediaType",
        ),
        (
            reqwest::Method::POST,
            "phone/auth",
            json,
            "{nope",
            400,
            "invalidParameters",
        ),
        (
            reqwest::Method::POST,
            "phone/auth",
            json,
            r#"{"personalNumber":"198001011231","callInitiator":"someone"}"#,
            400,
            "invalidParameters",
        ),
        (
            reqwest::Method::POST,
            "collect",
            json,
            "[]",
            400,
            "invalidParameters",
        ),
        (
            reqwest::Method::POST,
            "cancel",
            json,
            r#"{"orderRef":"x"}"#,
            400,
            "invalidParameters",
        ),
        (reqwest::Method::POST, "auth", json, "{}", 404, "notFound"),
    ];
    for (method, path, ct, body, status, code) in cases {
        let (got, answer) = raw(&h.sim, method.clone(), path, ct, body).await;
        assert_eq!(got, status, "{method} {path} {ct:?} {body}");
        assert_eq!(answer["errorCode"], code, "{method} {path} {ct:?}");
    }
    assert_eq!(h.sim.open_orders(), 0);
}

#[tokio::test]
async fn reqwest_json_sends_exactly_application_json() {
    let h = harness().await;
    let tls = crate::idp::bankid::tls_for_tests(None, None);
    let client = reqwest::Client::builder()
        .tls_backend_preconfigured(tls)
        .build()
        .unwrap();
    let response = client
        .post(format!("{}phone/auth", h.sim.url()))
        .json(&serde_json::json!({
            "personalNumber": Scenario::Approve.number(),
            "callInitiator": "RP",
        }))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(h.sim.open_orders(), 1);
}

#[tokio::test]
async fn shutdown_stops_the_server() {
    let h = harness().await;
    h.client
        .start(&order(&Scenario::Approve.number()))
        .await
        .unwrap();
    h.token.cancel();
    // The listener is closed once the accept loop has seen the cancellation.
    let mut refused = false;
    for _ in 0..100 {
        if h.client.poll(&OrderRef("x".into())).await == Err(ProviderError::NotSent) {
            refused = true;
            break;
        }
        tokio::task::yield_now().await;
    }
    assert!(refused);
}

#[tokio::test]
async fn dropping_a_tls_simulator_removes_its_generated_files() {
    let token = CancellationToken::new();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let sim = start(
        listener,
        SimOptions {
            tls: true,
            ..SimOptions::default()
        },
        token,
    )
    .await
    .unwrap();
    let files = sim.files().unwrap().clone();
    for path in [
        &files.server_ca,
        &files.client_cert,
        &files.client_key,
        &files.client_p12,
    ] {
        assert!(path.exists(), "{}", path.display());
    }
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt as _;
        let mode = std::fs::metadata(&files.client_key)
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o077, 0);
    }
    drop(sim);
    assert!(!files.dir.exists());
}

#[tokio::test]
async fn run_cli_serves_until_shutdown() {
    let listen: std::net::SocketAddr = "127.0.0.1:0".parse().unwrap();
    run_cli(listen, SimOptions::default(), async {})
        .await
        .unwrap();
    // A port that cannot be bound is reported, not panicked on.
    let taken = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let result = run_cli(taken.local_addr().unwrap(), SimOptions::default(), async {}).await;
    assert!(matches!(result, Err(Error::Listener(_))), "{result:?}");
}
