//! The lease engine: per-bucket local state, serving charges from a lease, renewing it ahead of time,
//! and handing unserved units back (on the next call, at rollover, when idle, at sweep and at flush).
//!
//! The invariants behind the bounds in the module docs of [`super`]: a bucket's Redis calls are ordered by
//! its `io` lock (at most one in flight); its bookkeeping sits under a plain mutex never held across an
//! await; only the holder of `io` lowers `served`.

use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, MutexGuard, Weak};
use std::time::Instant;

use dashmap::DashMap;
use redis::Script;
use tokio::sync::{Mutex, Notify, OwnedMutexGuard};

use super::super::{Charge, LimitState, Outcome, StoreError, Unit};
use super::conn::Client;
use super::keys::{ttl, window_key};
use super::metrics::StoreMetrics;
use super::replica::ReplicaId;
use super::script::{self, Answer, Call, Header};
use super::{IDLE_RETURN, LUA_MAX, PREFETCH_DIVISOR};
use crate::util::sync::lock;

/// What a charge reports when a bucket has no limits: nothing to count, nothing to run out of.
pub(super) const UNLIMITED: LimitState = LimitState {
    limit: u64::MAX,
    remaining: u64::MAX,
    reset_secs: 0,
};

/// The store's shared state: the driver, the script, and every bucket this replica holds.
pub(super) struct Engine {
    /// The Redis driver; the engine never touches the connection directly.
    pub(super) client: Client,
    script: Script,
    max_lease: u64,
    /// Random id of this replica: names its fields in Redis.
    replica: String,
    seq: AtomicU64,
    buckets: DashMap<Box<str>, Arc<Cell>>,
    /// Shared with the driver, which counts calls and errors.
    pub(super) metrics: StoreMetrics,
}

/// One window of one (deduplicated) limit, as last seen in Redis.
#[derive(Debug, Clone)]
struct Held {
    /// Filled only when the window is sent to Redis (see [`with_keys`]): the local path never needs it.
    key: String,
    unit: Unit,
    interval: u32,
    start: i64,
    end: i64,
    limit: u64,
    /// This replica's `s:<id>` after the last answer; `None` when unknown.
    base: Option<u64>,
    used: u64,
    reserved: u64,
}

/// One bucket's local state and the lock that orders its Redis calls.
struct Cell {
    /// Held across every Redis call that settles or leases for the bucket, so at most one is in flight:
    /// each call's claims build on the answer of the one before.
    io: Arc<Mutex<()>>,
    /// Held only for local bookkeeping, never across an await: charges are served from the lease while
    /// a renewal is in flight.
    state: std::sync::Mutex<Bucket>,
    /// Wakes every charge that waits for the call in flight, all at once, when `io` is released.
    released: Notify,
}

impl Cell {
    fn new() -> Self {
        Cell {
            io: Arc::new(Mutex::new(())),
            state: std::sync::Mutex::new(Bucket::new()),
            released: Notify::new(),
        }
    }

    fn state(&self) -> MutexGuard<'_, Bucket> {
        // The bookkeeping under this lock cannot panic half-way; a poisoned lock still holds whole state.
        lock(&self.state)
    }
}

/// The right to make the bucket's next Redis call; releasing it wakes the charges waiting for that call.
struct IoTurn {
    cell: Arc<Cell>,
    io: Option<OwnedMutexGuard<()>>,
}

impl IoTurn {
    async fn acquire(cell: &Arc<Cell>) -> IoTurn {
        let io = Arc::clone(&cell.io).lock_owned().await;
        IoTurn {
            cell: Arc::clone(cell),
            io: Some(io),
        }
    }

    fn try_acquire(cell: &Arc<Cell>) -> Option<IoTurn> {
        let io = Arc::clone(&cell.io).try_lock_owned().ok()?;
        Some(IoTurn {
            cell: Arc::clone(cell),
            io: Some(io),
        })
    }
}

impl Drop for IoTurn {
    fn drop(&mut self) {
        // Unlock before waking, so the woken charges find `io` free.
        self.io.take();
        self.cell.released.notify_waiters();
    }
}

/// What a replica holds for one bucket.
#[derive(Debug)]
struct Bucket {
    windows: Vec<Held>,
    /// Units of the lease not served yet.
    lease_left: u64,
    /// This replica's lease in Redis (`r:<id>`) after the last answer: `lease_left + served` as then.
    held: u64,
    /// Units served from the lease and not yet reported.
    served: u64,
    /// Redis may hold a lease or a charge of this replica that the local state does not reflect.
    dirty: bool,
    /// The last answer for these windows granted no lease: charge per request without the bucket lock.
    drained_at: Option<Instant>,
    touched: Instant,
}

impl Bucket {
    fn new() -> Self {
        Bucket {
            windows: Vec::new(),
            lease_left: 0,
            held: 0,
            served: 0,
            dirty: false,
            drained_at: None,
            touched: Instant::now(),
        }
    }

    /// The charge's windows are the ones this state was leased for (keys aside, which are not always built).
    fn matches(&self, wanted: &[Held]) -> bool {
        self.windows.len() == wanted.len()
            && self.windows.iter().zip(wanted).all(|(a, b)| {
                a.unit == b.unit
                    && a.interval == b.interval
                    && a.start == b.start
                    && a.limit == b.limit
            })
    }

    /// Owes Redis nothing: the state can be forgotten without losing a unit.
    fn clean(&self) -> bool {
        !self.dirty && self.served == 0 && self.lease_left == 0
    }

    /// The lease is running low and the last answer did not say the bucket is near its limit.
    fn wants_prefetch(&self) -> bool {
        self.lease_left > 0
            && self.lease_left.saturating_mul(PREFETCH_DIVISOR) <= self.held
            && self.drained_at.is_none_or(|at| at.elapsed() >= IDLE_RETURN)
    }

    /// The state the `ratelimit-*` headers report after serving from the lease.
    fn local_state(&self, now: i64) -> LimitState {
        let mut tightest: Option<LimitState> = None;
        for w in &self.windows {
            let free = w.limit.saturating_sub(w.used.saturating_add(w.reserved));
            let state = LimitState {
                limit: w.limit,
                remaining: free.saturating_add(self.lease_left),
                reset_secs: secs_left(w.end, now),
            };
            if tightest.is_none_or(|t| state.remaining < t.remaining) {
                tightest = Some(state);
            }
        }
        tightest.unwrap_or(UNLIMITED)
    }
}

/// What a charge found in its bucket's local state.
enum Local {
    /// Served from the lease; `true` when the lease should be renewed in the background.
    Served(LimitState, bool),
    /// Near the limit: charge Redis per request, without the bucket's call order.
    Drained,
    /// Needs a Redis call that settles and leases.
    Renew,
}

/// What a renewal sent, to reconcile the local state with the answer.
struct Sent {
    /// `served` when the claims were computed.
    served: u64,
    /// Units of the lease kept while the call is in flight.
    keep: u64,
    /// Units of the lease released by the call.
    returning: u64,
}

impl Engine {
    /// An engine with no buckets yet, under `replica`; `max_lease` 0 disables leasing.
    pub(super) fn new(
        client: Client,
        metrics: StoreMetrics,
        max_lease: u64,
        replica: ReplicaId,
    ) -> Engine {
        Engine {
            client,
            script: script::load(),
            max_lease: max_lease.min(LUA_MAX),
            seq: AtomicU64::new(replica.first_seq()),
            replica: replica.id,
            buckets: DashMap::new(),
            metrics,
        }
    }

    /// This replica's id, as it appears in the `s:`/`r:`/`q:` fields of the Redis hashes.
    pub(super) fn replica(&self) -> &str {
        &self.replica
    }

    /// The lease bound in force (the configured one, capped to what Lua counts exactly).
    pub(super) fn max_lease(&self) -> u64 {
        self.max_lease
    }

    /// How many buckets hold local state.
    pub(super) fn buckets(&self) -> usize {
        self.buckets.len()
    }

    fn cells(&self) -> Vec<Arc<Cell>> {
        self.buckets.iter().map(|e| Arc::clone(e.value())).collect()
    }

    /// Forgets buckets that owe Redis nothing, that `pick` selects and that no charge is using.
    fn drop_clean(&self, pick: impl Fn(&Bucket) -> bool) {
        self.buckets.retain(|_, cell| {
            // Only the map holds the cell (and the map's shard lock is held): no charge can be using it.
            if Arc::strong_count(cell) > 1 {
                return true;
            }
            if cell.io.try_lock().is_err() {
                return true;
            }
            let bucket = cell.state();
            !(bucket.clean() && pick(&bucket))
        });
    }

    /// Reports what every bucket served and returns every unused leased unit; buckets whose return failed
    /// keep their state and are tried again later.
    pub(super) async fn flush(&self) -> Result<(), StoreError> {
        let mut result = Ok(());
        for cell in self.cells() {
            let _turn = IoTurn::acquire(&cell).await;
            if let Err(e) = self.settle(&cell).await {
                result = Err(e);
            }
        }
        self.drop_clean(|_| true);
        result
    }

    /// Hands back the leases of buckets with a window ended before `now` and forgets them.
    pub(super) async fn sweep(&self, now: i64) {
        for cell in self.cells() {
            let _turn = IoTurn::acquire(&cell).await;
            if !cell.state().windows.iter().any(|w| w.end <= now) {
                continue;
            }
            if let Err(e) = self.settle(&cell).await {
                tracing::warn!(error = %e, "could not return a lease of an ended quota window");
                // While a window is live its unreported units must stay on record, or they could be
                // served twice; once every window has ended they only expire with the keys.
                let mut bucket = cell.state();
                if bucket.windows.iter().all(|w| w.end <= now) {
                    *bucket = Bucket::new();
                }
            }
        }
        self.drop_clean(|b| b.windows.is_empty() || b.windows.iter().any(|w| w.end <= now));
    }

    /// Charges a bucket through Redis without a lease (token quota reserves). Unbounded: the caller puts the
    /// store's timeout around it.
    pub(super) async fn charge_unleased(&self, charge: &Charge<'_>) -> Result<Outcome, StoreError> {
        let mut wanted = held_windows(charge);
        with_keys(charge.bucket, &mut wanted);
        self.anonymous(charge, &wanted).await
    }

    /// Charges a bucket with at least one limit: from its lease when it can, else through Redis. Unbounded:
    /// the caller puts the store's timeout around it.
    pub(super) async fn charge(
        self: &Arc<Self>,
        charge: &Charge<'_>,
    ) -> Result<Outcome, StoreError> {
        let mut wanted = held_windows(charge);
        if self.max_lease == 0 {
            with_keys(charge.bucket, &mut wanted);
            return self.anonymous(charge, &wanted).await;
        }
        let found = self
            .buckets
            .get(charge.bucket)
            .map(|e| Arc::clone(e.value()));
        let cell = match found {
            Some(cell) => cell,
            None => Arc::clone(
                self.buckets
                    .entry(charge.bucket.into())
                    .or_insert_with(|| Arc::new(Cell::new()))
                    .value(),
            ),
        };
        loop {
            match self.serve_locally(&cell, charge, &wanted) {
                Local::Served(state, prefetch) => {
                    if prefetch {
                        self.prefetch(&cell, charge, wanted);
                    }
                    return Ok(Outcome::Allowed(state));
                }
                Local::Drained => {
                    with_keys(charge.bucket, &mut wanted);
                    return self.anonymous(charge, &wanted).await;
                }
                Local::Renew => {}
            }
            // Registered before trying `io`, so the end of a call in flight cannot slip by unnoticed.
            let mut released = std::pin::pin!(cell.released.notified());
            released.as_mut().enable();
            if let Some(turn) = IoTurn::try_acquire(&cell) {
                // The call that held `io` may have refilled the lease since the look above.
                match self.serve_locally(&cell, charge, &wanted) {
                    Local::Served(state, _) => return Ok(Outcome::Allowed(state)),
                    Local::Drained => {
                        drop(turn);
                        with_keys(charge.bucket, &mut wanted);
                        return self.anonymous(charge, &wanted).await;
                    }
                    Local::Renew => {}
                }
                with_keys(charge.bucket, &mut wanted);
                let outcome = self.renew(&cell, charge.cost, charge.now, wanted).await;
                drop(turn);
                return outcome;
            }
            // Another call for the bucket is in flight (bounded by the caller's timeout): wait for it.
            released.await;
        }
    }

    /// Serves `charge` from the bucket's lease if it can, under the bookkeeping lock only.
    fn serve_locally(&self, cell: &Cell, charge: &Charge<'_>, wanted: &[Held]) -> Local {
        let mut bucket = cell.state();
        bucket.touched = Instant::now();
        if !bucket.matches(wanted) {
            return Local::Renew;
        }
        if bucket.lease_left >= charge.cost {
            bucket.lease_left -= charge.cost;
            bucket.served += charge.cost;
            self.metrics.local.inc();
            return Local::Served(bucket.local_state(charge.now), bucket.wants_prefetch());
        }
        if bucket.lease_left == 0
            && bucket
                .drained_at
                .is_some_and(|at| at.elapsed() < IDLE_RETURN)
        {
            return Local::Drained;
        }
        Local::Renew
    }

    /// Renews the bucket's lease in a background task, unless a Redis call for the bucket is in flight.
    fn prefetch(self: &Arc<Self>, cell: &Arc<Cell>, charge: &Charge<'_>, mut wanted: Vec<Held>) {
        let Some(turn) = IoTurn::try_acquire(cell) else {
            return;
        };
        {
            // Another renewal may have completed since this charge looked.
            let bucket = cell.state();
            if !bucket.matches(&wanted) || !bucket.wants_prefetch() {
                return;
            }
        }
        with_keys(charge.bucket, &mut wanted);
        let engine = Arc::clone(self);
        let now = charge.now;
        tokio::spawn(async move {
            let renewed = tokio::time::timeout(
                engine.client.timeout(),
                engine.renew(&turn.cell, 0, now, wanted),
            )
            .await;
            drop(turn);
            match renewed {
                Ok(Ok(_)) => {}
                Ok(Err(e)) => tracing::debug!(error = %e, "could not renew a lease ahead of time"),
                Err(_) => {
                    engine.metrics.timed_out();
                    tracing::debug!("renewing a lease ahead of time timed out");
                }
            }
        });
    }

    /// One charge without any lease or per-replica bookkeeping; concurrent ones need no lock.
    async fn anonymous(&self, charge: &Charge<'_>, wanted: &[Held]) -> Result<Outcome, StoreError> {
        let mut call = Call::new(
            &self.script,
            &Header {
                replica: &self.replica,
                seq: 0,
                leaving: 0,
                cost: charge.cost.min(LUA_MAX),
                max_lease: 0,
                keep: 0,
            },
        );
        for w in wanted {
            call.charge(&w.key, -1, w.limit, ttl(w.end, charge.now));
        }
        match call.run(&self.client, &self.metrics, "charge").await? {
            Answer::Allowed { rows, .. } => {
                let mut tightest: Option<LimitState> = None;
                for (w, &(_, used, reserved)) in wanted.iter().zip(&rows) {
                    let state = LimitState {
                        limit: w.limit,
                        remaining: w.limit.saturating_sub(used.saturating_add(reserved)),
                        reset_secs: secs_left(w.end, charge.now),
                    };
                    if tightest.is_none_or(|t| state.remaining < t.remaining) {
                        tightest = Some(state);
                    }
                }
                Ok(Outcome::Allowed(tightest.unwrap_or(UNLIMITED)))
            }
            Answer::Exceeded {
                index,
                used,
                reserved,
                ..
            } => Ok(exceeded(wanted, index, used, reserved, charge.now)),
            Answer::Stale => Err(StoreError::Backend(
                "Redis answered a quota call as stale".into(),
            )),
        }
    }

    /// Reports the bucket's served units, charges `cost` and takes a new lease. While the windows stay the
    /// same, the unserved rest of the lease stays reserved and local charges go on spending it during the
    /// call; otherwise it is released. The caller holds the bucket's `io` lock.
    async fn renew(
        &self,
        cell: &Cell,
        cost: u64,
        now: i64,
        mut wanted: Vec<Held>,
    ) -> Result<Outcome, StoreError> {
        let (call, sent) = {
            let mut bucket = cell.state();
            let seq = self.seq.fetch_add(1, Ordering::Relaxed);
            let keep = if bucket.matches(&wanted) {
                bucket.lease_left
            } else {
                0
            };
            let current: HashSet<&str> = wanted.iter().map(|w| w.key.as_str()).collect();
            let leaving: Vec<&Held> = bucket
                .windows
                .iter()
                .filter(|w| !current.contains(w.key.as_str()))
                .collect();
            let mut call = Call::new(
                &self.script,
                &Header {
                    replica: &self.replica,
                    seq,
                    leaving: leaving.len(),
                    cost: cost.min(LUA_MAX),
                    max_lease: self.max_lease,
                    keep,
                },
            );
            for w in &leaving {
                call.leave(&w.key, claim(w, bucket.served));
            }
            for w in &mut wanted {
                let kept = bucket.windows.iter().find(|h| h.key == w.key);
                let claimed = kept.map_or(-1, |h| claim(h, bucket.served));
                call.charge(&w.key, claimed, w.limit, ttl(w.end, now));
                if let Some(h) = kept {
                    w.base = h.base.map(|b| b + bucket.served);
                }
            }
            let sent = Sent {
                served: bucket.served,
                keep,
                returning: bucket.lease_left - keep,
            };
            // Until Redis answers, the released part is gone: if this call is lost, Redis may already have
            // released it. The kept part stays reserved whatever becomes of the call.
            bucket.lease_left = keep;
            bucket.dirty = true;
            bucket.drained_at = None;
            (call, sent)
        };
        let answer = call.run(&self.client, &self.metrics, "lease").await;
        let mut bucket = cell.state();
        let answer = answer?;
        self.metrics.returned.inc_by(sent.returning);
        // Units served from the kept lease during the call are not in its claims: they stay to report.
        bucket.served -= sent.served; // invariant: only the holder of `io` lowers `served`
        match answer {
            Answer::Allowed { lease, kept, rows } => {
                for (w, &(s, used, reserved)) in wanted.iter_mut().zip(&rows) {
                    w.base = Some(s);
                    w.used = used;
                    w.reserved = reserved;
                }
                bucket.windows = wanted;
                bucket.lease_left = bucket
                    .lease_left
                    .saturating_sub(sent.keep.saturating_sub(kept))
                    + lease;
                bucket.held = kept + lease;
                bucket.dirty = bucket.held > 0;
                if lease > 0 {
                    self.metrics.leases.inc();
                    self.metrics.lease_units.inc_by(lease);
                } else {
                    bucket.drained_at = Some(Instant::now());
                }
                Ok(Outcome::Allowed(bucket.local_state(now)))
            }
            Answer::Exceeded {
                index,
                used,
                reserved,
                kept,
            } => {
                let outcome = exceeded(&wanted, index, used, reserved, now);
                bucket.windows = wanted;
                bucket.lease_left = bucket
                    .lease_left
                    .saturating_sub(sent.keep.saturating_sub(kept));
                bucket.held = kept;
                bucket.dirty = bucket.held > 0;
                bucket.drained_at = Some(Instant::now());
                Ok(outcome)
            }
            Answer::Stale => Err(StoreError::Backend(
                "Redis answered a quota call as stale".into(),
            )),
        }
    }

    /// Reports what the bucket served and returns its unused lease, keeping its windows. The caller holds
    /// the bucket's `io` lock.
    async fn settle(&self, cell: &Cell) -> Result<(), StoreError> {
        let (call, sent_served, returning) = {
            let mut bucket = cell.state();
            if bucket.clean() || bucket.windows.is_empty() {
                return Ok(());
            }
            let seq = self.seq.fetch_add(1, Ordering::Relaxed);
            let mut call = Call::new(
                &self.script,
                &Header {
                    replica: &self.replica,
                    seq,
                    leaving: bucket.windows.len(),
                    cost: 0,
                    max_lease: 0,
                    keep: 0,
                },
            );
            for w in &bucket.windows {
                call.leave(&w.key, claim(w, bucket.served));
            }
            let returning = bucket.lease_left;
            bucket.lease_left = 0;
            bucket.dirty = true;
            (call, bucket.served, returning)
        };
        call.run(&self.client, &self.metrics, "settle").await?;
        self.metrics.returned.inc_by(returning);
        let mut bucket = cell.state();
        for w in &mut bucket.windows {
            w.base = w.base.map(|b| b + sent_served);
        }
        // With the lease at 0 nothing is served during the call: charges that find none wait for `io`.
        bucket.served -= sent_served; // invariant: only the holder of `io` lowers `served`
        bucket.held = 0;
        bucket.dirty = false;
        Ok(())
    }
}

/// Returns leases of buckets without recent traffic, so stranded units go back to the other replicas; ends
/// when the store is dropped.
pub(super) async fn return_idle_leases(engine: Weak<Engine>) {
    let mut every = tokio::time::interval(IDLE_RETURN);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        every.tick().await;
        let Some(engine) = engine.upgrade() else {
            return;
        };
        for cell in engine.cells() {
            let Some(_turn) = IoTurn::try_acquire(&cell) else {
                continue;
            };
            if cell.state().touched.elapsed() < IDLE_RETURN {
                continue;
            }
            if let Err(e) = engine.settle(&cell).await {
                tracing::debug!(error = %e, "could not return an idle lease; will retry");
            }
        }
        engine.drop_clean(|b| b.touched.elapsed() >= IDLE_RETURN);
    }
}

/// The windows of a charge, one per distinct (unit, interval), each with the tightest limit given for it.
fn held_windows(charge: &Charge<'_>) -> Vec<Held> {
    let mut out: Vec<Held> = Vec::with_capacity(charge.limits.len());
    for limit in charge.limits {
        let capped = limit.limit.min(LUA_MAX);
        if let Some(h) = out
            .iter_mut()
            .find(|h| h.unit == limit.unit && h.interval == limit.interval.max(1))
        {
            h.limit = h.limit.min(capped);
            continue;
        }
        let window = limit.window(charge.now);
        out.push(Held {
            key: String::new(),
            unit: limit.unit,
            interval: limit.interval.max(1),
            start: window.start,
            end: window.end,
            limit: capped,
            base: None,
            used: 0,
            reserved: 0,
        });
    }
    out
}

/// Names the Redis keys of `held` (built only when a call goes to Redis).
fn with_keys(bucket: &str, held: &mut [Held]) {
    for h in held {
        h.key = window_key(bucket, h.unit, h.interval, h.start);
    }
}

/// The absolute served total this replica claims for `w`, or -1 when it holds no record of it.
fn claim(w: &Held, served: u64) -> i64 {
    w.base.map_or(-1, |b| {
        i64::try_from(b.saturating_add(served)).unwrap_or(i64::MAX)
    })
}

/// Seconds until `end`, at least 1 so a `ratelimit-reset` is never 0.
fn secs_left(end: i64, now: i64) -> u64 {
    u64::try_from(end.saturating_sub(now)).unwrap_or(0).max(1)
}

/// The refusal for the script's 1-based `index` among `wanted`; an index out of range reports a spent limit
/// of 0 rather than failing the request.
fn exceeded(wanted: &[Held], index: usize, used: u64, reserved: u64, now: i64) -> Outcome {
    let Some(w) = index.checked_sub(1).and_then(|i| wanted.get(i)) else {
        return Outcome::Exceeded(LimitState {
            limit: 0,
            remaining: 0,
            reset_secs: 1,
        });
    };
    Outcome::Exceeded(LimitState {
        limit: w.limit,
        remaining: w.limit.saturating_sub(used.saturating_add(reserved)),
        reset_secs: secs_left(w.end, now),
    })
}

#[cfg(test)]
mod tests {
    use super::super::super::{Limit, Unit};
    use super::*;

    #[test]
    fn duplicate_windows_keep_the_tightest_limit() {
        let limits = [
            Limit {
                limit: 10,
                interval: 1,
                unit: Unit::Minute,
            },
            Limit {
                limit: 5,
                interval: 1,
                unit: Unit::Minute,
            },
            Limit {
                limit: 100,
                interval: 1,
                unit: Unit::Day,
            },
        ];
        let held = held_windows(&Charge {
            bucket: "b",
            limits: &limits,
            cost: 1,
            now: 120,
        });
        assert_eq!(held.len(), 2);
        assert_eq!(held[0].limit, 5);
        assert_eq!(held[1].limit, 100);
    }
}
