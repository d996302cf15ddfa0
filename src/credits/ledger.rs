//! The durable ledger's interface: balances, grants and the leases replicas spend from.
//!
//! The state store implements it ([`crate::state::sql::SqlStore`], SQLite and PostgreSQL); the shared suite in
//! `tests/state_store.rs` runs every implementation.

use std::collections::HashMap;

use async_trait::async_trait;

use crate::state::StoreError;

/// A lease never takes more than this fraction (1/n) of what is free beyond the call that asked, so the last
/// credits of a balance are spread over replicas one call at a time instead of parked in one lease.
pub const LEASE_DIVISOR: u64 = 8;

/// What one lease call asks of the ledger for one (owner, replica).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaseCall<'a> {
    /// The balance's owner: a company, else a developer's e-mail.
    pub owner: &'a str,
    /// The calling replica's id.
    pub replica: &'a str,
    /// Credits this replica served for the owner since its lease row was opened, in total (absolute, so a
    /// report sent twice counts once).
    pub served_total: u64,
    /// Credits of its lease the replica has not served and keeps (never more than the ledger records for it).
    pub keep: u64,
    /// Credits the replica needs now, beyond `keep`, for the call waiting on this answer (0 for a renewal
    /// ahead of time or a return).
    pub need: u64,
    /// Upper bound of the extra credits leased beyond `need` (0: return everything not kept). The engine
    /// passes `max_lease` less what it holds unserved, so a replica never holds more than `max_lease` beyond
    /// the calls in flight and the one asking.
    pub max_extra: u64,
    /// A refill due for the owner before anything is leased.
    pub refill: Option<Refill<'a>>,
    /// Owners whose granted minus spent credits fall below this are "low": the call that crosses it says
    /// so, once.
    pub low_balance: u64,
    /// Unix seconds.
    pub now: i64,
}

/// A free tier's refill: the balance is topped up to `amount` once per calendar period.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Refill<'a> {
    /// The product whose `prepaid.refill` it is (part of the grant's identity).
    pub product: &'a str,
    /// The balance after the refill, when it was below.
    pub amount: u64,
    /// Start of the current period, Unix seconds (part of the grant's identity: one refill per period).
    pub period_start: i64,
}

/// The ledger's answer to a lease call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LeaseAnswer {
    /// Of `keep`, what the ledger agreed this replica still holds (less only after a lost call).
    pub kept: u64,
    /// Credits newly leased: `need` plus some extra, or 0 when `need` did not fit.
    pub granted: u64,
    /// The owner's balance after the call: free credits, leases of every replica counted as spent.
    pub balance: u64,
    /// This call took the balance below the low-balance threshold.
    pub crossed_low: bool,
    /// Credits a refill added in this call (0 without one).
    pub refilled: u64,
    /// The ledger held less for this replica than it reported or kept: another process with the same
    /// replica id settled its lease (a copied `metering.dir`).
    pub conflicted: bool,
}

/// An owner's account as the ledger holds it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Balance {
    /// A company, else a developer's e-mail.
    pub owner: String,
    /// Free credits: `granted - spent - reserved`.
    pub balance: i64,
    /// Every grant added up (take-backs subtract).
    pub granted: i64,
    /// Credits reported served.
    pub spent: i64,
    /// Credits leased to replicas and not reported yet; they count as spent.
    pub reserved: i64,
    /// Unix seconds of the last change.
    pub updated_at: i64,
}

/// One grant or take-back.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct GrantRecord {
    /// Ledger id, increasing.
    pub id: i64,
    /// Credits added (negative: taken back).
    pub amount: i64,
    /// Why, for people.
    pub reason: String,
    /// What caused it: `api:…`, `stripe:<invoice>:<line>`, `refill:<owner>:<product>:<period start>`.
    pub source: String,
    /// Unix seconds.
    pub created_at: i64,
}

/// A grant to write.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GrantInput<'a> {
    /// The owner credited.
    pub owner: &'a str,
    /// Credits added; negative takes back, never below a zero balance.
    pub amount: i64,
    /// Why, for people.
    pub reason: &'a str,
    /// What caused it; a second grant with the same source, to any owner, changes nothing.
    pub source: &'a str,
    /// Balances below this are "low" (a take-back may cross it).
    pub low_balance: u64,
    /// Unix seconds.
    pub now: i64,
}

/// What a grant did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Granted {
    /// Written; the balance after it.
    New(Balance),
    /// The source was granted before with this amount: nothing changed; the balance as it is.
    Duplicate(Balance),
    /// The source was granted before with another amount (an `Idempotency-Key` reused for another grant):
    /// nothing changed.
    Reused(Balance),
    /// A take-back larger than the free balance: nothing changed.
    Insufficient(Balance),
}

/// Prepaid balances, their grants and the leases replicas spend from, kept durably and shared by replicas.
#[async_trait]
pub trait CreditLedger: Send + Sync {
    /// Reports what a replica served, keeps or returns the rest of its lease and leases more, atomically.
    async fn lease(&self, call: &LeaseCall<'_>) -> Result<LeaseAnswer, StoreError>;

    /// Adds (or takes back) credits once per source.
    async fn grant(&self, grant: &GrantInput<'_>) -> Result<Granted, StoreError>;

    /// One owner's account (`None`: never granted nor spent).
    async fn balance(&self, owner: &str) -> Result<Option<Balance>, StoreError>;

    /// An owner's latest grants, newest first.
    async fn grants(&self, owner: &str, limit: u32) -> Result<Vec<GrantRecord>, StoreError>;

    /// Accounts in owner order after `after`; with `below`, only those whose granted minus spent credits are
    /// under it.
    async fn balances(
        &self,
        below: Option<u64>,
        after: Option<&str>,
        limit: u32,
    ) -> Result<Vec<Balance>, StoreError>;

    /// Closes what `replica` held in a life that ended without returning it (a crash). For an owner that
    /// life's trusted journal names (`served`: its served totals by owner) what was served is spent and the
    /// rest goes back to the balance; for any other owner everything held stays spent, as any of it may have
    /// been served.
    async fn recover(
        &self,
        replica: &str,
        served: Option<&HashMap<String, u64>>,
        now: i64,
    ) -> Result<Settled, StoreError>;

    /// Settles leases (of any replica) still holding credits with no call since `idle_before`: replicas that
    /// died for good. What they held stays spent. Returns the credits so settled (at most 100 leases a call).
    async fn reap(&self, idle_before: i64, now: i64) -> Result<u64, StoreError>;
}

/// What closing a dead life's leases came to, in credits.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Settled {
    /// Served according to the journal, now spent.
    pub served: u64,
    /// Not served according to the journal, back in the balance.
    pub returned: u64,
    /// Held for owners no trusted journal names: kept as spent.
    pub kept: u64,
}

/// Extra credits a lease may take beyond `need` when `free` are free: at most `max_extra`, at most
/// 1/[`LEASE_DIVISOR`] of what is free beyond `need`.
pub fn extra_lease(free: u64, need: u64, max_extra: u64) -> u64 {
    max_extra.min(free.saturating_sub(need) / LEASE_DIVISOR)
}
