//! Imported Apigee X consumer keys through a real Envoy: the X fixture set (tests/fixtures/apigee/x) is imported
//! with the built binary, served by tollgate behind Envoy, and each key gets what Apigee's Envoy adapter would
//! give it: its operations (200), nothing outside them (403), its product's and its operationConfig's quota
//! (429, one counter for all of an operationConfig's operations), 401 for a revoked or expired credential,
//! 403 for a pending product, an inactive developer's app, or a product another credential of the app holds.

mod support;

use std::process::Command;

use support::{Stack, base_config, raw_request};

const KEY_GOOD: &str = "XKeyGoodPartner0123456789abcdefghijklmnopqrstuv";
const KEY_REVOKED: &str = "XKeyRevokedPartner0123456789abcdefghijklmnopqrs";
const KEY_EXPIRED: &str = "XKeyExpiredPartner0123456789abcdefghijklmnopqrs";
const KEY_BASIC_ONLY: &str = "XKeySplitBasicOnly0123456789abcdefghijklmnopqrs";
const KEY_WITH_GEO: &str = "XKeySplitWithGeo0123456789abcdefghijklmnopqrstu";
const KEY_SLEEPY: &str = "XKeySleepyDeveloper0123456789abcdefghijklmnopq";

/// The X fixture imported as an operator would, with the weatherapi proxy's base path.
fn imported_catalog() -> String {
    let dir = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/apigee/x");
    let file = |name: &str| dir.join(name).display().to_string();
    let out = Command::new(env!("CARGO_BIN_EXE_tollgate"))
        .args(["import", "apigee", "--products"])
        .arg(file("products.json"))
        .arg("--developers")
        .arg(file("developers.json"))
        .arg("--apps")
        .arg(file("apps.json"))
        .args(["--base-path", "weatherapi=/v1/weather"])
        .output()
        .expect("run tollgate import apigee");
    assert!(
        out.status.success(),
        "import failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("UTF-8 catalog")
}

/// A stack serving the imported catalog; hosts without the route's API extension take the API from :authority.
async fn stack() -> Stack {
    let config = format!("{}api_host_fallback: true\n", base_config("prod"));
    Stack::start(&config, &imported_catalog()).await
}

/// Status and ratelimit-limit of one call to weatherapi (the route's context extension) through Envoy.
async fn call(stack: &Stack, method: &str, path: &str, key: &str) -> (u16, Option<u64>) {
    let method = reqwest::Method::from_bytes(method.as_bytes()).expect("method");
    let response = stack
        .client
        .request(method, stack.url(path))
        .header("x-api-key", key)
        .send()
        .await
        .expect("request through Envoy");
    let limit = response
        .headers()
        .get("ratelimit-limit")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok());
    (response.status().as_u16(), limit)
}

async fn status(stack: &Stack, method: &str, path: &str, key: &str) -> u16 {
    call(stack, method, path, key).await.0
}

/// Status of a call to the remote service target geo.example.test (API from the host).
fn geo(stack: &Stack, method: &str, path: &str, key: &str) -> u16 {
    raw_request(
        stack.envoy.port,
        method,
        path.as_bytes(),
        "geo.example.test",
        &[("x-api-key", key)],
    )
    .status
}

#[tokio::test]
async fn an_imported_key_gets_exactly_what_apigee_gives_it() {
    let stack = stack().await;

    // weather-basic's first operationConfig: GET /forecast and below, under the proxy's base path.
    assert_eq!(
        status(&stack, "GET", "/v1/weather/forecast", KEY_GOOD).await,
        200
    );
    let seen = stack.upstream.last().expect("the upstream saw the call");
    assert_eq!(seen.header_all("x-tollgate-app"), vec!["weather-client"]);
    assert_eq!(seen.header_all("x-tollgate-product"), vec!["weather-basic"]);
    assert_eq!(
        status(&stack, "GET", "/v1/weather/forecast/tomorrow", KEY_GOOD).await,
        200
    );
    // Another method, a path outside every operation, the resource without its base path: 403.
    assert_eq!(
        status(&stack, "POST", "/v1/weather/forecast", KEY_GOOD).await,
        403
    );
    assert_eq!(
        status(&stack, "GET", "/v1/weather/history", KEY_GOOD).await,
        403
    );
    assert_eq!(status(&stack, "GET", "/forecast", KEY_GOOD).await, 403);
    // weather-premium is pending for this app's credentials.
    assert_eq!(
        status(&stack, "GET", "/v1/weather/premium/maps", KEY_GOOD).await,
        403
    );
    // A revoked and an expired credential of the same app; an inactive developer's app.
    assert_eq!(
        status(&stack, "GET", "/v1/weather/forecast", KEY_REVOKED).await,
        401
    );
    assert_eq!(
        status(&stack, "GET", "/v1/weather/forecast", KEY_EXPIRED).await,
        401
    );
    assert_eq!(
        status(&stack, "GET", "/v1/weather/forecast", KEY_SLEEPY).await,
        403
    );

    // The remote service target: its request paths as they are, GET only; the mid-segment wildcard resource
    // was not imported, so it grants nothing.
    assert_eq!(geo(&stack, "GET", "/cities?q=Paris", KEY_GOOD), 200);
    assert_eq!(geo(&stack, "POST", "/cities", KEY_GOOD), 403);
    assert_eq!(geo(&stack, "GET", "/v1/status", KEY_GOOD), 403);
    // split-client's credentials differ in products: each key keeps exactly its own.
    assert_eq!(geo(&stack, "GET", "/cities", KEY_WITH_GEO), 200);
    assert_eq!(geo(&stack, "GET", "/cities", KEY_BASIC_ONLY), 403);
    assert_eq!(
        status(&stack, "GET", "/v1/weather/forecast", KEY_BASIC_ONLY).await,
        200
    );

    // The product quota (5 a day) counts weather-client's two forecasts above; three more pass, then 429.
    for _ in 0..3 {
        assert_eq!(
            call(&stack, "GET", "/v1/weather/forecast", KEY_GOOD).await,
            (200, Some(5))
        );
    }
    assert_eq!(
        call(&stack, "GET", "/v1/weather/forecast", KEY_GOOD).await,
        (429, Some(5))
    );
}

#[tokio::test]
async fn an_operation_configs_quota_is_one_counter_for_all_its_operations() {
    let stack = stack().await;
    // weather-basic's second operationConfig (3 a day) became `GET` and `POST` operations of one quota group.
    assert_eq!(
        call(&stack, "GET", "/v1/weather/reports", KEY_GOOD).await,
        (200, Some(3))
    );
    assert_eq!(
        call(&stack, "POST", "/v1/weather/reports", KEY_GOOD).await,
        (200, Some(3))
    );
    assert_eq!(
        call(&stack, "GET", "/v1/weather/reports/2026", KEY_GOOD).await,
        (200, Some(3))
    );
    assert_eq!(
        call(&stack, "POST", "/v1/weather/reports", KEY_GOOD).await,
        (429, Some(3))
    );
    assert_eq!(
        call(&stack, "GET", "/v1/weather/reports", KEY_GOOD).await,
        (429, Some(3))
    );
    // Its own counter: the product quota, which the first operationConfig charges, is untouched.
    assert_eq!(
        call(&stack, "GET", "/v1/weather/forecast", KEY_GOOD).await,
        (200, Some(5))
    );
}
