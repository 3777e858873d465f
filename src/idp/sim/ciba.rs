//! A loopback OpenID CIBA provider (poll mode) for tests, the demo and `kind = "ciba_simulator"`:
//! discovery, a JWKS with an ES256 key generated at start, the backchannel authentication endpoint and a
//! token endpoint issuing signed ID tokens. Clients authenticate with HTTP Basic
//! ([`CLIENT_ID`]/[`CLIENT_SECRET`]) or with `private_key_jwt` assertions signed by the client key it
//! generates at start ([`CibaSimulator::client_key_pem`]).
//!
//! Behaviour is chosen by the serial of the personal number (as in the BankID table); each token request
//! advances the script by one answer:
//!
//! | serial | behaviour |
//! |---|---|
//! | any other | `authorization_pending` once, then an ID token for the number |
//! | 901 | pending, then `access_denied` "user cancelled" |
//! | 902 | pending, then `access_denied` "user declined the call" |
//! | 903 | pending, then `expired_token` |
//! | 911 | an ID token for another person |
//! | 913 | `slow_down` once, then pending, then an ID token |
//! | 914 | the acknowledgement carries a word pair (`bindingMessage`); pending, then an ID token |
//! | 915 | an ID token signed by a key that is not in the JWKS (same `kid`) |
//! | 916 | an ID token for another audience |
//! | 917 | an ID token that expired an hour ago |
//!
//! Invariants: binds nothing itself; stops with its shutdown token or when the handle is dropped; logs
//! no number or body.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Form, Json, Router};
use base64::Engine;
use jsonwebtoken::{EncodingKey, Header};
use ring::rand::SystemRandom;
use ring::signature::{EcdsaKeyPair, KeyPair, ECDSA_P256_SHA256_FIXED_SIGNING};
use serde_json::{json, Value};
use tokio::net::TcpListener;
use tokio_util::sync::{CancellationToken, DropGuard};

use super::scenario::{is_valid_number, number_with_serial, TABLE_DATE};
use super::Error;
use crate::idp::ciba::CibaSettings;

/// The client id the simulator accepts.
pub const CLIENT_ID: &str = "callgate-sim";
/// The client secret the simulator accepts.
pub const CLIENT_SECRET: &str = "sim-secret";
/// The word pair of [`CibaScenario::WordPair`].
pub const WORD_PAIR: &str = "blue harbour";
/// The `kid` of the simulator's signing key.
pub const KID: &str = "sim-es256";
/// The name the simulator's ID tokens carry.
pub const NAME: &str = "Anna Andersson";

/// What the simulator does with a request for a given personal number.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CibaScenario {
    Approve,
    UserCancels,
    DeclinesCall,
    Expires,
    WrongPerson,
    SlowDownOnce,
    WordPair,
    BadSignature,
    WrongAudience,
    ExpiredToken,
}

impl CibaScenario {
    pub const ALL: [CibaScenario; 10] = [
        CibaScenario::Approve,
        CibaScenario::UserCancels,
        CibaScenario::DeclinesCall,
        CibaScenario::Expires,
        CibaScenario::WrongPerson,
        CibaScenario::SlowDownOnce,
        CibaScenario::WordPair,
        CibaScenario::BadSignature,
        CibaScenario::WrongAudience,
        CibaScenario::ExpiredToken,
    ];

    pub fn serial(self) -> u16 {
        match self {
            CibaScenario::Approve => 123,
            CibaScenario::UserCancels => 901,
            CibaScenario::DeclinesCall => 902,
            CibaScenario::Expires => 903,
            CibaScenario::WrongPerson => 911,
            CibaScenario::SlowDownOnce => 913,
            CibaScenario::WordPair => 914,
            CibaScenario::BadSignature => 915,
            CibaScenario::WrongAudience => 916,
            CibaScenario::ExpiredToken => 917,
        }
    }

    /// A valid number selecting this scenario.
    pub fn number(self) -> String {
        number_with_serial(TABLE_DATE, self.serial())
    }

    fn of(number: &str) -> CibaScenario {
        let serial = number.get(8..11).and_then(|s| s.parse::<u16>().ok());
        CibaScenario::ALL
            .into_iter()
            .find(|s| Some(s.serial()) == serial && *s != CibaScenario::Approve)
            .unwrap_or(CibaScenario::Approve)
    }

    /// The token-endpoint answers before the final one.
    fn script(self) -> &'static [&'static str] {
        match self {
            CibaScenario::SlowDownOnce => &["slow_down", "authorization_pending"],
            CibaScenario::WrongPerson
            | CibaScenario::BadSignature
            | CibaScenario::WrongAudience
            | CibaScenario::ExpiredToken => &[],
            _ => &["authorization_pending"],
        }
    }
}

struct Request {
    number: String,
    scenario: CibaScenario,
    polls: usize,
}

struct Shared {
    issuer: String,
    key_pkcs8: Vec<u8>,
    /// A second key, never published, for [`CibaScenario::BadSignature`].
    rogue_pkcs8: Vec<u8>,
    /// The client's `private_key_jwt` key (PKCS#8) and its public point's `x`, `y` (base64url).
    client_pkcs8: Vec<u8>,
    client_xy: (String, String),
    jwks: Value,
    requests: Mutex<HashMap<String, Request>>,
}

/// A running CIBA simulator. Dropping it stops the server.
pub struct CibaSimulator {
    addr: SocketAddr,
    shared: Arc<Shared>,
    _stop: DropGuard,
}

impl std::fmt::Debug for CibaSimulator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CibaSimulator")
            .field("addr", &self.addr)
            .finish_non_exhaustive()
    }
}

/// Starts serving on `listener` until `shutdown` fires (or the handle is dropped).
pub async fn start_ciba(
    listener: TcpListener,
    shutdown: CancellationToken,
) -> Result<CibaSimulator, Error> {
    let addr = listener.local_addr().map_err(Error::Listener)?;
    let rng = SystemRandom::new();
    let gen = || {
        EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &rng)
            .map(|d| d.as_ref().to_vec())
            .map_err(|_| Error::Pki("generating the signing key".into()))
    };
    let key_pkcs8 = gen()?;
    let rogue_pkcs8 = gen()?;
    let client_pkcs8 = gen()?;
    let (x, y) = public_xy(&key_pkcs8, &rng)?;
    let client_xy = public_xy(&client_pkcs8, &rng)?;
    let issuer = format!("http://127.0.0.1:{}", addr.port());
    let jwks = json!({"keys": [{
        "kty": "EC", "crv": "P-256", "use": "sig", "alg": "ES256", "kid": KID, "x": x, "y": y
    }]});
    let shared = Arc::new(Shared {
        issuer,
        key_pkcs8,
        rogue_pkcs8,
        client_pkcs8,
        client_xy,
        jwks,
        requests: Mutex::new(HashMap::new()),
    });
    let app = Router::new()
        .route("/.well-known/openid-configuration", get(discovery))
        .route("/jwks", get(jwks_doc))
        .route("/ciba/bc-authorize", post(bc_authorize))
        .route("/oauth2/token", post(token))
        .with_state(shared.clone());
    let token = shutdown.child_token();
    let stop = token.clone();
    tokio::spawn(async move {
        let served = axum::serve(listener, app)
            .with_graceful_shutdown(async move { stop.cancelled().await })
            .await;
        if let Err(e) = served {
            tracing::warn!(error = %e, "ciba simulator stopped");
        }
    });
    Ok(CibaSimulator {
        addr,
        shared,
        _stop: token.drop_guard(),
    })
}

impl CibaSimulator {
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The issuer URL (`http://127.0.0.1:<port>`).
    pub fn issuer(&self) -> &str {
        &self.shared.issuer
    }

    /// Ready-to-use client settings (Swedish-style hint, `ssn` claim, declined calls recognised).
    pub fn settings(&self) -> CibaSettings {
        CibaSettings {
            issuer: self.shared.issuer.clone(),
            client_id: CLIENT_ID.into(),
            client_secret: crate::secret::Secret::new(CLIENT_SECRET),
            declined_call_description: Some("declined the call".into()),
            ..CibaSettings::default()
        }
    }

    /// The client key the simulator accepts `private_key_jwt` assertions from, as PKCS#8 PEM.
    pub fn client_key_pem(&self) -> String {
        let b64 = base64::engine::general_purpose::STANDARD.encode(&self.shared.client_pkcs8);
        let mut pem = String::from("-----BEGIN PRIVATE KEY-----\n");
        for chunk in b64.as_bytes().chunks(64) {
            pem.push_str(&String::from_utf8_lossy(chunk));
            pem.push('\n');
        }
        pem.push_str("-----END PRIVATE KEY-----\n");
        pem
    }

    /// Open requests (those not yet answered with a token or a final error).
    pub fn open_requests(&self) -> usize {
        lock(&self.shared.requests).len()
    }

    /// Signs `claims` with the published key (`rogue`: with a key that is not published).
    pub fn sign(&self, claims: &Value, rogue: bool) -> Option<String> {
        sign(&self.shared, claims, rogue)
    }
}

/// The base64url `x` and `y` of a P-256 key's public point.
fn public_xy(pkcs8: &[u8], rng: &SystemRandom) -> Result<(String, String), Error> {
    let pair = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, pkcs8, rng)
        .map_err(|_| Error::Pki("reading a generated key".into()))?;
    // Uncompressed point: 0x04 || x (32) || y (32).
    let point = pair.public_key().as_ref();
    let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    match (point.get(1..33), point.get(33..65)) {
        (Some(x), Some(y)) => Ok((b64.encode(x), b64.encode(y))),
        _ => Err(Error::Pki("unexpected public key shape".into())),
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn sign(shared: &Shared, claims: &Value, rogue: bool) -> Option<String> {
    let der = if rogue {
        &shared.rogue_pkcs8
    } else {
        &shared.key_pkcs8
    };
    let mut header = Header::new(jsonwebtoken::Algorithm::ES256);
    header.kid = Some(KID.into());
    jsonwebtoken::encode(&header, claims, &EncodingKey::from_ec_der(der)).ok()
}

#[allow(clippy::disallowed_methods)]
fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// HTTP Basic with the simulator's secret, or a `private_key_jwt` assertion signed with its client key
/// for its issuer.
fn authorized(s: &Shared, headers: &HeaderMap, form: &HashMap<String, String>) -> bool {
    if let Some(assertion) = form.get("client_assertion") {
        if form.get("client_assertion_type").map(String::as_str)
            != Some(crate::idp::ciba::ASSERTION_TYPE)
            || form.get("client_id").map(String::as_str) != Some(CLIENT_ID)
        {
            return false;
        }
        let Ok(key) = jsonwebtoken::DecodingKey::from_ec_components(&s.client_xy.0, &s.client_xy.1)
        else {
            return false;
        };
        let mut v = jsonwebtoken::Validation::new(jsonwebtoken::Algorithm::ES256);
        v.set_audience(&[&s.issuer]);
        v.set_issuer(&[CLIENT_ID]);
        return jsonwebtoken::decode::<Value>(assertion, &key, &v).is_ok();
    }
    basic_authorized(headers)
}

fn basic_authorized(headers: &HeaderMap) -> bool {
    let expected = format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(format!("{CLIENT_ID}:{CLIENT_SECRET}"))
    );
    headers
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        == Some(expected.as_str())
}

fn oauth_error(status: StatusCode, error: &str, description: &str) -> Response {
    (
        status,
        Json(json!({"error": error, "error_description": description})),
    )
        .into_response()
}

async fn discovery(State(s): State<Arc<Shared>>) -> Json<Value> {
    Json(json!({
        "issuer": s.issuer,
        "backchannel_authentication_endpoint": format!("{}/ciba/bc-authorize", s.issuer),
        "token_endpoint": format!("{}/oauth2/token", s.issuer),
        "jwks_uri": format!("{}/jwks", s.issuer),
        "backchannel_token_delivery_modes_supported": ["poll"],
        "grant_types_supported": ["urn:openid:params:grant-type:ciba"],
        "token_endpoint_auth_methods_supported": ["client_secret_basic"],
        "id_token_signing_alg_values_supported": ["ES256"],
    }))
}

async fn jwks_doc(State(s): State<Arc<Shared>>) -> Json<Value> {
    Json(s.jwks.clone())
}

async fn bc_authorize(
    State(s): State<Arc<Shared>>,
    headers: HeaderMap,
    Form(form): Form<HashMap<String, String>>,
) -> Response {
    if !authorized(&s, &headers, &form) {
        return oauth_error(
            StatusCode::UNAUTHORIZED,
            "invalid_client",
            "client authentication failed",
        );
    }
    if form
        .get("scope")
        .map(|s| s.split(' ').any(|x| x == "openid"))
        != Some(true)
    {
        return oauth_error(
            StatusCode::BAD_REQUEST,
            "invalid_scope",
            "scope must contain openid",
        );
    }
    let hints = ["login_hint", "login_hint_token", "id_token_hint"]
        .iter()
        .filter(|h| form.contains_key(**h))
        .count();
    if hints != 1 {
        return oauth_error(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            "exactly one hint",
        );
    }
    let number = form
        .get("login_hint")
        .and_then(|h| h.strip_prefix("sub:ssn:"))
        .filter(|n| is_valid_number(n));
    let Some(number) = number else {
        return oauth_error(StatusCode::BAD_REQUEST, "unknown_user_id", "unknown user");
    };
    if let Some(details) = form.get("authorization_details") {
        if serde_json::from_str::<Value>(details).is_err() {
            return oauth_error(
                StatusCode::BAD_REQUEST,
                "invalid_request",
                "authorization_details",
            );
        }
    }
    let scenario = CibaScenario::of(number);
    let id = uuid::Uuid::new_v4().to_string();
    lock(&s.requests).insert(
        id.clone(),
        Request {
            number: number.to_string(),
            scenario,
            polls: 0,
        },
    );
    let mut ack = json!({"auth_req_id": id, "expires_in": 120, "interval": 1});
    if scenario == CibaScenario::WordPair {
        ack["bindingMessage"] = json!(WORD_PAIR);
    }
    Json(ack).into_response()
}

async fn token(
    State(s): State<Arc<Shared>>,
    headers: HeaderMap,
    Form(form): Form<HashMap<String, String>>,
) -> Response {
    if !authorized(&s, &headers, &form) {
        return oauth_error(
            StatusCode::UNAUTHORIZED,
            "invalid_client",
            "client authentication failed",
        );
    }
    if form.get("grant_type").map(String::as_str) != Some(crate::idp::ciba::GRANT_TYPE) {
        return oauth_error(
            StatusCode::BAD_REQUEST,
            "unsupported_grant_type",
            "ciba only",
        );
    }
    let id = form.get("auth_req_id").cloned().unwrap_or_default();
    let mut requests = lock(&s.requests);
    let Some(req) = requests.get_mut(&id) else {
        return oauth_error(
            StatusCode::BAD_REQUEST,
            "invalid_grant",
            "unknown auth_req_id",
        );
    };
    let script = req.scenario.script();
    if let Some(step) = script.get(req.polls) {
        req.polls += 1;
        return oauth_error(StatusCode::BAD_REQUEST, step, "waiting for the user");
    }
    let Some(req) = requests.remove(&id) else {
        return oauth_error(
            StatusCode::BAD_REQUEST,
            "invalid_grant",
            "unknown auth_req_id",
        );
    };
    drop(requests);
    match req.scenario {
        CibaScenario::UserCancels => {
            return oauth_error(StatusCode::BAD_REQUEST, "access_denied", "user cancelled")
        }
        CibaScenario::DeclinesCall => {
            return oauth_error(
                StatusCode::BAD_REQUEST,
                "access_denied",
                "user declined the call",
            )
        }
        CibaScenario::Expires => {
            return oauth_error(
                StatusCode::BAD_REQUEST,
                "expired_token",
                "auth_req_id expired",
            )
        }
        _ => {}
    }
    let now = unix_now();
    let ssn = if req.scenario == CibaScenario::WrongPerson {
        number_with_serial(TABLE_DATE, 321)
    } else {
        req.number
    };
    let aud = if req.scenario == CibaScenario::WrongAudience {
        "someone-else"
    } else {
        CLIENT_ID
    };
    let (iat, exp) = if req.scenario == CibaScenario::ExpiredToken {
        (now - 7200, now - 3600)
    } else {
        (now, now + 300)
    };
    let claims = json!({
        "iss": s.issuer, "aud": aud, "sub": uuid::Uuid::new_v4().to_string(),
        "iat": iat, "nbf": iat, "exp": exp,
        "ssn": ssn, "name": NAME, "given_name": "Anna", "family_name": "Andersson",
        "identityscheme": "sebankid",
    });
    match sign(&s, &claims, req.scenario == CibaScenario::BadSignature) {
        Some(id_token) => Json(json!({
            "access_token": uuid::Uuid::new_v4().to_string(),
            "token_type": "Bearer", "expires_in": 300, "id_token": id_token,
        }))
        .into_response(),
        None => oauth_error(
            StatusCode::INTERNAL_SERVER_ERROR,
            "server_error",
            "signing failed",
        ),
    }
}
