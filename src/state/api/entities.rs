//! The management API's handlers: developers, apps, subscriptions, keys and the audit trail.

use std::collections::HashSet;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;
use chrono::{DateTime, Utc};
use rand::RngCore;
use serde::Deserialize;
use serde_json::{Value, json};

use crate::catalog::{Approval, Catalog, Status, SubscriptionStatus};
use crate::identity::api_key::{self, KeyHash, KeyKind};
use crate::state::api::ManagementState;
use crate::state::api::body::{self, Answer, respond};
use crate::state::api::error::ApiError;
use crate::state::api::idempotency;
use crate::state::api::validate::{self, MAX_NAME};
use crate::state::model::{
    AppInput, AppRecord, Attributes, DeveloperInput, DeveloperRecord, KeyRecord, NewKey, Page,
    SubscriptionRecord, Write, Written,
};
use crate::state::sql::rfc3339;
use crate::util::clock::unix_now;

/// How long a rotated key keeps working when the request does not say.
const DEFAULT_GRACE: Duration = Duration::from_secs(24 * 3600);
/// The longest grace a rotation may give the old key.
const MAX_GRACE: Duration = Duration::from_secs(90 * 24 * 3600);
/// Characters of a key shown as its prefix (`tg_live_` and four more).
const PREFIX_CHARS: usize = 12;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct DeveloperBody {
    company: Option<String>,
    stripe_customer: Option<String>,
    #[serde(default)]
    attributes: Attributes,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct AppBody {
    developer: String,
    client_id: Option<String>,
    status: Option<Status>,
    #[serde(default)]
    products: Vec<SubscriptionBody>,
    #[serde(default)]
    attributes: Attributes,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct SubscriptionBody {
    name: String,
    status: Option<SubscriptionStatus>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct StatusBody {
    status: SubscriptionStatus,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct KeyBody {
    environment: Option<String>,
    expires_at: Option<DateTime<Utc>>,
    name: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RotateBody {
    grace: Option<String>,
    expires_at: Option<DateTime<Utc>>,
    name: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct ListQuery {
    limit: Option<u32>,
    after: Option<String>,
    developer: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct AuditQuery {
    limit: Option<u32>,
    after: Option<i64>,
}

type Body = Result<Bytes, BytesRejection>;

fn query<T>(q: Result<Query<T>, QueryRejection>) -> Result<T, ApiError> {
    q.map(|Query(q)| q)
        .map_err(|e| ApiError::invalid("query", e.body_text()))
}

/// Runs a write: reads the body, runs `write` once per `Idempotency-Key`, catches this replica up.
async fn writing<F, Fut>(
    state: &ManagementState,
    headers: &HeaderMap,
    method: &str,
    path: String,
    body: Body,
    write: F,
) -> Response
where
    F: FnOnce(Bytes) -> Fut,
    Fut: std::future::Future<Output = Answer>,
{
    let bytes = match body::bytes(body) {
        Ok(b) => b,
        Err(e) => return respond(Err(e)),
    };
    idempotency::once(
        state,
        headers,
        method,
        &path,
        &bytes.clone(),
        || async move {
            let answer = write(bytes).await;
            if answer.is_ok() {
                // The change is committed; this replica's snapshot follows before the caller hears back (a
                // failure here leaves it to the sync loop).
                let _ = state.syncer.catch_up().await;
            }
            answer
        },
    )
    .await
}

// Developers.

pub(super) async fn put_developer(
    State(state): State<ManagementState>,
    Path(email): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let path = format!("/v1/developers/{email}");
    let state = &state;
    writing(state, &headers, "PUT", path, body, |bytes| async move {
        validate::email("email", &email)?;
        store_only_developer(state, &email)?;
        let b: DeveloperBody = body::json(&bytes)?;
        let input = DeveloperInput {
            email,
            company: validate::text("company", b.company, MAX_NAME)?,
            stripe_customer: validate::text("stripe_customer", b.stripe_customer, MAX_NAME)?,
            attributes: validate::attributes("attributes", b.attributes)?,
        };
        match write(state, Write::PutDeveloper(input)).await? {
            Written::Developer { created, record } => {
                Ok((created_or_ok(created), developer_json(&record)))
            }
            other => Err(unexpected(&other)),
        }
    })
    .await
}

pub(super) async fn get_developer(
    State(state): State<ManagementState>,
    Path(email): Path<String>,
) -> Response {
    respond(async {
        if let Some(record) = state.store.developer(&email).await? {
            return Ok((StatusCode::OK, developer_json(&record)));
        }
        let file = state.snapshot.file();
        match file.developer_by_email(&email) {
            Some(d) => Ok((
                StatusCode::OK,
                json!({"email": d.email, "company": d.company, "stripe_customer": d.stripe_customer,
                       "attributes": {}, "source": "catalog"}),
            )),
            None => Err(ApiError::not_found(format!("no developer {email}"))),
        }
    }
    .await)
}

pub(super) async fn list_developers(
    State(state): State<ManagementState>,
    q: Result<Query<ListQuery>, QueryRejection>,
) -> Response {
    respond(
        async {
            let q = query(q)?;
            if q.developer.is_some() {
                return Err(ApiError::invalid("developer", "not a filter of developers"));
            }
            let page = Page {
                after: q.after,
                limit: validate::limit(q.limit)?,
            };
            let developers = state.store.developers(&page).await?;
            let next = next_after(&developers, page.limit, |d| d.email.clone());
            let data: Vec<Value> = developers.iter().map(developer_json).collect();
            Ok((StatusCode::OK, json!({"data": data, "next_after": next})))
        }
        .await,
    )
}

pub(super) async fn delete_developer(
    State(state): State<ManagementState>,
    Path(email): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let path = format!("/v1/developers/{email}");
    let state = &state;
    writing(state, &headers, "DELETE", path, body, |_| async move {
        store_only_developer(state, &email)?;
        write(state, Write::DeleteDeveloper { email }).await?;
        Ok((StatusCode::OK, json!({"deleted": true})))
    })
    .await
}

// Apps.

pub(super) async fn put_app(
    State(state): State<ManagementState>,
    Path(name): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let path = format!("/v1/apps/{name}");
    let state = &state;
    writing(state, &headers, "PUT", path, body, |bytes| async move {
        validate::name("name", &name)?;
        let file = state.snapshot.file();
        if file.app_id(&name).is_some() {
            return Err(ApiError::in_catalog(&format!("app {name}")));
        }
        let b: AppBody = body::json(&bytes)?;
        validate::email("developer", &b.developer)?;
        if file.developer_id(&b.developer).is_some() {
            return Err(ApiError::in_catalog(&format!(
                "developer {} (its apps belong in the catalog file too)",
                b.developer
            )));
        }
        if let Some(client_id) = &b.client_id {
            validate::name("client_id", client_id)?;
            if let Some(holder) = file.app_by_client_id(client_id).and_then(|id| file.app(id)) {
                return Err(ApiError::conflict(format!(
                    "client_id {client_id:?} belongs to app {} in the catalog file",
                    holder.name
                )));
            }
        }
        let input = AppInput {
            products: subscriptions(&file, b.products)?,
            name,
            developer: b.developer,
            client_id: b.client_id,
            status: b.status.unwrap_or_default(),
            attributes: validate::attributes("attributes", b.attributes)?,
        };
        match write(state, Write::PutApp(input)).await {
            Ok(Written::App { created, record }) => {
                Ok((created_or_ok(created), app_json(&record, None)))
            }
            Ok(other) => Err(unexpected(&other)),
            // The store names the field of a missing developer.
            Err(e) if e.status == StatusCode::NOT_FOUND => Err(ApiError::invalid(
                "developer",
                e.message.trim_start_matches("developer: "),
            )),
            Err(e) => Err(e),
        }
    })
    .await
}

/// Validates an app's subscriptions against the catalog's products; a missing status follows the product's
/// approval (auto: approved, manual: pending).
fn subscriptions(
    file: &Catalog,
    products: Vec<SubscriptionBody>,
) -> Result<Vec<SubscriptionRecord>, ApiError> {
    let mut seen = HashSet::new();
    let mut out = Vec::with_capacity(products.len());
    for (i, s) in products.into_iter().enumerate() {
        let field = format!("products[{i}].name");
        let Some(product) = file.product_id(&s.name).and_then(|id| file.product(id)) else {
            return Err(ApiError::invalid(
                &field,
                format!("no product {:?} in the catalog", s.name),
            ));
        };
        if !seen.insert(s.name.clone()) {
            return Err(ApiError::invalid(
                &field,
                format!("product {:?} is listed twice", s.name),
            ));
        }
        let status = s.status.unwrap_or(match product.approval {
            Approval::Auto => SubscriptionStatus::Approved,
            Approval::Manual => SubscriptionStatus::Pending,
        });
        out.push(SubscriptionRecord {
            product: s.name,
            status,
        });
    }
    Ok(out)
}

pub(super) async fn get_app(
    State(state): State<ManagementState>,
    Path(name): Path<String>,
) -> Response {
    respond(async {
        if let Some((app, keys)) = state.store.app(&name).await? {
            return Ok((StatusCode::OK, app_json(&app, Some(&keys))));
        }
        let file = state.snapshot.file();
        let Some(app) = file.app_by_name(&name) else {
            return Err(ApiError::not_found(format!("no app {name}")));
        };
        let products: Vec<Value> = app
            .products
            .iter()
            .filter_map(|s| {
                file.product(s.product)
                    .map(|p| json!({"name": p.name, "status": s.status.as_str()}))
            })
            .collect();
        Ok((
            StatusCode::OK,
            json!({"name": app.name, "developer": file.developer(app.developer).map(|d| d.email.clone()),
                   "client_id": app.client_id, "status": app.status.as_str(), "products": products,
                   "attributes": {}, "source": "catalog"}),
        ))
    }
    .await)
}

pub(super) async fn list_apps(
    State(state): State<ManagementState>,
    q: Result<Query<ListQuery>, QueryRejection>,
) -> Response {
    respond(
        async {
            let q = query(q)?;
            let page = Page {
                after: q.after,
                limit: validate::limit(q.limit)?,
            };
            let apps = state.store.apps(q.developer.as_deref(), &page).await?;
            let next = next_after(&apps, page.limit, |a| a.name.clone());
            let data: Vec<Value> = apps.iter().map(|a| app_json(a, None)).collect();
            Ok((StatusCode::OK, json!({"data": data, "next_after": next})))
        }
        .await,
    )
}

pub(super) async fn delete_app(
    State(state): State<ManagementState>,
    Path(name): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let path = format!("/v1/apps/{name}");
    let state = &state;
    writing(state, &headers, "DELETE", path, body, |_| async move {
        store_only_app(state, &name)?;
        write(state, Write::DeleteApp { name }).await?;
        Ok((StatusCode::OK, json!({"deleted": true})))
    })
    .await
}

pub(super) async fn put_subscription(
    State(state): State<ManagementState>,
    Path((app, product)): Path<(String, String)>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let path = format!("/v1/apps/{app}/products/{product}");
    let state = &state;
    writing(state, &headers, "PUT", path, body, |bytes| async move {
        store_only_app(state, &app)?;
        if state.snapshot.file().product_id(&product).is_none() {
            return Err(ApiError::not_found(format!(
                "no product {product} in the catalog"
            )));
        }
        let b: StatusBody = body::json(&bytes)?;
        let written = write(
            state,
            Write::SetSubscription {
                app,
                product,
                status: b.status,
            },
        )
        .await?;
        match written {
            Written::App { record, .. } => Ok((StatusCode::OK, app_json(&record, None))),
            other => Err(unexpected(&other)),
        }
    })
    .await
}

// Keys.

pub(super) async fn create_key(
    State(state): State<ManagementState>,
    Path(app): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let path = format!("/v1/apps/{app}/keys");
    let state = &state;
    writing(state, &headers, "POST", path, body, |bytes| async move {
        store_only_app(state, &app)?;
        let b: KeyBody = body::json(&bytes)?;
        let kind = match b.environment.as_deref() {
            None | Some("live") => KeyKind::Live,
            Some("test") => KeyKind::Test,
            Some(other) => {
                return Err(ApiError::invalid(
                    "environment",
                    format!("{other:?} is neither live nor test"),
                ));
            }
        };
        let expires_at = future("expires_at", b.expires_at)?;
        let name = validate::text("name", b.name, MAX_NAME)?;
        let (secret, key) = new_key(kind, name, expires_at);
        match write(state, Write::CreateKey { app, key }).await? {
            Written::Key(record) => Ok((StatusCode::CREATED, created_key_json(&record, &secret))),
            other => Err(unexpected(&other)),
        }
    })
    .await
}

pub(super) async fn rotate_key(
    State(state): State<ManagementState>,
    Path((app, id)): Path<(String, String)>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let path = format!("/v1/apps/{app}/keys/{id}/rotate");
    let state = &state;
    writing(state, &headers, "POST", path, body, |bytes| async move {
        store_only_app(state, &app)?;
        let b: RotateBody = body::json(&bytes)?;
        let grace = match b.grace.as_deref() {
            None => DEFAULT_GRACE,
            Some(text) => humantime::parse_duration(text)
                .map_err(|e| ApiError::invalid("grace", e))
                .and_then(|g| {
                    if g > MAX_GRACE {
                        Err(ApiError::invalid("grace", "must be at most 90 days"))
                    } else {
                        Ok(g)
                    }
                })?,
        };
        let expires_at = future("expires_at", b.expires_at)?;
        let name = validate::text("name", b.name, MAX_NAME)?;
        // The new key keeps the old one's environment.
        let old = state
            .store
            .app(&app)
            .await?
            .and_then(|(_, keys)| keys.into_iter().find(|k| k.id == id))
            .ok_or_else(|| ApiError::not_found(format!("app {app} has no key {id}")))?;
        let kind = if old.prefix.starts_with("tg_test_") {
            KeyKind::Test
        } else {
            KeyKind::Live
        };
        let (secret, key) = new_key(kind, name.or(old.name), expires_at);
        let old_expires_at =
            unix_now().saturating_add(i64::try_from(grace.as_secs()).unwrap_or(i64::MAX));
        let rotate = Write::RotateKey {
            app,
            old: id,
            old_expires_at,
            key,
        };
        match write(state, rotate).await? {
            Written::Key(record) => Ok((StatusCode::CREATED, created_key_json(&record, &secret))),
            other => Err(unexpected(&other)),
        }
    })
    .await
}

pub(super) async fn revoke_key(
    State(state): State<ManagementState>,
    Path((app, id)): Path<(String, String)>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let path = format!("/v1/apps/{app}/keys/{id}/revoke");
    let state = &state;
    writing(state, &headers, "POST", path, body, |_| async move {
        store_only_app(state, &app)?;
        match write(state, Write::RevokeKey { app, id }).await? {
            Written::Key(record) => Ok((StatusCode::OK, key_json(&record))),
            other => Err(unexpected(&other)),
        }
    })
    .await
}

pub(super) async fn audit(
    State(state): State<ManagementState>,
    q: Result<Query<AuditQuery>, QueryRejection>,
) -> Response {
    respond(
        async {
            let q = query(q)?;
            let limit = validate::limit(q.limit)?;
            let rows = state.store.audit(q.after.unwrap_or(0), limit).await?;
            let next = next_after(&rows, limit, |r| r.seq);
            Ok((StatusCode::OK, json!({"data": rows, "next_after": next})))
        }
        .await,
    )
}

/// Refuses a write to an app the catalog file defines (409 `defined_in_catalog`).
fn store_only_app(state: &ManagementState, app: &str) -> Result<(), ApiError> {
    match state.snapshot.file().app_id(app) {
        Some(_) => Err(ApiError::in_catalog(&format!("app {app}"))),
        None => Ok(()),
    }
}

/// Refuses a write to a developer the catalog file defines (409 `defined_in_catalog`).
fn store_only_developer(state: &ManagementState, email: &str) -> Result<(), ApiError> {
    match state.snapshot.file().developer_id(email) {
        Some(_) => Err(ApiError::in_catalog(&format!("developer {email}"))),
        None => Ok(()),
    }
}

async fn write(state: &ManagementState, write: Write) -> Result<Written, ApiError> {
    Ok(state.store.write(&write, &state.actor, unix_now()).await?)
}

/// A fresh key and what the store keeps of it.
fn new_key(kind: KeyKind, name: Option<String>, expires_at: Option<i64>) -> (String, NewKey) {
    let secret = api_key::generate(kind);
    let mut id = [0u8; 12];
    rand::rng().fill_bytes(&mut id);
    let key = NewKey {
        id: format!("key_{}", bs58::encode(id).into_string()),
        hash: KeyHash::of(&secret),
        prefix: secret.chars().take(PREFIX_CHARS).collect(),
        name,
        expires_at,
    };
    (secret, key)
}

fn future(field: &str, at: Option<DateTime<Utc>>) -> Result<Option<i64>, ApiError> {
    match at {
        Some(t) if t.timestamp() <= unix_now() => {
            Err(ApiError::invalid(field, "must be in the future"))
        }
        other => Ok(other.map(|t| t.timestamp())),
    }
}

fn created_or_ok(created: bool) -> StatusCode {
    if created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    }
}

fn next_after<T, K>(items: &[T], limit: u32, key: impl Fn(&T) -> K) -> Option<K> {
    if items.len() < usize::try_from(limit).unwrap_or(usize::MAX) {
        return None;
    }
    items.last().map(key)
}

fn unexpected(written: &Written) -> ApiError {
    tracing::error!(
        ?written,
        "state store answered a write with the wrong kind of result"
    );
    ApiError::unavailable()
}

fn developer_json(d: &DeveloperRecord) -> Value {
    json!({
        "email": d.email,
        "company": d.company,
        "stripe_customer": d.stripe_customer,
        "attributes": d.attributes,
        "source": "store",
        "created_at": rfc3339(d.created_at),
        "updated_at": rfc3339(d.updated_at),
    })
}

/// An app as the API shows it; `keys` only where one app is read (a list would cost a query per app).
fn app_json(a: &AppRecord, keys: Option<&[KeyRecord]>) -> Value {
    let products: Vec<Value> = a
        .products
        .iter()
        .map(|s| json!({"name": s.product, "status": s.status.as_str()}))
        .collect();
    let mut app = json!({
        "name": a.name,
        "developer": a.developer,
        "client_id": a.client_id,
        "status": a.status.as_str(),
        "products": products,
        "attributes": a.attributes,
        "source": "store",
        "created_at": rfc3339(a.created_at),
        "updated_at": rfc3339(a.updated_at),
    });
    if let (Some(keys), Some(map)) = (keys, app.as_object_mut()) {
        map.insert(
            "keys".to_owned(),
            Value::Array(keys.iter().map(key_json).collect()),
        );
    }
    app
}

fn key_json(k: &KeyRecord) -> Value {
    json!({
        "id": k.id,
        "prefix": k.prefix,
        "name": k.name,
        "status": k.status.as_str(),
        "created_at": rfc3339(k.created_at),
        "expires_at": k.expires_at.map(rfc3339),
    })
}

fn created_key_json(k: &KeyRecord, secret: &str) -> Value {
    let mut v = key_json(k);
    if let Some(map) = v.as_object_mut() {
        map.insert("key".to_owned(), Value::String(secret.to_owned()));
    }
    v
}
