//! Partner self-service end to end (CONTRACT §10) through a real Envoy 1.40: `GET /.tollgate/usage` with the
//! caller's own API key or JWT is answered by tollgate through ext_authz with that caller's data only (its
//! app, products, quota counters, month to date, credit balance); the echo upstream never sees a self-service
//! request; no quota is spent; bad credentials get exactly the 401 of any call; metering counts the requests
//! neither as allowed nor as denied.
//!
//! Two partners side by side: alpha (API key, and a JWT naming its app) and bravo (likewise), plus a portal
//! token without an app. Their month to date is seeded into the state store's hourly rollups (as metering
//! adds them once windows are sealed) and their credits granted through the management API, each with a
//! figure no other partner has, so a leak would show.

mod support;

use std::process::Command;

use serde_json::{Value, json};
use support::{CHANGE_TIMEOUT, Stack, http_client, key_hash, poll_until};
use tollgate::history::{Batch, Counts, Dims, HistoryStore, Rollup};
use tollgate::state::sql::SqlStore;

const ALPHA_KEY: &str = "tg_test_AlphaSelfServiceAlphaSelfService0001";
const BRAVO_KEY: &str = "tg_test_BravoSelfServiceBravoSelfService0001";
const BRAVO_REVOKED: &str = "tg_test_BravoSelfServiceRevokedRevoked00001";
const UNKNOWN_KEY: &str = "tg_test_NobodyNobodyNobodyNobodyNobody00001";
const SECRET: &str = "self-service-test-hs256-secret-0123456789abcdef";

/// Month-to-date figures no other partner has (meter `weather_calls`): alpha's, bravo's, the portal
/// account's, and rows that belong to nobody the test asks as.
const ALPHA_CALLS: u64 = 4_242;
const BRAVO_CALLS: u64 = 9_191;
const PORTAL_CALLS: u64 = 3_131;
const STRANGER_CALLS: u64 = 7_777;
const ALPHA_CREDITS: i64 = 1_234;
const BRAVO_CREDITS: i64 = 5_678;

fn config(extra: &str) -> String {
    format!(
        "environment: test
catalog:
  path: catalog.yaml
identity:
  api_key: {{headers: [x-api-key], query_params: [apikey]}}
  jwt:
    providers:
      - name: portal
        issuer: https://portal.example.test
        audiences: [https://api.example.test]
        hs256_secret: {SECRET}
        portal_tokens: true
api_context_extension: tollgate_api
quota:
  store: memory
{extra}"
    )
}

fn catalog() -> String {
    format!(
        r#"
products:
  - name: weather_free
    quota: {{limit: 100, unit: day}}
    meter: {{event_name: weather_calls, value: calls, success: [2xx]}}
    operations:
      - {{api: weatherapi, paths: [/forecast], methods: [GET]}}
      - {{api: weatherapi, name: bulk, paths: [/bulk/**], quota: {{limit: 10, unit: hour}}}}
  - name: prepaid
    prepaid: {{cost: 1}}
    operations: [{{api: weatherapi, paths: [/credits/**]}}]
  - name: everything
    operations: [{{api: weatherapi, paths: [/**]}}]
developers:
  - email: dev@alpha.test
    company: alpha
    stripe_customer: cus_Alpha
    apps:
      - name: alphaapp
        client_id: alpha-client
        products: [{{name: weather_free}}, {{name: prepaid}}]
        keys: [{{hash: "{alpha}"}}]
  - email: dev@bravo.test
    company: bravo
    stripe_customer: cus_Bravo
    apps:
      - name: bravoapp
        client_id: bravo-client
        products: [{{name: weather_free}}, {{name: everything}}]
        keys: [{{hash: "{bravo}"}}, {{hash: "{revoked}", status: revoked}}]
  - email: dev@portal.test
    stripe_customer: cus_Portal
    apps: []
"#,
        alpha = key_hash(ALPHA_KEY),
        bravo = key_hash(BRAVO_KEY),
        revoked = key_hash(BRAVO_REVOKED),
    )
}

/// A JWT from `tollgate token mint` with the test provider's secret.
fn mint(stack: &Stack, args: &[&str]) -> String {
    let output = Command::new(env!("CARGO_BIN_EXE_tollgate"))
        .args(["token", "mint", "--config"])
        .arg(stack.tollgate.dir().join("tollgate.yaml"))
        .args(args)
        .output()
        .expect("run tollgate token mint");
    assert!(
        output.status.success(),
        "token mint failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout)
        .expect("token is UTF-8")
        .trim()
        .to_owned()
}

struct Reply {
    status: u16,
    headers: reqwest::header::HeaderMap,
    body: String,
}

impl Reply {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.body))
    }
}

async fn call(stack: &Stack, method: &str, path: &str, headers: &[(&str, &str)]) -> Reply {
    let method = reqwest::Method::from_bytes(method.as_bytes()).expect("method");
    let mut request = stack.client.request(method, stack.url(path));
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    let response = request.send().await.expect("request through Envoy");
    Reply {
        status: response.status().as_u16(),
        headers: response.headers().clone(),
        body: response.text().await.expect("response body"),
    }
}

/// `GET /.tollgate/usage` with `headers`, asserted to be a 200 JSON answer.
async fn usage(stack: &Stack, headers: &[(&str, &str)]) -> (String, Value) {
    let reply = call(stack, "GET", "/.tollgate/usage", headers).await;
    assert_eq!(reply.status, 200, "{}", reply.body);
    assert!(
        reply
            .header("content-type")
            .is_some_and(|c| c.starts_with("application/json")),
        "{:?}",
        reply.headers
    );
    assert_eq!(reply.header("cache-control"), Some("no-store"));
    let json = reply.json();
    (reply.body, json)
}

fn product<'v>(answer: &'v Value, name: &str) -> &'v Value {
    answer["products"]
        .as_array()
        .expect("products")
        .iter()
        .find(|p| p["name"] == name)
        .unwrap_or_else(|| panic!("no product {name} in {answer}"))
}

/// The `weather_calls` meter's month to date in `answer`.
fn calls(answer: &Value) -> &Value {
    answer["month_to_date"]["meters"]
        .as_array()
        .unwrap_or_else(|| panic!("no month to date in {answer}"))
        .iter()
        .find(|m| m["meter"] == "weather_calls")
        .unwrap_or_else(|| panic!("no weather_calls in {answer}"))
}

fn assert_no(body: &str, leaks: &[&str]) {
    for leak in leaks {
        assert!(!body.contains(leak), "the answer holds {leak:?}: {body}");
    }
}

/// Seeds the month to date into the state store tollgate runs on (`<dir>/data/state.db`), as metering's
/// sealed windows would: one row per partner, and rows of nobody the test asks as.
async fn seed_history(stack: &Stack) {
    let url = format!(
        "sqlite://{}",
        stack.tollgate.dir().join("data/state.db").display()
    );
    let store = SqlStore::open(&url).expect("open the state store");
    let now = chrono::Utc::now().timestamp();
    let hour = now - now.rem_euclid(3_600);
    let row = |customer: &str, app: &str, n: u64| Rollup {
        hour,
        dims: Dims {
            customer: customer.into(),
            app: app.into(),
            product: "weather_free".into(),
            meter: "weather_calls".into(),
        },
        counts: Counts {
            allowed: n,
            denied: 2,
            billable: n,
            value: n,
        },
    };
    let batch = Batch {
        id: "selfservice-test:seed".into(),
        rows: vec![
            row("cus_Alpha", "alphaapp", ALPHA_CALLS),
            row("cus_Bravo", "bravoapp", BRAVO_CALLS),
            row("cus_Portal", "", PORTAL_CALLS),
            row("cus_Portal", "strangerapp", STRANGER_CALLS),
            row("", "", STRANGER_CALLS),
        ],
    };
    assert!(store.add(&batch, now).await.expect("seed the rollups"));
}

async fn grant(stack: &Stack, owner: &str, amount: i64) {
    let response = http_client()
        .post(stack.tollgate.admin_url(&format!("/v1/credits/{owner}")))
        .header("idempotency-key", format!("selfservice-{owner}"))
        .json(&json!({"amount": amount, "reason": "self-service test"}))
        .send()
        .await
        .expect("POST /v1/credits");
    assert_eq!(
        response.status().as_u16(),
        201,
        "{:?}",
        response.text().await
    );
}

/// `/v1/usage?app=` (admin): its quota counters as (product, operation, used).
async fn counters(stack: &Stack, app: &str) -> Vec<(String, Value, u64)> {
    let report: Value = http_client()
        .get(stack.tollgate.admin_url(&format!("/v1/usage?app={app}")))
        .send()
        .await
        .expect("GET /v1/usage")
        .json()
        .await
        .expect("usage JSON");
    report["quota"]
        .as_array()
        .unwrap_or_else(|| panic!("no quota counters: {report}"))
        .iter()
        .map(|c| {
            (
                c["product"].as_str().unwrap_or_default().to_owned(),
                c["operation"].clone(),
                c["used"].as_u64().unwrap_or(u64::MAX),
            )
        })
        .collect()
}

async fn started() -> Stack {
    let stack = Stack::start(&config(""), &catalog()).await;
    seed_history(&stack).await;
    grant(&stack, "alpha", ALPHA_CREDITS).await;
    grant(&stack, "bravo", BRAVO_CREDITS).await;
    stack
}

#[tokio::test]
async fn each_partner_reads_its_own_usage_with_a_key_and_with_a_jwt() {
    let stack = started().await;
    // Real traffic first: two calls of alpha's, one of bravo's.
    for _ in 0..2 {
        let reply = call(&stack, "GET", "/forecast", &[("x-api-key", ALPHA_KEY)]).await;
        assert_eq!(reply.status, 200, "{}", reply.body);
    }
    let reply = call(&stack, "GET", "/forecast", &[("x-api-key", BRAVO_KEY)]).await;
    assert_eq!(reply.status, 200, "{}", reply.body);
    let upstream_before = stack.upstream.count();
    assert_eq!(upstream_before, 3);

    let alpha_jwt = mint(
        &stack,
        &["--sub", "dev@alpha.test", "--client-id", "alpha-client"],
    );
    let bravo_jwt = mint(
        &stack,
        &["--sub", "dev@bravo.test", "--client-id", "bravo-client"],
    );
    let alpha_bearer = format!("Bearer {alpha_jwt}");
    let bravo_bearer = format!("Bearer {bravo_jwt}");

    let alpha_leaks = [
        "bravo", "cus_", "9191", "5678", "7777", "3131", ALPHA_KEY, "sha256:",
    ];
    let alpha_views = [
        usage(&stack, &[("x-api-key", ALPHA_KEY)]).await,
        usage(&stack, &[("authorization", alpha_bearer.as_str())]).await,
        // The key as a query parameter, as any call may carry it.
        {
            let reply = call(
                &stack,
                "GET",
                &format!("/.tollgate/usage?apikey={ALPHA_KEY}"),
                &[],
            )
            .await;
            assert_eq!(reply.status, 200, "{}", reply.body);
            let json = reply.json();
            (reply.body, json)
        },
    ];
    for (body, a) in &alpha_views {
        assert_eq!(a["app"], "alphaapp", "{a}");
        assert_eq!(a["developer"], "dev@alpha.test");
        assert_eq!(a["company"], "alpha");
        assert_eq!(a["environment"], "test");
        let free = &product(a, "weather_free")["quotas"];
        assert_eq!(free[0]["operation"], Value::Null, "{a}");
        assert_eq!(free[0]["limit"], 100);
        assert_eq!(free[0]["used"], 2, "alpha's two calls: {a}");
        assert_eq!(free[0]["remaining"], 98);
        assert_eq!(free[1]["operation"], "bulk");
        assert_eq!(free[1]["used"], 0);
        assert_eq!(product(a, "prepaid")["status"], "approved");
        assert_eq!(calls(a)["allowed"], ALPHA_CALLS, "{a}");
        assert_eq!(calls(a)["value"], ALPHA_CALLS);
        assert_eq!(a["credits"], json!({"balance": ALPHA_CREDITS}));
        assert_eq!(a["unavailable"], json!([]));
        assert!(
            a["products"]
                .as_array()
                .is_some_and(|p| p.iter().all(|p| p["name"] != "everything")),
            "bravo's product in alpha's answer: {a}"
        );
        assert_no(body, &alpha_leaks);
        assert_no(body, &[&alpha_jwt]);
    }

    let bravo_leaks = [
        "alpha", "cus_", "4242", "1234", "7777", "3131", BRAVO_KEY, "sha256:",
    ];
    for (body, b) in [
        usage(&stack, &[("x-api-key", BRAVO_KEY)]).await,
        usage(&stack, &[("authorization", bravo_bearer.as_str())]).await,
    ] {
        assert_eq!(b["app"], "bravoapp", "{b}");
        assert_eq!(b["company"], "bravo");
        assert_eq!(product(&b, "weather_free")["quotas"][0]["used"], 1, "{b}");
        assert_eq!(product(&b, "everything")["quotas"], json!([]));
        assert_eq!(calls(&b)["allowed"], BRAVO_CALLS);
        assert_eq!(b["credits"], json!({"balance": BRAVO_CREDITS}));
        assert_no(&body, &bravo_leaks);
        assert_no(&body, &[&bravo_jwt]);
    }

    // A portal token without an app: its account's own view.
    let portal_jwt = mint(
        &stack,
        &[
            "--sub",
            "dev@portal.test",
            "--company",
            "portalco",
            "--product",
            "weather_free",
        ],
    );
    let portal = call(
        &stack,
        "GET",
        "/.tollgate/usage",
        &[("authorization", &format!("Bearer {portal_jwt}"))],
    )
    .await;
    assert_eq!(portal.status, 200, "{}", portal.body);
    let p = portal.json();
    assert_eq!(p["app"], Value::Null, "{p}");
    assert_eq!(p["account"], "portalco");
    assert_eq!(product(&p, "weather_free")["quotas"][0]["used"], 0);
    // Its customer (the catalog developer's) also pays for strangerapp, whose calls are not the account's.
    assert_eq!(calls(&p)["allowed"], PORTAL_CALLS, "{p}");
    assert_eq!(p["credits"], Value::Null);
    assert_no(
        &portal.body,
        &["alpha", "bravo", "4242", "9191", "7777", "stranger"],
    );

    assert_eq!(
        stack.upstream.count(),
        upstream_before,
        "a self-service request reached the upstream: {:?}",
        stack.upstream.requests()
    );
    assert!(
        stack
            .upstream
            .requests()
            .iter()
            .all(|r| !r.path_and_query.contains("tollgate")),
        "{:?}",
        stack.upstream.requests()
    );
}

#[tokio::test]
async fn self_service_spends_nothing_reaches_no_upstream_and_is_neither_allowed_nor_denied() {
    let stack = started().await;
    let reply = call(&stack, "GET", "/forecast", &[("x-api-key", ALPHA_KEY)]).await;
    assert_eq!(reply.status, 200, "{}", reply.body);
    let before = counters(&stack, "alphaapp").await;
    assert!(
        before
            .iter()
            .any(|(p, o, used)| p == "weather_free" && o.is_null() && *used == 1),
        "{before:?}"
    );

    const CALLS: usize = 5;
    for _ in 0..CALLS {
        let (_, a) = usage(&stack, &[("x-api-key", ALPHA_KEY)]).await;
        assert_eq!(product(&a, "weather_free")["quotas"][0]["used"], 1);
        assert_eq!(a["credits"]["balance"], ALPHA_CREDITS);
    }
    assert_eq!(
        counters(&stack, "alphaapp").await,
        before,
        "self-service spent quota"
    );
    assert_eq!(stack.upstream.count(), 1, "{:?}", stack.upstream.requests());

    let answered = stack
        .tollgate
        .metric(
            "tollgate_decisions_total",
            &[("decision", "self_service"), ("reason", "self_service")],
        )
        .await;
    assert_eq!(answered, Some(CALLS as f64));

    // Envoy's access log carries the self-service requests to metering, which counts them as records but
    // neither as allowed nor as denied calls.
    let url = stack.tollgate.admin_url("/v1/usage?app=alphaapp");
    let windows = poll_until("metering to see every request", CHANGE_TIMEOUT, || {
        let request = http_client().get(&url).send();
        async move {
            let report: Value = request.await.ok()?.json().await.ok()?;
            let mut sum = (0, 0, 0, 0);
            for meter in report["meters"].as_array()? {
                for w in meter["windows"].as_array()? {
                    sum.0 += w["records"].as_u64()?;
                    sum.1 += w["allowed"].as_u64()?;
                    sum.2 += w["denied"].as_u64()?;
                    sum.3 += w["billable"].as_u64()?;
                }
            }
            (sum.0 == 1 + CALLS as u64).then_some(sum)
        }
    })
    .await;
    assert_eq!(
        windows,
        (1 + CALLS as u64, 1, 0, 1),
        "(records, allowed, denied, billable)"
    );
}

#[tokio::test]
async fn bad_credentials_get_the_same_401_as_any_call() {
    let stack = started().await;
    let bad_jwt = "Bearer eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJ4In0.c2lnbmF0dXJl";
    let cases: [&[(&str, &str)]; 4] = [
        &[],
        &[("x-api-key", UNKNOWN_KEY)],
        &[("x-api-key", BRAVO_REVOKED)],
        &[("authorization", bad_jwt)],
    ];
    for headers in cases {
        let own = call(&stack, "GET", "/.tollgate/usage", headers).await;
        let any = call(&stack, "GET", "/forecast", headers).await;
        assert_eq!(own.status, 401, "{headers:?}: {}", own.body);
        assert_eq!(
            (own.status, own.json(), own.header("www-authenticate")),
            (any.status, any.json(), any.header("www-authenticate")),
            "{headers:?}"
        );
        assert!(own.header("www-authenticate").is_some());
        assert_no(
            &own.body,
            &["alpha", "bravo", "4242", "9191", UNKNOWN_KEY, BRAVO_REVOKED],
        );
    }
    assert_eq!(stack.upstream.count(), 0);
}

#[tokio::test]
async fn only_get_usage_is_served_under_the_prefix_and_the_prefix_is_configurable() {
    let stack = started().await;
    let post = call(
        &stack,
        "POST",
        "/.tollgate/usage",
        &[("x-api-key", BRAVO_KEY)],
    )
    .await;
    assert_eq!(post.status, 405, "{}", post.body);
    assert_eq!(post.header("allow"), Some("GET"));
    assert_eq!(post.json()["error"], "method_not_allowed");
    // bravo's `everything` product covers /**: still, nothing under the prefix reaches the upstream.
    for path in [
        "/.tollgate/",
        "/.tollgate/keys",
        "/.tollgate/usage/alphaapp",
        "/%2Etollgate/usage/alphaapp",
    ] {
        let other = call(&stack, "GET", path, &[("x-api-key", BRAVO_KEY)]).await;
        assert_eq!(other.status, 404, "{path}: {}", other.body);
        assert_eq!(other.json()["error"], "not_found");
        assert_no(&other.body, &["alpha", "4242"]);
    }
    let spelled = call(
        &stack,
        "GET",
        "//.tollgate//usage",
        &[("x-api-key", BRAVO_KEY)],
    )
    .await;
    assert_eq!(spelled.status, 200, "{}", spelled.body);
    assert_eq!(spelled.json()["app"], "bravoapp");
    assert_eq!(stack.upstream.count(), 0, "{:?}", stack.upstream.requests());

    // Another prefix: the old one is an ordinary path again (bravo's `everything` covers it).
    let moved = Stack::start(
        &config("self_service:\n  path_prefix: /partner/self/\n"),
        &catalog(),
    )
    .await;
    let (_, b) = usage_at(&moved, "/partner/self/usage").await;
    assert_eq!(b["app"], "bravoapp");
    assert_eq!(moved.upstream.count(), 0);
    let ordinary = call(
        &moved,
        "GET",
        "/.tollgate/usage",
        &[("x-api-key", BRAVO_KEY)],
    )
    .await;
    assert_eq!(ordinary.status, 200, "{}", ordinary.body);
    assert_eq!(
        moved.upstream.count(),
        1,
        "the ordinary path reaches the upstream"
    );
}

async fn usage_at(stack: &Stack, path: &str) -> (String, Value) {
    let reply = call(stack, "GET", path, &[("x-api-key", BRAVO_KEY)]).await;
    assert_eq!(reply.status, 200, "{}", reply.body);
    let json = reply.json();
    (reply.body, json)
}
