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
//! Bounds: request ids are remembered for `window + lateness + retention` after arrival ([`dedup`]); windows
//! stay open for late records until `lateness + retention` after their end; the spool and outbox together never
//! exceed `max_disk_bytes` (records are refused, loudly, instead).

mod dedup;
mod frame;
mod metrics;
mod outbox;
mod producer;
mod record;
mod spool;
mod usage_api;
mod window;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use fs4::fs_std::FileExt;
use tokio::sync::{mpsc, oneshot, watch};

use crate::catalog::CatalogHandle;
use crate::util::clock::now_ms;
use crate::util::sync::lock;

pub use outbox::{AckOutcome, OutboxRow};
pub use record::UsageRecord;
pub use spool::SpoolError;
pub use usage_api::{BadQuery, MeterUsage, UsageQuery, UsageReport, WindowState, WindowUsage};

use dedup::Dedup;
use metrics::MeteringMetrics;
use outbox::Outbox;
use record::{Charge, SpooledRecord, charge};
use spool::{BatchMeta, Spool, encode_batch};
use window::{Horizon, Windows};

/// Ingest calls waiting for the writer before callers wait for room (backpressure).
const QUEUE: usize = 1_024;
/// Most ingest calls one group commit takes.
const MAX_GROUP: usize = 512;

/// Default [`MeteringOptions::commit_interval`]: at most 100 fsyncs a second, each costing the kernel more
/// CPU than encoding the records it covers. Envoy never waits for the access log, so it costs no request time.
pub const DEFAULT_COMMIT_INTERVAL: Duration = Duration::from_millis(10);

/// How metering is set up (the lead maps `metering:` of the config file onto it).
#[derive(Debug, Clone)]
pub struct MeteringOptions {
    /// Folder of the spool (`spool/`), the outbox (`outbox.log`) and the lock file (`LOCK`).
    pub dir: PathBuf,
    /// Tumbling window length.
    pub window: Duration,
    /// How long after a window's end records still join revision 0.
    pub lateness: Duration,
    /// How long after the lateness a sealed window still takes late records (as new revisions) and stays in
    /// `/v1/usage`; records arriving later count in the window of their arrival.
    pub retention: Duration,
    /// Bound of the spool plus the outbox on disk; beyond it records are refused.
    pub max_disk_bytes: u64,
    /// Size at which the spool starts a new segment file (segments are deleted whole).
    pub segment_bytes: u64,
    /// This instance's id, part of every outbox row id, so replicas with their own spools never collide.
    /// `None`: a random id created once per spool folder and kept in `<dir>/PRODUCER`.
    pub producer: Option<String>,
    /// Least time between two group commits: under load, records gather for this long into one fsync.
    pub commit_interval: Duration,
}

impl MeteringOptions {
    /// Options with defaults: retention = window + lateness, 1 GiB of disk, 64 MiB segments.
    pub fn new(
        dir: impl Into<PathBuf>,
        window: Duration,
        lateness: Duration,
        producer: impl Into<String>,
    ) -> Self {
        MeteringOptions {
            producer: Some(producer.into()),
            ..Self::with_spool_producer(dir, window, lateness)
        }
    }

    /// Like [`MeteringOptions::new`], with the producer id the spool folder keeps (`<dir>/PRODUCER`).
    pub fn with_spool_producer(
        dir: impl Into<PathBuf>,
        window: Duration,
        lateness: Duration,
    ) -> Self {
        MeteringOptions {
            dir: dir.into(),
            window,
            lateness,
            retention: window + lateness,
            max_disk_bytes: 1 << 30,
            segment_bytes: 64 << 20,
            producer: None,
            commit_interval: DEFAULT_COMMIT_INTERVAL,
        }
    }

    /// How long a request id is remembered after its first copy arrived.
    pub fn dedup_horizon(&self) -> Duration {
        self.window + self.lateness + self.retention
    }
}

/// Why metering refused or failed.
#[derive(Debug, thiserror::Error)]
pub enum MeteringError {
    /// The disk bound is reached: the records were not accepted (nothing was dropped silently).
    #[error(
        "metering spool is full ({used} of {limit} bytes): usage records are refused until sealed windows are delivered and collected"
    )]
    Full {
        /// Bytes in use.
        used: u64,
        /// `max_disk_bytes`.
        limit: u64,
    },
    /// The spool or outbox failed.
    #[error(transparent)]
    Spool(#[from] SpoolError),
    /// A group commit failed; the records were not accepted.
    #[error("metering spool write failed: {0}")]
    Commit(String),
    /// Another process holds the folder.
    #[error("metering folder {0} is in use by another tollgate process")]
    Locked(PathBuf),
    /// The writer has stopped.
    #[error("metering has stopped")]
    Stopped,
    /// A usage query named no or both subjects.
    #[error(transparent)]
    BadQuery(#[from] BadQuery),
    /// Invalid options.
    #[error("metering options: {0}")]
    Options(String),
    /// Metrics could not be registered.
    #[error("metering metrics: {0}")]
    Metrics(#[from] prometheus::Error),
}

/// A sealed outbox row and whether delivery acknowledged it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct OutboxItem {
    /// The row.
    #[serde(flatten)]
    pub row: OutboxRow,
    /// Acknowledged by [`Metering::outbox_ack`].
    pub delivered: bool,
}

/// The metering pipeline; cheap to clone (all clones share one spool).
#[derive(Clone)]
pub struct Metering {
    inner: Arc<Inner>,
}

struct Inner {
    options: MeteringOptions,
    /// The producer in use: configured or the spool folder's.
    producer: String,
    catalog: Arc<CatalogHandle>,
    tx: mpsc::Sender<Job>,
    shared: Arc<Shared>,
    outbox: Mutex<Outbox>,
    seal: tokio::sync::Mutex<()>,
}

/// What the writer thread and the async side share.
struct Shared {
    state: Mutex<State>,
    metrics: MeteringMetrics,
    full: AtomicBool,
    outbox_bytes: AtomicU64,
    window_ms: i64,
    dedup_horizon_ms: i64,
    max_disk_bytes: u64,
}

struct State {
    windows: Windows,
    dedup: Dedup,
}

enum Job {
    Append {
        records: Vec<(UsageRecord, Charge)>,
        reply: oneshot::Sender<Result<(), MeteringError>>,
    },
    Collect {
        horizon: Horizon,
        reply: oneshot::Sender<Result<Option<i64>, MeteringError>>,
    },
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
        let metering =
            tokio::task::spawn_blocking(move || Self::open_blocking(options, catalog, metrics))
                .await
                .map_err(|e| MeteringError::Commit(format!("open task failed: {e}")))??;
        // Registered only once open succeeded, so a retry after `Locked` can use the same registry.
        registered.register(registry)?;
        Ok(metering)
    }

    fn open_blocking(
        options: MeteringOptions,
        catalog: Arc<CatalogHandle>,
        metrics: MeteringMetrics,
    ) -> Result<Metering, MeteringError> {
        let window_ms = millis(options.window);
        if window_ms < 1 {
            return Err(MeteringError::Options("window must be at least 1ms".into()));
        }
        if options.producer.as_ref().is_some_and(String::is_empty) {
            return Err(MeteringError::Options("producer must not be empty".into()));
        }
        let dir = &options.dir;
        std::fs::create_dir_all(dir).map_err(|source| SpoolError::Io {
            path: dir.clone(),
            source,
        })?;
        let lock = lock_dir(dir)?;
        let producer = match &options.producer {
            Some(p) => p.clone(),
            None => producer::spool_producer(dir)?,
        };
        let mut windows = Windows::new(millis(options.lateness), millis(options.retention));
        let outbox = Outbox::open(&dir.join("outbox.log"))?;
        for (row, _) in outbox.rows() {
            windows.load_sealed(
                window::GroupKey {
                    window: window::WindowKey {
                        start_ms: row.window_start_ms,
                        len_ms: row.window_end_ms.saturating_sub(row.window_start_ms),
                    },
                    customer: row.stripe_customer.clone(),
                    meter: row.event_name.clone(),
                },
                row.value,
            );
        }
        let dedup_horizon_ms = millis(options.dedup_horizon());
        let mut dedup = Dedup::new(dedup_horizon_ms);
        let (spool, replayed) = Spool::open(&dir.join("spool"), options.segment_bytes, |record| {
            if let Some(r) = record.record.as_ref() {
                dedup.insert(&r.request_id, record.received_ms);
            }
            windows.add(&record);
        })?;
        dedup.expire(now_ms());
        metrics.replay_dropped_bytes.inc_by(replayed.dropped_bytes);
        metrics
            .outbox_pending
            .set(gauge(outbox.pending().len() as u64));
        metrics
            .spool_bytes
            .set(gauge(spool.bytes() + outbox.bytes()));
        tracing::info!(
            dir = %dir.display(),
            producer = %producer,
            records = replayed.records,
            dropped_bytes = replayed.dropped_bytes,
            remembered_ids = dedup.len(),
            outbox_pending = outbox.pending().len(),
            "metering spool replayed"
        );
        let shared = Arc::new(Shared {
            state: Mutex::new(State { windows, dedup }),
            metrics,
            full: AtomicBool::new(false),
            outbox_bytes: AtomicU64::new(outbox.bytes()),
            window_ms,
            dedup_horizon_ms,
            max_disk_bytes: options.max_disk_bytes,
        });
        let (tx, rx) = mpsc::channel(QUEUE);
        let writer_shared = shared.clone();
        let commit_interval = options.commit_interval;
        std::thread::Builder::new()
            .name("tollgate-spool".into())
            .spawn(move || writer(spool, rx, &writer_shared, commit_interval, lock))
            .map_err(|e| MeteringError::Commit(format!("cannot start the spool writer: {e}")))?;
        Ok(Metering {
            inner: Arc::new(Inner {
                options,
                producer,
                catalog,
                tx,
                shared,
                outbox: Mutex::new(outbox),
                seal: tokio::sync::Mutex::new(()),
            }),
        })
    }

    /// Meters `records` with the current catalog and returns once they are durable (group commit); an error
    /// means none of them was accepted. Duplicates of already counted request ids are dropped (and counted).
    pub async fn ingest(&self, records: Vec<UsageRecord>) -> Result<(), MeteringError> {
        if records.is_empty() {
            return Ok(());
        }
        let catalog = self.inner.catalog.snapshot();
        let metrics = &self.inner.shared.metrics;
        let records = records
            .into_iter()
            .map(|r| {
                let c = charge(&r, &catalog);
                if c.invalid_header {
                    metrics.invalid_header_values.inc();
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
        answer.await.map_err(|_| MeteringError::Stopped)?
    }

    /// Seals due windows into the outbox every tick until `shutdown` turns true; also forgets closed windows,
    /// deletes spool segments nothing needs and compacts the outbox.
    pub async fn run(&self, mut shutdown: watch::Receiver<bool>) {
        let tick = (self.inner.options.window.min(self.inner.options.lateness) / 4)
            .clamp(Duration::from_millis(50), Duration::from_secs(1));
        loop {
            if *shutdown.borrow() {
                return;
            }
            tokio::select! {
                _ = tokio::time::sleep(tick) => {}
                changed = shutdown.changed() => if changed.is_err() { return } else { continue },
            }
            if let Err(e) = self.seal_once().await {
                tracing::error!(error = %e, "metering seal pass failed; retrying next tick");
            }
        }
    }

    /// One pass of [`Metering::run`] now; returns how many outbox rows it sealed.
    pub async fn seal_once(&self) -> Result<usize, MeteringError> {
        let _one_at_a_time = self.inner.seal.lock().await;
        let inner = self.inner.clone();
        let (sealed, horizon) = tokio::task::spawn_blocking(move || inner.seal_blocking())
            .await
            .map_err(|e| MeteringError::Commit(format!("seal task failed: {e}")))??;
        let (reply, answer) = oneshot::channel();
        self.inner
            .tx
            .send(Job::Collect { horizon, reply })
            .await
            .map_err(|_| MeteringError::Stopped)?;
        let oldest_spooled_end = answer.await.map_err(|_| MeteringError::Stopped)??;
        let inner = self.inner.clone();
        tokio::task::spawn_blocking(move || {
            // Acknowledged rows stay while the spool may still replay their window (so a replay sees them as
            // sealed) and while their window is live.
            let keep_from = oldest_spooled_end
                .unwrap_or(i64::MAX)
                .min(horizon.closed_before_ms);
            let mut outbox = lock(&inner.outbox);
            outbox.compact(|row| row.window_end_ms >= keep_from)?;
            inner
                .shared
                .outbox_bytes
                .store(outbox.bytes(), Ordering::Relaxed);
            Ok::<_, MeteringError>(())
        })
        .await
        .map_err(|e| MeteringError::Commit(format!("compaction task failed: {e}")))??;
        Ok(sealed)
    }

    /// Whether the spool refuses records because `max_disk_bytes` is reached (for `/readyz`).
    pub fn is_full(&self) -> bool {
        self.inner.shared.full.load(Ordering::Relaxed)
    }

    /// `/v1/usage`: per meter, the totals of the retained windows for one app or one Stripe customer. Quota
    /// counters are not part of it (the quota store has no read API yet).
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
            inner
                .shared
                .outbox_bytes
                .store(outbox.bytes(), Ordering::Relaxed);
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

impl Inner {
    fn seal_blocking(&self) -> Result<(usize, Horizon), MeteringError> {
        let now = now_ms();
        let due = lock(&self.shared.state).windows.due(now);
        if !due.is_empty() {
            let rows: Vec<OutboxRow> = due
                .iter()
                .map(|d| OutboxRow::new(&self.producer, &d.key, d.revision, d.value, now))
                .collect();
            let mut outbox = lock(&self.outbox);
            outbox.append(&rows)?;
            self.shared
                .outbox_bytes
                .store(outbox.bytes(), Ordering::Relaxed);
            self.shared
                .metrics
                .outbox_pending
                .set(gauge(outbox.pending().len() as u64));
            drop(outbox);
            let mut state = lock(&self.shared.state);
            for d in &due {
                state.windows.mark_sealed(d, now);
                if let Some(oldest) = d.oldest_start_ms {
                    self.shared
                        .metrics
                        .seal_lag
                        .observe(now.saturating_sub(oldest).max(0) as f64 / 1_000.0);
                }
            }
            drop(state);
            self.shared.metrics.windows_sealed.inc_by(rows.len() as u64);
            tracing::debug!(rows = rows.len(), "sealed metering windows into the outbox");
        }
        let horizon = lock(&self.shared.state).windows.advance(now);
        Ok((due.len(), horizon))
    }
}

/// The spool writer: takes every queued ingest call, commits them with one fsync, then answers them all.
///
/// Commits are spaced at least `commit_interval` apart: when calls keep coming, the writer waits out the rest
/// of the interval and takes everything queued by then, so the fsync rate stays bounded whatever the load.
fn writer(
    mut spool: Spool,
    mut rx: mpsc::Receiver<Job>,
    shared: &Shared,
    commit_interval: Duration,
    _lock: std::fs::File,
) {
    let mut last_commit: Option<Instant> = None;
    while let Some(first) = rx.blocking_recv() {
        if let Some(wait) = last_commit.and_then(|at| commit_interval.checked_sub(at.elapsed())) {
            std::thread::sleep(wait);
        }
        let mut appends = Vec::new();
        let mut collects = Vec::new();
        let mut take = |job| match job {
            Job::Append { records, reply } => appends.push((records, reply)),
            Job::Collect { horizon, reply } => collects.push((horizon, reply)),
        };
        take(first);
        for _ in 1..MAX_GROUP {
            match rx.try_recv() {
                Ok(job) => take(job),
                Err(_) => break,
            }
        }
        if !appends.is_empty() {
            commit(&mut spool, appends, shared);
            last_commit = Some(Instant::now());
        }
        for (horizon, reply) in collects {
            let result = spool
                .collect(&horizon, shared.dedup_horizon_ms, now_ms())
                .map_err(MeteringError::from);
            shared.update_disk(&spool, true);
            let _ = reply.send(result);
        }
    }
}

type Reply = oneshot::Sender<Result<(), MeteringError>>;

fn commit(spool: &mut Spool, appends: Vec<(Vec<(UsageRecord, Charge)>, Reply)>, shared: &Shared) {
    let started = Instant::now();
    let now = now_ms();
    let mut state = lock(&shared.state);
    state.dedup.expire(now);
    let used = spool.bytes() + shared.outbox_bytes.load(Ordering::Relaxed);
    let mut out = Vec::new();
    let mut meta = BatchMeta::EMPTY;
    let mut accepted: Vec<(Vec<SpooledRecord>, Reply)> = Vec::with_capacity(appends.len());
    let mut duplicates = 0;
    for (records, reply) in appends {
        let mut batch = Vec::with_capacity(records.len());
        let mut batch_duplicates = 0;
        for (record, charge) in records {
            if !state.dedup.insert(&record.request_id, now) {
                batch_duplicates += 1;
                continue;
            }
            let window = state.windows.assign(record.start_ms, now, shared.window_ms);
            batch.push(SpooledRecord {
                record: Some(record),
                received_ms: now,
                window_start_ms: window.start_ms,
                window_len_ms: window.len_ms,
                meter: charge.meter,
                value: charge.value,
                billable: charge.billable,
            });
        }
        if batch.is_empty() {
            duplicates += batch_duplicates;
            accepted.push((batch, reply));
            continue;
        }
        let mark = out.len();
        let batch = encode_batch(batch, &mut out);
        let needed = used + out.len() as u64;
        if needed > shared.max_disk_bytes {
            out.truncate(mark);
            forget(&mut state.dedup, &batch);
            shared.set_full(true, used);
            let _ = reply.send(Err(MeteringError::Full {
                used,
                limit: shared.max_disk_bytes,
            }));
            continue;
        }
        duplicates += batch_duplicates;
        batch.iter().for_each(|r| meta.include(r));
        accepted.push((batch, reply));
    }
    if !out.is_empty()
        && let Err(e) = spool.append(&out, &meta)
    {
        tracing::error!(error = %e, "metering spool write failed; the records were refused");
        for (batch, reply) in accepted {
            forget(&mut state.dedup, &batch);
            let _ = reply.send(Err(MeteringError::Commit(e.to_string())));
        }
        return;
    }
    let mut spooled = 0;
    for (batch, _) in &accepted {
        for record in batch {
            state.windows.add(record);
        }
        spooled += batch.len() as u64;
    }
    drop(state);
    shared.metrics.spooled.inc_by(spooled);
    shared.metrics.deduplicated.inc_by(duplicates);
    shared
        .metrics
        .commit_seconds
        .observe(started.elapsed().as_secs_f64());
    shared.update_disk(spool, false);
    for (_, reply) in accepted {
        let _ = reply.send(Ok(()));
    }
}

fn forget(dedup: &mut Dedup, batch: &[SpooledRecord]) {
    for r in batch.iter().filter_map(|r| r.record.as_ref()) {
        dedup.remove(&r.request_id);
    }
}

impl Shared {
    /// Refreshes the disk gauge; after a collection, clears `full` once 10% of the bound is free.
    fn update_disk(&self, spool: &Spool, collected: bool) {
        let used = spool.bytes() + self.outbox_bytes.load(Ordering::Relaxed);
        self.metrics.spool_bytes.set(gauge(used));
        if collected && used <= self.max_disk_bytes - self.max_disk_bytes / 10 {
            self.set_full(false, used);
        }
    }

    fn set_full(&self, full: bool, used: u64) {
        if self.full.swap(full, Ordering::Relaxed) == full {
            return;
        }
        self.metrics.spool_full.set(i64::from(full));
        if full {
            tracing::error!(
                used_bytes = used,
                max_disk_bytes = self.max_disk_bytes,
                "metering spool is FULL: usage records are refused (access-log streams get RESOURCE_EXHAUSTED) \
                 until sealed windows are delivered and collected, or max_disk_bytes is raised"
            );
        } else {
            tracing::warn!(
                used_bytes = used,
                "metering spool has room again; accepting records"
            );
        }
    }
}

fn lock_dir(dir: &Path) -> Result<std::fs::File, MeteringError> {
    let path = dir.join("LOCK");
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(|source| SpoolError::Io {
            path: path.clone(),
            source,
        })?;
    match file.try_lock_exclusive() {
        Ok(true) => Ok(file),
        Ok(false) => Err(MeteringError::Locked(dir.to_owned())),
        Err(source) => Err(SpoolError::Io { path, source }.into()),
    }
}

fn millis(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

fn gauge(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}
