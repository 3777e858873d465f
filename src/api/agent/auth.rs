//! Bearer tokens of the agent API: the configured SHA-256 hashes, and who a request is.
//!
//! Invariant: a presented token is hashed once and compared with every configured hash in constant
//! time, without stopping at a match, so timing tells nothing about which token (if any) matched; no
//! token or hash is ever logged or answered.

use std::sync::Arc;

use axum::extract::FromRequestParts;
use axum::http::header::AUTHORIZATION;
use axum::http::request::Parts;
use axum::http::HeaderMap;

use super::AgentState;
use crate::api::ApiError;
use crate::calls::live::{CallView, StartedBy};
use crate::config::{Api, Role};

/// Who a request comes from: the token's name, role and, for an agent, its interface.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    /// `[api.tokens.<name>]`.
    pub name: String,
    pub role: Role,
    /// Set for role agent (`PJSIP/1001`).
    pub agent: Option<String>,
}

impl Principal {
    /// Whether this principal may see a call: agents their own calls only (known once an agent
    /// answered), supervisors and ops every call.
    pub fn sees(&self, call: &CallView) -> bool {
        match self.role {
            Role::Agent => self.owns(call.agent.as_deref()),
            Role::Supervisor | Role::Ops => true,
        }
    }

    /// Whether `agent` (of a call or a check) is this principal's own interface.
    pub fn owns(&self, agent: Option<&str>) -> bool {
        matches!((self.agent.as_deref(), agent), (Some(a), Some(b)) if a == b)
    }

    /// May start and cancel checks (on calls it sees).
    pub fn may_verify(&self) -> bool {
        matches!(self.role, Role::Agent | Role::Supervisor)
    }

    pub fn started_by(&self) -> StartedBy {
        StartedBy::Api(self.name.clone())
    }
}

/// The configured tokens.
#[derive(Debug, Default)]
pub struct Tokens {
    entries: Vec<([u8; 32], Arc<Principal>)>,
}

impl Tokens {
    pub fn from_config(api: &Api) -> Tokens {
        Tokens {
            entries: api
                .tokens
                .iter()
                .map(|(name, t)| {
                    (
                        t.sha256,
                        Arc::new(Principal {
                            name: name.clone(),
                            role: t.role,
                            agent: t.agent.clone(),
                        }),
                    )
                })
                .collect(),
        }
    }

    /// The principal of a presented token.
    pub fn find(&self, token: &[u8]) -> Option<Arc<Principal>> {
        let digest = sha256(token);
        let mut found = None;
        for (hash, principal) in &self.entries {
            if equal(hash, &digest) {
                found = Some(Arc::clone(principal));
            }
        }
        found
    }

    /// The principal of a request's `Authorization: Bearer <token>` header.
    pub fn authenticate(&self, headers: &HeaderMap) -> Result<Arc<Principal>, ApiError> {
        let value = headers
            .get(AUTHORIZATION)
            .ok_or_else(|| ApiError::Unauthorized("a bearer token is required".into()))?;
        let token = bearer(value.as_bytes()).ok_or_else(|| {
            ApiError::Unauthorized("the Authorization header must be \"Bearer <token>\"".into())
        })?;
        self.find(token)
            .ok_or_else(|| ApiError::Unauthorized("unknown token".into()))
    }
}

/// The token of `Bearer <token>` (scheme in any case).
pub(crate) fn bearer(value: &[u8]) -> Option<&[u8]> {
    let (scheme, rest) = value.split_at_checked(7)?;
    if !scheme.eq_ignore_ascii_case(b"bearer ") {
        return None;
    }
    let token = rest.trim_ascii();
    (!token.is_empty()).then_some(token)
}

/// Compares two digests without an early exit.
pub(crate) fn equal(a: &[u8; 32], b: &[u8; 32]) -> bool {
    let diff = a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y));
    std::hint::black_box(diff) == 0
}

pub fn sha256(data: &[u8]) -> [u8; 32] {
    let mut out = [0u8; 32];
    out.copy_from_slice(ring::digest::digest(&ring::digest::SHA256, data).as_ref());
    out
}

/// The hex SHA-256 of a token as `callgate token-hash` prints it and `[api.tokens.<name>] sha256`
/// takes it. Trailing line breaks are not part of the token; a token is visible ASCII, at least 16
/// characters. The error never quotes the token.
pub fn token_hash(input: &str) -> Result<String, String> {
    let token = input.trim_end_matches(['\r', '\n']);
    if token.len() < MIN_TOKEN || !token.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(format!(
            "a token is one line of at least {MIN_TOKEN} visible ASCII characters (no spaces)"
        ));
    }
    Ok(sha256(token.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect())
}

/// Shortest token `token_hash` accepts.
pub const MIN_TOKEN: usize = 16;

/// The authenticated principal of a request; rejects with 401. Also records the token's name (never
/// the token) in the request's span.
#[derive(Debug, Clone)]
pub struct Auth(pub Arc<Principal>);

impl FromRequestParts<AgentState> for Auth {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &AgentState,
    ) -> Result<Self, Self::Rejection> {
        let principal = state.tokens.authenticate(&parts.headers)?;
        tracing::Span::current().record("token", principal.name.as_str());
        Ok(Auth(principal))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bearer_header_forms() {
        assert_eq!(bearer(b"Bearer abc"), Some(&b"abc"[..]));
        assert_eq!(bearer(b"bearer  abc "), Some(&b"abc"[..]));
        assert_eq!(bearer(b"Basic abc"), None);
        assert_eq!(bearer(b"Bearer "), None);
        assert_eq!(bearer(b"Bear"), None);
    }

    #[test]
    fn token_hash_is_hex_sha256_without_the_line_break() {
        let token = "token-agent-1001";
        let want: String = sha256(token.as_bytes())
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        assert_eq!(want.len(), 64);
        assert_eq!(token_hash(&format!("{token}\n")), Ok(want.clone()));
        assert_eq!(token_hash(&format!("{token}\r\n")), Ok(want));
        for bad in [
            "\n",
            "short\n",
            "token with spaces inside\n",
            "two\nlines-of-token-text",
        ] {
            let e = token_hash(bad).unwrap_err();
            assert!(!e.contains("token-text") && !e.contains("spaces inside"));
        }
        // SHA-256 itself.
        assert_eq!(sha256(b"test")[..4], [0x9f, 0x86, 0xd0, 0x81]);
    }
}
