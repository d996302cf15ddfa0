//! The state store end to end: the management API provisions developers, apps and keys that a real Envoy
//! 1.40 enforces at once, on one replica with the embedded SQLite store and on two replicas sharing a real
//! PostgreSQL server (started by the test, killed with SIGKILL in the middle).

mod support;

use std::time::Duration;

use serde_json::{Value, json};
use support::{
    EchoUpstream, Envoy, PostgresServer, Stack, Tollgate, base_config, envoy_config_replicas,
    http_client, key_hash, poll_until,
};

const ADMIN_TOKEN: &str = "test-admin-token-0123456789";
/// The contract's bound: a change is enforced everywhere within `sync_interval` (1 s) + 1 s. Measured from
/// the API's answer.
const SYNC_BOUND: Duration = Duration::from_secs(2);
const FILE_KEY: &str = "tg_test_FileKeyFileKeyFileKeyFileKeyFileKey111";

fn catalog() -> String {
    format!(
        r#"
products:
  - name: basic
    operations: [{{api: weatherapi, paths: [/**]}}]
  - name: gated
    approval: manual
    operations: [{{api: weatherapi, paths: [/gated/**]}}]
developers:
  - email: file@example.test
    apps:
      - name: fileapp
        client_id: file-client
        products: [{{name: basic}}]
        keys: [{{hash: "{}"}}]
"#,
        key_hash(FILE_KEY)
    )
}

fn config(state: &str) -> String {
    format!("{}admin_token: {ADMIN_TOKEN}\n{state}", base_config("test"))
}

/// One management API call with the admin token; the status and the JSON body (`null` when empty).
async fn api(t: &Tollgate, method: &str, path: &str, body: Option<Value>) -> (u16, Value) {
    let client = http_client();
    let mut request = client
        .request(method.parse().expect("method"), t.admin_url(path))
        .bearer_auth(ADMIN_TOKEN);
    if let Some(body) = body {
        request = request.json(&body);
    }
    let response = request.send().await.expect("management API call");
    let status = response.status().as_u16();
    let text = response.text().await.expect("body");
    (status, serde_json::from_str(&text).unwrap_or(Value::Null))
}

/// Creates developer, app (on `basic`) and a key through `t`; returns the key and its id.
async fn provision(t: &Tollgate, app: &str) -> (String, String) {
    let (status, _) = api(
        t,
        "PUT",
        "/v1/developers/portal@example.test",
        Some(json!({"company": "portal co", "stripe_customer": "cus_Portal"})),
    )
    .await;
    assert!(status == 201 || status == 200, "developer: {status}");
    let (status, body) = api(
        t,
        "PUT",
        &format!("/v1/apps/{app}"),
        Some(json!({"developer": "portal@example.test", "products": [{"name": "basic"}]})),
    )
    .await;
    assert_eq!(status, 201, "{body}");
    new_key(t, app).await
}

async fn new_key(t: &Tollgate, app: &str) -> (String, String) {
    let (status, body) = api(t, "POST", &format!("/v1/apps/{app}/keys"), Some(json!({}))).await;
    assert_eq!(status, 201, "{body}");
    let key = body["key"].as_str().expect("key shown once").to_owned();
    assert!(key.starts_with("tg_live_"), "{key}");
    (key, body["id"].as_str().expect("id").to_owned())
}

async fn call(client: &reqwest::Client, envoy: &Envoy, path: &str, key: &str) -> u16 {
    client
        .get(envoy.url(path))
        .header("x-api-key", key)
        .send()
        .await
        .expect("request through envoy")
        .status()
        .as_u16()
}

/// Waits until `n` calls in a row answer `status` (Envoy round-robins them over every replica).
async fn settles(
    what: &str,
    bound: Duration,
    client: &reqwest::Client,
    envoy: &Envoy,
    key: &str,
    status: u16,
) {
    poll_until(what, bound, || async {
        for _ in 0..6 {
            if call(client, envoy, "/forecast", key).await != status {
                return None;
            }
        }
        Some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_made_through_the_api_works_until_it_is_revoked_and_survives_a_restart() {
    let mut stack = Stack::start(&config(""), &catalog()).await;
    let client = stack.client.clone();
    let (key, id) = provision(&stack.tollgate, "portalapp").await;
    // The replica that answered the write has applied it before answering.
    assert_eq!(call(&client, &stack.envoy, "/forecast", &key).await, 200);
    let seen = stack.upstream.last().expect("the upstream saw the call");
    assert_eq!(seen.header("x-tollgate-app"), Some("portalapp"));
    assert_eq!(seen.header("x-api-key"), None, "the key is stripped");

    // Manual approval: a subscription without status starts pending (403), approval opens it.
    let (status, body) = api(
        &stack.tollgate,
        "PUT",
        "/v1/apps/portalapp",
        Some(json!({"developer": "portal@example.test", "products": [{"name": "gated"}]})),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["products"][0]["status"], "pending");
    assert_eq!(call(&client, &stack.envoy, "/gated/x", &key).await, 403);
    let (status, _) = api(
        &stack.tollgate,
        "PUT",
        "/v1/apps/portalapp/products/gated",
        Some(json!({"status": "approved"})),
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(call(&client, &stack.envoy, "/gated/x", &key).await, 200);
    assert_eq!(call(&client, &stack.envoy, "/forecast", &key).await, 403);
    let (status, body) = api(
        &stack.tollgate,
        "PUT",
        "/v1/apps/portalapp",
        Some(json!({"developer": "portal@example.test",
                     "products": [{"name": "gated", "status": "approved"}, {"name": "basic"}]})),
    )
    .await;
    assert_eq!(status, 200, "{body}");

    // The embedded store keeps everything across a restart (SIGKILL, no shutdown path).
    stack.tollgate.restart().await;
    assert_eq!(call(&client, &stack.envoy, "/forecast", &key).await, 200);

    // Rotation: the old key keeps working for its grace, the new one works at once.
    let (status, rotated) = api(
        &stack.tollgate,
        "POST",
        &format!("/v1/apps/portalapp/keys/{id}/rotate"),
        Some(json!({"grace": "1h"})),
    )
    .await;
    assert_eq!(status, 201, "{rotated}");
    let new = rotated["key"].as_str().expect("new key").to_owned();
    let new_id = rotated["id"].as_str().expect("new id").to_owned();
    assert_eq!(call(&client, &stack.envoy, "/forecast", &new).await, 200);
    assert_eq!(call(&client, &stack.envoy, "/forecast", &key).await, 200);
    let (_, app) = api(&stack.tollgate, "GET", "/v1/apps/portalapp", None).await;
    let listed = app["keys"].as_array().expect("keys");
    assert_eq!(listed.len(), 2);
    assert!(
        listed
            .iter()
            .all(|k| k.get("key").is_none() && k.get("hash").is_none())
    );
    assert!(
        !app.to_string().contains(&new[12..]),
        "a key is never shown again"
    );

    // Revocation: 401 at once (this replica), rotation with no grace: the old key stops too.
    let (status, _) = api(
        &stack.tollgate,
        "POST",
        &format!("/v1/apps/portalapp/keys/{new_id}/revoke"),
        None,
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(call(&client, &stack.envoy, "/forecast", &new).await, 401);
    let (status, _) = api(
        &stack.tollgate,
        "POST",
        &format!("/v1/apps/portalapp/keys/{id}/rotate"),
        Some(json!({"grace": "0s"})),
    )
    .await;
    assert_eq!(status, 201);
    assert_eq!(call(&client, &stack.envoy, "/forecast", &key).await, 401);

    // The catalog file's key still works beside the store's.
    assert_eq!(
        call(&client, &stack.envoy, "/forecast", FILE_KEY).await,
        200
    );
    let (_, audit) = api(&stack.tollgate, "GET", "/v1/audit", None).await;
    let actions: Vec<&str> = audit["data"]
        .as_array()
        .expect("audit rows")
        .iter()
        .filter_map(|r| r["action"].as_str())
        .collect();
    assert_eq!(
        actions,
        [
            "developer.put",
            "app.put",
            "key.create",
            "app.put",
            "subscription.set",
            "app.put",
            "key.rotate",
            "key.revoke",
            "key.rotate"
        ]
    );
    assert!(
        audit["data"][0]["actor"]
            .as_str()
            .is_some_and(|a| a.starts_with("admin:") && !a.contains(ADMIN_TOKEN))
    );
    assert!(
        !stack.tollgate.logs().contains(&key[12..]),
        "no key in the logs"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_management_input_gets_a_clear_error_and_changes_nothing() {
    let stack = Stack::start(&config(""), &catalog()).await;
    let t = &stack.tollgate;
    provision(t, "portalapp").await;
    let client = http_client();

    let wrong = client
        .get(t.admin_url("/v1/developers"))
        .bearer_auth("not-the-token")
        .send()
        .await
        .expect("call");
    assert_eq!(wrong.status().as_u16(), 401);

    let cases: &[(&str, &str, Value, u16, &str, &str)] = &[
        (
            "PUT",
            "/v1/apps/other",
            json!({"developer": "portal@example.test", "products": [{"name": "basic"}, {"name": "nope"}]}),
            400,
            "invalid",
            "products[1].name",
        ),
        (
            "PUT",
            "/v1/apps/other",
            json!({"developer": "portal@example.test", "client_id": "file-client"}),
            409,
            "conflict",
            "client_id",
        ),
        (
            "PUT",
            "/v1/apps/fileapp",
            json!({"developer": "portal@example.test"}),
            409,
            "defined_in_catalog",
            "fileapp",
        ),
        (
            "PUT",
            "/v1/developers/file@example.test",
            json!({}),
            409,
            "defined_in_catalog",
            "file@example.test",
        ),
        (
            "POST",
            "/v1/apps/fileapp/keys",
            json!({}),
            409,
            "defined_in_catalog",
            "fileapp",
        ),
        (
            "PUT",
            "/v1/apps/other",
            json!({"developer": "nobody@example.test"}),
            400,
            "invalid",
            "developer",
        ),
        (
            "PUT",
            "/v1/apps/other",
            json!({"developer": "portal@example.test", "colour": "red"}),
            400,
            "invalid",
            "colour",
        ),
        (
            "PUT",
            "/v1/apps/bad%20name",
            json!({"developer": "portal@example.test"}),
            400,
            "invalid",
            "name",
        ),
        (
            "POST",
            "/v1/apps/portalapp/keys",
            json!({"environment": "staging"}),
            400,
            "invalid",
            "environment",
        ),
        (
            "POST",
            "/v1/apps/portalapp/keys/key_nope/revoke",
            json!({}),
            404,
            "not_found",
            "key_nope",
        ),
        (
            "GET",
            "/v1/apps/nope",
            Value::Null,
            404,
            "not_found",
            "nope",
        ),
        (
            "GET",
            "/v1/developers?limit=0",
            Value::Null,
            400,
            "invalid",
            "limit",
        ),
    ];
    for (method, path, body, status, error, named) in cases {
        let body = (!body.is_null()).then(|| body.clone());
        let (got, answer) = api(t, method, path, body).await;
        assert_eq!(got, *status, "{method} {path}: {answer}");
        assert_eq!(answer["error"], *error, "{method} {path}: {answer}");
        let message = answer["message"].as_str().unwrap_or_default();
        assert!(message.contains(named), "{method} {path}: {message}");
    }

    // An app moved to another developer is a conflict, not a silent move.
    api(
        t,
        "PUT",
        "/v1/developers/second@example.test",
        Some(json!({})),
    )
    .await;
    let (status, answer) = api(
        t,
        "PUT",
        "/v1/apps/portalapp",
        Some(json!({"developer": "second@example.test"})),
    )
    .await;
    assert_eq!((status, answer["error"].as_str()), (409, Some("conflict")));

    // Malformed JSON and a body over the limit.
    let raw = |body: Vec<u8>| {
        client
            .put(t.admin_url("/v1/developers/raw@example.test"))
            .bearer_auth(ADMIN_TOKEN)
            .header("content-type", "application/json")
            .body(body)
            .send()
    };
    let malformed = raw(b"{\"company\": ".to_vec()).await.expect("call");
    assert_eq!(malformed.status().as_u16(), 400);
    let huge = raw(vec![b' '; 100 * 1024]).await.expect("call");
    assert_eq!(huge.status().as_u16(), 413);
    let (status, _) = api(t, "GET", "/v1/developers/raw@example.test", None).await;
    assert_eq!(status, 404, "nothing was created");

    // Idempotency-Key: the same request answers the first answer (the same key), another request 409.
    let once = |body: Value| {
        client
            .post(t.admin_url("/v1/apps/portalapp/keys"))
            .bearer_auth(ADMIN_TOKEN)
            .header("idempotency-key", "f3b1c9a0-2f4e-4d5b-9c1a-7d3e5f6a8b90")
            .json(&body)
            .send()
    };
    let first: Value = once(json!({"name": "ci"}))
        .await
        .expect("call")
        .json()
        .await
        .expect("json");
    let again = once(json!({"name": "ci"})).await.expect("call");
    assert_eq!(again.headers()["idempotent-replayed"], "true");
    let again: Value = again.json().await.expect("json");
    assert_eq!(first, again);
    let other = once(json!({"name": "cd"})).await.expect("call");
    assert_eq!(other.status().as_u16(), 409);
    let (_, app) = api(t, "GET", "/v1/apps/portalapp", None).await;
    assert_eq!(
        app["keys"].as_array().map(Vec::len),
        Some(2),
        "one key per Idempotency-Key"
    );

    // A catalog edit that introduces a name the store holds is rejected; the last good catalog stays.
    let before = t
        .metric("tollgate_catalog_reload_errors_total", &[])
        .await
        .unwrap_or(0.0);
    t.write_catalog(&format!(
        "{}      - name: portalapp\n        products: [{{name: basic}}]\n",
        catalog()
    ));
    t.wait_metric("tollgate_catalog_reload_errors_total", &[], |v| v > before)
        .await;
    assert!(t.logs().contains("also in the state store"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_on_postgres_enforce_each_others_changes_and_lose_no_revoke_to_an_outage() {
    let mut pg = PostgresServer::start();
    let state = format!("state:\n  url: {}\n  sync_interval: 1s\n", pg.url());
    let upstream = EchoUpstream::start();
    let a = Tollgate::start(&config(&state), &catalog()).await;
    let b = Tollgate::start(&config(&state), &catalog()).await;
    let envoy = Envoy::start(&envoy_config_replicas(
        &[a.grpc_port, b.grpc_port],
        upstream.port,
    ))
    .await;
    let client = http_client();

    // Made on A, it works through Envoy on both replicas within the bound.
    let (key, id) = provision(&a, "sharedapp").await;
    settles(
        "a key made on replica A to work on both",
        SYNC_BOUND,
        &client,
        &envoy,
        &key,
        200,
    )
    .await;
    // Revoked on B, it answers 401 on both within the bound.
    let (status, _) = api(
        &b,
        "POST",
        &format!("/v1/apps/sharedapp/keys/{id}/revoke"),
        None,
    )
    .await;
    assert_eq!(status, 200);
    settles(
        "a revoke made on B to reach both",
        SYNC_BOUND,
        &client,
        &envoy,
        &key,
        401,
    )
    .await;

    // The store goes away: Checks keep their answers, the API answers 503, the sync age grows.
    let (second, second_id) = new_key(&a, "sharedapp").await;
    settles(
        "a second key to work on both",
        SYNC_BOUND,
        &client,
        &envoy,
        &second,
        200,
    )
    .await;
    pg.kill9();
    for _ in 0..6 {
        assert_eq!(call(&client, &envoy, "/forecast", &second).await, 200);
        assert_eq!(call(&client, &envoy, "/forecast", &key).await, 401);
    }
    let (status, answer) = api(
        &a,
        "PUT",
        "/v1/developers/late@example.test",
        Some(json!({})),
    )
    .await;
    assert_eq!(
        (status, answer["error"].as_str()),
        (503, Some("unavailable"))
    );
    assert!(
        !answer.to_string().contains("127.0.0.1"),
        "no store address in an error body: {answer}"
    );
    a.wait_metric("tollgate_state_sync_age_seconds", &[], |age| age >= 2.0)
        .await;
    assert_eq!(
        http_client()
            .get(a.admin_url("/readyz"))
            .send()
            .await
            .expect("readyz")
            .status()
            .as_u16(),
        200,
        "a replica that has read the store stays ready while it is away"
    );

    // Back: a revoke made through B as soon as it can write must reach A too (A's listener is
    // reconnecting meanwhile; its cursor catches up).
    pg.restart();
    poll_until(
        "the revoke through B to succeed once PostgreSQL is back",
        Duration::from_secs(30),
        || async {
            let (status, _) = api(
                &b,
                "POST",
                &format!("/v1/apps/sharedapp/keys/{second_id}/revoke"),
                None,
            )
            .await;
            (status == 200).then_some(())
        },
    )
    .await;
    settles(
        "the revoke made after the outage to reach both",
        SYNC_BOUND,
        &client,
        &envoy,
        &second,
        401,
    )
    .await;
    a.wait_metric("tollgate_state_sync_age_seconds", &[], |age| age < 2.0)
        .await;
    assert_eq!(call(&client, &envoy, "/forecast", FILE_KEY).await, 200);
    drop(envoy);
}
