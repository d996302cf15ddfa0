//! Admin HTTP: `/metrics`, `/healthz`, `/readyz` (open), and `/v1/...` partner data (behind `admin_token`).

use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Query, Request, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};

use crate::app::metrics::Metrics;
use crate::billing::Billing;
use crate::catalog::CatalogHandle;
use crate::check::app_quotas;
use crate::history::HistoryStore;
use crate::metering::{AppQuota, Metering, MeteringError, QuotaCounter, UsageQuery};
use crate::quota::{LimitUsage, QuotaStore};
use crate::state::sync::Syncer;
use crate::util::bearer;

/// How long `/readyz` waits for the quota store.
const READY_TIMEOUT: Duration = Duration::from_millis(500);

/// What the admin endpoints read.
#[derive(Clone)]
pub struct AdminState {
    /// Rendered by `/metrics`.
    pub metrics: Metrics,
    /// Pinged by `/readyz`; read for the quota counters of `/v1/usage?app=`.
    pub quota: Arc<dyn QuotaStore>,
    /// Names an app's quota counters for `/v1/usage?app=`.
    pub catalog: Arc<CatalogHandle>,
    /// Answers `/v1/usage` and `/v1/outbox`; `/readyz` fails while its spool is full.
    pub metering: Metering,
    /// Answers `/v1/billing/dead-letters` when billing is configured.
    pub billing: Option<Billing>,
    /// Required as a bearer token by `/v1/...` when set.
    pub admin_token: Option<Arc<str>>,
    /// `/readyz` waits for the state store's first full read.
    pub syncer: Option<Arc<Syncer>>,
    /// Answers `/v1/usage/history` (hourly rollups in the state store).
    pub history: Option<Arc<dyn HistoryStore>>,
}

/// The admin router; `management` (the state store's API) joins the partner data behind the token.
pub fn router(state: AdminState, management: Option<Router>) -> Router {
    let token = state.admin_token.clone();
    let partner_data = Router::new()
        .route("/v1/usage", get(usage))
        .route("/v1/usage/history", get(crate::history::api::usage_history))
        .route("/v1/outbox", get(outbox))
        .route("/v1/billing/dead-letters", get(dead_letters))
        .with_state(state.clone());
    let partner_data = match management {
        Some(management) => partner_data.merge(management),
        None => partner_data,
    }
    .route_layer(middleware::from_fn_with_state(token, require_token));
    Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .with_state(state)
        .merge(partner_data)
}

/// Lets a request through when no token is configured or it carries `Authorization: Bearer <admin_token>`
/// (compared in constant time).
async fn require_token(
    State(token): State<Option<Arc<str>>>,
    headers: HeaderMap,
    request: Request,
    next: Next,
) -> Response {
    let Some(expected) = &token else {
        return next.run(request).await;
    };
    let presented = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok());
    if bearer::matches(presented, expected) {
        return next.run(request).await;
    }
    (
        StatusCode::UNAUTHORIZED,
        [(header::WWW_AUTHENTICATE, "Bearer realm=\"tollgate-admin\"")],
        Json(serde_json::json!({"error": "unauthenticated", "message": "this endpoint needs the admin token as a bearer token"})),
    )
        .into_response()
}

async fn usage(State(state): State<AdminState>, Query(query): Query<UsageQuery>) -> Response {
    let app = query.app.clone();
    match state.metering.usage(query).await {
        Ok(mut report) => {
            if let Some(app) = app {
                report.quota = Some(match quota_counters(&state, &app).await {
                    Ok(counters) => AppQuota::Counters(counters),
                    Err(e) => {
                        tracing::warn!(error = %e, "quota counters unavailable for the usage report");
                        AppQuota::Unavailable
                    }
                });
            }
            Json(report).into_response()
        }
        Err(MeteringError::BadQuery(bad)) => (
            StatusCode::BAD_REQUEST,
            Json(serde_json::json!({"error": "bad_request", "message": bad.to_string()})),
        )
            .into_response(),
        Err(e) => {
            tracing::warn!(error = %e, "usage report failed");
            (
                StatusCode::SERVICE_UNAVAILABLE,
                Json(serde_json::json!({"error": "unavailable", "message": "usage report failed"})),
            )
                .into_response()
        }
    }
}

/// Where each of the app's quota counters stands now (an app unknown to the catalog has none).
async fn quota_counters(
    state: &AdminState,
    app: &str,
) -> Result<Vec<QuotaCounter>, crate::quota::StoreError> {
    let catalog = state.catalog.snapshot();
    let Some(app) = catalog.app_by_name(app) else {
        return Ok(Vec::new());
    };
    let now = chrono::Utc::now().timestamp();
    let mut counters = Vec::new();
    for quota in app_quotas(&catalog, app) {
        for usage in state.quota.usage(&quota.bucket, quota.limits, now).await? {
            counters.push(counter(quota.product, quota.operation, &usage));
        }
    }
    Ok(counters)
}

fn counter(product: &str, operation: Option<&str>, usage: &LimitUsage) -> QuotaCounter {
    let at = |secs: i64| chrono::DateTime::from_timestamp(secs, 0);
    let limit = usage.limit.limit;
    QuotaCounter {
        product: product.to_owned(),
        operation: operation.map(str::to_owned),
        limit,
        interval: usage.limit.interval,
        unit: usage.limit.unit.as_str().to_owned(),
        window_start: at(usage.window.start),
        window_end: at(usage.window.end),
        used: usage.used,
        reserved: usage.reserved,
        remaining: limit.saturating_sub(usage.used.saturating_add(usage.reserved)),
    }
}

async fn dead_letters(State(state): State<AdminState>) -> Response {
    let Some(billing) = &state.billing else {
        return (
            StatusCode::NOT_FOUND,
            Json(serde_json::json!({"error": "not_found", "message": "billing is not configured"})),
        )
            .into_response();
    };
    match billing.dead_letters() {
        Ok(letters) => Json(letters).into_response(),
        Err(e) => {
            tracing::warn!(error = %e, "dead letters could not be read");
            (
                StatusCode::SERVICE_UNAVAILABLE,
                Json(serde_json::json!({"error": "unavailable", "message": "dead letters could not be read"})),
            )
                .into_response()
        }
    }
}

async fn outbox(State(state): State<AdminState>) -> Response {
    Json(state.metering.outbox_rows().await).into_response()
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

/// Ready once a catalog is loaded (serving implies it: the first load must succeed), the quota store answers
/// and the metering spool has room.
async fn readyz(State(state): State<AdminState>) -> impl IntoResponse {
    if state.metrics.catalog.generation.get() < 1 {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            "no catalog loaded\n".to_owned(),
        );
    }
    if state.metering.is_full() {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            "metering spool is full: usage records are refused\n".to_owned(),
        );
    }
    if let Some(syncer) = &state.syncer
        && !syncer.loaded().await
    {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            "state store not read yet\n".to_owned(),
        );
    }
    if let Err(unhealthy) = state.metering.health() {
        return (StatusCode::SERVICE_UNAVAILABLE, format!("{unhealthy}\n"));
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
