//! `GET <prefix>usage`: the caller's view, built from plain values read for it (no I/O here).
//!
//! ```json
//! {"app": "weatherapp", "account": null, "developer": "dev@acme.test", "company": "acme",
//!  "environment": "prod", "as_of": "2026-12-14T10:00:00Z",
//!  "products": [{"name": "weather_free", "status": "approved", "meter": "weather_calls",
//!                "quotas": [{"operation": null, "limit": 1000, "interval": 1, "unit": "day", "used": 12,
//!                            "reserved": 0, "remaining": 988, "window_start": "…", "window_end": "…"}]}],
//!  "month_to_date": {"from": "2026-12-01T00:00:00Z", "to": "2026-12-14T10:00:00Z",
//!                    "meters": [{"meter": "weather_calls", "allowed": 12, "denied": 1, "billable": 12,
//!                                "value": 12, "products": [{"product": "weather_free", …}]}]},
//!  "credits": {"balance": 480},
//!  "subscriptions": [{"product": "weather_pro", "access": "granted", "subscription": "sub_…",
//!                     "status": "active", "access_ends_at": null}],
//!  "unavailable": []}
//! ```
//!
//! `month_to_date` is `null` without a history store (or for a portal account without a Stripe customer) and
//! counts the windows metering has sealed (a minute or two behind); `credits` is `null` when the owner has no
//! balance and no prepaid product; `subscriptions` is empty when nothing is sold through Stripe. A part that
//! could not be read in time is named in `unavailable` (`quota`, `month_to_date`, `credits`) and left empty or
//! `null`, so the rest still answers.

use std::collections::BTreeMap;

use serde::Serialize;

use crate::history::{Counts, Rollup};
use crate::quota::LimitUsage;
use crate::state::sql::rfc3339;

/// The outcome of one read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Read<T> {
    /// Read.
    Got(T),
    /// Nothing to read for this caller (or the source is not configured).
    Absent,
    /// The source failed or did not answer in time.
    Unavailable,
}

/// Who the answer is about: the caller's own names, as entitlement resolved them.
#[derive(Debug, Clone, Copy, Default)]
pub struct Who<'a> {
    /// The catalog app (none for a portal token).
    pub app: Option<&'a str>,
    /// A portal token's account (its company, else its developer), when it has no app.
    pub account: Option<&'a str>,
    /// Developer e-mail.
    pub developer: Option<&'a str>,
    /// The developer's company.
    pub company: Option<&'a str>,
}

/// One of the caller's products.
#[derive(Debug, Clone, Copy)]
pub struct ProductFacts<'a> {
    /// The product.
    pub name: &'a str,
    /// The subscription's state as the Check sees it (`approved`, `pending`, `revoked`, `payment_required`).
    pub status: &'static str,
    /// The Stripe meter's event name, when the product is metered.
    pub meter: Option<&'a str>,
}

/// One limit of one of the caller's quota counters.
#[derive(Debug, Clone, Copy)]
pub struct Counter<'a> {
    /// The product.
    pub product: &'a str,
    /// The operation, when the counter is its own quota.
    pub operation: Option<&'a str>,
    /// Where the limit stands.
    pub usage: LimitUsage,
}

/// A product sold through Stripe and what the caller's subscriptions make of it.
#[derive(Debug, Clone)]
pub struct SubscriptionFacts<'a> {
    /// The product.
    pub product: &'a str,
    /// `granted`, `payment_required` or `forbidden`.
    pub access: &'static str,
    /// The subscription that decides (`sub_…`), if any.
    pub subscription: Option<String>,
    /// Its Stripe status.
    pub status: Option<&'static str>,
    /// When a past-due subscription's access ends (Unix seconds).
    pub access_ends_at: Option<i64>,
}

/// Everything read for one caller.
#[derive(Debug, Clone)]
pub struct Facts<'a> {
    /// Whose view.
    pub who: Who<'a>,
    /// The environment this sidecar serves.
    pub environment: Option<&'a str>,
    /// Unix seconds.
    pub now: i64,
    /// Start of the current calendar month (UTC), Unix seconds.
    pub month_start: i64,
    /// The caller's products, in its subscriptions' order.
    pub products: Vec<ProductFacts<'a>>,
    /// Its quota counters.
    pub counters: Read<Vec<Counter<'a>>>,
    /// Its hourly rollups of the month so far.
    pub history: Read<Vec<Rollup>>,
    /// Its owner's prepaid balance.
    pub balance: Read<i64>,
    /// Products sold through Stripe.
    pub subscriptions: Vec<SubscriptionFacts<'a>>,
}

/// The answer's JSON.
#[derive(Debug, Serialize, PartialEq, Eq)]
pub struct UsageAnswer {
    /// The caller's app.
    pub app: Option<String>,
    /// A portal token's account, when it has no app.
    pub account: Option<String>,
    /// Developer e-mail.
    pub developer: Option<String>,
    /// The developer's company.
    pub company: Option<String>,
    /// The environment this sidecar serves.
    pub environment: Option<String>,
    /// When the answer was made (RFC 3339).
    pub as_of: String,
    /// The caller's products with their quota counters.
    pub products: Vec<ProductView>,
    /// Usage since the start of the month (UTC).
    pub month_to_date: Option<MonthToDate>,
    /// The owner's prepaid credits.
    pub credits: Option<CreditsView>,
    /// Products sold through Stripe and the caller's access to them.
    pub subscriptions: Vec<SubscriptionView>,
    /// Parts that could not be read: `quota`, `month_to_date`, `credits`.
    pub unavailable: Vec<&'static str>,
}

/// One product.
#[derive(Debug, Serialize, PartialEq, Eq)]
pub struct ProductView {
    /// The product.
    pub name: String,
    /// `approved`, `pending`, `revoked` or `payment_required`.
    pub status: &'static str,
    /// Its Stripe meter, if metered.
    pub meter: Option<String>,
    /// Its quota counters (approved products only).
    pub quotas: Vec<QuotaView>,
}

/// One limit of a quota counter, now.
#[derive(Debug, Serialize, PartialEq, Eq)]
pub struct QuotaView {
    /// The operation whose own quota this is (`null`: the product's).
    pub operation: Option<String>,
    /// Units allowed per window.
    pub limit: u64,
    /// Window length in `unit`s.
    pub interval: u32,
    /// The calendar unit.
    pub unit: &'static str,
    /// Units counted in the window.
    pub used: u64,
    /// Units leased to replicas and not reported yet.
    pub reserved: u64,
    /// What can still be granted in the window.
    pub remaining: u64,
    /// First second of the window (RFC 3339).
    pub window_start: String,
    /// First second after it.
    pub window_end: String,
}

/// Usage since the start of the month.
#[derive(Debug, Serialize, PartialEq, Eq)]
pub struct MonthToDate {
    /// The month's first second (RFC 3339).
    pub from: String,
    /// Now (RFC 3339).
    pub to: String,
    /// Per meter (`null`: products without a meter), in name order.
    pub meters: Vec<MeterUsage>,
}

/// One meter's month to date.
#[derive(Debug, Serialize, PartialEq, Eq)]
pub struct MeterUsage {
    /// The Stripe meter's event name (`null`: calls to products without a meter).
    pub meter: Option<String>,
    /// The totals.
    #[serde(flatten)]
    pub counts: Counts,
    /// The same per product, in name order.
    pub products: Vec<ProductUsage>,
}

/// One product's part of a meter's month to date.
#[derive(Debug, Serialize, PartialEq, Eq)]
pub struct ProductUsage {
    /// The product (`null`: calls no product covered).
    pub product: Option<String>,
    /// Its counts.
    #[serde(flatten)]
    pub counts: Counts,
}

/// The owner's prepaid credits.
#[derive(Debug, Serialize, PartialEq, Eq)]
pub struct CreditsView {
    /// Free credits (what replicas hold leased counts as spent).
    pub balance: i64,
}

/// A product sold through Stripe.
#[derive(Debug, Serialize, PartialEq, Eq)]
pub struct SubscriptionView {
    /// The product.
    pub product: String,
    /// `granted`, `payment_required` or `forbidden`.
    pub access: &'static str,
    /// The subscription that decides.
    pub subscription: Option<String>,
    /// Its Stripe status.
    pub status: Option<&'static str>,
    /// When a past-due subscription's access ends (RFC 3339).
    pub access_ends_at: Option<String>,
}

/// Builds the answer from what was read.
pub fn build(facts: &Facts<'_>) -> UsageAnswer {
    let own = |s: Option<&str>| s.map(str::to_owned);
    let mut unavailable = Vec::new();
    let counters: &[Counter<'_>] = match &facts.counters {
        Read::Got(counters) => counters,
        Read::Absent => &[],
        Read::Unavailable => {
            unavailable.push("quota");
            &[]
        }
    };
    let products = facts
        .products
        .iter()
        .map(|p| ProductView {
            name: p.name.to_owned(),
            status: p.status,
            meter: own(p.meter),
            quotas: counters
                .iter()
                .filter(|c| c.product == p.name)
                .map(quota_view)
                .collect(),
        })
        .collect();
    let month_to_date = match &facts.history {
        Read::Got(rows) => Some(month_to_date(rows, facts.month_start, facts.now)),
        Read::Absent => None,
        Read::Unavailable => {
            unavailable.push("month_to_date");
            None
        }
    };
    let credits = match facts.balance {
        Read::Got(balance) => Some(CreditsView { balance }),
        Read::Absent => None,
        Read::Unavailable => {
            unavailable.push("credits");
            None
        }
    };
    UsageAnswer {
        app: own(facts.who.app),
        account: own(facts.who.account),
        developer: own(facts.who.developer),
        company: own(facts.who.company),
        environment: own(facts.environment),
        as_of: rfc3339(facts.now),
        products,
        month_to_date,
        credits,
        subscriptions: facts
            .subscriptions
            .iter()
            .map(|s| SubscriptionView {
                product: s.product.to_owned(),
                access: s.access,
                subscription: s.subscription.clone(),
                status: s.status,
                access_ends_at: s.access_ends_at.map(rfc3339),
            })
            .collect(),
        unavailable,
    }
}

fn quota_view(counter: &Counter<'_>) -> QuotaView {
    let u = &counter.usage;
    QuotaView {
        operation: counter.operation.map(str::to_owned),
        limit: u.limit.limit,
        interval: u.limit.interval,
        unit: u.limit.unit.as_str(),
        used: u.used,
        reserved: u.reserved,
        remaining: u
            .limit
            .limit
            .saturating_sub(u.used.saturating_add(u.reserved)),
        window_start: rfc3339(u.window.start),
        window_end: rfc3339(u.window.end),
    }
}

/// Sums the hourly rows per meter and, within it, per product.
fn month_to_date(rows: &[Rollup], from: i64, now: i64) -> MonthToDate {
    let mut meters: BTreeMap<&str, (Counts, BTreeMap<&str, Counts>)> = BTreeMap::new();
    // Rows that counted nothing (requests neither allowed nor denied, such as self-service ones) say nothing.
    for row in rows.iter().filter(|r| r.counts != Counts::default()) {
        let (total, products) = meters.entry(row.dims.meter.as_str()).or_default();
        total.add(&row.counts);
        products
            .entry(row.dims.product.as_str())
            .or_default()
            .add(&row.counts);
    }
    let named = |s: &str| (!s.is_empty()).then(|| s.to_owned());
    MonthToDate {
        from: rfc3339(from),
        to: rfc3339(now),
        meters: meters
            .into_iter()
            .map(|(meter, (counts, products))| MeterUsage {
                meter: named(meter),
                counts,
                products: products
                    .into_iter()
                    .map(|(product, counts)| ProductUsage {
                        product: named(product),
                        counts,
                    })
                    .collect(),
            })
            .collect(),
    }
}
