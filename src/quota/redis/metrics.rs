//! The Redis store's Prometheus metrics: call latency and errors, and how much quota the leases move.

use prometheus::{HistogramOpts, HistogramVec, IntCounter, IntCounterVec, Opts, Registry};

/// Every metric of one Redis store, registered once on the registry the store was built with.
pub(super) struct StoreMetrics {
    /// `quota_store_duration_seconds{op}`: time of one call, cut off at the store timeout.
    pub(super) duration: HistogramVec,
    /// `quota_redis_errors_total{kind}`: failed calls, `timeout` or `backend`.
    errors: IntCounterVec,
    /// `quota_redis_calls_total{op}`: calls made, whatever their outcome.
    pub(super) calls: IntCounterVec,
    /// `quota_leases_total`: answers that granted a lease block.
    pub(super) leases: IntCounter,
    /// `quota_lease_units_total`: units reserved in those blocks.
    pub(super) lease_units: IntCounter,
    /// `quota_lease_units_returned_total`: leased units handed back unserved.
    pub(super) returned: IntCounter,
    /// `quota_local_charges_total`: charges served from a lease, without Redis.
    pub(super) local: IntCounter,
}

impl StoreMetrics {
    /// Creates and registers the metrics, with every label value present from the start so dashboards
    /// and alerts see zeros rather than absent series.
    pub(super) fn new(registry: &Registry) -> Result<Self, prometheus::Error> {
        let duration = HistogramVec::new(
            HistogramOpts::new(
                "quota_store_duration_seconds",
                "time of one Redis quota call, by operation",
            )
            .buckets(vec![
                0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25,
            ]),
            &["op"],
        )?;
        let errors = IntCounterVec::new(
            Opts::new(
                "quota_redis_errors_total",
                "Redis quota calls that failed, by kind (timeout|backend)",
            ),
            &["kind"],
        )?;
        let calls = IntCounterVec::new(
            Opts::new(
                "quota_redis_calls_total",
                "Redis quota calls, by operation (charge|lease|settle|ping)",
            ),
            &["op"],
        )?;
        let leases = IntCounter::new("quota_leases_total", "lease blocks granted by Redis")?;
        let lease_units = IntCounter::new(
            "quota_lease_units_total",
            "quota units reserved in lease blocks",
        )?;
        let returned = IntCounter::new(
            "quota_lease_units_returned_total",
            "leased quota units returned to Redis unused",
        )?;
        let local = IntCounter::new(
            "quota_local_charges_total",
            "charges served from a lease without a Redis call",
        )?;
        registry.register(Box::new(duration.clone()))?;
        registry.register(Box::new(errors.clone()))?;
        registry.register(Box::new(calls.clone()))?;
        registry.register(Box::new(leases.clone()))?;
        registry.register(Box::new(lease_units.clone()))?;
        registry.register(Box::new(returned.clone()))?;
        registry.register(Box::new(local.clone()))?;
        for kind in ["timeout", "backend"] {
            errors.with_label_values(&[kind]);
        }
        for op in ["charge", "lease", "settle", "ping", "usage"] {
            calls.with_label_values(&[op]);
            duration.with_label_values(&[op]);
        }
        Ok(StoreMetrics {
            duration,
            errors,
            calls,
            leases,
            lease_units,
            returned,
            local,
        })
    }

    /// Counts a call that ran out of time (the client's response timeout or ours).
    pub(super) fn timed_out(&self) {
        self.errors.with_label_values(&["timeout"]).inc();
    }

    /// Counts a call that Redis refused, that lost its connection or whose answer made no sense.
    pub(super) fn failed(&self) {
        self.errors.with_label_values(&["backend"]).inc();
    }
}
