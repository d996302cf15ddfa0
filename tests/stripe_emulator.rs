//! The Stripe emulator's subscriptions and webhooks, driven from Rust as tollgate's own tests will drive them:
//! a local receiver on 127.0.0.1 checks every `Stripe-Signature` with `ring::hmac` (400 when it does not
//! verify, as a webhook endpoint must), calls back `GET /v1/subscriptions/{id}` while answering (the emulator
//! holds no lock while delivering), and the test walks a subscription through its lifecycle: prices, subscribe,
//! plan change, failed renewal, payment, cancel; listing, pagination and the default status filter; hold and
//! flush in reverse, drop, duplicates, delayed delivery, tampered resends; faults on the subscription
//! endpoints; paid one-off invoices (credit top-ups) and their invoice.paid events. Every object the emulator answered or emitted was checked against Stripe's schemas
//! (`response_schema_errors` stays empty).

#[path = "support/stripe.rs"]
mod stripe_support;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::routing::post;
use ring::hmac;
use serde_json::{Value, json};

use stripe_support::{API_KEY, StripeEmulator};

/// The signing secret the receiver knows, and an older one the emulator also signs with (a rotation).
const SECRET: &str = "whsec_test_tollgate_primary";
const OLD_SECRET: &str = "whsec_test_tollgate_previous";

/// Stripe's libraries refuse a signature whose timestamp is further than this from now.
const TOLERANCE_S: i64 = 300;

/// How long a delayed delivery may take to arrive before the test fails.
const ARRIVAL: Duration = Duration::from_secs(15);

fn now_s() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970")
        .as_secs() as i64
}

/// Checks a `Stripe-Signature` header as Stripe's libraries do: `t` within the tolerance and one `v1` equal
/// to HMAC-SHA256(secret, "<t>." + body). Returns how many `v1` the header held.
fn verify(header: &str, body: &[u8], secret: &str, now: i64) -> Result<usize, String> {
    let mut t = None;
    let mut v1 = Vec::new();
    for part in header.split(',') {
        match part.split_once('=') {
            Some(("t", v)) => t = Some(v.parse::<i64>().map_err(|e| format!("bad t: {e}"))?),
            Some(("v1", v)) => v1.push(v.to_owned()),
            Some(_) => {}
            None => return Err(format!("malformed part {part:?}")),
        }
    }
    let t = t.ok_or("no t")?;
    if (now - t).abs() > TOLERANCE_S {
        return Err(format!("timestamp {t} is {}s from now", now - t));
    }
    let key = hmac::Key::new(hmac::HMAC_SHA256, secret.as_bytes());
    let mut signed = format!("{t}.").into_bytes();
    signed.extend_from_slice(body);
    let matches = v1.iter().any(|sig| {
        hex::decode(sig)
            .map(|sig| hmac::verify(&key, &signed, &sig).is_ok())
            .unwrap_or(false)
    });
    if matches {
        Ok(v1.len())
    } else {
        Err(format!("none of {} v1 signatures matches", v1.len()))
    }
}

/// One request the receiver got.
#[derive(Clone, Debug)]
struct Received {
    /// The event, when its signature verified.
    event: Option<Value>,
    /// Why it did not verify.
    refused: Option<String>,
    v1_count: usize,
    content_type: String,
    user_agent: String,
    /// The status of `GET /v1/subscriptions/{id}` made back to the emulator before answering.
    callback: Option<u16>,
    /// The subscription's status as that call saw it.
    callback_status: Option<String>,
}

impl Received {
    fn id(&self) -> &str {
        self.event
            .as_ref()
            .and_then(|e| e["id"].as_str())
            .unwrap_or("")
    }
    fn kind(&self) -> &str {
        self.event
            .as_ref()
            .and_then(|e| e["type"].as_str())
            .unwrap_or("")
    }
}

struct Receiver {
    emulator: String,
    client: reqwest::Client,
    got: Mutex<Vec<Received>>,
}

async fn hook(State(rx): State<Arc<Receiver>>, headers: HeaderMap, body: Bytes) -> StatusCode {
    let header = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_owned()
    };
    let mut got = Received {
        event: None,
        refused: None,
        v1_count: 0,
        content_type: header("content-type"),
        user_agent: header("user-agent"),
        callback: None,
        callback_status: None,
    };
    let answer = match verify(&header("stripe-signature"), &body, SECRET, now_s()) {
        Ok(n) => {
            got.v1_count = n;
            let event: Value = serde_json::from_slice(&body).expect("a verified body is JSON");
            let object = &event["data"]["object"];
            if object["object"] == "subscription" {
                let id = object["id"].as_str().expect("subscription id");
                let resp = rx
                    .client
                    .get(format!("{}/v1/subscriptions/{id}", rx.emulator))
                    .bearer_auth(API_KEY)
                    .send()
                    .await
                    .expect("call back the emulator");
                got.callback = Some(resp.status().as_u16());
                let sub: Value = resp.json().await.expect("subscription JSON");
                got.callback_status = sub["status"].as_str().map(str::to_owned);
            }
            got.event = Some(event);
            StatusCode::OK
        }
        Err(reason) => {
            got.refused = Some(reason);
            StatusCode::BAD_REQUEST
        }
    };
    rx.got.lock().expect("receiver lock").push(got);
    answer
}

/// The emulator, a receiver its webhooks go to, and a client for the public endpoints.
struct Rig {
    emulator: StripeEmulator,
    rx: Arc<Receiver>,
    url: String,
    client: reqwest::Client,
}

impl Rig {
    async fn new() -> Rig {
        let emulator = StripeEmulator::start();
        let client = reqwest::Client::builder()
            .no_proxy()
            .timeout(Duration::from_secs(20))
            .build()
            .expect("reqwest client");
        let rx = Arc::new(Receiver {
            emulator: emulator.url(),
            client: client.clone(),
            got: Mutex::new(Vec::new()),
        });
        let app = Router::new()
            .route("/stripe/webhook", post(hook))
            .with_state(rx.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the receiver");
        let url = format!(
            "http://{}/stripe/webhook",
            listener.local_addr().expect("receiver address")
        );
        tokio::spawn(async move { axum::serve(listener, app).await.expect("receiver") });
        let rig = Rig {
            emulator,
            rx,
            url,
            client,
        };
        rig.emulator
            .webhooks(json!({"url": rig.url, "secret": SECRET, "extra_secrets": [OLD_SECRET]}))
            .await;
        rig
    }

    fn got(&self) -> Vec<Received> {
        self.rx.got.lock().expect("receiver lock").clone()
    }

    /// Waits (bounded) until the receiver holds `n` requests.
    async fn wait_for(&self, n: usize) -> Vec<Received> {
        let deadline = Instant::now() + ARRIVAL;
        loop {
            let got = self.got();
            if got.len() >= n {
                return got;
            }
            assert!(
                Instant::now() < deadline,
                "the receiver got {} of {n} requests within {ARRIVAL:?}: {got:?}",
                got.len()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// `GET <emulator><path_and_query>` with the API key: (status, JSON body).
    async fn get(&self, path_and_query: &str) -> (u16, Value) {
        let resp = self
            .client
            .get(format!("{}{path_and_query}", self.emulator.url()))
            .bearer_auth(API_KEY)
            .send()
            .await
            .unwrap_or_else(|e| panic!("GET {path_and_query}: {e}"));
        let status = resp.status().as_u16();
        (status, resp.json().await.expect("JSON answer"))
    }

    /// Nothing the emulator validated failed: every request it got and everything it answered or emitted
    /// matches Stripe's schemas.
    async fn assert_schema_clean(&self) {
        let state = self.emulator.state().await;
        assert_eq!(state["schema_errors"], json!([]), "request schema errors");
        assert_eq!(
            state["response_schema_errors"],
            json!([]),
            "objects that do not match Stripe's schemas"
        );
    }
}

fn ids(answer: &Value) -> Vec<String> {
    answer["events"]
        .as_array()
        .expect("events")
        .iter()
        .map(|e| e.as_str().expect("event id").to_owned())
        .collect()
}

/// Every delivery in a control answer reached the receiver and was answered 200.
fn all_delivered(answer: &Value) {
    let deliveries = answer["deliveries"].as_array().expect("deliveries");
    assert!(!deliveries.is_empty(), "no deliveries in {answer}");
    for d in deliveries {
        assert_eq!(d["status"], 200, "delivery {d} in {answer}");
    }
}

fn sub_id(answer: &Value) -> String {
    answer["subscription"]["id"]
        .as_str()
        .expect("subscription id")
        .to_owned()
}

fn item_price(sub: &Value) -> &str {
    sub["items"]["data"][0]["price"]["id"]
        .as_str()
        .expect("item price id")
}

fn list_ids(list: &Value) -> Vec<&str> {
    list["data"]
        .as_array()
        .expect("list data")
        .iter()
        .map(|s| s["id"].as_str().expect("id"))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lifecycle_events_are_signed_and_the_api_lists_them() {
    let rig = Rig::new().await;
    let e = &rig.emulator;

    let basic = e.create_price(Some("price_basic"), None).await;
    assert_eq!(basic, "price_basic");
    let pro = e.create_price(None, Some("pro_monthly")).await;
    assert!(pro.starts_with("price_"), "{pro}");

    let created = e.subscribe("cus_Ada", &basic, json!({})).await;
    all_delivered(&created);
    let sub = sub_id(&created);
    assert!(sub.starts_with("sub_"), "{sub}");
    let s = &created["subscription"];
    assert_eq!(s["status"], "active");
    assert_eq!(s["customer"], "cus_Ada");
    let item = &s["items"]["data"][0];
    assert_eq!(item_price(s), basic);
    let start = item["current_period_start"].as_i64().expect("period start");
    assert_eq!(
        item["current_period_end"].as_i64(),
        Some(start + 30 * 86400)
    );
    assert!((now_s() - start).abs() < 60, "the period starts now");

    let changed = e.change_price(&sub, "lookup_key:pro_monthly").await;
    all_delivered(&changed);
    assert_eq!(item_price(&changed["subscription"]), pro);

    let failed = e.fail_payment(&sub).await;
    all_delivered(&failed);
    assert_eq!(failed["subscription"]["status"], "past_due");
    assert!(
        failed["subscription"]["items"]["data"][0]["current_period_start"]
            .as_i64()
            .expect("rolled start")
            >= start
    );

    let (status, listed) = rig
        .get("/v1/subscriptions?customer=cus_Ada&status=all")
        .await;
    assert_eq!(status, 200, "{listed}");
    assert_eq!(listed["object"], "list");
    assert_eq!(listed["url"], "/v1/subscriptions");
    assert_eq!(list_ids(&listed), vec![sub.as_str()]);
    assert_eq!(listed["data"][0]["status"], "past_due");
    assert_eq!(item_price(&listed["data"][0]), pro);

    let paid = e.pay(&sub).await;
    all_delivered(&paid);
    assert_eq!(paid["subscription"]["status"], "active");

    // A second, newer subscription of the same customer: pages of one, newest first.
    let second = e.subscribe("cus_Ada", &basic, json!({})).await;
    all_delivered(&second);
    let sub2 = sub_id(&second);
    let (_, page1) = rig
        .get("/v1/subscriptions?customer=cus_Ada&status=all&limit=1")
        .await;
    assert_eq!(list_ids(&page1), vec![sub2.as_str()], "newest first");
    assert_eq!(page1["has_more"], true);
    let (_, page2) = rig
        .get(&format!(
            "/v1/subscriptions?customer=cus_Ada&status=all&limit=1&starting_after={sub2}"
        ))
        .await;
    assert_eq!(list_ids(&page2), vec![sub.as_str()]);
    assert_eq!(page2["has_more"], false);
    let (_, before) = rig
        .get(&format!(
            "/v1/subscriptions?customer=cus_Ada&status=all&limit=1&ending_before={sub}"
        ))
        .await;
    assert_eq!(list_ids(&before), vec![sub2.as_str()]);

    let canceled = e.cancel(&sub).await;
    all_delivered(&canceled);
    let c = &canceled["subscription"];
    assert_eq!(c["status"], "canceled");
    assert!(c["canceled_at"].is_i64() && c["ended_at"].is_i64(), "{c}");

    let (_, default) = rig.get("/v1/subscriptions?customer=cus_Ada").await;
    assert_eq!(
        list_ids(&default),
        vec![sub2.as_str()],
        "no status: canceled is hidden"
    );
    let (_, all) = rig
        .get("/v1/subscriptions?customer=cus_Ada&status=all")
        .await;
    assert_eq!(list_ids(&all), vec![sub2.as_str(), sub.as_str()]);
    let (_, only_canceled) = rig
        .get("/v1/subscriptions?customer=cus_Ada&status=canceled")
        .await;
    assert_eq!(list_ids(&only_canceled), vec![sub.as_str()]);
    let (_, other) = rig
        .get("/v1/subscriptions?customer=cus_Bob&status=all")
        .await;
    assert_eq!(list_ids(&other), Vec::<&str>::new());
    let (_, by_price) = rig
        .get(&format!("/v1/subscriptions?status=all&price={pro}"))
        .await;
    assert_eq!(list_ids(&by_price), vec![sub.as_str()]);

    let (status, one) = rig.get(&format!("/v1/subscriptions/{sub}")).await;
    assert_eq!(status, 200, "{one}");
    assert_eq!(one["id"], sub.as_str());
    assert_eq!(one["status"], "canceled");
    let (status, expanded) = rig
        .get(&format!("/v1/subscriptions/{sub}?expand[]=latest_invoice"))
        .await;
    assert_eq!(status, 200, "{expanded}");
    assert_eq!(expanded["latest_invoice"]["status"], "paid");
    assert_eq!(
        expanded["latest_invoice"]["parent"]["subscription_details"]["subscription"],
        sub.as_str()
    );
    let (status, missing) = rig.get("/v1/subscriptions/sub_x").await;
    assert_eq!(status, 404);
    assert_eq!(
        missing,
        json!({"error": {"type": "invalid_request_error", "code": "resource_missing",
                         "message": "No such subscription: 'sub_x'", "param": "id"}})
    );
    let (status, _) = rig.get("/v1/subscriptions?limit=0").await;
    assert_eq!(status, 400, "limit 0");

    // What the receiver got: every delivery verified (two v1: the rotation), in emission order, and each
    // subscription event's call back to the emulator answered while the delivery was in flight.
    let got = rig.got();
    let kinds: Vec<&str> = got.iter().map(Received::kind).collect();
    assert_eq!(
        kinds,
        vec![
            "customer.subscription.created",
            "invoice.paid",
            "customer.subscription.updated",
            "invoice.payment_failed",
            "customer.subscription.updated",
            "invoice.paid",
            "customer.subscription.updated",
            "customer.subscription.created",
            "invoice.paid",
            "customer.subscription.deleted",
        ]
    );
    let emitted: Vec<String> = [&created, &changed, &failed, &paid, &second, &canceled]
        .iter()
        .flat_map(|a| ids(a))
        .collect();
    assert_eq!(
        got.iter().map(|r| r.id().to_owned()).collect::<Vec<_>>(),
        emitted
    );
    for r in &got {
        assert!(r.refused.is_none(), "refused: {r:?}");
        assert_eq!(r.v1_count, 2, "one v1 per secret: {r:?}");
        assert_eq!(r.content_type, "application/json; charset=utf-8");
        assert_eq!(
            r.user_agent,
            "Stripe/1.0 (+https://stripe.com/docs/webhooks)"
        );
        let event = r.event.as_ref().expect("verified");
        assert_eq!(event["object"], "event");
        assert_eq!(event["api_version"], "2026-09-30.endive");
        assert_eq!(event["livemode"], false);
        if event["data"]["object"]["object"] == "subscription" {
            assert_eq!(r.callback, Some(200), "{r:?}");
        }
        if event["data"]["object"]["object"] == "invoice" {
            let invoice = &event["data"]["object"];
            assert_eq!(invoice["parent"]["type"], "subscription_details");
            assert!(
                invoice["parent"]["subscription_details"]["subscription"]
                    .as_str()
                    .is_some_and(|s| s.starts_with("sub_"))
            );
        }
    }
    let plan_change = got[2].event.as_ref().expect("plan change");
    assert_eq!(
        plan_change["data"]["previous_attributes"]["items"]["data"][0]["price"]["id"],
        basic.as_str()
    );
    assert_eq!(
        item_price(&plan_change["data"]["object"]),
        pro,
        "the new price"
    );
    let failure = got[3].event.as_ref().expect("payment failure");
    assert_eq!(failure["data"]["object"]["status"], "open");
    assert_eq!(failure["data"]["object"]["attempted"], true);
    let renewal = got[4].event.as_ref().expect("renewal update");
    assert_eq!(
        renewal["data"]["previous_attributes"]["status"], "active",
        "{renewal}"
    );
    assert_eq!(got[4].callback_status.as_deref(), Some("past_due"));

    let state = e.state().await;
    assert_eq!(state["subscriptions"][&sub]["status"], "canceled");
    assert_eq!(
        state["webhook_events"].as_array().expect("events").len(),
        emitted.len()
    );
    assert_eq!(
        state["webhook_deliveries"]
            .as_array()
            .expect("deliveries")
            .len(),
        emitted.len()
    );
    rig.assert_schema_clean().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delivery_modes_hold_drop_duplicates_delay_and_tampering() {
    let rig = Rig::new().await;
    let e = &rig.emulator;
    let price = e.create_price(None, None).await;
    let created = e
        .subscribe("cus_Hold", &price, json!({"deliver": "hold"}))
        .await;
    let sub = sub_id(&created);
    for d in created["deliveries"].as_array().expect("deliveries") {
        assert_eq!(d["status"], Value::Null);
        assert_eq!(d["deliver"], "hold");
    }
    e.webhooks(json!({"url": rig.url, "secret": SECRET, "deliver": "hold"}))
        .await;
    let paused = e.pause(&sub).await;
    let resumed = e.resume(&sub).await;
    assert!(rig.got().is_empty(), "held events are not sent");
    assert_eq!(
        e.state().await["webhook_held"].as_array().map(Vec::len),
        Some(4)
    );

    let flushed = e.flush("reverse", 0).await;
    let mut held: Vec<String> = [&created, &paused, &resumed]
        .iter()
        .flat_map(|a| ids(a))
        .collect();
    held.reverse();
    let got = rig.wait_for(4).await;
    assert_eq!(
        got.iter().map(|r| r.id().to_owned()).collect::<Vec<_>>(),
        held,
        "newest first"
    );
    assert_eq!(
        got.iter().map(Received::kind).collect::<Vec<_>>(),
        vec![
            "customer.subscription.resumed",
            "customer.subscription.paused",
            "invoice.paid",
            "customer.subscription.created",
        ]
    );
    for d in flushed["deliveries"].as_array().expect("deliveries") {
        assert_eq!(d["status"], 200, "{flushed}");
    }
    assert!(
        got.iter().all(|r| r.v1_count == 1),
        "one secret now: one v1"
    );
    assert_eq!(e.flush("created", 0).await["deliveries"], json!([]));

    // Drop: the change happens and the event exists, but nothing is sent (a missed webhook).
    let dropped = e
        .subscription_action(
            &sub,
            "status",
            json!({"status": "unpaid", "deliver": "drop"}),
        )
        .await;
    assert_eq!(dropped["subscription"]["status"], "unpaid");
    let dropped_event = ids(&dropped).remove(0);
    let state = e.state().await;
    assert_eq!(state["webhook_dropped"], json!([dropped_event]));
    assert!(
        state["webhook_events"]
            .as_array()
            .expect("events")
            .iter()
            .any(|ev| ev["id"] == dropped_event.as_str())
    );
    let (_, seen) = rig.get(&format!("/v1/subscriptions/{sub}")).await;
    assert_eq!(seen["status"], "unpaid");
    assert_eq!(rig.got().len(), 4, "dropped: not sent");

    // Resends: tampered ones are refused by the receiver's verification, a plain one is accepted.
    assert_eq!(e.resend(&dropped_event, Some("signature")).await, 400);
    assert_eq!(e.resend(&dropped_event, Some("stale")).await, 400);
    assert_eq!(e.resend(&dropped_event, Some("body")).await, 400);
    assert_eq!(e.resend(&dropped_event, None).await, 200);
    let got = rig.wait_for(8).await;
    assert!(got[4..7].iter().all(|r| r.refused.is_some()), "{got:?}");
    assert!(
        got[5]
            .refused
            .as_deref()
            .is_some_and(|r| r.contains("from now")),
        "stale: {:?}",
        got[5]
    );
    assert_eq!(got[7].id(), dropped_event);

    // Duplicates: each event arrives twice.
    e.webhooks(json!({"url": rig.url, "secret": SECRET, "duplicates": 1}))
        .await;
    let dup = e.set_status(&sub, "active").await;
    let dup_event = ids(&dup).remove(0);
    assert_eq!(dup["deliveries"].as_array().map(Vec::len), Some(2));
    all_delivered(&dup);
    let got = rig.wait_for(10).await;
    assert_eq!(got[8].id(), dup_event);
    assert_eq!(got[9].id(), dup_event);
    let dup_payload = got[8].event.as_ref().expect("event");
    assert_eq!(
        dup_payload["data"]["previous_attributes"],
        json!({"status": "unpaid"})
    );

    // Delay: the control call answers at once, the delivery follows from a background thread.
    e.webhooks(json!({"url": rig.url, "secret": SECRET, "delay_ms": 300}))
        .await;
    let delayed = e.cancel(&sub).await;
    assert_eq!(delayed["deliveries"][0]["deliver"], "delayed");
    assert_eq!(delayed["deliveries"][0]["status"], Value::Null);
    let got = rig.wait_for(11).await;
    assert_eq!(got[10].kind(), "customer.subscription.deleted");
    assert_eq!(got[10].callback_status.as_deref(), Some("canceled"));

    // The emulator records a delivery once its POST has been answered, a moment after the receiver got it.
    let deadline = Instant::now() + ARRIVAL;
    let state = loop {
        let state = e.state().await;
        let recorded = state["webhook_deliveries"]
            .as_array()
            .expect("deliveries")
            .iter()
            .any(|d| d["via"] == "delayed");
        if recorded || Instant::now() >= deadline {
            break state;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let vias: Vec<&str> = state["webhook_deliveries"]
        .as_array()
        .expect("deliveries")
        .iter()
        .map(|d| d["via"].as_str().expect("via"))
        .collect();
    assert_eq!(vias.iter().filter(|v| **v == "flush").count(), 4);
    assert_eq!(vias.iter().filter(|v| **v == "resend").count(), 4);
    assert_eq!(vias.iter().filter(|v| **v == "delayed").count(), 1);
    rig.assert_schema_clean().await;

    e.control("/_emulator/reset", json!({})).await;
    let state = e.state().await;
    assert_eq!(state["subscriptions"], json!({}));
    assert_eq!(state["webhook_events"], json!([]));
    assert_eq!(state["webhook"]["url"], Value::Null);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscription_endpoints_answer_faults_and_validate_queries() {
    let rig = Rig::new().await;
    let e = &rig.emulator;
    let price = e.create_price(None, None).await;
    let sub = sub_id(&e.subscribe("cus_Flaky", &price, json!({})).await);

    e.faults(json!({"rate_429": 1.0, "retry_after_s": 2})).await;
    let resp = rig
        .client
        .get(format!("{}/v1/subscriptions/{sub}", e.url()))
        .bearer_auth(API_KEY)
        .send()
        .await
        .expect("GET under 429");
    assert_eq!(resp.status().as_u16(), 429);
    assert_eq!(
        resp.headers()
            .get("stripe-should-retry")
            .and_then(|v| v.to_str().ok()),
        Some("true")
    );
    assert_eq!(
        resp.headers()
            .get("retry-after")
            .and_then(|v| v.to_str().ok()),
        Some("2")
    );
    e.faults(json!({"rate_500": 1.0})).await;
    let (status, body) = rig.get("/v1/subscriptions?customer=cus_Flaky").await;
    assert_eq!(status, 500, "{body}");
    assert_eq!(body["error"]["type"], "api_error");
    e.faults(json!({})).await;
    let (status, _) = rig.get("/v1/subscriptions?customer=cus_Flaky").await;
    assert_eq!(status, 200);

    let unauthenticated = rig
        .client
        .get(format!("{}/v1/subscriptions", e.url()))
        .send()
        .await
        .expect("GET without a key");
    assert_eq!(unauthenticated.status().as_u16(), 401);

    let state = e.state().await;
    assert_eq!(state["faults_injected"]["429"], 1);
    assert_eq!(state["faults_injected"]["500"], 1);
    assert_eq!(state["requests"]["GET /v1/subscriptions"], 3);
    rig.assert_schema_clean().await;

    // A query Stripe would refuse is refused and recorded as a request schema error.
    let (status, body) = rig.get("/v1/subscriptions?status=bogus").await;
    assert_eq!(status, 400, "{body}");
    assert_eq!(body["error"]["param"], "status");
    let (status, body) = rig.get("/v1/subscriptions?colour=red").await;
    assert_eq!(status, 400, "{body}");
    let errors = e.state().await["schema_errors"].clone();
    assert_eq!(errors.as_array().map(Vec::len), Some(2), "{errors}");
}

/// (price id, quantity, amount) of each line of an invoice.
fn invoice_lines(invoice: &Value) -> Vec<(&str, u64, u64)> {
    invoice["lines"]["data"]
        .as_array()
        .expect("invoice lines")
        .iter()
        .map(|l| {
            (
                l["pricing"]["price_details"]["price"]
                    .as_str()
                    .expect("line price"),
                l["quantity"].as_u64().expect("line quantity"),
                l["amount"].as_u64().expect("line amount"),
            )
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn paid_invoices_emit_invoice_paid_for_credit_top_ups() {
    let rig = Rig::new().await;
    let e = &rig.emulator;
    let small = e
        .price(json!({"id": "price_credits_small", "unit_amount": 500, "nickname": "500 credits"}))
        .await;
    assert_eq!(small["id"], "price_credits_small");
    let large = e.create_price(None, Some("credits_large")).await;

    // A one-off invoice with two lines, delivered now: one signed invoice.paid.
    let (invoice, event) = e
        .paid_invoice("cus_TopUp", &[("price_credits_small", 3), (&large, 2)])
        .await;
    assert!(invoice.starts_with("in_"), "{invoice}");
    assert!(event.starts_with("evt_"), "{event}");
    let got = rig.wait_for(1).await;
    let r = &got[0];
    assert!(r.refused.is_none(), "refused: {r:?}");
    assert_eq!(r.v1_count, 2, "one v1 per secret: {r:?}");
    assert_eq!(r.id(), event);
    assert_eq!(r.kind(), "invoice.paid");
    let body = r.event.as_ref().expect("verified");
    let paid = &body["data"]["object"];
    assert_eq!(paid["object"], "invoice");
    assert_eq!(paid["id"], invoice.as_str());
    assert_eq!(paid["customer"], "cus_TopUp");
    assert_eq!(paid["status"], "paid");
    assert_eq!(
        paid["parent"],
        Value::Null,
        "a one-off invoice has no parent"
    );
    assert_eq!(paid["amount_paid"], 3 * 500 + 2 * 1000);
    assert_eq!(paid["amount_remaining"], 0);
    assert_eq!(
        invoice_lines(paid),
        vec![("price_credits_small", 3, 1500), (large.as_str(), 2, 2000)]
    );
    let line_ids: Vec<&str> = paid["lines"]["data"]
        .as_array()
        .expect("lines")
        .iter()
        .map(|l| l["id"].as_str().expect("line id"))
        .collect();
    assert!(
        line_ids.iter().all(|id| id.starts_with("il_")),
        "{line_ids:?}"
    );
    assert_ne!(line_ids[0], line_ids[1], "each line has its own id");

    // A resend delivers the same event (the same bytes) again.
    assert_eq!(e.resend(&event, None).await, 200);
    let got = rig.wait_for(2).await;
    assert_eq!(got[1].id(), event);
    assert_eq!(got[1].event, got[0].event);

    // With a subscription (by lookup key, held, then flushed with a duplicate): the invoice names it as the
    // subscription's own invoices do, and the subscription is untouched.
    let created = e.subscribe("cus_TopUp", &large, json!({})).await;
    all_delivered(&created);
    let sub = sub_id(&created);
    let got = rig.wait_for(4).await;
    let held = e
        .invoice(
            "cus_TopUp",
            &[("lookup_key:credits_large", 5)],
            json!({"subscription": sub, "deliver": "hold"}),
        )
        .await;
    let held_event = held["event"].as_str().expect("event id").to_owned();
    assert_eq!(
        held["deliveries"],
        json!([{"event": held_event, "status": null, "deliver": "hold"}])
    );
    assert_eq!(rig.got().len(), got.len(), "held: not sent");
    let flushed = e.flush("created", 1).await;
    let deliveries = flushed["deliveries"].as_array().expect("deliveries");
    assert_eq!(deliveries.len(), 2, "{flushed}");
    assert!(deliveries.iter().all(|d| d["status"] == 200), "{flushed}");
    let got = rig.wait_for(6).await;
    assert_eq!(got[4].id(), held_event);
    assert_eq!(got[5].id(), held_event);
    let with_sub = &got[4].event.as_ref().expect("verified")["data"]["object"];
    assert_eq!(with_sub["id"], held["invoice"]);
    assert_eq!(with_sub["status"], "paid");
    assert_eq!(with_sub["parent"]["type"], "subscription_details");
    assert_eq!(
        with_sub["parent"]["subscription_details"]["subscription"],
        sub.as_str()
    );
    assert_eq!(invoice_lines(with_sub), vec![(large.as_str(), 5, 5000)]);
    assert_eq!(held["lines"], json!([with_sub["lines"]["data"][0]["id"]]));

    let state = e.state().await;
    assert_eq!(state["invoices"][&invoice]["status"], "paid");
    assert_eq!(state["invoices"][&invoice]["customer"], "cus_TopUp");
    let stored_held = held["invoice"].as_str().expect("invoice id");
    assert_eq!(state["invoices"][stored_held]["status"], "paid");
    assert_ne!(
        state["subscriptions"][&sub]["latest_invoice"], held["invoice"],
        "a top-up is not the subscription's latest invoice"
    );
    let events = state["webhook_events"].as_array().expect("events").len();

    // Refused: an unknown price (named), an unknown subscription, no lines; nothing is emitted.
    let (status, answer) = e
        .try_control(
            "/_emulator/invoices",
            json!({"customer": "cus_TopUp", "lines": [{"price": "price_credits_small", "quantity": 1},
                                                      {"price": "price_nope", "quantity": 1}]}),
        )
        .await;
    assert_eq!(status, 400, "{answer}");
    assert_eq!(answer, json!({"error": "No such price: 'price_nope'"}));
    let (status, answer) = e
        .try_control(
            "/_emulator/invoices",
            json!({"customer": "cus_TopUp", "lines": [{"price": large, "quantity": 1}],
                   "subscription": "sub_missing"}),
        )
        .await;
    assert_eq!(status, 404, "{answer}");
    let (status, answer) = e
        .try_control(
            "/_emulator/invoices",
            json!({"customer": "cus_TopUp", "lines": []}),
        )
        .await;
    assert_eq!(status, 400, "{answer}");
    let state = e.state().await;
    assert_eq!(
        state["webhook_events"].as_array().expect("events").len(),
        events
    );
    rig.assert_schema_clean().await;
}
