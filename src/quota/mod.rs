//! Quotas: calendar windows, the store trait that charges them, and the stores.
//!
//! The decision code only sees [`QuotaStore`]: the in-memory store serves a single replica, the Redis store
//! shares counters across replicas through the same trait.

pub mod memory;
pub mod persist;
pub mod redis;
pub mod window;

use async_trait::async_trait;

pub use window::{Unit, Window, window_at};

/// One limit of a plan: at most `limit` units per `interval` `unit`s.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limit {
    /// Units allowed per window.
    pub limit: u64,
    /// Window length in `unit`s (at least 1).
    pub interval: u32,
    /// The calendar unit `interval` counts in.
    pub unit: Unit,
}

impl Limit {
    /// The window of this limit that contains `now`.
    pub fn window(&self, now: i64) -> Window {
        window_at(now, self.unit, self.interval)
    }
}

/// A request to spend `cost` units from every limit of one bucket at `now` (Unix seconds).
#[derive(Debug, Clone, Copy)]
pub struct Charge<'a> {
    /// The counter's identity: (app or owner, product, operation-or-product), already joined.
    pub bucket: &'a str,
    /// Every limit the call must fit; a call that does not fit all of them spends nothing.
    pub limits: &'a [Limit],
    /// Units this call spends.
    pub cost: u64,
    /// Current time in Unix seconds.
    pub now: i64,
}

/// Where one limit stands after a charge: what the `ratelimit-*` headers report.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LimitState {
    /// Units allowed per window.
    pub limit: u64,
    /// Units left in the current window.
    pub remaining: u64,
    /// Seconds until the current window ends.
    pub reset_secs: u64,
}

/// How much of one limit's current window is spent: what `/v1/usage?app=` reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LimitUsage {
    /// The limit asked about, as given.
    pub limit: Limit,
    /// Its window that contains the time asked about.
    pub window: Window,
    /// Units counted in the window.
    pub used: u64,
    /// Units leased to replicas and not reported as served yet (Redis store; always 0 in memory): the true
    /// count lies between `used` and `used + reserved`, and no more than `limit - used - reserved` can still
    /// be granted.
    pub reserved: u64,
}

/// A token quota's reservation (CONTRACT §11): the reserve a Check charged, held under the request's id until
/// the access-log entry of the call settles it, or `until` passes and it is released.
#[derive(Debug, Clone, Copy)]
pub struct Hold<'a> {
    /// The request id (`x-request-id`) the access log names the call by.
    pub id: &'a str,
    /// The bucket charged.
    pub bucket: &'a str,
    /// Its limits.
    pub limits: &'a [Limit],
    /// Units charged at the Check.
    pub reserve: u64,
    /// When the Check charged them (Unix seconds): the windows held are the ones containing it.
    pub at: i64,
    /// When the reserve is given back if the call was not settled by then (Unix seconds).
    pub until: i64,
}

/// How [`QuotaStore::settle`] found its hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Settled {
    /// Held (or never recorded): the reserve was replaced by the reported count.
    Held,
    /// Released by its timeout before: the reported count was added afresh.
    Released,
}

/// The answer of a store to a charge.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Charged; the state of the limit with the fewest units left.
    Allowed(LimitState),
    /// Not charged; the state of the first exhausted limit.
    Exceeded(LimitState),
}

/// A quota store could not answer (the caller applies `on_store_error`).
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The store did not answer in time.
    #[error("quota store timed out")]
    Timeout,
    /// The store answered with an error or the connection failed.
    #[error("quota store failed: {0}")]
    Backend(String),
}

/// Counts quota units per bucket and window.
#[async_trait]
pub trait QuotaStore: Send + Sync + 'static {
    /// Spends `charge.cost` from every limit if all of them have room; otherwise spends nothing.
    async fn charge(&self, charge: &Charge<'_>) -> Result<Outcome, StoreError>;
    /// Where each of `limits` of `bucket` stands at `now` (Unix seconds), charging nothing.
    async fn usage(
        &self,
        bucket: &str,
        limits: &[Limit],
        now: i64,
    ) -> Result<Vec<LimitUsage>, StoreError>;
    /// Charges a token quota's reserve: as [`QuotaStore::charge`], but never served from a local lease (the
    /// settlement and the release change the shared count directly, which a lease not yet reported would
    /// undo).
    async fn reserve(&self, charge: &Charge<'_>) -> Result<Outcome, StoreError> {
        self.charge(charge).await
    }
    /// Records a token quota's reserve, charged by the Check, as held under `hold.id` until `hold.until`.
    async fn hold(&self, hold: &Hold<'_>) -> Result<(), StoreError>;
    /// Settles hold `hold.id` to the `used` units its response reported, refusing nothing: a reserve still
    /// held (or never recorded) is replaced by `used`, one already released by [`QuotaStore::release_expired`]
    /// is followed by `used` afresh. Counters never go below 0; a window ended and forgotten is left alone.
    async fn settle(&self, hold: &Hold<'_>, used: u64) -> Result<Settled, StoreError>;
    /// Gives back the reserve of every hold whose `until` is before `now` (a response whose access-log entry
    /// never came); returns how many were released.
    async fn release_expired(&self, now: i64) -> Result<usize, StoreError>;
    /// Answers when the store is usable (for `/readyz`).
    async fn ping(&self) -> Result<(), StoreError>;
    /// Forgets windows that ended before `now`.
    async fn sweep(&self, now: i64);
}
