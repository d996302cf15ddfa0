//! The credit ledger on the state store's database (SQLite or PostgreSQL): portable statements only.
//!
//! Every write starts by upserting the owner's `credit_balances` row, which takes its row lock (PostgreSQL)
//! or the write lock (SQLite) until commit: an owner's lease calls and grants run one after another, so the
//! arithmetic done here between statements sees what it will write over.

use std::collections::HashMap;

use async_trait::async_trait;
use sqlx::any::AnyRow;
use sqlx::{Any, Row, Transaction};

use crate::credits::ledger::{
    Balance, CreditLedger, GrantInput, GrantRecord, Granted, LeaseAnswer, LeaseCall, Settled,
    extra_lease,
};
use crate::state::StoreError;
use crate::state::sql::SqlStore;

/// SQL BIGINT is signed and balances add amounts up: amounts past this are refused rather than wrapped.
const MAX_CREDITS: u64 = i64::MAX as u64 / 4;

/// The owner's row, locked for the rest of the transaction.
#[derive(Debug, Clone, Copy)]
struct Account {
    granted: i64,
    spent: i64,
    reserved: i64,
    low: bool,
    updated_at: i64,
}

impl Account {
    fn free(&self) -> i64 {
        self.granted - self.spent - self.reserved
    }

    /// Granted and not reported spent: what "low" and refills look at, so a lease taken and returned moves
    /// neither.
    fn unspent(&self) -> i64 {
        self.granted - self.spent
    }

    /// Sets the low flag for `threshold`; true when this write takes the account below it.
    fn mark_low(&mut self, threshold: u64) -> bool {
        let low = (self.unspent().max(0) as u64) < threshold;
        let crossed = low && !self.low;
        self.low = low;
        crossed
    }

    /// The account as the API shows it.
    fn balance(&self, owner: &str) -> Balance {
        Balance {
            owner: owner.to_owned(),
            balance: self.free(),
            granted: self.granted,
            spent: self.spent,
            reserved: self.reserved,
            updated_at: self.updated_at,
        }
    }
}

async fn lock_account(
    tx: &mut Transaction<'_, Any>,
    owner: &str,
    now: i64,
) -> Result<Account, StoreError> {
    let row = sqlx::query(
        "INSERT INTO credit_balances (owner, granted, spent, reserved, low, updated_at) \
         VALUES ($1, 0, 0, 0, 0, $2) ON CONFLICT (owner) DO UPDATE SET owner = excluded.owner \
         RETURNING granted, spent, reserved, low, updated_at",
    )
    .bind(owner)
    .bind(now)
    .fetch_one(&mut **tx)
    .await?;
    Ok(Account {
        granted: row.try_get("granted")?,
        spent: row.try_get("spent")?,
        reserved: row.try_get("reserved")?,
        low: row.try_get::<i64, _>("low")? != 0,
        updated_at: row.try_get("updated_at")?,
    })
}

async fn store_account(
    tx: &mut Transaction<'_, Any>,
    owner: &str,
    a: &Account,
    now: i64,
) -> Result<(), StoreError> {
    sqlx::query(
        "UPDATE credit_balances SET granted = $1, spent = $2, reserved = $3, low = $4, updated_at = $5 \
         WHERE owner = $6",
    )
    .bind(a.granted)
    .bind(a.spent)
    .bind(a.reserved)
    .bind(i64::from(a.low))
    .bind(now)
    .bind(owner)
    .execute(&mut **tx)
    .await?;
    Ok(())
}

/// The amount granted from `source` before, to whichever owner.
async fn seen(tx: &mut Transaction<'_, Any>, source: &str) -> Result<Option<i64>, StoreError> {
    let amount: Option<i64> =
        sqlx::query_scalar("SELECT amount FROM credit_grants WHERE source = $1")
            .bind(source)
            .fetch_optional(&mut **tx)
            .await?;
    Ok(amount)
}

/// Appends a grant row (the caller checked [`seen`] under the owner's lock).
async fn insert_grant(
    tx: &mut Transaction<'_, Any>,
    owner: &str,
    amount: i64,
    reason: &str,
    source: &str,
    now: i64,
) -> Result<(), StoreError> {
    let id: i64 = sqlx::query_scalar(
        "UPDATE credit_sequence SET seq = seq + 1 WHERE singleton = 1 RETURNING seq",
    )
    .fetch_one(&mut **tx)
    .await?;
    sqlx::query(
        "INSERT INTO credit_grants (id, owner, amount, reason, source, created_at) \
         VALUES ($1, $2, $3, $4, $5, $6)",
    )
    .bind(id)
    .bind(owner)
    .bind(amount)
    .bind(reason)
    .bind(source)
    .bind(now)
    .execute(&mut **tx)
    .await?;
    Ok(())
}

fn credits(n: u64, what: &str) -> Result<i64, StoreError> {
    if n > MAX_CREDITS {
        return Err(StoreError::Corrupt(format!(
            "{what} of {n} credits is beyond what the ledger keeps"
        )));
    }
    Ok(n as i64)
}

fn balance_row(row: &AnyRow) -> Result<Balance, StoreError> {
    let granted: i64 = row.try_get("granted")?;
    let spent: i64 = row.try_get("spent")?;
    let reserved: i64 = row.try_get("reserved")?;
    Ok(Balance {
        owner: row.try_get("owner")?,
        balance: granted - spent - reserved,
        granted,
        spent,
        reserved,
        updated_at: row.try_get("updated_at")?,
    })
}

/// What a grant call decided under the owner's lock.
enum Outcome {
    New,
    Duplicate,
    Reused,
    Insufficient,
}

const BALANCE_COLUMNS: &str =
    "SELECT owner, granted, spent, reserved, updated_at FROM credit_balances";

#[async_trait]
impl CreditLedger for SqlStore {
    async fn lease(&self, call: &LeaseCall<'_>) -> Result<LeaseAnswer, StoreError> {
        let served_total = credits(call.served_total, "a served total")?;
        let keep = credits(call.keep, "a kept lease")?;
        let need = credits(call.need, "a lease")?;
        let mut tx = self.pool().begin().await?;
        let mut account = lock_account(&mut tx, call.owner, call.now).await?;
        let row = sqlx::query(
            "SELECT held, reported FROM credit_leases WHERE owner = $1 AND replica = $2",
        )
        .bind(call.owner)
        .bind(call.replica)
        .fetch_optional(&mut *tx)
        .await?;
        let (mut held, mut reported) = match &row {
            Some(row) => (
                row.try_get::<i64, _>("held")?,
                row.try_get::<i64, _>("reported")?,
            ),
            None => (0, 0),
        };
        // Served credits move from the lease to `spent`; a replica cannot have served more than it held.
        let reported_now = (served_total - reported).max(0);
        let served = reported_now.min(held);
        account.spent += served;
        account.reserved -= served;
        held -= served;
        reported = reported.max(served_total);
        // Whatever the replica no longer claims goes back to the balance (a lease it gave up, or one granted
        // by a call whose answer it never saw).
        let kept = keep.min(held);
        account.reserved -= held - kept;
        held = kept;
        // The replica claims more than the ledger holds for it: another process with its id settled or reaped
        // its lease (a copied metering.dir), and what it served beyond that is not counted.
        let conflicted = reported_now > served || keep > kept;

        let mut refilled = 0;
        if let Some(refill) = &call.refill {
            let target = credits(refill.amount, "a refill")?;
            // Leases of other replicas count as unspent: what they do not serve comes back.
            let add = (target - account.unspent()).max(0);
            let source = format!(
                "refill:{}:{}:{}",
                call.owner, refill.product, refill.period_start
            );
            let reason = format!("refill of product {} to {target}", refill.product);
            if seen(&mut tx, &source).await?.is_none() {
                insert_grant(&mut tx, call.owner, add, &reason, &source, call.now).await?;
                account.granted += add;
                refilled = add as u64;
            }
        }

        let free = account.free().max(0) as u64;
        let granted = if free >= call.need {
            need as u64 + extra_lease(free, call.need, call.max_extra)
        } else {
            0
        };
        let granted_i = granted as i64;
        held += granted_i;
        account.reserved += granted_i;
        let balance = account.free().max(0) as u64;
        let crossed_low = account.mark_low(call.low_balance);
        store_account(&mut tx, call.owner, &account, call.now).await?;
        sqlx::query(
            "INSERT INTO credit_leases (owner, replica, held, reported, updated_at) VALUES ($1, $2, $3, $4, $5) \
             ON CONFLICT (owner, replica) DO UPDATE SET held = excluded.held, reported = excluded.reported, \
             updated_at = excluded.updated_at",
        )
        .bind(call.owner)
        .bind(call.replica)
        .bind(held)
        .bind(reported)
        .bind(call.now)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(LeaseAnswer {
            kept: kept as u64,
            granted,
            balance,
            crossed_low,
            refilled,
            conflicted,
        })
    }

    async fn grant(&self, grant: &GrantInput<'_>) -> Result<Granted, StoreError> {
        let mut tx = self.pool().begin().await?;
        let mut account = lock_account(&mut tx, grant.owner, grant.now).await?;
        let outcome = if let Some(amount) = seen(&mut tx, grant.source).await? {
            if amount == grant.amount {
                Outcome::Duplicate
            } else {
                Outcome::Reused
            }
        } else if grant.amount < 0 && account.free() + grant.amount < 0 {
            Outcome::Insufficient
        } else {
            insert_grant(
                &mut tx,
                grant.owner,
                grant.amount,
                grant.reason,
                grant.source,
                grant.now,
            )
            .await?;
            account.granted += grant.amount;
            account.mark_low(grant.low_balance);
            store_account(&mut tx, grant.owner, &account, grant.now).await?;
            Outcome::New
        };
        let balance = match outcome {
            // The account as this transaction left it, not a later read that other writes may have moved.
            Outcome::New => {
                account.updated_at = grant.now;
                tx.commit().await?;
                account.balance(grant.owner)
            }
            // Nothing to keep, not even the account row the lock created for an owner never seen; the
            // answer is the balance as it is.
            Outcome::Duplicate | Outcome::Reused | Outcome::Insufficient => {
                tx.rollback().await?;
                self.balance(grant.owner).await?.unwrap_or(Balance {
                    owner: grant.owner.to_owned(),
                    balance: 0,
                    granted: 0,
                    spent: 0,
                    reserved: 0,
                    updated_at: 0,
                })
            }
        };
        Ok(match outcome {
            Outcome::New => Granted::New(balance),
            Outcome::Duplicate => Granted::Duplicate(balance),
            Outcome::Reused => Granted::Reused(balance),
            Outcome::Insufficient => Granted::Insufficient(balance),
        })
    }

    async fn balance(&self, owner: &str) -> Result<Option<Balance>, StoreError> {
        let row = sqlx::query(&format!("{BALANCE_COLUMNS} WHERE owner = $1"))
            .bind(owner)
            .fetch_optional(self.pool())
            .await?;
        row.as_ref().map(balance_row).transpose()
    }

    async fn grants(&self, owner: &str, limit: u32) -> Result<Vec<GrantRecord>, StoreError> {
        let rows = sqlx::query(
            "SELECT id, amount, reason, source, created_at FROM credit_grants \
             WHERE owner = $1 ORDER BY id DESC LIMIT $2",
        )
        .bind(owner)
        .bind(i64::from(limit))
        .fetch_all(self.pool())
        .await?;
        rows.iter()
            .map(|row| {
                Ok(GrantRecord {
                    id: row.try_get("id")?,
                    amount: row.try_get("amount")?,
                    reason: row.try_get("reason")?,
                    source: row.try_get("source")?,
                    created_at: row.try_get("created_at")?,
                })
            })
            .collect()
    }

    async fn balances(
        &self,
        below: Option<u64>,
        after: Option<&str>,
        limit: u32,
    ) -> Result<Vec<Balance>, StoreError> {
        let below = match below {
            Some(b) => credits(b, "a threshold")?,
            None => i64::MAX,
        };
        let rows = sqlx::query(&format!(
            "{BALANCE_COLUMNS} WHERE owner > $1 AND granted - spent < $2 \
             ORDER BY owner LIMIT $3"
        ))
        .bind(after.unwrap_or(""))
        .bind(below)
        .bind(i64::from(limit))
        .fetch_all(self.pool())
        .await?;
        rows.iter().map(balance_row).collect()
    }

    async fn recover(
        &self,
        replica: &str,
        served: Option<&HashMap<String, u64>>,
        now: i64,
    ) -> Result<Settled, StoreError> {
        let mut tx = self.pool().begin().await?;
        // A write first (an SQLite transaction that reads before it writes cannot wait for the write lock);
        // on PostgreSQL it also makes recovering replicas take turns.
        sqlx::query("UPDATE credit_sequence SET seq = seq WHERE singleton = 1")
            .execute(&mut *tx)
            .await?;
        let leases = lease_rows(
            &mut tx,
            "SELECT owner, held, reported FROM credit_leases WHERE replica = $1",
            replica,
        )
        .await?;
        let mut settled = Settled::default();
        for (owner, held, reported) in &leases {
            // A journal names every owner this life leased for (the slot is written before the first lease):
            // an owner it does not name, or no trusted journal at all, may have served anything it held.
            let total = served.and_then(|journal| journal.get(owner));
            let spent = match total {
                Some(&total) => {
                    let total = i64::try_from(total).unwrap_or(i64::MAX);
                    let spent = (total - reported).clamp(0, *held);
                    settled.served += spent as u64;
                    settled.returned += (held - spent) as u64;
                    spent
                }
                None => {
                    settled.kept += *held as u64;
                    *held
                }
            };
            settle(&mut tx, owner, *held, spent, now).await?;
        }
        sqlx::query("DELETE FROM credit_leases WHERE replica = $1")
            .bind(replica)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(settled)
    }

    async fn reap(&self, idle_before: i64, now: i64) -> Result<u64, StoreError> {
        let mut tx = self.pool().begin().await?;
        sqlx::query("UPDATE credit_sequence SET seq = seq WHERE singleton = 1")
            .execute(&mut *tx)
            .await?;
        let rows = sqlx::query(
            "SELECT owner, replica, held FROM credit_leases WHERE held > 0 AND updated_at < $1 \
             ORDER BY owner, replica LIMIT 100",
        )
        .bind(idle_before)
        .fetch_all(&mut *tx)
        .await?;
        let mut kept = 0u64;
        for row in &rows {
            let owner: String = row.try_get("owner")?;
            let replica: String = row.try_get("replica")?;
            let held: i64 = row.try_get("held")?;
            settle(&mut tx, &owner, held, held, now).await?;
            // The row stays (its `reported` total still counts for a replica that comes back); only its
            // credits are settled.
            sqlx::query(
                "UPDATE credit_leases SET held = 0, updated_at = $1 WHERE owner = $2 AND replica = $3",
            )
            .bind(now)
            .bind(&owner)
            .bind(&replica)
            .execute(&mut *tx)
            .await?;
            kept = kept.saturating_add(held as u64);
        }
        tx.commit().await?;
        Ok(kept)
    }
}

/// A dead life's lease of `held` for `owner`: `spent` of it is spent, the rest back in the balance.
async fn settle(
    tx: &mut Transaction<'_, Any>,
    owner: &str,
    held: i64,
    spent: i64,
    now: i64,
) -> Result<(), StoreError> {
    if held <= 0 {
        return Ok(());
    }
    let mut account = lock_account(tx, owner, now).await?;
    account.spent += spent;
    account.reserved -= held;
    store_account(tx, owner, &account, now).await
}

/// `(owner, held, reported)` of the lease rows `query` selects for `replica`, in owner order: writes that lock
/// several owners lock them in that order, so two of them never wait on each other.
async fn lease_rows(
    tx: &mut Transaction<'_, Any>,
    query: &str,
    replica: &str,
) -> Result<Vec<(String, i64, i64)>, StoreError> {
    let rows = sqlx::query(query)
        .bind(replica)
        .fetch_all(&mut **tx)
        .await?;
    let mut leases = rows
        .iter()
        .map(|row| -> Result<(String, i64, i64), StoreError> {
            Ok((
                row.try_get("owner")?,
                row.try_get("held")?,
                row.try_get("reported")?,
            ))
        })
        .collect::<Result<Vec<_>, _>>()?;
    leases.sort_unstable();
    Ok(leases)
}
