//! The sync loop: keeps this replica's snapshot equal to the store, from a cursor in the change sequence.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::time::{Duration, Instant};

use tokio::sync::{Mutex, Notify, watch};

use crate::state::metrics::StateMetrics;
use crate::state::model::Changes;
use crate::state::snapshot::Snapshot;
use crate::state::store::{StateStore, StoreError};
use crate::util::clock::unix_now;
use crate::util::memory;

/// Sequence numbers read per round trip while catching up.
const BATCH: u32 = 1_000;
/// How long changes are kept for replicas that were away; one away longer reloads everything.
const CHANGE_RETENTION: Duration = Duration::from_secs(7 * 24 * 3600);
/// How long an `Idempotency-Key` answers its first answer again.
pub const IDEMPOTENCY_RETENTION: Duration = Duration::from_secs(24 * 3600);
/// How often old changes and answers are pruned.
const PRUNE_EVERY: Duration = Duration::from_secs(3600);

/// Reads the store's changes into the snapshot; shared by the loop and by the API (which catches up right
/// after its own writes, so a caller's next request sees them on this replica).
pub struct Syncer {
    store: Arc<dyn StateStore>,
    snapshot: Arc<Snapshot>,
    metrics: StateMetrics,
    /// The last sequence number applied; `None` before the first full load.
    cursor: Mutex<Option<i64>>,
    /// Unix milliseconds of the last successful read of the store.
    last_ok_ms: AtomicI64,
    /// Whether the last round failed (for one log line per outage, not one per round).
    failing: AtomicBool,
    wake: Arc<Notify>,
}

impl Syncer {
    /// A syncer that has read nothing yet.
    pub fn new(
        store: Arc<dyn StateStore>,
        snapshot: Arc<Snapshot>,
        metrics: StateMetrics,
    ) -> Syncer {
        Syncer {
            store,
            snapshot,
            metrics,
            cursor: Mutex::new(None),
            last_ok_ms: AtomicI64::new(0),
            failing: AtomicBool::new(false),
            wake: Arc::new(Notify::new()),
        }
    }

    /// Wakes the loop at once (a notification from another replica).
    pub fn waker(&self) -> Arc<Notify> {
        Arc::clone(&self.wake)
    }

    /// Whether the store has been read in full at least once.
    pub async fn loaded(&self) -> bool {
        self.cursor.lock().await.is_some()
    }

    /// Seconds since the store was last read successfully (`None`: never).
    pub fn age(&self) -> Option<f64> {
        let last = self.last_ok_ms.load(Ordering::Relaxed);
        (last > 0).then(|| (now_ms().saturating_sub(last)) as f64 / 1000.0)
    }

    /// Reads every change after the cursor (everything, the first time or after falling behind) and
    /// applies it to the snapshot.
    pub async fn catch_up(&self) -> Result<(), StoreError> {
        let mut cursor = self.cursor.lock().await;
        let result = self.read(&mut cursor).await;
        match &result {
            Ok(()) => {
                self.last_ok_ms.store(now_ms(), Ordering::Relaxed);
                if self.failing.swap(false, Ordering::Relaxed) {
                    tracing::info!(cursor = ?*cursor, "state store is back; caught up");
                }
            }
            Err(error) => {
                self.metrics.syncs.with_label_values(&["error"]).inc();
                if !self.failing.swap(true, Ordering::Relaxed) {
                    tracing::warn!(%error, "state store sync failed; Checks keep the last state read");
                }
            }
        }
        self.report_age();
        result
    }

    async fn read(&self, cursor: &mut Option<i64>) -> Result<(), StoreError> {
        loop {
            let Some(after) = *cursor else {
                return self.reload(cursor).await;
            };
            match self.store.changes(after, BATCH).await? {
                Changes::TooOld => return self.reload(cursor).await,
                Changes::Since { changed, through } => {
                    let started = Instant::now();
                    self.snapshot.apply(&changed);
                    if !changed.is_empty() {
                        self.metrics
                            .apply_seconds
                            .observe(started.elapsed().as_secs_f64());
                        self.metrics
                            .changes_applied
                            .inc_by(u64::try_from(changed.len()).unwrap_or(u64::MAX));
                    }
                    self.metrics.syncs.with_label_values(&["ok"]).inc();
                    *cursor = Some(through);
                    if through < after.saturating_add(i64::from(BATCH)) {
                        return Ok(());
                    }
                }
            }
        }
    }

    async fn reload(&self, cursor: &mut Option<i64>) -> Result<(), StoreError> {
        let started = Instant::now();
        let image = self.store.load().await?;
        let (seq, developers, apps, keys) = (
            image.seq,
            image.developers.len(),
            image.apps.len(),
            image.keys.len(),
        );
        self.snapshot.load(image);
        self.metrics.syncs.with_label_values(&["reload"]).inc();
        tracing::info!(
            seq,
            developers,
            apps,
            keys,
            took_ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX),
            "state store read in full"
        );
        // What the snapshot did not take of the image (the key rows, over 50 MB at a million keys) is freed
        // now: hand it back before the cursor says "loaded" (and /readyz says ready), so a replica's RSS at ready is what
        // it holds. The cursor stays locked meanwhile on purpose: a few milliseconds, once per full read.
        memory::release("state store image").await;
        *cursor = Some(seq);
        Ok(())
    }

    fn report_age(&self) {
        if let Some(age) = self.age() {
            self.metrics.sync_age.set(age);
        }
    }

    /// Catches up every `interval`, and at once when woken, until `shutdown` turns true; prunes old changes
    /// and idempotent answers every hour.
    pub async fn run(self: Arc<Self>, interval: Duration, mut shutdown: watch::Receiver<bool>) {
        let mut tick = tokio::time::interval(interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut prune = tokio::time::interval(PRUNE_EVERY);
        prune.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                () = self.wake.notified() => {}
                _ = prune.tick() => self.prune().await,
                _ = shutdown.changed() => return,
            }
            // Errors are counted and logged by catch_up; the next round retries.
            let _ = self.catch_up().await;
        }
    }

    async fn prune(&self) {
        let now = unix_now();
        let changes_before = now.saturating_sub(secs(CHANGE_RETENTION));
        let answers_before = now.saturating_sub(secs(IDEMPOTENCY_RETENTION));
        if let Err(error) = self.store.prune(changes_before, answers_before).await {
            tracing::debug!(%error, "state store prune failed; next hour retries");
        }
    }
}

fn secs(d: Duration) -> i64 {
    i64::try_from(d.as_secs()).unwrap_or(i64::MAX)
}

fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}
