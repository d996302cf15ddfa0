//! The Redis quota store: counters shared by every replica, exact, with quota served locally from leases.
//!
//! # Data model
//! One Redis hash per (bucket, unit, interval, window start), named
//! `tollgate:quota:{<bucket>}:<unit>:<interval>:<window start>`. The `{<bucket>}` hash tag puts every key of
//! a bucket on one Redis Cluster slot, so one Lua script can touch all of them. A key expires
//! [`KEY_GRACE_SECS`] after its window ends. Fields: `used` (units allowed), `reserved` (units leased to
//! replicas and not yet reported served), and per replica `s:<id>`, `r:<id>`, `q:<id>` (its share of `used`,
//! its current lease, the sequence number of its last call). Every call that charges or leases keeps
//! `used + reserved <= limit` on every limit of the bucket, atomically (one `EVALSHA`; the `redis` crate's
//! `Script` falls back to loading the script on `NOSCRIPT`).
//!
//! # Leases
//! When a charge reaches Redis, the script may also reserve a lease of `L` units on *every* limit of the
//! bucket at once, `L = min(max_lease, min over limits of (limit - used - reserved - cost) / LEASE_DIVISOR)`.
//! The replica then allows up to `L` units of that bucket without Redis. Because the reservation is counted
//! in Redis before any of it is served, and a lease spends all limits of the bucket together, **the overshoot
//! bound is zero**: across all replicas, the units allowed in a window never exceed any of its limits.
//!
//! Renewal ahead of time: once fewer than 1/[`PREFETCH_DIVISOR`] of the units a replica holds are left, a
//! background task reports what was served and tops the lease up while charges keep spending the rest, so
//! a hot bucket never waits for Redis while it has units. That call *keeps* the unserved rest reserved
//! (`keep`, never more than Redis records for the replica on every key) and adds at most
//! `max_lease - keep`, so a replica never holds more than `max_lease`; units served during the call are
//! reported by the next one. A bucket's Redis calls are ordered by a per-bucket async lock (at most one in
//! flight, as each call's claims build on the answer of the one before); its local bookkeeping sits under a
//! plain mutex that is never held across a call. A charge that finds too few units waits for the call in
//! flight, then renews itself if still short. The
//! lease shrinks with the free quota and is 0 once fewer than `LEASE_DIVISOR` units per limit are free, so
//! the last units are charged one request at a time; a tight limit (say 2 per second next to 500 per
//! month) therefore never leases at all. A replica reports what it served and releases the rest of its
//! lease on its next call for the bucket, at a window rollover, after [`IDLE_RETURN`] without traffic for
//! the bucket, on [`QuotaStore::sweep`] for ended windows and on [`RedisStore::flush`]. The price of zero
//! overshoot: near the limit a replica may refuse while another still holds leased units (at most
//! `max_lease`, and at most 1/`LEASE_DIVISOR` of what was free when granted); its holder serves them, or
//! returns them within [`IDLE_RETURN`] (+ one tick) of its last call for the bucket. So the count is exact
//! (allowed == limit) once traffic has reached every holder or its idle lease came back. A replica that
//! dies strands at most its lease, which expires with the window.
//!
//! # Redis operations per request
//! Steady state, far from the limit: one round trip (`EVALSHA`) per renewal, which adds about
//! `max_lease * (1 - 1/PREFETCH_DIVISOR)` units (the rest is kept), i.e. about 0.013 round trips per
//! allowed request with `max_lease = 100` (0.0099 when only one call at a time drains the lease and
//! renewals find it empty); the script runs about 11 commands inside Redis per call. Near the limit, with
//! `max_lease = 0`, or for a bucket whose limits are too tight to lease: one round trip per request
//! (4 commands inside Redis for one limit without a lease).
//!
//! # Failure modes
//! Every call is bounded by `timeout` (the client's own response timeout and a `tokio::time::timeout` around
//! the whole charge, including waiting for a bucket's renewal, and around each background renewal). Errors
//! map to [`StoreError::Timeout`] and [`StoreError::Backend`]; the connection is re-established in the
//! background. A call whose outcome is unknown (timed out) voids the part of the local lease it released;
//! the part it kept is reserved whether or not Redis ran it, and is still served. The next call reports
//! absolute served totals, which releases any lease the lost call may have taken and undoes its charge, so
//! lost calls never overshoot.

use std::collections::HashSet;
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, MutexGuard, PoisonError, Weak};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use dashmap::DashMap;
use prometheus::{HistogramOpts, HistogramVec, IntCounter, IntCounterVec, Opts, Registry};
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::cluster::ClusterClientBuilder;
use redis::cluster_async::ClusterConnection;
use redis::{ErrorKind, RedisError, Script};
use tokio::sync::{Mutex, Notify, OwnedMutexGuard};

use super::{Charge, Limit, LimitState, LimitUsage, Outcome, QuotaStore, StoreError, Unit};

/// Default bound of a lease block when the config does not set one.
pub const DEFAULT_MAX_LEASE: u64 = 100;
/// Default bound of every Redis call.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_millis(50);
/// A lease takes at most this fraction (1/n) of the free units of the tightest limit.
pub const LEASE_DIVISOR: u64 = 8;
/// Keys live this long after their window ends, so late lease returns still find them.
pub const KEY_GRACE_SECS: i64 = 120;
/// A replica renews a lease in the background once fewer than 1/n of the units it holds are left.
pub const PREFETCH_DIVISOR: u64 = 4;
/// A bucket without traffic for this long returns its lease and drops its local state.
pub const IDLE_RETURN: Duration = Duration::from_secs(1);
/// The shortest budget for establishing a connection (a TLS handshake may need more than `timeout`).
const CONNECT_BUDGET: Duration = Duration::from_secs(2);
/// Lua numbers are doubles: keep every number sent to the script exact.
const LUA_MAX: u64 = 1 << 53;

/// Options for the Redis store (the lead fills them from the config).
#[derive(Clone)]
pub struct RedisOptions {
    /// `redis://` or `rediss://` URL, with a password if needed; for a cluster, a comma-separated list.
    pub url: String,
    /// True: `url` lists cluster nodes and the cluster client is used.
    pub cluster: bool,
    /// Bound of every Redis call (default 50 ms).
    pub timeout: Duration,
    /// Upper bound of a lease block; 0 disables leasing (one Redis round trip per request).
    pub max_lease: u64,
}

impl Default for RedisOptions {
    fn default() -> Self {
        RedisOptions {
            url: "redis://127.0.0.1:6379/0".into(),
            cluster: false,
            timeout: DEFAULT_TIMEOUT,
            max_lease: DEFAULT_MAX_LEASE,
        }
    }
}

impl fmt::Debug for RedisOptions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisOptions")
            .field("url", &redact_urls(&self.url))
            .field("cluster", &self.cluster)
            .field("timeout", &self.timeout)
            .field("max_lease", &self.max_lease)
            .finish()
    }
}

/// The Redis store could not be set up. Messages never contain a password.
#[derive(Debug, thiserror::Error)]
pub enum RedisStoreError {
    /// The URL does not parse or names an unsupported scheme.
    #[error("invalid quota.redis_url {url}: {reason}")]
    InvalidUrl {
        /// The URL with its credentials masked.
        url: String,
        /// What is wrong.
        reason: String,
    },
    /// Redis refused the credentials of the URL.
    #[error("Redis at {url} refused the credentials: {reason}")]
    Auth {
        /// The URL with its credentials masked.
        url: String,
        /// Redis's answer.
        reason: String,
    },
    /// The cluster could not be reached to learn its topology.
    #[error("cannot connect to the Redis cluster at {url}: {reason}")]
    Connect {
        /// The URLs with their credentials masked.
        url: String,
        /// Why.
        reason: String,
    },
    /// A metric could not be registered (duplicate names on the registry).
    #[error("cannot register the Redis store metrics: {0}")]
    Metrics(#[from] prometheus::Error),
}

/// Counts quota units in Redis for every replica; see the module docs for the design and its bounds.
pub struct RedisStore {
    inner: Arc<Inner>,
    returner: tokio::task::JoinHandle<()>,
}

impl fmt::Debug for RedisStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisStore")
            .field("url", &self.inner.shown_url)
            .field("replica", &self.inner.replica)
            .field("buckets", &self.inner.buckets.len())
            .finish()
    }
}

struct Inner {
    conn: Conn,
    script: Script,
    timeout: Duration,
    max_lease: u64,
    /// Random id of this replica: names its fields in Redis.
    replica: String,
    seq: AtomicU64,
    buckets: DashMap<Box<str>, Arc<Cell>>,
    metrics: StoreMetrics,
    shown_url: String,
    secrets: Vec<String>,
}

#[derive(Clone)]
enum Conn {
    Single(ConnectionManager),
    Cluster(ClusterConnection),
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
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
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

    fn matches(&self, wanted: &[Held]) -> bool {
        self.windows.len() == wanted.len()
            && self.windows.iter().zip(wanted).all(|(a, b)| {
                a.unit == b.unit
                    && a.interval == b.interval
                    && a.start == b.start
                    && a.limit == b.limit
            })
    }

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

const UNLIMITED: LimitState = LimitState {
    limit: u64::MAX,
    remaining: u64::MAX,
    reset_secs: 0,
};

/// The parsed answer of the script.
enum Answer {
    Stale,
    Exceeded {
        index: usize,
        used: u64,
        reserved: u64,
        /// The part of the lease the call kept.
        kept: u64,
    },
    Allowed {
        lease: u64,
        /// The part of the old lease the call kept; the replica now holds `kept + lease`.
        kept: u64,
        /// (s, used, reserved) per charged key.
        rows: Vec<(u64, u64, u64)>,
    },
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

struct StoreMetrics {
    duration: HistogramVec,
    errors: IntCounterVec,
    calls: IntCounterVec,
    leases: IntCounter,
    lease_units: IntCounter,
    returned: IntCounter,
    local: IntCounter,
}

impl StoreMetrics {
    fn new(registry: &Registry) -> Result<Self, prometheus::Error> {
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
}

impl RedisStore {
    /// Builds the client and checks the connection once.
    ///
    /// A single node that cannot be reached yet is not an error: the store starts unhealthy (`ping` fails,
    /// charges fail with `StoreError`) and connects in the background. Credentials Redis refuses are an
    /// error. A cluster must answer at start, because its client learns the topology from it.
    pub async fn connect(
        options: RedisOptions,
        registry: &Registry,
    ) -> Result<RedisStore, RedisStoreError> {
        install_crypto_provider();
        let shown_url = redact_urls(&options.url);
        let secrets = url_secrets(&options.url);
        let invalid = |e: RedisError| RedisStoreError::InvalidUrl {
            url: shown_url.clone(),
            reason: redact(&e.to_string(), &secrets),
        };
        let connect_budget = options.timeout.max(CONNECT_BUDGET);
        let conn = if options.cluster {
            let nodes: Vec<&str> = options
                .url
                .split(',')
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .collect();
            if nodes.is_empty() {
                return Err(RedisStoreError::InvalidUrl {
                    url: shown_url,
                    reason: "no cluster node URL".into(),
                });
            }
            let client = ClusterClientBuilder::new(nodes)
                .connection_timeout(connect_budget)
                .response_timeout(options.timeout)
                .retries(2)
                .build()
                .map_err(invalid)?;
            let connected = tokio::time::timeout(connect_budget, client.get_async_connection())
                .await
                .map_err(|_| RedisStoreError::Connect {
                    url: shown_url.clone(),
                    reason: "timed out".into(),
                })?;
            match connected {
                Ok(conn) => Conn::Cluster(conn),
                Err(e) if is_auth_error(&e) => {
                    return Err(RedisStoreError::Auth {
                        url: shown_url,
                        reason: redact(&e.to_string(), &secrets),
                    });
                }
                Err(e) => {
                    return Err(RedisStoreError::Connect {
                        url: shown_url,
                        reason: redact(&e.to_string(), &secrets),
                    });
                }
            }
        } else {
            let client = redis::Client::open(options.url.as_str()).map_err(invalid)?;
            let config = ConnectionManagerConfig::new()
                .set_connection_timeout(Some(connect_budget))
                .set_response_timeout(Some(options.timeout))
                .set_number_of_retries(2)
                .set_max_delay(Duration::from_millis(500));
            let manager =
                ConnectionManager::new_lazy_with_config(client, config).map_err(invalid)?;
            Conn::Single(manager)
        };
        let metrics = StoreMetrics::new(registry)?;
        let inner = Arc::new(Inner {
            conn,
            script: Script::new(include_str!("redis/script.lua")),
            timeout: options.timeout,
            max_lease: options.max_lease.min(LUA_MAX),
            replica: format!("{:016x}", rand::random::<u64>()),
            seq: AtomicU64::new(1),
            buckets: DashMap::new(),
            metrics,
            shown_url,
            secrets,
        });
        let first = tokio::time::timeout(connect_budget, inner.conn.ping()).await;
        match first {
            Ok(Ok(())) => {
                tracing::info!(url = %inner.shown_url, replica = %inner.replica, max_lease = inner.max_lease, "connected to the Redis quota store");
            }
            Ok(Err(e)) if is_auth_error(&e) => {
                return Err(RedisStoreError::Auth {
                    url: inner.shown_url.clone(),
                    reason: redact(&e.to_string(), &inner.secrets),
                });
            }
            Ok(Err(e)) => {
                tracing::warn!(url = %inner.shown_url, error = %redact(&e.to_string(), &inner.secrets), "Redis quota store not reachable yet; retrying in the background");
            }
            Err(_) => {
                tracing::warn!(url = %inner.shown_url, "Redis quota store did not answer in time; retrying in the background");
            }
        }
        let returner = tokio::spawn(return_idle_leases(Arc::downgrade(&inner)));
        Ok(RedisStore { inner, returner })
    }

    /// Reports what every bucket served and returns every unused leased unit to Redis (for shutdown and
    /// tests). Buckets whose return failed keep their state and are tried again later.
    pub async fn flush(&self) -> Result<(), StoreError> {
        let mut result = Ok(());
        for cell in self.inner.cells() {
            let _turn = IoTurn::acquire(&cell).await;
            if let Err(e) = self.inner.settle(&cell).await {
                result = Err(e);
            }
        }
        self.inner.drop_clean(|_| true);
        result
    }

    /// This replica's id, as it appears in the `s:`/`r:`/`q:` fields of the Redis hashes.
    pub fn replica_id(&self) -> &str {
        &self.inner.replica
    }

    /// The Redis key of one limit's window of a bucket (for tests and operators inspecting Redis).
    pub fn key_for(bucket: &str, limit: &Limit, now: i64) -> String {
        window_key(bucket, limit.unit, limit.interval, limit.window(now).start)
    }
}

impl Drop for RedisStore {
    fn drop(&mut self) {
        self.returner.abort();
    }
}

#[async_trait]
impl QuotaStore for RedisStore {
    async fn charge(&self, charge: &Charge<'_>) -> Result<Outcome, StoreError> {
        if charge.limits.is_empty() {
            return Ok(Outcome::Allowed(UNLIMITED));
        }
        match tokio::time::timeout(self.inner.timeout, self.inner.charge(charge)).await {
            Ok(result) => result,
            Err(_) => {
                self.inner
                    .metrics
                    .errors
                    .with_label_values(&["timeout"])
                    .inc();
                Err(StoreError::Timeout)
            }
        }
    }

    async fn usage(
        &self,
        bucket: &str,
        limits: &[Limit],
        now: i64,
    ) -> Result<Vec<LimitUsage>, StoreError> {
        let inner = &self.inner;
        inner.metrics.calls.with_label_values(&["usage"]).inc();
        let started = Instant::now();
        let read = async {
            let mut usage = Vec::with_capacity(limits.len());
            for limit in limits {
                let window = limit.window(now);
                let key = window_key(bucket, limit.unit, limit.interval, window.start);
                let (used, reserved) = inner.conn.used_and_reserved(&key).await?;
                usage.push(LimitUsage {
                    limit: *limit,
                    window,
                    used: used.unwrap_or(0),
                    reserved: reserved.unwrap_or(0),
                });
            }
            Ok(usage)
        };
        let result = tokio::time::timeout(inner.timeout, read).await;
        inner
            .metrics
            .duration
            .with_label_values(&["usage"])
            .observe(started.elapsed().as_secs_f64());
        inner.map_result(result)
    }

    async fn ping(&self) -> Result<(), StoreError> {
        let inner = &self.inner;
        inner.metrics.calls.with_label_values(&["ping"]).inc();
        let started = Instant::now();
        let result = tokio::time::timeout(inner.timeout, inner.conn.ping()).await;
        inner
            .metrics
            .duration
            .with_label_values(&["ping"])
            .observe(started.elapsed().as_secs_f64());
        inner.map_result(result)
    }

    async fn sweep(&self, now: i64) {
        for cell in self.inner.cells() {
            let _turn = IoTurn::acquire(&cell).await;
            if !cell.state().windows.iter().any(|w| w.end <= now) {
                continue;
            }
            if let Err(e) = self.inner.settle(&cell).await {
                tracing::warn!(error = %e, "could not return a lease of an ended quota window");
                // While a window is live its unreported units must stay on record, or they could be
                // served twice; once every window has ended they only expire with the keys.
                let mut bucket = cell.state();
                if bucket.windows.iter().all(|w| w.end <= now) {
                    *bucket = Bucket::new();
                }
            }
        }
        self.inner
            .drop_clean(|b| b.windows.is_empty() || b.windows.iter().any(|w| w.end <= now));
    }
}

impl Inner {
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

    async fn charge(self: &Arc<Self>, charge: &Charge<'_>) -> Result<Outcome, StoreError> {
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
        let inner = Arc::clone(self);
        let now = charge.now;
        tokio::spawn(async move {
            let renewed =
                tokio::time::timeout(inner.timeout, inner.renew(&turn.cell, 0, now, wanted)).await;
            drop(turn);
            match renewed {
                Ok(Ok(_)) => {}
                Ok(Err(e)) => tracing::debug!(error = %e, "could not renew a lease ahead of time"),
                Err(_) => {
                    inner.metrics.errors.with_label_values(&["timeout"]).inc();
                    tracing::debug!("renewing a lease ahead of time timed out");
                }
            }
        });
    }

    /// One charge without any lease or per-replica bookkeeping; concurrent ones need no lock.
    async fn anonymous(&self, charge: &Charge<'_>, wanted: &[Held]) -> Result<Outcome, StoreError> {
        let mut call = self.script.prepare_invoke();
        call.arg(&self.replica)
            .arg(0u64)
            .arg(0u64)
            .arg(charge.cost.min(LUA_MAX))
            .arg(0u64)
            .arg(LEASE_DIVISOR)
            .arg(0u64);
        for w in wanted {
            call.key(&w.key)
                .arg(-1i64)
                .arg(w.limit)
                .arg(ttl(w.end, charge.now));
        }
        match self.eval(&call, "charge").await? {
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
            let mut call = self.script.prepare_invoke();
            call.arg(&self.replica)
                .arg(seq)
                .arg(leaving.len())
                .arg(cost.min(LUA_MAX))
                .arg(self.max_lease)
                .arg(LEASE_DIVISOR)
                .arg(keep);
            for w in &leaving {
                call.key(&w.key).arg(claim(w, bucket.served));
            }
            for w in &mut wanted {
                let kept = bucket.windows.iter().find(|h| h.key == w.key);
                let claimed = kept.map_or(-1, |h| claim(h, bucket.served));
                call.key(&w.key)
                    .arg(claimed)
                    .arg(w.limit)
                    .arg(ttl(w.end, now));
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
        let answer = self.eval(&call, "lease").await;
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
            let mut call = self.script.prepare_invoke();
            call.arg(&self.replica)
                .arg(seq)
                .arg(bucket.windows.len())
                .arg(0u64)
                .arg(0u64)
                .arg(LEASE_DIVISOR)
                .arg(0u64);
            for w in &bucket.windows {
                call.key(&w.key).arg(claim(w, bucket.served));
            }
            let returning = bucket.lease_left;
            bucket.lease_left = 0;
            bucket.dirty = true;
            (call, bucket.served, returning)
        };
        self.eval(&call, "settle").await?;
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

    async fn eval(
        &self,
        call: &redis::ScriptInvocation<'_>,
        op: &'static str,
    ) -> Result<Answer, StoreError> {
        self.metrics.calls.with_label_values(&[op]).inc();
        let started = Instant::now();
        let result = tokio::time::timeout(self.timeout, self.conn.eval(call)).await;
        self.metrics
            .duration
            .with_label_values(&[op])
            .observe(started.elapsed().as_secs_f64());
        let values = self.map_result(result)?;
        parse_answer(&values).ok_or_else(|| {
            self.metrics.errors.with_label_values(&["backend"]).inc();
            StoreError::Backend("unexpected answer from the quota script".into())
        })
    }

    fn map_result<T>(
        &self,
        result: Result<redis::RedisResult<T>, tokio::time::error::Elapsed>,
    ) -> Result<T, StoreError> {
        match result {
            Ok(Ok(value)) => Ok(value),
            Ok(Err(e)) if e.is_timeout() => {
                self.metrics.errors.with_label_values(&["timeout"]).inc();
                Err(StoreError::Timeout)
            }
            Ok(Err(e)) => {
                self.metrics.errors.with_label_values(&["backend"]).inc();
                Err(StoreError::Backend(redact(&e.to_string(), &self.secrets)))
            }
            Err(_) => {
                self.metrics.errors.with_label_values(&["timeout"]).inc();
                Err(StoreError::Timeout)
            }
        }
    }
}

impl Conn {
    async fn eval(&self, call: &redis::ScriptInvocation<'_>) -> redis::RedisResult<Vec<i64>> {
        match self.clone() {
            Conn::Single(mut c) => call.invoke_async(&mut c).await,
            Conn::Cluster(mut c) => call.invoke_async(&mut c).await,
        }
    }

    /// The `used` and `reserved` fields of one window's hash (absent: nothing counted yet).
    async fn used_and_reserved(&self, key: &str) -> redis::RedisResult<(Option<u64>, Option<u64>)> {
        let mut read = redis::cmd("HMGET");
        read.arg(key).arg("used").arg("reserved");
        match self.clone() {
            Conn::Single(mut c) => read.query_async(&mut c).await,
            Conn::Cluster(mut c) => read.query_async(&mut c).await,
        }
    }

    async fn ping(&self) -> redis::RedisResult<()> {
        let ping = redis::cmd("PING");
        let _: String = match self.clone() {
            Conn::Single(mut c) => ping.query_async(&mut c).await?,
            Conn::Cluster(mut c) => ping.query_async(&mut c).await?,
        };
        Ok(())
    }
}

/// Returns leases of buckets without recent traffic, so stranded units go back to the other replicas.
async fn return_idle_leases(inner: Weak<Inner>) {
    let mut every = tokio::time::interval(IDLE_RETURN);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        every.tick().await;
        let Some(inner) = inner.upgrade() else {
            return;
        };
        for cell in inner.cells() {
            let Some(_turn) = IoTurn::try_acquire(&cell) else {
                continue;
            };
            if cell.state().touched.elapsed() < IDLE_RETURN {
                continue;
            }
            if let Err(e) = inner.settle(&cell).await {
                tracing::debug!(error = %e, "could not return an idle lease; will retry");
            }
        }
        inner.drop_clean(|b| b.touched.elapsed() >= IDLE_RETURN);
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

fn window_key(bucket: &str, unit: Unit, interval: u32, start: i64) -> String {
    let mut key = String::with_capacity(bucket.len() + 48);
    key.push_str("tollgate:quota:{");
    // Braces would end the hash tag early and split a bucket's keys over slots.
    for c in bucket.chars() {
        match c {
            '%' => key.push_str("%25"),
            '{' => key.push_str("%7B"),
            '}' => key.push_str("%7D"),
            c => key.push(c),
        }
    }
    key.push_str("}:");
    key.push_str(unit.as_str());
    key.push(':');
    key.push_str(&interval.max(1).to_string());
    key.push(':');
    key.push_str(&start.to_string());
    key
}

/// The absolute served total this replica claims for `w`, or -1 when it holds no record of it.
fn claim(w: &Held, served: u64) -> i64 {
    w.base.map_or(-1, |b| {
        i64::try_from(b.saturating_add(served)).unwrap_or(i64::MAX)
    })
}

fn ttl(end: i64, now: i64) -> i64 {
    end.saturating_sub(now)
        .max(1)
        .saturating_add(KEY_GRACE_SECS)
}

fn secs_left(end: i64, now: i64) -> u64 {
    u64::try_from(end.saturating_sub(now)).unwrap_or(0).max(1)
}

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

fn parse_answer(values: &[i64]) -> Option<Answer> {
    let n = |i: usize| values.get(i).and_then(|&v| u64::try_from(v).ok());
    match values.first()? {
        -1 => Some(Answer::Stale),
        0 => Some(Answer::Exceeded {
            index: usize::try_from(n(1)?).ok()?,
            used: n(2)?,
            reserved: n(3)?,
            kept: n(4)?,
        }),
        1 => {
            let lease = n(1)?;
            let kept = n(2)?;
            let rest = values.get(3..)?;
            if rest.len() % 3 != 0 {
                return None;
            }
            let rows = rest
                .chunks_exact(3)
                .map(|c| {
                    Some((
                        u64::try_from(c[0]).ok()?,
                        u64::try_from(c[1]).ok()?,
                        u64::try_from(c[2]).ok()?,
                    ))
                })
                .collect::<Option<Vec<_>>>()?;
            Some(Answer::Allowed { lease, kept, rows })
        }
        _ => None,
    }
}

fn is_auth_error(e: &RedisError) -> bool {
    matches!(e.kind(), ErrorKind::AuthenticationFailed)
        || e.code()
            .is_some_and(|c| matches!(c, "WRONGPASS" | "NOAUTH" | "NOPERM"))
}

/// rustls needs one process-wide crypto provider; the first caller installs ring, later ones keep it.
fn install_crypto_provider() {
    // An Err only says a provider is already installed, which is what we want.
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// `url` (or a comma-separated list) with every `user:password@` replaced by `***@`.
fn redact_urls(urls: &str) -> String {
    urls.split(',')
        .map(|u| {
            let u = u.trim();
            let Some((scheme, rest)) = u.split_once("://") else {
                return u.to_string();
            };
            let authority_end = rest.find('/').unwrap_or(rest.len());
            match rest[..authority_end].rfind('@') {
                Some(at) => format!("{scheme}://***@{}", &rest[at + 1..]),
                None => u.to_string(),
            }
        })
        .collect::<Vec<_>>()
        .join(",")
}

/// Every password (raw and percent-decoded) in `urls`, to scrub from error texts.
fn url_secrets(urls: &str) -> Vec<String> {
    let mut out = Vec::new();
    for u in urls.split(',') {
        let Some((_, rest)) = u.trim().split_once("://") else {
            continue;
        };
        let authority = &rest[..rest.find('/').unwrap_or(rest.len())];
        let Some(at) = authority.rfind('@') else {
            continue;
        };
        let userinfo = &authority[..at];
        let password = userinfo.split_once(':').map_or(userinfo, |(_, p)| p);
        if password.is_empty() {
            continue;
        }
        out.push(password.to_string());
        let decoded = percent_encoding::percent_decode_str(password)
            .decode_utf8_lossy()
            .into_owned();
        if decoded != password {
            out.push(decoded);
        }
    }
    out
}

fn redact(text: &str, secrets: &[String]) -> String {
    let mut out = redact_urls(text);
    for s in secrets {
        out = out.replace(s.as_str(), "***");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_share_a_hash_tag_and_escape_braces() {
        let k = window_key("app/prod/op", Unit::Minute, 1, 60);
        assert_eq!(k, "tollgate:quota:{app/prod/op}:minute:1:60");
        let k = window_key("a}b{c%", Unit::Day, 2, 0);
        assert_eq!(k, "tollgate:quota:{a%7Db%7Bc%25}:day:2:0");
    }

    #[test]
    fn urls_are_shown_without_credentials() {
        assert_eq!(
            redact_urls("rediss://user:s3cr%40t@host:6380/0"),
            "rediss://***@host:6380/0"
        );
        assert_eq!(
            redact_urls("redis://:pw@a:1,redis://b:2"),
            "redis://***@a:1,redis://b:2"
        );
        let secrets = url_secrets("redis://user:s3cr%40t@host:6380/0");
        assert_eq!(secrets, vec!["s3cr%40t".to_string(), "s3cr@t".to_string()]);
        assert_eq!(redact("bad s3cr@t here", &secrets), "bad *** here");
        let debug = format!(
            "{:?}",
            RedisOptions {
                url: "redis://:hunter2@h:1".into(),
                ..RedisOptions::default()
            }
        );
        assert!(!debug.contains("hunter2"), "{debug}");
    }

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

    #[test]
    fn script_answers_parse() {
        assert!(matches!(parse_answer(&[-1]), Some(Answer::Stale)));
        assert!(matches!(
            parse_answer(&[0, 2, 5, 1, 0]),
            Some(Answer::Exceeded {
                index: 2,
                used: 5,
                reserved: 1,
                kept: 0
            })
        ));
        match parse_answer(&[1, 7, 2, 3, 4, 9]) {
            Some(Answer::Allowed {
                lease: 7,
                kept: 2,
                rows,
            }) => assert_eq!(rows, vec![(3, 4, 9)]),
            _ => panic!("expected allowed"),
        }
        assert!(parse_answer(&[1, 7, 2, 3, 4]).is_none());
        assert!(parse_answer(&[]).is_none());
        assert!(parse_answer(&[2]).is_none());
    }
}
