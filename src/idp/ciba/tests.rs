use std::time::Duration;

use serde_json::json;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use super::*;
use crate::idp::sim::{start_ciba, CibaScenario, CibaSimulator};
use crate::verify::{Initiator, Order};

fn fixture(name: &str) -> String {
    let path = format!("{}/fixtures/ciba/{name}", env!("CARGO_MANIFEST_DIR"));
    std::fs::read_to_string(&path).unwrap()
}

async fn sim() -> CibaSimulator {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    start_ciba(listener, CancellationToken::new())
        .await
        .unwrap()
}

fn order(number: &str) -> Order {
    Order {
        number: PersonalNumber::parse_swedish_12(number).unwrap(),
        initiator: Initiator::Caller,
        text: None,
        pin_code: false,
    }
}

/// Polls until the answer is no longer pending; returns it and the pending answers seen before.
async fn run(client: &Client, number: &str) -> (Started, Vec<Poll>, Poll) {
    let started = client.start(&order(number)).await.unwrap();
    let mut pending = Vec::new();
    for _ in 0..10 {
        let p = client.poll(&started.order).await.unwrap();
        match p {
            Poll::Pending(_) | Poll::SlowDown(_) => pending.push(p),
            other => return (started, pending, other),
        }
    }
    panic!("still pending after 10 polls");
}

#[tokio::test]
async fn approve_returns_the_identity_at_the_stated_interval() {
    let sim = sim().await;
    let client = Client::new(&sim.settings()).unwrap();
    let (started, pending, last) = run(&client, &CibaScenario::Approve.number()).await;
    assert_eq!(started.poll_interval, Some(Duration::from_secs(1)));
    assert_eq!(pending, vec![Poll::Pending(Stage::AwaitingApp)]);
    let Poll::Complete(identity) = last else {
        panic!("{last:?}")
    };
    assert_eq!(
        identity.number.expose_for_idp(),
        CibaScenario::Approve.number()
    );
    assert_eq!(identity.name.as_deref(), Some("Anna Andersson"));
    assert_eq!(identity.given_name.as_deref(), Some("Anna"));
    assert_eq!(identity.surname.as_deref(), Some("Andersson"));
    assert_eq!(sim.open_requests(), 0);
}

#[tokio::test]
async fn refusals_map_to_reasons() {
    let sim = sim().await;
    let client = Client::new(&sim.settings()).unwrap();
    for (scenario, reason) in [
        (CibaScenario::UserCancels, Reason::UserCancelled),
        (CibaScenario::DeclinesCall, Reason::DeclinedCall),
        (CibaScenario::Expires, Reason::Expired),
        (CibaScenario::WrongPerson, Reason::IdentityMismatch),
    ] {
        let (_, _, last) = run(&client, &scenario.number()).await;
        assert_eq!(last, Poll::Failed(reason), "{scenario:?}");
    }
}

#[tokio::test]
async fn access_denied_is_user_cancelled_without_a_declined_description() {
    let sim = sim().await;
    let settings = CibaSettings {
        declined_call_description: None,
        ..sim.settings()
    };
    let client = Client::new(&settings).unwrap();
    let (_, _, last) = run(&client, &CibaScenario::DeclinesCall.number()).await;
    assert_eq!(last, Poll::Failed(Reason::UserCancelled));
}

#[tokio::test]
async fn slow_down_is_passed_up_once() {
    let sim = sim().await;
    let client = Client::new(&sim.settings()).unwrap();
    let (_, pending, last) = run(&client, &CibaScenario::SlowDownOnce.number()).await;
    assert_eq!(
        pending,
        vec![
            Poll::SlowDown(Stage::AwaitingApp),
            Poll::Pending(Stage::AwaitingApp)
        ]
    );
    assert!(matches!(last, Poll::Complete(_)));
}

#[tokio::test]
async fn bad_signature_wrong_audience_and_expired_tokens_are_refused() {
    let sim = sim().await;
    let client = Client::new(&sim.settings()).unwrap();
    for scenario in [
        CibaScenario::BadSignature,
        CibaScenario::WrongAudience,
        CibaScenario::ExpiredToken,
    ] {
        let (_, _, last) = run(&client, &scenario.number()).await;
        assert_eq!(last, Poll::Failed(Reason::ProviderError), "{scenario:?}");
    }
}

#[tokio::test]
async fn validation_checks_issuer_and_not_before() {
    let sim = sim().await;
    let client = Client::new(&sim.settings()).unwrap();
    let now = unix_now_for_tests();
    let base = json!({"iss": sim.issuer(), "aud": "callgate-sim", "iat": now, "exp": now + 300,
        "ssn": CibaScenario::Approve.number()});
    let ok = sim.sign(&base, false).unwrap();
    assert!(client.validate(&ok).await.is_ok());
    let mut other_issuer = base.clone();
    other_issuer["iss"] = json!("https://elsewhere.example");
    assert!(client
        .validate(&sim.sign(&other_issuer, false).unwrap())
        .await
        .is_err());
    let mut future = base.clone();
    future["nbf"] = json!(now + 3600);
    assert!(client
        .validate(&sim.sign(&future, false).unwrap())
        .await
        .is_err());
    let mut later = base.clone();
    later["iat"] = json!(now + 3600);
    assert!(client
        .validate(&sim.sign(&later, false).unwrap())
        .await
        .is_err());
    let mut no_iat = base.clone();
    no_iat.as_object_mut().unwrap().remove("iat");
    assert!(client
        .validate(&sim.sign(&no_iat, false).unwrap())
        .await
        .is_err());
    let mut other_person = base;
    other_person["ssn"] = json!(CibaScenario::UserCancels.number());
    let token = sim.sign(&other_person, false).unwrap();
    let asked = PersonalNumber::parse_swedish_12(&CibaScenario::Approve.number()).unwrap();
    assert_eq!(
        client.complete(&token, asked).await,
        Poll::Failed(Reason::IdentityMismatch)
    );
}

#[tokio::test]
async fn an_unknown_kid_refreshes_the_cached_jwks_once() {
    let sim = sim().await;
    let client = Client::new(&sim.settings()).unwrap();
    let stale: JwkSet = serde_json::from_str(&fixture("jwks.json")).unwrap();
    *lock(&client.jwks) = Some(Arc::new(stale));
    let (_, _, last) = run(&client, &CibaScenario::Approve.number()).await;
    assert!(matches!(last, Poll::Complete(_)), "{last:?}");
    let cached = lock(&client.jwks).clone().unwrap();
    assert!(cached.find(crate::idp::sim::CIBA_KID).is_some());
}

#[tokio::test]
async fn word_pair_scenario_acknowledges_with_a_binding_message() {
    let sim = sim().await;
    let client = Client::new(&sim.settings()).unwrap();
    let (started, _, last) = run(&client, &CibaScenario::WordPair.number()).await;
    assert_eq!(started.word_pair.as_deref(), Some("blue harbour"));
    assert!(matches!(last, Poll::Complete(_)));
    let (started, _, _) = run(&client, &CibaScenario::Approve.number()).await;
    assert_eq!(started.word_pair, None);
}

#[tokio::test]
async fn cancel_forgets_the_request_and_a_later_token_is_not_trusted() {
    let sim = sim().await;
    let client = Client::new(&sim.settings()).unwrap();
    let started = client
        .start(&order(&CibaScenario::Approve.number()))
        .await
        .unwrap();
    client.cancel(&started.order).await.unwrap();
    let _pending = client.poll(&started.order).await.unwrap();
    assert_eq!(
        client.poll(&started.order).await.unwrap(),
        Poll::Failed(Reason::ProviderError)
    );
}

#[tokio::test]
async fn wrong_credentials_and_unknown_users_are_refused_at_start() {
    let sim = sim().await;
    let bad = CibaSettings {
        client_secret: Secret::new("wrong"),
        ..sim.settings()
    };
    let client = Client::new(&bad).unwrap();
    let err = client.start(&order(&CibaScenario::Approve.number())).await;
    assert_eq!(err, Err(ProviderError::Fatal));
    let hint = CibaSettings {
        login_hint: "sub:email:{number}".into(),
        ..sim.settings()
    };
    let client = Client::new(&hint).unwrap();
    let err = client.start(&order(&CibaScenario::Approve.number())).await;
    assert_eq!(err, Err(ProviderError::Rejected(Reason::InvalidNumber)));
}

#[tokio::test]
async fn an_unreachable_provider_is_not_sent() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    drop(listener);
    let settings = CibaSettings {
        issuer: format!("http://127.0.0.1:{port}"),
        ..CibaSettings::default()
    };
    let client = Client::new(&settings).unwrap();
    let err = client.start(&order(&CibaScenario::Approve.number())).await;
    assert_eq!(err, Err(ProviderError::NotSent));
}

#[test]
fn the_form_carries_one_hint_the_template_and_the_initiator() {
    let settings = CibaSettings {
        issuer: "http://127.0.0.1:1".into(),
        acr_values: Some("urn:grn:authn:se:bankid".into()),
        binding_message: Some("Callgate".into()),
        requested_expiry: Some(120),
        authorization_details: Some(
            r#"[{"type":"phoneAuth","callInitiator":"{call_initiator}"}]"#.into(),
        ),
        ..CibaSettings::default()
    };
    let client = Client::new(&settings).unwrap();
    let number = CibaScenario::Approve.number();
    let mut o = order(&number);
    let form = client.backchannel_form(&o);
    let get = |form: &[(&str, String)], k: &str| {
        form.iter().find(|(n, _)| *n == k).map(|(_, v)| v.clone())
    };
    assert_eq!(get(&form, "scope").as_deref(), Some("openid"));
    assert_eq!(get(&form, "login_hint"), Some(format!("sub:ssn:{number}")));
    assert_eq!(
        form.iter()
            .filter(|(k, _)| k.ends_with("hint") || *k == "id_token_hint")
            .count(),
        1
    );
    assert_eq!(
        get(&form, "acr_values").as_deref(),
        Some("urn:grn:authn:se:bankid")
    );
    assert_eq!(get(&form, "binding_message").as_deref(), Some("Callgate"));
    assert_eq!(get(&form, "requested_expiry").as_deref(), Some("120"));
    let details = get(&form, "authorization_details").unwrap();
    let v: serde_json::Value = serde_json::from_str(&details).unwrap();
    assert_eq!(v[0]["callInitiator"], "user");
    o.text = Some("Queue text".into());
    assert_eq!(
        get(&client.backchannel_form(&o), "binding_message").as_deref(),
        Some("Queue text")
    );
    let words = Client::new(&CibaSettings {
        word_pair: true,
        ..settings.clone()
    })
    .unwrap();
    assert_eq!(get(&words.backchannel_form(&o), "binding_message"), None);
    o.initiator = Initiator::Us;
    let form = client.backchannel_form(&o);
    let v: serde_json::Value =
        serde_json::from_str(&get(&form, "authorization_details").unwrap()).unwrap();
    assert_eq!(v[0]["callInitiator"], "RP");
}

#[test]
fn fixtures_parse_as_the_wire_types() {
    let d: Discovery = serde_json::from_str(&fixture("discovery.json")).unwrap();
    assert!(d
        .backchannel_authentication_endpoint
        .ends_with("/ciba/bc-authorize"));
    let a: Acknowledgement = serde_json::from_str(&fixture("backchannel_response.json")).unwrap();
    assert_eq!(
        (a.expires_in, a.interval, a.binding_message),
        (120, Some(3), None)
    );
    let a: Acknowledgement =
        serde_json::from_str(&fixture("backchannel_response_word_pair.json")).unwrap();
    assert_eq!(a.binding_message.as_deref(), Some("blue harbour"));
    for (file, code) in [
        ("token_authorization_pending.json", "authorization_pending"),
        ("token_slow_down.json", "slow_down"),
        ("token_expired_token.json", "expired_token"),
        ("token_access_denied.json", "access_denied"),
    ] {
        let e: ErrorBody = serde_json::from_str(&fixture(file)).unwrap();
        assert_eq!(e.error, code);
    }
    let set: JwkSet = serde_json::from_str(&fixture("jwks.json")).unwrap();
    assert!(DecodingKey::from_jwk(set.find("fixture-1").unwrap()).is_ok());
}

#[test]
fn an_https_issuer_needs_a_ca() {
    let settings = CibaSettings {
        issuer: "https://broker.example".into(),
        ..CibaSettings::default()
    };
    assert!(Client::new(&settings).is_err());
}

#[allow(clippy::disallowed_methods)]
fn unix_now_for_tests() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

#[tokio::test]
async fn private_key_jwt_authenticates_with_a_signed_assertion() {
    let sim = sim().await;
    let dir = std::env::temp_dir().join(format!("callgate-ciba-{}", uuid::Uuid::new_v4()));
    std::fs::create_dir_all(&dir).unwrap();
    let key = dir.join("client.pem");
    std::fs::write(&key, sim.client_key_pem()).unwrap();
    let settings = CibaSettings {
        client_secret: Secret::default(),
        client_key: Some(key.clone()),
        client_key_id: Some("callgate-1".into()),
        ..sim.settings()
    };
    let client = Client::new(&settings).unwrap();
    let (_, _, last) = run(&client, &CibaScenario::Approve.number()).await;
    assert!(matches!(last, Poll::Complete(_)), "{last:?}");
    // Another key is refused.
    let other = dir.join("other.pem");
    let rng = ring::rand::SystemRandom::new();
    let der = ring::signature::EcdsaKeyPair::generate_pkcs8(
        &ring::signature::ECDSA_P256_SHA256_FIXED_SIGNING,
        &rng,
    )
    .unwrap();
    std::fs::write(&other, der.as_ref()).unwrap();
    let client = Client::new(&CibaSettings {
        client_key: Some(other),
        ..settings.clone()
    })
    .unwrap();
    let err = client.start(&order(&CibaScenario::Approve.number())).await;
    assert_eq!(err, Err(ProviderError::Fatal));
    // A file that is not a P-256 key is refused when the client is built.
    let junk = dir.join("junk.pem");
    std::fs::write(
        &junk,
        "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n",
    )
    .unwrap();
    assert!(Client::new(&CibaSettings {
        client_key: Some(junk),
        ..settings
    })
    .is_err());
    let _ = std::fs::remove_dir_all(&dir);
}
