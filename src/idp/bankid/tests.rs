//! Tests of the BankID wire types (against `fixtures/bankid`), the answer mapping, and the client against
//! small fault-injecting fake servers and the mutual-TLS simulator.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Body;
use axum::http::Request;
use axum::response::Response;
use base64::Engine as _;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use super::client::{evidence_digest, map_collect, visible_data};
use super::tls::{client_config, x509_version};
use super::wire::*;
use super::{Client, Error};
use crate::idp::sim::{self, Scenario, SimOptions};
use crate::idp::{BankIdSettings, ClientIdentity, Provider};
use crate::outcome::Reason;
use crate::pnr::PersonalNumber;
use crate::secret::Secret;
use crate::verify::{Initiator, Order, OrderRef, Poll, ProviderError, Stage};

const NUMBER: &str = "198001011231";

fn fixture(name: &str) -> String {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("fixtures/bankid")
        .join(format!("{name}.json"));
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn order(number: &str) -> Order {
    Order {
        number: PersonalNumber::parse_swedish_12(number).unwrap(),
        initiator: Initiator::Caller,
        text: Some("Samtal med **kundtjänst**".into()),
        pin_code: true,
    }
}

// ---------------------------------------------------------------------------------------------------
// wire types

#[test]
fn phone_auth_request_fixtures_round_trip() {
    for name in ["phone_auth_request", "phone_auth_request_minimal"] {
        let text = fixture(name);
        let parsed: PhoneAuthRequest = serde_json::from_str(&text).unwrap();
        assert_eq!(parsed.personal_number, NUMBER);
        let back = serde_json::to_value(&parsed).unwrap();
        let original: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(back, original, "{name}");
    }
    let full: PhoneAuthRequest = serde_json::from_str(&fixture("phone_auth_request")).unwrap();
    assert_eq!(full.call_initiator, CallInitiator::User);
    assert_eq!(
        full.user_visible_data_format,
        Some(VisibleDataFormat::SimpleMarkdownV1)
    );
    assert_eq!(full.requirement.and_then(|r| r.pin_code), Some(true));
    let minimal: PhoneAuthRequest =
        serde_json::from_str(&fixture("phone_auth_request_minimal")).unwrap();
    assert_eq!(minimal.call_initiator, CallInitiator::Rp);
    assert!(!format!("{minimal:?}").contains(NUMBER));
}

#[test]
fn order_ref_fixtures_parse() {
    let r: PhoneAuthResponse = serde_json::from_str(&fixture("phone_auth_response")).unwrap();
    let c: OrderRefRequest = serde_json::from_str(&fixture("collect_request")).unwrap();
    let x: OrderRefRequest = serde_json::from_str(&fixture("cancel_request")).unwrap();
    assert_eq!(r.order_ref, c.order_ref);
    assert_eq!(c, x);
    let _: CancelResponse = serde_json::from_str(&fixture("cancel_response")).unwrap();
    assert_eq!(serde_json::to_string(&CancelResponse {}).unwrap(), "{}");
}

const PENDING: [(&str, HintCode, Stage); 6] = [
    (
        "outstandingTransaction",
        HintCode::OutstandingTransaction,
        Stage::AwaitingApp,
    ),
    ("noClient", HintCode::NoClient, Stage::AwaitingApp),
    ("started", HintCode::Started, Stage::AwaitingApp),
    ("userMrtd", HintCode::UserMrtd, Stage::Identifying),
    (
        "userCallConfirm",
        HintCode::UserCallConfirm,
        Stage::ConfirmingCall,
    ),
    ("userSign", HintCode::UserSign, Stage::Identifying),
];

const FAILED: [(&str, HintCode, Reason); 8] = [
    (
        "expiredTransaction",
        HintCode::ExpiredTransaction,
        Reason::Expired,
    ),
    (
        "certificateErr",
        HintCode::CertificateErr,
        Reason::IdBlocked,
    ),
    ("userCancel", HintCode::UserCancel, Reason::UserCancelled),
    ("cancelled", HintCode::Cancelled, Reason::Superseded),
    ("startFailed", HintCode::StartFailed, Reason::Expired),
    (
        "userDeclinedCall",
        HintCode::UserDeclinedCall,
        Reason::DeclinedCall,
    ),
    (
        "notSupportedByUserApp",
        HintCode::NotSupportedByUserApp,
        Reason::ProviderError,
    ),
    (
        "transactionRiskBlocked",
        HintCode::TransactionRiskBlocked,
        Reason::IdBlocked,
    ),
];

#[test]
fn every_documented_hint_code_has_a_fixture_and_a_mapping() {
    assert_eq!(HintCode::KNOWN.len(), PENDING.len() + FAILED.len());
    for (code, hint, stage) in PENDING {
        let r: CollectResponse =
            serde_json::from_str(&fixture(&format!("collect_pending_{code}"))).unwrap();
        assert_eq!(r.status, Status::Pending);
        assert_eq!(r.hint_code.as_ref(), Some(&hint), "{code}");
        assert_eq!(hint.as_str(), code);
        assert_eq!(map_collect(r), Ok(Poll::Pending(stage)), "{code}");
    }
    for (code, hint, reason) in FAILED {
        let r: CollectResponse =
            serde_json::from_str(&fixture(&format!("collect_failed_{code}"))).unwrap();
        assert_eq!(r.status, Status::Failed);
        assert_eq!(r.hint_code.as_ref(), Some(&hint), "{code}");
        assert_eq!(map_collect(r), Ok(Poll::Failed(reason)), "{code}");
    }
}

#[test]
fn declined_call_is_never_merged_with_cancel() {
    let declined: CollectResponse =
        serde_json::from_str(&fixture("collect_failed_userDeclinedCall")).unwrap();
    let cancelled: CollectResponse =
        serde_json::from_str(&fixture("collect_failed_userCancel")).unwrap();
    assert_ne!(map_collect(declined), map_collect(cancelled));
}

#[test]
fn unknown_hint_codes_parse_and_map_generically() {
    let pending: CollectResponse =
        serde_json::from_str(&fixture("collect_pending_unknown")).unwrap();
    assert_eq!(
        pending.hint_code,
        Some(HintCode::Unknown("someNewHint".into()))
    );
    assert_eq!(map_collect(pending), Ok(Poll::Pending(Stage::Identifying)));
    let failed: CollectResponse = serde_json::from_str(&fixture("collect_failed_unknown")).unwrap();
    assert_eq!(
        failed.hint_code,
        Some(HintCode::Unknown("someNewFailure".into()))
    );
    assert_eq!(map_collect(failed), Ok(Poll::Failed(Reason::ProviderError)));
    // Unknown codes serialize back unchanged.
    assert_eq!(
        serde_json::to_string(&HintCode::Unknown("x".into())).unwrap(),
        "\"x\""
    );
}

#[test]
fn complete_fixture_parses_and_maps_to_identity() {
    let r: CollectResponse = serde_json::from_str(&fixture("collect_complete")).unwrap();
    let data = r.completion_data.clone().unwrap();
    assert_eq!(data.user.personal_number, NUMBER);
    assert_eq!(data.user.given_name.as_deref(), Some("Karin"));
    assert_eq!(
        data.device.as_ref().and_then(|d| d.ip_address.as_deref()),
        Some("192.0.2.17")
    );
    assert_eq!(data.bank_id_issue_date.as_deref(), Some("2023-04-12"));
    assert_eq!(data.step_up, Some(StepUp { mrtd: Some(true) }));
    assert_eq!(data.risk, Some(Risk::Low));
    let debug = format!("{data:?}");
    assert!(
        !debug.contains(NUMBER) && !debug.contains("Karin"),
        "{debug}"
    );

    let Ok(Poll::Complete(identity)) = map_collect(r) else {
        panic!("not complete");
    };
    assert_eq!(identity.number.expose_for_idp(), NUMBER);
    assert_eq!(identity.name.as_deref(), Some("Karin Lindqvist"));
    assert_eq!(identity.given_name.as_deref(), Some("Karin"));
    assert_eq!(identity.surname.as_deref(), Some("Lindqvist"));
    assert_eq!(
        identity.evidence_digest,
        Some(evidence_digest(&data.signature, &data.ocsp_response))
    );
}

#[test]
fn unparseable_number_in_completion_is_an_identity_mismatch() {
    let mut v: serde_json::Value = serde_json::from_str(&fixture("collect_complete")).unwrap();
    v["completionData"]["user"]["personalNumber"] = "19800101123".into();
    let r: CollectResponse = serde_json::from_value(v).unwrap();
    assert_eq!(map_collect(r), Ok(Poll::Failed(Reason::IdentityMismatch)));
}

#[test]
fn complete_without_completion_data_is_unreadable() {
    let r: CollectResponse =
        serde_json::from_str(r#"{"orderRef":"a","status":"complete"}"#).unwrap();
    assert_eq!(map_collect(r), Err(ProviderError::OutcomeUnknown));
}

#[test]
fn evidence_digest_is_hex_sha256_and_order_sensitive() {
    let d = evidence_digest("c2ln", "b2NzcA==");
    assert_eq!(d.len(), 64);
    assert!(d
        .bytes()
        .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase()));
    assert_ne!(d, evidence_digest("b2NzcA==", "c2ln"));
    assert_ne!(d, evidence_digest("c2l", "nb2NzcA=="));
    // SHA-256 of the empty input framed as "\n".
    assert_eq!(
        evidence_digest("", ""),
        "01ba4719c80b6fe911b091a7c05124b64eeece964e09c058ef8f9805daca546b"
    );
}

#[test]
fn unknown_json_fields_are_ignored() {
    let r: CollectResponse = serde_json::from_str(
        r#"{"orderRef":"a","status":"pending","hintCode":"userSign","newField":{"x":1}}"#,
    )
    .unwrap();
    assert_eq!(r.hint_code, Some(HintCode::UserSign));
    let mut v: serde_json::Value = serde_json::from_str(&fixture("collect_complete")).unwrap();
    v["completionData"]["newThing"] = serde_json::json!([1, 2]);
    v["completionData"]["user"]["middleName"] = "X".into();
    let r: CollectResponse = serde_json::from_value(v).unwrap();
    assert!(r.completion_data.is_some());
    let e: ErrorBody =
        serde_json::from_str(r#"{"errorCode":"maintenance","details":"d","extra":true}"#).unwrap();
    assert_eq!(e.error_code, ErrorCode::Maintenance);
}

#[test]
fn every_documented_error_code_has_a_fixture() {
    for code in ErrorCode::KNOWN {
        let body: ErrorBody =
            serde_json::from_str(&fixture(&format!("error_{}", code.as_str()))).unwrap();
        assert_eq!(&body.error_code, code);
        assert!(!body.details.is_empty());
    }
    let unknown: ErrorBody = serde_json::from_str(&fixture("error_unknown")).unwrap();
    assert_eq!(
        unknown.error_code,
        ErrorCode::Unknown("someNewError".into())
    );
    let no_details: ErrorBody = serde_json::from_str(r#"{"errorCode":"internalError"}"#).unwrap();
    assert_eq!(no_details.details, "");
}

// ---------------------------------------------------------------------------------------------------
// request building

#[test]
fn visible_data_is_base64_and_trimmed_to_the_limit() {
    let short = visible_data("Hej **du**\nrad två").unwrap();
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(&short)
        .unwrap();
    assert_eq!(decoded, "Hej **du**\nrad två".as_bytes());
    assert_eq!(visible_data("  \n"), None);
    assert_eq!(visible_data(""), None);

    // 'å' is two bytes: 1 125 bytes cannot end on a boundary after an odd prefix.
    let long = format!("x{}", "å".repeat(2000));
    let encoded = visible_data(&long).unwrap();
    assert!(
        encoded.len() <= super::MAX_VISIBLE_DATA_B64,
        "{}",
        encoded.len()
    );
    let text = String::from_utf8(
        base64::engine::general_purpose::STANDARD
            .decode(&encoded)
            .unwrap(),
    )
    .unwrap();
    assert!(long.starts_with(&text));
    assert!(text.len() >= 1123);

    let exact = "a".repeat(1125);
    assert_eq!(visible_data(&exact).unwrap().len(), 1500);
}

// ---------------------------------------------------------------------------------------------------
// fake servers

#[derive(Debug, Clone)]
struct Seen {
    method: String,
    path: String,
    content_type: Option<String>,
    body: serde_json::Value,
}

/// A server answering every request with `status`, `headers` and `body`, recording what it saw.
async fn fake(
    status: u16,
    headers: &[(&'static str, &'static str)],
    body: &str,
) -> (BankIdSettings, Arc<Mutex<Vec<Seen>>>) {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let record = seen.clone();
    let headers = headers.to_vec();
    let body = body.to_owned();
    let router = axum::Router::new().fallback(move |req: Request<Body>| {
        let record = record.clone();
        let headers = headers.clone();
        let body = body.clone();
        async move {
            let (parts, req_body) = req.into_parts();
            let bytes = axum::body::to_bytes(req_body, 1 << 20).await.unwrap();
            record.lock().unwrap().push(Seen {
                method: parts.method.to_string(),
                path: parts.uri.path().to_owned(),
                content_type: parts
                    .headers
                    .get("content-type")
                    .map(|v| v.to_str().unwrap().to_owned()),
                body: serde_json::from_slice(&bytes).unwrap_or(serde_json::Value::Null),
            });
            let mut response = Response::builder().status(status);
            for (k, v) in headers {
                response = response.header(k, v);
            }
            response.body(Body::from(body)).unwrap()
        }
    });
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, router).await });
    (plain_settings(addr.port()), seen)
}

fn plain_settings(port: u16) -> BankIdSettings {
    BankIdSettings {
        url: format!("http://127.0.0.1:{port}/rp/v6.0/"),
        identity: None,
        server_ca: None,
        request_timeout: Duration::from_secs(5),
        connect_timeout: Duration::from_secs(2),
    }
}

fn order_ref() -> OrderRef {
    OrderRef("4f1b2c7e-9a3d-4e8b-b6f1-2d7c5a9e0b13".into())
}

#[tokio::test]
async fn start_sends_exactly_the_documented_request() {
    let (settings, seen) = fake(200, &[], &fixture("phone_auth_response")).await;
    let client = Client::new(&settings).unwrap();
    assert_eq!(client.method(), "bankid_phone");
    let started = client.start(&order(NUMBER)).await.unwrap();
    assert_eq!(started.order, order_ref());
    assert_eq!(started.poll_interval, None);

    let mut us = order(NUMBER);
    us.initiator = Initiator::Us;
    us.text = None;
    us.pin_code = false;
    client.start(&us).await.unwrap();

    let seen = seen.lock().unwrap().clone();
    assert_eq!(seen.len(), 2);
    for s in &seen {
        assert_eq!(s.method, "POST");
        assert_eq!(s.path, "/rp/v6.0/phone/auth");
        assert_eq!(s.content_type.as_deref(), Some("application/json"));
        assert_eq!(s.body["personalNumber"], NUMBER);
    }
    let first = &seen[0].body;
    assert_eq!(first["callInitiator"], "user");
    assert_eq!(first["userVisibleDataFormat"], "simpleMarkdownV1");
    assert_eq!(first["requirement"], serde_json::json!({"pinCode": true}));
    let text = base64::engine::general_purpose::STANDARD
        .decode(first["userVisibleData"].as_str().unwrap())
        .unwrap();
    assert_eq!(text, "Samtal med **kundtjänst**".as_bytes());
    let second = seen[1].body.as_object().unwrap();
    assert_eq!(second["callInitiator"], "RP");
    let mut keys: Vec<&str> = second.keys().map(String::as_str).collect();
    keys.sort_unstable();
    assert_eq!(keys, ["callInitiator", "personalNumber"]);
}

#[tokio::test]
async fn collect_and_cancel_post_the_order_ref() {
    let (settings, seen) = fake(200, &[], &fixture("collect_pending_userCallConfirm")).await;
    let client = Client::new(&settings).unwrap();
    assert_eq!(
        client.poll(&order_ref()).await,
        Ok(Poll::Pending(Stage::ConfirmingCall))
    );
    let (settings, seen_cancel) = fake(200, &[], "{}").await;
    let client = Client::new(&settings).unwrap();
    assert_eq!(client.cancel(&order_ref()).await, Ok(()));
    let c = seen.lock().unwrap()[0].clone();
    let x = seen_cancel.lock().unwrap()[0].clone();
    assert_eq!(c.path, "/rp/v6.0/collect");
    assert_eq!(x.path, "/rp/v6.0/cancel");
    for s in [c, x] {
        assert_eq!(s.method, "POST");
        assert_eq!(s.content_type.as_deref(), Some("application/json"));
        assert_eq!(
            s.body,
            serde_json::json!({"orderRef": "4f1b2c7e-9a3d-4e8b-b6f1-2d7c5a9e0b13"})
        );
    }
}

#[derive(Debug, Clone, Copy)]
enum Call {
    Start,
    Collect,
    Cancel,
}

async fn call(client: &Client, which: Call) -> Result<(), ProviderError> {
    match which {
        Call::Start => client.start(&order(NUMBER)).await.map(|_| ()),
        Call::Collect => client.poll(&order_ref()).await.map(|_| ()),
        Call::Cancel => client.cancel(&order_ref()).await,
    }
}

#[tokio::test]
async fn error_answers_are_classified() {
    use Call::*;
    let cases: Vec<(Call, u16, &str, Result<(), ProviderError>)> = vec![
        (
            Start,
            400,
            "alreadyInProgress",
            Err(ProviderError::Rejected(Reason::AlreadyInProgress)),
        ),
        (
            Start,
            400,
            "invalidParameters",
            Err(ProviderError::Rejected(Reason::InvalidNumber)),
        ),
        (Collect, 400, "invalidParameters", Err(ProviderError::Fatal)),
        (Cancel, 400, "invalidParameters", Ok(())),
        (Start, 400, "unknown", Err(ProviderError::Fatal)),
        (Collect, 400, "unknown", Err(ProviderError::Fatal)),
        (Cancel, 400, "unknown", Err(ProviderError::Fatal)),
        (Start, 401, "unauthorized", Err(ProviderError::Fatal)),
        (Collect, 403, "unauthorized", Err(ProviderError::Fatal)),
        (Start, 404, "notFound", Err(ProviderError::Fatal)),
        (Start, 405, "methodNotAllowed", Err(ProviderError::Fatal)),
        (
            Start,
            415,
            "unsupportedMediaType",
            Err(ProviderError::Fatal),
        ),
        (
            Start,
            408,
            "requestTimeout",
            Err(ProviderError::OutcomeUnknown),
        ),
        (Collect, 408, "requestTimeout", Err(ProviderError::Fatal)),
        (Collect, 500, "internalError", Err(ProviderError::Fatal)),
        (
            Start,
            500,
            "internalError",
            Err(ProviderError::OutcomeUnknown),
        ),
        (
            Cancel,
            500,
            "internalError",
            Err(ProviderError::OutcomeUnknown),
        ),
        (Start, 503, "maintenance", Err(ProviderError::Unavailable)),
        (Collect, 503, "maintenance", Err(ProviderError::Unavailable)),
        (Start, 418, "unknown", Err(ProviderError::Fatal)),
    ];
    for (which, status, body, expected) in cases {
        let (settings, _) = fake(status, &[], &fixture(&format!("error_{body}"))).await;
        let client = Client::new(&settings).unwrap();
        assert_eq!(
            call(&client, which).await,
            expected,
            "{which:?} {status} {body}"
        );
    }
}

#[tokio::test]
async fn rate_limit_reset_becomes_retry_after() {
    let (settings, _) = fake(
        429,
        &[
            ("RateLimit-Limit", "10"),
            ("RateLimit-Remaining", "0"),
            ("RateLimit-Reset", "7"),
        ],
        &fixture("error_tooManyRequests"),
    )
    .await;
    let client = Client::new(&settings).unwrap();
    assert_eq!(
        client.start(&order(NUMBER)).await.map(|_| ()),
        Err(ProviderError::RateLimited {
            retry_after: Some(Duration::from_secs(7))
        })
    );
    let (settings, _) = fake(429, &[], &fixture("error_tooManyRequests")).await;
    let client = Client::new(&settings).unwrap();
    assert_eq!(
        client.poll(&order_ref()).await,
        Err(ProviderError::RateLimited { retry_after: None })
    );
}

#[tokio::test]
async fn malformed_or_empty_success_bodies_are_outcome_unknown() {
    for body in ["{not json", "", r#"{"orderRef": 5}"#, r#"{"status":"odd"}"#] {
        let (settings, _) = fake(200, &[], body).await;
        let client = Client::new(&settings).unwrap();
        assert_eq!(
            call(&client, Call::Start).await,
            Err(ProviderError::OutcomeUnknown),
            "{body}"
        );
        assert_eq!(
            call(&client, Call::Collect).await,
            Err(ProviderError::OutcomeUnknown),
            "{body}"
        );
    }
    // A malformed error body still classifies by status.
    let (settings, _) = fake(503, &[], "<html>").await;
    let client = Client::new(&settings).unwrap();
    assert_eq!(
        call(&client, Call::Start).await,
        Err(ProviderError::Unavailable)
    );
}

#[tokio::test]
async fn connection_refused_is_not_sent() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    drop(listener);
    let client = Client::new(&plain_settings(port)).unwrap();
    for which in [Call::Start, Call::Collect, Call::Cancel] {
        assert_eq!(
            call(&client, which).await,
            Err(ProviderError::NotSent),
            "{which:?}"
        );
    }
}

/// Accepts connections, reads the request, and then either holds the socket open silently
/// (`answer == false`) or closes it without answering.
async fn silent_server(close: bool) -> (BankIdSettings, tokio::sync::mpsc::Receiver<()>) {
    use tokio::io::AsyncReadExt as _;
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let (tx, rx) = tokio::sync::mpsc::channel(8);
    tokio::spawn(async move {
        let mut held = Vec::new();
        loop {
            let (mut stream, _) = listener.accept().await.unwrap();
            let mut buf = [0u8; 4096];
            let _ = stream.read(&mut buf).await;
            let _ = tx.send(()).await;
            if close {
                drop(stream);
            } else {
                held.push(stream);
            }
        }
    });
    let mut settings = plain_settings(port);
    settings.request_timeout = Duration::from_millis(300);
    (settings, rx)
}

#[tokio::test]
async fn timeout_after_sending_is_outcome_unknown() {
    let (settings, mut received) = silent_server(false).await;
    let client = Client::new(&settings).unwrap();
    assert_eq!(
        call(&client, Call::Start).await,
        Err(ProviderError::OutcomeUnknown)
    );
    assert_eq!(
        received.recv().await,
        Some(()),
        "the request reached the server"
    );
    assert_eq!(
        call(&client, Call::Collect).await,
        Err(ProviderError::OutcomeUnknown)
    );
}

#[tokio::test]
async fn connection_closed_after_sending_is_outcome_unknown() {
    let (settings, mut received) = silent_server(true).await;
    let client = Client::new(&settings).unwrap();
    assert_eq!(
        call(&client, Call::Start).await,
        Err(ProviderError::OutcomeUnknown)
    );
    assert_eq!(received.recv().await, Some(()));
}

// ---------------------------------------------------------------------------------------------------
// configuration and mutual TLS

#[test]
fn settings_that_cannot_work_are_refused() {
    let mut s = BankIdSettings {
        identity: None,
        server_ca: Some("/nonexistent/ca.pem".into()),
        ..BankIdSettings::default()
    };
    let e = Client::new(&s).unwrap_err();
    assert!(matches!(e, Error::Url { .. }), "{e}");
    assert!(e.to_string().contains("identity"), "{e}");

    s.identity = Some(ClientIdentity::Pem {
        cert: "/nonexistent/client.pem".into(),
        key: "/nonexistent/client.key".into(),
    });
    let e = Client::new(&s).unwrap_err();
    assert!(e.to_string().contains("/nonexistent/ca.pem"), "{e}");

    s.server_ca = None;
    assert!(Client::new(&s)
        .unwrap_err()
        .to_string()
        .contains("server_ca"));

    s.url = "http://127.0.0.1:1/rp/v6.0/".into();
    assert!(matches!(Client::new(&s), Err(Error::Url { .. })));

    s.url = "ftp://example.com/".into();
    s.identity = None;
    assert!(matches!(Client::new(&s), Err(Error::Url { .. })));

    // Without the trailing slash the base still resolves the endpoints under it.
    s.url = "http://127.0.0.1:1/rp/v6.0".into();
    assert!(Client::new(&s).is_ok());
}

async fn tls_sim() -> (sim::Simulator, CancellationToken) {
    let token = CancellationToken::new();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let sim = sim::start(
        listener,
        SimOptions {
            tls: true,
            step: Duration::from_millis(20),
            cert_dir: None,
        },
        token.clone(),
    )
    .await
    .unwrap();
    (sim, token)
}

async fn approve(client: &Client) -> Poll {
    let started = client
        .start(&order(&Scenario::Approve.number()))
        .await
        .unwrap();
    for _ in 0..400 {
        match client.poll(&started.order).await.unwrap() {
            Poll::Pending(_) => tokio::time::sleep(Duration::from_millis(10)).await,
            end => return end,
        }
    }
    panic!("order did not end");
}

#[tokio::test]
async fn mutual_tls_with_pkcs12_and_pem_identities() {
    let (sim, _token) = tls_sim().await;
    let files = sim.files().unwrap().clone();
    assert!(sim.url().starts_with("https://127.0.0.1:"));

    // PKCS#12 written by the simulator (AES) and loaded by the client.
    let settings = sim.settings();
    assert!(matches!(
        settings.identity,
        Some(ClientIdentity::Pkcs12 { .. })
    ));
    let client = Client::new(&settings).unwrap();
    assert!(matches!(approve(&client).await, Poll::Complete(_)));

    let client = Client::new(&sim.settings_pem()).unwrap();
    assert!(matches!(approve(&client).await, Poll::Complete(_)));
    assert_eq!(sim.starts(), 2);
    assert!(files.client_p12.exists() && files.client_key.exists());
}

#[tokio::test]
async fn wrong_pkcs12_password_is_a_clear_error() {
    let (sim, _token) = tls_sim().await;
    let mut settings = sim.settings();
    let path = sim.files().unwrap().client_p12.clone();
    settings.identity = Some(ClientIdentity::Pkcs12 {
        path: path.clone(),
        password: Secret::new("not the password"),
    });
    let e = Client::new(&settings).unwrap_err();
    assert!(matches!(e, Error::Pkcs12Password { .. }), "{e:?}");
    let message = e.to_string();
    assert!(message.contains(&path.display().to_string()), "{message}");
    assert!(message.contains("password"), "{message}");
    assert!(!message.contains(sim.files().unwrap().p12_password.expose()));

    let garbage = sim.files().unwrap().dir.join("garbage.p12");
    std::fs::write(&garbage, b"not a pkcs12 file").unwrap();
    settings.identity = Some(ClientIdentity::Pkcs12 {
        path: garbage.clone(),
        password: Secret::new("x"),
    });
    let e = Client::new(&settings).unwrap_err();
    assert!(matches!(e, Error::Identity { .. }), "{e:?}");
    assert!(e.to_string().contains("garbage.p12"), "{e}");
}

#[tokio::test]
async fn pem_identity_problems_name_the_file() {
    let (sim, _token) = tls_sim().await;
    let files = sim.files().unwrap();
    // A certificate file given as the key.
    let mut settings = sim.settings();
    settings.identity = Some(ClientIdentity::Pem {
        cert: files.client_cert.clone(),
        key: files.client_cert.clone(),
    });
    let e = Client::new(&settings).unwrap_err();
    assert!(
        e.to_string()
            .contains(&files.client_cert.display().to_string()),
        "{e}"
    );
    // A missing file: the path, then the cause once (as `main` prints a startup error).
    let missing = files.dir.join("missing.crt");
    settings.identity = Some(ClientIdentity::Pem {
        cert: missing.clone(),
        key: files.client_key.clone(),
    });
    let e = anyhow::Error::new(Client::new(&settings).unwrap_err());
    let shown = format!("{e:#}");
    assert!(
        shown.starts_with(&format!("cannot read {}: ", missing.display())),
        "{shown}"
    );
    assert_eq!(shown.matches("os error 2").count(), 1, "{shown}");
    // A server_ca without certificates.
    settings = sim.settings();
    settings.server_ca = Some(files.client_key.clone());
    let e = Client::new(&settings).unwrap_err();
    assert!(e.to_string().contains("client.key"), "{e}");
}

fn v1_fixture() -> (PathBuf, PathBuf) {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fixtures/bankid");
    (dir.join("rp_v1.crt"), dir.join("rp_v1.key"))
}

fn pem_ders(path: &std::path::Path) -> Vec<Vec<u8>> {
    use rustls_pki_types::pem::PemObject;
    rustls_pki_types::CertificateDer::pem_file_iter(path)
        .unwrap()
        .map(|c| c.unwrap().to_vec())
        .collect()
}

#[tokio::test]
async fn x509_versions_are_read_from_der() {
    let (sim, _token) = tls_sim().await;
    let generated = pem_ders(&sim.files().unwrap().client_cert);
    assert_eq!(generated.len(), 2);
    for der in &generated {
        assert_eq!(x509_version(der), Some(3));
    }
    let v1 = pem_ders(&v1_fixture().0);
    assert_eq!(x509_version(&v1[0]), Some(1));
    // Cut short or not a certificate: unknown, left to rustls.
    assert_eq!(x509_version(&generated[0][..40]), None);
    assert_eq!(x509_version(b"not a certificate"), None);
    assert_eq!(x509_version(&[]), None);
}

#[tokio::test]
async fn an_x509_v1_rp_certificate_is_refused_up_front_naming_the_file() {
    let (sim, _token) = tls_sim().await;
    let (cert, key) = v1_fixture();
    let check = |settings: &BankIdSettings, file: &std::path::Path, what: &str| {
        let e = Client::new(settings).unwrap_err();
        assert!(matches!(e, Error::Identity { .. }), "{e:?}");
        let message = e.to_string();
        assert!(
            message.starts_with(&file.display().to_string()),
            "{message}"
        );
        assert!(message.contains(what), "{message}");
        assert!(message.contains("must be X.509 v3"), "{message}");
    };

    // PEM.
    let mut settings = sim.settings();
    settings.identity = Some(ClientIdentity::Pem {
        cert: cert.clone(),
        key: key.clone(),
    });
    check(&settings, &cert, "the RP certificate is X.509 v1");

    // The same certificate and key as PKCS#12.
    use p12_keystore::{Certificate, KeyStore, KeyStoreEntry, PrivateKey, PrivateKeyChain};
    use rustls_pki_types::pem::PemObject;
    let key_der = rustls_pki_types::PrivatePkcs8KeyDer::from_pem_file(&key).unwrap();
    let mut store = KeyStore::new();
    let chain = PrivateKeyChain::new(
        "rp",
        PrivateKey::from_der(key_der.secret_pkcs8_der()).unwrap(),
        [Certificate::from_der(&pem_ders(&cert)[0]).unwrap()],
    );
    store.add_entry("rp", KeyStoreEntry::PrivateKeyChain(chain));
    let p12 = store
        .writer("pw")
        .encryption_algorithm(p12_keystore::EncryptionAlgorithm::PbeWithHmacSha256AndAes256)
        .mac_algorithm(p12_keystore::MacAlgorithm::HmacSha256)
        .write()
        .unwrap();
    let p12_path = sim.files().unwrap().dir.join("rp_v1.p12");
    std::fs::write(&p12_path, p12).unwrap();
    settings.identity = Some(ClientIdentity::Pkcs12 {
        path: p12_path.clone(),
        password: Secret::new("pw"),
    });
    check(&settings, &p12_path, "the RP certificate is X.509 v1");

    // A v3 RP certificate whose chain file also carries a v1 certificate.
    let files = sim.files().unwrap();
    let mixed = files.dir.join("mixed_chain.pem");
    let mut text = std::fs::read_to_string(&files.client_cert).unwrap();
    text.push_str(&std::fs::read_to_string(&cert).unwrap());
    std::fs::write(&mixed, text).unwrap();
    settings.identity = Some(ClientIdentity::Pem {
        cert: mixed.clone(),
        key: files.client_key.clone(),
    });
    check(&settings, &mixed, "certificate 3 in the chain");

    // The simulator's own v3 identity still loads.
    assert!(Client::new(&sim.settings_pem()).is_ok());
}

/// A reqwest client trusting the simulator's root, with `identity` (possibly none).
fn raw_client(sim: &sim::Simulator, identity: Option<&ClientIdentity>) -> reqwest::Client {
    let ca = sim.files().unwrap().server_ca.clone();
    let tls = client_config(Some(&ca), identity).unwrap();
    reqwest::Client::builder()
        .tls_backend_preconfigured(tls)
        .timeout(Duration::from_secs(5))
        .build()
        .unwrap()
}

#[tokio::test]
async fn server_refuses_clients_without_an_accepted_certificate() {
    let (sim, _token) = tls_sim().await;
    let dir = sim.files().unwrap().dir.join("foreign");
    let foreign = crate::idp::sim::foreign_client(&dir).unwrap();
    let body =
        serde_json::json!({"personalNumber": Scenario::Approve.number(), "callInitiator": "user"});
    for identity in [None, Some(&foreign)] {
        let result = raw_client(&sim, identity)
            .post(format!("{}phone/auth", sim.url()))
            .json(&body)
            .send()
            .await;
        assert!(result.is_err(), "{identity:?}: {result:?}");
    }
    assert_eq!(sim.starts(), 0);
    // The same request with the simulator's identity is served.
    let ok = raw_client(&sim, Some(&sim.files().unwrap().pem_identity()))
        .post(format!("{}phone/auth", sim.url()))
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(ok.status(), 200);
    assert_eq!(sim.starts(), 1);
}

#[tokio::test]
async fn a_refused_handshake_is_logged_with_its_cause() {
    let (sim, _token) = tls_sim().await;
    let files = sim.files().unwrap();
    let mut settings = sim.settings();
    settings.identity = Some(crate::idp::sim::foreign_client(&files.dir.join("foreign")).unwrap());
    let client = Client::new(&settings).unwrap();
    let logs = crate::telemetry::LogCapture::default();
    let result = {
        let _guard = logs.install();
        client.start(&order(NUMBER)).await
    };
    assert!(result.is_err(), "{result:?}");
    let text = logs.text();
    let line = text
        .lines()
        .find(|l| l.contains("bankid request failed"))
        .unwrap_or_else(|| panic!("{text}"));
    // reqwest names only its own layer; the TLS cause comes from the source chain.
    assert!(line.contains("error sending request"), "{line}");
    assert!(line.contains("alert"), "{line}");
    assert!(
        line.contains("cause=\"the server refused the RP certificate: "),
        "{line}"
    );
    assert!(!line.contains(NUMBER), "{line}");
}

#[tokio::test]
async fn client_refuses_a_server_not_signed_by_the_configured_root() {
    let (sim_a, _ta) = tls_sim().await;
    let (sim_b, _tb) = tls_sim().await;
    // A's identity (which A accepts), but B's root as the trust anchor.
    let mut settings = sim_a.settings();
    settings.server_ca = sim_b.settings().server_ca;
    let client = Client::new(&settings).unwrap();
    let logs = crate::telemetry::LogCapture::default();
    let started = {
        let _guard = logs.install();
        client.start(&order(NUMBER)).await
    };
    assert_eq!(started.map(|_| ()), Err(ProviderError::NotSent));
    assert_eq!(sim_a.starts(), 0);
    // The log says which side refused what, in words, before the chain.
    let ca = settings.server_ca.as_ref().unwrap().display().to_string();
    let text = logs.text();
    assert!(
        text.contains(&format!(
            "cause=\"server certificate not trusted by server_ca ({ca}): "
        )),
        "{text}"
    );

    // The refusal is the client's certificate check, not the server's.
    let config = client_config(settings.server_ca.as_deref(), settings.identity.as_ref()).unwrap();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let tcp = tokio::net::TcpStream::connect(sim_a.addr()).await.unwrap();
    let name = rustls_pki_types::ServerName::try_from("127.0.0.1").unwrap();
    let err = connector.connect(name, tcp).await.unwrap_err();
    let inner = err
        .get_ref()
        .and_then(|e| e.downcast_ref::<rustls::Error>())
        .cloned();
    // Same subject names, other keys: webpki reports a bad signature (or an unknown issuer).
    assert!(
        matches!(inner, Some(rustls::Error::InvalidCertificate(_))),
        "{err}"
    );
}
