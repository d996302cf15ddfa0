//! Metrics (a Prometheus registry, every name prefixed `tollgate_`) and log setup.

use prometheus::{Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, Opts, Registry};

use crate::decision::Reason;

/// Every metric tollgate exports.
#[derive(Debug, Clone)]
pub struct Metrics {
    /// The registry `/metrics` renders.
    pub registry: Registry,
    /// Decisions by `decision` (allow|deny) and `reason`.
    pub decisions: IntCounterVec,
    /// `decisions` resolved per [`Reason`], indexed by its discriminant.
    decision_counters: Vec<IntCounter>,
    /// Time spent answering a Check, from receipt to response.
    pub check_duration: Histogram,
    /// Incremented by every successful catalog load.
    pub catalog_generation: IntGauge,
    /// Catalog reloads rejected because the new file was invalid.
    pub catalog_reload_errors: IntCounter,
    /// Keys in the current catalog.
    pub catalog_keys: IntGauge,
    /// Products in the current catalog.
    pub catalog_products: IntGauge,
    /// Apps in the current catalog.
    pub catalog_apps: IntGauge,
    /// Quota store calls that failed or timed out.
    pub quota_store_errors: IntCounter,
    /// Requests counted by the local fallback because the store failed under `on_store_error: allow`.
    pub quota_fallbacks: IntCounter,
}

/// A metric could not be registered (a programming error: duplicate names).
pub type MetricsError = prometheus::Error;

impl Metrics {
    /// Creates and registers every metric.
    pub fn new() -> Result<Metrics, MetricsError> {
        let registry = Registry::new_custom(Some("tollgate".into()), None)?;
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
        let catalog_generation = IntGauge::new(
            "catalog_generation",
            "successful catalog loads since start (the first load is 1)",
        )?;
        let catalog_reload_errors = IntCounter::new(
            "catalog_reload_errors_total",
            "catalog edits rejected; the last good catalog is kept",
        )?;
        let catalog_keys = IntGauge::new("catalog_keys", "API keys in the current catalog")?;
        let catalog_products =
            IntGauge::new("catalog_products", "products in the current catalog")?;
        let catalog_apps = IntGauge::new("catalog_apps", "apps in the current catalog")?;
        let quota_store_errors = IntCounter::new(
            "quota_store_errors_total",
            "quota store calls that failed or timed out",
        )?;
        registry.register(Box::new(decisions.clone()))?;
        registry.register(Box::new(check_duration.clone()))?;
        registry.register(Box::new(catalog_generation.clone()))?;
        registry.register(Box::new(catalog_reload_errors.clone()))?;
        registry.register(Box::new(catalog_keys.clone()))?;
        registry.register(Box::new(catalog_products.clone()))?;
        registry.register(Box::new(catalog_apps.clone()))?;
        let quota_fallbacks = IntCounter::new(
            "quota_fallbacks_total",
            "requests counted locally because the quota store failed (on_store_error: allow)",
        )?;
        registry.register(Box::new(quota_store_errors.clone()))?;
        registry.register(Box::new(quota_fallbacks.clone()))?;
        let mut decision_counters = Vec::with_capacity(Reason::ALL.len());
        for reason in Reason::ALL {
            let decision = if reason.allows() { "allow" } else { "deny" };
            decision_counters.push(decisions.with_label_values(&[decision, reason.as_str()]));
        }
        Ok(Metrics {
            registry,
            decisions,
            decision_counters,
            check_duration,
            catalog_generation,
            catalog_reload_errors,
            catalog_keys,
            catalog_products,
            catalog_apps,
            quota_store_errors,
            quota_fallbacks,
        })
    }

    /// Counts one decision (the counter per reason was resolved at start: no label lookup per request).
    pub fn record_decision(&self, reason: Reason) {
        if let Some(counter) = self.decision_counters.get(reason as usize) {
            counter.inc();
        }
    }

    /// Renders the registry in the Prometheus text format.
    pub fn render(&self) -> String {
        let mut out = String::new();
        if let Err(e) =
            prometheus::TextEncoder::new().encode_utf8(&self.registry.gather(), &mut out)
        {
            tracing::warn!(error = %e, "metrics could not be encoded");
        }
        out
    }
}

/// Sets up `tracing`: one line per event on stderr, `RUST_LOG` filters (default `info`), `TOLLGATE_LOG_FORMAT=json`
/// for JSON lines.
pub fn init_logging() {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if std::env::var("TOLLGATE_LOG_FORMAT").is_ok_and(|f| f == "json") {
        builder.json().flatten_event(true).init();
    } else {
        builder.init();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_reason_counts_under_its_own_labels() {
        let metrics = Metrics::new().unwrap();
        for (i, reason) in Reason::ALL.into_iter().enumerate() {
            assert_eq!(
                reason as usize, i,
                "Reason::ALL follows the declaration order"
            );
            metrics.record_decision(reason);
            let decision = if reason.allows() { "allow" } else { "deny" };
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
