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
use crate::util::clock::{now_ms, unix_now};

/// Attempts at one page before the round stops (Stripe is down: the round is retried).
const PAGE_ATTEMPTS: u32 = 6;
/// First wait before a failed round is retried; it doubles up to `resync_interval`.
const RETRY_FIRST: Duration = Duration::from_secs(30);

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
    /// One full round: lists every customer the catalog knows and folds each listed subscription into the store,
    /// as of the moment its page was requested (a change counts as healed; the same state is confirmed).
    pub async fn resync(&self) -> Result<ResyncReport, ResyncError> {
        let inner = &self.inner;
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
            for (state, as_of) in listed {
                let write = Write::Observe {
                    customer: customer.clone(),
                    observation: Observation::State { state, as_of },
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

    /// Every subscription of `customer`, page by page, with retries; each with the time its page was requested
    /// (Unix milliseconds).
    async fn list(&self, customer: &str) -> Result<Vec<(SubscriptionState, i64)>, ResyncError> {
        let inner = &self.inner;
        let mut out: Vec<(SubscriptionState, i64)> = Vec::new();
        let mut attempt = 0;
        loop {
            tokio::time::sleep(inner.pace).await;
            let after = out.last().map(|(s, _)| s.id.clone());
            let sent_at = now_ms();
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
                    out.extend(page.into_iter().map(|s| (s, sent_at)));
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

    /// Takes the fleet's turn when none was taken in the last `resync_interval` (so at start, unless another
    /// replica ran one within the interval) and checks again every interval, until `shutdown`. A round that
    /// fails (Stripe down) is retried by the replica that holds the turn, sooner than the next interval.
    pub async fn run_resync(self, mut shutdown: watch::Receiver<bool>) {
        let every = self.inner.resync_every.max(Duration::from_secs(1));
        let every_secs = i64::try_from(every.as_secs()).unwrap_or(i64::MAX);
        loop {
            let turn = tokio::time::Instant::now();
            match self.inner.store.claim_resync(unix_now(), every_secs).await {
                Ok(true) => {
                    let mut retry_in = RETRY_FIRST.min(every);
                    loop {
                        let ok = self.round().await;
                        if ok || turn.elapsed() + retry_in >= every {
                            break;
                        }
                        if sleep_or_stop(retry_in, &mut shutdown).await {
                            return;
                        }
                        retry_in = (retry_in * 2).min(every);
                    }
                }
                Ok(false) => self.count("skipped"),
                Err(e) => {
                    self.count("error");
                    tracing::warn!(error = %e, "Stripe resync turn not taken");
                }
            }
            let left = every.saturating_sub(turn.elapsed());
            if sleep_or_stop(left.max(Duration::from_secs(1)), &mut shutdown).await {
                return;
            }
        }
    }

    fn count(&self, result: &str) {
        self.inner
            .metrics
            .resyncs
            .with_label_values(&[result])
            .inc();
    }

    /// One counted, logged round; whether it read every customer.
    async fn round(&self) -> bool {
        match self.resync().await {
            Ok(report) => {
                self.inner.metrics.last_resync.set(unix_now());
                self.count("ok");
                tracing::info!(
                    customers = report.customers,
                    subscriptions = report.subscriptions,
                    changed = report.changed,
                    "Stripe subscriptions resynced"
                );
                true
            }
            Err(e) => {
                self.count("error");
                tracing::warn!(error = %e, "Stripe resync stopped; retried soon");
                false
            }
        }
    }
}

/// Sleeps `wait`; `true` when told to stop first.
async fn sleep_or_stop(wait: Duration, shutdown: &mut watch::Receiver<bool>) -> bool {
    if *shutdown.borrow() {
        return true;
    }
    tokio::select! {
        () = tokio::time::sleep(wait) => false,
        changed = shutdown.changed() => changed.is_err() || *shutdown.borrow(),
    }
}
