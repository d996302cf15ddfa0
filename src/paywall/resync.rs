//! Healing: every known customer's subscriptions read again from Stripe, and what differs stored.
//!
//! Replicas take turns through the store ([`StateStore::claim_resync`](crate::state::StateStore)): one full
//! read per `resync_interval` for the whole fleet, whichever replica's timer fires first.

use std::time::Duration;

use tokio::sync::watch;

use crate::billing::{Read, backoff};
use crate::paywall::Paywall;
use crate::paywall::event;
use crate::paywall::model::{Observation, SubscriptionState};
use crate::state::model::Write;
use crate::state::store::Actor;
use crate::util::clock::unix_now;

/// Attempts at one page before the round stops (Stripe is down: the next round starts over).
const PAGE_ATTEMPTS: u32 = 6;

/// Why a resync round stopped early.
#[derive(Debug, thiserror::Error)]
pub enum ResyncError {
    /// Stripe kept failing or refused.
    #[error("reading subscriptions of {customer} from Stripe failed: {why}")]
    Stripe {
        /// The customer being read.
        customer: String,
        /// What Stripe (or the network) said.
        why: String,
    },
    /// The state store failed.
    #[error(transparent)]
    Store(#[from] crate::state::StoreError),
}

/// What one round did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ResyncReport {
    /// Customers read.
    pub customers: usize,
    /// Subscriptions listed.
    pub subscriptions: usize,
    /// Subscriptions stored because they differed from what tollgate believed.
    pub changed: usize,
}

impl Paywall {
    /// One full round: lists every customer the catalog knows and stores what differs, as of the round's start.
    pub async fn resync(&self) -> Result<ResyncReport, ResyncError> {
        let inner = &self.inner;
        let started = unix_now();
        let catalog = inner.catalog.snapshot();
        let customers: Vec<String> = catalog
            .stripe_customers()
            .into_iter()
            .map(str::to_owned)
            .collect();
        let mut report = ResyncReport::default();
        for customer in customers {
            let listed = self.list(&customer).await?;
            report.customers += 1;
            report.subscriptions += listed.len();
            let believed = inner.catalog.snapshot();
            for state in listed {
                let known = believed
                    .paid_subscriptions(&customer)
                    .iter()
                    .find(|s| s.state.id == state.id);
                if known.is_some_and(|k| k.state == state) {
                    continue;
                }
                let write = Write::Observe {
                    customer: customer.clone(),
                    observation: Observation::State {
                        state,
                        as_of: started,
                    },
                    source: "resync".into(),
                    event: None,
                };
                if let crate::state::model::Written::Paid(Some(now)) = inner
                    .store
                    .write(&write, &Actor("stripe:resync".into()), unix_now())
                    .await?
                {
                    report.changed += 1;
                    inner.metrics.healed.inc();
                    tracing::info!(customer = %customer, subscription = %now.state.id,
                        status = now.state.status.as_str(), "resync healed a Stripe subscription");
                }
            }
        }
        if report.changed > 0 {
            inner.sync.notify_one();
        }
        Ok(report)
    }

    /// Every subscription of `customer`, page by page, with retries.
    async fn list(&self, customer: &str) -> Result<Vec<SubscriptionState>, ResyncError> {
        let inner = &self.inner;
        let mut out: Vec<SubscriptionState> = Vec::new();
        let mut attempt = 0;
        loop {
            tokio::time::sleep(inner.pace).await;
            let after = out.last().map(|s| s.id.clone());
            let read = inner.client.subscriptions(customer, after.as_deref()).await;
            let failed = |why: String| ResyncError::Stripe {
                customer: customer.to_owned(),
                why,
            };
            match read {
                Read::Ok(body) => {
                    inner.metrics.reads.with_label_values(&["ok"]).inc();
                    attempt = 0;
                    let (page, more) =
                        event::subscription_page(&body).map_err(|e| failed(e.to_string()))?;
                    let empty = page.is_empty();
                    out.extend(page);
                    if !more || empty {
                        return Ok(out);
                    }
                }
                Read::NotFound => {
                    inner.metrics.reads.with_label_values(&["not_found"]).inc();
                    return Ok(out);
                }
                Read::Refused { status, message } => {
                    inner.metrics.reads.with_label_values(&["refused"]).inc();
                    // An unknown customer (a typo in the catalog) must not stop the others being read.
                    if status == 400 || status == 404 {
                        tracing::warn!(customer, status, message = %message,
                            "Stripe refused to list this customer's subscriptions");
                        return Ok(out);
                    }
                    return Err(failed(format!("{status}: {message}")));
                }
                Read::Retry {
                    reason,
                    retry_after,
                } => {
                    inner.metrics.reads.with_label_values(&["retry"]).inc();
                    attempt += 1;
                    if attempt >= PAGE_ATTEMPTS {
                        return Err(failed(reason));
                    }
                    tokio::time::sleep(backoff(
                        inner.initial_backoff,
                        inner.max_backoff,
                        attempt,
                        retry_after,
                    ))
                    .await;
                }
            }
        }
    }

    /// Runs a round at start and every `resync_interval` when it is this replica's turn, until `shutdown`.
    pub async fn run_resync(self, mut shutdown: watch::Receiver<bool>) {
        let every = self.inner.resync_every;
        let every_secs = i64::try_from(every.as_secs()).unwrap_or(i64::MAX);
        loop {
            let result = match self.inner.store.claim_resync(unix_now(), every_secs).await {
                Ok(true) => match self.resync().await {
                    Ok(report) => {
                        self.inner.metrics.last_resync.set(unix_now());
                        tracing::info!(
                            customers = report.customers,
                            subscriptions = report.subscriptions,
                            changed = report.changed,
                            "Stripe subscriptions resynced"
                        );
                        "ok"
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "Stripe resync stopped; the next round starts over");
                        "error"
                    }
                },
                Ok(false) => "skipped",
                Err(e) => {
                    tracing::warn!(error = %e, "Stripe resync turn not taken");
                    "error"
                }
            };
            self.inner
                .metrics
                .resyncs
                .with_label_values(&[result])
                .inc();
            tokio::select! {
                () = tokio::time::sleep(every.max(Duration::from_secs(1))) => {}
                changed = shutdown.changed() => if changed.is_err() || *shutdown.borrow() { return },
            }
        }
    }
}
