//! The state store's Prometheus metrics: how fresh this replica's copy is and how syncs go.

use prometheus::{Gauge, Histogram, HistogramOpts, IntCounter, IntCounterVec, Opts, Registry};

/// What the sync loop and the management API count.
#[derive(Debug, Clone)]
pub struct StateMetrics {
    /// Seconds since this replica last read the store successfully.
    pub sync_age: Gauge,
    /// Sync rounds by result: `ok`, `error`, `reload` (the cursor fell behind: everything was read).
    pub syncs: IntCounterVec,
    /// Changed entities applied to the snapshot.
    pub changes_applied: IntCounter,
    /// Time to apply one batch of changes to the snapshot (the CPU a revoke costs a replica).
    pub apply_seconds: Histogram,
    /// Management API answers by status class (`2xx`, `4xx`, `5xx`).
    pub api_answers: IntCounterVec,
}

impl StateMetrics {
    /// Creates the metrics and registers them in `registry`.
    pub fn register(registry: &Registry) -> Result<StateMetrics, prometheus::Error> {
        let sync_age = Gauge::new(
            "state_sync_age_seconds",
            "seconds since this replica last read the state store successfully",
        )?;
        let syncs = IntCounterVec::new(
            Opts::new(
                "state_syncs_total",
                "state store sync rounds by result (ok, error, reload)",
            ),
            &["result"],
        )?;
        let changes_applied = IntCounter::new(
            "state_changes_applied_total",
            "changed developers, apps and keys applied to this replica's snapshot",
        )?;
        let apply_seconds = Histogram::with_opts(
            HistogramOpts::new(
                "state_apply_duration_seconds",
                "time to apply one batch of state changes to the snapshot",
            )
            .buckets(vec![
                0.000_01, 0.000_05, 0.000_1, 0.000_5, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0,
            ]),
        )?;
        let api_answers = IntCounterVec::new(
            Opts::new(
                "state_api_answers_total",
                "management API answers by status class",
            ),
            &["class"],
        )?;
        registry.register(Box::new(sync_age.clone()))?;
        registry.register(Box::new(syncs.clone()))?;
        registry.register(Box::new(changes_applied.clone()))?;
        registry.register(Box::new(apply_seconds.clone()))?;
        registry.register(Box::new(api_answers.clone()))?;
        Ok(StateMetrics {
            sync_age,
            syncs,
            changes_applied,
            apply_seconds,
            api_answers,
        })
    }
}
