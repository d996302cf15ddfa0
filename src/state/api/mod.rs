//! The management API (CONTRACT §7): developers, apps, subscriptions and keys under `/v1/`, JSON in and
//! out, behind `admin_token`.
//!
//! A handler validates its input against the merged snapshot (products exist, names are not the catalog
//! file's), makes one [`Write`](crate::state::model::Write) to the store, catches this replica up so the
//! caller's next request sees the change, and answers. Writes may carry an `Idempotency-Key`
//! ([`idempotency`]).

pub(crate) mod body;
mod entities;
pub(crate) mod error;
pub(crate) mod idempotency;
pub(crate) mod validate;

use std::sync::Arc;

use axum::Router;
use axum::extract::{DefaultBodyLimit, Query, Request, State};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{MethodRouter, any, delete, get, post, put};
use sha2::{Digest, Sha256};

use crate::credits::Credits;
use crate::credits::api as credits_api;
use crate::paywall::Paywall;
use crate::paywall::view::{self, CustomerQuery};
use crate::state::metrics::StateMetrics;
use crate::state::snapshot::Snapshot;
use crate::state::store::{Actor, StateStore};
use crate::state::sync::Syncer;

pub use error::ApiError;

/// Largest request body the API reads; more is 413.
pub const MAX_BODY_BYTES: usize = 64 * 1024;

/// The OpenAPI 3.1 description of the management API, served at `GET /v1/openapi.json`.
pub const OPENAPI: &str = include_str!("openapi.json");

/// What the management API's handlers share.
#[derive(Clone)]
pub struct ManagementState {
    /// Where writes go and lists come from.
    pub store: Arc<dyn StateStore>,
    /// The merged catalog (products, and the file's names the API must not take).
    pub snapshot: Arc<Snapshot>,
    /// Caught up after each write.
    pub syncer: Arc<Syncer>,
    /// Answers by status class.
    pub metrics: StateMetrics,
    /// Who writes, for the audit table: the admin token's id, or `anonymous` without a token.
    pub actor: Actor,
    /// Answers `GET /v1/subscriptions` when Stripe drives access (`billing.stripe` configured).
    pub paywall: Option<Paywall>,
    /// Answers `/v1/credits` (prepaid balances).
    pub credits: Option<Arc<Credits>>,
}

/// The audit name of a caller holding `admin_token` (`None`: no token, an open loopback listener): a
/// fingerprint that tells tokens apart without revealing them.
pub fn actor(admin_token: Option<&str>) -> Actor {
    match admin_token {
        Some(token) => {
            let digest = Sha256::digest(token.as_bytes());
            Actor(format!("admin:{}", hex::encode(&digest[..6])))
        }
        None => Actor("anonymous".to_owned()),
    }
}

/// Every route of the management API as (method, path): the router is built from this list, and a test
/// holds it equal to the OpenAPI document's operations.
pub const ROUTES: &[(&str, &str)] = &[
    ("GET", "/v1/developers"),
    ("GET", "/v1/developers/{email}"),
    ("PUT", "/v1/developers/{email}"),
    ("DELETE", "/v1/developers/{email}"),
    ("GET", "/v1/apps"),
    ("GET", "/v1/apps/{app}"),
    ("PUT", "/v1/apps/{app}"),
    ("DELETE", "/v1/apps/{app}"),
    ("PUT", "/v1/apps/{app}/products/{product}"),
    ("POST", "/v1/apps/{app}/keys"),
    ("POST", "/v1/apps/{app}/keys/{id}/rotate"),
    ("POST", "/v1/apps/{app}/keys/{id}/revoke"),
    ("GET", "/v1/audit"),
    ("GET", "/v1/subscriptions"),
    ("GET", "/v1/credits"),
    ("GET", "/v1/credits/{owner}"),
    ("POST", "/v1/credits/{owner}"),
    ("GET", "/v1/openapi.json"),
];

/// The handler of one entry of [`ROUTES`].
fn handler(method: &str, path: &str) -> MethodRouter<ManagementState> {
    use entities as e;
    match (method, path) {
        ("GET", "/v1/developers") => get(e::list_developers),
        ("GET", "/v1/developers/{email}") => get(e::get_developer),
        ("PUT", "/v1/developers/{email}") => put(e::put_developer),
        ("DELETE", "/v1/developers/{email}") => delete(e::delete_developer),
        ("GET", "/v1/apps") => get(e::list_apps),
        ("GET", "/v1/apps/{app}") => get(e::get_app),
        ("PUT", "/v1/apps/{app}") => put(e::put_app),
        ("DELETE", "/v1/apps/{app}") => delete(e::delete_app),
        ("PUT", "/v1/apps/{app}/products/{product}") => put(e::put_subscription),
        ("POST", "/v1/apps/{app}/keys") => post(e::create_key),
        ("POST", "/v1/apps/{app}/keys/{id}/rotate") => post(e::rotate_key),
        ("POST", "/v1/apps/{app}/keys/{id}/revoke") => post(e::revoke_key),
        ("GET", "/v1/audit") => get(e::audit),
        ("GET", "/v1/subscriptions") => get(subscriptions),
        ("GET", "/v1/credits") => get(credits_api::list_credits),
        ("GET", "/v1/credits/{owner}") => get(credits_api::get_credits),
        ("POST", "/v1/credits/{owner}") => post(credits_api::post_credits),
        ("GET", "/v1/openapi.json") => get(openapi),
        // Not reached for entries of ROUTES: tests/openapi.rs calls every one.
        _ => any(|| async { ApiError::not_found("no such route") }),
    }
}

/// The management routes; the caller puts them behind the admin token.
pub fn router(state: ManagementState) -> Router {
    let metrics = state.metrics.clone();
    ROUTES
        .iter()
        .fold(Router::new(), |router, (method, path)| {
            router.route(path, handler(method, path))
        })
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .layer(middleware::from_fn(error::json_rejections))
        .layer(middleware::from_fn_with_state(metrics, count))
        .with_state(state)
}

/// What tollgate believes of a customer's Stripe subscriptions ([`crate::paywall::view`]).
async fn subscriptions(
    State(state): State<ManagementState>,
    query: Query<CustomerQuery>,
) -> Response {
    match &state.paywall {
        Some(paywall) => view::answer(paywall, query.0).await,
        None => ApiError::not_found(
            "Stripe does not drive access here: billing.stripe is not configured",
        )
        .into_response(),
    }
}

/// Counts each answer by status class.
async fn count(State(metrics): State<StateMetrics>, request: Request, next: Next) -> Response {
    let response = next.run(request).await;
    let class = match response.status().as_u16() {
        200..=299 => "2xx",
        400..=499 => "4xx",
        500..=599 => "5xx",
        _ => "other",
    };
    metrics.api_answers.with_label_values(&[class]).inc();
    response
}

async fn openapi() -> impl axum::response::IntoResponse {
    (
        [(axum::http::header::CONTENT_TYPE, "application/json")],
        OPENAPI,
    )
}
