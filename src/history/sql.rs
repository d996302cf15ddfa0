//! The rollup store on the state store's database (SQLite or PostgreSQL): portable statements only.

use async_trait::async_trait;
use sqlx::Row;

use crate::history::store::{Batch, Counts, Dims, HistoryStore, Rollup, Subject};
use crate::state::StoreError;
use crate::state::sql::SqlStore;

fn signed(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

fn unsigned(row: &sqlx::any::AnyRow, column: &str) -> Result<u64, StoreError> {
    let n: i64 = row.try_get(column)?;
    u64::try_from(n).map_err(|_| StoreError::Corrupt(format!("usage rollup {column} is {n}")))
}

/// A row of `usage_rollups` columns, its hour (or bucket) read from `hour`.
fn rollup(row: &sqlx::any::AnyRow, hour: &str) -> Result<Rollup, StoreError> {
    Ok(Rollup {
        hour: row.try_get(hour)?,
        dims: Dims {
            customer: row.try_get("customer")?,
            app: row.try_get("app")?,
            product: row.try_get("product")?,
            meter: row.try_get("meter")?,
        },
        counts: Counts {
            allowed: unsigned(row, "allowed")?,
            denied: unsigned(row, "denied")?,
            billable: unsigned(row, "billable")?,
            value: unsigned(row, "value")?,
        },
    })
}

#[async_trait]
impl HistoryStore for SqlStore {
    async fn add(&self, batch: &Batch, now: i64) -> Result<bool, StoreError> {
        let mut tx = self.pool().begin().await?;
        // The batch mark first: it is the write that decides, and on SQLite it takes the write lock at once.
        let marked = sqlx::query(
            "INSERT INTO usage_rollup_batches (id, added_at) VALUES ($1, $2) ON CONFLICT (id) DO NOTHING",
        )
        .bind(&batch.id)
        .bind(now)
        .execute(&mut *tx)
        .await?;
        if marked.rows_affected() == 0 {
            tx.rollback().await?;
            return Ok(false);
        }
        for row in &batch.rows {
            let c = &row.counts;
            sqlx::query(
                "INSERT INTO usage_rollups (hour, customer, app, product, meter, allowed, denied, billable, value) \
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9) \
                 ON CONFLICT (hour, customer, app, product, meter) DO UPDATE SET \
                 allowed = usage_rollups.allowed + excluded.allowed, denied = usage_rollups.denied + excluded.denied, \
                 billable = usage_rollups.billable + excluded.billable, value = usage_rollups.value + excluded.value",
            )
            .bind(row.hour)
            .bind(&row.dims.customer)
            .bind(&row.dims.app)
            .bind(&row.dims.product)
            .bind(&row.dims.meter)
            .bind(signed(c.allowed))
            .bind(signed(c.denied))
            .bind(signed(c.billable))
            .bind(signed(c.value))
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        Ok(true)
    }

    async fn hours(
        &self,
        subject: &Subject,
        from: i64,
        to: i64,
    ) -> Result<Vec<Rollup>, StoreError> {
        let (column, value) = match subject {
            Subject::Customer(c) => ("customer", c),
            Subject::App(a) => ("app", a),
        };
        let rows = sqlx::query(&format!(
            "SELECT hour, customer, app, product, meter, allowed, denied, billable, value FROM usage_rollups \
             WHERE {column} = $1 AND hour >= $2 AND hour < $3 ORDER BY hour, app, product, meter, customer"
        ))
        .bind(value)
        .bind(from)
        .bind(to)
        .fetch_all(self.pool())
        .await?;
        rows.iter().map(|row| rollup(row, "hour")).collect()
    }

    async fn sums(
        &self,
        subject: &Subject,
        from: i64,
        to: i64,
        origin: i64,
        span: i64,
    ) -> Result<Vec<Rollup>, StoreError> {
        let (column, value) = match subject {
            Subject::Customer(c) => ("customer", c),
            Subject::App(a) => ("app", a),
        };
        // PostgreSQL sums BIGINT into NUMERIC, which the Any driver does not read: cast back.
        let rows = sqlx::query(&format!(
            "SELECT $4 + (hour - $4) / $5 * $5 AS bucket, customer, app, product, meter, \
             CAST(SUM(allowed) AS BIGINT) AS allowed, CAST(SUM(denied) AS BIGINT) AS denied, \
             CAST(SUM(billable) AS BIGINT) AS billable, CAST(SUM(value) AS BIGINT) AS value \
             FROM usage_rollups WHERE {column} = $1 AND hour >= $2 AND hour < $3 \
             GROUP BY bucket, customer, app, product, meter"
        ))
        .bind(value)
        .bind(from)
        .bind(to)
        .bind(origin)
        .bind(span.max(1))
        .fetch_all(self.pool())
        .await?;
        rows.iter().map(|row| rollup(row, "bucket")).collect()
    }

    async fn prune(&self, hours_before: i64, batches_before: i64) -> Result<(), StoreError> {
        sqlx::query("DELETE FROM usage_rollups WHERE hour < $1")
            .bind(hours_before)
            .execute(self.pool())
            .await?;
        sqlx::query("DELETE FROM usage_rollup_batches WHERE added_at < $1")
            .bind(batches_before)
            .execute(self.pool())
            .await?;
        Ok(())
    }
}
