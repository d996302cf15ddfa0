//! Billing delivery against the Stripe emulator as a real process and a real `Metering` in a temp folder:
//! exact totals, faults (429/500/timeouts), a delivery killed mid-flight, dead letters and re-queue, the 401
//! pause, the 20 h rule, the v2 stream with sessions expiring, and reconciliation.

#[path = "support/stripe.rs"]
mod stripe_support;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use tokio::sync::watch;
use tokio::task::JoinHandle;

use stripe_support::{API_KEY, StripeEmulator};
use tollgate::billing::{Billing, DeadLetterKind, Requeue, StripeConfig, StripeMode};
use tollgate::catalog::{CatalogHandle, parse};
use tollgate::metering::{Metering, MeteringError, MeteringOptions, UsageRecord};
use tollgate::source::Source;

/// How long delivery may take to settle before a test fails.
const SETTLE: Duration = Duration::from_secs(90);

const CATALOG: &str = r#"
products:
  - name: calls
    operations: [{api: a, paths: [/]}]
    meter: {event_name: api_calls, value: calls, success: [2xx]}
  - name: bytes
    operations: [{api: a, paths: [/]}]
    meter: {event_name: egress_bytes, value: response_bytes, success: [2xx]}
developers:
  - email: ada@example.com
    stripe_customer: cus_Ada
    apps:
      - name: adaapp
        products: [{name: calls, status: approved}, {name: bytes, status: approved}]
  - email: bob@example.com
    stripe_customer: cus_Bob
    apps:
      - name: bobapp
        products: [{name: calls, status: approved}, {name: bytes, status: approved}]
"#;

type Totals = BTreeMap<(String, String), u64>;

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970")
        .as_millis() as i64
}

fn registry() -> prometheus::Registry {
    prometheus::Registry::new_custom(Some("tollgate".into()), None).expect("registry")
}

/// A metering pipeline with short windows, sealing in the background.
struct Rig {
    dir: tempfile::TempDir,
    metering: Metering,
    stop: watch::Sender<bool>,
    expected: Totals,
    next_id: u64,
}

impl Rig {
    async fn new() -> Rig {
        let dir = tempfile::tempdir().expect("tempdir");
        let options = MeteringOptions::new(
            dir.path().join("metering"),
            Duration::from_millis(300),
            Duration::from_millis(100),
            "test-pod",
        );
        let catalog = Arc::new(CatalogHandle::new(
            parse(&Source::from_text("catalog.yaml", CATALOG.to_owned())).expect("catalog"),
        ));
        let metering = loop {
            match Metering::open(options.clone(), catalog.clone(), &registry()).await {
                Ok(m) => break m,
                Err(MeteringError::Locked(_)) => {
                    tokio::time::sleep(Duration::from_millis(20)).await
                }
                Err(e) => panic!("open metering: {e}"),
            }
        };
        let (stop, rx) = watch::channel(false);
        let runner = metering.clone();
        tokio::spawn(async move { runner.run(rx).await });
        Rig {
            dir,
            metering,
            stop,
            expected: Totals::new(),
            next_id: 0,
        }
    }

    fn metering_dir(&self) -> std::path::PathBuf {
        self.dir.path().join("metering")
    }

    /// Ingests traffic for `for_how_long` in small real-time batches (so it spans several windows) and adds
    /// it to the expected totals.
    async fn traffic(&mut self, for_how_long: Duration) {
        let until = Instant::now() + for_how_long;
        let mut round = 0u64;
        while Instant::now() < until {
            let mut batch = Vec::new();
            for (customer, app) in [("cus_Ada", "adaapp"), ("cus_Bob", "bobapp")] {
                for product in ["calls", "bytes"] {
                    let bytes = 100 + round % 7 * 13;
                    self.next_id += 1;
                    batch.push(UsageRecord {
                        request_id: format!("req-{}", self.next_id),
                        start_ms: now_ms(),
                        decision: "allow".into(),
                        app: app.into(),
                        stripe_customer: customer.into(),
                        product: product.into(),
                        response_code: 200,
                        response_bytes: bytes,
                        ..Default::default()
                    });
                    let (meter, value) = match product {
                        "calls" => ("api_calls", 1),
                        _ => ("egress_bytes", bytes),
                    };
                    *self
                        .expected
                        .entry((customer.into(), meter.into()))
                        .or_default() += value;
                }
            }
            self.metering.ingest(batch).await.expect("ingest");
            round += 1;
            tokio::time::sleep(Duration::from_millis(40)).await;
        }
    }

    /// Waits until every ingested record is sealed into the outbox (delivered or not).
    ///
    /// The outbox alone is not the record of what was sealed: once delivery acknowledged a row and its window
    /// closed, a seal pass compacts the row away (under load, before a poll here ever saw it). The sent ledger
    /// is written before the acknowledgement, so the outbox read first and the ledger read second hold every
    /// row sealed so far.
    async fn sealed(&self) {
        let deadline = Instant::now() + SETTLE;
        let billing_dir = tollgate::billing::state_dir(&self.metering_dir());
        loop {
            let mut rows = BTreeMap::new();
            for item in self.metering.outbox_rows().await {
                let row = item.row;
                rows.insert(row.id, (row.stripe_customer, row.event_name, row.value));
            }
            for row in tollgate::billing::ledger::read(&billing_dir).expect("sent ledger") {
                rows.entry(row.id)
                    .or_insert((row.stripe_customer, row.event_name, row.value));
            }
            let mut sealed = Totals::new();
            for (customer, meter, value) in rows.into_values() {
                *sealed.entry((customer, meter)).or_default() += value;
            }
            if sealed == self.expected {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "windows not sealed: {sealed:?} vs {:?}",
                self.expected
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for Rig {
    fn drop(&mut self) {
        let _ = self.stop.send(true);
    }
}

fn config(emulator: &StripeEmulator) -> StripeConfig {
    let mut c = StripeConfig::new(emulator.url(), API_KEY);
    c.initial_backoff = Duration::from_millis(50);
    c.max_backoff = Duration::from_millis(500);
    c.rate_limit = std::num::NonZeroU32::new(100).expect("non-zero");
    c.request_timeout = Duration::from_millis(800);
    c.poll_interval = Duration::from_millis(100);
    c
}

/// Delivery running in a task, stopped on drop.
struct Running {
    billing: Billing,
    registry: prometheus::Registry,
    stop: watch::Sender<bool>,
    task: JoinHandle<()>,
}

fn start(config: &StripeConfig, metering: &Metering) -> Running {
    let registry = registry();
    let billing = Billing::open(config, metering.clone(), &registry).expect("open billing");
    let (stop, rx) = watch::channel(false);
    let runner = billing.clone();
    let task = tokio::spawn(async move { runner.run(rx).await });
    Running {
        billing,
        registry,
        stop,
        task,
    }
}

impl Running {
    fn metric(&self, name: &str, label: Option<&str>) -> f64 {
        self.registry
            .gather()
            .iter()
            .filter(|f| f.name() == name)
            .flat_map(|f| f.get_metric().iter())
            .filter(|m| label.is_none_or(|l| m.get_label().iter().any(|p| p.value() == l)))
            .map(|m| m.get_counter().get_value() + m.get_gauge().get_value())
            .sum()
    }

    async fn stop(self) {
        let _ = self.stop.send(true);
        self.task.await.expect("delivery ends on shutdown");
    }
}

/// Waits until Stripe's totals equal `expected` and nothing is pending.
async fn settled(emulator: &StripeEmulator, metering: &Metering, expected: &Totals) {
    let deadline = Instant::now() + SETTLE;
    loop {
        let totals = emulator.totals().await;
        let pending = metering.outbox_pending().await.len();
        if &totals == expected && pending == 0 {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "Stripe totals {totals:?} (pending {pending}) never reached {expected:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// What must hold after every run: Stripe's totals are exact, each accepted identifier is an outbox id seen
/// once, every request matched Stripe's schemas, one request in flight per (customer, meter), pinned version.
async fn assert_clean(emulator: &StripeEmulator, expected: &Totals) {
    let state = emulator.state().await;
    assert_eq!(&emulator.totals().await, expected, "exact totals");
    let events = state["events"].as_array().expect("events");
    let mut ids: Vec<&str> = events
        .iter()
        .map(|e| e["identifier"].as_str().expect("identifier"))
        .collect();
    assert!(ids.iter().all(|id| id.starts_with("tg-")), "{ids:?}");
    let n = ids.len();
    ids.sort_unstable();
    ids.dedup();
    assert_eq!(ids.len(), n, "an identifier was accepted twice");
    assert_eq!(
        state["schema_errors"],
        serde_json::json!([]),
        "requests off Stripe's schemas"
    );
    assert_eq!(state["response_schema_errors"], serde_json::json!([]));
    assert_eq!(
        state["concurrency_violations"], 0,
        "two requests in flight for one (customer, meter)"
    );
    assert_eq!(
        state["stripe_versions"],
        serde_json::json!(["2026-09-30.endive"])
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exact_totals_per_customer_and_meter() {
    let emulator = StripeEmulator::start();
    let mut rig = Rig::new().await;
    let running = start(&config(&emulator), &rig.metering);
    rig.traffic(Duration::from_millis(1_500)).await;
    rig.sealed().await;
    settled(&emulator, &rig.metering, &rig.expected).await;
    assert_clean(&emulator, &rig.expected).await;
    let state = emulator.state().await;
    assert_eq!(state["duplicates_refused"], 0);
    let events = state["events"].as_array().expect("events");
    assert_eq!(
        running.metric("tollgate_billing_events_total", Some("delivered")),
        events.len() as f64
    );
    // Every event carries its window start as timestamp and a whole value.
    assert!(
        events
            .iter()
            .all(|e| e["value"].as_u64().is_some_and(|v| v > 0))
    );
    let ledger =
        tollgate::billing::ledger::read(&tollgate::billing::state_dir(&rig.metering_dir()))
            .expect("ledger");
    assert_eq!(ledger.len(), events.len());
    running.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exact_with_429_500_and_timeouts() {
    let emulator = StripeEmulator::start();
    emulator
        .faults(
            serde_json::json!({"seed": 7, "rate_429": 0.15, "rate_500": 0.15, "rate_timeout": 0.05,
                                   "timeout_s": 1.2, "commit_on_fault": 0.5}),
        )
        .await;
    let mut rig = Rig::new().await;
    let running = start(&config(&emulator), &rig.metering);
    rig.traffic(Duration::from_millis(2_000)).await;
    rig.sealed().await;
    settled(&emulator, &rig.metering, &rig.expected).await;
    assert_clean(&emulator, &rig.expected).await;
    let state = emulator.state().await;
    for kind in ["429", "500", "timeout"] {
        assert!(
            state["faults_injected"][kind]
                .as_u64()
                .is_some_and(|n| n > 0),
            "no {kind} injected: {}",
            state["faults_injected"]
        );
    }
    // Events Stripe took while answering 5xx or timing out were resent and refused as duplicates: each such
    // refusal is a row delivery confirmed as "duplicate", never a second accepted event.
    let refused = state["duplicates_refused"].as_u64().expect("count");
    assert!(refused > 0, "no committed fault was exercised: {state}");
    assert_eq!(
        running.metric("tollgate_billing_events_total", Some("duplicate")),
        refused as f64
    );
    assert!(running.metric("tollgate_billing_retries_total", None) > 0.0);
    running.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_mid_flight_then_restarted_is_exact() {
    let emulator = StripeEmulator::start();
    // Slow answers keep requests in flight when the delivery task is aborted.
    emulator
        .faults(serde_json::json!({"latency_ms": 150}))
        .await;
    let mut rig = Rig::new().await;
    rig.traffic(Duration::from_millis(1_500)).await;
    rig.sealed().await;
    let cfg = config(&emulator);
    let first = start(&cfg, &rig.metering);
    let deadline = Instant::now() + SETTLE;
    while emulator.state().await["accepted"].as_u64().unwrap_or(0) < 3 {
        assert!(Instant::now() < deadline, "nothing delivered");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // The crash: drop the delivery mid-request (as kill -9 would) and start again on the same folder.
    first.task.abort();
    let _ = first.task.await;
    drop(first.billing);
    let pending = rig.metering.outbox_pending().await.len();
    assert!(pending > 0, "the abort came too late to interrupt delivery");
    // Stripe still finishes what the dead process sent; a restarted process comes up after that.
    let deadline = Instant::now() + SETTLE;
    while emulator.state().await["in_flight"] != 0 {
        assert!(
            Instant::now() < deadline,
            "the emulator never finished the aborted requests"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let second = start(&cfg, &rig.metering);
    settled(&emulator, &rig.metering, &rig.expected).await;
    assert_clean(&emulator, &rig.expected).await;
    second.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_letters_and_requeue() {
    let emulator = StripeEmulator::start();
    emulator
        .faults(serde_json::json!({"reject_customers": ["cus_Bob"]}))
        .await;
    let mut rig = Rig::new().await;
    let running = start(&config(&emulator), &rig.metering);
    rig.traffic(Duration::from_millis(1_000)).await;
    rig.sealed().await;
    let ada: Totals = rig
        .expected
        .iter()
        .filter(|((c, _), _)| c == "cus_Ada")
        .map(|(k, v)| (k.clone(), *v))
        .collect();
    let bob_rows: Vec<String> = rig
        .metering
        .outbox_rows()
        .await
        .into_iter()
        .filter(|i| i.row.stripe_customer == "cus_Bob")
        .map(|i| i.row.id)
        .collect();
    let deadline = Instant::now() + SETTLE;
    let letters = loop {
        let letters = running.billing.dead_letters().expect("dead letters");
        // Ada's rows are confirmed in the outbox a moment after the emulator counts them.
        let pending = rig.metering.outbox_pending().await.len();
        if letters.len() == bob_rows.len()
            && emulator.totals().await == ada
            && pending == bob_rows.len()
        {
            break letters;
        }
        assert!(
            Instant::now() < deadline,
            "{} dead letters, {} Bob rows, {pending} rows pending",
            letters.len(),
            bob_rows.len()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    for letter in &letters {
        assert_eq!(letter.kind, DeadLetterKind::Rejected);
        assert_eq!(letter.status, Some(400));
        assert!(
            letter.reason.contains("No such customer"),
            "{}",
            letter.reason
        );
        assert!(bob_rows.contains(&letter.id));
    }
    // Dead letters stay pending in the outbox: nothing is lost.
    assert_eq!(rig.metering.outbox_pending().await.len(), bob_rows.len());
    assert_eq!(
        running.metric("tollgate_billing_dead_letters", None),
        bob_rows.len() as f64
    );
    // The operator fixes the customer and re-queues from another process (the CLI path).
    emulator.faults(serde_json::json!({})).await;
    let outcome = tollgate::billing::requeue(
        &rig.metering_dir(),
        &Requeue::Ids(vec![letters[0].id.clone(), "tg-unknown".into()]),
    )
    .expect("requeue one");
    assert_eq!(outcome.requeued, [letters[0].id.clone()]);
    assert_eq!(outcome.unknown, ["tg-unknown"]);
    let outcome =
        tollgate::billing::requeue(&rig.metering_dir(), &Requeue::All).expect("requeue all");
    assert_eq!(outcome.requeued.len(), letters.len() - 1);
    settled(&emulator, &rig.metering, &rig.expected).await;
    assert_clean(&emulator, &rig.expected).await;
    assert!(
        tollgate::billing::dead_letters(&rig.metering_dir())
            .expect("list")
            .is_empty()
    );
    running.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unauthorized_pauses_and_unconfirmed_rows_stop() {
    let emulator = StripeEmulator::start();
    emulator
        .faults(serde_json::json!({"auth_failure": true}))
        .await;
    let mut rig = Rig::new().await;
    let mut cfg = config(&emulator);
    cfg.give_up_after = Duration::from_secs(3);
    let running = start(&cfg, &rig.metering);
    rig.traffic(Duration::from_millis(600)).await;
    rig.sealed().await;
    let deadline = Instant::now() + SETTLE;
    while !running.billing.is_paused() {
        assert!(Instant::now() < deadline, "delivery never paused on 401");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(running.metric("tollgate_billing_paused", None), 1.0);
    assert_eq!(emulator.state().await["accepted"], 0);
    // Stripe accepts the key again but fails every write: the pause lifts only on success, so the probes keep
    // failing until give_up_after, then every row is reported as unconfirmed instead of retried blindly.
    emulator
        .faults(serde_json::json!({"rate_500": 1.0, "commit_on_fault": 0.0}))
        .await;
    let pending = rig.metering.outbox_pending().await.len();
    let deadline = Instant::now() + SETTLE;
    let letters = loop {
        let letters = running.billing.dead_letters().expect("dead letters");
        if letters.len() == pending {
            break letters;
        }
        assert!(
            Instant::now() < deadline,
            "{} of {pending} unconfirmed",
            letters.len()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(
        letters
            .iter()
            .all(|l| l.kind == DeadLetterKind::Unconfirmed),
        "{letters:?}"
    );
    assert_eq!(emulator.state().await["accepted"], 0);
    // Healthy again: re-queued rows restart their clock and are delivered exactly.
    emulator.faults(serde_json::json!({})).await;
    running.billing.requeue(&Requeue::All).expect("requeue");
    settled(&emulator, &rig.metering, &rig.expected).await;
    assert_clean(&emulator, &rig.expected).await;
    assert!(!running.billing.is_paused());
    assert_eq!(running.metric("tollgate_billing_paused", None), 0.0);
    running.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v2_stream_with_sessions_expiring_mid_run() {
    let emulator = StripeEmulator::start();
    let faults = |ttl: f64| {
        serde_json::json!({"session_ttl_s": ttl, "rate_500": 0.1, "rate_429": 0.1, "commit_on_fault": 0.5,
                           "seed": 3})
    };
    // Short sessions: delivery must refresh them before they expire, never running into the expiry.
    emulator.faults(faults(1.0)).await;
    let mut rig = Rig::new().await;
    let mut cfg = config(&emulator);
    cfg.mode = StripeMode::V2Stream;
    let running = start(&cfg, &rig.metering);
    rig.traffic(Duration::from_millis(2_500)).await;
    rig.sealed().await;
    settled(&emulator, &rig.metering, &rig.expected).await;
    let state = emulator.state().await;
    assert!(
        state["sessions_created"].as_u64().is_some_and(|n| n >= 2),
        "{state}"
    );
    // Long sessions from now on; then one is revoked behind the client's back, so the next batch gets
    // 401 billing_meter_event_session_expired and must be sent again on a new session.
    emulator.faults(faults(600.0)).await;
    rig.traffic(Duration::from_millis(700)).await;
    rig.sealed().await;
    settled(&emulator, &rig.metering, &rig.expected).await;
    emulator.expire_sessions().await;
    let before = emulator.state().await["sessions_created"]
        .as_u64()
        .expect("count");
    rig.traffic(Duration::from_millis(700)).await;
    rig.sealed().await;
    settled(&emulator, &rig.metering, &rig.expected).await;
    assert_clean(&emulator, &rig.expected).await;
    let state = emulator.state().await;
    assert!(
        state["session_expired_rejections"]
            .as_u64()
            .is_some_and(|n| n >= 1),
        "{state}"
    );
    assert!(
        state["sessions_created"]
            .as_u64()
            .is_some_and(|n| n > before),
        "{state}"
    );
    assert!(
        state["events"]
            .as_array()
            .expect("events")
            .iter()
            .all(|e| e["via"] == "v2")
    );
    assert_eq!(
        state["requests"]["POST /v1/billing/meter_events"],
        serde_json::Value::Null
    );
    running.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconcile_agrees_then_finds_a_planted_mismatch() {
    let emulator = StripeEmulator::start();
    let mut rig = Rig::new().await;
    let since = chrono::Utc::now() - chrono::Duration::minutes(2);
    let cfg = config(&emulator);
    let running = start(&cfg, &rig.metering);
    rig.traffic(Duration::from_millis(800)).await;
    rig.sealed().await;
    settled(&emulator, &rig.metering, &rig.expected).await;
    running.stop().await;
    let until = chrono::Utc::now() + chrono::Duration::minutes(2);
    let report = tollgate::billing::reconcile(&cfg, &rig.metering_dir(), since, until)
        .await
        .expect("reconcile");
    assert_eq!(report.rows.len(), rig.expected.len(), "{report}");
    assert!(report.mismatches().is_empty(), "{report}");
    for row in &report.rows {
        let key = (row.stripe_customer.clone(), row.event_name.clone());
        assert_eq!(Some(&row.local), rig.expected.get(&key));
    }
    emulator
        .plant(
            "cus_Bob",
            "api_calls",
            5,
            chrono::Utc::now().timestamp() - 30,
        )
        .await;
    let report = tollgate::billing::reconcile(&cfg, &rig.metering_dir(), since, until)
        .await
        .expect("reconcile");
    let bad = report.mismatches();
    assert_eq!(bad.len(), 1, "{report}");
    assert_eq!(
        (bad[0].stripe_customer.as_str(), bad[0].event_name.as_str()),
        ("cus_Bob", "api_calls")
    );
    assert_eq!(bad[0].stripe, (bad[0].local + 5) as f64);
    assert!(report.to_string().contains("MISMATCH"), "{report}");
}
