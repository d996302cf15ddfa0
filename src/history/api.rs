//! `GET /v1/usage/history` on the admin listener (CONTRACT §10): the hourly rollups of one customer or one app
//! over a range, summed per UTC hour, day or month, as JSON or CSV, a page at a time.
//!
//! # The query
//! Exactly one of `customer` (Stripe customer id) or `app` (app name); `from` and `to` as RFC 3339 instants or
//! `YYYY-MM-DD` dates (UTC midnight), on whole UTC hours, `to` exclusive, at most [`MAX_RANGE_DAYS`] apart;
//! `granularity` `hour`, `day` (default) or `month` (UTC calendar); `limit` series rows per page (default
//! [`DEFAULT_LIMIT`], at most [`MAX_LIMIT`]); `after`, the opaque cursor a previous page answered as
//! `next_after`. Without `to`, the range ends at the next whole UTC hour after now (the current hour
//! included); without `from`, it starts at the beginning of the UTC month of the range's last hour: no
//! parameter but the subject means the current month to date. Any other parameter is refused, so a typo
//! never silently falls back to a default.
//!
//! # The answer
//! One series row per (bucket, app, product, meter), and customer when the query names an app, in that order;
//! a row's `start` is its calendar bucket's start even when `from` cuts into the bucket. `totals` sums the
//! whole range per meter, on every page. Empty dimensions (no customer, no meter, …) read `null` in JSON and
//! empty in CSV. CSV (`Accept: text/csv`) carries the series only; the next page is named by the `Link`
//! (`rel="next"`) and `next-after` headers, which JSON answers carry too.
//!
//! # Bounded work
//! A page reads the range from its cursor on, in chunks sized to about [`CHUNK_TARGET_ROWS`] rows, and stops
//! once it holds its rows: work and memory follow the page, not the range. By hour the chunks are the
//! hourly rows ([`HistoryStore::hours`]); by day and by month the database sums them first
//! ([`HistoryStore::sums`]: a month of 24 hourly rows a day reads a 24th of the rows). The totals are
//! counted along when the page covers the whole range; otherwise the database sums the range in one
//! statement. A page that would read more than [`MAX_SCANNED_ROWS`] rows is refused (narrow the range, or
//! ask per app).

use std::collections::BTreeMap;

use axum::Json;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use chrono::{DateTime, Datelike, NaiveDate, SecondsFormat, TimeZone, Utc};
use serde::Serialize;
use sha2::{Digest, Sha256};

use crate::app::admin::AdminState;
use crate::history::store::{Counts, HistoryStore, Rollup, Subject};
use crate::state::StoreError;

/// Series rows per page when `limit` is not given.
pub const DEFAULT_LIMIT: usize = 1000;

/// The largest `limit` accepted.
pub const MAX_LIMIT: usize = 10_000;

/// The longest range accepted, in days (what the store keeps).
pub const MAX_RANGE_DAYS: i64 = 400;

/// The most rows one request may read from the store (hourly rows by hour, daily or monthly sums by day or
/// month); a range needing more is refused.
pub const MAX_SCANNED_ROWS: usize = 1_000_000;

/// About how many hourly rows one read of the store fetches: the chunks of a range are sized to it from the
/// density of the previous chunk.
pub const CHUNK_TARGET_ROWS: usize = 20_000;

/// The first chunk of a range read by the hour, in hours (its density sizes the next ones); by day and month
/// the first chunk is [`MAX_CHUNK_HOURS`] (or the month).
const FIRST_CHUNK_HOURS: i64 = 24;

/// The longest chunk, in hours (31 days).
const MAX_CHUNK_HOURS: i64 = 31 * 24;

const HOUR: i64 = 3600;
const DAY: i64 = 24 * HOUR;

/// The size of the buckets hourly rows are summed into (UTC calendar).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Granularity {
    /// One bucket per UTC hour (the rows as stored).
    Hour,
    /// One bucket per UTC day.
    Day,
    /// One bucket per UTC calendar month.
    Month,
}

impl Granularity {
    /// `hour`, `day` or `month`.
    pub fn as_str(self) -> &'static str {
        match self {
            Granularity::Hour => "hour",
            Granularity::Day => "day",
            Granularity::Month => "month",
        }
    }

    fn parse(value: &str) -> Option<Granularity> {
        match value {
            "hour" => Some(Granularity::Hour),
            "day" => Some(Granularity::Day),
            "month" => Some(Granularity::Month),
            _ => None,
        }
    }

    /// The bucket holding the instant `at` (Unix seconds): its start and its end.
    pub fn bucket(self, at: i64) -> (i64, i64) {
        match self {
            Granularity::Hour => {
                let start = at.div_euclid(HOUR) * HOUR;
                (start, start + HOUR)
            }
            Granularity::Day => {
                let start = at.div_euclid(DAY) * DAY;
                (start, start + DAY)
            }
            Granularity::Month => {
                let (year, month) = match DateTime::from_timestamp(at, 0) {
                    Some(t) => (t.year(), t.month()),
                    None => (1970, 1),
                };
                let (next_year, next_month) = if month == 12 {
                    (year + 1, 1)
                } else {
                    (year, month + 1)
                };
                (month_start(year, month), month_start(next_year, next_month))
            }
        }
    }
}

/// 00:00 UTC on the first of the month, Unix seconds.
fn month_start(year: i32, month: u32) -> i64 {
    NaiveDate::from_ymd_opt(year, month, 1)
        .and_then(|d| d.and_hms_opt(0, 0, 0))
        .map_or(0, |t| Utc.from_utc_datetime(&t).timestamp())
}

/// RFC 3339 in UTC, whole seconds: `2026-12-01T00:00:00Z`.
fn rfc3339(at: i64) -> String {
    DateTime::from_timestamp(at, 0)
        .unwrap_or_default()
        .to_rfc3339_opts(SecondsFormat::Secs, true)
}

/// A query the endpoint refuses (400), naming the parameter at fault where there is one.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum QueryError {
    /// Neither `customer` nor `app`.
    #[error("name exactly one of customer=<stripe customer id> or app=<app name>")]
    NoSubject,
    /// Both `customer` and `app`.
    #[error("name exactly one of customer or app, not both")]
    TwoSubjects,
    /// `customer=` or `app=` with nothing after it.
    #[error("{0} must not be empty")]
    EmptySubject(&'static str),
    /// A parameter this endpoint does not know.
    #[error("unknown parameter {0:?} (known: customer, app, from, to, granularity, limit, after)")]
    Unknown(String),
    /// A parameter given twice.
    #[error("{0} is given more than once")]
    Repeated(String),
    /// `from` or `to` is neither RFC 3339 nor `YYYY-MM-DD`.
    #[error(
        "{field} {value:?} is not a date (YYYY-MM-DD, UTC) or an RFC 3339 instant (2026-12-01T00:00:00Z)"
    )]
    BadTime {
        /// `from` or `to`.
        field: &'static str,
        /// What was sent.
        value: String,
    },
    /// `from` or `to` inside an hour: the history is kept by whole UTC hours.
    #[error("{field} {value:?} is not on a whole UTC hour (the history is kept by the hour)")]
    NotOnHour {
        /// `from` or `to`.
        field: &'static str,
        /// What was sent.
        value: String,
    },
    /// `from` is not before `to`.
    #[error("from ({from}) must be before to ({to}; to is exclusive)")]
    EmptyRange {
        /// The range's start, RFC 3339.
        from: String,
        /// The range's end, RFC 3339.
        to: String,
    },
    /// The range is longer than [`MAX_RANGE_DAYS`].
    #[error("the range from {from} to {to} is longer than {MAX_RANGE_DAYS} days")]
    TooLong {
        /// The range's start, RFC 3339.
        from: String,
        /// The range's end, RFC 3339.
        to: String,
    },
    /// `granularity` is not hour, day or month.
    #[error("granularity {0:?} is not one of hour, day, month")]
    BadGranularity(String),
    /// `limit` is not a whole number from 1 to [`MAX_LIMIT`].
    #[error("limit {0:?} is not a whole number from 1 to {MAX_LIMIT}")]
    BadLimit(String),
    /// `after` is not a cursor of this query.
    #[error(
        "after is not a cursor this query answered (use next_after of the previous page, with the same customer or app, from, to and granularity)"
    )]
    BadCursor,
}

impl QueryError {
    /// The query parameter at fault, if one is.
    pub fn field(&self) -> Option<&str> {
        match self {
            QueryError::NoSubject | QueryError::TwoSubjects => None,
            QueryError::EmptySubject(field) => Some(field),
            QueryError::Unknown(name) | QueryError::Repeated(name) => Some(name),
            QueryError::BadTime { field, .. } | QueryError::NotOnHour { field, .. } => Some(field),
            QueryError::EmptyRange { .. } | QueryError::TooLong { .. } => Some("from"),
            QueryError::BadGranularity(_) => Some("granularity"),
            QueryError::BadLimit(_) => Some("limit"),
            QueryError::BadCursor => Some("after"),
        }
    }
}

/// Why a history page could not be answered.
#[derive(Debug, thiserror::Error)]
pub enum HistoryError {
    /// The query is refused (400).
    #[error(transparent)]
    Query(#[from] QueryError),
    /// A page would read more rows than one request may (400).
    #[error(
        "the range holds more than {MAX_SCANNED_ROWS} rows at this granularity: narrow from/to, or ask per app"
    )]
    TooManyRows,
    /// The store failed (503 when it is unreachable).
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// The sort key of a series row: (bucket start, app, product, meter, customer). The customer is empty when
/// the query names a customer (every row is that customer's).
type Key = (i64, String, String, String, String);

/// Where the previous page stopped: the key of its last row, bound to the query it answered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cursor {
    fingerprint: String,
    key: Key,
}

impl Cursor {
    /// The opaque form handed out as `next_after`.
    pub fn encode(&self) -> String {
        let (start, app, product, meter, customer) = &self.key;
        let json = serde_json::json!([self.fingerprint, start, app, product, meter, customer]);
        URL_SAFE_NO_PAD.encode(json.to_string())
    }

    fn decode(value: &str) -> Option<Cursor> {
        let bytes = URL_SAFE_NO_PAD.decode(value).ok()?;
        let (fingerprint, start, app, product, meter, customer): (
            String,
            i64,
            String,
            String,
            String,
            String,
        ) = serde_json::from_slice(&bytes).ok()?;
        Some(Cursor {
            fingerprint,
            key: (start, app, product, meter, customer),
        })
    }
}

/// A parsed, checked `/v1/usage/history` query.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HistoryQuery {
    /// Whose history.
    pub subject: Subject,
    /// The range's start, Unix seconds, on a whole hour (inclusive).
    pub from: i64,
    /// The range's end, Unix seconds, on a whole hour (exclusive).
    pub to: i64,
    /// The bucket size.
    pub granularity: Granularity,
    /// Series rows per page.
    pub limit: usize,
    /// Where the previous page stopped.
    pub after: Option<Cursor>,
}

impl HistoryQuery {
    /// Parses a query string (`None`: no query) as of `now` (Unix seconds, for the defaults).
    pub fn parse(raw: Option<&str>, now: i64) -> Result<HistoryQuery, QueryError> {
        let mut params: BTreeMap<String, String> = BTreeMap::new();
        for (name, value) in form_urlencoded::parse(raw.unwrap_or("").as_bytes()) {
            const KNOWN: [&str; 7] = [
                "customer",
                "app",
                "from",
                "to",
                "granularity",
                "limit",
                "after",
            ];
            if !KNOWN.contains(&name.as_ref()) {
                return Err(QueryError::Unknown(name.into_owned()));
            }
            if params
                .insert(name.clone().into_owned(), value.into_owned())
                .is_some()
            {
                return Err(QueryError::Repeated(name.into_owned()));
            }
        }
        let subject = match (params.get("customer"), params.get("app")) {
            (Some(_), Some(_)) => return Err(QueryError::TwoSubjects),
            (None, None) => return Err(QueryError::NoSubject),
            (Some(c), None) if c.is_empty() => return Err(QueryError::EmptySubject("customer")),
            (None, Some(a)) if a.is_empty() => return Err(QueryError::EmptySubject("app")),
            (Some(c), None) => Subject::Customer(c.clone()),
            (None, Some(a)) => Subject::App(a.clone()),
        };
        let to = match params.get("to") {
            Some(value) => instant("to", value)?,
            None => now.div_euclid(HOUR) * HOUR + HOUR,
        };
        let from = match params.get("from") {
            Some(value) => instant("from", value)?,
            None => Granularity::Month.bucket(to - HOUR).0,
        };
        if from >= to {
            return Err(QueryError::EmptyRange {
                from: rfc3339(from),
                to: rfc3339(to),
            });
        }
        if to - from > MAX_RANGE_DAYS * DAY {
            return Err(QueryError::TooLong {
                from: rfc3339(from),
                to: rfc3339(to),
            });
        }
        let granularity = match params.get("granularity") {
            None => Granularity::Day,
            Some(value) => Granularity::parse(value)
                .ok_or_else(|| QueryError::BadGranularity(value.clone()))?,
        };
        let limit = match params.get("limit") {
            None => DEFAULT_LIMIT,
            Some(value) => value
                .parse::<usize>()
                .ok()
                .filter(|n| (1..=MAX_LIMIT).contains(n))
                .ok_or_else(|| QueryError::BadLimit(value.clone()))?,
        };
        let mut query = HistoryQuery {
            subject,
            from,
            to,
            granularity,
            limit,
            after: None,
        };
        if let Some(value) = params.get("after") {
            let cursor = Cursor::decode(value).ok_or(QueryError::BadCursor)?;
            if cursor.fingerprint != query.fingerprint() {
                return Err(QueryError::BadCursor);
            }
            query.after = Some(cursor);
        }
        Ok(query)
    }

    /// What a cursor is bound to: the subject, the range and the granularity (not the limit: a client may
    /// change its page size between pages).
    fn fingerprint(&self) -> String {
        let (kind, value) = match &self.subject {
            Subject::Customer(c) => ("customer", c),
            Subject::App(a) => ("app", a),
        };
        let mut hash = Sha256::new();
        for part in [
            kind,
            value.as_str(),
            &self.from.to_string(),
            &self.to.to_string(),
            self.granularity.as_str(),
        ] {
            hash.update(part.as_bytes());
            hash.update([0]);
        }
        hex::encode(&hash.finalize()[..8])
    }

    fn by_app(&self) -> bool {
        matches!(self.subject, Subject::App(_))
    }
}

/// `from` or `to`: a `YYYY-MM-DD` date (UTC midnight) or an RFC 3339 instant on a whole UTC hour.
fn instant(field: &'static str, value: &str) -> Result<i64, QueryError> {
    let at = if let Ok(date) = NaiveDate::parse_from_str(value, "%Y-%m-%d") {
        date.and_hms_opt(0, 0, 0)
            .map(|t| Utc.from_utc_datetime(&t).timestamp())
    } else {
        // A `+` of an offset left unencoded in the query string arrives as a space.
        DateTime::parse_from_rfc3339(value)
            .or_else(|e| match value.rsplit_once(' ') {
                Some((head, tail)) if head.contains(['T', 't']) => {
                    DateTime::parse_from_rfc3339(&format!("{head}+{tail}"))
                }
                _ => Err(e),
            })
            .ok()
            .map(|t| t.timestamp())
    };
    let Some(at) = at else {
        return Err(QueryError::BadTime {
            field,
            value: value.to_owned(),
        });
    };
    if at % HOUR != 0 {
        return Err(QueryError::NotOnHour {
            field,
            value: value.to_owned(),
        });
    }
    Ok(at)
}

/// One series row: a bucket's sums for one (app, product, meter), and customer for app queries.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SeriesRow {
    /// The bucket's start, RFC 3339 UTC.
    pub start: String,
    /// The Stripe customer (app queries only; `null`: none).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub customer: Option<Option<String>>,
    /// The app (`null`: an unidentified caller).
    pub app: Option<String>,
    /// The product (`null`: none matched).
    pub product: Option<String>,
    /// The meter event name (`null`: the product has no meter).
    pub meter: Option<String>,
    /// Requests ext_authz allowed.
    pub allowed: u64,
    /// Requests it denied.
    pub denied: u64,
    /// Allowed requests the meter bills.
    pub billable: u64,
    /// The meter's value over the billable requests.
    pub value: u64,
}

/// The whole range's sums for one meter.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct MeterTotal {
    /// The meter event name (`null`: no meter).
    pub meter: Option<String>,
    /// Requests ext_authz allowed.
    pub allowed: u64,
    /// Requests it denied.
    pub denied: u64,
    /// Allowed requests the meter bills.
    pub billable: u64,
    /// The meter's value over the billable requests (what Stripe was sent).
    pub value: u64,
}

/// One page of `/v1/usage/history` (the JSON answer).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct HistoryPage {
    /// The customer asked about, if the query named one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub customer: Option<String>,
    /// The app asked about, if the query named one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub app: Option<String>,
    /// The range's start, RFC 3339 UTC (inclusive).
    pub from: String,
    /// The range's end, RFC 3339 UTC (exclusive).
    pub to: String,
    /// The bucket size.
    pub granularity: Granularity,
    /// This page's rows, in (start, app, product, meter, customer) order.
    pub series: Vec<SeriesRow>,
    /// The whole range's sums per meter (every page carries them), in meter order.
    pub totals: Vec<MeterTotal>,
    /// The cursor of the next page (`after=`), `null` on the last.
    pub next_after: Option<String>,
}

fn named(s: String) -> Option<String> {
    if s.is_empty() { None } else { Some(s) }
}

/// Reads one page: the range's rows from the cursor on, in chunks, summed into the page's buckets, and the
/// whole range's per-meter totals.
pub async fn read(
    store: &dyn HistoryStore,
    query: &HistoryQuery,
) -> Result<HistoryPage, HistoryError> {
    read_bounded(store, query, CHUNK_TARGET_ROWS, MAX_SCANNED_ROWS).await
}

/// [`read`] with its bounds as arguments (the tests make them small).
async fn read_bounded(
    store: &dyn HistoryStore,
    query: &HistoryQuery,
    chunk_target_rows: usize,
    max_scanned_rows: usize,
) -> Result<HistoryPage, HistoryError> {
    let by_app = query.by_app();
    let limit = query.limit;
    let after = query.after.as_ref().map(|c| &c.key);
    let mut rows: BTreeMap<Key, Counts> = BTreeMap::new();
    let mut totals: BTreeMap<String, Counts> = BTreeMap::new();
    let mut scanned = 0usize;
    let mut bucket = (i64::MIN, i64::MIN);
    let mut chunk = match query.granularity {
        Granularity::Hour => FIRST_CHUNK_HOURS,
        Granularity::Day | Granularity::Month => MAX_CHUNK_HOURS,
    };
    // A later page starts at its cursor's bucket (rows up to the cursor's are skipped below).
    let resume = after.map_or(query.from, |key| key.0.max(query.from));
    let mut at = resume;
    while at < query.to {
        let mut end = query.to.min(at.saturating_add(chunk * HOUR));
        let subject = &query.subject;
        let hours = match query.granularity {
            Granularity::Hour => store.hours(subject, at, end).await?,
            Granularity::Day => store.sums(subject, at, end, 0, DAY).await?,
            Granularity::Month => {
                // One month a chunk: its rows sum into one bucket.
                let (start, month_end) = Granularity::Month.bucket(at);
                end = end.min(month_end);
                store
                    .sums(subject, at, end, start, month_end - start)
                    .await?
            }
        };
        scanned += hours.len();
        if scanned > max_scanned_rows {
            return Err(HistoryError::TooManyRows);
        }
        // Sized from this chunk's density, growing at most fourfold (an empty stretch says little about
        // what follows it).
        let hours_read = usize::try_from((end - at) / HOUR).unwrap_or(1).max(1);
        let per_hour = hours.len().div_ceil(hours_read).max(1);
        let grown = chunk.saturating_mul(4).min(MAX_CHUNK_HOURS);
        chunk = i64::try_from(chunk_target_rows / per_hour)
            .unwrap_or(MAX_CHUNK_HOURS)
            .clamp(1, grown);
        for Rollup { hour, dims, counts } in hours {
            match totals.get_mut(&dims.meter) {
                Some(total) => total.add(&counts),
                None => {
                    totals.insert(dims.meter.clone(), counts);
                }
            }
            if !(bucket.0 <= hour && hour < bucket.1) {
                bucket = query.granularity.bucket(hour);
            }
            let customer = if by_app { dims.customer } else { String::new() };
            let key = (bucket.0, dims.app, dims.product, dims.meter, customer);
            if after.is_some_and(|after| key <= *after) {
                continue;
            }
            rows.entry(key).or_default().add(&counts);
        }
        at = end;
        // Every bucket ending by `end` is complete: once `limit + 1` rows of those are held, the page and
        // whether another follows are known, and the read stops.
        if let Some((key, _)) = rows.iter().nth(limit)
            && query.granularity.bucket(key.0).1 <= end
        {
            let past = rows.iter().nth(limit + 1).map(|(k, _)| k.clone());
            if let Some(past) = past {
                rows.split_off(&past);
            }
            break;
        }
    }
    // Totals counted along hold the whole range only when the read went from `from` to `to`; otherwise the
    // store sums the range into one bucket.
    if at < query.to || resume != query.from {
        totals.clear();
        let span = query.to - query.from;
        for row in store
            .sums(&query.subject, query.from, query.to, query.from, span)
            .await?
        {
            totals.entry(row.dims.meter).or_default().add(&row.counts);
        }
    }
    let next_after = match rows.keys().nth(limit).cloned() {
        Some(first_of_next) => {
            rows.split_off(&first_of_next);
            rows.keys().next_back().map(|last| {
                Cursor {
                    fingerprint: query.fingerprint(),
                    key: last.clone(),
                }
                .encode()
            })
        }
        None => None,
    };
    let mut series = Vec::with_capacity(rows.len());
    let mut formatted = (i64::MIN, String::new());
    for ((start, app, product, meter, customer), c) in rows {
        if formatted.0 != start {
            formatted = (start, rfc3339(start));
        }
        series.push(SeriesRow {
            start: formatted.1.clone(),
            customer: by_app.then(|| named(customer)),
            app: named(app),
            product: named(product),
            meter: named(meter),
            allowed: c.allowed,
            denied: c.denied,
            billable: c.billable,
            value: c.value,
        });
    }
    let totals = totals
        .into_iter()
        .map(|(meter, c)| MeterTotal {
            meter: named(meter),
            allowed: c.allowed,
            denied: c.denied,
            billable: c.billable,
            value: c.value,
        })
        .collect();
    let (customer, app) = match &query.subject {
        Subject::Customer(c) => (Some(c.clone()), None),
        Subject::App(a) => (None, Some(a.clone())),
    };
    Ok(HistoryPage {
        customer,
        app,
        from: rfc3339(query.from),
        to: rfc3339(query.to),
        granularity: query.granularity,
        series,
        totals,
        next_after,
    })
}

/// The page as CSV (RFC 4180: a header line, CRLF line ends, fields quoted when they hold `,`, `"`, CR or
/// LF): `start,[customer,]app,product,meter,allowed,denied,billable,value`, customer for app queries only.
pub fn to_csv(page: &HistoryPage) -> String {
    let by_app = page.app.is_some();
    let mut out = String::with_capacity(64 * (page.series.len() + 1));
    out.push_str(if by_app {
        "start,customer,app,product,meter,allowed,denied,billable,value\r\n"
    } else {
        "start,app,product,meter,allowed,denied,billable,value\r\n"
    });
    for row in &page.series {
        let text = |v: &Option<String>| v.as_deref().unwrap_or("").to_owned();
        let mut fields = vec![row.start.clone()];
        if by_app {
            fields.push(text(row.customer.as_ref().unwrap_or(&None)));
        }
        fields.extend([text(&row.app), text(&row.product), text(&row.meter)]);
        for (i, field) in fields.iter().enumerate() {
            if i > 0 {
                out.push(',');
            }
            csv_field(&mut out, field);
        }
        for n in [row.allowed, row.denied, row.billable, row.value] {
            out.push(',');
            out.push_str(&n.to_string());
        }
        out.push_str("\r\n");
    }
    out
}

fn csv_field(out: &mut String, field: &str) {
    if field.contains([',', '"', '\r', '\n']) {
        out.push('"');
        out.push_str(&field.replace('"', "\"\""));
        out.push('"');
    } else {
        out.push_str(field);
    }
}

/// Whether `Accept` prefers `text/csv` to JSON: each format takes the quality of the most specific range
/// naming it (`text/csv`, `text/*`; `application/json`, `application/*`, `*/*`); the higher quality wins,
/// then the more specific range, then the one listed first. No `Accept`, or nothing CSV: JSON.
pub fn wants_csv(headers: &HeaderMap) -> bool {
    // (quality in thousandths, specificity, position) of the best range naming each format.
    let mut csv: Option<(u32, u8, usize)> = None;
    let mut json: Option<(u32, u8, usize)> = None;
    let values = headers
        .get_all(header::ACCEPT)
        .iter()
        .filter_map(|v| v.to_str().ok());
    for (position, range) in values.flat_map(|v| v.split(',')).enumerate() {
        let mut parts = range.split(';');
        let media = parts.next().unwrap_or("").trim().to_ascii_lowercase();
        let quality = parts
            .filter_map(|p| p.trim().strip_prefix("q=").or(p.trim().strip_prefix("Q=")))
            .find_map(|q| q.trim().parse::<f32>().ok())
            .map_or(1000, |q| (q.clamp(0.0, 1.0) * 1000.0).round() as u32);
        let (slot, specificity) = match media.as_str() {
            "text/csv" => (&mut csv, 2),
            "text/*" => (&mut csv, 1),
            "application/json" => (&mut json, 2),
            "application/*" => (&mut json, 1),
            "*/*" => (&mut json, 0),
            _ => continue,
        };
        if slot.is_none_or(|(_, s, _)| specificity > s) {
            *slot = Some((quality, specificity, position));
        }
    }
    match (csv, json) {
        (Some((0, ..)), _) => false,
        (Some(_), None) => true,
        (Some((cq, cs, cp)), Some((jq, js, jp))) => {
            (cq, cs, std::cmp::Reverse(cp)) > (jq, js, std::cmp::Reverse(jp))
        }
        (None, _) => false,
    }
}

fn error(status: StatusCode, code: &str, field: Option<&str>, message: String) -> Response {
    let mut body = serde_json::json!({"error": code, "message": message});
    if let Some(field) = field {
        body["field"] = field.into();
    }
    (status, Json(body)).into_response()
}

/// The link to the next page: the same query with `after` set.
fn next_link(path: &str, query: &HistoryQuery, after: &str) -> String {
    let mut q = form_urlencoded::Serializer::new(String::new());
    match &query.subject {
        Subject::Customer(c) => q.append_pair("customer", c),
        Subject::App(a) => q.append_pair("app", a),
    };
    q.append_pair("from", &rfc3339(query.from))
        .append_pair("to", &rfc3339(query.to))
        .append_pair("granularity", query.granularity.as_str())
        .append_pair("limit", &query.limit.to_string())
        .append_pair("after", after);
    format!("<{path}?{}>; rel=\"next\"", q.finish())
}

/// `GET /v1/usage/history`: 404 without a history store, 400 for a refused query (`field` names the
/// parameter), 503 when the store is unreachable; JSON, or CSV for `Accept: text/csv`.
pub async fn usage_history(
    State(state): State<AdminState>,
    uri: Uri,
    headers: HeaderMap,
) -> Response {
    let Some(store) = &state.history else {
        return error(
            StatusCode::NOT_FOUND,
            "not_found",
            None,
            "usage history is not configured (it lives in the state store: set state.url)"
                .to_owned(),
        );
    };
    let query = match HistoryQuery::parse(uri.query(), Utc::now().timestamp()) {
        Ok(query) => query,
        Err(e) => {
            return error(
                StatusCode::BAD_REQUEST,
                "bad_request",
                e.field(),
                e.to_string(),
            );
        }
    };
    let page = match read(store.as_ref(), &query).await {
        Ok(page) => page,
        Err(e @ HistoryError::TooManyRows) => {
            return error(
                StatusCode::BAD_REQUEST,
                "range_too_large",
                None,
                e.to_string(),
            );
        }
        Err(HistoryError::Query(e)) => {
            return error(
                StatusCode::BAD_REQUEST,
                "bad_request",
                e.field(),
                e.to_string(),
            );
        }
        Err(HistoryError::Store(e)) => {
            tracing::warn!(error = %e, "usage history could not be read");
            let (status, code) = match e {
                StoreError::Corrupt(_) => (StatusCode::INTERNAL_SERVER_ERROR, "internal"),
                _ => (StatusCode::SERVICE_UNAVAILABLE, "unavailable"),
            };
            return error(
                status,
                code,
                None,
                "usage history could not be read".to_owned(),
            );
        }
    };
    let mut response = if wants_csv(&headers) {
        (
            [(header::CONTENT_TYPE, "text/csv; charset=utf-8")],
            to_csv(&page),
        )
            .into_response()
    } else {
        Json(&page).into_response()
    };
    let answer = response.headers_mut();
    answer.insert(header::VARY, HeaderValue::from_static("accept"));
    if let Some(after) = &page.next_after {
        let link = next_link(uri.path(), &query, after);
        if let (Ok(link), Ok(after)) = (HeaderValue::from_str(&link), HeaderValue::from_str(after))
        {
            answer.insert(header::LINK, link);
            answer.insert("next-after", after);
        }
    }
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    /// 2026-12-15T10:20:00Z.
    const NOW: i64 = 1_797_328_800 + 20 * 60;

    fn parse(q: &str) -> Result<HistoryQuery, QueryError> {
        HistoryQuery::parse(Some(q), NOW)
    }

    fn at(s: &str) -> i64 {
        DateTime::parse_from_rfc3339(s).unwrap().timestamp()
    }

    #[test]
    fn defaults_are_the_current_month_to_date_by_day() {
        assert_eq!(rfc3339(NOW), "2026-12-15T10:20:00Z");
        let q = parse("customer=cus_A").unwrap();
        assert_eq!(q.subject, Subject::Customer("cus_A".into()));
        assert_eq!(q.from, at("2026-12-01T00:00:00Z"));
        assert_eq!(q.to, at("2026-12-15T11:00:00Z"));
        assert_eq!(
            (q.granularity, q.limit, q.after),
            (Granularity::Day, DEFAULT_LIMIT, None)
        );
        // Only `to`: the month of its last hour.
        let q = parse("app=a&to=2026-11-01").unwrap();
        assert_eq!(q.from, at("2026-10-01T00:00:00Z"));
        // On the hour, the hour just begun is in.
        let q = HistoryQuery::parse(Some("app=a"), at("2026-12-01T00:00:00Z")).unwrap();
        assert_eq!(
            (q.from, q.to),
            (at("2026-12-01T00:00:00Z"), at("2026-12-01T01:00:00Z"))
        );
    }

    #[test]
    fn dates_and_instants_parse_in_utc() {
        let q =
            parse("app=a&from=2026-11-03&to=2026-11-04T05:00:00%2B02:00&granularity=hour").unwrap();
        assert_eq!(q.from, at("2026-11-03T00:00:00Z"));
        assert_eq!(q.to, at("2026-11-04T03:00:00Z"));
        // An unencoded `+` reads as a space.
        let q = parse("app=a&from=2026-11-03T05:00:00+02:00&to=2026-11-04").unwrap();
        assert_eq!(q.from, at("2026-11-03T03:00:00Z"));
        assert_eq!(q.granularity, Granularity::Day);
    }

    #[test]
    fn refusals_name_the_field() {
        let field = |q: &str| parse(q).unwrap_err().field().map(str::to_owned);
        assert_eq!(parse("from=2026-11-01").unwrap_err(), QueryError::NoSubject);
        assert_eq!(
            parse("app=a&customer=c").unwrap_err(),
            QueryError::TwoSubjects
        );
        assert_eq!(field("app="), Some("app".into()));
        assert_eq!(field("app=a&form=2026-11-01"), Some("form".into()));
        assert_eq!(field("app=a&app=b"), Some("app".into()));
        assert_eq!(field("app=a&from=yesterday"), Some("from".into()));
        assert_eq!(field("app=a&to=2026-13-01"), Some("to".into()));
        assert_eq!(
            field("app=a&from=2026-11-01T10:30:00Z"),
            Some("from".into())
        );
        assert!(matches!(
            parse("app=a&from=2026-11-02&to=2026-11-02"),
            Err(QueryError::EmptyRange { .. })
        ));
        assert!(matches!(
            parse("app=a&from=2025-01-01&to=2026-02-05T01:00:00Z"),
            Err(QueryError::TooLong { .. })
        ));
        // 365 + 35 days: exactly 400.
        assert!(parse("app=a&from=2025-01-01&to=2026-02-05").is_ok());
        assert_eq!(field("app=a&granularity=week"), Some("granularity".into()));
        for limit in ["0", "-1", "x", "10001"] {
            assert_eq!(field(&format!("app=a&limit={limit}")), Some("limit".into()));
        }
        assert_eq!(field("app=a&after=nonsense"), Some("after".into()));
    }

    #[test]
    fn a_cursor_is_bound_to_its_query() {
        let q = parse("customer=c&from=2026-11-01&to=2026-12-01").unwrap();
        let cursor = Cursor {
            fingerprint: q.fingerprint(),
            key: (
                at("2026-11-02T00:00:00Z"),
                "a".into(),
                "p".into(),
                "m".into(),
                String::new(),
            ),
        }
        .encode();
        let again = parse(&format!(
            "customer=c&from=2026-11-01&to=2026-12-01&limit=5&after={cursor}"
        ))
        .unwrap();
        assert_eq!(again.after.unwrap().key.1, "a");
        for other in [
            "customer=d&from=2026-11-01&to=2026-12-01",
            "app=c&from=2026-11-01&to=2026-12-01",
            "customer=c&from=2026-11-02&to=2026-12-01",
            "customer=c&from=2026-11-01&to=2026-12-01&granularity=hour",
        ] {
            assert_eq!(
                parse(&format!("{other}&after={cursor}")).unwrap_err(),
                QueryError::BadCursor
            );
        }
    }

    #[test]
    fn buckets_follow_the_utc_calendar() {
        let t = at("2026-02-28T23:00:00Z");
        assert_eq!(Granularity::Hour.bucket(t), (t, t + HOUR));
        assert_eq!(
            Granularity::Day.bucket(t),
            (at("2026-02-28T00:00:00Z"), at("2026-03-01T00:00:00Z"))
        );
        assert_eq!(
            Granularity::Month.bucket(t),
            (at("2026-02-01T00:00:00Z"), at("2026-03-01T00:00:00Z"))
        );
        assert_eq!(
            Granularity::Month.bucket(at("2026-12-31T23:00:00Z")),
            (at("2026-12-01T00:00:00Z"), at("2027-01-01T00:00:00Z"))
        );
    }

    #[test]
    fn accept_picks_csv_only_when_preferred() {
        let csv = |accept: Option<&str>| {
            let mut h = HeaderMap::new();
            if let Some(a) = accept {
                h.insert(header::ACCEPT, HeaderValue::from_str(a).unwrap());
            }
            wants_csv(&h)
        };
        assert!(!csv(None));
        assert!(csv(Some("text/csv")));
        assert!(csv(Some("text/csv; charset=utf-8")));
        assert!(csv(Some("text/csv, */*")));
        assert!(csv(Some("text/*")));
        assert!(csv(Some("application/json;q=0.5, text/csv")));
        assert!(!csv(Some("application/json, text/csv")));
        assert!(!csv(Some("*/*")));
        assert!(!csv(Some("text/csv;q=0")));
        assert!(!csv(Some(
            "text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8"
        )));
    }

    /// Hourly rows in memory, counting the reads.
    struct Mem {
        rows: Vec<Rollup>,
        reads: std::sync::atomic::AtomicUsize,
    }

    #[async_trait::async_trait]
    impl HistoryStore for Mem {
        async fn add(&self, _: &crate::history::Batch, _: i64) -> Result<bool, StoreError> {
            Ok(false)
        }
        async fn hours(
            &self,
            subject: &Subject,
            from: i64,
            to: i64,
        ) -> Result<Vec<Rollup>, StoreError> {
            self.reads
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let mut rows: Vec<Rollup> = self
                .rows
                .iter()
                .filter(|r| match subject {
                    Subject::Customer(c) => &r.dims.customer == c,
                    Subject::App(a) => &r.dims.app == a,
                })
                .filter(|r| from <= r.hour && r.hour < to)
                .cloned()
                .collect();
            rows.sort_by(|a, b| {
                let key = |r: &Rollup| {
                    let d = &r.dims;
                    (
                        r.hour,
                        d.app.clone(),
                        d.product.clone(),
                        d.meter.clone(),
                        d.customer.clone(),
                    )
                };
                key(a).cmp(&key(b))
            });
            Ok(rows)
        }
        async fn prune(&self, _: i64, _: i64) -> Result<(), StoreError> {
            Ok(())
        }
    }

    /// 33 hours across a month's end, some empty, 1 to 4 rows an hour over two customers and three apps.
    fn mem() -> Mem {
        let first = at("2026-11-29T20:00:00Z");
        let mut rows = Vec::new();
        for h in 0..33u64 {
            if h % 5 == 3 {
                continue;
            }
            for d in 0..(h % 4 + 1) {
                rows.push(Rollup {
                    hour: first + 3600 * h as i64,
                    dims: crate::history::Dims {
                        customer: if d == 3 { "cus_B" } else { "cus_A" }.into(),
                        app: format!("app{}", d % 3),
                        product: format!("p{}", d % 2),
                        meter: ["m1", "m2", ""][d as usize % 3].into(),
                    },
                    counts: Counts {
                        allowed: h * 10 + d,
                        denied: d,
                        billable: h,
                        value: h * d,
                    },
                });
            }
        }
        Mem {
            rows,
            reads: Default::default(),
        }
    }

    /// The whole series, summed the plain way.
    fn naive(store: &Mem, q: &HistoryQuery) -> Vec<SeriesRow> {
        let by_app = q.by_app();
        let mut sums: BTreeMap<Key, Counts> = BTreeMap::new();
        for r in &store.rows {
            let mine = match &q.subject {
                Subject::Customer(c) => &r.dims.customer == c,
                Subject::App(a) => &r.dims.app == a,
            };
            if mine && q.from <= r.hour && r.hour < q.to {
                let d = r.dims.clone();
                let customer = if by_app { d.customer } else { String::new() };
                let key = (
                    q.granularity.bucket(r.hour).0,
                    d.app,
                    d.product,
                    d.meter,
                    customer,
                );
                sums.entry(key).or_default().add(&r.counts);
            }
        }
        sums.into_iter()
            .map(|((start, app, product, meter, customer), c)| SeriesRow {
                start: rfc3339(start),
                customer: by_app.then(|| named(customer)),
                app: named(app),
                product: named(product),
                meter: named(meter),
                allowed: c.allowed,
                denied: c.denied,
                billable: c.billable,
                value: c.value,
            })
            .collect()
    }

    #[tokio::test]
    async fn pages_read_in_chunks_add_up_to_the_plain_sum() {
        let store = mem();
        let ranges = [
            "from=2026-11-29&to=2026-12-03",
            "from=2026-11-30T01:00:00Z&to=2026-12-01T02:00:00Z",
        ];
        for subject in ["customer=cus_A", "customer=cus_B", "app=app1"] {
            for range in ranges {
                for granularity in ["hour", "day", "month"] {
                    let base = format!("{subject}&{range}&granularity={granularity}");
                    let whole = parse(&base).unwrap();
                    let expected = naive(&store, &whole);
                    assert!(!expected.is_empty(), "{base}");
                    for target in [1, 3, 7, 1000] {
                        for limit in [1, 2, 3, 5, 1000] {
                            let mut q = parse(&format!("{base}&limit={limit}")).unwrap();
                            let mut got = Vec::new();
                            let mut totals = None;
                            loop {
                                let page =
                                    read_bounded(&store, &q, target, usize::MAX).await.unwrap();
                                assert!(page.series.len() <= limit);
                                got.extend(page.series);
                                // Every page has the same totals.
                                assert!(totals.get_or_insert(page.totals.clone()) == &page.totals);
                                match page.next_after {
                                    Some(after) => q.after = Some(Cursor::decode(&after).unwrap()),
                                    None => break,
                                }
                            }
                            assert_eq!(got, expected, "{base} target {target} limit {limit}");
                            let mut by_meter: BTreeMap<Option<String>, u64> = BTreeMap::new();
                            for row in &expected {
                                *by_meter.entry(row.meter.clone()).or_default() += row.value;
                            }
                            let totals: BTreeMap<Option<String>, u64> = totals
                                .unwrap()
                                .into_iter()
                                .map(|t| (t.meter, t.value))
                                .collect();
                            assert_eq!(totals, by_meter, "{base}");
                        }
                    }
                }
            }
        }
        // Small targets read in many chunks.
        let reads = |store: &Mem| store.reads.load(std::sync::atomic::Ordering::Relaxed);
        let before = reads(&store);
        let q = parse("customer=cus_A&from=2026-11-29&to=2026-12-03&granularity=hour").unwrap();
        read_bounded(&store, &q, 2, usize::MAX).await.unwrap();
        assert!(reads(&store) - before > 10, "{}", reads(&store) - before);
        let before = reads(&store);
        read_bounded(&store, &q, 1000, usize::MAX).await.unwrap();
        // 24 hours, then 96 (the rest).
        assert_eq!(reads(&store) - before, 2);
        // A first page stops reading once it is full; the store sums the totals in one more read.
        let before = reads(&store);
        let small =
            parse("customer=cus_A&from=2026-11-29&to=2026-12-03&granularity=hour&limit=2").unwrap();
        let page = read_bounded(&store, &small, 2, usize::MAX).await.unwrap();
        assert_eq!(reads(&store) - before, 2);
        let whole = read_bounded(&store, &q, 1000, usize::MAX).await.unwrap();
        assert_eq!((page.series.len(), &page.totals), (2, &whole.totals));
        // By day, the store sums a month at a time; by month, one month a read.
        let before = reads(&store);
        let q = parse("customer=cus_A&from=2026-11-29&to=2026-12-03").unwrap();
        read_bounded(&store, &q, 1000, usize::MAX).await.unwrap();
        assert_eq!(reads(&store) - before, 1);
        let before = reads(&store);
        let q = parse("customer=cus_A&from=2026-11-29&to=2026-12-03&granularity=month").unwrap();
        read_bounded(&store, &q, 1000, usize::MAX).await.unwrap();
        assert_eq!(reads(&store) - before, 2);
        // Past the scan bound: refused.
        let q = parse("customer=cus_A&from=2026-11-29&to=2026-12-03&granularity=hour").unwrap();
        let err = read_bounded(&store, &q, 1000, 10).await.unwrap_err();
        assert!(matches!(err, HistoryError::TooManyRows), "{err}");
    }

    #[test]
    fn csv_fields_are_quoted_as_rfc_4180_says() {
        let mut out = String::new();
        for f in ["plain", "a,b", "say \"hi\"", "two\nlines", ""] {
            csv_field(&mut out, f);
            out.push('|');
        }
        assert_eq!(out, "plain|\"a,b\"|\"say \"\"hi\"\"\"|\"two\nlines\"||");
    }
}
