//! The paywall's Prometheus metrics (the registry adds the `tollgate_` prefix); no label names a customer.

use prometheus::{IntCounter, IntCounterVec, IntGauge, Opts, Registry};

/// Webhook outcomes, reads of Stripe and resync rounds.
#[derive(Debug, Clone)]
pub struct PaywallMetrics {
    /// Webhook deliveries by outcome: `verified`, `bad_signature`, `invalid`, `duplicate`, `ignored`,
    /// `applied`, `unavailable` (the store could not record it: Stripe retries).
    pub webhooks: IntCounterVec,
    /// Reads of one subscription or one page, by result: `ok`, `not_found`, `retry`, `refused`.
    pub reads: IntCounterVec,
    /// Resync rounds by result: `ok`, `error`, `skipped` (another replica's turn).
    pub resyncs: IntCounterVec,
    /// Subscriptions a resync found different from what tollgate believed (missed webhooks healed).
    pub healed: IntCounter,
    /// Unix time of the last resync that read every customer.
    pub last_resync: IntGauge,
}

impl PaywallMetrics {
    /// Creates the metrics and registers them in `registry`.
    pub fn register(registry: &Registry) -> Result<PaywallMetrics, prometheus::Error> {
        let m = PaywallMetrics {
            webhooks: IntCounterVec::new(
                Opts::new(
                    "stripe_webhooks_total",
                    "Stripe webhook deliveries by outcome",
                ),
                &["outcome"],
            )?,
            reads: IntCounterVec::new(
                Opts::new(
                    "stripe_subscription_reads_total",
                    "reads of subscriptions from Stripe by result",
                ),
                &["result"],
            )?,
            resyncs: IntCounterVec::new(
                Opts::new(
                    "stripe_resyncs_total",
                    "full re-reads of subscriptions from Stripe by result",
                ),
                &["result"],
            )?,
            healed: IntCounter::new(
                "stripe_resync_changes_total",
                "subscriptions a resync found different from what tollgate believed (missed webhooks)",
            )?,
            last_resync: IntGauge::new(
                "stripe_resync_last_success_timestamp_seconds",
                "Unix time of the last complete resync of subscriptions from Stripe",
            )?,
        };
        for outcome in [
            "verified",
            "bad_signature",
            "invalid",
            "duplicate",
            "ignored",
            "applied",
            "unavailable",
            "topup",
            "unowned",
        ] {
            m.webhooks.with_label_values(&[outcome]);
        }
        for result in ["ok", "error", "skipped"] {
            m.resyncs.with_label_values(&[result]);
        }
        registry.register(Box::new(m.webhooks.clone()))?;
        registry.register(Box::new(m.reads.clone()))?;
        registry.register(Box::new(m.resyncs.clone()))?;
        registry.register(Box::new(m.healed.clone()))?;
        registry.register(Box::new(m.last_resync.clone()))?;
        Ok(m)
    }
}
