//! OpenID CIBA wire types (poll mode): discovery, the backchannel acknowledgement, token answers.
//!
//! Invariant: only the fields callgate uses are read; unknown fields are ignored.

use serde::Deserialize;

/// The grant type of a CIBA token request.
pub const GRANT_TYPE: &str = "urn:openid:params:grant-type:ciba";

/// The parts of `/.well-known/openid-configuration` callgate needs.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
pub struct Discovery {
    pub issuer: String,
    pub backchannel_authentication_endpoint: String,
    pub token_endpoint: String,
    pub jwks_uri: String,
}

/// HTTP 200 from the backchannel authentication endpoint.
#[derive(Clone, Deserialize, PartialEq, Eq)]
pub struct Acknowledgement {
    pub auth_req_id: String,
    pub expires_in: u64,
    /// Minimum seconds between token polls; 5 when absent.
    #[serde(default)]
    pub interval: Option<u64>,
    /// A word pair the caller must hear (Norwegian BankID through a broker).
    #[serde(default, rename = "bindingMessage")]
    pub binding_message: Option<String>,
}

/// An OAuth error body (`{error, error_description}`).
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
pub struct ErrorBody {
    pub error: String,
    #[serde(default)]
    pub error_description: Option<String>,
}

/// A successful token response; only the ID token is used.
#[derive(Clone, Deserialize, PartialEq, Eq)]
pub struct TokenResponse {
    pub id_token: String,
}
