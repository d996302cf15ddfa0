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
//! The replica then allows up to `L` units of that bucket without Redis. A token quota's reserve
//! ([`QuotaStore::reserve`]) always goes to Redis without a lease: its settlement changes `used` directly, which
//! units served from a lease and reported later would undo. Because the reservation is counted
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
//! dies holds its lease until it restarts under the same id (kept in `metering.dir`, see [`replica`]): its
//! first call on each bucket then releases what it held. Without a kept id the lease is stranded until the
//! window's keys expire.
//!
//! # Redis operations per request
//! Steady state, far from the limit: one round trip (`EVALSHA`) per renewal, which adds about
//! `max_lease * (1 - 1/PREFETCH_DIVISOR)` units (the rest is kept), i.e. about 0.013 round trips per
//! allowed request with `max_lease = 100` (0.0099 when only one call at a time drains the lease and
//! renewals find it empty); the script runs about 11 commands inside Redis per call. Near the limit, with
//! `max_lease = 0`, or for a bucket whose limits are too tight to lease: one round trip per request
//! (4 commands inside Redis for one limit without a lease).
//!
//! # Token quotas
//! A quota that counts tokens charges its reserve at the Check and records it as held (`holds`); the
//! access-log entry settles it (the reserve replaced by the reported count in the window hashes), or its timeout
//! releases it. `used` may then pass the limit: that overrun is what a reservation allows, and the charge
//! script admits nothing while `used + reserved + cost` does not fit.
//!
//! # Failure modes
//! Every call is bounded by `timeout` (the client's own response timeout and a `tokio::time::timeout` around
//! the whole charge, including waiting for a bucket's renewal, and around each background renewal). Errors
//! map to [`StoreError::Timeout`] and [`StoreError::Backend`]; the connection is re-established in the
//! background. A call whose outcome is unknown (timed out) voids the part of the local lease it released;
//! the part it kept is reserved whether or not Redis ran it, and is still served. The next call reports
//! absolute served totals, which releases any lease the lost call may have taken and undoes its charge, so
//! lost calls never overshoot.
//!
//! # What is exact and what is bounded
//! - Exact: `used` never exceeds any limit of a window, across all replicas, leases and lost calls.
//! - Bounded: refusals while another replica still holds leased units (at most `max_lease` per holder,
//!   returned within [`IDLE_RETURN`] + one tick of its last call for the bucket); units held by a replica
//!   that dies (at most its lease, until it restarts, or without a kept id until the window's keys expire).
//! - Bounded, the other way: after a kill -9 and restart, the units the dead process had served from its
//!   lease but not yet reported (less than its lease) are released with the lease, so the window can
//!   overrun its limit by that much.
//! - Approximate: the `ratelimit-remaining` a replica reports from its lease uses the counts of its last
//!   Redis answer, so it lags the other replicas' spending by up to one renewal.
//!
//! # Layout
//! The Redis driver is kept apart from the algorithm: `conn` connects (single node, cluster, TLS), bounds
//! and maps every call and keeps passwords out of errors; `script` builds the calls of `script.lua` and
//! types its answers; `keys` names the hashes; `lease` is the engine that decides what to send and serves
//! from leases; `metrics` holds the Prometheus series. This module is the public face.

mod conn;
mod holds;
mod keys;
mod lease;
mod metrics;
pub mod replica;
mod script;

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use prometheus::Registry;

use super::{Charge, Hold, Limit, LimitUsage, Outcome, QuotaStore, Settled, StoreError};
use conn::Client;
pub use keys::KEY_GRACE_SECS;
use keys::window_key;
use lease::{Engine, UNLIMITED};
use metrics::StoreMetrics;
pub use replica::ReplicaId;

/// Default bound of a lease block when the config does not set one.
pub const DEFAULT_MAX_LEASE: u64 = 100;
/// Default bound of every Redis call.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_millis(50);
/// A lease takes at most this fraction (1/n) of the free units of the tightest limit.
pub const LEASE_DIVISOR: u64 = 8;
/// A replica renews a lease in the background once fewer than 1/n of the units it holds are left.
pub const PREFETCH_DIVISOR: u64 = 4;
/// A bucket without traffic for this long returns its lease and drops its local state.
pub const IDLE_RETURN: Duration = Duration::from_secs(1);
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
    /// This replica's name in Redis; `None`: a random one for this process only (its leases are stranded
    /// until their windows end if it dies holding them). `serve` keeps one in `metering.dir`.
    pub replica: Option<ReplicaId>,
}

impl Default for RedisOptions {
    fn default() -> Self {
        RedisOptions {
            url: "redis://127.0.0.1:6379/0".into(),
            cluster: false,
            timeout: DEFAULT_TIMEOUT,
            max_lease: DEFAULT_MAX_LEASE,
            replica: None,
        }
    }
}

impl fmt::Debug for RedisOptions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisOptions")
            .field("url", &conn::redact_urls(&self.url))
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
    engine: Arc<Engine>,
    /// The scripts that hold, settle and release token quota reserves.
    holds: holds::Scripts,
    /// The idle-lease returner; aborted on drop, as it only holds a weak reference to the engine.
    returner: tokio::task::JoinHandle<()>,
}

impl fmt::Debug for RedisStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisStore")
            .field("url", &self.engine.client.shown_url())
            .field("replica", &self.engine.replica())
            .field("buckets", &self.engine.buckets())
            .finish()
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
        let client = Client::open(&options).await?;
        let metrics = StoreMetrics::new(registry)?;
        let replica = options.replica.clone().unwrap_or_else(ReplicaId::ephemeral);
        let engine = Arc::new(Engine::new(client, metrics, options.max_lease, replica));
        if engine.client.first_ping().await? {
            tracing::info!(url = %engine.client.shown_url(), replica = %engine.replica(), max_lease = engine.max_lease(), "connected to the Redis quota store");
        }
        let returner = tokio::spawn(lease::return_idle_leases(Arc::downgrade(&engine)));
        Ok(RedisStore {
            engine,
            holds: holds::Scripts::new(),
            returner,
        })
    }

    /// Reports what every bucket served and returns every unused leased unit to Redis (for shutdown and
    /// tests). Buckets whose return failed keep their state and are tried again later.
    pub async fn flush(&self) -> Result<(), StoreError> {
        self.engine.flush().await
    }

    /// This replica's id, as it appears in the `s:`/`r:`/`q:` fields of the Redis hashes.
    pub fn replica_id(&self) -> &str {
        self.engine.replica()
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
        match tokio::time::timeout(self.engine.client.timeout(), self.engine.charge(charge)).await {
            Ok(result) => result,
            Err(_) => {
                self.engine.metrics.timed_out();
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
        let windows: Vec<_> = limits.iter().map(|l| l.window(now)).collect();
        let keys: Vec<String> = limits
            .iter()
            .zip(&windows)
            .map(|(l, w)| window_key(bucket, l.unit, l.interval, w.start))
            .collect();
        let counts = self
            .engine
            .client
            .used_and_reserved(&self.engine.metrics, &keys)
            .await?;
        Ok(limits
            .iter()
            .zip(windows)
            .zip(counts)
            .map(|((limit, window), (used, reserved))| LimitUsage {
                limit: *limit,
                window,
                used: used.unwrap_or(0),
                reserved: reserved.unwrap_or(0),
            })
            .collect())
    }

    async fn reserve(&self, charge: &Charge<'_>) -> Result<Outcome, StoreError> {
        if charge.limits.is_empty() {
            return Ok(Outcome::Allowed(UNLIMITED));
        }
        match tokio::time::timeout(
            self.engine.client.timeout(),
            self.engine.charge_unleased(charge),
        )
        .await
        {
            Ok(result) => result,
            Err(_) => {
                self.engine.metrics.timed_out();
                Err(StoreError::Timeout)
            }
        }
    }

    async fn hold(&self, hold: &Hold<'_>) -> Result<(), StoreError> {
        holds::hold(&self.engine, &self.holds, hold).await
    }

    async fn settle(&self, hold: &Hold<'_>, used: u64) -> Result<Settled, StoreError> {
        holds::settle(&self.engine, &self.holds, hold, used.min(LUA_MAX)).await
    }

    async fn release_expired(&self, now: i64) -> Result<usize, StoreError> {
        holds::release_expired(&self.engine, &self.holds, now).await
    }

    async fn ping(&self) -> Result<(), StoreError> {
        self.engine.client.ping(&self.engine.metrics).await
    }

    async fn sweep(&self, now: i64) {
        self.engine.sweep(now).await;
    }
}
