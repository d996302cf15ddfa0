//! Prometheus metrics of token verification and JWKS fetching.

use prometheus::{IntCounter, IntCounterVec, IntGaugeVec, Opts, Registry};

/// Prometheus metrics (names prefixed `tollgate_jwt_`): verifications by outcome, cache hits, JWKS fetches by
/// result, JWKS keys loaded.
#[derive(Clone)]
pub struct JwtMetrics {
    verifications: IntCounterVec,
    cache_hits: IntCounterVec,
    jwks_fetches: IntCounterVec,
    jwks_keys: IntGaugeVec,
    jwks_last_success: IntGaugeVec,
}

/// Label value for rejections that happen before a provider is known.
pub(crate) const NO_PROVIDER: &str = "none";

impl JwtMetrics {
    /// Creates the metrics and registers them in `registry`.
    pub fn register(registry: &Registry) -> Result<Self, prometheus::Error> {
        let metrics = Self {
            verifications: IntCounterVec::new(
                Opts::new(
                    "jwt_verifications_total",
                    "JWT verifications by provider and outcome (valid, or the rejection code); cache hits included",
                ),
                &["provider", "outcome"],
            )?,
            cache_hits: IntCounterVec::new(
                Opts::new(
                    "jwt_cache_hits_total",
                    "Valid JWTs answered from the verified-token cache",
                ),
                &["provider"],
            )?,
            jwks_fetches: IntCounterVec::new(
                Opts::new(
                    "jwt_jwks_fetches_total",
                    "JWKS fetches by provider and result (ok, error)",
                ),
                &["provider", "result"],
            )?,
            jwks_keys: IntGaugeVec::new(
                Opts::new(
                    "jwt_jwks_keys",
                    "Signature keys currently loaded from the provider's JWKS",
                ),
                &["provider"],
            )?,
            jwks_last_success: IntGaugeVec::new(
                Opts::new(
                    "jwt_jwks_last_success_timestamp_seconds",
                    "Unix time of the provider's last successful JWKS fetch",
                ),
                &["provider"],
            )?,
        };
        registry.register(Box::new(metrics.verifications.clone()))?;
        registry.register(Box::new(metrics.cache_hits.clone()))?;
        registry.register(Box::new(metrics.jwks_fetches.clone()))?;
        registry.register(Box::new(metrics.jwks_keys.clone()))?;
        registry.register(Box::new(metrics.jwks_last_success.clone()))?;
        Ok(metrics)
    }

    pub(crate) fn rejected(&self, provider: &str, code: &str) {
        self.verifications
            .with_label_values(&[provider, code])
            .inc();
    }

    /// Counters resolved once per provider, so the hot path does no label lookup.
    pub(crate) fn for_provider(&self, provider: &str) -> ProviderCounters {
        ProviderCounters {
            valid: self.verifications.with_label_values(&[provider, "valid"]),
            cache_hits: self.cache_hits.with_label_values(&[provider]),
        }
    }

    pub(crate) fn jwks_fetched(&self, provider: &str, ok: bool) {
        self.jwks_fetches
            .with_label_values(&[provider, if ok { "ok" } else { "error" }])
            .inc();
    }

    pub(crate) fn jwks_loaded(&self, provider: &str, keys: usize, unix_time: i64) {
        self.jwks_keys
            .with_label_values(&[provider])
            .set(i64::try_from(keys).unwrap_or(i64::MAX));
        self.jwks_last_success
            .with_label_values(&[provider])
            .set(unix_time);
    }
}

/// Per-provider counters of the hot path.
#[derive(Clone)]
pub(crate) struct ProviderCounters {
    pub(crate) valid: IntCounter,
    pub(crate) cache_hits: IntCounter,
}
