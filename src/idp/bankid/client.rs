//! The BankID RP v6.0 phone client: starts `phone/auth` orders, collects and cancels them, and maps
//! every answer to the `verify` input types.
//!
//! Invariants: every request is a `POST` with exactly `Content-Type: application/json`; the only trust
//! anchor is the configured BankID root; logs carry method, HTTP status, `errorCode`, `hintCode` and
//! `orderRef` only, never a personal number or a body. Raw signature and OCSP data are reduced to a digest
//! and dropped. Failures are classified so that a start whose outcome is unknown is never retried.
//!
//! Mapping decisions worth knowing:
//! - `userVisibleData` longer than BankID's 1 500 characters after base64 is *trimmed* (at a character
//!   boundary, to 1 125 bytes of UTF-8) rather than rejected, so an over-long queue text never blocks
//!   callers; a warning is logged.
//! - 400 `invalidParameters` on `phone/auth` means BankID refuses the request; the only caller-supplied
//!   field is the personal number, so it becomes `Rejected(InvalidNumber)`. On `collect`/`cancel` it is
//!   our bug (unknown or too old order) and becomes `Fatal` (a cancel treats it as already done).
//! - 408 `requestTimeout` and 500 `internalError` are never retried automatically: on `phone/auth` they
//!   are `OutcomeUnknown` (so the start is not repeated), on `collect` `Fatal` (the check ends and the
//!   order is cancelled). Other 5xx (e.g. a 502/504 from a proxy) are `OutcomeUnknown`; a collect with
//!   an unknown outcome may be repeated, since collecting is idempotent.
//! - `evidence_digest` is hex SHA-256 over `signature`, a `\n`, then `ocspResponse` (both base64 text as
//!   received; base64 never contains `\n`, so the split is unambiguous).

use std::path::PathBuf;
use std::time::Duration;

use base64::Engine as _;
use reqwest::header::{HeaderMap, CONTENT_TYPE};
use reqwest::{StatusCode, Url};
use tracing::{debug, info, warn};

use super::tls;
use super::wire::{
    CallInitiator, CollectResponse, ErrorBody, ErrorCode, HintCode, OrderRefRequest,
    PhoneAuthRequest, PhoneAuthResponse, PhoneRequirement, Status, VisibleDataFormat,
};
use crate::idp::{BankIdSettings, BoxFuture, Provider};
use crate::outcome::{Identity, Reason};
use crate::pnr::PersonalNumber;
use crate::telemetry::ErrorChain;
use crate::verify::{Initiator, Order, OrderRef, Poll, ProviderError, Stage, Started};

/// BankID's limit on `userVisibleData` for auth orders, in characters after base64.
pub const MAX_VISIBLE_DATA_B64: usize = 1500;
/// Largest UTF-8 text whose base64 fits in [`MAX_VISIBLE_DATA_B64`].
const MAX_VISIBLE_DATA_BYTES: usize = MAX_VISIBLE_DATA_B64 / 4 * 3;
/// Answers larger than this are treated as unreadable.
const MAX_BODY_BYTES: usize = 1024 * 1024;

/// Why a client could not be built. Messages name the offending file, never its contents.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("bankid url {url:?}: {reason}")]
    Url { url: String, reason: String },
    #[error("cannot read {}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{}: {reason}", path.display())]
    Pem { path: PathBuf, reason: String },
    #[error("{}: wrong PKCS#12 password (or the file is damaged)", path.display())]
    Pkcs12Password { path: PathBuf },
    #[error("{}: {reason}", path.display())]
    Identity { path: PathBuf, reason: String },
    #[error("tls configuration: {0}")]
    Tls(String),
    #[error("http client: {0}")]
    Http(String),
}

/// The three endpoints used for phone orders.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Endpoint {
    PhoneAuth,
    Collect,
    Cancel,
}

impl Endpoint {
    fn path(self) -> &'static str {
        match self {
            Endpoint::PhoneAuth => "phone/auth",
            Endpoint::Collect => "collect",
            Endpoint::Cancel => "cancel",
        }
    }
}

/// A raw non-transport answer.
struct Answer {
    status: StatusCode,
    headers: HeaderMap,
    body: bytes::Bytes,
}

/// A BankID RP v6.0 client for phone orders.
pub struct Client {
    http: reqwest::Client,
    /// The configured trust anchor, for messages about the server's certificate.
    server_ca: Option<PathBuf>,
    phone_auth: Url,
    collect: Url,
    cancel: Url,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("phone_auth", &self.phone_auth.as_str())
            .finish_non_exhaustive()
    }
}

impl Client {
    /// Builds a client. `https` URLs need a client identity and `server_ca` (the only trust anchor);
    /// plain `http` is allowed only without an identity (the loopback simulator).
    pub fn new(settings: &BankIdSettings) -> Result<Client, Error> {
        let url_error = |reason: &str| Error::Url {
            url: settings.url.clone(),
            reason: reason.to_owned(),
        };
        let mut raw = settings.url.clone();
        if !raw.ends_with('/') {
            raw.push('/');
        }
        let base = Url::parse(&raw).map_err(|e| url_error(&e.to_string()))?;
        let tls = match base.scheme() {
            "https" => {
                if settings.identity.is_none() {
                    return Err(url_error(
                        "https needs a client identity (BankID requires mutual TLS)",
                    ));
                }
                let Some(ca) = settings.server_ca.as_deref() else {
                    return Err(url_error(
                        "https needs server_ca (the BankID root; system roots are never used)",
                    ));
                };
                tls::client_config(Some(ca), settings.identity.as_ref())?
            }
            "http" => {
                if settings.identity.is_some() {
                    return Err(url_error("a client identity needs an https url"));
                }
                // Never used for plain HTTP; given so no process-wide crypto provider is needed.
                tls::client_config(None, None)?
            }
            _ => {
                return Err(url_error(
                    "scheme must be https (or http for a loopback simulator)",
                ))
            }
        };
        let http = reqwest::Client::builder()
            .tls_backend_preconfigured(tls)
            .https_only(base.scheme() == "https")
            .timeout(settings.request_timeout)
            .connect_timeout(settings.connect_timeout)
            .redirect(reqwest::redirect::Policy::none())
            .no_proxy()
            .build()
            .map_err(|e| Error::Http(e.to_string()))?;
        let join = |path: &str| base.join(path).map_err(|e| url_error(&e.to_string()));
        Ok(Client {
            http,
            server_ca: settings.server_ca.clone(),
            phone_auth: join(Endpoint::PhoneAuth.path())?,
            collect: join(Endpoint::Collect.path())?,
            cancel: join(Endpoint::Cancel.path())?,
        })
    }

    fn url(&self, endpoint: Endpoint) -> &Url {
        match endpoint {
            Endpoint::PhoneAuth => &self.phone_auth,
            Endpoint::Collect => &self.collect,
            Endpoint::Cancel => &self.cancel,
        }
    }

    /// POSTs a JSON body; transport failures are classified, any HTTP answer is returned.
    async fn post(&self, endpoint: Endpoint, body: Vec<u8>) -> Result<Answer, ProviderError> {
        let sent = self
            .http
            .post(self.url(endpoint).clone())
            .header(CONTENT_TYPE, "application/json")
            .body(body)
            .send()
            .await;
        let mut response = match sent {
            Ok(r) => r,
            Err(e) => {
                let class = crate::idp::classify_transport(&e);
                let cause = tls_cause(&e, self.server_ca.as_deref());
                warn!(method = endpoint.path(), cause = cause.as_deref(), error = %ErrorChain(&e), class = ?class, "bankid request failed");
                return Err(class);
            }
        };
        let status = response.status();
        let headers = std::mem::take(response.headers_mut());
        let mut body = Vec::new();
        loop {
            match response.chunk().await {
                Ok(Some(chunk)) => {
                    if body.len() + chunk.len() > MAX_BODY_BYTES {
                        warn!(
                            method = endpoint.path(),
                            status = status.as_u16(),
                            "bankid answer too large"
                        );
                        return Err(ProviderError::OutcomeUnknown);
                    }
                    body.extend_from_slice(&chunk);
                }
                Ok(None) => break,
                Err(e) => {
                    warn!(method = endpoint.path(), status = status.as_u16(), error = %ErrorChain(&e), "bankid answer unreadable");
                    return Err(ProviderError::OutcomeUnknown);
                }
            }
        }
        Ok(Answer {
            status,
            headers,
            body: body.into(),
        })
    }

    async fn start_order(&self, order: &Order) -> Result<Started, ProviderError> {
        let request = phone_auth_request(order);
        let body = serde_json::to_vec(&request).map_err(|_| ProviderError::Fatal)?;
        let answer = self.post(Endpoint::PhoneAuth, body).await?;
        if !answer.status.is_success() {
            return Err(error_answer(Endpoint::PhoneAuth, &answer, None));
        }
        let parsed: PhoneAuthResponse = parse(Endpoint::PhoneAuth, &answer)?;
        info!(
            method = Endpoint::PhoneAuth.path(),
            status = answer.status.as_u16(),
            order_ref = %parsed.order_ref,
            "bankid order started"
        );
        Ok(Started {
            order: OrderRef(parsed.order_ref),
            poll_interval: None,
            word_pair: None,
        })
    }

    async fn collect_order(&self, order: &OrderRef) -> Result<Poll, ProviderError> {
        let body = order_ref_body(order)?;
        let answer = self.post(Endpoint::Collect, body).await?;
        if !answer.status.is_success() {
            return Err(error_answer(Endpoint::Collect, &answer, Some(order)));
        }
        let parsed: CollectResponse = parse(Endpoint::Collect, &answer)?;
        debug!(
            method = Endpoint::Collect.path(),
            status = answer.status.as_u16(),
            order_ref = %order.0,
            collect_status = ?parsed.status,
            hint_code = parsed.hint_code.as_ref().map(HintCode::as_str),
            "bankid collect"
        );
        map_collect(parsed)
    }

    async fn cancel_order(&self, order: &OrderRef) -> Result<(), ProviderError> {
        let body = order_ref_body(order)?;
        let answer = self.post(Endpoint::Cancel, body).await?;
        if answer.status.is_success() {
            info!(method = Endpoint::Cancel.path(), status = answer.status.as_u16(), order_ref = %order.0, "bankid order cancelled");
            return Ok(());
        }
        if answer.status == StatusCode::BAD_REQUEST
            && error_code(&answer) == Some(ErrorCode::InvalidParameters)
        {
            // Already cancelled or finished: the order is not live, which is what cancel wants.
            info!(method = Endpoint::Cancel.path(), status = 400, error_code = "invalidParameters", order_ref = %order.0, "bankid order already ended");
            return Ok(());
        }
        Err(error_answer(Endpoint::Cancel, &answer, Some(order)))
    }
}

impl Client {
    /// Checks that the provider answers over (mutual) TLS without creating an order: a `collect` of
    /// an order that cannot exist, which BankID answers with 400 `invalidParameters`. `Ok` describes
    /// the answer; `Err` names the cause (a refused certificate in words, then the error chain).
    pub async fn probe(&self) -> Result<String, String> {
        let body = order_ref_body(&OrderRef(PROBE_ORDER_REF.to_owned()))
            .map_err(|_| "cannot build the request".to_owned())?;
        let sent = self
            .http
            .post(self.collect.clone())
            .header(CONTENT_TYPE, "application/json")
            .body(body)
            .send()
            .await;
        let response = match sent {
            Ok(r) => r,
            Err(e) => {
                let e = e.without_url();
                let chain = ErrorChain(&e).to_string();
                return Err(match tls_cause(&e, self.server_ca.as_deref()) {
                    Some(cause) => format!("{cause} ({chain})"),
                    None => chain,
                });
            }
        };
        let status = response.status();
        let body = response.bytes().await.unwrap_or_default();
        let code = serde_json::from_slice::<ErrorBody>(&body)
            .ok()
            .map(|b| b.error_code.as_str().to_owned());
        match (status.as_u16(), code.as_deref()) {
            (400, Some("invalidParameters")) | (200, _) => Ok(format!(
                "answers over {} (collect of a made-up order: {}{})",
                self.collect.scheme(),
                status.as_u16(),
                code.map(|c| format!(" {c}")).unwrap_or_default()
            )),
            (401 | 403, _) => Err(format!(
                "the server refused the RP certificate: HTTP {}",
                status.as_u16()
            )),
            (s, c) => Err(format!(
                "unexpected answer: HTTP {s}{}",
                c.map(|c| format!(" {c}")).unwrap_or_default()
            )),
        }
    }
}

/// An order reference no BankID order has (the nil UUID), for [`Client::probe`].
const PROBE_ORDER_REF: &str = "00000000-0000-0000-0000-000000000000";

/// Names the TLS cause of a transport failure in words an operator can act on, when the error chain
/// holds one (rustls errors travel inside an `io::Error`, whose `source()` skips them).
pub(crate) fn tls_cause(
    e: &(dyn std::error::Error + 'static),
    server_ca: Option<&std::path::Path>,
) -> Option<String> {
    let mut next = Some(e);
    while let Some(err) = next {
        if let Some(tls) = find_rustls(err) {
            return Some(describe_tls(tls, server_ca));
        }
        next = err.source();
    }
    None
}

/// `err` itself as a rustls error, or the one inside (possibly nested) `io::Error`s.
fn find_rustls<'e>(err: &'e (dyn std::error::Error + 'static)) -> Option<&'e rustls::Error> {
    if let Some(tls) = err.downcast_ref::<rustls::Error>() {
        return Some(tls);
    }
    let mut io = err.downcast_ref::<std::io::Error>();
    while let Some(inner) = io.and_then(|e| e.get_ref()) {
        if let Some(tls) = inner.downcast_ref::<rustls::Error>() {
            return Some(tls);
        }
        io = inner.downcast_ref::<std::io::Error>();
    }
    None
}

/// The variant name of a rustls enum value (`Expired`, not its whole `Debug` with timestamps).
fn variant(v: &impl std::fmt::Debug) -> String {
    let text = format!("{v:?}");
    text.split([' ', '(', '{'])
        .next()
        .unwrap_or_default()
        .to_owned()
}

fn describe_tls(e: &rustls::Error, server_ca: Option<&std::path::Path>) -> String {
    use rustls::{AlertDescription as A, CertificateError as C};
    let ca = server_ca
        .map(|p| format!(" ({})", p.display()))
        .unwrap_or_default();
    match e {
        rustls::Error::InvalidCertificate(c @ (C::UnknownIssuer | C::BadSignature)) => {
            // No chain to the trust anchor (a root of the same name but another key: BadSignature).
            format!(
                "server certificate not trusted by server_ca{ca}: {}",
                variant(c)
            )
        }
        rustls::Error::InvalidCertificate(c) => {
            format!("server certificate refused: {}", variant(c))
        }
        rustls::Error::AlertReceived(
            a @ (A::BadCertificate
            | A::CertificateExpired
            | A::CertificateRevoked
            | A::CertificateUnknown
            | A::UnsupportedCertificate
            | A::UnknownCA
            | A::CertificateRequired
            | A::AccessDenied),
        ) => format!("the server refused the RP certificate: {a:?}"),
        rustls::Error::AlertReceived(a) => format!("the server ended the TLS session: {a:?}"),
        other => format!("TLS: {other}"),
    }
}

impl Provider for Client {
    fn method(&self) -> &'static str {
        "bankid_phone"
    }

    fn start<'a>(&'a self, order: &'a Order) -> BoxFuture<'a, Result<Started, ProviderError>> {
        Box::pin(self.start_order(order))
    }

    fn poll<'a>(&'a self, order: &'a OrderRef) -> BoxFuture<'a, Result<Poll, ProviderError>> {
        Box::pin(self.collect_order(order))
    }

    fn cancel<'a>(&'a self, order: &'a OrderRef) -> BoxFuture<'a, Result<(), ProviderError>> {
        Box::pin(self.cancel_order(order))
    }
}

fn order_ref_body(order: &OrderRef) -> Result<Vec<u8>, ProviderError> {
    serde_json::to_vec(&OrderRefRequest {
        order_ref: order.0.clone(),
    })
    .map_err(|_| ProviderError::Fatal)
}

fn parse<T: serde::de::DeserializeOwned>(
    endpoint: Endpoint,
    answer: &Answer,
) -> Result<T, ProviderError> {
    serde_json::from_slice(&answer.body).map_err(|e| {
        warn!(
            method = endpoint.path(),
            status = answer.status.as_u16(),
            line = e.line(),
            column = e.column(),
            "bankid answer malformed"
        );
        ProviderError::OutcomeUnknown
    })
}

fn error_code(answer: &Answer) -> Option<ErrorCode> {
    serde_json::from_slice::<ErrorBody>(&answer.body)
        .ok()
        .map(|b| b.error_code)
}

/// Classifies a non-2xx answer and logs it.
fn error_answer(endpoint: Endpoint, answer: &Answer, order: Option<&OrderRef>) -> ProviderError {
    let code = error_code(answer);
    let class = map_error(endpoint, answer.status, &answer.headers, code.as_ref());
    warn!(
        method = endpoint.path(),
        status = answer.status.as_u16(),
        error_code = code.as_ref().map(ErrorCode::as_str),
        order_ref = order.map(|o| o.0.as_str()),
        class = ?class,
        "bankid error answer"
    );
    class
}

fn map_error(
    endpoint: Endpoint,
    status: StatusCode,
    headers: &HeaderMap,
    code: Option<&ErrorCode>,
) -> ProviderError {
    match status.as_u16() {
        429 => ProviderError::RateLimited {
            retry_after: rate_limit_reset(headers),
        },
        503 => ProviderError::Unavailable,
        // BankID: never retry `requestTimeout` or `internalError` automatically. A collect that got one
        // ends the check (the session cancels the order); on a start the outcome is unknown anyway.
        408 | 500 if endpoint == Endpoint::Collect => ProviderError::Fatal,
        408 | 500..=599 => ProviderError::OutcomeUnknown,
        400 => match code {
            Some(ErrorCode::AlreadyInProgress) => {
                ProviderError::Rejected(Reason::AlreadyInProgress)
            }
            Some(ErrorCode::InvalidParameters) if endpoint == Endpoint::PhoneAuth => {
                ProviderError::Rejected(Reason::InvalidNumber)
            }
            _ => ProviderError::Fatal,
        },
        _ => ProviderError::Fatal,
    }
}

/// `RateLimit-Reset`: seconds until the quota resets (draft-polli-ratelimit-headers-00).
fn rate_limit_reset(headers: &HeaderMap) -> Option<Duration> {
    headers
        .get("ratelimit-reset")?
        .to_str()
        .ok()?
        .trim()
        .parse::<u64>()
        .ok()
        .map(Duration::from_secs)
}

fn phone_auth_request(order: &Order) -> PhoneAuthRequest {
    let user_visible_data = order.text.as_deref().and_then(visible_data);
    PhoneAuthRequest {
        personal_number: order.number.expose_for_idp().to_owned(),
        call_initiator: match order.initiator {
            Initiator::Caller => CallInitiator::User,
            Initiator::Us => CallInitiator::Rp,
        },
        user_visible_data_format: user_visible_data
            .as_ref()
            .map(|_| VisibleDataFormat::SimpleMarkdownV1),
        user_visible_data,
        user_non_visible_data: None,
        requirement: order.pin_code.then_some(PhoneRequirement {
            pin_code: Some(true),
            certificate_policies: None,
        }),
    }
}

/// Base64 of the text, trimmed to BankID's limit; `None` for empty text.
pub(crate) fn visible_data(text: &str) -> Option<String> {
    if text.trim().is_empty() {
        return None;
    }
    let mut end = text.len().min(MAX_VISIBLE_DATA_BYTES);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    if end < text.len() {
        warn!(
            bytes = text.len(),
            kept = end,
            "userVisibleData too long for BankID; trimmed"
        );
    }
    Some(base64::engine::general_purpose::STANDARD.encode(&text.as_bytes()[..end]))
}

pub(crate) fn map_collect(answer: CollectResponse) -> Result<Poll, ProviderError> {
    match answer.status {
        Status::Pending => Ok(Poll::Pending(match answer.hint_code {
            Some(HintCode::OutstandingTransaction | HintCode::NoClient | HintCode::Started) => {
                Stage::AwaitingApp
            }
            Some(HintCode::UserCallConfirm) => Stage::ConfirmingCall,
            _ => Stage::Identifying,
        })),
        Status::Failed => Ok(Poll::Failed(match answer.hint_code {
            Some(HintCode::UserCancel) => Reason::UserCancelled,
            Some(HintCode::UserDeclinedCall) => Reason::DeclinedCall,
            Some(HintCode::ExpiredTransaction | HintCode::StartFailed) => Reason::Expired,
            Some(HintCode::CertificateErr | HintCode::TransactionRiskBlocked) => Reason::IdBlocked,
            Some(HintCode::Cancelled) => Reason::Superseded,
            _ => Reason::ProviderError,
        })),
        Status::Complete => {
            let Some(data) = answer.completion_data else {
                warn!(method = Endpoint::Collect.path(), order_ref = %answer.order_ref, "bankid complete without completionData");
                return Err(ProviderError::OutcomeUnknown);
            };
            let Ok(number) = PersonalNumber::parse_swedish_12(&data.user.personal_number) else {
                warn!(method = Endpoint::Collect.path(), order_ref = %answer.order_ref, "bankid returned an unparseable personal number");
                return Ok(Poll::Failed(Reason::IdentityMismatch));
            };
            Ok(Poll::Complete(Identity {
                number,
                name: data.user.name,
                given_name: data.user.given_name,
                surname: data.user.surname,
                evidence_digest: Some(evidence_digest(&data.signature, &data.ocsp_response)),
            }))
        }
    }
}

/// Hex SHA-256 over `signature`, `\n`, `ocspResponse`.
pub(crate) fn evidence_digest(signature: &str, ocsp_response: &str) -> String {
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    ctx.update(signature.as_bytes());
    ctx.update(b"\n");
    ctx.update(ocsp_response.as_bytes());
    ctx.finish()
        .as_ref()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}
