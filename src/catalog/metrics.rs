//! The catalog's Prometheus metrics: what the current snapshot holds and how reloads went.

use std::time::SystemTime;

use prometheus::{IntCounter, IntCounterVec, IntGauge, Opts, Registry};

/// What the catalog loader and watcher count.
#[derive(Debug, Clone)]
pub struct CatalogMetrics {
    /// Incremented by every successful catalog load; `/readyz` waits for the first.
    pub generation: IntGauge,
    /// Catalog reloads rejected because the new file was invalid.
    pub reload_errors: IntCounter,
    /// Keys in the current catalog.
    pub keys: IntGauge,
    /// Products in the current catalog.
    pub products: IntGauge,
    /// Apps in the current catalog.
    pub apps: IntGauge,
    /// Polls of a remote catalog by result: ok, not_modified, unchanged, invalid, error.
    pub fetches: IntCounterVec,
    /// When a remote catalog was last fetched and installed (Unix seconds; 0: never).
    pub fetch_last_success: IntGauge,
}

impl CatalogMetrics {
    /// Creates the metrics and registers them in `registry`.
    pub fn register(registry: &Registry) -> Result<CatalogMetrics, prometheus::Error> {
        let generation = IntGauge::new(
            "catalog_generation",
            "successful catalog loads since start (the first load is 1)",
        )?;
        let reload_errors = IntCounter::new(
            "catalog_reload_errors_total",
            "catalog edits rejected; the last good catalog is kept",
        )?;
        let keys = IntGauge::new("catalog_keys", "API keys in the current catalog")?;
        let products = IntGauge::new("catalog_products", "products in the current catalog")?;
        let apps = IntGauge::new("catalog_apps", "apps in the current catalog")?;
        registry.register(Box::new(generation.clone()))?;
        registry.register(Box::new(reload_errors.clone()))?;
        registry.register(Box::new(keys.clone()))?;
        registry.register(Box::new(products.clone()))?;
        registry.register(Box::new(apps.clone()))?;
        let fetches = IntCounterVec::new(
            Opts::new(
                "catalog_fetches_total",
                "polls of catalog.url by result (ok, not_modified, unchanged, invalid, error)",
            ),
            &["result"],
        )?;
        let fetch_last_success = IntGauge::new(
            "catalog_fetch_last_success_timestamp_seconds",
            "when catalog.url last served a catalog that was installed (Unix seconds)",
        )?;
        registry.register(Box::new(fetches.clone()))?;
        registry.register(Box::new(fetch_last_success.clone()))?;
        Ok(CatalogMetrics {
            generation,
            reload_errors,
            keys,
            products,
            apps,
            fetches,
            fetch_last_success,
        })
    }

    /// Counts one poll of a remote catalog.
    pub fn fetch(&self, result: &str) {
        self.fetches.with_label_values(&[result]).inc();
    }

    /// Records a remote catalog fetched and installed at `at`.
    pub fn fetched_at(&self, at: SystemTime) {
        self.fetch_last_success.set(super::remote::unix_seconds(at));
    }
}
