//! The state store's interface: one write call, a few reads, and the change feed replicas follow.

use async_trait::async_trait;

use crate::paywall::model::{PaidSubscription, StripeEvent};
use crate::state::model::{
    AppRecord, AuditRecord, Changes, Claim, DeveloperRecord, Image, KeyRecord, Page, Remembered,
    Write, Written,
};

/// Why a store call failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The entity a write needs does not exist.
    #[error("{0}")]
    NotFound(String),
    /// The write clashes with what the store holds (a taken name or client id, an app moved between
    /// developers).
    #[error("{0}")]
    Conflict(String),
    /// The database could not be reached or failed; nothing was changed.
    #[error("state store unavailable: {0}")]
    Unavailable(#[source] sqlx::Error),
    /// The schema could not be created or upgraded.
    #[error("state store migration failed: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    /// A row holds what this version cannot read (a newer schema, or a hand edit).
    #[error("state store holds an unreadable row: {0}")]
    Corrupt(String),
}

impl From<sqlx::Error> for StoreError {
    fn from(e: sqlx::Error) -> Self {
        StoreError::Unavailable(e)
    }
}

/// Who made a write, for the audit table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Actor(pub String);

/// Developers, apps, keys and subscriptions, kept durably and shared by replicas.
///
/// Every implementation runs the same suite (`tests/state_store.rs`).
#[async_trait]
pub trait StateStore: Send + Sync {
    /// Applies one change in one transaction, with its change rows and its audit row, at `now` (Unix seconds).
    async fn write(&self, write: &Write, actor: &Actor, now: i64) -> Result<Written, StoreError>;

    /// One developer.
    async fn developer(&self, email: &str) -> Result<Option<DeveloperRecord>, StoreError>;

    /// Developers by e-mail, in order.
    async fn developers(&self, page: &Page) -> Result<Vec<DeveloperRecord>, StoreError>;

    /// One app and its keys.
    async fn app(&self, name: &str) -> Result<Option<(AppRecord, Vec<KeyRecord>)>, StoreError>;

    /// Apps by name, in order, optionally of one developer.
    async fn apps(
        &self,
        developer: Option<&str>,
        page: &Page,
    ) -> Result<Vec<AppRecord>, StoreError>;

    /// Audit rows after sequence number `after`, oldest first.
    async fn audit(&self, after: i64, limit: u32) -> Result<Vec<AuditRecord>, StoreError>;

    /// The entities changed after sequence number `after` (at most `limit` sequence numbers' worth).
    async fn changes(&self, after: i64, limit: u32) -> Result<Changes, StoreError>;

    /// Everything, for a replica's first read or one that fell behind the retained changes.
    async fn load(&self) -> Result<Image, StoreError>;

    /// Drops changes and applied webhook events older than `changes_before` (replicas behind them reload
    /// everything) and idempotent answers older than `answers_before` (Unix seconds).
    async fn prune(&self, changes_before: i64, answers_before: i64) -> Result<(), StoreError>;

    /// Claims an idempotency key (already hashed with the caller's token id) for `request`, about to run at
    /// `now`: [`Claim::Claimed`] when nothing is stored or only a claim made before `stale_before` (its
    /// request died), else what is stored.
    async fn claim(
        &self,
        key: &[u8; 32],
        request: &[u8; 32],
        now: i64,
        stale_before: i64,
    ) -> Result<Claim, StoreError>;

    /// Stores the answer to a claimed key, or drops the claim (`None`: the request may run again).
    async fn settle(&self, key: &[u8; 32], answer: Option<&Remembered>) -> Result<(), StoreError>;

    /// Records a verified webhook event: `true` when its id is new, `false` for a delivery seen before.
    async fn record_event(&self, event: &StripeEvent, now: i64) -> Result<bool, StoreError>;

    /// Claims, at `now`, up to `limit` recorded events not applied yet that arrived before `received_before`
    /// and that no replica claimed in the last minute; oldest first.
    async fn claim_events(
        &self,
        now: i64,
        received_before: i64,
        limit: u32,
    ) -> Result<Vec<StripeEvent>, StoreError>;

    /// A customer's Stripe subscriptions.
    async fn paid_subscriptions(&self, customer: &str)
    -> Result<Vec<PaidSubscription>, StoreError>;

    /// Takes the turn of the full Stripe re-read when none started in the last `every` seconds.
    async fn claim_resync(&self, now: i64, every: i64) -> Result<bool, StoreError>;

    /// Answers when the store is reachable.
    async fn ping(&self) -> Result<(), StoreError>;
}
