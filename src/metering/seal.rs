//! Sealing: every tick, the windows due go into the outbox (fsync), are marked sealed, closed windows are
//! forgotten, the spool drops segments nothing needs and the outbox drops acknowledged rows nothing needs.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{oneshot, watch};

use super::Inner;
use super::error::MeteringError;
use super::metrics::gauge;
use super::outbox::OutboxRow;
use super::rollup;
use super::window::Horizon;
use super::writer::Job;
use crate::util::clock::now_ms;
use crate::util::sync::lock;

/// Seal passes until `shutdown` turns true: often enough that a window is sealed soon after its lateness.
pub(super) async fn run(inner: &Arc<Inner>, mut shutdown: watch::Receiver<bool>) {
    let tick = (inner.options.window.min(inner.options.lateness) / 4)
        .clamp(Duration::from_millis(50), Duration::from_secs(1));
    loop {
        if *shutdown.borrow() {
            return;
        }
        tokio::select! {
            _ = tokio::time::sleep(tick) => {}
            changed = shutdown.changed() => if changed.is_err() { return } else { continue },
        }
        if let Err(e) = pass(inner).await {
            tracing::error!(error = %e, "metering seal pass failed; retrying next tick");
        }
    }
}

/// One seal pass; returns how many outbox rows it sealed.
pub(super) async fn pass(inner: &Arc<Inner>) -> Result<usize, MeteringError> {
    let _one_at_a_time = inner.seal.lock().await;
    let sealing = inner.clone();
    let (sealed, mut horizon) = tokio::task::spawn_blocking(move || seal_due(&sealing))
        .await
        .map_err(|e| MeteringError::Commit(format!("seal task failed: {e}")))??;
    let closed = lock(&inner.shared.state).windows.take_closed();
    if let Some(history) = inner.history.get() {
        let mut pending = std::mem::take(&mut *lock(&inner.rollups));
        pending.extend(rollup::batches(&inner.producer, closed));
        let pending = rollup::add(history, pending, &inner.shared.metrics.rollup_batches).await;
        // The spool keeps the records of every window whose rollup is not in yet.
        if let Some(end) = pending.iter().map(|p| p.end_ms).min() {
            horizon.min_live_end_ms = Some(horizon.min_live_end_ms.map_or(end, |e| e.min(end)));
        }
        inner
            .shared
            .metrics
            .rollups_pending
            .set(gauge(pending.len() as u64));
        *lock(&inner.rollups) = pending;
    }
    let (reply, answer) = oneshot::channel();
    inner
        .tx
        .send(Job::Collect { horizon, reply })
        .await
        .map_err(|_| MeteringError::Stopped)?;
    let oldest_spooled_end = answer.await.map_err(|_| MeteringError::Stopped)??;
    let compacting = inner.clone();
    tokio::task::spawn_blocking(move || compact(&compacting, oldest_spooled_end, &horizon))
        .await
        .map_err(|e| MeteringError::Commit(format!("compaction task failed: {e}")))??;
    Ok(sealed)
}

/// Appends the revisions due now to the outbox (durably) before marking them sealed, then closes windows.
fn seal_due(inner: &Inner) -> Result<(usize, Horizon), MeteringError> {
    let shared = &inner.shared;
    let now = now_ms();
    let due = lock(&shared.state).windows.due(now);
    if !due.is_empty() {
        let rows: Vec<OutboxRow> = due
            .iter()
            .map(|d| OutboxRow::new(&inner.producer, &d.key, d.revision, d.value, now))
            .collect();
        let mut outbox = lock(&inner.outbox);
        outbox.append(&rows)?;
        shared.disk.set_outbox_bytes(outbox.bytes());
        shared
            .metrics
            .outbox_pending
            .set(gauge(outbox.pending().len() as u64));
        drop(outbox);
        let mut state = lock(&shared.state);
        for d in &due {
            state.windows.mark_sealed(d, now);
            if let Some(oldest) = d.oldest_start_ms {
                shared
                    .metrics
                    .seal_lag
                    .observe(now.saturating_sub(oldest).max(0) as f64 / 1_000.0);
            }
        }
        drop(state);
        shared.metrics.windows_sealed.inc_by(rows.len() as u64);
        tracing::debug!(rows = rows.len(), "sealed metering windows into the outbox");
    }
    let horizon = lock(&shared.state).windows.advance(now);
    Ok((due.len(), horizon))
}

/// Drops acknowledged rows nothing can need again.
fn compact(
    inner: &Inner,
    oldest_spooled_end: Option<i64>,
    horizon: &Horizon,
) -> Result<(), MeteringError> {
    // Acknowledged rows stay while the spool may still replay their window (so a replay sees them as
    // sealed) and while their window is live.
    let keep_from = oldest_spooled_end
        .unwrap_or(i64::MAX)
        .min(horizon.closed_before_ms);
    let mut outbox = lock(&inner.outbox);
    outbox.compact(|row| row.window_end_ms >= keep_from)?;
    inner.shared.disk.set_outbox_bytes(outbox.bytes());
    Ok(())
}
