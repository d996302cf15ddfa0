//! Usage metering end to end: requests through a real Envoy 1.40 become usage records over the gRPC access
//! log and exact per-customer, per-meter window totals in the billing outbox; and a `kill -9` of the tollgate
//! binary in the middle of acknowledged access-log streams loses nothing and counts nothing twice.

mod support;

use std::collections::HashMap;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use envoy_types::pb::envoy::data::accesslog::v3::HttpAccessLogEntry;
use envoy_types::pb::envoy::service::accesslog::v3::access_log_service_client::AccessLogServiceClient;
use serde_json::Value as Json;
use support::{Stack, Tollgate, key_hash, poll_until};

const KEY_A: &str = "tg_test_MeteredAppAKeyk7Kp4aggzLahAQ5tvTRefxE";
const KEY_B: &str = "tg_test_MeteredAppBKeyk7Kp4aggzLahAQ5tvTRefxE";

/// How long totals may take to show up: a window, its lateness, and Envoy's log flush.
const SEAL_TIMEOUT: Duration = Duration::from_secs(30);

fn catalog() -> String {
    format!(
        r#"
products:
  - name: weather
    quota: {{limit: 100, unit: day}}
    operations: [{{api: weatherapi, paths: [/forecast], methods: [GET]}}]
    meter: {{event_name: weather_api_calls, value: calls, success: [2xx]}}
  - name: genai
    operations: [{{api: weatherapi, paths: [/generate], methods: [POST]}}]
    meter: {{event_name: genai_tokens, value: "response_header:x-tokens", success: [2xx]}}
  - name: kill_test
    operations: [{{api: weatherapi, paths: [/]}}]
    meter: {{event_name: kill_test_calls, value: calls}}
developers:
  - email: a@example.test
    stripe_customer: cus_A
    apps:
      - name: app_a
        products: [{{name: weather}}]
        keys: [{{hash: "{a}"}}]
  - email: b@example.test
    stripe_customer: cus_B
    apps:
      - name: app_b
        products: [{{name: genai}}]
        keys: [{{hash: "{b}"}}]
"#,
        a = key_hash(KEY_A),
        b = key_hash(KEY_B)
    )
}

fn config(window: &str, lateness: &str) -> String {
    format!(
        "{}metering: {{dir: data, window: {window}, lateness: {lateness}}}\n",
        support::base_config("test")
    )
}

/// `GET /forecast` with app A's key through the Envoy listening at `url`; the status.
async fn forecast(client: &reqwest::Client, url: String) -> u16 {
    client
        .get(url)
        .header("x-api-key", KEY_A)
        .send()
        .await
        .expect("call")
        .status()
        .as_u16()
}

/// Sum of outbox values per (customer, meter), from `/v1/outbox`.
async fn outbox_totals(tollgate: &Tollgate) -> HashMap<(String, String), u64> {
    let rows: Json = support::http_client()
        .get(tollgate.admin_url("/v1/outbox"))
        .send()
        .await
        .expect("GET /v1/outbox")
        .json()
        .await
        .expect("outbox JSON");
    let mut totals = HashMap::new();
    for row in rows.as_array().expect("outbox is a list") {
        let key = (
            row["stripe_customer"]
                .as_str()
                .unwrap_or_default()
                .to_owned(),
            row["event_name"].as_str().unwrap_or_default().to_owned(),
        );
        *totals.entry(key).or_insert(0) += row["value"].as_u64().unwrap_or(0);
    }
    totals
}

/// Waits until every window of `customer` is sealed (nothing open or closing) and returns the outbox totals.
async fn settled_totals(tollgate: &Tollgate, customer: &str) -> HashMap<(String, String), u64> {
    let client = support::http_client();
    let url = tollgate.admin_url(&format!("/v1/usage?customer={customer}"));
    poll_until(
        &format!("every window of {customer} to be sealed"),
        SEAL_TIMEOUT,
        || {
            let client = client.clone();
            let url = url.clone();
            async move {
                let report: Json = client.get(&url).send().await.ok()?.json().await.ok()?;
                let windows: Vec<&Json> = report["meters"]
                    .as_array()?
                    .iter()
                    .flat_map(|m| m["windows"].as_array().into_iter().flatten())
                    .collect();
                let settled = !windows.is_empty()
                    && windows
                        .iter()
                        .all(|w| w["state"] == "sealed" && w["value"] == w["sealed_value"]);
                settled.then_some(())
            }
        },
    )
    .await;
    outbox_totals(tollgate).await
}

#[tokio::test]
async fn requests_through_envoy_become_exact_window_totals() {
    let stack = Stack::start(&config("1s", "1s"), &catalog()).await;
    let client = &stack.client;
    let mut sent = 0u64;

    for _ in 0..20 {
        assert_eq!(forecast(client, stack.url("/forecast")).await, 200);
        sent += 1;
    }
    for status in [500, 500, 503, 404, 404] {
        let r = client
            .get(stack.url("/forecast"))
            .header("x-api-key", KEY_A)
            .header("x-echo-status", status.to_string())
            .send()
            .await
            .expect("call");
        assert_eq!(r.status().as_u16(), status);
        sent += 1;
    }
    for tokens in 1..=10u64 {
        let r = client
            .post(stack.url("/generate"))
            .header("x-api-key", KEY_B)
            .header("x-echo-tokens", tokens.to_string())
            .send()
            .await
            .expect("call");
        assert_eq!(r.status().as_u16(), 200);
        sent += 1;
    }
    for _ in 0..4 {
        let r = client
            .get(stack.url("/forecast"))
            .send()
            .await
            .expect("call");
        assert_eq!(r.status().as_u16(), 401);
        sent += 1;
    }

    // N requests give exactly N records (denied ones included).
    let expected = sent as f64;
    stack
        .tollgate
        .wait_metric("tollgate_metering_records_spooled_total", &[], |v| {
            v >= expected
        })
        .await;

    let a = settled_totals(&stack.tollgate, "cus_A").await;
    let b = settled_totals(&stack.tollgate, "cus_B").await;
    // 5xx and 4xx responses and denied requests are not billable; the header meter sums 1..=10.
    assert_eq!(
        a.get(&("cus_A".into(), "weather_api_calls".into())),
        Some(&20),
        "{a:?}"
    );
    assert_eq!(
        b.get(&("cus_B".into(), "genai_tokens".into())),
        Some(&55),
        "{b:?}"
    );
    assert_eq!(a.values().sum::<u64>(), 75, "nothing else is billed: {a:?}");
    assert_eq!(
        stack
            .tollgate
            .metric("tollgate_metering_records_received_total", &[])
            .await,
        Some(sent as f64)
    );
    // The usage report shows denied records for the app, never billed.
    let report: Json = stack
        .client
        .get(stack.tollgate.admin_url("/v1/usage?app=app_a"))
        .send()
        .await
        .expect("usage")
        .json()
        .await
        .expect("usage JSON");
    let billable: u64 = report["meters"]
        .as_array()
        .expect("meters")
        .iter()
        .flat_map(|m| m["windows"].as_array().into_iter().flatten())
        .map(|w| w["billable"].as_u64().unwrap_or(0))
        .sum();
    assert_eq!(billable, 20, "{report}");
}

/// One allowed, billable access-log entry of the kill test's product.
fn entry(id: &str, start_ms: i64) -> HttpAccessLogEntry {
    let authz = [
        ("decision", "allow"),
        ("app", "app_k"),
        ("stripe_customer", "cus_K"),
        ("product", "kill_test"),
    ];
    support::authz_entry(id, start_ms, 200, &authz)
}

/// Sends one batch as its own access-log stream; `Ok` means tollgate acknowledged it (every record durable).
async fn send_batch(port: u16, batch: &[HttpAccessLogEntry]) -> Result<(), String> {
    let mut client = AccessLogServiceClient::connect(format!("http://127.0.0.1:{port}"))
        .await
        .map_err(|e| e.to_string())?;
    let message = support::http_message(batch.to_vec(), Some("kill-test"));
    let request = tonic::Request::new(tokio_stream::iter(vec![message]));
    let call = client.stream_access_logs(request);
    match tokio::time::timeout(Duration::from_secs(10), call).await {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(status)) => Err(status.to_string()),
        Err(_) => Err("timed out".into()),
    }
}

#[tokio::test]
async fn kill_minus_nine_loses_no_acknowledged_record_and_counts_none_twice() {
    const BATCHES: usize = 40;
    const PER_BATCH: usize = 25;
    let mut catalog = catalog();
    catalog.push_str(
        "  - email: k@example.test\n    stripe_customer: cus_K\n    apps:\n      - name: app_k\n        products: [{name: kill_test}]\n",
    );
    let mut tollgate = Tollgate::start(&config("5s", "5s"), &catalog).await;
    let port = tollgate.grpc_port;
    let now_ms = i64::try_from(
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .expect("clock")
            .as_millis(),
    )
    .expect("ms fit i64");
    let batches: Vec<Vec<HttpAccessLogEntry>> = (0..BATCHES)
        .map(|b| {
            (0..PER_BATCH)
                .map(|i| entry(&format!("kill-{b}-{i}"), now_ms))
                .collect()
        })
        .collect();

    // Stream batches concurrently with a kill -9 after the first acknowledgements.
    let sender = {
        let batches = batches.clone();
        tokio::spawn(async move {
            let mut acked = Vec::new();
            for (i, batch) in batches.iter().enumerate() {
                if send_batch(port, batch).await.is_ok() {
                    acked.push(i);
                }
            }
            acked
        })
    };
    let metrics_url = tollgate.admin_url("/metrics");
    poll_until("some batches to be acknowledged", SEAL_TIMEOUT, || {
        let url = metrics_url.clone();
        async move {
            let text = support::http_client()
                .get(&url)
                .send()
                .await
                .ok()?
                .text()
                .await
                .ok()?;
            let spooled =
                support::parse_metric(&text, "tollgate_metering_records_spooled_total", &[])?;
            (spooled >= (5 * PER_BATCH) as f64).then_some(())
        }
    })
    .await;
    tollgate.kill();
    let acked = sender.await.expect("sender task");
    assert!(
        !acked.is_empty() && acked.len() < BATCHES,
        "the kill should land mid-run: {} acked",
        acked.len()
    );

    tollgate.restart().await;
    // Everything acknowledged before the kill survived it.
    let spooled_before_resend = usage_records(&tollgate, "cus_K").await;
    assert!(
        spooled_before_resend >= (acked.len() * PER_BATCH) as u64,
        "{spooled_before_resend} records after restart, {} acknowledged",
        acked.len() * PER_BATCH
    );
    // The sender does not know what happened to unacknowledged batches: it resends every batch until acked.
    for batch in &batches {
        poll_until(
            "a resent batch to be acknowledged",
            SEAL_TIMEOUT,
            || async { send_batch(port, batch).await.ok() },
        )
        .await;
    }
    let totals = settled_totals(&tollgate, "cus_K").await;
    assert_eq!(
        totals.get(&("cus_K".into(), "kill_test_calls".into())),
        Some(&((BATCHES * PER_BATCH) as u64)),
        "{totals:?}"
    );
}

/// Records the usage report counts for `customer` across its retained windows.
async fn usage_records(tollgate: &Tollgate, customer: &str) -> u64 {
    let report: Json = support::http_client()
        .get(tollgate.admin_url(&format!("/v1/usage?customer={customer}")))
        .send()
        .await
        .expect("usage")
        .json()
        .await
        .expect("usage JSON");
    report["meters"]
        .as_array()
        .map(|meters| {
            meters
                .iter()
                .flat_map(|m| m["windows"].as_array().into_iter().flatten())
                .map(|w| w["records"].as_u64().unwrap_or(0))
                .sum()
        })
        .unwrap_or(0)
}

#[tokio::test]
async fn with_an_access_log_token_only_the_envoy_presenting_it_is_metered() {
    let config = format!("access_log_token: s3cret-token\n{}", config("1s", "1s"));
    let upstream = support::EchoUpstream::start();
    let tollgate = Tollgate::start(&config, &catalog()).await;
    let plain = support::envoy_config(tollgate.grpc_port, upstream.port);
    let trusted = support::Envoy::start(&support::with_stream_token(&plain, "s3cret-token")).await;
    let stranger = support::Envoy::start(&support::with_stream_token(&plain, "guessed")).await;
    let client = support::http_client();
    for envoy in [&trusted, &stranger] {
        for _ in 0..5 {
            let status = forecast(&client, envoy.url("/forecast")).await;
            assert_eq!(status, 200, "ext_authz needs no token");
        }
    }
    poll_until("the trusted Envoy's 5 records", SEAL_TIMEOUT, || async {
        (usage_records(&tollgate, "cus_A").await == 5).then_some(())
    })
    .await;
    poll_until("the stranger's streams refused", SEAL_TIMEOUT, || async {
        let refused = tollgate
            .metric("tollgate_metering_streams_unauthenticated_total", &[])
            .await
            .unwrap_or(0.0);
        (refused >= 1.0).then_some(())
    })
    .await;
    // The stranger keeps retrying and is refused every time: its 5 calls never become usage.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(usage_records(&tollgate, "cus_A").await, 5);
    assert!(
        !tollgate.logs().contains("s3cret-token") && !tollgate.logs().contains("guessed"),
        "a token reached the log"
    );
}

#[tokio::test]
async fn usage_for_an_app_reports_its_quota_counters() {
    let stack = Stack::start(&config("60s", "1s"), &catalog()).await;
    for _ in 0..7 {
        assert_eq!(forecast(&stack.client, stack.url("/forecast")).await, 200);
    }
    let get = |query: &'static str| {
        let url = stack.tollgate.admin_url(&format!("/v1/usage?{query}"));
        async move {
            let body: Json = support::http_client()
                .get(url)
                .send()
                .await
                .expect("usage")
                .json()
                .await
                .expect("usage JSON");
            body
        }
    };
    let report = get("app=app_a").await;
    let quota = report["quota"].as_array().expect("a quota list for an app");
    assert_eq!(quota.len(), 1, "{quota:?}");
    let counter = &quota[0];
    assert_eq!(counter["product"], "weather");
    assert_eq!(counter["operation"], Json::Null);
    assert_eq!(
        (counter["limit"].as_u64(), counter["unit"].as_str()),
        (Some(100), Some("day"))
    );
    assert_eq!(counter["used"].as_u64(), Some(7));
    assert_eq!(counter["remaining"].as_u64(), Some(93));
    assert!(
        counter["window_start"]
            .as_str()
            .is_some_and(|t| t.ends_with("T00:00:00+00:00"))
    );
    assert_eq!(get("app=nobody").await["quota"], Json::Array(Vec::new()));
    assert!(
        get("customer=cus_A").await.get("quota").is_none(),
        "quota counters are per app"
    );
}
