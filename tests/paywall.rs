//! The paywall's engine against the Stripe emulator and a real SQLite state store, without Envoy: what happens
//! to an event a replica acknowledged and died before applying, to an event when Stripe cannot be read, and
//! to a resync while Stripe answers 429 half the time.

#[path = "support/stripe.rs"]
mod stripe_support;

use std::sync::Arc;
use std::time::Duration;

use serde_json::json;
use stripe_support::{API_KEY, StripeEmulator};
use tokio::sync::{Notify, watch};
use tollgate::billing::StripeConfig;
use tollgate::catalog::CatalogHandle;
use tollgate::paywall::Paywall;
use tollgate::paywall::metrics::PaywallMetrics;
use tollgate::paywall::model::{
    Observation, PaidStatus, PriceItem, StripeEvent, SubscriptionState,
};
use tollgate::source::Source;
use tollgate::state::StateStore;
use tollgate::state::sql::SqlStore;
use tollgate::util::clock::unix_now;

const CATALOG: &str = "
products:
  - {name: pro, stripe_prices: [price_pro], operations: [{api: a, paths: [/]}]}
developers:
  - {email: payer@example.test, stripe_customer: cus_Payer}
";

struct World {
    emulator: StripeEmulator,
    store: Arc<SqlStore>,
    paywall: Paywall,
    _dir: tempfile::TempDir,
}

async fn world() -> World {
    let emulator = StripeEmulator::start();
    emulator.create_price(Some("price_pro"), None).await;
    let dir = tempfile::tempdir().expect("temp dir");
    let store = SqlStore::open(&format!(
        "sqlite://{}",
        dir.path().join("state.db").display()
    ))
    .expect("open");
    store.migrate().await.expect("migrate");
    let store = Arc::new(store);
    let catalog = tollgate::catalog::parse(&Source::from_text("c.yaml", CATALOG.to_owned()))
        .expect("catalog");
    let mut config = StripeConfig::new(emulator.url(), API_KEY);
    config.webhook_secret = Some("whsec_test".into());
    config.initial_backoff = Duration::from_millis(20);
    config.max_backoff = Duration::from_millis(100);
    config.request_timeout = Duration::from_secs(2);
    let paywall = Paywall::new(
        &config,
        store.clone(),
        Arc::new(CatalogHandle::new(catalog)),
        Arc::new(Notify::new()),
        PaywallMetrics::register(&prometheus::Registry::new()).expect("metrics"),
    )
    .expect("paywall");
    World {
        emulator,
        store,
        paywall,
        _dir: dir,
    }
}

/// A subscription that exists in Stripe but whose webhooks never arrived.
async fn silent_subscription(emulator: &StripeEmulator) -> String {
    let answer = emulator
        .subscribe("cus_Payer", "price_pro", json!({"deliver": "drop"}))
        .await;
    answer["subscription"]["id"]
        .as_str()
        .expect("subscription id")
        .to_owned()
}

/// An event created at `created_ms` (Unix milliseconds, as observations count time).
fn event(id: &str, subscription: &str, status: PaidStatus, created_ms: i64) -> StripeEvent {
    StripeEvent {
        id: id.into(),
        kind: "customer.subscription.updated".into(),
        created: created_ms / 1000,
        customer: "cus_Payer".into(),
        observation: Observation::State {
            state: SubscriptionState {
                id: subscription.into(),
                customer: "cus_Payer".into(),
                status,
                items: vec![PriceItem {
                    price: "price_pro".into(),
                    lookup_key: None,
                }],
                period_start: Some(created_ms / 1000),
            },
            as_of: created_ms,
        },
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_left_pending_by_a_crash_is_applied_at_start_from_stripes_current_state() {
    let w = world().await;
    let sub = silent_subscription(&w.emulator).await;
    // The replica that received it recorded it, answered 200 and died before applying it.
    let stale = event(
        "evt_pending",
        &sub,
        PaidStatus::Incomplete,
        (unix_now() - 60) * 1000,
    );
    assert!(w.store.record_event(&stale, unix_now() - 60).await.unwrap());

    let (stop, shutdown) = watch::channel(false);
    let applier = tokio::spawn(w.paywall.clone().run_applier(shutdown));
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let now = w.store.paid_subscriptions("cus_Payer").await.unwrap();
        if let Some(s) = now.first() {
            assert_eq!(
                s.state.status,
                PaidStatus::Active,
                "Stripe's state, not the payload's"
            );
            assert_eq!(s.source, "fetch");
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the pending event was not applied"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        w.store
            .claim_events(unix_now() + 120, unix_now() + 1, 10)
            .await
            .unwrap()
            .is_empty()
    );
    let _ = stop.send(true);
    applier.await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn when_stripe_cannot_be_read_the_payload_stands_but_never_over_a_newer_state() {
    let w = world().await;
    let sub = silent_subscription(&w.emulator).await;
    w.emulator.faults(json!({"rate_500": 1.0})).await;
    let now = unix_now();
    let canceled = event("evt_cancel", &sub, PaidStatus::Canceled, (now - 10) * 1000);
    w.store.record_event(&canceled, now).await.unwrap();
    w.paywall.apply(canceled).await;
    let stored = w.store.paid_subscriptions("cus_Payer").await.unwrap();
    assert_eq!(stored[0].state.status, PaidStatus::Canceled);
    assert_eq!(stored[0].source, "evt_cancel");
    // An older event delivered late, with Stripe still down, changes nothing.
    let older = event("evt_older", &sub, PaidStatus::Active, (now - 20) * 1000);
    w.store.record_event(&older, now).await.unwrap();
    w.paywall.apply(older).await;
    let stored = w.store.paid_subscriptions("cus_Payer").await.unwrap();
    assert_eq!(stored[0].state.status, PaidStatus::Canceled);
    assert!(
        w.store
            .claim_events(now + 120, now + 1, 10)
            .await
            .unwrap()
            .is_empty(),
        "both are applied"
    );
    let state = w.emulator.state().await;
    assert_eq!(
        state["requests"][format!("GET /v1/subscriptions/{sub}")],
        json!(6),
        "three reads per event, then the payload"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resync_heals_a_missed_webhook_through_rate_limits() {
    let w = world().await;
    let sub = silent_subscription(&w.emulator).await;
    w.emulator
        .faults(json!({"seed": 11, "rate_429": 0.5, "retry_after_s": 0}))
        .await;
    let report = w.paywall.resync().await.expect("resync");
    assert_eq!(
        (report.customers, report.subscriptions, report.changed),
        (1, 1, 1)
    );
    let stored = w.store.paid_subscriptions("cus_Payer").await.unwrap();
    assert_eq!(stored[0].state.id, sub);
    assert_eq!(stored[0].state.status, PaidStatus::Active);
    assert_eq!(stored[0].source, "resync");
    let state = w.emulator.state().await;
    assert!(
        state["faults_injected"]["429"]
            .as_u64()
            .is_some_and(|n| n >= 1),
        "the seed makes at least one 429: {}",
        state["faults_injected"]
    );
    assert_eq!(state["schema_errors"], json!([]));
}
