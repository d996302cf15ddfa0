//! The spool writer: replay at open, then one thread that owns the spool and turns queued ingest calls into
//! group commits (one write and one fsync for everything queued), and that deletes segments on request.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, oneshot};

use super::dedup::Dedup;
use super::dir::{self, DiskBudget};
use super::error::MeteringError;
use super::health::Health;
use super::metrics::{MeteringMetrics, gauge};
use super::options::{MeteringOptions, millis};
use super::outbox::OutboxLog;
use super::producer;
use super::record::{Charge, SpooledRecord, UsageRecord};
use super::spool::{BatchMeta, Spool, SpoolError, encode_batch};
use super::window::{GroupKey, Horizon, WindowKey, Windows};
use crate::util::clock::now_ms;
use crate::util::sync::lock;

/// Ingest calls waiting for the writer before callers wait for room (backpressure).
const QUEUE: usize = 1_024;
/// Most ingest calls one group commit takes.
const MAX_GROUP: usize = 512;

/// What the writer thread and the async side share.
pub(super) struct Shared {
    /// Window totals and remembered request ids.
    pub state: Mutex<State>,
    /// Metering's metrics.
    pub metrics: MeteringMetrics,
    /// What the spool and the outbox may use on disk.
    pub disk: DiskBudget,
    /// Whether spool commits succeed, for `/readyz`.
    pub health: Health,
    /// `options.window`, ms.
    pub window_ms: i64,
    /// `options.dedup_horizon()`, ms.
    pub dedup_horizon_ms: i64,
}

/// The in-memory state replay rebuilds from the spool and the outbox.
pub(super) struct State {
    /// Open and recently sealed windows.
    pub windows: Windows,
    /// Request ids already counted.
    pub dedup: Dedup,
}

/// A request to the writer thread.
pub(super) enum Job {
    /// Spool these records (one ingest call); the reply comes after the fsync and says, record by record,
    /// which were new (the rest were duplicates).
    Append {
        records: Vec<(UsageRecord, Charge)>,
        reply: oneshot::Sender<Result<Vec<bool>, MeteringError>>,
    },
    /// Delete the segments `horizon` no longer needs; the reply is the earliest window end still spooled.
    Collect {
        horizon: Horizon,
        reply: oneshot::Sender<Result<Option<i64>, MeteringError>>,
    },
}

/// An opened metering folder: replayed, locked, with its writer running.
pub(super) struct Opened {
    /// The producer in use: configured or the spool folder's.
    pub producer: String,
    /// The writer's queue.
    pub tx: mpsc::Sender<Job>,
    /// State shared with the writer.
    pub shared: Arc<Shared>,
    /// The outbox (the async side owns it).
    pub outbox: OutboxLog,
}

/// Opens `options.dir` (creating it), locks it, replays the outbox and the spool into fresh state, and starts
/// the writer thread, which holds the lock for as long as it runs.
pub(super) fn open(
    options: &MeteringOptions,
    metrics: MeteringMetrics,
) -> Result<Opened, MeteringError> {
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
    let lock_file = dir::lock(dir)?;
    let producer = match &options.producer {
        Some(p) => p.clone(),
        None => producer::spool_producer(dir)?,
    };
    let mut windows = Windows::new(millis(options.lateness), millis(options.retention));
    let outbox = OutboxLog::open(&dir.join("outbox.log"))?;
    for (row, _) in outbox.rows() {
        windows.load_sealed(
            GroupKey {
                window: WindowKey {
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
            dedup.insert(r, record.received_ms);
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
        disk: DiskBudget::new(options.max_disk_bytes, outbox.bytes()),
        health: Health::default(),
        window_ms,
        dedup_horizon_ms,
    });
    let (tx, rx) = mpsc::channel(QUEUE);
    let writer_shared = shared.clone();
    let commit_interval = options.commit_interval;
    std::thread::Builder::new()
        .name("tollgate-spool".into())
        .spawn(move || writer(spool, rx, &writer_shared, commit_interval, lock_file))
        .map_err(|e| MeteringError::Commit(format!("cannot start the spool writer: {e}")))?;
    Ok(Opened {
        producer,
        tx,
        shared,
        outbox,
    })
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
            shared.disk.refresh(spool.bytes(), true, &shared.metrics);
            let _ = reply.send(result);
        }
    }
}

type Reply = oneshot::Sender<Result<Vec<bool>, MeteringError>>;

/// One group commit: dedup, window assignment and the disk bound per ingest call, then one append and fsync
/// for all of them; an ingest call is answered `Ok` only once its records are durable.
fn commit(spool: &mut Spool, appends: Vec<(Vec<(UsageRecord, Charge)>, Reply)>, shared: &Shared) {
    let started = Instant::now();
    let now = now_ms();
    let mut state = lock(&shared.state);
    state.dedup.expire(now);
    let used = shared.disk.used(spool.bytes());
    let limit = shared.disk.limit();
    let mut out = Vec::new();
    let mut meta = BatchMeta::EMPTY;
    let mut accepted: Vec<(Vec<SpooledRecord>, Reply, Vec<bool>)> =
        Vec::with_capacity(appends.len());
    let mut duplicates: Vec<String> = Vec::new();
    for (records, reply) in appends {
        let mut batch = Vec::with_capacity(records.len());
        let mut batch_duplicates = Vec::new();
        let mut fresh = Vec::with_capacity(records.len());
        for (record, charge) in records {
            let new = state.dedup.insert(&record, now);
            fresh.push(new);
            if !new {
                batch_duplicates.push(record.app);
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
            duplicates.extend(batch_duplicates);
            accepted.push((batch, reply, fresh));
            continue;
        }
        let mark = out.len();
        let batch = encode_batch(batch, &mut out);
        let needed = used + out.len() as u64;
        if needed > limit {
            out.truncate(mark);
            forget(&mut state.dedup, &batch);
            shared.disk.set_full(true, used, &shared.metrics);
            let _ = reply.send(Err(MeteringError::Full { used, limit }));
            continue;
        }
        duplicates.extend(batch_duplicates);
        batch.iter().for_each(|r| meta.include(r));
        accepted.push((batch, reply, fresh));
    }
    if !out.is_empty()
        && let Err(e) = spool.append(&out, &meta)
    {
        tracing::error!(error = %e, "metering spool write failed; the records were refused");
        shared.health.commit(false, spool.is_poisoned(), now);
        for (batch, reply, _) in accepted {
            forget(&mut state.dedup, &batch);
            let _ = reply.send(Err(MeteringError::Commit(e.to_string())));
        }
        return;
    }
    let mut spooled = 0;
    for (batch, _, _) in &accepted {
        for record in batch {
            state.windows.add(record);
        }
        spooled += batch.len() as u64;
    }
    drop(state);
    if !out.is_empty() {
        shared.health.commit(true, false, now);
    }
    shared.metrics.spooled.inc_by(spooled);
    shared.metrics.count_duplicates(&duplicates);
    shared
        .metrics
        .commit_seconds
        .observe(started.elapsed().as_secs_f64());
    shared.disk.refresh(spool.bytes(), false, &shared.metrics);
    for (_, reply, fresh) in accepted {
        let _ = reply.send(Ok(fresh));
    }
}

/// Un-remembers the request ids of a refused batch, so a retry of it is not taken for a duplicate.
fn forget(dedup: &mut Dedup, batch: &[SpooledRecord]) {
    for r in batch.iter().filter_map(|r| r.record.as_ref()) {
        dedup.remove(r);
    }
}
