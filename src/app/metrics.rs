//! The Prometheus registry `/metrics` renders, and the metrics of the paths that serve wires together.
//!
//! Every metric name is prefixed `tollgate_`. Each path owns and registers its own metrics (the Check path's
//! [`CheckMetrics`], the catalog's [`CatalogMetrics`]; metering, billing, the JWT verifier and the Redis store
//! register theirs in [`Metrics::registry`] when they are opened).

use prometheus::Registry;

use crate::catalog::metrics::CatalogMetrics;
use crate::check::CheckMetrics;

/// The registry and the metrics serve hands to the Check path and the catalog watcher.
#[derive(Debug, Clone)]
pub struct Metrics {
    /// The registry `/metrics` renders.
    pub registry: Registry,
    /// Decisions, Check latency, quota store failures.
    pub check: CheckMetrics,
    /// Catalog contents and reloads.
    pub catalog: CatalogMetrics,
}

/// A metric could not be registered (a programming error: duplicate names).
pub type MetricsError = prometheus::Error;

impl Metrics {
    /// Creates the registry and registers the Check path's and the catalog's metrics.
    pub fn new() -> Result<Metrics, MetricsError> {
        let registry = Registry::new_custom(Some("tollgate".into()), None)?;
        let check = CheckMetrics::register(&registry)?;
        let catalog = CatalogMetrics::register(&registry)?;
        Ok(Metrics {
            registry,
            check,
            catalog,
        })
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
