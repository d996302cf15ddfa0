//! `GET /v1/usage/history` for one customer over a month: 31 days x 24 hours x 10 products (7,440 hourly rows,
//! among 74,400 of ten customers, and the days either side), through the whole admin handler (token check,
//! query parsing, the store read, the aggregation, the JSON body collected), on SQLite and on PostgreSQL.
//!
//! `cargo bench --bench history`. Criterion times `granularity=day` over the month (310 series rows) on each
//! backend; then a plain loop of [`REQUESTS`] sequential requests per (backend, query) prints p50 / p99 / max,
//! the figures the target (p99 <= 50 ms) is about. PostgreSQL is a private cluster started like the
//! tests start theirs (`tests/support/postgres.rs`, binaries from `$TOLLGATE_PG_BIN` or
//! `/usr/lib/postgresql/*/bin`); without the binaries its half is skipped with a message.
//! `HISTORY_BENCH_BACKENDS=sqlite` (or `postgres`) runs one backend only.
//!
//! The loop also times the store's reads alone: `hours` (the month's 7,440 hourly rows, what the handler
//! read by day before the database summed) and `sums` by day (the 310 rows the handler reads now).
//! `HISTORY_BENCH_PROBE=1` adds the same month through other statements and drivers (ORDER BY, GROUP BY,
//! the native SQLite driver, a covering index), to show where the read's time goes.

#[path = "../tests/support/postgres.rs"]
mod pg;

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Body;
use axum::http::{Request, StatusCode};
use criterion::Criterion;
use http_body_util::BodyExt;
use hyper::service::Service as _;
use hyper_util::service::TowerToHyperService;
use tollgate::app::admin::{self, AdminState};
use tollgate::app::metrics::Metrics;
use tollgate::catalog::CatalogHandle;
use tollgate::history::{Batch, Counts, Dims, HistoryStore, Rollup, Subject};
use tollgate::metering::{Metering, MeteringOptions};
use tollgate::quota::memory::MemoryStore;
use tollgate::source::Source;
use tollgate::state::sql::SqlStore;

const TOKEN: &str = "bench-admin-token";

/// Sequential requests timed per (backend, query) for the percentiles (`cargo bench`; run as a test, without
/// `--bench`, a smoke run of 3).
const REQUESTS: usize = 200;

/// How many runs [`percentiles`] times: [`REQUESTS`] under `cargo bench`, 3 otherwise.
static RUNS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(REQUESTS);

/// Products (one meter each) of every customer.
const PRODUCTS: usize = 10;

/// Customers seeded: `cus_0000` is measured, the others are noise in the same table.
const CUSTOMERS: usize = 10;

/// 2026-12-01T00:00:00Z.
const DECEMBER: i64 = 1_796_083_200;

/// Hours seeded: November 30, December (31 days) and January 1.
const FIRST_HOUR: i64 = DECEMBER - 24 * 3600;
const HOURS: i64 = (1 + 31 + 1) * 24;

const CATALOG: &str = "
products:
  - name: p0
    operations: [{api: a, paths: [/]}]
";

const DAY: &str =
    "/v1/usage/history?customer=cus_0000&from=2026-12-01&to=2027-01-01&granularity=day";
const QUERIES: [(&str, &str); 5] = [
    ("day", DAY),
    (
        "day_csv",
        "/v1/usage/history?customer=cus_0000&from=2026-12-01&to=2027-01-01&granularity=day&csv",
    ),
    (
        "month",
        "/v1/usage/history?customer=cus_0000&from=2026-12-01&to=2027-01-01&granularity=month",
    ),
    (
        "hour",
        "/v1/usage/history?customer=cus_0000&from=2026-12-01&to=2027-01-01&granularity=hour&limit=10000",
    ),
    (
        "hour_first_page",
        "/v1/usage/history?customer=cus_0000&from=2026-12-01&to=2027-01-01&granularity=hour",
    ),
];

/// One batch per hour: every customer's products, as the replicas' closed windows would add them.
async fn seed(store: &SqlStore) {
    let t = Instant::now();
    for h in 0..HOURS {
        let hour = FIRST_HOUR + h * 3600;
        let mut rows = Vec::with_capacity(CUSTOMERS * PRODUCTS);
        for c in 0..CUSTOMERS {
            for p in 0..PRODUCTS {
                let allowed = (h as u64 % 97) + p as u64 + 1;
                rows.push(Rollup {
                    hour,
                    dims: Dims {
                        customer: format!("cus_{c:04}"),
                        app: format!("app_{c:04}"),
                        product: format!("product_{p:02}"),
                        meter: format!("meter_{p:02}"),
                    },
                    counts: Counts {
                        allowed,
                        denied: h as u64 % 3,
                        billable: allowed - 1,
                        value: (allowed - 1) * 7,
                    },
                });
            }
        }
        let batch = Batch {
            id: format!("bench:{hour}:3600000"),
            rows,
        };
        store.add(&batch, hour + 3600).await.expect("seed");
    }
    eprintln!(
        "seeded {} hourly rows in {:.1?}",
        HOURS as usize * CUSTOMERS * PRODUCTS,
        t.elapsed()
    );
}

/// The admin router over `store`, its metering spool in `dir`.
async fn router(store: SqlStore, dir: &std::path::Path) -> TowerToHyperService<Router> {
    let source = Source::from_text("catalog.yaml", CATALOG.to_owned());
    let catalog = tollgate::catalog::parse(&source).expect("catalog");
    let handle = Arc::new(CatalogHandle::new(catalog));
    let window = Duration::from_secs(60);
    let options = MeteringOptions::with_spool_producer(dir.join("m"), window, window);
    let metering = Metering::open(options, Arc::clone(&handle), &prometheus::Registry::new())
        .await
        .expect("metering");
    let history: Arc<dyn HistoryStore> = Arc::new(store);
    let state = AdminState {
        metrics: Metrics::new().expect("metrics"),
        quota: Arc::new(MemoryStore::new()),
        catalog: handle,
        metering,
        billing: None,
        admin_token: Some(Arc::from(TOKEN)),
        syncer: None,
        history: Some(history),
    };
    TowerToHyperService::new(admin::router(state, None))
}

/// One request, its body read to the end; the `&csv` marker (not sent) asks for `Accept: text/csv`.
async fn get(service: &TowerToHyperService<Router>, path: &str) -> usize {
    let (path, csv) = match path.strip_suffix("&csv") {
        Some(p) => (p, true),
        None => (path, false),
    };
    let request = Request::get(path)
        .header("authorization", format!("Bearer {TOKEN}"))
        .header("accept", if csv { "text/csv" } else { "application/json" })
        .body(Body::empty())
        .expect("request");
    let (parts, body) = service.call(request).await.expect("call").into_parts();
    let bytes = body.collect().await.expect("body").to_bytes();
    assert_eq!(parts.status, StatusCode::OK, "{path}: {bytes:?}");
    bytes.len()
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let rank = ((sorted.len() as f64) * p).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// Times `f` [`RUNS`] times after a tenth as many warm-up runs; prints p50 / p99 / max under `label`.
async fn percentiles<F, Fut>(label: &str, mut f: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = usize>,
{
    let runs = RUNS.load(std::sync::atomic::Ordering::Relaxed);
    for _ in 0..runs.div_ceil(10) {
        f().await;
    }
    let mut times = Vec::with_capacity(runs);
    let mut size = 0;
    for _ in 0..runs {
        let t = Instant::now();
        size = f().await;
        times.push(t.elapsed());
    }
    times.sort_unstable();
    println!(
        "{label}: {runs} runs, p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms ({size})",
        ms(percentile(&times, 0.50)),
        ms(percentile(&times, 0.99)),
        ms(percentile(&times, 1.0)),
    );
}

fn run(c: &mut Criterion, rt: &tokio::runtime::Runtime, backend: &str, url: &str) {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = rt.block_on(async {
        let store = SqlStore::open(url).expect("open");
        store.migrate().await.expect("migrate");
        seed(&store).await;
        store
    });
    let service = rt.block_on(router(store.clone(), dir.path()));
    // The answer is what it should be: 31 days x 10 products.
    let page: serde_json::Value = rt.block_on(async {
        let request = Request::get(DAY)
            .header("authorization", format!("Bearer {TOKEN}"))
            .body(Body::empty())
            .unwrap();
        let body = service.call(request).await.unwrap().into_body();
        serde_json::from_slice(&body.collect().await.unwrap().to_bytes()).unwrap()
    });
    assert_eq!(page["series"].as_array().map(Vec::len), Some(31 * PRODUCTS));
    assert_eq!(page["next_after"], serde_json::Value::Null);

    let mut group = c.benchmark_group(format!("history_{backend}"));
    group.sample_size(50);
    group.measurement_time(Duration::from_secs(10));
    group.bench_function("month_by_day_31x24x10", |b| {
        b.to_async(rt).iter(|| get(&service, DAY));
    });
    group.finish();

    rt.block_on(async {
        for (name, path) in QUERIES {
            let label = format!("history {backend} {name} (whole handler, body bytes)");
            percentiles(&label, || get(&service, path)).await;
        }
        // What the store's read alone costs: the month's 7,440 hourly rows in one call.
        let customer = Subject::Customer("cus_0000".to_owned());
        let label = format!("history {backend} store.hours, one call for the month (rows)");
        percentiles(&label, || async {
            let rows = store.hours(&customer, DECEMBER, DECEMBER + 31 * 86_400);
            rows.await.expect("hours").len()
        })
        .await;
        let label = format!("history {backend} store.sums, the month by day (rows)");
        percentiles(&label, || async {
            let rows = store.sums(&customer, DECEMBER, DECEMBER + 31 * 86_400, 0, 86_400);
            rows.await.expect("sums").len()
        })
        .await;
        if std::env::var_os("HISTORY_BENCH_PROBE").is_some() {
            probe(backend, url).await;
        }
    });
}

/// Where the store's read goes (`HISTORY_BENCH_PROBE=1`): the same month read through other statements and
/// drivers, each on a pool of its own, the database as seeded.
async fn probe(backend: &str, url: &str) {
    use sqlx::Row as _;
    const COLUMNS: &str = "hour, customer, app, product, meter, allowed, denied, billable, value";
    const WHERE: &str = "FROM usage_rollups WHERE customer = $1 AND hour >= $2 AND hour < $3";
    let store_sql =
        format!("SELECT {COLUMNS} {WHERE} ORDER BY hour, app, product, meter, customer");
    let hour_order = format!("SELECT {COLUMNS} {WHERE} ORDER BY hour");
    let by_day = format!(
        "SELECT hour - hour % 86400 AS day, app, product, meter, CAST(SUM(allowed) AS BIGINT), \
         CAST(SUM(value) AS BIGINT) {WHERE} GROUP BY day, app, product, meter"
    );
    let any = sqlx::any::AnyPoolOptions::new()
        .max_connections(1)
        .connect(url)
        .await
        .expect("any pool");
    let month = (DECEMBER, DECEMBER + 31 * 86_400);
    let any_rows = |sql: String, by_name: bool, at: [usize; 3]| {
        let any = any.clone();
        move || {
            let (any, sql) = (any.clone(), sql.clone());
            async move {
                let rows = sqlx::query(&sql)
                    .bind("cus_0000")
                    .bind(month.0)
                    .bind(month.1)
                    .fetch_all(&any)
                    .await
                    .expect("probe");
                for row in &rows {
                    if by_name {
                        let _: (i64, String, String) = (
                            row.try_get("hour").unwrap(),
                            row.try_get("app").unwrap(),
                            row.try_get("meter").unwrap(),
                        );
                    } else {
                        let _: (i64, String, String) = (
                            row.try_get(at[0]).unwrap(),
                            row.try_get(at[1]).unwrap(),
                            row.try_get(at[2]).unwrap(),
                        );
                    }
                }
                rows.len()
            }
        }
    };
    let label = |what: &str| format!("probe {backend} {what} (rows)");
    percentiles(
        &label("any driver, store's statement"),
        any_rows(store_sql.clone(), true, [0, 2, 4]),
    )
    .await;
    percentiles(
        &label("any driver, ORDER BY hour only"),
        any_rows(hour_order, false, [0, 2, 4]),
    )
    .await;
    percentiles(
        &label("any driver, GROUP BY day in SQL"),
        any_rows(by_day.clone(), false, [0, 1, 3]),
    )
    .await;
    if backend == "sqlite" {
        let native = sqlx::sqlite::SqlitePoolOptions::new()
            .max_connections(1)
            .connect(url)
            .await
            .expect("sqlite pool");
        percentiles(&label("sqlite driver, store's statement"), || async {
            let rows = sqlx::query(&store_sql)
                .bind("cus_0000")
                .bind(month.0)
                .bind(month.1)
                .fetch_all(&native)
                .await
                .expect("probe");
            rows.len()
        })
        .await;
        sqlx::query(
            "CREATE INDEX probe_covering ON usage_rollups \
             (customer, hour, app, product, meter, allowed, denied, billable, value)",
        )
        .execute(&any)
        .await
        .expect("index");
        percentiles(
            &label("any driver, store's statement, covering index"),
            any_rows(store_sql, true, [0, 2, 4]),
        )
        .await;
        percentiles(
            &label("any driver, GROUP BY day, covering index"),
            any_rows(by_day, false, [0, 1, 3]),
        )
        .await;
        sqlx::query("DROP INDEX probe_covering")
            .execute(&any)
            .await
            .expect("drop");
    }
}

fn main() {
    if !std::env::args().any(|a| a == "--bench") {
        RUNS.store(3, std::sync::atomic::Ordering::Relaxed);
    }
    let mut c = Criterion::default().configure_from_args();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let only = std::env::var("HISTORY_BENCH_BACKENDS").unwrap_or_default();
    let wanted = |backend: &str| only.is_empty() || only.split(',').any(|b| b == backend);

    if wanted("sqlite") {
        let dir = tempfile::tempdir().expect("tempdir");
        let url = format!("sqlite://{}", dir.path().join("state.db").display());
        run(&mut c, &rt, "sqlite", &url);
    }
    if wanted("postgres") {
        let bin = pg::pg_bin_dir();
        let initdb = bin
            .as_ref()
            .map_or_else(|| "initdb".into(), |b| b.join("initdb"));
        let found = std::process::Command::new(&initdb)
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success());
        if found {
            let server = pg::PostgresServer::start();
            run(&mut c, &rt, "postgres", &server.url());
        } else {
            println!(
                "history postgres: skipped, no PostgreSQL binaries ({} not found; set TOLLGATE_PG_BIN)",
                initdb.display()
            );
        }
    }
    c.final_summary();
}
