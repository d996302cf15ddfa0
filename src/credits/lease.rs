//! The spend engine: each replica spends an owner's credits from a lease it took from the ledger, so most
//! prepaid Checks never leave memory, and the ledger never lets leases exceed the balance.
//!
//! Per owner, a [`Cell`] holds the local account under a plain mutex (never held across an await) and an
//! async lock that orders the owner's ledger calls (at most one in flight, as each builds on the answer of
//! the one before). A Check takes its cost from `left` into `pending` ([`Hold`]); the decision then commits it
//! (served) or drops it (back to `left`), so a call refused later (quota) spends nothing.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, MutexGuard, OnceLock, Weak};
use std::time::{Duration, Instant};

use dashmap::DashMap;
use tokio::sync::{Mutex, OnceCell};

use crate::credits::journal::{Journal, Previous, Slot};
use crate::credits::ledger::{CreditLedger, LeaseAnswer, LeaseCall, Refill};
use crate::credits::metrics::CreditMetrics;
use crate::state::StoreError;
use crate::util::sync::lock;
use crate::util::throttle::OncePerSecond;

/// A renewal starts in the background once fewer than 1/n of the last lease is left (or sooner when the
/// ledger is slow: [`Account::wants_prefetch`]).
const PREFETCH_DIVISOR: u64 = 4;
/// An owner without Checks for this long returns its lease and reports what it served.
pub const IDLE_RETURN: Duration = Duration::from_secs(1);
/// How often a replica looks for leases of replicas that died for good.
const REAP_EVERY: Duration = Duration::from_secs(60);
/// A lease still holding credits this long after its last call belongs to a replica that died for good: a
/// live one returns an idle lease within [`IDLE_RETURN`].
pub const DEAD_AFTER: Duration = Duration::from_secs(600);

/// How the engine leases.
#[derive(Debug, Clone)]
pub struct CreditOptions {
    /// Upper bound of the credits one lease takes beyond the call that asked (0: one ledger call per Check).
    /// Also the bound on what a crash of this replica can cost an owner: its unserved lease stays spent.
    pub max_lease: u64,
    /// Balances below this are low: `GET /v1/credits?below=` lists them, and crossing logs once.
    pub low_balance: u64,
    /// After the ledger found a balance exhausted, this replica refuses that owner without asking again for
    /// this long (a grant made through this replica clears it at once). The bound on how late a grant
    /// made elsewhere becomes spendable here.
    pub exhausted_for: Duration,
    /// Bound of one ledger call made for a Check.
    pub timeout: Duration,
}

impl Default for CreditOptions {
    fn default() -> Self {
        CreditOptions {
            max_lease: 1_000,
            low_balance: 100,
            exhausted_for: Duration::from_secs(1),
            timeout: Duration::from_secs(1),
        }
    }
}

/// What a Check found for its cost.
#[derive(Debug)]
pub enum Spend {
    /// The cost is held; commit it once the call is allowed, or drop it to give it back.
    Held(Hold),
    /// The balance cannot cover the cost; nothing was taken.
    Exhausted {
        /// Free credits as last seen (other replicas' leases count as spent).
        balance: u64,
    },
}

/// Credits taken for one call, given back on drop unless committed.
#[derive(Debug)]
pub struct Hold {
    cell: Arc<Cell>,
    cost: u64,
    remaining: u64,
    done: bool,
}

impl Hold {
    fn new(cell: Arc<Cell>, cost: u64, remaining: u64) -> Hold {
        Hold {
            cell,
            cost,
            remaining,
            done: false,
        }
    }

    /// Marks the credits served, journaling the new total under the account's lock (so totals reach the
    /// journal in order); returns the cost and the balance left as this replica sees it.
    fn commit(mut self, journal: Option<&Journal>) -> (u64, u64) {
        self.done = true;
        let mut a = self.cell.state();
        a.pending -= self.cost;
        a.served_total += self.cost;
        // A store into the mapped slot, not a syscall: cheap enough to stay under the lock that orders totals.
        if let (Some(journal), Some(Some(slot))) = (journal, self.cell.slot.get()) {
            journal.record(slot, a.served_total);
        }
        (self.cost, self.remaining)
    }
}

impl Drop for Hold {
    fn drop(&mut self) {
        if !self.done {
            let mut a = self.cell.state();
            a.pending -= self.cost;
            a.left += self.cost;
        }
    }
}

/// One owner's local account.
#[derive(Debug)]
struct Account {
    /// Leased credits not served and not held by a call in flight.
    left: u64,
    /// Credits held by calls in flight.
    pending: u64,
    /// Credits served since this process started, in total.
    served_total: u64,
    /// The part of `served_total` the ledger acknowledged.
    reported: u64,
    /// Size of the last lease, for the prefetch rule.
    last_lease: u64,
    /// Credits taken from the lease since this process started, in total (given back or not).
    taken: u64,
    /// Credits taken while the last ledger call was in flight: what the lease must still hold when a renewal
    /// starts for it to land before the lease runs dry, for the prefetch rule.
    consumed: u64,
    /// Free balance at the last answer (every replica's lease counted as spent).
    balance: u64,
    /// When the ledger last could not cover a call.
    exhausted_at: Option<Instant>,
    /// The period each refilling product was last refilled for by this process.
    refilled: Vec<(Box<str>, i64)>,
    touched: Instant,
}

impl Account {
    /// Whether `refill` was not applied yet for its product and period.
    fn refill_due(&self, refill: Option<&Refill<'_>>) -> bool {
        refill.is_some_and(|r| {
            !self
                .refilled
                .iter()
                .any(|(product, start)| **product == *r.product && *start == r.period_start)
        })
    }

    /// Notes that `refill` was applied.
    fn refilled(&mut self, refill: &Refill<'_>) {
        match self
            .refilled
            .iter_mut()
            .find(|(product, _)| **product == *refill.product)
        {
            Some(entry) => entry.1 = refill.period_start,
            None => self
                .refilled
                .push((refill.product.into(), refill.period_start)),
        }
    }

    /// Takes `cost` from the lease when it covers it and no refill is due.
    fn take(&mut self, cost: u64, refill: Option<&Refill<'_>>) -> Option<u64> {
        if self.refill_due(refill) || self.left < cost {
            return None;
        }
        self.left -= cost;
        self.pending += cost;
        self.taken = self.taken.wrapping_add(cost);
        Some(self.balance.saturating_add(self.left))
    }

    /// Whether a renewal should start: fewer than 1/[`PREFETCH_DIVISOR`] of the last lease is left, or fewer
    /// than twice what Checks took during the last ledger call. The second rule makes a renewal land before
    /// the lease runs dry when the ledger is slow for the owner's rate (Checks would otherwise queue for it);
    /// it never starts one with more than half of `max_lease` left, so a renewal still asks for at least half
    /// a lease. Neither changes what a lease may hold: `max_lease` bounds it.
    fn wants_prefetch(&self, max_lease: u64) -> bool {
        let slow_ledger = self.consumed.saturating_mul(2).min(max_lease / 2);
        self.exhausted_at.is_none()
            && self.last_lease > 0
            && (self.left.saturating_mul(PREFETCH_DIVISOR) <= self.last_lease
                || self.left <= slow_ledger)
    }

    /// Owes the ledger nothing: no lease, nothing unreported.
    fn clean(&self) -> bool {
        self.left == 0 && self.pending == 0 && self.served_total == self.reported
    }
}

/// One owner: the account and the lock that orders its ledger calls.
#[derive(Debug)]
struct Cell {
    owner: Box<str>,
    /// Where the owner's served total is journaled: taken before the owner's first lease in this life, so a
    /// lease the ledger records always has a slot (`None` inside: no journal, a name too long, or a failed
    /// write; a restart then keeps that owner's lease as spent).
    slot: OnceLock<Option<Slot>>,
    io: Mutex<()>,
    state: std::sync::Mutex<Account>,
    /// A background renewal is queued or running.
    renewing: AtomicBool,
}

impl Cell {
    fn new(owner: &str) -> Self {
        Cell {
            owner: owner.into(),
            slot: OnceLock::new(),
            io: Mutex::new(()),
            state: std::sync::Mutex::new(Account {
                left: 0,
                pending: 0,
                served_total: 0,
                reported: 0,
                last_lease: 0,
                taken: 0,
                consumed: 0,
                balance: 0,
                exhausted_at: None,
                refilled: Vec::new(),
                touched: Instant::now(),
            }),
            renewing: AtomicBool::new(false),
        }
    }

    fn state(&self) -> MutexGuard<'_, Account> {
        // Bookkeeping under this lock is plain arithmetic that cannot panic half-way.
        lock(&self.state)
    }
}

/// Why a ledger call made for a Check failed.
#[derive(Debug, thiserror::Error)]
pub enum SpendError {
    /// The ledger did not answer within the timeout.
    #[error("the credit ledger did not answer in time")]
    Timeout,
    /// The ledger failed.
    #[error("the credit ledger failed: {0}")]
    Ledger(#[from] StoreError),
    /// This replica was started without a credit ledger.
    #[error("prepaid credits are not configured on this replica")]
    NotConfigured,
}

/// Which kind of ledger call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Op {
    /// For a Check the lease cannot cover.
    Lease,
    /// Ahead of time, in the background.
    Renew,
    /// Hands the unserved lease back (idle, shutdown).
    Return,
}

/// One ledger call to make.
#[derive(Debug, Clone, Copy)]
struct Ask<'a> {
    op: Op,
    /// The cost of the call waiting on the answer (0 without one).
    want: u64,
    refill: Option<Refill<'a>>,
    now: i64,
}

impl Op {
    fn as_str(self) -> &'static str {
        match self {
            Op::Lease => "lease",
            Op::Renew => "renew",
            Op::Return => "return",
        }
    }
}

/// The credits every replica spends; see the module docs of [`crate::credits`].
pub struct Credits {
    inner: Arc<Inner>,
    returner: tokio::task::JoinHandle<()>,
}

struct Inner {
    ledger: Arc<dyn CreditLedger>,
    replica: String,
    options: CreditOptions,
    owners: DashMap<Box<str>, Arc<Cell>>,
    metrics: CreditMetrics,
    /// Set once the previous life's leases are closed: no lease call runs before.
    recovered: OnceCell<()>,
    /// This life's spends, written before each prepaid call is allowed.
    journal: Option<Journal>,
    /// What the previous life journaled, until its leases are settled.
    previous: std::sync::Mutex<Option<Previous>>,
    /// A journal that cannot be written is logged once a second (spends go on: the lease bound applies).
    journal_failures: OncePerSecond,
    /// Two processes sharing this replica id are logged once a second.
    conflicts: OncePerSecond,
}

impl std::fmt::Debug for Credits {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credits")
            .field("replica", &self.inner.replica)
            .field("options", &self.inner.options)
            .field("owners", &self.inner.owners.len())
            .finish()
    }
}

impl Drop for Credits {
    fn drop(&mut self) {
        self.returner.abort();
    }
}

impl Credits {
    /// Starts the engine and its idle-lease returner. What a previous life of `replica` left leased (a crash)
    /// is closed before this life's first ledger call ([`Credits::recover`]), so nothing it may have served is
    /// given back.
    ///
    /// With a `journal` (opened on `metering.dir`, with what its previous life served), every spend is
    /// journaled before the call is allowed, and a restart after a crash reports exactly what was served.
    pub fn start(
        ledger: Arc<dyn CreditLedger>,
        replica: String,
        options: CreditOptions,
        metrics: CreditMetrics,
        journal: Option<(Journal, Previous)>,
    ) -> Credits {
        let (journal, previous) = match journal {
            Some((journal, previous)) => (Some(journal), previous),
            None => (None, Previous::default()),
        };
        let inner = Arc::new(Inner {
            ledger,
            replica,
            options,
            owners: DashMap::new(),
            metrics,
            recovered: OnceCell::new(),
            journal,
            previous: std::sync::Mutex::new(Some(previous)),
            journal_failures: OncePerSecond::default(),
            conflicts: OncePerSecond::default(),
        });
        let returner = tokio::spawn(return_idle(Arc::downgrade(&inner)));
        Credits { inner, returner }
    }

    /// Closes what a previous life of this replica left leased, once (later calls answer at once); `serve`
    /// calls it when the state store is migrated, and every ledger call waits for it.
    pub async fn recover(&self) -> Result<(), StoreError> {
        self.inner.recover().await
    }

    /// Takes `cost` credits of `owner` for one call at `now` (Unix seconds), refilling first when `refill` is
    /// due. Most calls are served from the local lease; the others make one bounded ledger call.
    pub async fn take(
        &self,
        owner: &str,
        cost: u64,
        refill: Option<Refill<'_>>,
        now: i64,
    ) -> Result<Spend, SpendError> {
        let inner = &self.inner;
        // The cell moves into the hold on the local path: one reference count taken per Check, not two.
        let cell = match inner.local(inner.cell(owner), cost, refill.as_ref()) {
            Ok(spend) => return Ok(spend),
            Err(cell) => cell,
        };
        let asked = tokio::time::timeout(inner.options.timeout, async {
            let _io = cell.io.lock().await;
            // A renewal may have landed while this call waited for its turn.
            if let Ok(spend) = inner.local(Arc::clone(&cell), cost, refill.as_ref()) {
                return Ok(spend);
            }
            let ask = Ask {
                op: Op::Lease,
                want: cost,
                refill,
                now,
            };
            inner.call(&cell, ask).await?;
            let mut a = cell.state();
            let (spend, result) = match a.take(cost, None) {
                Some(remaining) => (
                    Spend::Held(Hold::new(Arc::clone(&cell), cost, remaining)),
                    &inner.metrics.checks_ledger,
                ),
                None => {
                    let balance = a.balance.saturating_add(a.left);
                    (
                        Spend::Exhausted { balance },
                        &inner.metrics.checks_exhausted,
                    )
                }
            };
            result.inc();
            Ok(spend)
        })
        .await;
        let result = match asked {
            Ok(result) => result,
            Err(_) => Err(SpendError::Timeout),
        };
        if result.is_err() {
            inner.metrics.checks_unavailable.inc();
        }
        result
    }

    /// Marks a held call's credits served (the call was allowed); returns the balance left as this replica
    /// sees it.
    pub fn commit(&self, hold: Hold) -> u64 {
        let (cost, remaining) = hold.commit(self.inner.journal.as_ref());
        self.inner.metrics.spent.inc_by(cost);
        remaining
    }

    /// Forgets that `owner`'s balance was exhausted, so the next Check asks the ledger (after a grant).
    pub fn granted(&self, owner: &str) {
        if let Some(cell) = self.inner.owners.get(owner) {
            cell.state().exhausted_at = None;
        }
    }

    /// Reports what every owner served and returns every unserved lease (shutdown, tests), within `within`;
    /// stops at the first ledger error (the rest is settled at the next start).
    pub async fn flush(&self, now: i64, within: Duration) -> Result<(), SpendError> {
        let cells: Vec<Arc<Cell>> = self
            .inner
            .owners
            .iter()
            .map(|e| Arc::clone(e.value()))
            .collect();
        let returns = async {
            for cell in cells {
                let _io = cell.io.lock().await;
                if cell.state().clean() {
                    continue;
                }
                let ask = Ask {
                    op: Op::Return,
                    want: 0,
                    refill: None,
                    now,
                };
                self.inner.call(&cell, ask).await?;
            }
            Ok::<(), StoreError>(())
        };
        match tokio::time::timeout(within, returns).await {
            Ok(result) => Ok(result?),
            Err(_) => Err(SpendError::Timeout),
        }
    }

    /// The ledger the credits are kept in.
    pub fn ledger(&self) -> &Arc<dyn CreditLedger> {
        &self.inner.ledger
    }

    /// The options in force.
    pub fn options(&self) -> &CreditOptions {
        &self.inner.options
    }

    /// The metrics, shared with the management API and the top-ups.
    pub fn metrics(&self) -> &CreditMetrics {
        &self.inner.metrics
    }
}

impl Inner {
    async fn recover(&self) -> Result<(), StoreError> {
        self.recovered
            .get_or_try_init(|| async {
                let now = crate::util::clock::unix_now();
                let previous = lock(&self.previous).clone().unwrap_or_default();
                let settled = self
                    .ledger
                    .recover(&self.replica, previous.trusted(), now)
                    .await?;
                if settled.kept > 0 {
                    tracing::warn!(
                        replica = %self.replica,
                        credits = settled.kept,
                        why = previous.untrusted.as_deref().unwrap_or(""),
                        "credits this replica held leased when it last stopped, served or not, are kept as spent"
                    );
                    self.metrics.recovered.inc_by(settled.kept);
                }
                if settled.served > 0 || settled.returned > 0 {
                    tracing::info!(
                        replica = %self.replica,
                        served = settled.served,
                        returned = settled.returned,
                        "credits leased before a crash settled from the spend journal"
                    );
                }
                if let Some(journal) = &self.journal
                    && let Err(e) = journal.begin_life()
                {
                    tracing::warn!(path = %journal.path().display(), error = %e,
                        "credit spend journal not started (poisoned): a crash costs up to a lease per owner");
                }
                *lock(&self.previous) = None;
                Ok::<(), StoreError>(())
            })
            .await?;
        Ok(())
    }

    fn cell(&self, owner: &str) -> Arc<Cell> {
        if let Some(cell) = self.owners.get(owner) {
            return Arc::clone(cell.value());
        }
        Arc::clone(
            self.owners
                .entry(owner.into())
                .or_insert_with(|| Arc::new(Cell::new(owner)))
                .value(),
        )
    }

    fn journal_failed(&self, error: &std::io::Error) {
        if self.journal_failures.allow(crate::util::clock::unix_now()) {
            tracing::warn!(%error, "credit spend journal not written: a crash may cost up to a lease per owner");
        }
    }

    /// Serves from the lease (the hold keeps `cell`), or refuses from a recent "exhausted" answer; gives
    /// `cell` back when the ledger must be asked.
    fn local(
        self: &Arc<Self>,
        cell: Arc<Cell>,
        cost: u64,
        refill: Option<&Refill<'_>>,
    ) -> Result<Spend, Arc<Cell>> {
        let mut a = cell.state();
        a.touched = Instant::now();
        if let Some(remaining) = a.take(cost, refill) {
            let prefetch = a.wants_prefetch(self.options.max_lease);
            drop(a);
            self.metrics.checks_local.inc();
            if prefetch && !cell.renewing.swap(true, Ordering::AcqRel) {
                tokio::spawn(renew(Arc::clone(self), Arc::clone(&cell)));
            }
            return Ok(Spend::Held(Hold::new(cell, cost, remaining)));
        }
        let refill_due = a.refill_due(refill);
        let exhausted = a
            .exhausted_at
            .is_some_and(|at| at.elapsed() < self.options.exhausted_for);
        if exhausted && !refill_due {
            self.metrics.checks_exhausted.inc();
            let balance = a.balance.saturating_add(a.left);
            return Ok(Spend::Exhausted { balance });
        }
        drop(a);
        Err(cell)
    }

    /// One ledger call for the cell's owner, made by the holder of its `io` lock: reports what was served,
    /// keeps what is unserved, asks for what the waiting call lacks plus a lease, and books the answer.
    async fn call(&self, cell: &Cell, ask: Ask<'_>) -> Result<LeaseAnswer, StoreError> {
        self.recover().await?;
        let owner = &*cell.owner;
        if ask.op != Op::Return
            && let Some(journal) = &self.journal
        {
            // Before the ledger records a lease for the owner: see `Cell::slot`.
            cell.slot.get_or_init(|| {
                journal.slot(owner).unwrap_or_else(|e| {
                    self.journal_failed(&e);
                    None
                })
            });
        }
        let (served_total, keep, need, max_extra, taken_before) = {
            let mut a = cell.state();
            if ask.op == Op::Return {
                // Given up before the call: a Check racing it must not serve credits the ledger frees.
                a.left = 0;
            }
            let max_extra = match ask.op {
                Op::Return => 0,
                // Credits held by calls in flight are theirs: only the unserved rest counts against the bound.
                Op::Lease | Op::Renew => self.options.max_lease.saturating_sub(a.left),
            };
            // Under the same lock as the snapshot: a cheaper call served from `left` meanwhile cannot make
            // this answer fall short.
            let need = ask.want.saturating_sub(a.left);
            (a.served_total, a.left + a.pending, need, max_extra, a.taken)
        };
        let call = LeaseCall {
            owner,
            replica: &self.replica,
            served_total,
            keep,
            need,
            max_extra,
            refill: ask.refill,
            low_balance: self.options.low_balance,
            now: ask.now,
        };
        let started = Instant::now();
        let answer = self.ledger.lease(&call).await;
        self.metrics
            .duration
            .observe(started.elapsed().as_secs_f64());
        let result = if answer.is_ok() { "ok" } else { "error" };
        self.metrics
            .calls
            .with_label_values(&[ask.op.as_str(), result])
            .inc();
        let answer = answer?;
        let mut a = cell.state();
        a.reported = served_total;
        // The ledger keeps no more than it recorded: void the difference (only after a lost answer).
        let void = keep.saturating_sub(answer.kept);
        a.left = a.left.saturating_sub(void);
        a.left += answer.granted;
        a.last_lease = answer.granted;
        if ask.op != Op::Return {
            a.consumed = a.taken.wrapping_sub(taken_before);
        }
        a.balance = answer.balance;
        a.exhausted_at = (need > 0 && answer.granted == 0).then(Instant::now);
        if let Some(r) = &ask.refill {
            a.refilled(r);
        }
        drop(a);
        if answer.conflicted && self.conflicts.allow(ask.now) {
            tracing::error!(replica = %self.replica, owner,
                "the credit ledger holds less for this replica than it served or keeps: another process runs \
                 with the same replica id (a copied metering.dir?), or its lease was settled as dead after a \
                 long ledger outage; spends beyond what the ledger held are not counted");
        }
        if answer.refilled > 0 {
            self.metrics
                .granted
                .with_label_values(&["refill"])
                .inc_by(answer.refilled);
            tracing::info!(owner, credits = answer.refilled, "prepaid balance refilled");
        }
        if answer.crossed_low {
            tracing::warn!(
                owner,
                balance = answer.balance,
                threshold = self.options.low_balance,
                "prepaid balance is low"
            );
        }
        Ok(answer)
    }
}

/// Tops a running-low lease up in the background while Checks spend the rest.
async fn renew(inner: Arc<Inner>, cell: Arc<Cell>) {
    let _io = cell.io.lock().await;
    cell.renewing.store(false, Ordering::Release);
    if !cell.state().wants_prefetch(inner.options.max_lease) {
        return;
    }
    let ask = Ask {
        op: Op::Renew,
        want: 0,
        refill: None,
        now: crate::util::clock::unix_now(),
    };
    if let Ok(Err(e)) = tokio::time::timeout(inner.options.timeout, inner.call(&cell, ask)).await {
        tracing::debug!(owner = %cell.owner, error = %e, "credit lease renewal failed");
    }
}

/// Every quarter second: owners idle for [`IDLE_RETURN`] report what they served and return their lease;
/// every [`REAP_EVERY`], leases of replicas that died for good are settled.
async fn return_idle(inner: Weak<Inner>) {
    let mut tick = tokio::time::interval(IDLE_RETURN / 4);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_reap = Instant::now();
    loop {
        tick.tick().await;
        let Some(inner) = inner.upgrade() else { return };
        let idle: Vec<Arc<Cell>> = inner
            .owners
            .iter()
            .filter(|e| {
                let a = e.value().state();
                !a.clean() && a.pending == 0 && a.touched.elapsed() >= IDLE_RETURN
            })
            .map(|e| Arc::clone(e.value()))
            .collect();
        for cell in idle {
            let Ok(_io) = cell.io.try_lock() else {
                continue;
            };
            let ask = Ask {
                op: Op::Return,
                want: 0,
                refill: None,
                now: crate::util::clock::unix_now(),
            };
            let call = inner.call(&cell, ask);
            if let Ok(Err(e)) = tokio::time::timeout(inner.options.timeout, call).await {
                tracing::debug!(owner = %cell.owner, error = %e, "returning an idle credit lease failed");
            }
        }
        if last_reap.elapsed() >= REAP_EVERY && inner.recovered.initialized() {
            last_reap = Instant::now();
            let now = crate::util::clock::unix_now();
            let idle_before = now.saturating_sub(DEAD_AFTER.as_secs() as i64);
            match inner.ledger.reap(idle_before, now).await {
                Ok(0) => {}
                Ok(kept) => {
                    inner.metrics.recovered.inc_by(kept);
                    tracing::warn!(credits = kept, idle_for = ?DEAD_AFTER,
                        "credits leased by replicas gone for good are kept as spent");
                }
                Err(e) => {
                    tracing::debug!(error = %e, "settling dead replicas' credit leases failed")
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An account holding `left` of a lease of `last_lease`, whose last ledger call saw `consumed` taken.
    fn account(left: u64, last_lease: u64, consumed: u64) -> Cell {
        let cell = Cell::new("acme");
        {
            let mut a = cell.state();
            a.left = left;
            a.last_lease = last_lease;
            a.consumed = consumed;
        }
        cell
    }

    fn prefetch(left: u64, last_lease: u64, consumed: u64, max_lease: u64) -> bool {
        account(left, last_lease, consumed)
            .state()
            .wants_prefetch(max_lease)
    }

    #[test]
    fn a_renewal_starts_at_a_quarter_of_the_lease_or_sooner_when_the_ledger_is_slow() {
        // A fast ledger: a quarter of the last lease.
        assert!(!prefetch(201, 800, 0, 1_000));
        assert!(prefetch(200, 800, 0, 1_000));
        assert!(prefetch(200, 800, 90, 1_000));
        // The last call saw 150 taken while it ran: start with twice that left.
        assert!(prefetch(300, 800, 150, 1_000));
        assert!(!prefetch(301, 800, 150, 1_000));
        // Never with more than half of max_lease left, however slow the ledger.
        assert!(prefetch(500, 800, 5_000, 1_000));
        assert!(!prefetch(501, 800, 5_000, 1_000));
        // No lease yet, or an exhausted balance: nothing to renew.
        assert!(!prefetch(0, 0, 150, 1_000));
        let exhausted = account(0, 800, 150);
        exhausted.state().exhausted_at = Some(Instant::now());
        assert!(!exhausted.state().wants_prefetch(1_000));
    }

    /// A ledger whose lease calls wait for the test to answer them, so the test decides how many Checks run
    /// while one is in flight: the ledger's latency, counted in Checks.
    struct Gated {
        calls: tokio::sync::mpsc::UnboundedSender<(
            LeaseAnswer,
            tokio::sync::oneshot::Sender<LeaseAnswer>,
        )>,
    }

    fn unused() -> StoreError {
        StoreError::Corrupt("not used by this test".to_owned())
    }

    #[async_trait::async_trait]
    impl CreditLedger for Gated {
        async fn lease(&self, call: &LeaseCall<'_>) -> Result<LeaseAnswer, StoreError> {
            // A balance that never runs out: every call gets what it asks, up to its bound.
            let answer = LeaseAnswer {
                kept: call.keep,
                granted: call.need + call.max_extra,
                balance: 1 << 40,
                crossed_low: false,
                refilled: 0,
                conflicted: false,
            };
            let (reply, answered) = tokio::sync::oneshot::channel();
            self.calls.send((answer, reply)).map_err(|_| unused())?;
            answered.await.map_err(|_| unused())
        }

        async fn grant(
            &self,
            _: &crate::credits::ledger::GrantInput<'_>,
        ) -> Result<crate::credits::ledger::Granted, StoreError> {
            Err(unused())
        }

        async fn balance(
            &self,
            _: &str,
        ) -> Result<Option<crate::credits::ledger::Balance>, StoreError> {
            Ok(None)
        }

        async fn grants(
            &self,
            _: &str,
            _: u32,
        ) -> Result<Vec<crate::credits::ledger::GrantRecord>, StoreError> {
            Ok(Vec::new())
        }

        async fn balances(
            &self,
            _: Option<u64>,
            _: Option<&str>,
            _: u32,
        ) -> Result<Vec<crate::credits::ledger::Balance>, StoreError> {
            Ok(Vec::new())
        }

        async fn recover(
            &self,
            _: &str,
            _: Option<&std::collections::HashMap<String, u64>>,
            _: i64,
        ) -> Result<crate::credits::ledger::Settled, StoreError> {
            Ok(crate::credits::ledger::Settled::default())
        }

        async fn reap(&self, _: i64, _: i64) -> Result<u64, StoreError> {
            Ok(0)
        }
    }

    /// Lets the engine's spawned renewal run up to the ledger, or book the answer it was just given.
    async fn settle() {
        for _ in 0..8 {
            tokio::task::yield_now().await;
        }
    }

    #[tokio::test]
    async fn a_ledger_slower_than_a_quarter_lease_lasts_stalls_checks_once_not_every_lease()
    -> Result<(), Box<dyn std::error::Error>> {
        use std::future::Future;
        use std::task::{Context, Poll, Waker};

        // 300 Checks run while a ledger call is in flight; a quarter of a 1,000-credit lease lasts 250.
        const LATENCY: u64 = 300;
        let (calls, mut asked) = tokio::sync::mpsc::unbounded_channel();
        let options = CreditOptions::default();
        let max_lease = options.max_lease;
        let credits = Credits::start(
            Arc::new(Gated { calls }),
            "r1".to_owned(),
            options,
            CreditMetrics::new(&prometheus::Registry::new())?,
            None,
        );
        // The first Check waits for the first lease.
        let answer_first = async {
            let (answer, reply) = asked.recv().await.ok_or("no first lease call")?;
            reply.send(answer).map_err(|_| "first lease not awaited")?;
            Ok::<_, Box<dyn std::error::Error>>(())
        };
        let (first, answered) = tokio::join!(credits.take("acme", 1, None, 0), answer_first);
        answered?;
        match first? {
            Spend::Held(hold) => credits.commit(hold),
            Spend::Exhausted { .. } => return Err("the first Check was refused".into()),
        };

        type Reply = tokio::sync::oneshot::Sender<LeaseAnswer>;
        let mut in_flight: Option<(u64, (LeaseAnswer, Reply))> = None;
        let mut stalled = Vec::new();
        let mut per_call = Vec::new();
        for check in 0..20_000u64 {
            let mut take = std::pin::pin!(credits.take("acme", 1, None, 0));
            match take.as_mut().poll(&mut Context::from_waker(Waker::noop())) {
                Poll::Ready(Ok(Spend::Held(hold))) => {
                    credits.commit(hold);
                }
                Poll::Ready(other) => return Err(format!("Check {check}: {other:?}").into()),
                // It waits for the renewal in flight: the lease ran dry before the ledger answered. The
                // call lands now (the wait) and the Check is not counted.
                Poll::Pending => {
                    stalled.push(check);
                    let Some((_, (answer, reply))) = in_flight.take() else {
                        return Err(
                            format!("Check {check} waits with no ledger call in flight").into()
                        );
                    };
                    per_call.push(answer);
                    reply.send(answer).map_err(|_| "renewal not awaited")?;
                    settle().await;
                    continue;
                }
            }
            settle().await;
            match in_flight.take() {
                Some((since, (answer, reply))) if check - since >= LATENCY => {
                    per_call.push(answer);
                    reply.send(answer).map_err(|_| "renewal not awaited")?;
                    settle().await;
                }
                Some(call) => in_flight = Some(call),
                None => in_flight = asked.try_recv().ok().map(|call| (check, call)),
            }
        }
        // The first renewal starts at a quarter of the lease and lands late; the engine then starts the next
        // ones with twice what it saw spent during a call left (at most half a lease): none lands late.
        assert_eq!(
            stalled.len(),
            1,
            "Checks that waited for a renewal: {stalled:?}"
        );
        assert!(stalled[0] < 1_500, "{stalled:?}");
        // Each renewal still brings at least half a lease, and no lease exceeds max_lease.
        assert!(per_call.len() >= 30, "{} renewals", per_call.len());
        assert!(
            per_call
                .iter()
                .all(|a| (max_lease / 2..=max_lease).contains(&a.granted)),
            "{per_call:?}"
        );
        Ok(())
    }

    #[test]
    fn taking_counts_what_the_prefetch_rule_measures() {
        let cell = account(10, 10, 0);
        let mut a = cell.state();
        assert_eq!(a.take(3, None), Some(7));
        assert_eq!(a.take(8, None), None);
        assert_eq!((a.left, a.pending, a.taken), (7, 3, 3));
    }
}
