//! Swedish BankID RP API v6.0 client (phone/auth, collect, cancel) over mutual TLS.
//!
//! Invariant: the wire format lives in [`wire`]; [`Client`] is the only code that talks to BankID and it
//! hands back `verify` types only. See `client` for the mapping of hint and error codes.

mod client;
mod tls;
pub mod wire;

pub use client::{Client, Error, MAX_VISIBLE_DATA_B64};
pub(crate) use tls::provider as tls_provider;

#[cfg(test)]
mod tests;

/// A rustls client configuration as the client builds it, for tests that talk raw HTTP(S).
#[cfg(test)]
pub(crate) fn tls_for_tests(
    server_ca: Option<&std::path::Path>,
    identity: Option<&crate::idp::ClientIdentity>,
) -> rustls::ClientConfig {
    tls::client_config(server_ca, identity).expect("tls config")
}
