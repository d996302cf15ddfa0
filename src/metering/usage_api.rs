//! `GET /v1/usage?app=…` and `?customer=…`: per meter, the current and recent window totals, and for an app
//! its quota counters (filled in by the caller, which reads the quota store).

use chrono::{DateTime, Utc};
use serde::ser::SerializeMap;
use serde::{Deserialize, Serialize, Serializer};

use super::window::{Counts, GroupKey, Windows};

/// The query string of `/v1/usage`: exactly one of `app` or `customer`.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct UsageQuery {
    /// An app name.
    pub app: Option<String>,
    /// A Stripe customer id.
    pub customer: Option<String>,
}

/// The `/v1/usage` answer.
#[derive(Debug, Clone, Serialize)]
pub struct UsageReport {
    /// The app asked about, if any.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub app: Option<String>,
    /// The customer asked about, if any.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub customer: Option<String>,
    /// When the report was made.
    pub generated_at: DateTime<Utc>,
    /// `metering.window`, seconds.
    pub window_seconds: f64,
    /// `metering.lateness`, seconds.
    pub lateness_seconds: f64,
    /// One entry per meter (`meter: null` gathers records of products without a meter and denied callers
    /// whose product is unknown).
    pub meters: Vec<MeterUsage>,
    /// App reports: the app's quota counters (`quota`, or `quota: null` and `quota_error`); customer reports
    /// have none.
    #[serde(flatten)]
    pub quota: Option<AppQuota>,
}

/// What an app report says about the app's quota counters.
#[derive(Debug, Clone)]
pub enum AppQuota {
    /// `"quota": [...]`: every counter of the app (none for an app the catalog does not know).
    Counters(Vec<QuotaCounter>),
    /// `"quota": null, "quota_error": "..."`: the quota store did not answer.
    Unavailable,
}

/// What `quota_error` says when the quota store did not answer.
const QUOTA_UNAVAILABLE: &str = "the quota store did not answer";

impl Serialize for AppQuota {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        match self {
            AppQuota::Counters(counters) => {
                let mut map = serializer.serialize_map(Some(1))?;
                map.serialize_entry("quota", counters)?;
                map.end()
            }
            AppQuota::Unavailable => {
                let mut map = serializer.serialize_map(Some(2))?;
                map.serialize_entry("quota", &())?;
                map.serialize_entry("quota_error", QUOTA_UNAVAILABLE)?;
                map.end()
            }
        }
    }
}

/// Where one quota limit of an app stands now.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct QuotaCounter {
    /// The product the quota belongs to.
    pub product: String,
    /// The operation of an operation-level quota (`null`: the product's).
    pub operation: Option<String>,
    /// Units allowed per window.
    pub limit: u64,
    /// Window length in `unit`s.
    pub interval: u32,
    /// The calendar unit, as the catalog writes it (`second` to `month`).
    pub unit: String,
    /// First second of the current window (RFC 3339 with a `+00:00` offset).
    #[serde(serialize_with = "rfc3339")]
    pub window_start: Option<DateTime<Utc>>,
    /// First second after the current window.
    #[serde(serialize_with = "rfc3339")]
    pub window_end: Option<DateTime<Utc>>,
    /// Units counted in the window.
    pub used: u64,
    /// Units leased to replicas and not reported as served yet.
    pub reserved: u64,
    /// What can still be granted in the window: `limit - used - reserved`, at least 0.
    pub remaining: u64,
}

/// Quota times as chrono's `to_rfc3339` writes them (`+00:00`, unlike the `Z` of window times): the format
/// `/v1/usage` has always used for them.
fn rfc3339<S: Serializer>(t: &Option<DateTime<Utc>>, serializer: S) -> Result<S::Ok, S::Error> {
    match t {
        Some(t) => serializer.serialize_str(&t.to_rfc3339()),
        None => serializer.serialize_none(),
    }
}

/// The windows of one meter.
#[derive(Debug, Clone, Serialize)]
pub struct MeterUsage {
    /// The meter's event name.
    pub meter: Option<String>,
    /// Newest window first.
    pub windows: Vec<WindowUsage>,
}

/// Where a window is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum WindowState {
    /// Now is inside the window.
    Open,
    /// Ended, within the lateness allowance: records still join it.
    Closing,
    /// Sealed into the outbox (late records still make new revisions until it is forgotten).
    Sealed,
}

/// One window's totals.
#[derive(Debug, Clone, Serialize)]
pub struct WindowUsage {
    /// Window start.
    pub start: DateTime<Utc>,
    /// Window end (exclusive).
    pub end: DateTime<Utc>,
    /// Open, closing or sealed.
    pub state: WindowState,
    /// Records (allowed, denied, and requests ext_authz did not see).
    pub records: u64,
    /// Allowed by ext_authz.
    pub allowed: u64,
    /// Denied by ext_authz.
    pub denied: u64,
    /// Billable: allowed, and the status matched the meter's success classes.
    pub billable: u64,
    /// Sum of the billable records' meter values.
    pub value: u64,
    /// Customer reports: the value already sealed into the outbox (`value - sealed_value` waits for the next
    /// revision).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sealed_value: Option<u64>,
    /// Customer reports: revisions sealed so far.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub revisions: Option<u32>,
}

/// Why a usage query was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("give exactly one of the query parameters app or customer")]
pub struct BadQuery;

/// Who a validated query is about.
pub(crate) enum Subject<'a> {
    App(&'a str),
    Customer(&'a str),
}

impl UsageQuery {
    pub(crate) fn subject(&self) -> Result<Subject<'_>, BadQuery> {
        let app = self.app.as_deref().filter(|s| !s.is_empty());
        let customer = self.customer.as_deref().filter(|s| !s.is_empty());
        match (app, customer) {
            (Some(a), None) => Ok(Subject::App(a)),
            (None, Some(c)) => Ok(Subject::Customer(c)),
            _ => Err(BadQuery),
        }
    }
}

/// Builds the report from the retained windows.
pub(crate) fn report(
    windows: &Windows,
    subject: &Subject<'_>,
    now_ms: i64,
    window_ms: i64,
    lateness_ms: i64,
) -> UsageReport {
    use std::collections::BTreeMap;
    let mut per_meter: BTreeMap<&str, BTreeMap<super::window::WindowKey, Counts>> = BTreeMap::new();
    for (key, counts) in windows.usage() {
        let wanted = match subject {
            Subject::App(app) => key.app == *app,
            Subject::Customer(customer) => key.customer == *customer,
        };
        if !wanted {
            continue;
        }
        let sum = per_meter
            .entry(key.meter.as_str())
            .or_default()
            .entry(key.window)
            .or_default();
        sum.records += counts.records;
        sum.allowed += counts.allowed;
        sum.denied += counts.denied;
        sum.billable += counts.billable;
        sum.value = sum.value.saturating_add(counts.value);
    }
    let meters = per_meter
        .into_iter()
        .map(|(meter, by_window)| MeterUsage {
            meter: Some(meter.to_owned()).filter(|m| !m.is_empty()),
            windows: by_window
                .into_iter()
                .rev()
                .map(|(window, c)| {
                    let sealed = match subject {
                        Subject::Customer(customer) => windows.groups().get(&GroupKey {
                            window,
                            customer: (*customer).to_owned(),
                            meter: meter.to_owned(),
                        }),
                        Subject::App(_) => None,
                    };
                    let end = window.end_ms();
                    WindowUsage {
                        start: datetime(window.start_ms),
                        end: datetime(end),
                        state: if now_ms < end {
                            WindowState::Open
                        } else if now_ms < end.saturating_add(lateness_ms) {
                            WindowState::Closing
                        } else {
                            WindowState::Sealed
                        },
                        records: c.records,
                        allowed: c.allowed,
                        denied: c.denied,
                        billable: c.billable,
                        value: c.value,
                        sealed_value: match subject {
                            Subject::Customer(_) => Some(sealed.map_or(0, |g| g.sealed)),
                            Subject::App(_) => None,
                        },
                        revisions: match subject {
                            Subject::Customer(_) => Some(sealed.map_or(0, |g| g.revisions)),
                            Subject::App(_) => None,
                        },
                    }
                })
                .collect(),
        })
        .collect();
    let (app, customer) = match subject {
        Subject::App(a) => (Some((*a).to_owned()), None),
        Subject::Customer(c) => (None, Some((*c).to_owned())),
    };
    UsageReport {
        app,
        customer,
        generated_at: datetime(now_ms),
        window_seconds: window_ms as f64 / 1_000.0,
        lateness_seconds: lateness_ms as f64 / 1_000.0,
        meters,
        quota: None,
    }
}

fn datetime(ms: i64) -> DateTime<Utc> {
    DateTime::from_timestamp_millis(ms).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metering::record::{SpooledRecord, UsageRecord};

    fn add(w: &mut Windows, app: &str, customer: &str, decision: &str, start_ms: i64) {
        let window = w.assign(start_ms, start_ms, 1_000);
        w.add(&SpooledRecord {
            record: Some(UsageRecord {
                request_id: format!("{app}{start_ms}"),
                start_ms,
                decision: decision.into(),
                app: app.into(),
                stripe_customer: customer.into(),
                ..Default::default()
            }),
            received_ms: start_ms,
            window_start_ms: window.start_ms,
            window_len_ms: window.len_ms,
            meter: "calls".into(),
            value: 1,
            billable: decision == "allow",
        });
    }

    #[test]
    fn a_customer_report_sums_its_apps_and_shows_what_is_sealed() {
        let mut w = Windows::new(500, 10_000);
        add(&mut w, "a1", "cus", "allow", 1_100);
        add(&mut w, "a2", "cus", "allow", 1_200);
        add(&mut w, "a2", "cus", "deny", 1_300);
        add(&mut w, "a2", "cus", "allow", 2_100);
        add(&mut w, "other", "cus_x", "allow", 1_100);
        for d in w.due(2_500) {
            w.mark_sealed(&d, 2_500);
        }
        let r = report(&w, &Subject::Customer("cus"), 2_600, 1_000, 500);
        let json = serde_json::to_value(&r).unwrap();
        assert_eq!(json["customer"], "cus");
        let windows = &json["meters"][0]["windows"];
        assert_eq!(json["meters"][0]["meter"], "calls");
        assert_eq!(windows[0]["state"], "open");
        assert_eq!(windows[0]["value"], 1);
        assert_eq!(windows[0]["sealed_value"], 0);
        assert_eq!(windows[1]["state"], "sealed");
        assert_eq!(windows[1]["records"], 3);
        assert_eq!(windows[1]["denied"], 1);
        assert_eq!(windows[1]["value"], 2);
        assert_eq!(windows[1]["sealed_value"], 2);
        assert_eq!(windows[1]["revisions"], 1);
        assert_eq!(windows[1]["start"], "1970-01-01T00:00:01Z");

        let r = report(&w, &Subject::App("a2"), 2_600, 1_000, 500);
        let json = serde_json::to_value(&r).unwrap();
        assert_eq!(json["meters"][0]["windows"][1]["records"], 2);
        assert!(
            json["meters"][0]["windows"][1]
                .get("sealed_value")
                .is_none()
        );
    }

    #[test]
    fn app_reports_carry_quota_counters_or_say_why_not() {
        let w = Windows::new(500, 10_000);
        let mut r = report(&w, &Subject::App("a"), 2_600, 1_000, 500);
        let json = serde_json::to_value(&r).unwrap();
        assert!(json.get("quota").is_none() && json.get("quota_error").is_none());

        r.quota = Some(AppQuota::Counters(vec![QuotaCounter {
            product: "weather".into(),
            operation: None,
            limit: 100,
            interval: 1,
            unit: "day".into(),
            window_start: DateTime::from_timestamp(86_400, 0),
            window_end: DateTime::from_timestamp(2 * 86_400, 0),
            used: 7,
            reserved: 0,
            remaining: 93,
        }]));
        let json = serde_json::to_value(&r).unwrap();
        let counter = &json["quota"][0];
        assert_eq!(counter["operation"], serde_json::Value::Null);
        assert_eq!(counter["window_start"], "1970-01-02T00:00:00+00:00");
        assert_eq!(counter["remaining"], 93);
        assert!(json.get("quota_error").is_none());

        r.quota = Some(AppQuota::Unavailable);
        let json = serde_json::to_value(&r).unwrap();
        assert_eq!(json["quota"], serde_json::Value::Null);
        assert!(json.as_object().unwrap().contains_key("quota"));
        assert_eq!(json["quota_error"], "the quota store did not answer");
    }

    #[test]
    fn a_query_names_exactly_one_subject() {
        let q = |app: Option<&str>, customer: Option<&str>| UsageQuery {
            app: app.map(str::to_owned),
            customer: customer.map(str::to_owned),
        };
        assert!(q(Some("a"), None).subject().is_ok());
        assert!(q(None, Some("c")).subject().is_ok());
        assert_eq!(q(None, None).subject().err(), Some(BadQuery));
        assert_eq!(q(Some("a"), Some("c")).subject().err(), Some(BadQuery));
        assert_eq!(q(Some(""), None).subject().err(), Some(BadQuery));
    }
}
