//! The rollup store's interface: batches of hourly counts in, hourly rows out.

use async_trait::async_trait;

use crate::state::StoreError;

/// What one hour of one (customer, app, product, meter) counted.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct Counts {
    /// Requests ext_authz allowed.
    pub allowed: u64,
    /// Requests it denied.
    pub denied: u64,
    /// Allowed requests whose status matched the meter's success classes.
    pub billable: u64,
    /// The meter's value summed over billable requests (what Stripe was sent).
    pub value: u64,
}

impl Counts {
    /// Adds `other` in.
    pub fn add(&mut self, other: &Counts) {
        self.allowed = self.allowed.saturating_add(other.allowed);
        self.denied = self.denied.saturating_add(other.denied);
        self.billable = self.billable.saturating_add(other.billable);
        self.value = self.value.saturating_add(other.value);
    }
}

/// The dimensions of a rollup row. Empty strings stand for "none".
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Dims {
    /// Stripe customer id.
    pub customer: String,
    /// App name.
    pub app: String,
    /// Product name.
    pub product: String,
    /// Meter event name.
    pub meter: String,
}

/// One hourly row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rollup {
    /// Start of the UTC hour, Unix seconds.
    pub hour: i64,
    /// Whose usage.
    pub dims: Dims,
    /// What it counted.
    pub counts: Counts,
}

/// What one closed metering window of one spool adds: added once, whatever replays.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Batch {
    /// `<producer>:<window start ms>:<window length ms>`.
    pub id: String,
    /// Its rows.
    pub rows: Vec<Rollup>,
}

/// Whose history a query reads.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Subject {
    /// Every app billed to a Stripe customer.
    Customer(String),
    /// One app.
    App(String),
}

/// Hourly usage, kept durably and added to by every replica.
///
/// Every implementation runs the same suite (`tests/state_store.rs`).
#[async_trait]
pub trait HistoryStore: Send + Sync {
    /// Adds a batch's rows in one transaction unless the batch was added before; `true` when added now.
    async fn add(&self, batch: &Batch, now: i64) -> Result<bool, StoreError>;

    /// The hourly rows of `subject` with `from <= hour < to` (Unix seconds), in (hour, app, product, meter)
    /// order.
    async fn hours(&self, subject: &Subject, from: i64, to: i64)
    -> Result<Vec<Rollup>, StoreError>;

    /// The rows of `subject` with `from <= hour < to` summed per bucket and (customer, app, product, meter),
    /// in no particular order; each row's `hour` is its bucket's start, `origin + (hour - origin) / span *
    /// span` (`span > 0`; callers keep `origin <= from`). Days are `(0, 86_400)`; a calendar month is
    /// `(its start, its length)` over a range inside it. What `/v1/usage/history` reads by day and by month:
    /// the database sums, so far fewer rows cross to the caller.
    ///
    /// The default sums [`HistoryStore::hours`] in memory; a store that can sum itself overrides it.
    async fn sums(
        &self,
        subject: &Subject,
        from: i64,
        to: i64,
        origin: i64,
        span: i64,
    ) -> Result<Vec<Rollup>, StoreError> {
        let span = span.max(1);
        let mut sums: std::collections::BTreeMap<(i64, Dims), Counts> = Default::default();
        for row in self.hours(subject, from, to).await? {
            let bucket = origin + (row.hour - origin).div_euclid(span) * span;
            sums.entry((bucket, row.dims)).or_default().add(&row.counts);
        }
        Ok(sums
            .into_iter()
            .map(|((hour, dims), counts)| Rollup { hour, dims, counts })
            .collect())
    }

    /// Drops rows of hours before `hours_before` and batch marks added before `batches_before` (Unix seconds).
    async fn prune(&self, hours_before: i64, batches_before: i64) -> Result<(), StoreError>;
}
