//! The catalog's Prometheus metrics: what the current snapshot holds and how reloads went.

use prometheus::{IntCounter, IntGauge, Registry};

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
        Ok(CatalogMetrics {
            generation,
            reload_errors,
            keys,
            products,
            apps,
        })
    }
}
