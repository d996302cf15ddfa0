//! Partner self-service through Envoy (CONTRACT §10): requests under `self_service.path_prefix` (default
//! `/.tollgate/`) are answered by tollgate itself, through ext_authz, with the caller's own data.
//!
//! # One request, followed
//! ```text
//! Envoy ext_authz ─> envoy::authz ─> check::Authorizer::check
//!    identify (API key | JWT: exactly as for any call)
//!    ─> route (this module: the sanitized path starts with the prefix?) ── no ──> the ordinary Check
//!    ─> entitle (check::entitle: the caller's app, or its portal account; any refusal is the ordinary one:
//!       same 401, same body, same www-authenticate)
//!    ─> respond: GET <prefix>usage reads the caller's quota counters (QuotaStore::usage, charging nothing),
//!       its month to date (history::HistoryStore::hours), its owner's credit balance (credits ledger) and its
//!       customer's Stripe subscriptions (catalog snapshot) ─> usage::build (plain values in, JSON out)
//!    ─> Verdict { reason: SelfService, answer: Some(200 JSON) }
//! ─> envoy::authz: a denied CheckResponse carrying the answer's status: Envoy sends it to the client, and
//!    the upstream never sees the request
//! ```
//!
//! # What it never does
//! - Reach the upstream: the answer is Envoy's local reply, whatever its status (200, 404, 405).
//! - Spend or bill: no quota is charged (counters are read), no credit is held, and the metadata says
//!   `decision: self_service` with no product, so metering counts the request neither as allowed nor as
//!   denied and no meter bills it. A refused credential is an ordinary denial (`decision: deny`), as for any
//!   call: nothing distinguishes a refused self-service request from any other.
//! - Show another partner's data: every read is keyed by what entitlement resolved from the caller's own
//!   credential (its app's quota buckets, its app's rollups, its owner's balance, its customer's
//!   subscriptions); nothing in the request names whose data to read. A portal account without a Stripe
//!   customer has no month to date (the rollups of calls without a customer are everyone's).
//! - Show a secret: no key, key hash, client id or token goes into the answer.
//!
//! # Layout
//! This file: the prefix (config), the routing and the reads; `usage.rs`: the answer built from plain values;
//! `tests.rs`: routing, the answer, and whole Checks with two partners side by side. End to end through Envoy:
//! `tests/envoy_selfservice.rs`.

pub mod usage;

use std::sync::Arc;
use std::time::Duration;

use crate::catalog::{Catalog, SubscriptionStatus};
use crate::check::buckets::{Owner, owner_quotas};
use crate::check::entitle::Entitled;
use crate::check::{Answer, Settings};
use crate::credits::Credits;
use crate::credits::catalog::owner as credit_owner;
use crate::history::{HistoryStore, Subject};
use crate::matching::path;
use crate::paywall::access::{Access, access, access_ends};
use crate::quota::{QuotaStore, Unit, window_at};
use crate::selfservice::usage::{
    Counter, Facts, ProductFacts, Read, SubscriptionFacts, Who, build,
};

/// The default `self_service.path_prefix`.
pub const DEFAULT_PREFIX: &str = "/.tollgate/";

/// How long each read (quota counters, history, credits) may take: they run side by side, well inside
/// Envoy's ext_authz timeout; a read that takes longer is reported as unavailable in the answer.
const READ_BUDGET: Duration = Duration::from_millis(200);

/// `self_service.path_prefix`, validated: `/`, then segments of `A-Za-z0-9._~-` (none `.` or `..`), each
/// followed by `/`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Prefix {
    text: String,
    segments: Vec<String>,
}

impl Prefix {
    /// Reads a prefix such as `/.tollgate/`; the error says what is wrong with it.
    pub fn parse(text: &str) -> Result<Prefix, String> {
        let Some(inner) = text
            .strip_prefix('/')
            .and_then(|rest| rest.strip_suffix('/'))
        else {
            return Err(format!("path_prefix {text:?} must start and end with /"));
        };
        if inner.is_empty() {
            return Err(
                "path_prefix must name at least one segment (/ alone would take every request)"
                    .into(),
            );
        }
        let mut segments = Vec::new();
        for segment in inner.split('/') {
            if segment.is_empty() || segment == "." || segment == ".." {
                return Err(format!(
                    "path_prefix {text:?} has an empty, . or .. segment"
                ));
            }
            if !segment
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"._~-".contains(&b))
            {
                return Err(format!(
                    "path_prefix {text:?} may hold only letters, digits and . _ ~ - between its slashes"
                ));
            }
            segments.push(segment.to_owned());
        }
        Ok(Prefix {
            text: text.to_owned(),
            segments,
        })
    }

    /// The prefix as configured.
    pub fn as_str(&self) -> &str {
        &self.text
    }
}

impl Default for Prefix {
    fn default() -> Self {
        Prefix {
            text: DEFAULT_PREFIX.to_owned(),
            segments: vec![".tollgate".to_owned()],
        }
    }
}

/// What a request under the prefix asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    /// `<prefix>usage`.
    Usage,
    /// Anything else under the prefix (the prefix itself included): 404.
    Unknown,
}

/// Whether `raw_path` (Envoy's `:path`, query included) is under `prefix`, and what it asks for.
///
/// Compared on the sanitized path's non-empty segments, so `//.tollgate//usage` and `/%2Etollgate/usage` are
/// self-service too, and nothing that reads as the prefix reaches the upstream. A path that does not sanitize
/// is not self-service: the ordinary Check refuses it (400).
pub fn route(raw_path: &str, prefix: &Prefix) -> Option<Route> {
    // Every Check passes here: most paths are told apart by one substring search, without decoding.
    let first = prefix.segments.first()?;
    let path = raw_path.split_once('?').map_or(raw_path, |(p, _)| p);
    if !path.contains(first.as_str()) && !path.contains('%') {
        return None;
    }
    let safe = path::sanitize(path).ok()?;
    let mut segments = safe.segments().filter(|s| !s.is_empty());
    for want in &prefix.segments {
        if segments.next()? != want {
            return None;
        }
    }
    let rest: Vec<&str> = segments.collect();
    Some(match rest.as_slice() {
        ["usage"] => Route::Usage,
        _ => Route::Unknown,
    })
}

/// What the answer reads besides the catalog snapshot.
#[derive(Clone)]
pub struct Sources {
    /// Quota counters (read, never charged).
    pub quota: Arc<dyn QuotaStore>,
    /// The hourly usage rollups; without them the answer has no month to date.
    pub history: Option<Arc<dyn HistoryStore>>,
    /// Prepaid balances; without them the answer has no credits.
    pub credits: Option<Arc<Credits>>,
}

/// The answer to an entitled caller's request under the prefix.
pub(crate) async fn respond(
    sources: &Sources,
    method: &str,
    route: Route,
    entitled: &Entitled<'_>,
    catalog: &Catalog,
    settings: &Settings,
    now: i64,
) -> Answer {
    if route == Route::Unknown {
        return error(
            404,
            "not_found",
            "unknown self-service path: GET <prefix>usage is served",
        );
    }
    if method != "GET" {
        let mut answer = error(
            405,
            "method_not_allowed",
            "the self-service usage answer is read with GET",
        );
        answer.headers.push(("allow", "GET".to_owned()));
        return answer;
    }
    let facts = gather(sources, entitled, catalog, settings, now).await;
    match serde_json::to_string(&build(&facts)) {
        Ok(body) => json(200, body),
        Err(e) => {
            tracing::warn!(error = %e, "self-service answer not serialized");
            error(500, "internal", "the usage answer could not be written")
        }
    }
}

/// Reads everything the usage answer says for the caller `entitled` resolved to.
async fn gather<'a>(
    sources: &Sources,
    entitled: &'a Entitled<'a>,
    catalog: &'a Catalog,
    settings: &'a Settings,
    now: i64,
) -> Facts<'a> {
    let id = &entitled.identity;
    let account = match entitled.owner {
        Owner::App(_) => None,
        Owner::Account(name) => Some(name),
    };
    let who = Who {
        app: id.app,
        account,
        developer: id.developer,
        company: id.company,
    };
    let products: Vec<ProductFacts<'a>> = entitled
        .subscriptions
        .iter()
        .filter(|s| s.status != SubscriptionStatus::Unsubscribed)
        .filter_map(|s| {
            let product = catalog.product(s.product)?;
            Some(ProductFacts {
                name: &product.name,
                status: s.status.as_str(),
                meter: product.meter.as_ref().map(|m| m.event_name.as_str()),
            })
        })
        .collect();
    let prepaid = entitled
        .subscriptions
        .iter()
        .filter(|s| s.status == SubscriptionStatus::Approved)
        .filter_map(|s| catalog.product(s.product))
        .any(|p| p.prepaid.is_some());

    let counters = read_counters(sources, entitled, catalog, now);
    let month_start = window_at(now, Unit::Month, 1).start;
    let history = read_history(sources, entitled, month_start, now);
    let owner = credit_owner(id.company, id.developer);
    let balance = read_balance(sources, owner, prepaid);
    let (counters, history, balance) = tokio::join!(counters, history, balance);

    let subscriptions = subscriptions(catalog, entitled.customer, now, settings.stripe_grace);
    Facts {
        who,
        environment: settings.environment.as_deref(),
        now,
        month_start,
        products,
        counters,
        history,
        balance,
        subscriptions,
    }
}

/// Where each of the caller's quota counters stands (no charge).
async fn read_counters<'a>(
    sources: &Sources,
    entitled: &Entitled<'_>,
    catalog: &'a Catalog,
    now: i64,
) -> Read<Vec<Counter<'a>>> {
    let quotas = owner_quotas(catalog, entitled.owner, &entitled.subscriptions);
    let read = async {
        let mut counters = Vec::new();
        for quota in quotas {
            for usage in sources
                .quota
                .usage(&quota.bucket, quota.limits, now)
                .await?
            {
                counters.push(Counter {
                    product: quota.product,
                    operation: quota.operation,
                    usage,
                });
            }
        }
        Ok::<_, crate::quota::StoreError>(counters)
    };
    match tokio::time::timeout(READ_BUDGET, read).await {
        Ok(Ok(counters)) => Read::Got(counters),
        Ok(Err(e)) => {
            tracing::warn!(error = %e, "self-service: quota counters unavailable");
            Read::Unavailable
        }
        Err(_) => {
            tracing::warn!("self-service: quota counters timed out");
            Read::Unavailable
        }
    }
}

/// The caller's hourly rollups of the month so far: its app's, or a portal account's own (the calls billed
/// to its Stripe customer without an app). `Absent` without a history store or a subject to read.
async fn read_history(
    sources: &Sources,
    entitled: &Entitled<'_>,
    month_start: i64,
    now: i64,
) -> Read<Vec<crate::history::Rollup>> {
    let Some(history) = &sources.history else {
        return Read::Absent;
    };
    let id = &entitled.identity;
    let (subject, app) = match (id.app, entitled.customer) {
        (Some(app), _) => (Subject::App(app.to_owned()), app),
        (None, Some(customer)) => (Subject::Customer(customer.to_owned()), ""),
        // Calls without an app and without a customer are rolled up together: none of them is this
        // caller's alone.
        (None, None) => return Read::Absent,
    };
    let read = history.hours(&subject, month_start, now.saturating_add(1));
    match tokio::time::timeout(READ_BUDGET, read).await {
        // The store already selected by subject; checked again here, so a row of anyone else never shows.
        Ok(Ok(rows)) => Read::Got(
            rows.into_iter()
                .filter(|r| r.dims.app == app)
                .filter(|r| match &subject {
                    Subject::Customer(c) => r.dims.customer == *c,
                    Subject::App(_) => true,
                })
                .collect(),
        ),
        Ok(Err(e)) => {
            tracing::warn!(error = %e, "self-service: usage history unavailable");
            Read::Unavailable
        }
        Err(_) => {
            tracing::warn!("self-service: usage history timed out");
            Read::Unavailable
        }
    }
}

/// The owner's prepaid balance: `Absent` when credits are not served, or the owner has no account and no
/// prepaid product.
async fn read_balance(sources: &Sources, owner: Option<&str>, prepaid: bool) -> Read<i64> {
    let (Some(credits), Some(owner)) = (&sources.credits, owner) else {
        return Read::Absent;
    };
    let read = credits.ledger().balance(owner);
    match tokio::time::timeout(READ_BUDGET, read).await {
        Ok(Ok(Some(balance))) => Read::Got(balance.balance),
        Ok(Ok(None)) if prepaid => Read::Got(0),
        Ok(Ok(None)) => Read::Absent,
        Ok(Err(e)) => {
            tracing::warn!(error = %e, "self-service: credit balance unavailable");
            Read::Unavailable
        }
        Err(_) => {
            tracing::warn!("self-service: credit balance timed out");
            Read::Unavailable
        }
    }
}

/// Every product sold through Stripe, and what the caller's customer's subscriptions make of it.
fn subscriptions<'a>(
    catalog: &'a Catalog,
    customer: Option<&str>,
    now: i64,
    grace: i64,
) -> Vec<SubscriptionFacts<'a>> {
    let paid = customer.map_or(&[][..], |c| catalog.paid_subscriptions(c));
    catalog
        .sold_through_stripe()
        .iter()
        .filter_map(|&id| catalog.product(id))
        .map(|p| {
            let (label, subscription) = match access(paid, &p.stripe_prices, now, grace) {
                Access::Granted(s) => ("granted", Some(s)),
                Access::PaymentRequired(s) => ("payment_required", Some(s)),
                Access::NotSubscribed(s) => ("forbidden", s),
            };
            SubscriptionFacts {
                product: &p.name,
                access: label,
                subscription: subscription.map(|s| s.state.id.clone()),
                status: subscription.map(|s| s.state.status.as_str()),
                access_ends_at: subscription.and_then(|s| access_ends(s, grace)),
            }
        })
        .collect()
}

/// A JSON answer that must not be cached on the way (it is the caller's live data).
fn json(status: u16, body: String) -> Answer {
    Answer {
        status,
        headers: vec![
            ("content-type", "application/json".to_owned()),
            ("cache-control", "no-store".to_owned()),
        ],
        body,
    }
}

/// `{"error": …, "message": …}` with `status`.
fn error(status: u16, code: &str, message: &str) -> Answer {
    json(
        status,
        serde_json::json!({"error": code, "message": message}).to_string(),
    )
}

#[cfg(test)]
mod tests;
