//! Usage history end to end: traffic through a real Envoy to two tollgate replicas sharing a real PostgreSQL
//! state store; each replica rolls its closed windows up into the same hourly rows, so the history is the
//! fleet's, counted once, a replica's kill -9 and restart included.

mod support;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use envoy_types::pb::envoy::service::accesslog::v3::access_log_service_client::AccessLogServiceClient;
use support::{
    EchoUpstream, Envoy, PostgresServer, Tollgate, base_config, envoy_config_replicas, http_client,
    key_hash,
};
use tollgate::history::{HistoryStore, Subject};
use tollgate::state::sql::SqlStore;

const KEY_ADA: &str = "tg_test_AdaHistoryKeyZBoBcuk7Kp4aggzLahAQ5tvTRefxE";
const KEY_BOB: &str = "tg_test_BobHistoryKeyZBoBcuk7Kp4aggzLahAQ5tvTRefxE";
/// How long closed windows may take to reach the history: window 1 s + lateness 0.5 s + retention 1 s, and
/// a seal tick, with room for a slow machine.
const ROLLED_UP: Duration = Duration::from_secs(30);

fn catalog() -> String {
    format!(
        r#"
products:
  - name: weather
    operations:
      - {{api: weatherapi, paths: [/forecast]}}
    meter: {{event_name: weather_api_calls, value: calls, success: [2xx]}}
developers:
  - email: ada@example.com
    stripe_customer: cus_Ada
    apps:
      - name: adaapp
        products: [{{name: weather}}]
        keys: [{{hash: "{}"}}]
  - email: bob@example.com
    stripe_customer: cus_Bob
    apps:
      - name: bobapp
        products: [{{name: weather}}]
        keys: [{{hash: "{}"}}]
"#,
        key_hash(KEY_ADA),
        key_hash(KEY_BOB)
    )
}

fn config(pg: &PostgresServer) -> String {
    format!(
        "{}metering:\n  dir: ./data\n  window: 1s\n  lateness: 500ms\n  retention: 1s\nstate:\n  url: {}\n",
        base_config("test"),
        pg.url()
    )
}

/// `calls` calls with `key` through Envoy; every one must be allowed.
async fn traffic(client: &reqwest::Client, envoy: &Envoy, key: &str, calls: u64) {
    for _ in 0..calls {
        let status = client
            .get(envoy.url("/forecast"))
            .header("x-api-key", key)
            .send()
            .await
            .expect("call through Envoy")
            .status();
        assert_eq!(status, 200);
    }
}

/// Streams `calls` allowed, billable entries of Bob's app straight to `t`'s access-log service (as Envoy
/// would), so that replica meters them whatever Envoy's stream did.
async fn log_to(t: &Tollgate, tag: &str, calls: usize) {
    let now_ms = chrono::Utc::now().timestamp_millis();
    let authz = [
        ("decision", "allow"),
        ("app", "bobapp"),
        ("stripe_customer", "cus_Bob"),
        ("product", "weather"),
    ];
    let entries = (0..calls)
        .map(|i| support::authz_entry(&format!("{tag}-{i}"), now_ms, 200, &authz))
        .collect();
    let mut client = AccessLogServiceClient::connect(format!("http://127.0.0.1:{}", t.grpc_port))
        .await
        .expect("connect to the access-log service");
    let message = support::http_message(entries, Some("history-test"));
    client
        .stream_access_logs(tonic::Request::new(tokio_stream::iter(vec![message])))
        .await
        .expect("entries acknowledged");
}

/// (allowed, value) per (customer, app) in the history, over all time.
async fn history(store: &SqlStore) -> BTreeMap<(String, String), (u64, u64)> {
    let mut got = BTreeMap::new();
    for customer in ["cus_Ada", "cus_Bob"] {
        let rows = store
            .hours(&Subject::Customer(customer.to_owned()), 0, i64::MAX)
            .await
            .expect("read the history");
        for row in rows {
            let e = got
                .entry((row.dims.customer, row.dims.app))
                .or_insert((0, 0));
            e.0 += row.counts.allowed;
            e.1 += row.counts.value;
        }
    }
    got
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_on_postgres_keep_one_history_once() {
    let pg = PostgresServer::start();
    let upstream = EchoUpstream::start();
    let mut a = Tollgate::start(&config(&pg), &catalog()).await;
    let mut b = Tollgate::start(&config(&pg), &catalog()).await;
    let envoy = Envoy::start(&envoy_config_replicas(
        &[a.grpc_port, b.grpc_port],
        upstream.port,
    ))
    .await;
    let client = http_client();

    // Traffic over several windows, through both replicas (Envoy balances Checks and access logs).
    for _ in 0..3 {
        traffic(&client, &envoy, KEY_ADA, 10).await;
        traffic(&client, &envoy, KEY_BOB, 4).await;
        tokio::time::sleep(Duration::from_millis(1_100)).await;
    }
    // Envoy streams the access log to one replica at a time: the one metering dies with windows still
    // open or waiting for their rollup, and comes back on its spool.
    let metered_by_a = a
        .metric("tollgate_metering_records_spooled_total", &[])
        .await
        .unwrap_or(0.0)
        > 0.0;
    let holder = if metered_by_a { &mut a } else { &mut b };
    holder.kill();
    holder.restart().await;
    traffic(&client, &envoy, KEY_ADA, 5).await;
    // Envoy may have kept its stream on one replica: each meters 3 more of Bob's calls for sure.
    log_to(&a, "to-a", 3).await;
    log_to(&b, "to-b", 3).await;

    let store = SqlStore::open(&pg.url()).expect("open the state store");
    let expected = BTreeMap::from([
        (("cus_Ada".to_owned(), "adaapp".to_owned()), (35, 35)),
        (("cus_Bob".to_owned(), "bobapp".to_owned()), (18, 18)),
    ]);
    let deadline = Instant::now() + ROLLED_UP;
    loop {
        let got = history(&store).await;
        if got == expected {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the fleet's history {got:?} never reached {expected:?}\nA: {}\nB: {}",
            a.logs(),
            b.logs()
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    // Nothing arrives twice later: each replica's windows were added once, the replayed ones refused.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(history(&store).await, expected);
    // The same history through GET /v1/usage/history on either replica, by hour and by day, JSON and CSV.
    let yesterday = (chrono::Utc::now() - chrono::Duration::days(1)).format("%Y-%m-%d");
    for replica in [&a, &b] {
        for granularity in ["hour", "day"] {
            let url = replica.admin_url(&format!(
                "/v1/usage/history?customer=cus_Ada&granularity={granularity}&from={yesterday}"
            ));
            let json: serde_json::Value = client
                .get(&url)
                .send()
                .await
                .expect("GET /v1/usage/history")
                .json()
                .await
                .expect("a JSON answer");
            let series = json["series"].as_array().expect("series");
            let allowed: u64 = series
                .iter()
                .map(|r| r["allowed"].as_u64().unwrap_or(0))
                .sum();
            let value: u64 = series
                .iter()
                .map(|r| r["value"].as_u64().unwrap_or(0))
                .sum();
            assert_eq!((allowed, value), (35, 35), "{granularity}: {json}");
            assert!(
                series.iter().all(|r| r["app"] == "adaapp"),
                "only Ada's app: {json}"
            );
            let csv = client
                .get(&url)
                .header("accept", "text/csv")
                .send()
                .await
                .expect("GET /v1/usage/history as CSV")
                .text()
                .await
                .expect("a CSV answer");
            let mut lines = csv.lines();
            assert_eq!(
                lines.next(),
                Some("start,app,product,meter,allowed,denied,billable,value")
            );
            let csv_value: u64 = lines
                .map(|line| {
                    line.rsplit(',')
                        .next()
                        .and_then(|v| v.parse::<u64>().ok())
                        .unwrap_or(0)
                })
                .sum();
            assert_eq!(csv_value, 35, "{granularity} as CSV: {csv}");
        }
    }
    // Both spools added their own windows (a batch is named by its spool's producer).
    let producers =
        pg.psql("SELECT count(DISTINCT split_part(id, ':', 1)) FROM usage_rollup_batches");
    assert_eq!(
        producers.trim(),
        "2",
        "batches of both replicas: {producers}"
    );
    store.close().await;
}
