//! Stripe drives access, end to end: the test's Stripe emulator (validated against Stripe's own schemas)
//! sends signed webhooks through a real Envoy 1.40 to `POST /stripe/webhook`, tollgate reads the
//! subscriptions back from the emulator, and Checks through the same Envoy follow: subscribe → 200, a failed
//! payment → 200 within the grace period → 402 after it, paid → 200, a plan change → the new quota at once,
//! canceled → 403. Bad signatures, stale timestamps and replays change nothing; a dropped webhook is healed
//! by the resync; two replicas sharing PostgreSQL agree within the sync bound.

mod support;

#[path = "support/stripe.rs"]
mod stripe_support;

use std::time::{Duration, Instant};

use serde_json::{Value, json};
use stripe_support::{API_KEY, StripeEmulator};
use support::{
    EchoUpstream, Envoy, PostgresServer, Tollgate, base_config, envoy_config_webhook, http_client,
    key_hash, poll_until,
};

const ADMIN_TOKEN: &str = "test-admin-token-stripe-0123456789";
const SECRET: &str = "whsec_test_tollgate_0123456789abcdef";
const PAYER_KEY: &str = "tg_test_PayerPayerPayerPayerPayerPayerPayer01";
const OTHER_KEY: &str = "tg_test_OtherOtherOtherOtherOtherOtherOther01";
/// The grace period the tests configure: short, but long enough to see a 200 inside it on a busy machine.
const GRACE: Duration = Duration::from_secs(8);
/// How long an acknowledged event may take to be enforced on the replica that received it.
const APPLY_BOUND: Duration = Duration::from_secs(5);
/// The contract's bound for another replica: `sync_interval` (1 s) + 1 s, with room for a busy machine.
const SYNC_BOUND: Duration = Duration::from_secs(4);

fn catalog() -> String {
    format!(
        r#"
products:
  - name: starter
    quota: {{limit: 3, unit: day}}
    stripe_prices: ["lookup_key:starter_monthly"]
    operations: [{{api: weatherapi, paths: [/forecast]}}]
  - name: pro
    quota: {{limit: 100, unit: day}}
    stripe_prices: [price_pro]
    operations: [{{api: weatherapi, paths: [/forecast]}}]
developers:
  - email: payer@example.test
    stripe_customer: cus_Payer
    apps:
      - name: payerapp
        keys: [{{hash: "{}"}}]
  - email: other@example.test
    stripe_customer: cus_Other
    apps:
      - name: otherapp
        keys: [{{hash: "{}"}}]
"#,
        key_hash(PAYER_KEY),
        key_hash(OTHER_KEY)
    )
}

fn config(emulator: &StripeEmulator, resync: &str, state: &str) -> String {
    format!(
        "{}admin_token: {ADMIN_TOKEN}
billing:
  stripe:
    api_base: {}
    api_key: {API_KEY}
    webhook_secret: {SECRET}
    grace_period: {}s
    resync_interval: {resync}
    initial_backoff: 50ms
    max_backoff: 1s
    request_timeout: 2s
    rate_limit: 50
{state}",
        base_config("test"),
        emulator.url(),
        GRACE.as_secs()
    )
}

/// Prices the catalog sells: starter by lookup key, pro by id.
async fn prices(emulator: &StripeEmulator) {
    emulator
        .create_price(Some("price_starter"), Some("starter_monthly"))
        .await;
    emulator.create_price(Some("price_pro"), None).await;
}

struct Answer {
    status: u16,
    limit: Option<String>,
    body: Value,
}

async fn call(client: &reqwest::Client, envoy: &Envoy, key: &str) -> Answer {
    let resp = client
        .get(envoy.url("/forecast"))
        .header("x-api-key", key)
        .send()
        .await
        .expect("request through envoy");
    let status = resp.status().as_u16();
    let limit = resp
        .headers()
        .get("ratelimit-limit")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let text = resp.text().await.unwrap_or_default();
    Answer {
        status,
        limit,
        body: serde_json::from_str(&text).unwrap_or(Value::Null),
    }
}

/// Waits until `n` calls in a row answer `status` (Envoy round-robins them over every replica).
async fn settles(
    what: &str,
    bound: Duration,
    client: &reqwest::Client,
    envoy: &Envoy,
    key: &str,
    status: u16,
) -> Answer {
    poll_until(what, bound, || async {
        let mut last = None;
        for _ in 0..4 {
            let answer = call(client, envoy, key).await;
            if answer.status != status {
                if std::env::var_os("TOLLGATE_TEST_DEBUG").is_some() {
                    eprintln!("{what}: {} {}", answer.status, answer.body);
                }
                return None;
            }
            last = Some(answer);
        }
        last
    })
    .await
}

/// What tollgate believes of `customer` (`GET /v1/subscriptions`).
async fn believed(t: &Tollgate, customer: &str) -> Value {
    let resp = http_client()
        .get(t.admin_url(&format!("/v1/subscriptions?customer={customer}")))
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await
        .expect("GET /v1/subscriptions");
    assert_eq!(resp.status(), 200);
    resp.json().await.expect("JSON")
}

/// Points the emulator's webhooks at Envoy's `/stripe/webhook`, delivered `now` or held (`hold`).
async fn deliver_through(emulator: &StripeEmulator, envoy: &Envoy, deliver: &str) {
    emulator
        .webhooks(
            json!({"url": envoy.url("/stripe/webhook"), "secret": SECRET, "deliver": deliver}),
        )
        .await;
}

fn delivered(answer: &Value) -> Vec<u64> {
    answer["deliveries"]
        .as_array()
        .map(|d| d.iter().filter_map(|d| d["status"].as_u64()).collect())
        .unwrap_or_default()
}

fn sub_id(answer: &Value) -> String {
    answer["subscription"]["id"]
        .as_str()
        .expect("subscription id")
        .to_owned()
}

async fn no_schema_errors(emulator: &StripeEmulator) {
    let state = emulator.state().await;
    assert_eq!(state["schema_errors"], json!([]), "requests tollgate sent");
    assert_eq!(
        state["response_schema_errors"],
        json!([]),
        "what the emulator sent"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscription_state_drives_access_through_envoy() {
    let emulator = StripeEmulator::start();
    prices(&emulator).await;
    let upstream = EchoUpstream::start();
    let t = Tollgate::start(&config(&emulator, "1h", ""), &catalog()).await;
    let envoy = Envoy::start(&envoy_config_webhook(
        &[t.grpc_port],
        &[t.admin_port],
        upstream.port,
    ))
    .await;
    let client = http_client();
    deliver_through(&emulator, &envoy, "now").await;

    // No subscription: 403, and the message names the product.
    let answer = call(&client, &envoy, PAYER_KEY).await;
    assert_eq!(answer.status, 403, "{}", answer.body);
    assert_eq!(answer.body["error"], "forbidden");
    assert_eq!(
        answer.body["message"],
        "no active subscription for product starter"
    );

    // Subscribe (webhook through Envoy) → 200 on the starter plan (3 calls a day).
    let created = emulator
        .subscribe("cus_Payer", "lookup_key:starter_monthly", json!({}))
        .await;
    assert!(
        delivered(&created).iter().all(|s| *s == 200) && !delivered(&created).is_empty(),
        "{created}"
    );
    let sub = sub_id(&created);
    // Denied calls spend no quota: the first call that passes is the first of the plan's three.
    let first = poll_until("the subscription to open access", APPLY_BOUND, || async {
        let answer = call(&client, &envoy, PAYER_KEY).await;
        (answer.status == 200).then_some(answer)
    })
    .await;
    assert_eq!(first.limit.as_deref(), Some("3"));
    for _ in 0..2 {
        assert_eq!(call(&client, &envoy, PAYER_KEY).await.status, 200);
    }
    let exhausted = call(&client, &envoy, PAYER_KEY).await;
    assert_eq!(exhausted.status, 429, "{}", exhausted.body);

    // Upgrade mid-window: the item moves to pro's price, and pro's 100 calls apply at once.
    let upgraded = emulator.change_price(&sub, "price_pro").await;
    assert_eq!(delivered(&upgraded), [200]);
    let pro = settles(
        "the plan change to switch the quota",
        APPLY_BOUND,
        &client,
        &envoy,
        PAYER_KEY,
        200,
    )
    .await;
    assert_eq!(pro.limit.as_deref(), Some("100"));

    // A renewal whose payment fails: past due, still 200 within the grace period, 402 after it.
    let failed_at = Instant::now();
    let failed = emulator.fail_payment(&sub).await;
    assert!(delivered(&failed).iter().all(|s| *s == 200), "{failed}");
    poll_until("tollgate to see past_due", APPLY_BOUND, || async {
        let view = believed(&t, "cus_Payer").await;
        (view["subscriptions"][0]["status"] == "past_due").then_some(())
    })
    .await;
    let view = believed(&t, "cus_Payer").await;
    let pro_view = view["products"]
        .as_array()
        .and_then(|p| p.iter().find(|p| p["product"] == "pro"))
        .cloned()
        .expect("pro in the view");
    assert_eq!(pro_view["access"], "granted", "{view}");
    assert!(
        pro_view["why"]
            .as_str()
            .is_some_and(|w| w.contains("past_due since") && w.contains("access ends")),
        "{view}"
    );
    if failed_at.elapsed() < GRACE - Duration::from_secs(2) {
        assert_eq!(call(&client, &envoy, PAYER_KEY).await.status, 200);
    }
    // Wait on the admin view, not on calls: each call allowed inside the grace period spends quota.
    poll_until("the grace period to end", GRACE + APPLY_BOUND, || async {
        tokio::time::sleep(Duration::from_millis(200)).await;
        let view = believed(&t, "cus_Payer").await;
        let pro = view["products"]
            .as_array()?
            .iter()
            .find(|p| p["product"] == "pro")?
            .clone();
        (pro["access"] == "payment_required").then_some(())
    })
    .await;
    let refused = call(&client, &envoy, PAYER_KEY).await;
    assert_eq!(refused.status, 402, "{}", refused.body);
    assert_eq!(refused.body["error"], "payment_required");
    let message = refused.body["message"].as_str().unwrap_or_default();
    assert!(
        message.starts_with(&format!(
            "subscription {sub} for product pro is past_due since "
        )) && message.contains("access ended"),
        "{message}"
    );

    // invoice.paid → 200 again.
    let paid = emulator.pay(&sub).await;
    assert!(delivered(&paid).iter().all(|s| *s == 200), "{paid}");
    settles(
        "payment to restore access",
        APPLY_BOUND,
        &client,
        &envoy,
        PAYER_KEY,
        200,
    )
    .await;

    // A bad signature, a stale timestamp, a tampered body and a replay change nothing.
    let fail_event = failed["events"][0].as_str().expect("event id").to_owned();
    for tamper in ["signature", "stale", "body"] {
        let status = emulator.resend(&fail_event, Some(tamper)).await;
        assert_eq!(status, 400, "tampered ({tamper}) delivery");
    }
    assert_eq!(
        emulator.resend(&fail_event, None).await,
        200,
        "a replay is acknowledged"
    );
    assert_eq!(
        t.metric(
            "tollgate_stripe_webhooks_total",
            &[("outcome", "bad_signature")]
        )
        .await,
        Some(3.0)
    );
    assert_eq!(
        t.metric(
            "tollgate_stripe_webhooks_total",
            &[("outcome", "duplicate")]
        )
        .await,
        Some(1.0)
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(call(&client, &envoy, PAYER_KEY).await.status, 200);
    assert_eq!(
        believed(&t, "cus_Payer").await["subscriptions"][0]["status"],
        "active"
    );

    // Cancel → 403, saying which subscription ended.
    emulator.cancel(&sub).await;
    let gone = settles(
        "cancellation to end access",
        APPLY_BOUND,
        &client,
        &envoy,
        PAYER_KEY,
        403,
    )
    .await;
    assert_eq!(
        gone.body["message"],
        format!("no active subscription for product pro (subscription {sub} is canceled)")
    );

    // Out of order: three events held, then delivered newest first; the newest state wins.
    deliver_through(&emulator, &envoy, "hold").await;
    let other = sub_id(
        &emulator
            .subscribe("cus_Other", "price_pro", json!({}))
            .await,
    );
    emulator.fail_payment(&other).await;
    emulator.pay(&other).await;
    let flushed = emulator
        .control(
            "/_emulator/webhooks/flush",
            json!({"order": "reverse", "duplicates": 1}),
        )
        .await;
    assert!(delivered(&flushed).iter().all(|s| *s == 200), "{flushed}");
    settles(
        "reversed delivery to end in the newest state",
        APPLY_BOUND,
        &client,
        &envoy,
        OTHER_KEY,
        200,
    )
    .await;
    assert_eq!(
        believed(&t, "cus_Other").await["subscriptions"][0]["status"],
        "active"
    );
    assert!(
        t.metric("tollgate_stripe_webhooks_total", &[("outcome", "applied")])
            .await
            .is_some_and(|n| n >= 10.0)
    );
    no_schema_errors(&emulator).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_on_postgres_agree_and_the_resync_heals_a_missed_webhook() {
    let pg = PostgresServer::start();
    let emulator = StripeEmulator::start();
    prices(&emulator).await;
    let state = format!("state:\n  url: {}\n  sync_interval: 1s\n", pg.url());
    let upstream = EchoUpstream::start();
    let a = Tollgate::start(&config(&emulator, "2s", &state), &catalog()).await;
    let b = Tollgate::start(&config(&emulator, "2s", &state), &catalog()).await;
    let envoy = Envoy::start(&envoy_config_webhook(
        &[a.grpc_port, b.grpc_port],
        &[a.admin_port, b.admin_port],
        upstream.port,
    ))
    .await;
    let client = http_client();
    deliver_through(&emulator, &envoy, "now").await;

    // One replica receives the webhook; Envoy round-robins the Checks over both, which agree in the bound.
    let sub = sub_id(
        &emulator
            .subscribe("cus_Payer", "price_pro", json!({}))
            .await,
    );
    settles(
        "both replicas to grant the subscription",
        APPLY_BOUND + SYNC_BOUND,
        &client,
        &envoy,
        PAYER_KEY,
        200,
    )
    .await;
    emulator.cancel(&sub).await;
    settles(
        "both replicas to refuse after the cancellation",
        APPLY_BOUND + SYNC_BOUND,
        &client,
        &envoy,
        PAYER_KEY,
        403,
    )
    .await;

    // A webhook that never arrives: the resync (every 2 s here, one replica's turn) finds the subscription.
    let dropped = emulator
        .subscribe("cus_Other", "price_pro", json!({"deliver": "drop"}))
        .await;
    assert!(delivered(&dropped).is_empty(), "{dropped}");
    settles(
        "the resync to heal the missed webhook on both replicas",
        Duration::from_secs(4) + SYNC_BOUND + APPLY_BOUND,
        &client,
        &envoy,
        OTHER_KEY,
        200,
    )
    .await;
    let healed = a
        .metric("tollgate_stripe_resync_changes_total", &[])
        .await
        .unwrap_or(0.0)
        + b.metric("tollgate_stripe_resync_changes_total", &[])
            .await
            .unwrap_or(0.0);
    assert!(healed >= 1.0, "a resync healed it: {healed}");
    assert_eq!(
        believed(&b, "cus_Other").await["subscriptions"][0]["learned_from"],
        "resync"
    );
    no_schema_errors(&emulator).await;
}
