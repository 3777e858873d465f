//! Swedish BankID RP API v6.0 client (phone/auth, collect, cancel) over mutual TLS.
//!
//! Invariant: the wire format lives in [`wire`]; [`Client`] is the only code that talks to BankID and it
//! hands back `verify` types only. See `client` for the mapping of hint and error codes.

mod client;
mod tls;
pub mod wire;

pub use client::{Client, Error, MAX_VISIBLE_DATA_B64};
pub(crate) use tls::provider as tls_provider;

/// When the RP certificate of `identity` (its leaf) expires.
pub fn rp_certificate_not_after(
    identity: &crate::idp::ClientIdentity,
) -> Result<time::OffsetDateTime, Error> {
    tls::identity_not_after(identity)
}

/// When the earliest-expiring certificate of a CA file (e.g. `server_ca`) expires.
pub fn ca_not_after(path: &std::path::Path) -> Result<time::OffsetDateTime, Error> {
    tls::ca_not_after(path)
}

#[cfg(test)]
mod tests;

/// A rustls client configuration trusting only the CAs in `server_ca` (none: plain HTTP only), with no
/// client certificate. Shared with the other HTTP identity providers so there is one TLS setup.
pub(crate) fn server_auth_tls(
    server_ca: Option<&std::path::Path>,
) -> Result<rustls::ClientConfig, Error> {
    tls::client_config(server_ca, None)
}

/// A rustls client configuration as the client builds it, for tests that talk raw HTTP(S).
#[cfg(test)]
pub(crate) fn tls_for_tests(
    server_ca: Option<&std::path::Path>,
    identity: Option<&crate::idp::ClientIdentity>,
) -> rustls::ClientConfig {
    tls::client_config(server_ca, identity).expect("tls config")
}
