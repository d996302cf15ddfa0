//! `GET /v1/usage/history` through the real admin router (token check included) over a real SQLite state
//! store seeded with hourly rollups of two customers across hours, days and months (Oct 31 to Dec 1, 2026):
//! by hour, by day and by month against hand-computed figures and a reference aggregation of the seed, JSON
//! and CSV, every page of a paginated read exactly once, the other customer never, and every refusal.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use axum::Router;
use axum::body::Body;
use axum::http::{HeaderMap, Request, StatusCode};
use chrono::{DateTime, Datelike, NaiveDate, Utc};
use http_body_util::BodyExt;
use hyper::service::Service as _;
use hyper_util::service::TowerToHyperService;
use serde_json::{Value, json};

use tollgate::app::admin::{self, AdminState};
use tollgate::app::metrics::Metrics;
use tollgate::catalog::CatalogHandle;
use tollgate::history::{Batch, Counts, Dims, HistoryStore, Rollup, Subject};
use tollgate::metering::{Metering, MeteringOptions};
use tollgate::quota::memory::MemoryStore;
use tollgate::source::Source;
use tollgate::state::StoreError;
use tollgate::state::sql::SqlStore;

const TOKEN: &str = "s3cret-admin-token";

const CATALOG: &str = "
products:
  - name: basic
    operations: [{api: weatherapi, paths: [/]}]
developers:
  - email: ntesla@theremin.com
    apps:
      - name: app1
        products: [{name: basic, status: approved}]
";

/// The seeded hours (UTC): two in October, five in November (three on the 1st), two on December 1st.
const HOURS: [&str; 9] = [
    "2026-10-31T22:00:00Z",
    "2026-10-31T23:00:00Z",
    "2026-11-01T00:00:00Z",
    "2026-11-01T01:00:00Z",
    "2026-11-01T23:00:00Z",
    "2026-11-02T00:00:00Z",
    "2026-11-30T23:00:00Z",
    "2026-12-01T00:00:00Z",
    "2026-12-01T05:00:00Z",
];

/// The seeded dimensions: (customer, app, product, meter).
const DIMS: [(&str, &str, &str, &str); 7] = [
    ("cus_A", "app1", "basic", "api_calls"),
    ("cus_A", "app1", "gold", "tokens"),
    ("cus_A", "app2", "basic", "api_calls"),
    ("cus_B", "app3", "basic", "api_calls"),
    // app2 moved to cus_B: from the 7th hour on.
    ("cus_B", "app2", "basic", "api_calls"),
    // Names CSV must quote; no meter. Only in the 3rd hour.
    ("cus_A", "app,4", "plan \"x\"", ""),
    // An unidentified caller, denied.
    ("", "", "", ""),
];

fn at(s: &str) -> i64 {
    DateTime::parse_from_rfc3339(s).unwrap().timestamp()
}

fn rfc3339(t: i64) -> String {
    DateTime::from_timestamp(t, 0)
        .unwrap()
        .to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
}

/// What hour `h` counted for dimension `d`: allowed `10 (h + 1) + d`, denied `(h + d) mod 3`, billable
/// `allowed - (h mod 2)` (none without a meter), value = billable (x100 for `tokens`).
fn seed_counts(h: usize, d: usize) -> Counts {
    let (_, _, _, meter) = DIMS[d];
    if d == 6 {
        return Counts {
            allowed: 0,
            denied: 5,
            billable: 0,
            value: 0,
        };
    }
    let allowed = (10 * (h + 1) + d) as u64;
    let billable = if meter.is_empty() {
        0
    } else {
        allowed - (h % 2) as u64
    };
    Counts {
        allowed,
        denied: ((h + d) % 3) as u64,
        billable,
        value: if meter == "tokens" {
            billable * 100
        } else {
            billable
        },
    }
}

/// Every seeded hourly row, as the store should hold it.
fn seed() -> Vec<Rollup> {
    let mut rows = Vec::new();
    for (h, hour) in HOURS.iter().enumerate() {
        for (d, (customer, app, product, meter)) in DIMS.iter().enumerate() {
            let present = match d {
                4 => h >= 6,
                5 => h == 2,
                _ => true,
            };
            if present {
                rows.push(Rollup {
                    hour: at(hour),
                    dims: Dims {
                        customer: (*customer).to_owned(),
                        app: (*app).to_owned(),
                        product: (*product).to_owned(),
                        meter: (*meter).to_owned(),
                    },
                    counts: seed_counts(h, d),
                });
            }
        }
    }
    rows
}

/// Each hour's rows split between two replicas' batches (the store adds them up).
fn batches() -> Vec<Batch> {
    let mut out = Vec::new();
    for (h, hour) in HOURS.iter().enumerate() {
        let rows: Vec<Rollup> = seed().into_iter().filter(|r| r.hour == at(hour)).collect();
        let half = |c: &Counts| Counts {
            allowed: c.allowed / 2,
            denied: c.denied / 2,
            billable: c.billable / 2,
            value: c.value / 2,
        };
        let rest = |c: &Counts| Counts {
            allowed: c.allowed - c.allowed / 2,
            denied: c.denied - c.denied / 2,
            billable: c.billable - c.billable / 2,
            value: c.value - c.value / 2,
        };
        for (replica, split) in [("r1", &half as &dyn Fn(&Counts) -> Counts), ("r2", &rest)] {
            out.push(Batch {
                id: format!("{replica}:{h}:3600000"),
                rows: rows
                    .iter()
                    .map(|r| Rollup {
                        counts: split(&r.counts),
                        ..r.clone()
                    })
                    .collect(),
            });
        }
    }
    out
}

/// The start of the UTC bucket of `t`, computed apart from the code under test.
fn bucket(granularity: &str, t: i64) -> i64 {
    let day = DateTime::from_timestamp(t, 0).unwrap().date_naive();
    match granularity {
        "hour" => t,
        "day" => day.and_hms_opt(0, 0, 0).unwrap().and_utc().timestamp(),
        "month" => NaiveDate::from_ymd_opt(day.year(), day.month(), 1)
            .unwrap()
            .and_hms_opt(0, 0, 0)
            .unwrap()
            .and_utc()
            .timestamp(),
        other => panic!("{other}"),
    }
}

fn name(s: &str) -> Value {
    if s.is_empty() { Value::Null } else { json!(s) }
}

/// The series the endpoint should answer: the seed's rows of `subject` in `[from, to)`, summed per bucket.
fn expected(subject: &Subject, from: &str, to: &str, granularity: &str) -> Vec<Value> {
    let by_app = matches!(subject, Subject::App(_));
    let mut sums: BTreeMap<(i64, String, String, String, String), Counts> = BTreeMap::new();
    for r in seed() {
        let mine = match subject {
            Subject::Customer(c) => &r.dims.customer == c,
            Subject::App(a) => &r.dims.app == a,
        };
        if !mine || r.hour < at(from) || r.hour >= at(to) {
            continue;
        }
        let customer = if by_app {
            r.dims.customer.clone()
        } else {
            String::new()
        };
        let key = (
            bucket(granularity, r.hour),
            r.dims.app,
            r.dims.product,
            r.dims.meter,
            customer,
        );
        sums.entry(key).or_default().add(&r.counts);
    }
    sums.into_iter()
        .map(|((start, app, product, meter, customer), c)| {
            let mut row = json!({
                "start": rfc3339(start), "app": name(&app), "product": name(&product),
                "meter": name(&meter), "allowed": c.allowed, "denied": c.denied,
                "billable": c.billable, "value": c.value,
            });
            if by_app {
                row["customer"] = name(&customer);
            }
            row
        })
        .collect()
}

/// The admin router over `history`, its metering spool in `dir`.
async fn router(history: Option<Arc<dyn HistoryStore>>, dir: &std::path::Path) -> Api {
    let source = Source::from_text("catalog.yaml", CATALOG.to_owned());
    let catalog = tollgate::catalog::parse(&source).expect("catalog");
    let handle = Arc::new(CatalogHandle::new(catalog));
    let registry = prometheus::Registry::new();
    let window = Duration::from_secs(60);
    let options = MeteringOptions::with_spool_producer(dir.join("m"), window, window);
    let metering = Metering::open(options, Arc::clone(&handle), &registry)
        .await
        .unwrap();
    let admin = AdminState {
        metrics: Metrics::new().unwrap(),
        quota: Arc::new(MemoryStore::new()),
        catalog: handle,
        metering,
        billing: None,
        admin_token: Some(Arc::from(TOKEN)),
        syncer: None,
        history,
    };
    Api {
        service: TowerToHyperService::new(admin::router(admin, None)),
    }
}

/// A fresh SQLite store holding the seed, and the router over it.
async fn seeded() -> (Api, SqlStore, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let store = SqlStore::open(&format!("sqlite://{}/state.db", dir.path().display())).unwrap();
    store.migrate().await.unwrap();
    for batch in batches() {
        assert!(store.add(&batch, 1_800_000_000).await.unwrap());
    }
    let api = router(Some(Arc::new(store.clone())), dir.path()).await;
    (api, store, dir)
}

struct Api {
    service: TowerToHyperService<Router>,
}

struct Answer {
    status: StatusCode,
    headers: HeaderMap,
    body: Vec<u8>,
}

impl Answer {
    fn json(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("{}: not JSON ({e}): {}", self.status, self.text()))
    }

    fn text(&self) -> String {
        String::from_utf8(self.body.clone()).unwrap()
    }

    fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).map(|v| v.to_str().unwrap())
    }
}

impl Api {
    /// GETs `path` with `headers` (the admin token added unless `authorization` is among them).
    async fn get_with(&self, path: &str, headers: &[(&str, &str)]) -> Answer {
        let mut builder = Request::builder().method("GET").uri(path);
        let auth = format!("Bearer {TOKEN}");
        if !headers.iter().any(|(n, _)| *n == "authorization") {
            builder = builder.header("authorization", auth);
        }
        for (name, value) in headers {
            builder = builder.header(*name, *value);
        }
        let request = builder.body(Body::empty()).unwrap();
        let (parts, body) = self.service.call(request).await.unwrap().into_parts();
        Answer {
            status: parts.status,
            headers: parts.headers,
            body: body.collect().await.unwrap().to_bytes().to_vec(),
        }
    }

    /// GETs `path` as JSON and expects a 200.
    async fn json(&self, path: &str) -> Value {
        let answer = self.get_with(path, &[]).await;
        assert_eq!(answer.status, StatusCode::OK, "{path}: {}", answer.text());
        assert_eq!(answer.header("content-type"), Some("application/json"));
        answer.json()
    }

    /// GETs `path` as CSV and expects a 200.
    async fn csv(&self, path: &str) -> Answer {
        let answer = self.get_with(path, &[("accept", "text/csv")]).await;
        assert_eq!(answer.status, StatusCode::OK, "{path}: {}", answer.text());
        assert_eq!(
            answer.header("content-type"),
            Some("text/csv; charset=utf-8")
        );
        answer
    }

    /// GETs `path`, expects a 400 naming `field` (`None`: no field).
    async fn refused(&self, path: &str, field: Option<&str>) -> String {
        let answer = self.get_with(path, &[]).await;
        assert_eq!(
            answer.status,
            StatusCode::BAD_REQUEST,
            "{path}: {}",
            answer.text()
        );
        let body = answer.json();
        assert_eq!(body["error"], "bad_request", "{path}: {body}");
        assert_eq!(body["field"].as_str(), field, "{path}: {body}");
        let message = body["message"].as_str().unwrap().to_owned();
        assert!(!message.is_empty());
        message
    }
}

const PATH: &str = "/v1/usage/history";

fn customer(c: &str) -> Subject {
    Subject::Customer(c.to_owned())
}

/// Oct 1 to Jan 1: the whole seed.
const FROM: &str = "2026-10-01T00:00:00Z";
const TO: &str = "2027-01-01T00:00:00Z";

#[tokio::test]
async fn by_hour_day_and_month_the_series_match_the_seed() {
    let (api, _store, _dir) = seeded().await;
    for granularity in ["hour", "day", "month"] {
        let path = format!(
            "{PATH}?customer=cus_A&from=2026-10-01&to=2027-01-01&granularity={granularity}"
        );
        let page = api.json(&path).await;
        assert_eq!(page["customer"], "cus_A");
        assert!(page.get("app").is_none(), "{page}");
        assert_eq!(
            (page["from"].as_str(), page["to"].as_str()),
            (Some(FROM), Some(TO))
        );
        assert_eq!(page["granularity"], granularity);
        assert_eq!(page["next_after"], Value::Null);
        let series = page["series"].as_array().unwrap();
        assert_eq!(
            series,
            &expected(&customer("cus_A"), FROM, TO, granularity),
            "{granularity}"
        );
        // cus_B's rows never show: not its apps, not app2's rows after it moved to cus_B.
        assert!(
            series
                .iter()
                .all(|r| r["app"] != "app3" && r.get("customer").is_none())
        );
        // Rows per granularity: 3 per hour (9 hours) + the one quoted row; 5 days; 3 months.
        let rows = match granularity {
            "hour" => 28,
            "day" => 16,
            _ => 10,
        };
        assert_eq!(series.len(), rows, "{granularity}");
        // The totals are the same whatever the granularity; by hand: api_calls is app1 (allowed
        // 10+20+…+90 = 450, billable 450 - 4 odd hours = 446) plus app2 (each hour +2: 468, 464);
        // tokens is app1/gold (459, 455, x100); no meter is the quoted row (35 allowed, 1 denied).
        assert_eq!(
            page["totals"],
            json!([
                {"meter": null, "allowed": 35, "denied": 1, "billable": 0, "value": 0},
                {"meter": "api_calls", "allowed": 918, "denied": 18, "billable": 910, "value": 910},
                {"meter": "tokens", "allowed": 459, "denied": 9, "billable": 455, "value": 45500},
            ]),
            "{granularity}"
        );
    }

    // By hand: November for app1/basic is hours 2..=6, allowed 30+40+50+60+70, denied 2+0+1+2+0, billable
    // less the two odd hours.
    let month = api
        .json(&format!(
            "{PATH}?customer=cus_A&from=2026-10-01&to=2027-01-01&granularity=month"
        ))
        .await;
    let nov_app1 = json!({"start": "2026-11-01T00:00:00Z", "app": "app1", "product": "basic",
        "meter": "api_calls", "allowed": 250, "denied": 5, "billable": 248, "value": 248});
    assert!(
        month["series"].as_array().unwrap().contains(&nov_app1),
        "{month:#}"
    );
    // By hand: November 1st for app1/basic is hours 2, 3, 4 (00:00, 01:00, 23:00): 30+40+50.
    let day = api
        .json(&format!(
            "{PATH}?customer=cus_A&from=2026-11-01&to=2026-11-02&granularity=day"
        ))
        .await;
    assert_eq!(
        day["series"][1],
        json!({"start": "2026-11-01T00:00:00Z", "app": "app1", "product": "basic",
            "meter": "api_calls", "allowed": 120, "denied": 3, "billable": 119, "value": 119})
    );
    // The quoted row, with its names as stored (first: `,` sorts before `1`).
    assert_eq!(
        day["series"][0],
        json!({"start": "2026-11-01T00:00:00Z", "app": "app,4", "product": "plan \"x\"",
            "meter": null, "allowed": 35, "denied": 1, "billable": 0, "value": 0})
    );
    // By hand: Oct 31 22:00 for app1/gold: allowed 11, denied 1, billable 11, value 1100.
    let hour = api
        .json(&format!("{PATH}?customer=cus_A&from=2026-10-31T22:00:00Z&to=2026-10-31T23:00:00Z&granularity=hour"))
        .await;
    assert_eq!(
        hour["series"][1],
        json!({"start": "2026-10-31T22:00:00Z", "app": "app1", "product": "gold",
            "meter": "tokens", "allowed": 11, "denied": 1, "billable": 11, "value": 1100})
    );
    assert_eq!(hour["series"].as_array().unwrap().len(), 3);

    // The other customer sees only its own: app3, and app2 from the 7th hour.
    let b = api
        .json(&format!(
            "{PATH}?customer=cus_B&from=2026-10-01&to=2027-01-01&granularity=month"
        ))
        .await;
    assert_eq!(
        b["series"],
        json!(expected(&customer("cus_B"), FROM, TO, "month"))
    );
    let apps: BTreeSet<&str> = b["series"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["app"].as_str().unwrap())
        .collect();
    assert_eq!(apps, BTreeSet::from(["app2", "app3"]));
    assert!(!b.to_string().contains("app1"));
    // By hand: app2 under cus_B in November is hour 6 only: 74 allowed, denied (6+4) mod 3 = 1.
    assert!(
        b["series"]
            .as_array()
            .unwrap()
            .contains(&json!({"start": "2026-11-01T00:00:00Z",
        "app": "app2", "product": "basic", "meter": "api_calls", "allowed": 74, "denied": 1,
        "billable": 74, "value": 74}))
    );
}

#[tokio::test]
async fn a_range_cut_into_buckets_counts_only_its_hours() {
    let (api, _store, _dir) = seeded().await;
    // From Nov 1 01:00 to Dec 1 01:00, by month: November without its first hour, December's first hour.
    let from = "2026-11-01T01:00:00Z";
    let to = "2026-12-01T01:00:00Z";
    let page = api
        .json(&format!(
            "{PATH}?customer=cus_A&from={from}&to={to}&granularity=month"
        ))
        .await;
    assert_eq!(
        page["series"],
        json!(expected(&customer("cus_A"), from, to, "month"))
    );
    // Rows start at the calendar bucket, not at `from`: app1 in November is hours 3..=6 (40+50+60+70).
    assert_eq!(page["series"][0]["start"], "2026-11-01T00:00:00Z");
    assert_eq!(page["series"][0]["allowed"], 220);
    assert_eq!(page["series"][3]["start"], "2026-12-01T00:00:00Z");
    assert_eq!(page["series"][3]["allowed"], 80);
    // An RFC 3339 offset is taken in UTC (01:00+01:00 is midnight UTC), `+` encoded or not.
    for offset in ["%2B01:00", "+01:00"] {
        let page = api
            .json(&format!("{PATH}?customer=cus_A&from=2026-11-01T01:00:00{offset}&to=2026-11-01T01:00:00Z&granularity=hour"))
            .await;
        assert_eq!(page["from"], "2026-11-01T00:00:00Z");
        assert_eq!(page["series"].as_array().unwrap().len(), 4);
    }
    // A range holding nothing answers empty series and totals.
    let empty = api
        .json(&format!(
            "{PATH}?customer=cus_A&from=2026-06-01&to=2026-07-01"
        ))
        .await;
    assert_eq!(
        (&empty["series"], &empty["totals"]),
        (&json!([]), &json!([]))
    );
    // An unknown customer the same.
    let nobody = api
        .json(&format!("{PATH}?customer=cus_Z&from={FROM}&to={TO}"))
        .await;
    assert_eq!(nobody["series"], json!([]));
}

#[tokio::test]
async fn by_app_rows_name_their_customer() {
    let (api, _store, _dir) = seeded().await;
    for granularity in ["hour", "day", "month"] {
        let page = api
            .json(&format!(
                "{PATH}?app=app2&from={FROM}&to={TO}&granularity={granularity}"
            ))
            .await;
        assert_eq!(page["app"], "app2");
        assert!(page.get("customer").is_none());
        let series = page["series"].as_array().unwrap();
        assert_eq!(
            series,
            &expected(&Subject::App("app2".into()), FROM, TO, granularity)
        );
        assert!(series.iter().all(|r| r["app"] == "app2"));
    }
    let month = api
        .json(&format!(
            "{PATH}?app=app2&from={FROM}&to={TO}&granularity=month"
        ))
        .await;
    let customers: Vec<(&str, &str)> = month["series"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            (
                r["start"].as_str().unwrap(),
                r["customer"].as_str().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        customers,
        [
            ("2026-10-01T00:00:00Z", "cus_A"),
            ("2026-11-01T00:00:00Z", "cus_A"),
            ("2026-11-01T00:00:00Z", "cus_B"),
            ("2026-12-01T00:00:00Z", "cus_A"),
            ("2026-12-01T00:00:00Z", "cus_B"),
        ]
    );
    // app3 is cus_B's alone.
    let all = api
        .json(&format!("{PATH}?app=app3&from={FROM}&to={TO}"))
        .await;
    assert!(
        all["series"]
            .as_array()
            .unwrap()
            .iter()
            .all(|r| r["customer"] == "cus_B")
    );
    assert_eq!(
        all["totals"],
        json!([{"meter": "api_calls", "allowed": 477, "denied": 9, "billable": 473, "value": 473}])
    );
}

/// Parses RFC 4180 CSV (CRLF records, quoted fields with doubled quotes).
fn parse_csv(text: &str) -> Vec<Vec<String>> {
    let mut records = Vec::new();
    let mut record = Vec::new();
    let mut field = String::new();
    let mut chars = text.chars().peekable();
    let mut quoted = false;
    while let Some(c) = chars.next() {
        match (quoted, c) {
            (true, '"') if chars.peek() == Some(&'"') => {
                chars.next();
                field.push('"');
            }
            (true, '"') => quoted = false,
            (true, c) => field.push(c),
            (false, '"') if field.is_empty() => quoted = true,
            (false, ',') => record.push(std::mem::take(&mut field)),
            (false, '\r') => {
                assert_eq!(chars.next(), Some('\n'), "a CR without LF");
                record.push(std::mem::take(&mut field));
                records.push(std::mem::take(&mut record));
            }
            (false, c) => {
                assert_ne!(c, '\n', "a bare LF ends no record in RFC 4180");
                field.push(c);
            }
        }
    }
    assert!(
        record.is_empty() && field.is_empty(),
        "the last record ends with CRLF"
    );
    records
}

/// A JSON series row as the CSV record it should be.
fn as_record(row: &Value, by_app: bool) -> Vec<String> {
    let text = |v: &Value| match v {
        Value::Null => String::new(),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    };
    let mut names = vec!["start"];
    if by_app {
        names.push("customer");
    }
    names.extend([
        "app", "product", "meter", "allowed", "denied", "billable", "value",
    ]);
    names.iter().map(|n| text(&row[*n])).collect()
}

#[tokio::test]
async fn csv_carries_the_same_series() {
    let (api, _store, _dir) = seeded().await;
    for (subject, by_app) in [("customer=cus_A", false), ("app=app2", true)] {
        for granularity in ["hour", "day", "month"] {
            let path = format!("{PATH}?{subject}&from={FROM}&to={TO}&granularity={granularity}");
            let json = api.json(&path).await;
            let csv = api.csv(&path).await;
            assert_eq!(csv.header("vary"), Some("accept"));
            assert!(csv.header("link").is_none() && csv.header("next-after").is_none());
            let records = parse_csv(&csv.text());
            let header = if by_app {
                "start,customer,app,product,meter,allowed,denied,billable,value"
            } else {
                "start,app,product,meter,allowed,denied,billable,value"
            };
            assert_eq!(records[0].join(","), header);
            let rows: Vec<Vec<String>> = json["series"]
                .as_array()
                .unwrap()
                .iter()
                .map(|r| as_record(r, by_app))
                .collect();
            assert_eq!(records[1..], rows[..], "{path}");
        }
    }
    // The quoted row on the wire.
    let csv = api
        .csv(&format!(
            "{PATH}?customer=cus_A&from=2026-11-01&to=2026-11-01T01:00:00Z&granularity=hour"
        ))
        .await;
    assert_eq!(
        csv.text(),
        "start,app,product,meter,allowed,denied,billable,value\r\n\
         2026-11-01T00:00:00Z,\"app,4\",\"plan \"\"x\"\"\",,35,1,0,0\r\n\
         2026-11-01T00:00:00Z,app1,basic,api_calls,30,2,30,30\r\n\
         2026-11-01T00:00:00Z,app1,gold,tokens,31,0,31,3100\r\n\
         2026-11-01T00:00:00Z,app2,basic,api_calls,32,1,32,32\r\n"
    );
    // Only a header for nothing.
    let empty = api
        .csv(&format!(
            "{PATH}?customer=cus_A&from=2026-06-01&to=2026-07-01"
        ))
        .await;
    assert_eq!(
        empty.text(),
        "start,app,product,meter,allowed,denied,billable,value\r\n"
    );
    // JSON unless CSV is preferred.
    for accept in [
        "application/json",
        "*/*",
        "application/json, text/csv",
        "text/csv;q=0",
    ] {
        let answer = api
            .get_with(&format!("{PATH}?customer=cus_A"), &[("accept", accept)])
            .await;
        assert_eq!(
            answer.header("content-type"),
            Some("application/json"),
            "{accept}"
        );
    }
}

#[tokio::test]
async fn pages_return_every_row_exactly_once() {
    let (api, _store, _dir) = seeded().await;
    for (subject, granularity, limit) in [
        ("customer=cus_A", "hour", 1),
        ("customer=cus_A", "hour", 5),
        ("customer=cus_A", "hour", 27),
        ("customer=cus_A", "day", 3),
        ("customer=cus_A", "month", 4),
        ("app=app2", "hour", 4),
        ("app=app2", "month", 2),
    ] {
        let base = format!("{PATH}?{subject}&from={FROM}&to={TO}&granularity={granularity}");
        let whole = api.json(&base).await;
        let mut rows = Vec::new();
        let mut next = format!("{base}&limit={limit}");
        let mut pages = 0;
        loop {
            let answer = api.get_with(&next, &[]).await;
            assert_eq!(answer.status, StatusCode::OK, "{next}: {}", answer.text());
            let page = answer.json();
            let series = page["series"].as_array().unwrap();
            assert!(series.len() <= limit && !series.is_empty(), "{next}");
            rows.extend(series.iter().cloned());
            // Every page carries the whole range's totals.
            assert_eq!(page["totals"], whole["totals"]);
            pages += 1;
            let Some(after) = page["next_after"].as_str() else {
                assert!(answer.header("link").is_none());
                break;
            };
            // The cursor is in the headers too; the Link is the next request, as is.
            assert_eq!(answer.header("next-after"), Some(after));
            let link = answer.header("link").unwrap();
            let target = link
                .strip_prefix('<')
                .and_then(|l| l.strip_suffix(">; rel=\"next\""))
                .unwrap_or_else(|| panic!("{link}"));
            assert!(target.starts_with(PATH), "{link}");
            next = target.to_owned();
        }
        assert_eq!(
            rows,
            *whole["series"].as_array().unwrap(),
            "{base} limit {limit}"
        );
        assert_eq!(pages, rows.len().div_ceil(limit), "{base} limit {limit}");
    }

    // CSV pages: follow `next-after` with the same query.
    let query = format!("{PATH}?customer=cus_A&from={FROM}&to={TO}&granularity=hour");
    let base = format!("{query}&limit=10");
    let mut records = Vec::new();
    let mut after: Option<String> = None;
    loop {
        let path = match &after {
            Some(a) => format!("{base}&after={a}"),
            None => base.clone(),
        };
        let csv = api.csv(&path).await;
        let mut page = parse_csv(&csv.text());
        assert_eq!(page[0][0], "start", "each page has its header");
        records.extend(page.drain(1..));
        match csv.header("next-after") {
            Some(a) => after = Some(a.to_owned()),
            None => break,
        }
    }
    let whole = api.json(&query).await;
    let expected: Vec<Vec<String>> = whole["series"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| as_record(r, false))
        .collect();
    assert_eq!(records, expected);

    // A cursor of another query is refused.
    let first = api.json(&format!("{query}&limit=1")).await;
    let after = first["next_after"].as_str().unwrap();
    for other in [
        format!("{PATH}?customer=cus_B&from={FROM}&to={TO}&granularity=hour"),
        format!("{PATH}?customer=cus_A&from={FROM}&to={TO}&granularity=day"),
        format!("{PATH}?customer=cus_A&from=2026-10-02&to={TO}&granularity=hour"),
    ] {
        api.refused(&format!("{other}&after={after}"), Some("after"))
            .await;
    }
    // A different page size with the same cursor is fine.
    let page = api.json(&format!("{query}&limit=2&after={after}")).await;
    assert_eq!(page["series"][0], whole["series"][1]);
}

#[tokio::test]
async fn without_a_range_the_month_to_date_is_read() {
    let dir = tempfile::tempdir().unwrap();
    let store = SqlStore::open(&format!("sqlite://{}/state.db", dir.path().display())).unwrap();
    store.migrate().await.unwrap();
    let now = Utc::now().timestamp();
    let this_hour = now - now % 3600;
    let month_start = bucket("month", this_hour);
    let row = |hour: i64, allowed: u64| Rollup {
        hour,
        dims: Dims {
            customer: "cus_A".into(),
            app: "app1".into(),
            product: "basic".into(),
            meter: "api_calls".into(),
        },
        counts: Counts {
            allowed,
            denied: 0,
            billable: allowed,
            value: allowed,
        },
    };
    let batch = Batch {
        id: "now:1:60000".into(),
        rows: vec![
            row(month_start - 3600, 1),
            row(month_start, 10),
            row(this_hour, 100),
            row(this_hour + 3600, 1000),
        ],
    };
    store.add(&batch, now).await.unwrap();
    let api = router(Some(Arc::new(store)), dir.path()).await;
    let page = api.json(&format!("{PATH}?customer=cus_A")).await;
    if Utc::now().timestamp() - this_hour >= 3600 {
        eprintln!("the hour turned during the request: nothing to compare");
        return;
    }
    assert_eq!(page["granularity"], "day");
    assert_eq!(page["from"], rfc3339(month_start));
    assert_eq!(page["to"], rfc3339(this_hour + 3600));
    // The month's first hour and this one (the same row when this is the month's first hour).
    assert_eq!(page["totals"][0]["allowed"], 110, "{page}");
    assert_eq!(page["series"][0]["start"], rfc3339(month_start));
}

#[tokio::test]
async fn refusals_name_the_field() {
    let (api, _store, _dir) = seeded().await;
    let q = |rest: &str| format!("{PATH}?{rest}");
    api.refused(&q("from=2026-11-01"), None).await;
    api.refused(PATH, None).await;
    api.refused(&q("customer=cus_A&app=app1"), None).await;
    api.refused(&q("customer="), Some("customer")).await;
    api.refused(&q("app="), Some("app")).await;
    api.refused(&q("customer=cus_A&customer=cus_B"), Some("customer"))
        .await;
    api.refused(&q("customer=cus_A&granularty=hour"), Some("granularty"))
        .await;
    let m = api
        .refused(&q("customer=cus_A&from=yesterday"), Some("from"))
        .await;
    assert!(m.contains("yesterday") && m.contains("YYYY-MM-DD"), "{m}");
    api.refused(&q("customer=cus_A&to=2026-02-30"), Some("to"))
        .await;
    api.refused(&q("customer=cus_A&to=2026-11-01T10:00:00"), Some("to"))
        .await;
    let m = api
        .refused(
            &q("customer=cus_A&from=2026-11-01T10:30:00Z&to=2026-11-02"),
            Some("from"),
        )
        .await;
    assert!(m.contains("whole UTC hour"), "{m}");
    let m = api
        .refused(
            &q("customer=cus_A&from=2026-11-02&to=2026-11-02"),
            Some("from"),
        )
        .await;
    assert!(m.contains("before"), "{m}");
    api.refused(
        &q("customer=cus_A&from=2026-11-03&to=2026-11-02"),
        Some("from"),
    )
    .await;
    let m = api
        .refused(
            &q("customer=cus_A&from=2025-01-01&to=2026-02-06"),
            Some("from"),
        )
        .await;
    assert!(m.contains("400 days"), "{m}");
    // Exactly 400 days is fine.
    api.json(&q("customer=cus_A&from=2025-01-01&to=2026-02-05"))
        .await;
    let m = api
        .refused(&q("customer=cus_A&granularity=week"), Some("granularity"))
        .await;
    assert!(m.contains("hour, day, month"), "{m}");
    for limit in ["0", "-3", "ten", "10001"] {
        api.refused(&q(&format!("customer=cus_A&limit={limit}")), Some("limit"))
            .await;
    }
    api.json(&q("customer=cus_A&limit=10000")).await;
    for after in ["x", "eyJhIjoxfQ", "W10"] {
        api.refused(&q(&format!("customer=cus_A&after={after}")), Some("after"))
            .await;
    }

    // Without the admin token: 401, like every /v1 route.
    let answer = api
        .get_with(&q("customer=cus_A"), &[("authorization", "Bearer wrong")])
        .await;
    assert_eq!(answer.status, StatusCode::UNAUTHORIZED);
    assert_eq!(answer.json()["error"], "unauthenticated");
}

/// A store that is down.
struct Down;

#[async_trait]
impl HistoryStore for Down {
    async fn add(&self, _: &Batch, _: i64) -> Result<bool, StoreError> {
        Err(StoreError::Unavailable(sqlx::Error::PoolTimedOut))
    }
    async fn hours(&self, _: &Subject, _: i64, _: i64) -> Result<Vec<Rollup>, StoreError> {
        Err(StoreError::Unavailable(sqlx::Error::PoolTimedOut))
    }
    async fn prune(&self, _: i64, _: i64) -> Result<(), StoreError> {
        Err(StoreError::Unavailable(sqlx::Error::PoolTimedOut))
    }
}

#[tokio::test]
async fn without_a_store_404_and_with_a_store_down_503() {
    let dir = tempfile::tempdir().unwrap();
    let none = router(None, &dir.path().join("none")).await;
    let answer = none.get_with(&format!("{PATH}?customer=cus_A"), &[]).await;
    assert_eq!(answer.status, StatusCode::NOT_FOUND);
    assert_eq!(answer.header("content-type"), Some("application/json"));
    let body = answer.json();
    assert_eq!(body["error"], "not_found");
    assert!(body["message"].as_str().unwrap().contains("not configured"));

    let down = router(Some(Arc::new(Down)), &dir.path().join("down")).await;
    let answer = down
        .get_with(&format!("{PATH}?customer=cus_A"), &[("accept", "text/csv")])
        .await;
    assert_eq!(answer.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(answer.header("content-type"), Some("application/json"));
    assert_eq!(answer.json()["error"], "unavailable");
    // A bad query is still a 400 first: nothing is read.
    let answer = down
        .get_with(&format!("{PATH}?customer=cus_A&granularity=x"), &[])
        .await;
    assert_eq!(answer.status, StatusCode::BAD_REQUEST);
}
