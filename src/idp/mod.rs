//! Identity providers: the interface the call task uses, and its implementations (BankID RP v6 and a
//! loopback simulator speaking the same wire protocol).
//!
//! Invariant: only `idp::*` knows provider wire formats. Every answer comes back as a `verify` input type
//! (`Started`, `Poll`, `ProviderError`), with transport failures classified as not sent / outcome unknown /
//! unavailable, so the core (not the adapter) decides what a failure means for the caller.

use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;
use std::time::Duration;

use crate::secret::Secret;
use crate::verify::{Order, OrderRef, Poll, ProviderError, Started};

pub mod bankid;
pub mod ciba;
pub mod sim;

/// A boxed future, so providers can be used as trait objects.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// An identity provider as the call task sees it.
pub trait Provider: Send + Sync + 'static {
    /// Short method name recorded as `CALLGATE_METHOD`, e.g. `bankid_phone`.
    fn method(&self) -> &'static str;
    /// Start an order for a person on the phone.
    fn start<'a>(&'a self, order: &'a Order) -> BoxFuture<'a, Result<Started, ProviderError>>;
    /// Ask for the order's status.
    fn poll<'a>(&'a self, order: &'a OrderRef) -> BoxFuture<'a, Result<Poll, ProviderError>>;
    /// Cancel the order (idempotent from the caller's point of view).
    fn cancel<'a>(&'a self, order: &'a OrderRef) -> BoxFuture<'a, Result<(), ProviderError>>;
}

/// Where the RP client identity for mutual TLS comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClientIdentity {
    /// A PKCS#12 file as issued through a bank (modern AES/PBES2 encryption).
    Pkcs12 { path: PathBuf, password: Secret },
    /// PEM certificate (chain) and an unencrypted PKCS#8/RSA/SEC1 private key.
    Pem { cert: PathBuf, key: PathBuf },
}

/// Settings of a BankID RP v6 provider (`[idp.<name>] kind = "bankid"`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BankIdSettings {
    /// Base URL ending in `/rp/v6.0/`, e.g. `https://appapi2.test.bankid.com/rp/v6.0/`.
    pub url: String,
    /// `None` only for plain-HTTP URLs (the loopback simulator without TLS).
    pub identity: Option<ClientIdentity>,
    /// The BankID root CA (PEM). The only trust anchor: system roots are never used.
    pub server_ca: Option<PathBuf>,
    /// Timeout of each HTTP request.
    pub request_timeout: Duration,
    /// Connect timeout.
    pub connect_timeout: Duration,
}

impl Default for BankIdSettings {
    fn default() -> Self {
        BankIdSettings {
            url: "https://appapi2.test.bankid.com/rp/v6.0/".into(),
            identity: None,
            server_ca: None,
            request_timeout: Duration::from_secs(5),
            connect_timeout: Duration::from_secs(3),
        }
    }
}

/// A request that failed without an HTTP answer, classified for the session: not connected means
/// not sent; anything after the connection was made may have reached the provider.
pub(crate) fn classify_transport(e: &reqwest::Error) -> ProviderError {
    if e.is_builder() {
        ProviderError::Fatal
    } else if e.is_connect() {
        ProviderError::NotSent
    } else {
        ProviderError::OutcomeUnknown
    }
}
