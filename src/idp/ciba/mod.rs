//! OpenID Connect CIBA client (poll mode) for eID brokers: discovery, the backchannel authentication
//! request, token polling and ID-token validation against the provider's JWKS.
//!
//! Mapping to `verify` inputs:
//! - acknowledgement → `Started` with the provider's `interval` (5 s when absent);
//! - `authorization_pending` → `Poll::Pending(AwaitingApp)`; `slow_down` → `Poll::SlowDown` (the session
//!   polls 5 s slower for the rest of the check);
//! - `expired_token` → `expired`; `access_denied` → `user_cancelled`, or `declined_call` when the error
//!   description contains the configured `declined_call_description`;
//! - a valid ID token whose number claim differs from the number asked for → `identity_mismatch`.
//!
//! Client authentication: `client_secret_basic`, or `private_key_jwt` with an EC P-256 key (an ES256
//! assertion per request, audience the issuer).
//!
//! Cancel: CIBA defines no cancel, so callgate only forgets the request; the provider ends it at
//! `expires_in`.
//!
//! Invariants: the personal number appears only in the form body of the backchannel request (never in a
//! URL, never logged); discovery and the JWKS are fetched once and cached, the JWKS is refreshed once when
//! a token names an unknown `kid`.

mod wire;

#[cfg(test)]
mod tests;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use jsonwebtoken::jwk::JwkSet;
use jsonwebtoken::{DecodingKey, Validation};
use reqwest::{StatusCode, Url};
use serde::Deserialize;

use crate::idp::{BoxFuture, Provider};
use crate::outcome::{Identity, Reason};
use crate::pnr::PersonalNumber;
use crate::secret::Secret;
use crate::verify::{Initiator, Order, OrderRef, Poll, ProviderError, Stage, Started};

pub use wire::{Acknowledgement, Discovery, ErrorBody, GRANT_TYPE};

/// The poll interval when the acknowledgement states none.
pub const DEFAULT_INTERVAL: Duration = Duration::from_secs(5);
/// `client_assertion_type` of `private_key_jwt`.
pub const ASSERTION_TYPE: &str = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer";
/// How long a client assertion is valid.
pub const ASSERTION_LIFETIME_SECS: u64 = 60;
/// Clock skew allowed on `exp`, `nbf` and `iat`.
pub const LEEWAY_SECS: u64 = 30;

/// Settings of a CIBA provider (`[idp.<name>] kind = "ciba"`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CibaSettings {
    /// The issuer URL; discovery is read from `<issuer>/.well-known/openid-configuration`.
    pub issuer: String,
    pub client_id: String,
    /// Sent with HTTP Basic (`client_secret_basic`) when no `client_key` is given.
    pub client_secret: Secret,
    /// An EC P-256 private key (PKCS#8 PEM): authenticate with `private_key_jwt` (ES256 assertions).
    pub client_key: Option<PathBuf>,
    /// The `kid` put in the assertion's header.
    pub client_key_id: Option<String>,
    /// `login_hint` template; `{number}` is replaced by the personal number.
    pub login_hint: String,
    pub acr_values: Option<String>,
    pub binding_message: Option<String>,
    /// Seconds; sent as `requested_expiry`.
    pub requested_expiry: Option<u64>,
    /// JSON template of `authorization_details`; `{call_initiator}` becomes `RP` or `user`.
    pub authorization_details: Option<String>,
    /// The ID-token claim holding the personal number (e.g. `ssn`).
    pub number_claim: String,
    /// When set, an `access_denied` whose description contains this text means `declined_call`.
    pub declined_call_description: Option<String>,
    /// The provider answers with a word pair an agent must read to the caller (Norwegian BankID through
    /// a broker): allowed only in queues that check during the call.
    pub word_pair: bool,
    /// The CA certificates (PEM) trusted for the provider's https endpoints; system roots are never used.
    pub server_ca: Option<PathBuf>,
    pub request_timeout: Duration,
    pub connect_timeout: Duration,
}

impl Default for CibaSettings {
    fn default() -> Self {
        CibaSettings {
            issuer: String::new(),
            client_id: String::new(),
            client_secret: Secret::default(),
            client_key: None,
            client_key_id: None,
            login_hint: "sub:ssn:{number}".into(),
            acr_values: None,
            binding_message: None,
            requested_expiry: None,
            authorization_details: None,
            number_claim: "ssn".into(),
            declined_call_description: None,
            word_pair: false,
            server_ca: None,
            request_timeout: Duration::from_secs(5),
            connect_timeout: Duration::from_secs(3),
        }
    }
}

/// Why a client could not be built.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("issuer url: {0}")]
    Url(String),
    #[error("http client: {0}")]
    Http(String),
    #[error("{}: {reason}", path.display())]
    Key { path: PathBuf, reason: String },
}

/// Why an ID token was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    #[error("token header unreadable")]
    Header,
    #[error("no key for the token's kid")]
    UnknownKey,
    #[error("token invalid: {0}")]
    Invalid(String),
    #[error("number claim missing")]
    NoNumber,
}

/// What the client remembers about an open request.
struct Open {
    number: PersonalNumber,
}

/// A CIBA provider client.
pub struct Client {
    http: reqwest::Client,
    settings: CibaSettings,
    discovery_url: Url,
    discovery: tokio::sync::OnceCell<Discovery>,
    jwks: Mutex<Option<Arc<JwkSet>>>,
    /// The `private_key_jwt` signing key, when configured.
    assertion_key: Option<jsonwebtoken::EncodingKey>,
    open: Mutex<HashMap<String, Open>>,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("issuer", &self.settings.issuer)
            .finish_non_exhaustive()
    }
}

/// The claims callgate reads; `exp`, `iat`, `iss` and `aud` are checked by the validation.
#[derive(Deserialize)]
struct Claims {
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    given_name: Option<String>,
    #[serde(default)]
    family_name: Option<String>,
    #[serde(default)]
    iat: Option<u64>,
    #[serde(flatten)]
    other: HashMap<String, serde_json::Value>,
}

impl Client {
    pub fn new(settings: &CibaSettings) -> Result<Client, Error> {
        let issuer = Url::parse(&settings.issuer).map_err(|e| Error::Url(e.to_string()))?;
        if !matches!(issuer.scheme(), "https" | "http") {
            return Err(Error::Url(
                "scheme must be https (or http for a loopback simulator)".into(),
            ));
        }
        let discovery_url = Url::parse(&format!(
            "{}/.well-known/openid-configuration",
            settings.issuer.trim_end_matches('/')
        ))
        .map_err(|e| Error::Url(e.to_string()))?;
        if issuer.scheme() == "https" && settings.server_ca.is_none() {
            return Err(Error::Url("an https issuer needs server_ca".into()));
        }
        let tls = crate::idp::bankid::server_auth_tls(settings.server_ca.as_deref())
            .map_err(|e| Error::Http(e.to_string()))?;
        let http = reqwest::Client::builder()
            .tls_backend_preconfigured(tls)
            .https_only(issuer.scheme() == "https")
            .timeout(settings.request_timeout)
            .connect_timeout(settings.connect_timeout)
            .redirect(reqwest::redirect::Policy::none())
            .no_proxy()
            .build()
            .map_err(|e| Error::Http(e.to_string()))?;
        Ok(Client {
            http,
            settings: settings.clone(),
            discovery_url,
            discovery: tokio::sync::OnceCell::new(),
            jwks: Mutex::new(None),
            assertion_key: settings
                .client_key
                .as_deref()
                .map(read_client_key)
                .transpose()?,
            open: Mutex::new(HashMap::new()),
        })
    }

    async fn discovery(&self) -> Result<&Discovery, ProviderError> {
        self.discovery
            .get_or_try_init(|| async {
                let resp = self
                    .http
                    .get(self.discovery_url.clone())
                    .send()
                    .await
                    .map_err(|e| crate::idp::classify_transport(&e))?;
                if !resp.status().is_success() {
                    tracing::warn!(status = resp.status().as_u16(), "ciba discovery failed");
                    return Err(status_error(resp.status()));
                }
                resp.json::<Discovery>()
                    .await
                    .map_err(|_| ProviderError::Fatal)
            })
            .await
    }

    async fn fetch_jwks(&self, refresh: bool) -> Result<Arc<JwkSet>, ProviderError> {
        if !refresh {
            if let Some(set) = lock(&self.jwks).clone() {
                return Ok(set);
            }
        }
        let uri = self.discovery().await?.jwks_uri.clone();
        let resp = self
            .http
            .get(uri)
            .send()
            .await
            .map_err(|e| crate::idp::classify_transport(&e))?;
        if !resp.status().is_success() {
            return Err(status_error(resp.status()));
        }
        let set = Arc::new(
            resp.json::<JwkSet>()
                .await
                .map_err(|_| ProviderError::OutcomeUnknown)?,
        );
        *lock(&self.jwks) = Some(set.clone());
        Ok(set)
    }

    /// The form of a backchannel authentication request for `order`.
    pub fn backchannel_form(&self, order: &Order) -> Vec<(&'static str, String)> {
        let s = &self.settings;
        let mut form = vec![
            ("scope", "openid".to_string()),
            (
                "login_hint",
                s.login_hint
                    .replace("{number}", order.number.expose_for_idp()),
            ),
        ];
        if let Some(acr) = &s.acr_values {
            form.push(("acr_values", acr.clone()));
        }
        // A queue's own text wins; a provider that makes its own word pair gets none.
        let message = if s.word_pair {
            None
        } else {
            order.text.as_ref().or(s.binding_message.as_ref())
        };
        if let Some(m) = message {
            form.push(("binding_message", m.clone()));
        }
        if let Some(e) = s.requested_expiry {
            form.push(("requested_expiry", e.to_string()));
        }
        if let Some(t) = &s.authorization_details {
            let who = match order.initiator {
                Initiator::Caller => "user",
                Initiator::Us => "RP",
            };
            form.push(("authorization_details", t.replace("{call_initiator}", who)));
        }
        form
    }

    /// A form POST with the client's authentication: HTTP Basic, or a signed assertion
    /// (`private_key_jwt`, audience the issuer) added to the form.
    async fn authenticated(
        &self,
        endpoint: String,
        mut form: Vec<(&'static str, String)>,
    ) -> Result<reqwest::RequestBuilder, ProviderError> {
        let req = self.http.post(endpoint);
        let Some(key) = &self.assertion_key else {
            return Ok(req
                .basic_auth(
                    &self.settings.client_id,
                    Some(self.settings.client_secret.expose()),
                )
                .form(&form));
        };
        let audience = self.discovery().await?.issuer.clone();
        let now = unix_now();
        let claims = serde_json::json!({
            "iss": self.settings.client_id,
            "sub": self.settings.client_id,
            "aud": audience,
            "jti": uuid::Uuid::new_v4().to_string(),
            "iat": now,
            "exp": now + ASSERTION_LIFETIME_SECS,
        });
        let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::ES256);
        header.kid.clone_from(&self.settings.client_key_id);
        let assertion =
            jsonwebtoken::encode(&header, &claims, key).map_err(|_| ProviderError::Fatal)?;
        form.push(("client_id", self.settings.client_id.clone()));
        form.push(("client_assertion_type", ASSERTION_TYPE.to_owned()));
        form.push(("client_assertion", assertion));
        Ok(req.form(&form))
    }

    async fn start_order(&self, order: &Order) -> Result<Started, ProviderError> {
        let endpoint = self
            .discovery()
            .await?
            .backchannel_authentication_endpoint
            .clone();
        let resp = self
            .authenticated(endpoint, self.backchannel_form(order))
            .await?
            .send()
            .await
            .map_err(|e| crate::idp::classify_transport(&e))?;
        let status = resp.status();
        if status.is_success() {
            let ack: Acknowledgement = resp
                .json()
                .await
                .map_err(|_| ProviderError::OutcomeUnknown)?;
            lock(&self.open).insert(
                ack.auth_req_id.clone(),
                Open {
                    number: order.number.clone(),
                },
            );
            return Ok(Started {
                order: OrderRef(ack.auth_req_id),
                poll_interval: Some(ack.interval.map_or(DEFAULT_INTERVAL, Duration::from_secs)),
                word_pair: ack.binding_message.filter(|w| !w.trim().is_empty()),
            });
        }
        let body = resp.json::<ErrorBody>().await.ok();
        let code = body.as_ref().map(|b| b.error.as_str()).unwrap_or("");
        tracing::warn!(
            status = status.as_u16(),
            error = code,
            "ciba backchannel request refused"
        );
        Err(match code {
            "unknown_user_id" => ProviderError::Rejected(Reason::InvalidNumber),
            "" => status_error(status),
            _ if status.is_server_error() => status_error(status),
            _ => ProviderError::Fatal,
        })
    }

    async fn poll_order(&self, order: &OrderRef) -> Result<Poll, ProviderError> {
        let endpoint = self.discovery().await?.token_endpoint.clone();
        let form = vec![
            ("grant_type", GRANT_TYPE.to_owned()),
            ("auth_req_id", order.0.clone()),
        ];
        let resp = self
            .authenticated(endpoint, form)
            .await?
            .send()
            .await
            .map_err(|e| crate::idp::classify_transport(&e))?;
        let status = resp.status();
        if status.is_success() {
            let token: wire::TokenResponse = resp
                .json()
                .await
                .map_err(|_| ProviderError::OutcomeUnknown)?;
            let number = lock(&self.open).remove(&order.0).map(|o| o.number);
            let Some(number) = number else {
                // A request from before a restart: the number it was for is not known here.
                return Ok(Poll::Failed(Reason::ProviderError));
            };
            return Ok(self.complete(&token.id_token, number).await);
        }
        let Ok(body) = resp.json::<ErrorBody>().await else {
            return Err(status_error(status));
        };
        Ok(match body.error.as_str() {
            "authorization_pending" => Poll::Pending(Stage::AwaitingApp),
            "slow_down" => Poll::SlowDown(Stage::AwaitingApp),
            "expired_token" => self.ended(order, Reason::Expired),
            "access_denied" => {
                let declined = match (
                    &self.settings.declined_call_description,
                    &body.error_description,
                ) {
                    (Some(needle), Some(d)) => d.contains(needle.as_str()),
                    _ => false,
                };
                let reason = if declined {
                    Reason::DeclinedCall
                } else {
                    Reason::UserCancelled
                };
                self.ended(order, reason)
            }
            other => {
                tracing::warn!(
                    status = status.as_u16(),
                    error = other,
                    "ciba token request refused"
                );
                return Err(if status.is_server_error() {
                    status_error(status)
                } else {
                    ProviderError::Fatal
                });
            }
        })
    }

    fn ended(&self, order: &OrderRef, reason: Reason) -> Poll {
        lock(&self.open).remove(&order.0);
        Poll::Failed(reason)
    }

    async fn complete(&self, id_token: &str, asked: PersonalNumber) -> Poll {
        match self.validate(id_token).await {
            Ok(claims) => {
                let got = claims
                    .other
                    .get(&self.settings.number_claim)
                    .and_then(|v| v.as_str())
                    .map(|s| s.chars().filter(char::is_ascii_digit).collect::<String>());
                if got.as_deref() != Some(asked.expose_for_idp()) {
                    return Poll::Failed(Reason::IdentityMismatch);
                }
                Poll::Complete(Identity {
                    number: asked,
                    name: claims.name,
                    given_name: claims.given_name,
                    surname: claims.family_name,
                    evidence_digest: None,
                })
            }
            Err(e) => {
                tracing::warn!(error = %e, "ciba id token refused");
                Poll::Failed(Reason::ProviderError)
            }
        }
    }

    /// Validates an ID token: signature by a key of the provider's JWKS (refreshed once on an unknown
    /// `kid`), `iss`, `aud` (our client id), `exp`, `nbf` and the presence of `iat`.
    async fn validate(&self, token: &str) -> Result<Claims, TokenError> {
        let header = jsonwebtoken::decode_header(token).map_err(|_| TokenError::Header)?;
        let issuer = self
            .discovery()
            .await
            .map_err(|_| TokenError::UnknownKey)?
            .issuer
            .clone();
        let mut set = self
            .fetch_jwks(false)
            .await
            .map_err(|_| TokenError::UnknownKey)?;
        if find_key(&set, header.kid.as_deref()).is_none() {
            set = self
                .fetch_jwks(true)
                .await
                .map_err(|_| TokenError::UnknownKey)?;
        }
        let jwk = find_key(&set, header.kid.as_deref()).ok_or(TokenError::UnknownKey)?;
        let key = DecodingKey::from_jwk(jwk).map_err(|e| TokenError::Invalid(e.to_string()))?;
        let claims = decode_claims(token, &key, header.alg, &issuer, &self.settings.client_id)?;
        Ok(claims)
    }
}

/// Checks the signature and the registered claims of `token`.
fn decode_claims(
    token: &str,
    key: &DecodingKey,
    alg: jsonwebtoken::Algorithm,
    issuer: &str,
    audience: &str,
) -> Result<Claims, TokenError> {
    use jsonwebtoken::Algorithm as A;
    if !matches!(
        alg,
        A::RS256
            | A::RS384
            | A::RS512
            | A::PS256
            | A::PS384
            | A::PS512
            | A::ES256
            | A::ES384
            | A::EdDSA
    ) {
        return Err(TokenError::Invalid("algorithm not allowed".into()));
    }
    let mut v = Validation::new(alg);
    v.leeway = LEEWAY_SECS;
    v.validate_nbf = true;
    v.set_issuer(&[issuer]);
    v.set_audience(&[audience]);
    v.set_required_spec_claims(&["exp", "iss", "aud"]);
    let data = jsonwebtoken::decode::<Claims>(token, key, &v)
        .map_err(|e| TokenError::Invalid(e.to_string()))?;
    match data.claims.iat {
        None => return Err(TokenError::Invalid("iat missing".into())),
        Some(iat) if iat > unix_now() + LEEWAY_SECS => {
            return Err(TokenError::Invalid("iat in the future".into()))
        }
        Some(_) => {}
    }
    Ok(data.claims)
}

/// Reads an EC P-256 PKCS#8 private key from a PEM (or DER) file.
fn read_client_key(path: &std::path::Path) -> Result<jsonwebtoken::EncodingKey, Error> {
    use base64::Engine;
    let err = |reason: &str| Error::Key {
        path: path.to_owned(),
        reason: reason.to_owned(),
    };
    let bytes = std::fs::read(path).map_err(|e| err(&e.to_string()))?;
    let der = match std::str::from_utf8(&bytes) {
        Ok(text) if text.contains("-----BEGIN PRIVATE KEY-----") => {
            let body: String = text
                .lines()
                .skip_while(|l| !l.starts_with("-----BEGIN PRIVATE KEY-----"))
                .skip(1)
                .take_while(|l| !l.starts_with("-----END"))
                .collect();
            base64::engine::general_purpose::STANDARD
                .decode(body.trim())
                .map_err(|_| err("not valid PEM"))?
        }
        _ => bytes,
    };
    ring::signature::EcdsaKeyPair::from_pkcs8(
        &ring::signature::ECDSA_P256_SHA256_FIXED_SIGNING,
        &der,
        &ring::rand::SystemRandom::new(),
    )
    .map_err(|_| err("not an EC P-256 private key in PKCS#8 (BEGIN PRIVATE KEY)"))?;
    Ok(jsonwebtoken::EncodingKey::from_ec_der(&der))
}

#[allow(clippy::disallowed_methods)]
fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn find_key<'a>(set: &'a JwkSet, kid: Option<&str>) -> Option<&'a jsonwebtoken::jwk::Jwk> {
    match kid {
        Some(kid) => set.find(kid),
        None if set.keys.len() == 1 => set.keys.first(),
        None => None,
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl Provider for Client {
    fn method(&self) -> &'static str {
        "ciba"
    }

    fn start<'a>(&'a self, order: &'a Order) -> BoxFuture<'a, Result<Started, ProviderError>> {
        Box::pin(self.start_order(order))
    }

    fn poll<'a>(&'a self, order: &'a OrderRef) -> BoxFuture<'a, Result<Poll, ProviderError>> {
        Box::pin(self.poll_order(order))
    }

    /// CIBA has no cancel: the request is forgotten and the provider lets it expire.
    fn cancel<'a>(&'a self, order: &'a OrderRef) -> BoxFuture<'a, Result<(), ProviderError>> {
        lock(&self.open).remove(&order.0);
        Box::pin(async { Ok(()) })
    }
}

fn status_error(status: StatusCode) -> ProviderError {
    match status.as_u16() {
        429 => ProviderError::RateLimited { retry_after: None },
        503 => ProviderError::Unavailable,
        500..=599 | 408 => ProviderError::OutcomeUnknown,
        _ => ProviderError::Fatal,
    }
}
