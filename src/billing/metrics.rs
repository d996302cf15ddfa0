//! Billing's Prometheus metrics (the registry adds the `tollgate_` prefix).

use prometheus::{Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, Opts, Registry};

/// Delivery metrics.
#[derive(Debug, Clone)]
pub(crate) struct BillingMetrics {
    /// Outbox rows settled, by outcome: delivered, duplicate, rejected, too_old, unconfirmed.
    pub events: IntCounterVec,
    /// Stripe answers, by kind: accepted, duplicate, rate_limited, server_error, timeout, transport_error,
    /// unauthorized, session_expired, rejected.
    pub answers: IntCounterVec,
    /// Retries scheduled after a transient failure.
    pub retries: IntCounter,
    /// 1 while delivery is paused because Stripe refused the API key.
    pub paused: IntGauge,
    /// Current dead letters.
    pub dead_letters: IntGauge,
    /// Outbox rows waiting for delivery (as of the last pass).
    pub pending: IntGauge,
    /// v2 meter event sessions created.
    pub sessions: IntCounter,
    /// Time of one request to Stripe.
    pub request_seconds: Histogram,
}

impl BillingMetrics {
    /// Creates and registers the metrics.
    pub(crate) fn register(registry: &Registry) -> Result<Self, prometheus::Error> {
        let m = BillingMetrics {
            events: IntCounterVec::new(
                Opts::new(
                    "billing_events_total",
                    "outbox rows settled by billing delivery, by outcome",
                ),
                &["outcome"],
            )?,
            answers: IntCounterVec::new(
                Opts::new(
                    "billing_stripe_answers_total",
                    "answers from Stripe, by kind",
                ),
                &["answer"],
            )?,
            retries: IntCounter::new(
                "billing_retries_total",
                "retries scheduled after a transient Stripe failure",
            )?,
            paused: IntGauge::new(
                "billing_paused",
                "1 while delivery is paused because Stripe refused the API key (401/403)",
            )?,
            dead_letters: IntGauge::new(
                "billing_dead_letters",
                "outbox rows delivery gave up on, waiting for an operator",
            )?,
            pending: IntGauge::new(
                "billing_pending_events",
                "outbox rows waiting for delivery to Stripe",
            )?,
            sessions: IntCounter::new(
                "billing_stream_sessions_total",
                "v2 meter event sessions created",
            )?,
            request_seconds: Histogram::with_opts(
                HistogramOpts::new("billing_request_seconds", "time of one request to Stripe")
                    .buckets(vec![
                        0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
                    ]),
            )?,
        };
        registry.register(Box::new(m.events.clone()))?;
        registry.register(Box::new(m.answers.clone()))?;
        registry.register(Box::new(m.retries.clone()))?;
        registry.register(Box::new(m.paused.clone()))?;
        registry.register(Box::new(m.dead_letters.clone()))?;
        registry.register(Box::new(m.pending.clone()))?;
        registry.register(Box::new(m.sessions.clone()))?;
        registry.register(Box::new(m.request_seconds.clone()))?;
        Ok(m)
    }
}
