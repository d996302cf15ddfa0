//! Prepaid credits (CONTRACT §9): a balance per owner that calls burn down in real time and that never goes
//! below zero.
//!
//! # One spend, followed
//! `check::plan` finds the product's `prepaid` cost (the operation's, else the product's) and the owner (the
//! app's company, else its developer) → [`Credits::take`] holds the cost, from this replica's lease when it
//! covers it, else after one ledger call → the quota is charged → the call is allowed and the hold committed
//! (served), or refused and the hold dropped (given back): a refused call spends neither credits nor quota.
//!
//! # The ledger is the state store
//! Balances, grants and leases live in the state store's database ([`ledger::CreditLedger`], implemented in
//! [`sql`]), not in Redis: the state store is durable where Redis may not be, so a kill -9 of Redis changes
//! nothing here, and a single replica on SQLite runs the same code as a fleet on PostgreSQL. One row per owner
//! holds `granted`, `spent` and `reserved` (the sum of the replicas' leases); `balance = granted - spent -
//! reserved`. A lease call reports what the replica served (an absolute total, so a call whose answer was lost
//! is not counted twice), keeps its unserved rest, and leases `need` plus at most `max_lease` less what it
//! still holds unserved, at most 1/[`ledger::LEASE_DIVISOR`] of what is free: all in one transaction under the
//! owner's row lock.
//!
//! # What is exact, what is bounded
//! - Exact: the credits allowed across all replicas never exceed the credits granted: a lease is counted as
//!   spent before any of it is served, and the ledger grants a lease only from the free balance.
//! - Durable: a credit is reserved in the ledger (committed) before any call spends it, so a crash never gives
//!   a spent credit back. A grant is a committed row before it is acknowledged.
//! - Exact after a process crash: each spend is written to the replica's [`journal`] (`metering.dir`) before
//!   the call is allowed: the owner's served total, stored through a shared mapping of its slot in the file
//!   (no syscall per Check). The store lands in the kernel's page cache, which outlives the process, so after
//!   a kill -9 (same replica id, kept in `metering.dir`) [`ledger::CreditLedger::recover`] spends exactly what
//!   the dead life served and returns the rest of its leases to the balance.
//! - Bounded, against the owner, when the journal cannot be trusted (the machine rebooted, so the page cache
//!   may have lost writes; no journal; the journal could not be started, or the owner's slot could not be
//!   written): the restart keeps everything the dead life held as spent, since some of it may have been
//!   served. The cost is at most `max_lease` + the calls in flight + one call's cost, per owner the replica
//!   held a lease for (`tollgate_credits_recovered_total`); a graceful stop returns everything. A replica
//!   whose id is lost for good (its folder gone) is settled the same way by any replica once its leases sat
//!   idle for [`lease::DEAD_AFTER`].
//! - Bounded, refusals: near zero a replica may refuse (402) while another still holds leased credits; the
//!   holder serves them or returns them within [`lease::IDLE_RETURN`] of its last call for the owner. After an
//!   exhausted answer a replica refuses that owner from memory for `exhausted_for` (1 s): a grant made through
//!   another replica is spendable here within that bound (through this replica: at once).
//!
//! # Grants and refills
//! Every grant has a source unique across owners (`api:<hash of the Idempotency-Key and the owner>`,
//! `stripe:<invoice>:<line>`, `refill:<owner>:<product>:<period start>`), so a retried request, a webhook
//! delivered three times (even after its customer moved to another owner), or two replicas refilling the same
//! month add credits once. A refill (`prepaid.refill`) is applied by the first lease call
//! of an owner in each calendar period (UTC) and tops the balance up to its amount.
//!
//! # Layout
//! `ledger` is the store's interface and the lease sizing; `sql` implements it; `lease` is the engine each
//! replica spends through; `journal` what it served, for a restart after a crash; `catalog` is what
//! products say (cost, refill, credit prices); `topup` turns paid Stripe invoices into grants; `api` is
//! `/v1/credits`; `metrics` the Prometheus series.

pub mod api;
pub mod catalog;
pub mod journal;
pub mod lease;
pub mod ledger;
pub mod metrics;
pub mod sql;
pub mod topup;

pub use catalog::{Prepaid, RefillPolicy};
pub use lease::{CreditOptions, Credits, Hold, Spend, SpendError};
pub use ledger::CreditLedger;
pub use metrics::CreditMetrics;
