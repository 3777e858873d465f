//! HTTP surfaces. `ops`: `/healthz`, `/readyz`, `/metrics`, `POST /reload` on the ops listener.
//! `agent`: the agent/CRM API under `/v1` (calls, verifications, the live stream) on `server.listen`.
//! `widget`: the agent widget page (`/widget`, its script and style sheet) beside it, and CORS for `/v1`.
//!
//! Invariant: errors are JSON `{"error": "<stable_code>", "reason": "<text>"}`; internal detail is logged,
//! never sent; a reason never quotes what the client sent.

pub mod agent;
pub mod ops;
pub mod switchboard;
pub mod widget;

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;

use crate::calls::live::Refusal;

/// An error answered to an HTTP client.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("{0}")]
    BadRequest(String),
    /// No bearer token, or not one of ours: 401 with `WWW-Authenticate: Bearer`.
    #[error("{0}")]
    Unauthorized(String),
    /// The token's role or agent may not do this: 403.
    #[error("{0}")]
    Forbidden(String),
    #[error("{0}")]
    NotFound(String),
    /// No route has this path.
    #[error("no such route")]
    NoRoute,
    #[error("method not allowed on this route")]
    MethodNotAllowed,
    #[error("the request body is larger than {0} bytes")]
    TooLarge(usize),
    /// The request is well-formed HTTP but its body or query is not what the route takes: 422.
    #[error("{0}")]
    Invalid(String),
    /// A call refused a start or cancel.
    #[error("{0}")]
    Refused(Refusal),
    #[error("not ready: {0}")]
    Unavailable(String),
    #[error("internal error")]
    Internal(String),
}

impl ApiError {
    /// The HTTP status and the stable error code.
    pub fn code(&self) -> (StatusCode, &'static str) {
        match self {
            ApiError::BadRequest(_) => (StatusCode::BAD_REQUEST, "bad_request"),
            ApiError::Unauthorized(_) => (StatusCode::UNAUTHORIZED, "unauthorized"),
            ApiError::Forbidden(_) => (StatusCode::FORBIDDEN, "forbidden"),
            ApiError::NotFound(_) => (StatusCode::NOT_FOUND, "not_found"),
            ApiError::NoRoute => (StatusCode::NOT_FOUND, "no_route"),
            ApiError::MethodNotAllowed => (StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed"),
            ApiError::TooLarge(_) => (StatusCode::PAYLOAD_TOO_LARGE, "body_too_large"),
            ApiError::Invalid(_) => (StatusCode::UNPROCESSABLE_ENTITY, "invalid_request"),
            ApiError::Refused(r) => (
                match r {
                    Refusal::NotAnchored | Refusal::NothingToCancel | Refusal::NoMedia => {
                        StatusCode::CONFLICT
                    }
                    Refusal::Ended => StatusCode::NOT_FOUND,
                    Refusal::InvalidNumber => StatusCode::UNPROCESSABLE_ENTITY,
                    Refusal::Unavailable | Refusal::OwnerUnreachable => {
                        StatusCode::SERVICE_UNAVAILABLE
                    }
                },
                r.code(),
            ),
            ApiError::Unavailable(_) => (StatusCode::SERVICE_UNAVAILABLE, "unavailable"),
            ApiError::Internal(_) => (StatusCode::INTERNAL_SERVER_ERROR, "internal"),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (status, code) = self.code();
        let reason = match &self {
            ApiError::Internal(detail) => {
                tracing::error!(detail = %detail, "internal error");
                "internal error".to_owned()
            }
            other => other.to_string(),
        };
        let mut response = (
            status,
            Json(serde_json::json!({"error": code, "reason": reason})),
        )
            .into_response();
        if status == StatusCode::UNAUTHORIZED {
            response.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Bearer realm=\"callgate\""),
            );
        }
        response
    }
}
