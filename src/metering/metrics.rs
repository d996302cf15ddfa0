//! Metering's Prometheus metrics (the registry adds the `tollgate_` prefix).

use prometheus::{Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, Opts, Registry};

/// The spool, window and outbox metrics.
#[derive(Debug, Clone)]
pub(crate) struct MeteringMetrics {
    /// Records dropped because the same entry was already counted.
    pub deduplicated: IntCounter,
    /// The same, by app: a client that reuses request ids shows up here, not as lost usage.
    pub deduplicated_by_app: IntCounterVec,
    /// Records appended and fsynced.
    pub spooled: IntCounter,
    /// Bytes of the spool and outbox on disk.
    pub spool_bytes: IntGauge,
    /// 1 while the spool refuses records because `max_disk_bytes` is reached.
    pub spool_full: IntGauge,
    /// Outbox rows sealed (one per window revision, customer and meter).
    pub windows_sealed: IntCounter,
    /// From the earliest request in a sealed row to its seal.
    pub seal_lag: Histogram,
    /// `response_header:` meters that found a missing or non-integer value (counted as 0).
    pub invalid_header_values: IntCounter,
    /// Billable records whose meter reads a body usage value the response did not report (counted as 0).
    pub missing_usage_values: IntCounter,
    /// Token quota reservations settled by access-log records, by result.
    pub quota_settlements: IntCounterVec,
    /// Outbox rows not yet acknowledged by delivery.
    pub outbox_pending: IntGauge,
    /// Time of one group commit (write + fdatasync).
    pub commit_seconds: Histogram,
    /// Bytes of torn or corrupt frames cut off at replay.
    pub replay_dropped_bytes: IntCounter,
    /// Usage-history batches (closed windows) by result: added, duplicate (added before a replay), error.
    pub rollup_batches: IntCounterVec,
    /// Closed windows waiting to be added to the usage history (the state store failed): the spool keeps
    /// their records meanwhile.
    pub rollups_pending: IntGauge,
}

impl MeteringMetrics {
    /// Counts dropped duplicates, one app name per duplicate.
    pub(crate) fn count_duplicates(&self, apps: &[String]) {
        if apps.is_empty() {
            return;
        }
        self.deduplicated.inc_by(apps.len() as u64);
        let mut by_app: std::collections::HashMap<&str, u64> = std::collections::HashMap::new();
        for app in apps {
            *by_app.entry(app.as_str()).or_default() += 1;
        }
        for (app, n) in by_app {
            self.deduplicated_by_app.with_label_values(&[app]).inc_by(n);
        }
    }

    /// Creates the metrics (not registered yet).
    pub(crate) fn new() -> Result<Self, prometheus::Error> {
        Ok(MeteringMetrics {
            deduplicated: IntCounter::new(
                "metering_records_deduplicated_total",
                "usage records dropped because the same entry (x-request-id, start, duration, status, app) was already counted",
            )?,
            deduplicated_by_app: IntCounterVec::new(
                Opts::new(
                    "metering_records_deduplicated_by_app_total",
                    "usage records dropped as duplicates, by app (empty: no app)",
                ),
                &["app"],
            )?,
            spooled: IntCounter::new(
                "metering_records_spooled_total",
                "usage records appended to the spool and fsynced",
            )?,
            spool_bytes: IntGauge::new(
                "metering_spool_bytes",
                "bytes of the metering spool and billing outbox on disk",
            )?,
            spool_full: IntGauge::new(
                "metering_spool_full",
                "1 while the spool refuses usage records because max_disk_bytes is reached",
            )?,
            windows_sealed: IntCounter::new(
                "metering_windows_sealed_total",
                "outbox rows sealed: one per window revision, Stripe customer and meter",
            )?,
            seal_lag: Histogram::with_opts(
                HistogramOpts::new(
                    "metering_seal_lag_seconds",
                    "time from the earliest request in a sealed outbox row to its seal",
                )
                .buckets(vec![
                    1.0, 2.0, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0,
                ]),
            )?,
            invalid_header_values: IntCounter::new(
                "metering_invalid_header_values_total",
                "response_header meters that found a missing or non-integer header (counted as 0)",
            )?,
            missing_usage_values: IntCounter::new(
                "metering_missing_usage_values_total",
                "genai:/response_json: meters whose response reported no such value (counted as 0)",
            )?,
            quota_settlements: IntCounterVec::new(
                Opts::new(
                    "quota_settlements_total",
                    "token quota reserves settled from access-log records: settled (to the reported count), kept (2xx without a count), refunded (failed call without a count), late (after its hold timed out: counted afresh), error (store failed; the reserve stays until its hold times out)",
                ),
                &["result"],
            )?,
            outbox_pending: IntGauge::new(
                "metering_outbox_pending",
                "sealed outbox rows not yet acknowledged by delivery",
            )?,
            commit_seconds: Histogram::with_opts(
                HistogramOpts::new(
                    "metering_commit_seconds",
                    "time of one spool group commit (write and fdatasync)",
                )
                .buckets(vec![
                    0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1,
                    0.25, 1.0,
                ]),
            )?,
            replay_dropped_bytes: IntCounter::new(
                "metering_replay_dropped_bytes_total",
                "bytes of torn or corrupt spool frames cut off when the spool was replayed",
            )?,
            rollup_batches: {
                let v = IntCounterVec::new(
                    Opts::new(
                        "usage_rollup_batches_total",
                        "closed metering windows added to the usage history, by result (added|duplicate|error)",
                    ),
                    &["result"],
                )?;
                for result in ["added", "duplicate", "error"] {
                    v.with_label_values(&[result]);
                }
                v
            },
            rollups_pending: IntGauge::new(
                "usage_rollups_pending",
                "closed metering windows waiting to be added to the usage history (the spool keeps their records)",
            )?,
        })
    }

    /// Registers every metric in `registry`.
    pub(crate) fn register(&self, registry: &Registry) -> Result<(), prometheus::Error> {
        let m = self;
        registry.register(Box::new(m.deduplicated.clone()))?;
        registry.register(Box::new(m.deduplicated_by_app.clone()))?;
        registry.register(Box::new(m.spooled.clone()))?;
        registry.register(Box::new(m.spool_bytes.clone()))?;
        registry.register(Box::new(m.spool_full.clone()))?;
        registry.register(Box::new(m.windows_sealed.clone()))?;
        registry.register(Box::new(m.seal_lag.clone()))?;
        registry.register(Box::new(m.invalid_header_values.clone()))?;
        registry.register(Box::new(m.missing_usage_values.clone()))?;
        registry.register(Box::new(m.quota_settlements.clone()))?;
        registry.register(Box::new(m.outbox_pending.clone()))?;
        registry.register(Box::new(m.commit_seconds.clone()))?;
        registry.register(Box::new(m.replay_dropped_bytes.clone()))?;
        registry.register(Box::new(m.rollup_batches.clone()))?;
        registry.register(Box::new(m.rollups_pending.clone()))?;
        Ok(())
    }
}

/// `v` as a gauge value, saturating.
pub(super) fn gauge(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}
