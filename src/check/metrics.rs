//! The Check path's Prometheus metrics: decisions by reason, Check latency, quota store failures.

use prometheus::{Histogram, HistogramOpts, IntCounter, IntCounterVec, Opts, Registry};

use crate::check::Reason;

/// What the Check path counts.
#[derive(Debug, Clone)]
pub struct CheckMetrics {
    /// Decisions by `decision` (allow|deny) and `reason`.
    pub decisions: IntCounterVec,
    /// `decisions` resolved per [`Reason`], indexed by its discriminant, so a Check does no label lookup.
    decision_counters: Vec<IntCounter>,
    /// Time spent deciding a Check, from receipt to the verdict.
    pub check_duration: Histogram,
    /// Quota store calls that failed or timed out.
    pub quota_store_errors: IntCounter,
    /// Requests counted by the local fallback because the store failed under `on_store_error: allow`.
    pub quota_fallbacks: IntCounter,
}

impl CheckMetrics {
    /// Creates the metrics and registers them in `registry`.
    pub fn register(registry: &Registry) -> Result<CheckMetrics, prometheus::Error> {
        let decisions = IntCounterVec::new(
            Opts::new(
                "decisions_total",
                "ext_authz decisions by outcome and reason",
            ),
            &["decision", "reason"],
        )?;
        let check_duration = Histogram::with_opts(
            HistogramOpts::new(
                "check_duration_seconds",
                "time to answer one ext_authz Check",
            )
            .buckets(vec![
                0.000_025, 0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01,
                0.025, 0.05, 0.1,
            ]),
        )?;
        let quota_store_errors = IntCounter::new(
            "quota_store_errors_total",
            "quota store calls that failed or timed out",
        )?;
        let quota_fallbacks = IntCounter::new(
            "quota_fallbacks_total",
            "requests counted locally because the quota store failed (on_store_error: allow)",
        )?;
        registry.register(Box::new(decisions.clone()))?;
        registry.register(Box::new(check_duration.clone()))?;
        registry.register(Box::new(quota_store_errors.clone()))?;
        registry.register(Box::new(quota_fallbacks.clone()))?;
        let decision_counters = Reason::ALL
            .iter()
            .map(|reason| {
                let decision = reason.decision();
                decisions.with_label_values(&[decision, reason.as_str()])
            })
            .collect();
        Ok(CheckMetrics {
            decisions,
            decision_counters,
            check_duration,
            quota_store_errors,
            quota_fallbacks,
        })
    }

    /// Counts one decision.
    pub fn record_decision(&self, reason: Reason) {
        if let Some(counter) = self.decision_counters.get(reason as usize) {
            counter.inc();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_reason_counts_under_its_own_labels() {
        let metrics = CheckMetrics::register(&Registry::new()).unwrap();
        for (i, reason) in Reason::ALL.into_iter().enumerate() {
            assert_eq!(
                reason as usize, i,
                "Reason::ALL follows the declaration order"
            );
            metrics.record_decision(reason);
            let decision = reason.decision();
            assert_eq!(
                metrics
                    .decisions
                    .with_label_values(&[decision, reason.as_str()])
                    .get(),
                1
            );
        }
    }
}
