//! Admin HTTP: `/metrics`, `/healthz`, `/readyz`.

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;

use crate::quota::QuotaStore;
use crate::telemetry::Metrics;

/// How long `/readyz` waits for the quota store.
const READY_TIMEOUT: Duration = Duration::from_millis(500);

/// What the admin endpoints read.
#[derive(Clone)]
pub struct AdminState {
    /// Rendered by `/metrics`.
    pub metrics: Metrics,
    /// Pinged by `/readyz`.
    pub quota: Arc<dyn QuotaStore>,
}

/// The admin router.
pub fn router(state: AdminState) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .with_state(state)
}

async fn metrics(State(state): State<AdminState>) -> impl IntoResponse {
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        state.metrics.render(),
    )
}

/// Ready once a catalog is loaded (serving implies it: the first load must succeed) and the quota store answers.
async fn readyz(State(state): State<AdminState>) -> impl IntoResponse {
    if state.metrics.catalog_generation.get() < 1 {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            "no catalog loaded\n".to_owned(),
        );
    }
    match tokio::time::timeout(READY_TIMEOUT, state.quota.ping()).await {
        Ok(Ok(())) => (StatusCode::OK, "ready\n".to_owned()),
        Ok(Err(e)) => (StatusCode::SERVICE_UNAVAILABLE, format!("{e}\n")),
        Err(_) => (
            StatusCode::SERVICE_UNAVAILABLE,
            "quota store timed out\n".to_owned(),
        ),
    }
}
