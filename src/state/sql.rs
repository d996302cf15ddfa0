//! The state store on SQL: SQLite (embedded, one replica) or PostgreSQL (shared by replicas), through one
//! sqlx `Any` pool and one set of portable statements and migrations (`migrations/`).

use std::str::FromStr;
use std::time::Duration;

use async_trait::async_trait;
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use sqlx::any::{AnyConnectOptions, AnyPoolOptions, AnyRow};
use sqlx::migrate::Migrator;
use sqlx::{Any, AnyPool, Row, Transaction};
use tokio_stream::StreamExt;

use crate::catalog::{Status, SubscriptionStatus};
use crate::identity::api_key::KeyHash;
use crate::paywall::model::{self as paid, Observation, PaidSubscription, StripeEvent};
use crate::state::model::{
    AppInput, AppRecord, Attributes, AuditRecord, Changed, Changes, Claim, DeveloperInput,
    DeveloperRecord, Image, KeyRecord, NewKey, Page, Remembered, StoredKey, SubscriptionRecord,
    Write, Written,
};
use crate::state::store::{Actor, StateStore, StoreError};

/// The schema, embedded in the binary: `tollgate state migrate` and `serve` apply what is missing.
static MIGRATOR: Migrator = sqlx::migrate!("./migrations");

/// The PostgreSQL channel every write notifies (with its sequence number) at commit.
pub const CHANNEL: &str = "tollgate_state";

/// How long a call waits for a pooled connection: past it the store counts as down (503).
const ACQUIRE_TIMEOUT: Duration = Duration::from_secs(3);
/// How long a replica's claim on a pending Stripe event holds before another replica may take it.
const CLAIM_SECS: i64 = 60;
/// How long SQLite waits for another connection's write lock.
const SQLITE_BUSY_MS: u32 = 5_000;

/// Which database a URL names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// An SQLite file.
    Sqlite,
    /// A PostgreSQL server.
    Postgres,
}

impl Backend {
    /// The backend a `state.url` names, if any.
    pub fn of(url: &str) -> Option<Backend> {
        if url.starts_with("sqlite:") {
            Some(Backend::Sqlite)
        } else if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            Some(Backend::Postgres)
        } else {
            None
        }
    }
}

/// A state store on SQLite or PostgreSQL.
#[derive(Clone)]
pub struct SqlStore {
    pool: AnyPool,
    backend: Backend,
    url: String,
}

impl SqlStore {
    /// Opens a pool on `url` (an SQLite file is created when missing). Connections are made lazily: a
    /// database that is down at start is retried by each call.
    pub fn open(url: &str) -> Result<SqlStore, StoreError> {
        sqlx::any::install_default_drivers();
        let backend = Backend::of(url).ok_or_else(|| {
            StoreError::Corrupt("state.url must start with sqlite: or postgres://".to_owned())
        })?;
        let url = match backend {
            Backend::Sqlite if !url.contains('?') => format!("{url}?mode=rwc"),
            _ => url.to_owned(),
        };
        let options = AnyConnectOptions::from_str(&url)?;
        let pool = AnyPoolOptions::new()
            .max_connections(match backend {
                Backend::Sqlite => 4,
                Backend::Postgres => 8,
            })
            .acquire_timeout(ACQUIRE_TIMEOUT)
            .after_connect(move |conn, _| {
                Box::pin(async move {
                    if backend == Backend::Sqlite {
                        // WAL lets readers run beside the writer; FULL sync makes a key shown to a caller
                        // survive a power cut; foreign keys are off by default in SQLite.
                        for pragma in [
                            "PRAGMA journal_mode = WAL".to_owned(),
                            "PRAGMA synchronous = FULL".to_owned(),
                            "PRAGMA foreign_keys = ON".to_owned(),
                            format!("PRAGMA busy_timeout = {SQLITE_BUSY_MS}"),
                        ] {
                            sqlx::query(&pragma).execute(&mut *conn).await?;
                        }
                    }
                    Ok(())
                })
            })
            .connect_lazy_with(options);
        Ok(SqlStore { pool, backend, url })
    }

    /// Creates or upgrades the schema (PostgreSQL serializes concurrent runs with an advisory lock).
    pub async fn migrate(&self) -> Result<(), StoreError> {
        MIGRATOR.run(&self.pool).await?;
        Ok(())
    }

    /// The URL the pool connects to (with its password: not for logs, see [`redacted`]).
    pub fn url(&self) -> &str {
        &self.url
    }

    /// The connection pool, for the other ledgers kept in the same database (credits).
    pub(crate) fn pool(&self) -> &AnyPool {
        &self.pool
    }

    /// Which database this is.
    pub fn backend(&self) -> Backend {
        self.backend
    }

    /// Closes the pool's connections.
    pub async fn close(&self) {
        self.pool.close().await;
    }
}

#[async_trait]
impl StateStore for SqlStore {
    async fn write(&self, write: &Write, actor: &Actor, now: i64) -> Result<Written, StoreError> {
        let mut tx = self.pool.begin().await?;
        let seq: i64 = sqlx::query_scalar(
            "UPDATE state_sequence SET seq = seq + 1 WHERE singleton = 1 RETURNING seq",
        )
        .fetch_one(&mut *tx)
        .await?;
        let mut w = Tx {
            tx: &mut tx,
            seq,
            now,
        };
        let written = match write {
            Write::PutDeveloper(d) => w.put_developer(d).await,
            Write::DeleteDeveloper { email } => w.delete_developer(email).await,
            Write::PutApp(a) => w.put_app(a).await,
            Write::DeleteApp { name } => w.delete_app(name).await,
            Write::SetSubscription {
                app,
                product,
                status,
            } => w.set_subscription(app, product, *status).await,
            Write::CreateKey { app, key } => w.create_key(app, key).await,
            Write::RotateKey {
                app,
                old,
                old_expires_at,
                key,
            } => w.rotate_key(app, old, *old_expires_at, key).await,
            Write::RevokeKey { app, id } => w.revoke_key(app, id).await,
            Write::Observe {
                customer,
                observation,
                source,
                event,
            } => {
                w.observe(customer, observation, source, event.as_deref())
                    .await
            }
        }
        .map_err(unique_is_conflict)?;
        // An observation that changed nothing (stale, or confirming what is stored) is no management change:
        // no audit row, nothing for replicas to read. Its sequence number stays unused.
        if written == Written::Paid(None) {
            tx.commit().await?;
            return Ok(written);
        }
        sqlx::query(
            "INSERT INTO audit (seq, at, actor, action, target) VALUES ($1, $2, $3, $4, $5)",
        )
        .bind(seq)
        .bind(now)
        .bind(&actor.0)
        .bind(write.action())
        .bind(write.target())
        .execute(&mut *tx)
        .await?;
        if self.backend == Backend::Postgres {
            sqlx::query("SELECT pg_notify($1, $2)")
                .bind(CHANNEL)
                .bind(seq.to_string())
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await?;
        Ok(written)
    }

    async fn developer(&self, email: &str) -> Result<Option<DeveloperRecord>, StoreError> {
        let row = sqlx::query(&format!("{DEVELOPER_COLUMNS} WHERE email = $1"))
            .bind(email)
            .fetch_optional(&self.pool)
            .await?;
        row.as_ref().map(developer_row).transpose()
    }

    async fn developers(&self, page: &Page) -> Result<Vec<DeveloperRecord>, StoreError> {
        let rows = sqlx::query(&format!(
            "{DEVELOPER_COLUMNS} WHERE email > $1 ORDER BY email LIMIT $2"
        ))
        .bind(page.after.as_deref().unwrap_or(""))
        .bind(i64::from(page.limit))
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(developer_row).collect()
    }

    async fn app(&self, name: &str) -> Result<Option<(AppRecord, Vec<KeyRecord>)>, StoreError> {
        let mut conn = self.pool.acquire().await?;
        let Some(row) = sqlx::query(&format!("{APP_COLUMNS} WHERE a.name = $1"))
            .bind(name)
            .fetch_optional(&mut *conn)
            .await?
        else {
            return Ok(None);
        };
        let mut app = app_row(&row)?;
        app.products = subscriptions(&mut conn, app.id).await?;
        let keys = sqlx::query(
            "SELECT id, app_id, hash, prefix, name, status, created_at, expires_at FROM api_keys \
             WHERE app_id = $1 ORDER BY created_at, id",
        )
        .bind(app.id)
        .fetch_all(&mut *conn)
        .await?
        .iter()
        .map(key_row)
        .collect::<Result<Vec<_>, _>>()?;
        Ok(Some((app, keys)))
    }

    async fn apps(
        &self,
        developer: Option<&str>,
        page: &Page,
    ) -> Result<Vec<AppRecord>, StoreError> {
        let mut conn = self.pool.acquire().await?;
        let after = page.after.as_deref().unwrap_or("");
        let limit = i64::from(page.limit);
        let rows = match developer {
            Some(email) => {
                sqlx::query(&format!(
                    "{APP_COLUMNS} WHERE d.email = $1 AND a.name > $2 ORDER BY a.name LIMIT $3"
                ))
                .bind(email)
                .bind(after)
                .bind(limit)
                .fetch_all(&mut *conn)
                .await?
            }
            None => {
                sqlx::query(&format!(
                    "{APP_COLUMNS} WHERE a.name > $1 ORDER BY a.name LIMIT $2"
                ))
                .bind(after)
                .bind(limit)
                .fetch_all(&mut *conn)
                .await?
            }
        };
        let mut apps = Vec::with_capacity(rows.len());
        for row in &rows {
            let mut app = app_row(row)?;
            app.products = subscriptions(&mut conn, app.id).await?;
            apps.push(app);
        }
        Ok(apps)
    }

    async fn audit(&self, after: i64, limit: u32) -> Result<Vec<AuditRecord>, StoreError> {
        let rows = sqlx::query(
            "SELECT seq, at, actor, action, target FROM audit WHERE seq > $1 ORDER BY seq LIMIT $2",
        )
        .bind(after)
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|row| {
                Ok(AuditRecord {
                    seq: row.try_get("seq")?,
                    at: rfc3339(row.try_get("at")?),
                    actor: row.try_get("actor")?,
                    action: row.try_get("action")?,
                    target: row.try_get("target")?,
                })
            })
            .collect()
    }

    async fn changes(&self, after: i64, limit: u32) -> Result<Changes, StoreError> {
        let mut conn = self.pool.acquire().await?;
        let row = sqlx::query("SELECT seq, pruned_through FROM state_sequence WHERE singleton = 1")
            .fetch_one(&mut *conn)
            .await?;
        let (seq, pruned): (i64, i64) = (row.try_get("seq")?, row.try_get("pruned_through")?);
        if after < pruned {
            return Ok(Changes::TooOld);
        }
        // Writes commit in sequence order, so every change up to `seq` is visible now.
        let through = seq.min(after.saturating_add(i64::from(limit.max(1))));
        let rows = sqlx::query(
            "SELECT kind, name FROM changes WHERE seq > $1 AND seq <= $2 ORDER BY seq, kind, name",
        )
        .bind(after)
        .bind(through)
        .fetch_all(&mut *conn)
        .await?;
        let mut seen = std::collections::HashSet::new();
        let mut changed = Vec::new();
        for row in &rows {
            let kind: String = row.try_get("kind")?;
            let name: String = row.try_get("name")?;
            if !seen.insert((kind.clone(), name.clone())) {
                continue;
            }
            changed.push(match kind.as_str() {
                "developer" => {
                    let now = sqlx::query(&format!("{DEVELOPER_COLUMNS} WHERE email = $1"))
                        .bind(&name)
                        .fetch_optional(&mut *conn)
                        .await?;
                    Changed::Developer {
                        email: name,
                        now: now.as_ref().map(developer_row).transpose()?,
                    }
                }
                "app" => {
                    let now = sqlx::query(&format!("{APP_COLUMNS} WHERE a.name = $1"))
                        .bind(&name)
                        .fetch_optional(&mut *conn)
                        .await?;
                    let now = match now.as_ref().map(app_row).transpose()? {
                        Some(mut app) => {
                            app.products = subscriptions(&mut conn, app.id).await?;
                            Some(app)
                        }
                        None => None,
                    };
                    Changed::App { name, now }
                }
                "key" => {
                    let hash = KeyHash::parse(&name)
                        .map_err(|e| StoreError::Corrupt(format!("changes row {name:?}: {e}")))?;
                    let now = sqlx::query(&format!("{STORED_KEY_COLUMNS} WHERE hash = $1"))
                        .bind(&name)
                        .fetch_optional(&mut *conn)
                        .await?;
                    Changed::Key {
                        hash,
                        now: now.as_ref().map(stored_key_row).transpose()?,
                    }
                }
                "customer" => {
                    let now = customer_subscriptions(&mut conn, &name).await?;
                    Changed::Customer { id: name, now }
                }
                other => return Err(StoreError::Corrupt(format!("change kind {other:?}"))),
            });
        }
        Ok(Changes::Since { changed, through })
    }

    async fn load(&self) -> Result<Image, StoreError> {
        let mut conn = self.pool.acquire().await?;
        // Read first: whatever commits while the tables are read has a later number and comes again
        // through the change feed, which applies current state.
        let seq: i64 = sqlx::query_scalar("SELECT seq FROM state_sequence WHERE singleton = 1")
            .fetch_one(&mut *conn)
            .await?;
        let developers = sqlx::query(DEVELOPER_COLUMNS)
            .fetch_all(&mut *conn)
            .await?
            .iter()
            .map(developer_row)
            .collect::<Result<Vec<_>, _>>()?;
        let mut apps = sqlx::query(&format!("{APP_COLUMNS} ORDER BY a.id"))
            .fetch_all(&mut *conn)
            .await?
            .iter()
            .map(app_row)
            .collect::<Result<Vec<_>, _>>()?;
        let mut by_id: std::collections::HashMap<i64, usize> =
            apps.iter().enumerate().map(|(i, a)| (a.id, i)).collect();
        {
            let mut rows = sqlx::query(
                "SELECT app_id, product, status FROM app_products ORDER BY app_id, position",
            )
            .fetch(&mut *conn);
            while let Some(row) = rows.next().await {
                let row = row?;
                let app_id: i64 = row.try_get("app_id")?;
                if let Some(&i) = by_id.get(&app_id) {
                    apps[i].products.push(subscription_row(&row)?);
                }
            }
        }
        by_id.clear();
        let mut keys = Vec::new();
        {
            let mut rows = sqlx::query(STORED_KEY_COLUMNS).fetch(&mut *conn);
            while let Some(row) = rows.next().await {
                keys.push(stored_key_row(&row?)?);
            }
        }
        let paid = sqlx::query(PAID_COLUMNS)
            .fetch_all(&mut *conn)
            .await?
            .iter()
            .map(paid_row)
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Image {
            seq,
            developers,
            apps,
            keys,
            paid,
        })
    }

    async fn prune(&self, changes_before: i64, answers_before: i64) -> Result<(), StoreError> {
        let mut tx = self.pool.begin().await?;
        let newest: Option<i64> = sqlx::query_scalar("SELECT MAX(seq) FROM changes WHERE at < $1")
            .bind(changes_before)
            .fetch_one(&mut *tx)
            .await?;
        if let Some(newest) = newest {
            sqlx::query("DELETE FROM changes WHERE seq <= $1")
                .bind(newest)
                .execute(&mut *tx)
                .await?;
            sqlx::query(
                "UPDATE state_sequence SET pruned_through = $1 WHERE singleton = 1 AND pruned_through < $1",
            )
            .bind(newest)
            .execute(&mut *tx)
            .await?;
        }
        sqlx::query("DELETE FROM idempotency WHERE created_at < $1")
            .bind(answers_before)
            .execute(&mut *tx)
            .await?;
        sqlx::query("DELETE FROM stripe_events WHERE received_at < $1 AND applied_at IS NOT NULL")
            .bind(changes_before)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(())
    }

    async fn record_event(&self, event: &StripeEvent, now: i64) -> Result<bool, StoreError> {
        let json = serde_json::to_string(event)
            .map_err(|e| StoreError::Corrupt(format!("event {}: {e}", event.id)))?;
        let inserted = sqlx::query(
            "INSERT INTO stripe_events (id, kind, customer, event, received_at) VALUES ($1, $2, $3, $4, $5) \
             ON CONFLICT (id) DO NOTHING",
        )
        .bind(&event.id)
        .bind(&event.kind)
        .bind(&event.customer)
        .bind(json)
        .bind(now)
        .execute(&self.pool)
        .await?;
        Ok(inserted.rows_affected() == 1)
    }

    async fn claim_events(
        &self,
        now: i64,
        received_before: i64,
        limit: u32,
    ) -> Result<Vec<StripeEvent>, StoreError> {
        let rows = sqlx::query(
            "UPDATE stripe_events SET claimed_at = $1 WHERE id IN (SELECT id FROM stripe_events \
             WHERE applied_at IS NULL AND received_at < $2 AND (claimed_at IS NULL OR claimed_at <= $3) \
             ORDER BY received_at, id LIMIT $4) RETURNING id, received_at, event",
        )
        .bind(now)
        .bind(received_before)
        .bind(now.saturating_sub(CLAIM_SECS))
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await?;
        let mut events = Vec::with_capacity(rows.len());
        for row in &rows {
            let id: String = row.try_get("id")?;
            let received: i64 = row.try_get("received_at")?;
            let text: String = row.try_get("event")?;
            // One row this version cannot read must not hold back the others.
            match serde_json::from_str::<StripeEvent>(&text) {
                Ok(event) => events.push((received, event)),
                Err(e) => {
                    tracing::warn!(event = %id, error = %e, "unreadable pending Stripe event skipped")
                }
            }
        }
        // RETURNING gives no order.
        events.sort_by(|a, b| (a.0, &a.1.id).cmp(&(b.0, &b.1.id)));
        Ok(events.into_iter().map(|(_, e)| e).collect())
    }

    async fn paid_subscriptions(
        &self,
        customer: &str,
    ) -> Result<Vec<PaidSubscription>, StoreError> {
        let mut conn = self.pool.acquire().await?;
        customer_subscriptions(&mut conn, customer).await
    }

    async fn claim_resync(&self, now: i64, every: i64) -> Result<bool, StoreError> {
        let claimed = sqlx::query(
            "UPDATE stripe_resync SET started_at = $1 WHERE singleton = 1 AND started_at <= $2",
        )
        .bind(now)
        .bind(now.saturating_sub(every))
        .execute(&self.pool)
        .await?;
        Ok(claimed.rows_affected() == 1)
    }

    async fn claim(
        &self,
        key: &[u8; 32],
        request: &[u8; 32],
        now: i64,
        stale_before: i64,
    ) -> Result<Claim, StoreError> {
        let (key, request) = (hex::encode(key), hex::encode(request));
        let inserted = sqlx::query(
            "INSERT INTO idempotency (key_hash, request_hash, status, sealed, created_at) \
             VALUES ($1, $2, $3, '', $4) ON CONFLICT (key_hash) DO NOTHING",
        )
        .bind(&key)
        .bind(&request)
        .bind(i64::from(Remembered::IN_PROGRESS))
        .bind(now)
        .execute(&self.pool)
        .await?;
        if inserted.rows_affected() == 1 {
            return Ok(Claim::Claimed);
        }
        let taken_over = sqlx::query(
            "UPDATE idempotency SET request_hash = $1, created_at = $2 \
             WHERE key_hash = $3 AND status = $4 AND created_at < $5",
        )
        .bind(&request)
        .bind(now)
        .bind(&key)
        .bind(i64::from(Remembered::IN_PROGRESS))
        .bind(stale_before)
        .execute(&self.pool)
        .await?;
        if taken_over.rows_affected() == 1 {
            return Ok(Claim::Claimed);
        }
        let row =
            sqlx::query("SELECT request_hash, status, sealed FROM idempotency WHERE key_hash = $1")
                .bind(&key)
                .fetch_optional(&self.pool)
                .await?;
        match row {
            Some(row) => Ok(Claim::Taken(remembered_row(&row)?)),
            // Pruned between the two statements: nothing is stored any more.
            None => Ok(Claim::Claimed),
        }
    }

    async fn settle(&self, key: &[u8; 32], answer: Option<&Remembered>) -> Result<(), StoreError> {
        let key = hex::encode(key);
        match answer {
            Some(answer) => {
                sqlx::query(
                    "UPDATE idempotency SET request_hash = $1, status = $2, sealed = $3 WHERE key_hash = $4",
                )
                .bind(hex::encode(answer.request))
                .bind(i64::from(answer.status))
                .bind(BASE64.encode(&answer.sealed))
                .bind(&key)
                .execute(&self.pool)
                .await?;
            }
            None => {
                sqlx::query("DELETE FROM idempotency WHERE key_hash = $1 AND status = $2")
                    .bind(&key)
                    .bind(i64::from(Remembered::IN_PROGRESS))
                    .execute(&self.pool)
                    .await?;
            }
        }
        Ok(())
    }

    async fn ping(&self) -> Result<(), StoreError> {
        sqlx::query("SELECT 1").execute(&self.pool).await?;
        Ok(())
    }
}

const DEVELOPER_COLUMNS: &str = "SELECT id, email, company, stripe_customer, attributes, created_at, updated_at FROM developers";
const APP_COLUMNS: &str = "SELECT a.id, a.name, a.developer_id, d.email AS developer, a.client_id, a.status, \
     a.attributes, a.created_at, a.updated_at FROM apps a JOIN developers d ON d.id = a.developer_id";
const STORED_KEY_COLUMNS: &str = "SELECT hash, app_id, status, expires_at FROM api_keys";
const PAID_COLUMNS: &str = "SELECT id, state FROM stripe_subscriptions";

/// One write's transaction, its sequence number and its time.
struct Tx<'t, 'c> {
    tx: &'t mut Transaction<'c, Any>,
    seq: i64,
    now: i64,
}

impl Tx<'_, '_> {
    async fn changed(&mut self, kind: &str, name: &str) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO changes (seq, kind, name, at) VALUES ($1, $2, $3, $4) ON CONFLICT DO NOTHING",
        )
        .bind(self.seq)
        .bind(kind)
        .bind(name)
        .bind(self.now)
        .execute(&mut **self.tx)
        .await?;
        Ok(())
    }

    async fn put_developer(&mut self, d: &DeveloperInput) -> Result<Written, StoreError> {
        let attributes = attributes_text(&d.attributes)?;
        let existing = sqlx::query(&format!("{DEVELOPER_COLUMNS} WHERE email = $1"))
            .bind(&d.email)
            .fetch_optional(&mut **self.tx)
            .await?;
        let created = existing.is_none();
        let (id, created_at) = match existing.as_ref().map(developer_row).transpose()? {
            Some(old) => {
                sqlx::query(
                    "UPDATE developers SET company = $1, stripe_customer = $2, attributes = $3, \
                     updated_at = $4 WHERE id = $5",
                )
                .bind(&d.company)
                .bind(&d.stripe_customer)
                .bind(&attributes)
                .bind(self.now)
                .bind(old.id)
                .execute(&mut **self.tx)
                .await?;
                (old.id, old.created_at)
            }
            None => {
                sqlx::query(
                    "INSERT INTO developers (id, email, company, stripe_customer, attributes, created_at, \
                     updated_at) VALUES ($1, $2, $3, $4, $5, $6, $6)",
                )
                .bind(self.seq)
                .bind(&d.email)
                .bind(&d.company)
                .bind(&d.stripe_customer)
                .bind(&attributes)
                .bind(self.now)
                .execute(&mut **self.tx)
                .await?;
                (self.seq, self.now)
            }
        };
        self.changed("developer", &d.email).await?;
        Ok(Written::Developer {
            created,
            record: DeveloperRecord {
                id,
                email: d.email.clone(),
                company: d.company.clone(),
                stripe_customer: d.stripe_customer.clone(),
                attributes: d.attributes.clone(),
                created_at,
                updated_at: self.now,
            },
        })
    }

    async fn delete_developer(&mut self, email: &str) -> Result<Written, StoreError> {
        let id: Option<i64> = sqlx::query_scalar("SELECT id FROM developers WHERE email = $1")
            .bind(email)
            .fetch_optional(&mut **self.tx)
            .await?;
        let Some(id) = id else {
            return Err(StoreError::NotFound(format!("no developer {email}")));
        };
        let apps: Vec<String> =
            sqlx::query_scalar("SELECT name FROM apps WHERE developer_id = $1 ORDER BY name")
                .bind(id)
                .fetch_all(&mut **self.tx)
                .await?;
        for app in &apps {
            self.delete_app(app).await?;
        }
        sqlx::query("DELETE FROM developers WHERE id = $1")
            .bind(id)
            .execute(&mut **self.tx)
            .await?;
        self.changed("developer", email).await?;
        Ok(Written::Deleted)
    }

    async fn put_app(&mut self, a: &AppInput) -> Result<Written, StoreError> {
        let developer: Option<i64> =
            sqlx::query_scalar("SELECT id FROM developers WHERE email = $1")
                .bind(&a.developer)
                .fetch_optional(&mut **self.tx)
                .await?;
        let Some(developer_id) = developer else {
            return Err(StoreError::NotFound(format!(
                "developer: no developer {}",
                a.developer
            )));
        };
        if let Some(client_id) = &a.client_id {
            let holder: Option<String> =
                sqlx::query_scalar("SELECT name FROM apps WHERE client_id = $1 AND name <> $2")
                    .bind(client_id)
                    .bind(&a.name)
                    .fetch_optional(&mut **self.tx)
                    .await?;
            if let Some(holder) = holder {
                return Err(StoreError::Conflict(format!(
                    "client_id {client_id:?} belongs to app {holder}"
                )));
            }
        }
        let attributes = attributes_text(&a.attributes)?;
        let existing = sqlx::query(&format!("{APP_COLUMNS} WHERE a.name = $1"))
            .bind(&a.name)
            .fetch_optional(&mut **self.tx)
            .await?;
        let created = existing.is_none();
        let (id, created_at) = match existing.as_ref().map(app_row).transpose()? {
            Some(old) if old.developer_id != developer_id => {
                return Err(StoreError::Conflict(format!(
                    "app {} belongs to developer {}: delete it to give the name to another developer",
                    a.name, old.developer
                )));
            }
            Some(old) => {
                sqlx::query(
                    "UPDATE apps SET client_id = $1, status = $2, attributes = $3, updated_at = $4 \
                     WHERE id = $5",
                )
                .bind(&a.client_id)
                .bind(status_text(a.status))
                .bind(&attributes)
                .bind(self.now)
                .bind(old.id)
                .execute(&mut **self.tx)
                .await?;
                sqlx::query("DELETE FROM app_products WHERE app_id = $1")
                    .bind(old.id)
                    .execute(&mut **self.tx)
                    .await?;
                (old.id, old.created_at)
            }
            None => {
                sqlx::query(
                    "INSERT INTO apps (id, name, developer_id, client_id, status, attributes, created_at, \
                     updated_at) VALUES ($1, $2, $3, $4, $5, $6, $7, $7)",
                )
                .bind(self.seq)
                .bind(&a.name)
                .bind(developer_id)
                .bind(&a.client_id)
                .bind(status_text(a.status))
                .bind(&attributes)
                .bind(self.now)
                .execute(&mut **self.tx)
                .await?;
                (self.seq, self.now)
            }
        };
        for (position, s) in a.products.iter().enumerate() {
            sqlx::query(
                "INSERT INTO app_products (app_id, position, product, status) VALUES ($1, $2, $3, $4)",
            )
            .bind(id)
            .bind(i64::try_from(position).unwrap_or(i64::MAX))
            .bind(&s.product)
            .bind(subscription_text(s.status))
            .execute(&mut **self.tx)
            .await?;
        }
        self.changed("app", &a.name).await?;
        Ok(Written::App {
            created,
            record: AppRecord {
                id,
                name: a.name.clone(),
                developer_id,
                developer: a.developer.clone(),
                client_id: a.client_id.clone(),
                status: a.status,
                products: a.products.clone(),
                attributes: a.attributes.clone(),
                created_at,
                updated_at: self.now,
            },
        })
    }

    async fn delete_app(&mut self, name: &str) -> Result<Written, StoreError> {
        let id = self.app_id(name).await?;
        let hashes: Vec<String> = sqlx::query_scalar("SELECT hash FROM api_keys WHERE app_id = $1")
            .bind(id)
            .fetch_all(&mut **self.tx)
            .await?;
        for hash in &hashes {
            self.changed("key", hash).await?;
        }
        for statement in [
            "DELETE FROM api_keys WHERE app_id = $1",
            "DELETE FROM app_products WHERE app_id = $1",
            "DELETE FROM apps WHERE id = $1",
        ] {
            sqlx::query(statement)
                .bind(id)
                .execute(&mut **self.tx)
                .await?;
        }
        self.changed("app", name).await?;
        Ok(Written::Deleted)
    }

    async fn set_subscription(
        &mut self,
        app: &str,
        product: &str,
        status: SubscriptionStatus,
    ) -> Result<Written, StoreError> {
        let id = self.app_id(app).await?;
        let updated =
            sqlx::query("UPDATE app_products SET status = $1 WHERE app_id = $2 AND product = $3")
                .bind(subscription_text(status))
                .bind(id)
                .bind(product)
                .execute(&mut **self.tx)
                .await?;
        if updated.rows_affected() == 0 {
            sqlx::query(
                "INSERT INTO app_products (app_id, position, product, status) \
                 SELECT $1, COALESCE(MAX(position), -1) + 1, $2, $3 FROM app_products WHERE app_id = $1",
            )
            .bind(id)
            .bind(product)
            .bind(subscription_text(status))
            .execute(&mut **self.tx)
            .await?;
        }
        sqlx::query("UPDATE apps SET updated_at = $1 WHERE id = $2")
            .bind(self.now)
            .bind(id)
            .execute(&mut **self.tx)
            .await?;
        self.changed("app", app).await?;
        let row = sqlx::query(&format!("{APP_COLUMNS} WHERE a.id = $1"))
            .bind(id)
            .fetch_one(&mut **self.tx)
            .await?;
        let mut record = app_row(&row)?;
        record.products = subscriptions(self.tx, id).await?;
        Ok(Written::App {
            created: false,
            record,
        })
    }

    async fn create_key(&mut self, app: &str, key: &NewKey) -> Result<Written, StoreError> {
        let app_id = self.app_id(app).await?;
        self.insert_key(app_id, key).await
    }

    async fn insert_key(&mut self, app_id: i64, key: &NewKey) -> Result<Written, StoreError> {
        let hash = key.hash.to_string();
        sqlx::query(
            "INSERT INTO api_keys (id, app_id, hash, prefix, name, status, created_at, expires_at) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
        )
        .bind(&key.id)
        .bind(app_id)
        .bind(&hash)
        .bind(&key.prefix)
        .bind(&key.name)
        .bind(status_text(Status::Approved))
        .bind(self.now)
        .bind(key.expires_at)
        .execute(&mut **self.tx)
        .await?;
        self.changed("key", &hash).await?;
        Ok(Written::Key(KeyRecord {
            id: key.id.clone(),
            app_id,
            hash: key.hash,
            prefix: key.prefix.clone(),
            name: key.name.clone(),
            status: Status::Approved,
            created_at: self.now,
            expires_at: key.expires_at,
        }))
    }

    async fn rotate_key(
        &mut self,
        app: &str,
        old: &str,
        old_expires_at: i64,
        key: &NewKey,
    ) -> Result<Written, StoreError> {
        let app_id = self.app_id(app).await?;
        let old_key = self.key(app_id, app, old).await?;
        if old_key.status == Status::Revoked {
            return Err(StoreError::Conflict(format!(
                "key {old} is revoked: create a new key instead"
            )));
        }
        let expires = old_key
            .expires_at
            .map_or(old_expires_at, |t| t.min(old_expires_at));
        sqlx::query("UPDATE api_keys SET expires_at = $1 WHERE id = $2")
            .bind(expires)
            .bind(old)
            .execute(&mut **self.tx)
            .await?;
        self.changed("key", &old_key.hash.to_string()).await?;
        self.insert_key(app_id, key).await
    }

    async fn revoke_key(&mut self, app: &str, id: &str) -> Result<Written, StoreError> {
        let app_id = self.app_id(app).await?;
        let mut key = self.key(app_id, app, id).await?;
        sqlx::query("UPDATE api_keys SET status = $1 WHERE id = $2")
            .bind(status_text(Status::Revoked))
            .bind(id)
            .execute(&mut **self.tx)
            .await?;
        self.changed("key", &key.hash.to_string()).await?;
        key.status = Status::Revoked;
        Ok(Written::Key(key))
    }

    async fn observe(
        &mut self,
        customer: &str,
        observation: &Observation,
        source: &str,
        event: Option<&str>,
    ) -> Result<Written, StoreError> {
        let id = observation.subscription();
        let stored = sqlx::query(&format!("{PAID_COLUMNS} WHERE id = $1"))
            .bind(id)
            .fetch_optional(&mut **self.tx)
            .await?
            .as_ref()
            .map(paid_row)
            .transpose()?;
        let folded = paid::fold(stored.as_ref(), observation, source);
        let (row, changed) = match folded {
            paid::Folded::Changed(next) => (Some(next), true),
            paid::Folded::Confirmed(next) => (Some(next), false),
            paid::Folded::Stale => {
                tracing::debug!(
                    subscription = id,
                    customer,
                    source,
                    "observation not newer than the stored one, or of a subscription not seen yet"
                );
                (None, false)
            }
        };
        if let Some(next) = &row {
            let json = serde_json::to_string(next)
                .map_err(|e| StoreError::Corrupt(format!("subscription {id}: {e}")))?;
            sqlx::query(
                "INSERT INTO stripe_subscriptions (id, customer, state, as_of, updated_at) \
                 VALUES ($1, $2, $3, $4, $5) ON CONFLICT (id) DO UPDATE SET customer = excluded.customer, \
                 state = excluded.state, as_of = excluded.as_of, updated_at = excluded.updated_at",
            )
            .bind(id)
            .bind(&next.state.customer)
            .bind(json)
            .bind(next.as_of)
            .bind(self.now)
            .execute(&mut **self.tx)
            .await?;
        }
        if let Some(next) = row.as_ref().filter(|_| changed) {
            self.changed("customer", &next.state.customer).await?;
            if let Some(old) = stored.filter(|s| s.state.customer != next.state.customer) {
                self.changed("customer", &old.state.customer).await?;
            }
        }
        if let Some(event) = event {
            sqlx::query(
                "UPDATE stripe_events SET applied_at = $1 WHERE id = $2 AND applied_at IS NULL",
            )
            .bind(self.now)
            .bind(event)
            .execute(&mut **self.tx)
            .await?;
        }
        Ok(Written::Paid(row.filter(|_| changed)))
    }

    async fn app_id(&mut self, name: &str) -> Result<i64, StoreError> {
        let id: Option<i64> = sqlx::query_scalar("SELECT id FROM apps WHERE name = $1")
            .bind(name)
            .fetch_optional(&mut **self.tx)
            .await?;
        id.ok_or_else(|| StoreError::NotFound(format!("no app {name} in the state store")))
    }

    async fn key(&mut self, app_id: i64, app: &str, id: &str) -> Result<KeyRecord, StoreError> {
        let row = sqlx::query(
            "SELECT id, app_id, hash, prefix, name, status, created_at, expires_at FROM api_keys \
             WHERE id = $1 AND app_id = $2",
        )
        .bind(id)
        .bind(app_id)
        .fetch_optional(&mut **self.tx)
        .await?;
        match row {
            Some(row) => key_row(&row),
            None => Err(StoreError::NotFound(format!("app {app} has no key {id}"))),
        }
    }
}

/// The subscriptions of app `id`, in order.
async fn subscriptions(
    conn: &mut sqlx::AnyConnection,
    id: i64,
) -> Result<Vec<SubscriptionRecord>, StoreError> {
    sqlx::query("SELECT product, status FROM app_products WHERE app_id = $1 ORDER BY position")
        .bind(id)
        .fetch_all(&mut *conn)
        .await?
        .iter()
        .map(subscription_row)
        .collect()
}

async fn customer_subscriptions(
    conn: &mut sqlx::AnyConnection,
    customer: &str,
) -> Result<Vec<PaidSubscription>, StoreError> {
    sqlx::query(&format!("{PAID_COLUMNS} WHERE customer = $1 ORDER BY id"))
        .bind(customer)
        .fetch_all(&mut *conn)
        .await?
        .iter()
        .map(paid_row)
        .collect()
}

fn paid_row(row: &AnyRow) -> Result<PaidSubscription, StoreError> {
    let id: String = row.try_get("id")?;
    let text: String = row.try_get("state")?;
    serde_json::from_str(&text)
        .map_err(|e| StoreError::Corrupt(format!("stripe_subscriptions row {id}: {e}")))
}

/// A unique-constraint violation (two replicas racing for one name) is a conflict, not an outage.
fn unique_is_conflict(e: StoreError) -> StoreError {
    match e {
        StoreError::Unavailable(sqlx::Error::Database(db)) if db.is_unique_violation() => {
            StoreError::Conflict(format!("already taken: {}", db.message()))
        }
        other => other,
    }
}

fn developer_row(row: &AnyRow) -> Result<DeveloperRecord, StoreError> {
    Ok(DeveloperRecord {
        id: row.try_get("id")?,
        email: row.try_get("email")?,
        company: row.try_get("company")?,
        stripe_customer: row.try_get("stripe_customer")?,
        attributes: attributes_of(&row.try_get::<String, _>("attributes")?)?,
        created_at: row.try_get("created_at")?,
        updated_at: row.try_get("updated_at")?,
    })
}

fn app_row(row: &AnyRow) -> Result<AppRecord, StoreError> {
    Ok(AppRecord {
        id: row.try_get("id")?,
        name: row.try_get("name")?,
        developer_id: row.try_get("developer_id")?,
        developer: row.try_get("developer")?,
        client_id: row.try_get("client_id")?,
        status: status_of(&row.try_get::<String, _>("status")?)?,
        products: Vec::new(),
        attributes: attributes_of(&row.try_get::<String, _>("attributes")?)?,
        created_at: row.try_get("created_at")?,
        updated_at: row.try_get("updated_at")?,
    })
}

fn subscription_row(row: &AnyRow) -> Result<SubscriptionRecord, StoreError> {
    Ok(SubscriptionRecord {
        product: row.try_get("product")?,
        status: subscription_of(&row.try_get::<String, _>("status")?)?,
    })
}

fn key_row(row: &AnyRow) -> Result<KeyRecord, StoreError> {
    Ok(KeyRecord {
        id: row.try_get("id")?,
        app_id: row.try_get("app_id")?,
        hash: hash_of(&row.try_get::<String, _>("hash")?)?,
        prefix: row.try_get("prefix")?,
        name: row.try_get("name")?,
        status: status_of(&row.try_get::<String, _>("status")?)?,
        created_at: row.try_get("created_at")?,
        expires_at: row.try_get("expires_at")?,
    })
}

fn stored_key_row(row: &AnyRow) -> Result<StoredKey, StoreError> {
    Ok(StoredKey {
        hash: hash_of(&row.try_get::<String, _>("hash")?)?,
        app_id: row.try_get("app_id")?,
        status: status_of(&row.try_get::<String, _>("status")?)?,
        expires_at: row.try_get("expires_at")?,
    })
}

fn remembered_row(row: &AnyRow) -> Result<Remembered, StoreError> {
    let mut request = [0u8; 32];
    hex::decode_to_slice(row.try_get::<String, _>("request_hash")?, &mut request)
        .map_err(|e| StoreError::Corrupt(format!("idempotency request hash: {e}")))?;
    let status: i64 = row.try_get("status")?;
    Ok(Remembered {
        request,
        status: u16::try_from(status)
            .map_err(|_| StoreError::Corrupt(format!("idempotency status {status}")))?,
        sealed: BASE64
            .decode(row.try_get::<String, _>("sealed")?)
            .map_err(|e| StoreError::Corrupt(format!("idempotency answer: {e}")))?,
    })
}

fn hash_of(text: &str) -> Result<KeyHash, StoreError> {
    KeyHash::parse(text).map_err(|e| StoreError::Corrupt(format!("key hash {text:?}: {e}")))
}

fn attributes_text(attributes: &Attributes) -> Result<String, StoreError> {
    serde_json::to_string(attributes).map_err(|e| StoreError::Corrupt(e.to_string()))
}

fn attributes_of(text: &str) -> Result<Attributes, StoreError> {
    serde_json::from_str(text).map_err(|e| StoreError::Corrupt(format!("attributes: {e}")))
}

fn status_text(status: Status) -> &'static str {
    status.as_str()
}

fn status_of(text: &str) -> Result<Status, StoreError> {
    match text {
        "approved" => Ok(Status::Approved),
        "revoked" => Ok(Status::Revoked),
        other => Err(StoreError::Corrupt(format!("status {other:?}"))),
    }
}

fn subscription_text(status: SubscriptionStatus) -> &'static str {
    status.as_str()
}

fn subscription_of(text: &str) -> Result<SubscriptionStatus, StoreError> {
    match text {
        "approved" => Ok(SubscriptionStatus::Approved),
        "pending" => Ok(SubscriptionStatus::Pending),
        "revoked" => Ok(SubscriptionStatus::Revoked),
        other => Err(StoreError::Corrupt(format!(
            "subscription status {other:?}"
        ))),
    }
}

/// `url` without its password, for logs and messages.
pub fn redacted(url: &str) -> String {
    match url::Url::parse(url) {
        Ok(mut parsed) if parsed.password().is_some() => {
            let _ = parsed.set_password(Some("***"));
            parsed.to_string()
        }
        _ => url.to_owned(),
    }
}

/// Unix seconds as RFC 3339 (UTC).
pub fn rfc3339(secs: i64) -> String {
    chrono::DateTime::from_timestamp(secs, 0)
        .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true))
        .unwrap_or_default()
}
