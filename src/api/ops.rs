//! The ops router: liveness, readiness, Prometheus metrics and config reload.
//!
//! Invariant: readiness is true only while the config is loaded, the PBX is connected and we are not
//! draining; `/healthz` says only that the process serves HTTP.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::{get, post};
use axum::{Json, Router};
use tokio::sync::{mpsc, oneshot};

use super::ApiError;
use crate::telemetry::Metrics;

/// Readiness inputs, shared with the app.
#[derive(Debug, Default)]
pub struct Readiness {
    pub pbx_connected: AtomicBool,
    pub draining: AtomicBool,
    /// Another instance took the PBX application over.
    pub replaced: AtomicBool,
}

impl Readiness {
    pub fn is_ready(&self) -> bool {
        self.pbx_connected.load(Ordering::SeqCst)
            && !self.draining.load(Ordering::SeqCst)
            && !self.replaced.load(Ordering::SeqCst)
    }

    fn why_not(&self) -> &'static str {
        if self.draining.load(Ordering::SeqCst) {
            "draining"
        } else if self.replaced.load(Ordering::SeqCst) {
            "another instance owns the pbx application"
        } else if !self.pbx_connected.load(Ordering::SeqCst) {
            "pbx not connected"
        } else {
            "ready"
        }
    }
}

/// A reload request; the answer is `Ok(summary)` or every config problem.
pub type ReloadRequest = oneshot::Sender<Result<String, Vec<String>>>;

#[derive(Clone)]
pub struct OpsState {
    pub readiness: Arc<Readiness>,
    pub metrics: Arc<Metrics>,
    pub reload: mpsc::Sender<ReloadRequest>,
}

pub fn router(state: OpsState) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/reload", post(reload))
        .with_state(state)
}

async fn healthz() -> impl IntoResponse {
    Json(serde_json::json!({"status": "ok"}))
}

async fn readyz(State(s): State<OpsState>) -> Result<impl IntoResponse, ApiError> {
    if s.readiness.is_ready() {
        Ok(Json(serde_json::json!({"status": "ready"})))
    } else {
        Err(ApiError::Unavailable(s.readiness.why_not().to_owned()))
    }
}

async fn metrics(State(s): State<OpsState>) -> impl IntoResponse {
    (
        StatusCode::OK,
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        s.metrics.render(),
    )
}

async fn reload(State(s): State<OpsState>) -> Result<impl IntoResponse, ApiError> {
    let (tx, rx) = oneshot::channel();
    s.reload
        .send(tx)
        .await
        .map_err(|_| ApiError::Unavailable("shutting down".into()))?;
    match rx.await {
        Ok(Ok(summary)) => Ok(Json(
            serde_json::json!({"status": "reloaded", "summary": summary}),
        )),
        Ok(Err(issues)) => Err(ApiError::BadRequest(format!(
            "config not reloaded: {}",
            issues.join("; ")
        ))),
        Err(_) => Err(ApiError::Internal("reload dropped".into())),
    }
}
