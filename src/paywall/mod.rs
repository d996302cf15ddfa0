//! Stripe drives access (CONTRACT §8): subscribe and you are in, stop paying and you are out.
//!
//! # One webhook, followed
//! ```text
//! Stripe ─POST /stripe/webhook─> webhook.rs: Stripe-Signature verified (signature.rs), body read (event.rs)
//!        ─> StateStore::record_event (de-duplicated by event id) ─> 200, within Stripe's timeout
//!        ─> applier.rs (right after the answer, bounded; else a sweep on any replica, by claim):
//!           GET /v1/subscriptions/{id} ─> Write::Observe (fold into the stored subscription, model.rs)
//!        ─> changes row `customer` ─> every replica's sync ─> Catalog::paid_subscriptions
//!        ─> the next Check: access.rs decides each product sold through Stripe
//! ```
//!
//! # Order
//! Stripe delivers events at least once and in no particular order. Every stored subscription carries the
//! time of the observation it comes from (`as_of`, Unix milliseconds), and an observation that is not newer
//! never replaces it ([`model::fold`]; on a tie the stored one stays, and the same state seen later is stored
//! as confirmed so that an older payload arriving afterwards cannot win). Event times have a resolution of one
//! second, and two events of one subscription often share a second, so the applier does not trust the payload
//! alone: after acknowledging it reads the subscription from Stripe, which is at least as new as the event,
//! and stores that as of the moment the read was sent. Only when Stripe cannot be read does the payload stand
//! (as of the event's `created`), until the next read or the resync corrects it. The two clocks (Stripe's for
//! payloads, tollgate's for reads) may differ by seconds: a payload-only observation can then lose to, or win
//! over, a read made within that skew; the next read settles it.

//! # Healing
//! Webhooks can be missed (an endpoint down longer than Stripe's three days of retries, a filter set wrong).
//! Once per `resync_interval` for the fleet (a replica takes the turn through the store when none was taken
//! within the interval: at start, unless another replica just did), every known customer's subscriptions are
//! listed (`GET /v1/subscriptions?customer=…&status=all`, paginated, with the meter events' retry and backoff
//! rules) and folded into the store ([`resync`]).
//!
//! # Access
//! A product with `stripe_prices` is granted by a subscription of the owner's Stripe customer with an item at
//! one of those prices, in force (`active`, `trialing`, or `past_due` within `grace_period` of the end of the
//! period whose payment failed); else 402 (past grace, `unpaid`, `incomplete`) or 403 (`canceled`,
//! `incomplete_expired`, `paused`, none). See [`access`]. The Check reads only the snapshot: Stripe or the
//! store being down never slows it, and access stays as last known.

pub mod access;
pub mod applier;
pub mod event;
pub mod metrics;
pub mod model;
pub mod resync;
pub mod signature;
pub mod view;
pub mod webhook;

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use axum::Router;
use axum::extract::DefaultBodyLimit;
use axum::routing::post;
use tokio::sync::{Notify, Semaphore};

use crate::billing::{BillingError, StripeClient, StripeConfig};
use crate::catalog::CatalogHandle;
use crate::credits::Credits;
use crate::paywall::metrics::PaywallMetrics;
use crate::state::StateStore;
use crate::util::throttle::OncePerSecond;

/// Most applies (each a read of Stripe) running at once after webhook answers.
const MAX_APPLYING: usize = 16;

/// Everything the webhook, the applier and the resync share; cheap to clone.
#[derive(Clone)]
pub struct Paywall {
    inner: Arc<Inner>,
}

struct Inner {
    store: Arc<dyn StateStore>,
    client: StripeClient,
    /// `billing.stripe.webhook_secret`; `None`: the webhook is not served.
    secret: Option<String>,
    grace: i64,
    resync_every: Duration,
    initial_backoff: Duration,
    max_backoff: Duration,
    /// Pause between two reads of a resync (from `billing.stripe.rate_limit`).
    pace: Duration,
    catalog: Arc<CatalogHandle>,
    /// Wakes this replica's state sync after a write, so its own snapshot does not wait for the poll.
    sync: Arc<Notify>,
    /// Applies running right after their webhook's answer; past the bound an event waits for the sweep, so a
    /// burst of webhooks cannot become a burst of reads of Stripe.
    applying: Arc<Semaphore>,
    /// Forged or broken deliveries are counted each and logged once a second.
    refusal_log: OncePerSecond,
    metrics: PaywallMetrics,
    /// Where paid invoices of credit prices are granted (set once by `serve`).
    credits: OnceLock<Arc<Credits>>,
}

impl Paywall {
    /// Wires the paywall for `config` over the state `store`, serving decisions from `catalog`.
    pub fn new(
        config: &StripeConfig,
        store: Arc<dyn StateStore>,
        catalog: Arc<CatalogHandle>,
        sync: Arc<Notify>,
        metrics: PaywallMetrics,
    ) -> Result<Paywall, BillingError> {
        Ok(Paywall {
            inner: Arc::new(Inner {
                store,
                client: StripeClient::new(config)?,
                secret: config.webhook_secret().map(str::to_owned),
                grace: i64::try_from(config.grace_period.as_secs()).unwrap_or(i64::MAX),
                resync_every: config.resync_interval,
                initial_backoff: config.initial_backoff,
                max_backoff: config.max_backoff,
                pace: Duration::from_secs(1) / config.rate_limit.get(),
                catalog,
                sync,
                applying: Arc::new(Semaphore::new(
                    usize::try_from(config.rate_limit.get() / 2)
                        .unwrap_or(MAX_APPLYING)
                        .clamp(1, MAX_APPLYING),
                )),
                refusal_log: OncePerSecond::default(),
                metrics,
                credits: OnceLock::new(),
            }),
        })
    }

    /// Grants the credits of paid invoices whose lines carry a product's `stripe_credit_prices` into
    /// `credits` (CONTRACT §9); a second call changes nothing.
    pub fn grant_top_ups(&self, credits: Arc<Credits>) {
        let _ = self.inner.credits.set(credits);
    }

    /// Whether a `webhook_secret` is configured, so `POST /stripe/webhook` is served.
    pub fn takes_webhooks(&self) -> bool {
        self.inner.secret.is_some()
    }

    /// `POST /stripe/webhook` (open: the signature authenticates it), when a `webhook_secret` is configured.
    pub fn webhook_routes(&self) -> Option<Router> {
        if !self.takes_webhooks() {
            return None;
        }
        Some(
            Router::new()
                .route("/stripe/webhook", post(webhook::handler))
                .layer(DefaultBodyLimit::max(webhook::MAX_BODY_BYTES))
                .with_state(self.clone()),
        )
    }
}
