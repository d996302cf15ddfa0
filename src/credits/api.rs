//! `/v1/credits`: balances, grants and take-backs through the management API (CONTRACT §9).
//!
//! A grant needs an `Idempotency-Key`: the key (hashed with the caller's token id) is the grant's source in
//! the ledger, so a retry grants once even after the stored answer expired.

use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;
use serde::Deserialize;
use serde_json::{Value, json};

use crate::catalog::Catalog;
use crate::credits::ledger::{Balance, GrantInput, GrantRecord, Granted};
use crate::state::api::ManagementState;
use crate::state::api::body::{self, respond};
use crate::state::api::error::ApiError;
use crate::state::api::idempotency;
use crate::state::api::validate::{self, MAX_NAME};
use crate::state::sql::rfc3339;
use crate::util::clock::unix_now;

/// Largest amount one grant adds or takes back.
const MAX_AMOUNT: i64 = 1_000_000_000_000;
/// Grants listed with a balance.
const LAST_GRANTS: u32 = 20;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct GrantBody {
    amount: i64,
    reason: Option<String>,
}

/// `GET /v1/credits` query.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct ListQuery {
    below: Option<u64>,
    after: Option<String>,
    limit: Option<u32>,
}

/// `POST /v1/credits/{owner}` `{amount, reason?}`: grants (or, negative, takes back) credits once per
/// `Idempotency-Key`.
pub(crate) async fn post_credits(
    State(state): State<ManagementState>,
    Path(owner): Path<String>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let Some(credits) = state.credits.clone() else {
        return respond(Err(not_configured()));
    };
    let bytes = match body::bytes(body) {
        Ok(b) => b,
        Err(e) => return respond(Err(e)),
    };
    let key = match headers.get(idempotency::HEADER).map(|k| k.to_str()) {
        Some(Ok(key)) => key,
        Some(Err(_)) => {
            return respond(Err(ApiError::invalid(
                "Idempotency-Key",
                "must be visible ASCII characters",
            )));
        }
        None => {
            return respond(Err(ApiError::invalid(
                "Idempotency-Key",
                "is required: a grant is money, and a retry must not grant twice",
            )));
        }
    };
    let path = format!("/v1/credits/{owner}");
    let source = idempotency::grant_source(key, &owner);
    let state = &state;
    idempotency::once(state, &headers, "POST", &path, &bytes.clone(), || async move {
        let b: GrantBody = body::json(&bytes)?;
        if b.amount == 0 || b.amount.unsigned_abs() > MAX_AMOUNT.unsigned_abs() {
            return Err(ApiError::invalid(
                "amount",
                format!("must be a whole number of credits, not 0, at most {MAX_AMOUNT} either way"),
            ));
        }
        let reason = validate::text("reason", b.reason, MAX_NAME)?;
        let catalog = state.snapshot.handle().snapshot();
        if !is_owner(&catalog, &owner) {
            return Err(ApiError::not_found(format!(
                "no developer e-mail or company named {owner}: credits belong to a company, else a developer"
            )));
        }
        let reason = reason.unwrap_or_else(|| {
            if b.amount > 0 { "grant" } else { "take-back" }.to_owned()
        });
        let input = GrantInput {
            owner: &owner,
            amount: b.amount,
            reason: &reason,
            source: &source,
            low_balance: credits.options().low_balance,
            now: unix_now(),
        };
        match credits.ledger().grant(&input).await? {
            Granted::New(balance) => {
                credits.granted(&owner);
                if b.amount > 0 {
                    credits
                        .metrics()
                        .granted
                        .with_label_values(&["api"])
                        .inc_by(b.amount as u64);
                }
                tracing::info!(owner = %owner, amount = b.amount, balance = balance.balance, "credits granted");
                Ok((StatusCode::CREATED, account_json(state, &balance).await?))
            }
            Granted::Duplicate(balance) => Ok((StatusCode::OK, account_json(state, &balance).await?)),
            Granted::Reused(_) => Err(ApiError::conflict(
                "this Idempotency-Key already granted another amount to this owner",
            )),
            Granted::Insufficient(balance) => Err(ApiError::conflict(format!(
                "cannot take back {} credits: the balance is {} ({} more are leased to replicas, and come \
                 back within seconds when unused)",
                b.amount.unsigned_abs(),
                balance.balance,
                balance.reserved
            ))),
        }
    })
    .await
}

/// `GET /v1/credits/{owner}`: the balance and the last grants.
pub(crate) async fn get_credits(
    State(state): State<ManagementState>,
    Path(owner): Path<String>,
) -> Response {
    respond(
        async {
            let credits = state.credits.as_ref().ok_or_else(not_configured)?;
            let balance = match credits.ledger().balance(&owner).await? {
                Some(balance) => balance,
                None if is_owner(&state.snapshot.handle().snapshot(), &owner) => Balance {
                    owner: owner.clone(),
                    balance: 0,
                    granted: 0,
                    spent: 0,
                    reserved: 0,
                    updated_at: 0,
                },
                None => {
                    return Err(ApiError::not_found(format!(
                        "no credits and no developer e-mail or company named {owner}"
                    )));
                }
            };
            Ok((StatusCode::OK, account_json(&state, &balance).await?))
        }
        .await,
    )
}

/// `GET /v1/credits?below=&after=&limit=`: the accounts whose balance is under `below` (default:
/// `credits.low_balance`), in owner order, a page at a time.
pub(crate) async fn list_credits(
    State(state): State<ManagementState>,
    query: Result<Query<ListQuery>, QueryRejection>,
) -> Response {
    respond(
        async {
            let credits = state.credits.as_ref().ok_or_else(not_configured)?;
            let Query(q) = query.map_err(|e| ApiError::invalid("query", e.body_text()))?;
            let limit = validate::limit(q.limit)?;
            let below = q
                .below
                .unwrap_or(credits.options().low_balance)
                .min(MAX_AMOUNT.unsigned_abs());
            let rows = credits
                .ledger()
                .balances(Some(below), q.after.as_deref(), limit)
                .await?;
            let next = (rows.len() == limit as usize)
                .then(|| rows.last().map(|b| b.owner.clone()))
                .flatten();
            let accounts: Vec<Value> = rows.iter().map(balance_json).collect();
            Ok((
                StatusCode::OK,
                json!({"below": below, "accounts": accounts, "next_after": next}),
            ))
        }
        .await,
    )
}

/// A developer's e-mail or a company the merged catalog knows.
fn is_owner(catalog: &Catalog, owner: &str) -> bool {
    catalog.developer_by_email(owner).is_some()
        || catalog
            .developers()
            .any(|d| d.company.as_deref() == Some(owner))
}

fn not_configured() -> ApiError {
    ApiError::not_found("prepaid credits are not served by this replica")
}

fn balance_json(b: &Balance) -> Value {
    json!({
        "owner": b.owner,
        "balance": b.balance,
        "granted": b.granted,
        "spent": b.spent,
        "reserved": b.reserved,
        "updated_at": (b.updated_at > 0).then(|| rfc3339(b.updated_at)),
    })
}

fn grant_json(g: &GrantRecord) -> Value {
    json!({
        "id": g.id,
        "amount": g.amount,
        "reason": g.reason,
        "source": g.source,
        "created_at": rfc3339(g.created_at),
    })
}

async fn account_json(state: &ManagementState, b: &Balance) -> Result<Value, ApiError> {
    let credits = state.credits.as_ref().ok_or_else(not_configured)?;
    let grants = credits.ledger().grants(&b.owner, LAST_GRANTS).await?;
    let mut answer = balance_json(b);
    answer["grants"] = Value::Array(grants.iter().map(grant_json).collect());
    Ok(answer)
}
