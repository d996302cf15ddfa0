//! Billing end to end: client -> Envoy (ext_authz + gRPC access log) -> `tollgate serve` (metering, billing)
//! -> the Stripe emulator as a real process. Traffic must give exact Stripe totals per customer and meter,
//! with and without injected 429/500/timeouts, and never an identifier accepted twice; the usage history in
//! the state store must add up to the same totals, a kill -9 included.

mod support;

#[path = "support/stripe.rs"]
mod stripe_support;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use stripe_support::{API_KEY, StripeEmulator, totals_of};
use support::{Stack, base_config, key_hash};
use tollgate::history::{HistoryStore, Subject};
use tollgate::state::sql::SqlStore;

const KEY_ADA: &str = "tg_test_AdaBillingKeyZBoBcuk7Kp4aggzLahAQ5tvTRefxE";
const KEY_BOB: &str = "tg_test_BobBillingKeyZBoBcuk7Kp4aggzLahAQ5tvTRefxE";

/// How long usage may take to reach the emulator before the test fails.
const BILLED: Duration = Duration::from_secs(90);

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
        products: [{{name: weather, status: approved}}]
        keys: [{{hash: "{}"}}]
  - email: bob@example.com
    stripe_customer: cus_Bob
    apps:
      - name: bobapp
        products: [{{name: weather, status: approved}}]
        keys: [{{hash: "{}"}}]
"#,
        key_hash(KEY_ADA),
        key_hash(KEY_BOB)
    )
}

fn config(emulator: &StripeEmulator) -> String {
    format!(
        "{}metering:
  dir: ./data
  window: 1s
  lateness: 500ms
billing:
  stripe:
    api_base: {}
    api_key: {API_KEY}
    max_backoff: 1s
    initial_backoff: 50ms
    request_timeout: 1s
    poll_interval: 200ms
    rate_limit: 50
",
        base_config("test"),
        emulator.url()
    )
}

async fn traffic(stack: &Stack, key: &str, calls: u64) {
    for _ in 0..calls {
        let resp = stack
            .client
            .get(stack.url("/forecast"))
            .header("x-api-key", key)
            .send()
            .await
            .expect("call through Envoy");
        assert_eq!(resp.status(), 200);
    }
}

async fn billed(emulator: &StripeEmulator, expected: &BTreeMap<(String, String), u64>) {
    let deadline = Instant::now() + BILLED;
    loop {
        let totals = emulator.totals().await;
        if &totals == expected {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "Stripe totals {totals:?} never reached {expected:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// What the traffic of these tests bills: 30 calls for Ada, 12 for Bob.
fn expected_totals() -> BTreeMap<(String, String), u64> {
    [
        (("cus_Ada".to_owned(), "weather_api_calls".to_owned()), 30),
        (("cus_Bob".to_owned(), "weather_api_calls".to_owned()), 12),
    ]
    .into_iter()
    .collect()
}

/// Waits for `expected`, checks it stays so (no late duplicate accepted), that no identifier was accepted
/// twice and that every request matched Stripe's schemas.
async fn billed_exactly(emulator: &StripeEmulator, expected: &BTreeMap<(String, String), u64>) {
    billed(emulator, expected).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(&emulator.totals().await, expected);
    let state = emulator.state().await;
    let mut ids: Vec<&str> = state["events"]
        .as_array()
        .expect("events")
        .iter()
        .map(|e| e["identifier"].as_str().expect("identifier"))
        .collect();
    let n = ids.len();
    ids.sort_unstable();
    ids.dedup();
    assert_eq!(ids.len(), n, "an identifier was accepted twice");
    assert_eq!(state["schema_errors"], serde_json::json!([]));
}

/// Waits until the usage history tollgate keeps in its state store (`data/state.db`) holds, per customer and
/// meter, exactly the value Stripe was sent (`expected`), and `allowed` calls per app; then checks it stays so.
async fn history_matches(
    stack: &Stack,
    expected: &BTreeMap<(String, String), u64>,
    allowed: &BTreeMap<&str, u64>,
) {
    let url = format!(
        "sqlite://{}",
        stack.tollgate.dir().join("data/state.db").display()
    );
    let store = SqlStore::open(&url).expect("open the state store");
    let read = || async {
        let mut values = BTreeMap::new();
        let mut calls = BTreeMap::new();
        for customer in ["cus_Ada", "cus_Bob"] {
            let rows = store
                .hours(&Subject::Customer(customer.to_owned()), 0, i64::MAX)
                .await
                .expect("read the history");
            for row in rows {
                *values
                    .entry((row.dims.customer.clone(), row.dims.meter.clone()))
                    .or_insert(0) += row.counts.value;
                *calls.entry(row.dims.app.clone()).or_insert(0) += row.counts.allowed;
            }
        }
        (values, calls)
    };
    let allowed: BTreeMap<String, u64> =
        allowed.iter().map(|(a, n)| ((*a).to_owned(), *n)).collect();
    let deadline = Instant::now() + BILLED;
    loop {
        let got = read().await;
        if &got.0 == expected && got.1 == allowed {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the usage history {got:?} never reached {expected:?} / {allowed:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // Windows are added once: nothing more arrives later (a replayed spool offers the same batches).
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(read().await, (expected.clone(), allowed));
    store.close().await;
}

async fn run(faults: serde_json::Value) {
    let emulator = StripeEmulator::start();
    emulator.faults(faults).await;
    let stack = Stack::start(&config(&emulator), &catalog()).await;
    traffic(&stack, KEY_ADA, 30).await;
    traffic(&stack, KEY_BOB, 12).await;
    // Denied calls are metered as denied and never billed.
    let denied = stack
        .client
        .get(stack.url("/forecast"))
        .header(
            "x-api-key",
            "tg_test_NotInTheCatalogAtAll1111111111111111111",
        )
        .send()
        .await
        .expect("denied call");
    assert_eq!(denied.status(), 401);
    billed_exactly(&emulator, &expected_totals()).await;
    let allowed = BTreeMap::from([("adaapp", 30), ("bobapp", 12)]);
    history_matches(&stack, &expected_totals(), &allowed).await;
    let state = emulator.state().await;
    assert_eq!(state["concurrency_violations"], 0);
    let letters = stack
        .client
        .get(stack.tollgate.admin_url("/v1/billing/dead-letters"))
        .send()
        .await
        .expect("GET /v1/billing/dead-letters");
    assert_eq!(letters.status(), 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn traffic_through_envoy_gives_exact_stripe_totals() {
    run(serde_json::json!({})).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exact_through_envoy_with_429_500_and_timeouts() {
    run(
        serde_json::json!({"seed": 11, "rate_429": 0.15, "rate_500": 0.15, "rate_timeout": 0.05,
                           "timeout_s": 1.5, "commit_on_fault": 0.5}),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_minus_nine_during_delivery_then_restart_is_exact() {
    let emulator = StripeEmulator::start();
    // Slow Stripe answers keep deliveries in flight when the kill lands.
    emulator
        .faults(serde_json::json!({"latency_ms": 400}))
        .await;
    let mut stack = Stack::start(&config(&emulator), &catalog()).await;
    // Traffic over several windows, so there are several outbox rows to deliver.
    for _ in 0..3 {
        traffic(&stack, KEY_ADA, 10).await;
        traffic(&stack, KEY_BOB, 4).await;
        tokio::time::sleep(Duration::from_millis(1_100)).await;
    }
    stack
        .tollgate
        .wait_metric("tollgate_metering_records_spooled_total", &[], |v| {
            v >= 42.0
        })
        .await;
    // Kill while a meter event is in flight (sent, not yet answered): the one moment that proves a restart
    // neither loses nor repeats it. Waiting for the first accepted total instead raced a loaded machine, where
    // every row could be answered between two polls.
    let deadline = Instant::now() + BILLED;
    loop {
        let state = emulator.state().await;
        if state["in_flight"].as_u64().unwrap_or(0) > 0 {
            // Of the same snapshot: a second request could see the in-flight event answered.
            let accepted: u64 = totals_of(&state).values().sum();
            assert!(
                accepted < 42,
                "the kill should land before every row is delivered"
            );
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no delivery was in flight before the deadline"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    stack.tollgate.kill();
    stack.tollgate.restart().await;

    billed_exactly(&emulator, &expected_totals()).await;
    let allowed = BTreeMap::from([("adaapp", 30), ("bobapp", 12)]);
    history_matches(&stack, &expected_totals(), &allowed).await;
}
