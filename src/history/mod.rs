//! Usage history (CONTRACT §10): what every replica metered, rolled up by UTC hour in the state store, so a
//! partner's month to date, by day and by product, outlives the few minutes of windows a replica keeps.
//!
//! # One closed window, followed
//! `metering::seal` closes a window for good (`lateness + retention` after its end: no record joins it any
//! more) → its per (customer, app, product, meter) counts become one [`store::Batch`] named
//! `<producer>:<window start>:<length>` → [`store::HistoryStore::add`] adds the rows into their hour in one
//! transaction, with a mark of the batch → the spool may then drop the window's records. A crash before the
//! add replays the spool, closes the window again and adds the same batch, which the mark refuses: every
//! window is added once. Replicas add into the same rows, so with PostgreSQL the history is the fleet's.
//!
//! What Stripe was sent for a customer and meter is the sum of the sealed revisions of the same windows'
//! billable values, so a month's `value` here equals Stripe's total once the month's windows are closed.
//!
//! # Layout
//! `store` is the interface; `sql` implements it on the state store's database; `api` answers
//! `GET /v1/usage/history` on the admin listener from it.

pub mod api;
pub mod sql;
pub mod store;

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

pub use store::{Batch, Counts, Dims, HistoryStore, Rollup, Subject};

/// How long hourly rows are kept: a year and a month, for year-over-year comparisons.
pub const KEEP_HOURS_FOR: Duration = Duration::from_secs(400 * 86_400);
/// How long batch marks are kept: far beyond what a spool can replay.
pub const KEEP_BATCHES_FOR: Duration = Duration::from_secs(7 * 86_400);
/// How often old rows are pruned.
const PRUNE_EVERY: Duration = Duration::from_secs(3_600);

/// Prunes rows older than [`KEEP_HOURS_FOR`] and batch marks older than [`KEEP_BATCHES_FOR`] every hour until
/// `shutdown` (every replica does; the deletes are idempotent).
pub async fn prune(store: Arc<dyn HistoryStore>, mut shutdown: watch::Receiver<bool>) {
    // Not at once: at start the store may not be migrated yet.
    let mut every =
        tokio::time::interval_at(tokio::time::Instant::now() + PRUNE_EVERY, PRUNE_EVERY);
    loop {
        tokio::select! {
            _ = every.tick() => {}
            changed = shutdown.changed() => if changed.is_err() || *shutdown.borrow() { return },
        }
        let now = crate::util::clock::unix_now();
        let secs = |d: Duration| i64::try_from(d.as_secs()).unwrap_or(i64::MAX);
        if let Err(error) = store
            .prune(
                now.saturating_sub(secs(KEEP_HOURS_FOR)),
                now.saturating_sub(secs(KEEP_BATCHES_FOR)),
            )
            .await
        {
            tracing::warn!(%error, "old usage history not pruned; tried again in an hour");
        }
    }
}
