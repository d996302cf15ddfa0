//! The operator's pictures name only what tollgate exports: every `tollgate_*` series that a query of the
//! Grafana dashboard (`charts/tollgate/dashboards/tollgate.json`) or an alert of the chart's PrometheusRule
//! (`charts/tollgate/templates/prometheusrule.yaml`) reads appears in the `/metrics` of a real tollgate with every
//! part that has metrics switched on: the Redis quota store, metering through a real Envoy's access log, billing
//! to the Stripe emulator, the paywall, prepaid credits and the management API. Histograms are read through
//! their `_bucket` series, and label vectors that tollgate does not pre-register show once traffic gave them a
//! value, which the test makes. (`scripts/validate-deploy` checks the same queries parse as PromQL, offline.)

mod support;

#[path = "support/stripe.rs"]
mod stripe_support;

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use stripe_support::{API_KEY, StripeEmulator};
use support::{RedisServer, Stack, key_hash, root};

const ADMIN_TOKEN: &str = "test-admin-token-dashboards-0123456789";
const SECRET: &str = "whsec_test_tollgate_dashboards_0123456789";
const KEY: &str = "tg_test_DashboardsDashboardsDashboards0123456";
/// How long the traffic's metrics may take to show: a metering window sealed and delivered to the emulator,
/// the first Stripe resync, on a busy machine.
const SHOWN: Duration = Duration::from_secs(90);

fn catalog() -> String {
    format!(
        r#"
products:
  - name: weather
    quota: {{limit: 1000, unit: minute}}
    meter: {{event_name: weather_api_calls, value: calls, success: [2xx]}}
    operations: [{{api: weatherapi, paths: [/forecast]}}]
  - name: prepaid
    prepaid: {{cost: 1}}
    operations: [{{api: weatherapi, paths: [/prepaid/**]}}]
  - name: starter
    stripe_prices: [price_starter]
    operations: [{{api: weatherapi, paths: [/starter]}}]
developers:
  - email: ada@example.test
    company: acme
    stripe_customer: cus_Ada
    apps:
      - name: adaapp
        products: [{{name: weather, status: approved}}, {{name: prepaid, status: approved}}]
        keys: [{{hash: "{}"}}]
"#,
        key_hash(KEY)
    )
}

fn config(emulator: &StripeEmulator, redis: &RedisServer) -> String {
    format!(
        "environment: test
catalog:
  path: catalog.yaml
identity:
  api_key: {{headers: [x-api-key]}}
api_context_extension: tollgate_api
admin_token: {ADMIN_TOKEN}
quota:
  store: redis
  redis_url: {}
metering:
  dir: ./data
  window: 1s
  lateness: 500ms
billing:
  stripe:
    api_base: {}
    api_key: {API_KEY}
    webhook_secret: {SECRET}
    initial_backoff: 50ms
    max_backoff: 1s
    request_timeout: 2s
    poll_interval: 200ms
    rate_limit: 50
",
        redis.url(),
        emulator.url()
    )
}

/// Every `tollgate_<name>` token in `text`.
fn tollgate_names(text: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let bytes = text.as_bytes();
    let word = |b: u8| b.is_ascii_alphanumeric() || b == b'_';
    let mut from = 0;
    while let Some(at) = text[from..].find("tollgate_") {
        let start = from + at;
        let mut end = start + "tollgate_".len();
        while end < bytes.len() && word(bytes[end]) {
            end += 1;
        }
        if (start == 0 || !word(bytes[start - 1])) && end > start + "tollgate_".len() {
            names.insert(text[start..end].to_owned());
        }
        from = end;
    }
    names
}

/// The dashboard's queries: every panel target's `expr` (rows' panels included) and every variable's query.
fn dashboard_queries(value: &serde_json::Value, out: &mut Vec<String>) {
    match value {
        serde_json::Value::Object(map) => {
            for (key, v) in map {
                match (key.as_str(), v) {
                    ("expr" | "query" | "definition", serde_json::Value::String(s)) => {
                        out.push(s.clone())
                    }
                    _ => dashboard_queries(v, out),
                }
            }
        }
        serde_json::Value::Array(items) => items.iter().for_each(|v| dashboard_queries(v, out)),
        _ => {}
    }
}

/// The tollgate series the dashboard and the PrometheusRule read.
fn referenced() -> BTreeSet<String> {
    let chart = root().join("charts/tollgate");
    let dashboard: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(chart.join("dashboards/tollgate.json")).expect("the dashboard"),
    )
    .expect("the dashboard is JSON");
    let mut queries = Vec::new();
    dashboard_queries(&dashboard, &mut queries);
    assert!(
        queries.len() > 30,
        "only {} dashboard queries found",
        queries.len()
    );
    let mut names: BTreeSet<String> = queries.iter().flat_map(|q| tollgate_names(q)).collect();
    let rule = std::fs::read_to_string(chart.join("templates/prometheusrule.yaml"))
        .expect("the PrometheusRule template");
    let from_rule = tollgate_names(&rule);
    assert!(
        from_rule.len() > 8,
        "only {from_rule:?} in the PrometheusRule"
    );
    names.extend(from_rule);
    names
}

/// The series names of a `/metrics` answer (histograms by their `_bucket`, `_sum` and `_count`).
fn exported(text: &str) -> BTreeSet<String> {
    text.lines()
        .filter(|line| !line.is_empty() && !line.starts_with('#'))
        .filter_map(|line| line.split(['{', ' ']).next())
        .map(str::to_owned)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_metric_the_dashboard_and_the_alerts_read_is_exported() {
    let wanted = referenced();
    let emulator = StripeEmulator::start();
    emulator.create_price(Some("price_starter"), None).await;
    let redis = RedisServer::start();
    let stack = Stack::start(&config(&emulator, &redis), &catalog()).await;

    // Metered, billed and quota-counted calls, and one denied.
    for _ in 0..3 {
        let resp = stack
            .client
            .get(stack.url("/forecast"))
            .header("x-api-key", KEY)
            .send()
            .await
            .expect("call through Envoy");
        assert_eq!(resp.status(), 200);
    }
    let denied = stack
        .client
        .get(stack.url("/forecast"))
        .header("x-api-key", "tg_test_NotInTheCatalogNotInTheCatalog000000")
        .send()
        .await
        .expect("denied call");
    assert_eq!(denied.status(), 401);
    // Credits through the management API, spent by prepaid calls.
    let grant = stack
        .client
        .post(stack.tollgate.admin_url("/v1/credits/acme"))
        .bearer_auth(ADMIN_TOKEN)
        .header("Idempotency-Key", "dashboards-grant-1")
        .json(&serde_json::json!({"amount": 10, "reason": "dashboards"}))
        .send()
        .await
        .expect("grant credits");
    assert!(
        grant.status().is_success(),
        "grant answered {}",
        grant.status()
    );
    for _ in 0..2 {
        let resp = stack
            .client
            .get(stack.url("/prepaid/x"))
            .header("x-api-key", KEY)
            .send()
            .await
            .expect("prepaid call through Envoy");
        assert_eq!(resp.status(), 200);
    }

    let deadline = Instant::now() + SHOWN;
    loop {
        let have = exported(&stack.tollgate.metrics().await);
        let missing: Vec<&String> = wanted.difference(&have).collect();
        if missing.is_empty() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the dashboard or the PrometheusRule reads series tollgate does not export: {missing:?}\n\
             tollgate exports: {have:?}\ntollgate's stderr:\n{}",
            stack.tollgate.logs()
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}
