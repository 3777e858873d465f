//! HTTP surfaces. `ops`: `/healthz`, `/readyz`, `/metrics`, `POST /reload` on the ops listener.
//! (The agent API and the switchboard endpoints come with the mid-call and switchboard features.)
//!
//! Invariant: errors are JSON `{"error": "<stable_code>", "reason": "<text>"}`; internal detail is logged,
//! never sent.

pub mod ops;

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;

/// An error answered to an HTTP client.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("{0}")]
    BadRequest(String),
    #[error("not ready: {0}")]
    Unavailable(String),
    #[error("internal error")]
    Internal(String),
}

impl ApiError {
    fn code(&self) -> (StatusCode, &'static str) {
        match self {
            ApiError::BadRequest(_) => (StatusCode::BAD_REQUEST, "bad_request"),
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
        (
            status,
            Json(serde_json::json!({"error": code, "reason": reason})),
        )
            .into_response()
    }
}
