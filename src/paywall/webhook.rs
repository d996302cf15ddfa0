//! `POST /stripe/webhook`: verify, de-duplicate, record, answer; the event is applied after the answer.

use axum::Json;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use std::sync::Arc;

use crate::credits::topup::{self, TopUpError};
use crate::paywall::Paywall;
use crate::paywall::event::{self, Parsed};
use crate::paywall::signature;
use crate::util::clock::unix_now;

/// The largest webhook body read (Stripe's events are far smaller).
pub const MAX_BODY_BYTES: usize = 1 << 20;

/// What a delivery came to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Receipt {
    /// Recorded for the first time: applied right after the answer.
    Recorded,
    /// An event id seen before: nothing changes.
    Duplicate,
    /// A type tollgate does not act on.
    Ignored(String),
    /// The signature is missing, wrong or stale: nothing changes.
    BadSignature(String),
    /// Signed, but not an event tollgate can read: acknowledged (a 4xx would have Stripe retry it for days and
    /// may disable the endpoint), logged and counted; the resync brings what it was about.
    Invalid(String),
    /// The state store could not record it: Stripe will deliver it again.
    Unavailable,
    /// It bought credits for a customer no developer has yet: Stripe delivers it again (for up to 3 days).
    Unowned(String),
}

impl Paywall {
    /// Handles one delivery at `now`; a recorded event is applied in the background.
    pub async fn receive(&self, signature: Option<&str>, body: &[u8], now: i64) -> Receipt {
        let inner = &self.inner;
        let count = |outcome: &str| inner.metrics.webhooks.with_label_values(&[outcome]).inc();
        let Some(secret) = inner.secret.as_deref() else {
            return Receipt::BadSignature("no webhook secret is configured".into());
        };
        if let Err(e) = signature::verify(signature, body, secret, now) {
            count("bad_signature");
            if inner.refusal_log.allow(now) {
                let refused = inner
                    .metrics
                    .webhooks
                    .with_label_values(&["bad_signature"])
                    .get();
                tracing::warn!(error = %e, refused_so_far = refused,
                    "Stripe webhook refused (logged at most once a second; the metric counts each)");
            }
            return Receipt::BadSignature(e.to_string());
        }
        count("verified");
        // Before the de-duplication below: a delivery whose grant failed is granted when it comes again, and
        // each line grants once whatever the deliveries.
        if let (Some(credits), Some(invoice)) = (inner.credits.get(), topup::paid_invoice(body)) {
            let catalog = inner.catalog.snapshot();
            match topup::grant(credits, &catalog, &invoice, now).await {
                Ok(0) => {}
                Ok(_) => count("topup"),
                Err(TopUpError::NoOwner(customer)) => {
                    count("unowned");
                    tracing::warn!(invoice = %invoice.id, customer = %customer,
                        "credits bought by a customer no developer has: refused so that Stripe delivers it again");
                    return Receipt::Unowned(customer);
                }
                Err(TopUpError::Ledger(e)) => {
                    count("unavailable");
                    tracing::warn!(error = %e, invoice = %invoice.id, "credit top-up not granted; Stripe retries");
                    return Receipt::Unavailable;
                }
            }
        }
        let event = match event::parse(body) {
            Ok(Parsed::Handled(event)) => event,
            Ok(Parsed::Ignored { id, kind }) => {
                count("ignored");
                tracing::debug!(event = %id, kind = %kind, "Stripe event ignored");
                return Receipt::Ignored(kind);
            }
            Err(e) => {
                count("invalid");
                tracing::warn!(error = %e, "signed Stripe webhook unreadable");
                return Receipt::Invalid(e.to_string());
            }
        };
        match inner.store.record_event(&event, now).await {
            Ok(true) => {
                tracing::info!(event = %event.id, kind = %event.kind, customer = %event.customer,
                    subscription = event.observation.subscription(), "Stripe event received");
                match Arc::clone(&inner.applying).try_acquire_owned() {
                    Ok(permit) => {
                        let paywall = self.clone();
                        tokio::spawn(async move {
                            paywall.apply(event).await;
                            drop(permit);
                        });
                    }
                    Err(_) => {
                        tracing::debug!(event = %event.id, "applies saturated; left to the sweep")
                    }
                }
                Receipt::Recorded
            }
            Ok(false) => {
                count("duplicate");
                tracing::debug!(event = %event.id, "Stripe event delivered again");
                Receipt::Duplicate
            }
            Err(e) => {
                count("unavailable");
                tracing::warn!(error = %e, event = %event.id, "Stripe event not recorded; Stripe retries");
                Receipt::Unavailable
            }
        }
    }
}

/// The axum handler of `POST /stripe/webhook`.
pub async fn handler(State(paywall): State<Paywall>, headers: HeaderMap, body: Bytes) -> Response {
    let signature = headers
        .get("stripe-signature")
        .and_then(|v| v.to_str().ok());
    let answer = |status: StatusCode, body: serde_json::Value| (status, Json(body)).into_response();
    match paywall.receive(signature, &body, unix_now()).await {
        Receipt::Recorded => answer(StatusCode::OK, serde_json::json!({"received": true})),
        Receipt::Duplicate => answer(
            StatusCode::OK,
            serde_json::json!({"received": true, "duplicate": true}),
        ),
        Receipt::Ignored(kind) => answer(
            StatusCode::OK,
            serde_json::json!({"received": true, "ignored": kind}),
        ),
        Receipt::BadSignature(why) => answer(
            StatusCode::BAD_REQUEST,
            serde_json::json!({"error": "bad_signature", "message": why}),
        ),
        Receipt::Invalid(why) => answer(
            StatusCode::OK,
            serde_json::json!({"received": true, "unreadable": why}),
        ),
        Receipt::Unowned(customer) => answer(
            StatusCode::SERVICE_UNAVAILABLE,
            serde_json::json!({"error": "unknown_customer", "message": format!(
                "no developer has Stripe customer {customer}; deliver again once one does")}),
        ),
        Receipt::Unavailable => answer(
            StatusCode::SERVICE_UNAVAILABLE,
            serde_json::json!({"error": "unavailable", "message": "the state store is unavailable; deliver again later"}),
        ),
    }
}
