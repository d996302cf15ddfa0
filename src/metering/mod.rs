//! Usage metering: usage records in, sealed billable totals out.
//!
//! ```text
//! envoy::access_log ──ingest──> writer thread: dedup ─> window assignment ─> spool (group commit, fsync)
//!                                                                             │ acknowledged here
//! run() every tick: windows due ─> outbox (fsync) ─> mark sealed ─> forget closed windows ─> delete segments
//! ```
//!
//! A record is acknowledged ([`Metering::ingest`] returns) only once it is in the spool and fsynced; everything
//! else (dedup index, window totals) is rebuilt from the spool and the outbox when [`Metering::open`] replays
//! them, so a crash at any moment loses no acknowledged record and seals nothing twice. Outbox row ids are
//! deterministic, so a row re-sealed after a crash carries the id it had before.
//!
//! Bounds: request ids are remembered for `window + lateness + retention` after arrival (`dedup`); windows
//! stay open for late records until `lateness + retention` after their end; the spool and outbox together never
//! exceed `max_disk_bytes` (records are refused, loudly, instead).
//!
//! Billing sees metering only through [`UsageOutbox`]: the rows waiting, their acknowledgement, and the folder
//! it keeps its own state in. An acknowledged row stays in the outbox (and in `/v1/outbox`) only while its
//! window is live or the spool may still replay it; the billing ledger is the lasting record of what was sent.
//!
//! This file is the public face; the engine lives in one module per job:
//! - `options`: [`MeteringOptions`] and defaults; `error`: [`MeteringError`].
//! - `writer`: replay at open, the writer thread that owns the spool, group commit.
//! - `seal`: the periodic pass that seals due windows into the outbox and collects what nothing needs.
//! - `dir`: the folder's lock file and the disk budget.
//! - `record` (what is metered and charged), `dedup`, `window` (pure window rules), `spool` and
//!   `outbox` (the two files, on `frame`s), `producer`, `usage_api` (`/v1/usage`), `metrics`.
//! - `rollup`: windows closed for good into the usage history ([`crate::history`]), once each; the spool
//!   keeps a window's records until its rollup is in.

mod dedup;
mod dir;
mod error;
mod frame;
mod health;
mod metrics;
mod options;
mod outbox;
mod producer;
mod record;
mod rollup;
mod seal;
mod settle;
mod spool;
mod usage_api;
mod window;
mod writer;

use std::path::Path;
use std::sync::{Arc, Mutex, OnceLock};

use tokio::sync::{mpsc, oneshot, watch};

use crate::catalog::CatalogHandle;
use crate::history::HistoryStore;
use crate::util::clock::now_ms;
use crate::util::sync::lock;

pub use error::MeteringError;
pub use health::Unhealthy;
pub use options::{DEFAULT_COMMIT_INTERVAL, MeteringOptions};
pub use outbox::{AckOutcome, OutboxItem, OutboxRow};
pub use record::UsageRecord;
pub use spool::SpoolError;
pub use usage_api::{
    AppQuota, BadQuery, MeterUsage, QuotaCounter, UsageQuery, UsageReport, WindowState, WindowUsage,
};

use metrics::{MeteringMetrics, gauge};
use options::millis;
use outbox::OutboxLog;
use record::charge;
use writer::{Job, Shared};

/// What billing needs of metering: the sealed rows waiting for delivery, their acknowledgement, and the
/// folder billing keeps its state in. [`Metering`] implements it.
#[async_trait::async_trait]
pub trait UsageOutbox: Send + Sync {
    /// Sealed rows not yet acknowledged, in seal order: what billing sends (`identifier` = `row.id`).
    async fn pending(&self) -> Vec<OutboxRow>;

    /// Marks row `id` delivered, durably (idempotent). Call it once Stripe accepted the event or answered
    /// that an event with this identifier already exists.
    async fn ack(&self, id: &str) -> Result<AckOutcome, MeteringError>;

    /// The metering folder; billing's own state lives in a folder inside it.
    fn dir(&self) -> &Path;
}

/// The metering pipeline; cheap to clone (all clones share one spool).
#[derive(Clone)]
pub struct Metering {
    inner: Arc<Inner>,
}

/// What every clone shares; the engine modules work on it.
struct Inner {
    options: MeteringOptions,
    /// The producer in use: configured or the spool folder's.
    producer: String,
    catalog: Arc<CatalogHandle>,
    tx: mpsc::Sender<Job>,
    shared: Arc<Shared>,
    outbox: Mutex<OutboxLog>,
    /// Seal passes run one at a time (the periodic one and [`Metering::seal_once`]).
    seal: tokio::sync::Mutex<()>,
    /// Where closed windows are rolled up (set once by `serve`).
    history: OnceLock<Arc<dyn HistoryStore>>,
    /// Closed windows not added to the history yet (the store failed).
    rollups: Mutex<Vec<rollup::Pending>>,
    /// Where token quota reservations are settled (set once by `serve`).
    settler: OnceLock<Arc<settle::Settler>>,
}

impl Metering {
    /// Opens `options.dir` (creating it), replays the spool and the outbox, and starts the spool writer.
    pub async fn open(
        options: MeteringOptions,
        catalog: Arc<CatalogHandle>,
        registry: &prometheus::Registry,
    ) -> Result<Metering, MeteringError> {
        let metrics = MeteringMetrics::new()?;
        let registered = metrics.clone();
        let metering = tokio::task::spawn_blocking(move || {
            let opened = writer::open(&options, metrics)?;
            Ok::<_, MeteringError>(Metering {
                inner: Arc::new(Inner {
                    options,
                    producer: opened.producer,
                    catalog,
                    tx: opened.tx,
                    shared: opened.shared,
                    outbox: Mutex::new(opened.outbox),
                    seal: tokio::sync::Mutex::new(()),
                    history: OnceLock::new(),
                    rollups: Mutex::new(Vec::new()),
                    settler: OnceLock::new(),
                }),
            })
        })
        .await
        .map_err(|e| MeteringError::Commit(format!("open task failed: {e}")))??;
        // Registered only once open succeeded, so a retry after `Locked` can use the same registry.
        registered.register(registry)?;
        Ok(metering)
    }

    /// Meters `records` with the current catalog and returns once they are durable (group commit); an error
    /// means none of them was accepted. Duplicates of already counted request ids are dropped (and counted).
    pub async fn ingest(&self, records: Vec<UsageRecord>) -> Result<(), MeteringError> {
        if records.is_empty() {
            return Ok(());
        }
        let catalog = self.inner.catalog.snapshot();
        let metrics = &self.inner.shared.metrics;
        let now_s = now_ms() / 1000;
        let settler = self.inner.settler.get();
        let mut settlements = Vec::new();
        let records = records
            .into_iter()
            .map(|r| {
                let c = charge(&r, &catalog);
                if c.invalid_header {
                    metrics.invalid_header_values.inc();
                }
                if c.missing_usage {
                    metrics.missing_usage_values.inc();
                }
                if settler.is_some() {
                    settlements.push(settle::settlement(&r, &catalog, now_s));
                }
                (r, c)
            })
            .collect();
        let (reply, answer) = oneshot::channel();
        self.inner
            .tx
            .send(Job::Append { records, reply })
            .await
            .map_err(|_| MeteringError::Stopped)?;
        let fresh = answer.await.map_err(|_| MeteringError::Stopped)??;
        let due: Vec<_> = settlements
            .into_iter()
            .zip(fresh)
            .filter_map(|(s, new)| s.filter(|_| new))
            .collect();
        if let Some(settler) = settler
            && !due.is_empty()
        {
            // Off the access-log stream: a slow quota store must not hold back durable usage.
            let settler = Arc::clone(settler);
            tokio::spawn(async move { settler.apply(due, now_s).await });
        }
        Ok(())
    }

    /// Settles token quota reservations (CONTRACT §11) of the records ingested from now on in `quota`; a
    /// second call changes nothing.
    pub fn settle_into(&self, quota: Arc<dyn crate::quota::QuotaStore>) {
        let results = self.inner.shared.metrics.quota_settlements.clone();
        let _ = self
            .inner
            .settler
            .set(Arc::new(settle::Settler::new(quota, results)));
    }

    /// Adds every window closed from now on to `history` (CONTRACT §10), once per window; a second call
    /// changes nothing.
    pub fn roll_up_into(&self, history: Arc<dyn HistoryStore>) {
        let _ = self.inner.history.set(history);
    }

    /// Seals due windows into the outbox every tick until `shutdown` turns true; also forgets closed windows,
    /// deletes spool segments nothing needs and compacts the outbox.
    pub async fn run(&self, shutdown: watch::Receiver<bool>) {
        seal::run(&self.inner, shutdown).await;
    }

    /// One pass of [`Metering::run`] now; returns how many outbox rows it sealed.
    pub async fn seal_once(&self) -> Result<usize, MeteringError> {
        seal::pass(&self.inner).await
    }

    /// Whether the spool refuses records because `max_disk_bytes` is reached (for `/readyz`).
    pub fn is_full(&self) -> bool {
        self.inner.shared.disk.is_full()
    }

    /// Whether the spool and the outbox take writes: not poisoned, and spool commits not failing.
    pub fn health(&self) -> Result<(), Unhealthy> {
        self.inner.shared.health.spool(now_ms())?;
        if lock(&self.inner.outbox).is_poisoned() {
            return Err(Unhealthy::OutboxPoisoned);
        }
        Ok(())
    }

    /// `/v1/usage`: per meter, the totals of the retained windows for one app or one Stripe customer; the
    /// caller adds an app's quota counters ([`UsageReport::quota`]), which metering does not know.
    pub async fn usage(&self, query: UsageQuery) -> Result<UsageReport, MeteringError> {
        query.subject()?;
        let inner = self.inner.clone();
        tokio::task::spawn_blocking(move || {
            let subject = query.subject()?;
            let state = lock(&inner.shared.state);
            Ok(usage_api::report(
                &state.windows,
                &subject,
                now_ms(),
                inner.shared.window_ms,
                millis(inner.options.lateness),
            ))
        })
        .await
        .map_err(|e| MeteringError::Commit(format!("usage task failed: {e}")))?
    }

    /// Sealed rows not yet acknowledged, in seal order: what billing sends (`identifier` = `row.id`).
    pub async fn outbox_pending(&self) -> Vec<OutboxRow> {
        let inner = self.inner.clone();
        tokio::task::spawn_blocking(move || lock(&inner.outbox).pending())
            .await
            .unwrap_or_default()
    }

    /// Every row the outbox holds (pending and recently delivered), in seal order: for `/v1` inspection.
    pub async fn outbox_rows(&self) -> Vec<OutboxItem> {
        let inner = self.inner.clone();
        tokio::task::spawn_blocking(move || {
            lock(&inner.outbox)
                .rows()
                .map(|(row, delivered)| OutboxItem {
                    row: row.clone(),
                    delivered,
                })
                .collect()
        })
        .await
        .unwrap_or_default()
    }

    /// Marks row `id` delivered, durably (idempotent). Call it once Stripe accepted the event or answered
    /// that an event with this identifier already exists.
    pub async fn outbox_ack(&self, id: &str) -> Result<AckOutcome, MeteringError> {
        let inner = self.inner.clone();
        let id = id.to_owned();
        tokio::task::spawn_blocking(move || {
            let mut outbox = lock(&inner.outbox);
            let outcome = outbox.ack(&id)?;
            inner
                .shared
                .metrics
                .outbox_pending
                .set(gauge(outbox.pending().len() as u64));
            inner.shared.disk.set_outbox_bytes(outbox.bytes());
            Ok(outcome)
        })
        .await
        .map_err(|e| MeteringError::Commit(format!("ack task failed: {e}")))?
    }

    /// The options it runs with.
    pub fn options(&self) -> &MeteringOptions {
        &self.inner.options
    }

    /// The producer in every outbox row: the configured one, else the spool folder's random id.
    pub fn producer(&self) -> &str {
        &self.inner.producer
    }
}

#[async_trait::async_trait]
impl UsageOutbox for Metering {
    async fn pending(&self) -> Vec<OutboxRow> {
        self.outbox_pending().await
    }

    async fn ack(&self, id: &str) -> Result<AckOutcome, MeteringError> {
        self.outbox_ack(id).await
    }

    fn dir(&self) -> &Path {
        &self.inner.options.dir
    }
}
