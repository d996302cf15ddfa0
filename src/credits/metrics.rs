//! The credits' Prometheus metrics. None is per owner: owners are unbounded, so balances are read through
//! `GET /v1/credits` instead.

use prometheus::{Histogram, HistogramOpts, IntCounter, IntCounterVec, Opts, Registry};

/// Every credits metric, registered once.
#[derive(Clone)]
pub struct CreditMetrics {
    /// `credits_spent_total`: credits spent by allowed calls on this replica.
    pub(crate) spent: IntCounter,
    /// `credits_ledger_calls_total{op,result}`: lease calls to the ledger (lease, renew, return; ok, error).
    pub(crate) calls: IntCounterVec,
    /// `credits_ledger_duration_seconds`: time of one lease call.
    pub(crate) duration: Histogram,
    /// `credits_granted_total{source}`: credits granted (api, stripe, refill), by the replica that wrote them.
    pub(crate) granted: IntCounterVec,
    /// `credits_recovered_total`: credits a restart found leased by a previous life and kept as spent.
    pub(crate) recovered: IntCounter,
    /// `credits_checks_total{result="local"}`: prepaid Checks served from the lease (each result resolved
    /// once, so the hot path does no label lookup).
    pub(crate) checks_local: IntCounter,
    /// `…{result="ledger"}`: served after a ledger call.
    pub(crate) checks_ledger: IntCounter,
    /// `…{result="exhausted"}`: refused, the balance cannot cover the call.
    pub(crate) checks_exhausted: IntCounter,
    /// `…{result="unavailable"}`: refused, the ledger did not answer.
    pub(crate) checks_unavailable: IntCounter,
}

impl CreditMetrics {
    /// Creates and registers the metrics, every label value present from the start.
    pub fn new(registry: &Registry) -> Result<Self, prometheus::Error> {
        let spent = IntCounter::new(
            "credits_spent_total",
            "prepaid credits spent by calls this replica allowed",
        )?;
        let checks = IntCounterVec::new(
            Opts::new(
                "credits_checks_total",
                "prepaid Checks by where their credits came from (local|ledger|exhausted|unavailable)",
            ),
            &["result"],
        )?;
        let calls = IntCounterVec::new(
            Opts::new(
                "credits_ledger_calls_total",
                "lease calls to the credit ledger (op: lease|renew|return; result: ok|error)",
            ),
            &["op", "result"],
        )?;
        let duration = Histogram::with_opts(
            HistogramOpts::new(
                "credits_ledger_duration_seconds",
                "time of one lease call to the credit ledger",
            )
            .buckets(vec![
                0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0,
            ]),
        )?;
        let granted = IntCounterVec::new(
            Opts::new(
                "credits_granted_total",
                "credits granted by this replica, by source (api|stripe|refill)",
            ),
            &["source"],
        )?;
        let recovered = IntCounter::new(
            "credits_recovered_total",
            "credits held by a replica that stopped without returning them and no journal accounts for, kept as spent",
        )?;
        for op in ["lease", "renew", "return"] {
            for result in ["ok", "error"] {
                calls.with_label_values(&[op, result]);
            }
        }
        for source in ["api", "stripe", "refill"] {
            granted.with_label_values(&[source]);
        }
        registry.register(Box::new(spent.clone()))?;
        registry.register(Box::new(checks.clone()))?;
        registry.register(Box::new(calls.clone()))?;
        registry.register(Box::new(duration.clone()))?;
        registry.register(Box::new(granted.clone()))?;
        registry.register(Box::new(recovered.clone()))?;
        Ok(CreditMetrics {
            checks_local: checks.with_label_values(&["local"]),
            checks_ledger: checks.with_label_values(&["ledger"]),
            checks_exhausted: checks.with_label_values(&["exhausted"]),
            checks_unavailable: checks.with_label_values(&["unavailable"]),
            spent,
            calls,
            duration,
            granted,
            recovered,
        })
    }
}
