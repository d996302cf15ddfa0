//! End to end through a real Envoy 1.40: client -> Envoy (ext_authz gRPC) -> tollgate -> echo upstream.
//! Covers every row of the contract's decision table (section 4) for API keys, plus what the upstream
//! receives on allow, quotas, product choice, and live catalog reloads.

mod support;

use reqwest::header::HeaderMap;
use serde_json::Value;
use support::{
    CHANGE_TIMEOUT, EchoUpstream, Envoy, Stack, Tollgate, base_config, envoy_config, key_hash,
    poll_until, raw_request,
};

const KEY_GOOD: &str = "tg_test_GoodKey4uZBoBcuk7Kp4aggzLahAQ5tvTRefxE";
const KEY_SECOND: &str = "tg_test_SecondKeyZBoBcuk7Kp4aggzLahAQ5tvTRefxE";
const KEY_FUTURE: &str = "tg_test_FutureExpiryBcuk7Kp4aggzLahAQ5tvTRefxE";
const KEY_REVOKED: &str = "tg_test_RevokedKeyBoBcuk7Kp4aggzLahAQ5tvTRefxE";
const KEY_EXPIRED: &str = "tg_test_ExpiredKeyBoBcuk7Kp4aggzLahAQ5tvTRefxE";
const KEY_UNKNOWN: &str = "tg_test_UnknownKeyBoBcuk7Kp4aggzLahAQ5tvTRefxE";
const KEY_BANNED_APP: &str = "tg_test_BannedAppBoBcuk7Kp4aggzLahAQ5tvTRefxE";
const KEY_GEO: &str = "tg_test_GeoAppKeyBoBcuk7Kp4aggzLahAQ5tvTRefxE";

/// The test catalog; `@NAME@` placeholders become key hashes (see `catalog`).
const CATALOG: &str = r#"
products:
  - name: weather_gold
    approval: auto
    quota: {limit: 1000, unit: day}
    operations:
      - api: weatherapi
        paths: [/forecast, /forecast/**]
        methods: [GET]
  - name: tiny
    quota: {limit: 3, unit: day}
    operations:
      - {api: weatherapi, paths: [/tiny/**]}
  - name: first_product
    quota: {limit: 2, unit: day}
    operations:
      - {api: weatherapi, paths: [/shared/**]}
  - name: second_product
    quota: {limit: 100, unit: day}
    operations:
      - {api: weatherapi, paths: [/shared/**, /second/**]}
  - name: test_only
    environments: [test]
    operations:
      - {api: weatherapi, paths: [/staging/**]}
  - name: awaiting_approval
    approval: manual
    operations:
      - {api: weatherapi, paths: [/pending/**]}
  - name: withdrawn
    operations:
      - {api: weatherapi, paths: [/withdrawn/**]}
  - name: geo_by_host
    operations:
      - {api: geo.example.test, paths: [/]}
developers:
  - email: dev@weather.test
    company: weathercorp
    apps:
      - name: weatherapp
        status: approved
        products:
          - {name: weather_gold, status: approved}
          - {name: tiny, status: approved}
          - {name: first_product, status: approved}
          - {name: second_product, status: approved}
          - {name: test_only, status: approved}
          - {name: awaiting_approval, status: pending}
          - {name: withdrawn, status: revoked}
        keys:
          - {hash: "@GOOD@", status: approved}
          - {hash: "@FUTURE@", status: approved, expires_at: "2099-01-01T00:00:00Z"}
          - {hash: "@REVOKED@", status: revoked}
          - {hash: "@EXPIRED@", status: approved, expires_at: "2020-01-01T00:00:00Z"}
  - email: banned@weather.test
    apps:
      - name: bannedapp
        status: revoked
        products:
          - {name: weather_gold, status: approved}
        keys:
          - {hash: "@BANNED@", status: approved}
  - email: geo@geo.test
    apps:
      - name: geoapp
        status: approved
        products:
          - {name: geo_by_host, status: approved}
        keys:
          - {hash: "@GEO@", status: approved}
"#;

/// `CATALOG` with its placeholders replaced by the keys' hashes.
fn catalog() -> String {
    fill(CATALOG)
}

fn fill(template: &str) -> String {
    [
        ("@GOOD@", KEY_GOOD),
        ("@SECOND@", KEY_SECOND),
        ("@FUTURE@", KEY_FUTURE),
        ("@REVOKED@", KEY_REVOKED),
        ("@EXPIRED@", KEY_EXPIRED),
        ("@BANNED@", KEY_BANNED_APP),
        ("@GEO@", KEY_GEO),
    ]
    .iter()
    .fold(template.to_owned(), |text, (placeholder, key)| {
        text.replace(placeholder, &key_hash(key))
    })
}

async fn prod_stack() -> Stack {
    Stack::start(&base_config("prod"), &catalog()).await
}

/// A response, read whole.
struct Answer {
    status: u16,
    headers: HeaderMap,
    body: String,
}

impl Answer {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    fn header_number(&self, name: &str) -> u64 {
        self.header(name)
            .unwrap_or_else(|| panic!("missing header {name}; headers: {:?}", self.headers))
            .parse()
            .unwrap_or_else(|e| panic!("header {name} is not a whole number: {e}"))
    }

    fn json(&self) -> Value {
        serde_json::from_str(&self.body)
            .unwrap_or_else(|e| panic!("body is not JSON ({e}): {}", self.body))
    }

    /// The request the upstream saw, from the echo in the body of an allowed call.
    fn echo_header(&self, name: &str) -> Vec<String> {
        self.json()["headers"][name]
            .as_array()
            .map(|values| {
                values
                    .iter()
                    .filter_map(|v| v.as_str().map(str::to_owned))
                    .collect()
            })
            .unwrap_or_default()
    }
}

async fn call(stack: &Stack, method: &str, path: &str, headers: &[(&str, &str)]) -> Answer {
    let method = reqwest::Method::from_bytes(method.as_bytes()).expect("method");
    let mut request = stack.client.request(method, stack.url(path));
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    let response = request.send().await.expect("request through Envoy");
    Answer {
        status: response.status().as_u16(),
        headers: response.headers().clone(),
        body: response.text().await.expect("response body"),
    }
}

async fn get_with_key(stack: &Stack, path: &str, key: &str) -> Answer {
    call(stack, "GET", path, &[("x-api-key", key)]).await
}

/// Asserts a denial as the contract's table shows it: status, JSON `{"error", "message"}`, no secret.
fn assert_denied(answer: &Answer, status: u16, error: &str) {
    assert_eq!(answer.status, status, "body: {}", answer.body);
    let content_type = answer.header("content-type").unwrap_or_default();
    assert!(
        content_type.starts_with("application/json"),
        "content-type {content_type:?}"
    );
    let body = answer.json();
    assert_eq!(body["error"], error, "body: {body}");
    let message = body["message"].as_str().unwrap_or_default();
    assert!(!message.is_empty(), "a denial says what to fix: {body}");
    for key in [
        KEY_GOOD,
        KEY_FUTURE,
        KEY_REVOKED,
        KEY_EXPIRED,
        KEY_UNKNOWN,
        KEY_BANNED_APP,
        KEY_GEO,
    ] {
        assert!(!answer.body.contains(key), "a denial echoes an API key");
    }
}

#[tokio::test]
async fn allowed_call_reaches_upstream_with_identity_and_without_credentials() {
    let stack = prod_stack().await;

    let answer = call(
        &stack,
        "GET",
        "/forecast/paris?city=Paris&units=metric",
        &[
            ("x-api-key", KEY_GOOD),
            ("x-tollgate-app", "evil"),
            ("X-Tollgate-Developer", "evil"),
            ("x-tollgate-product", "evil"),
            ("x-tollgate-anything", "evil"),
        ],
    )
    .await;
    assert_eq!(answer.status, 200, "body: {}", answer.body);
    assert_eq!(answer.header_number("ratelimit-limit"), 1000);
    assert_eq!(answer.header_number("ratelimit-remaining"), 999);
    let reset = answer.header_number("ratelimit-reset");
    assert!(
        (1..=86_400).contains(&reset),
        "a day window resets within a day: {reset}"
    );

    let seen = stack.upstream.last().expect("the upstream saw the call");
    assert_eq!(
        seen.path_and_query,
        "/forecast/paris?city=Paris&units=metric"
    );
    assert_eq!(seen.header_all("x-api-key"), Vec::<&str>::new());
    assert_eq!(seen.header_all("x-tollgate-app"), vec!["weatherapp"]);
    assert_eq!(seen.header_all("x-tollgate-product"), vec!["weather_gold"]);
    let developer = seen.header_all("x-tollgate-developer");
    assert_eq!(developer, vec!["dev@weather.test"]);
    assert_eq!(seen.header("x-tollgate-anything"), None);
    assert!(
        seen.headers.iter().all(|(_, v)| !v.contains(KEY_GOOD)),
        "the key reached the upstream: {:?}",
        seen.headers
    );
    assert_eq!(answer.echo_header("x-tollgate-app"), vec!["weatherapp"]);

    // The key as a query parameter: removed, the other parameters kept in order.
    let answer = call(
        &stack,
        "GET",
        &format!("/forecast?city=Paris&apikey={KEY_GOOD}&units=metric"),
        &[],
    )
    .await;
    assert_eq!(answer.status, 200, "body: {}", answer.body);
    assert_eq!(answer.header_number("ratelimit-remaining"), 998);
    let seen = stack.upstream.last().expect("the upstream saw the call");
    assert_eq!(seen.path(), "/forecast");
    assert_eq!(seen.query(), Some("city=Paris&units=metric"));
    assert!(!seen.path_and_query.contains(KEY_GOOD));
    assert_eq!(seen.header_all("x-tollgate-app"), vec!["weatherapp"]);
    assert_eq!(stack.upstream.count(), 2);

    // A key parameter with a percent-encoded name authenticates and is removed as the client wrote it; the
    // method-override headers never reach the upstream (it would run another method than the one matched).
    let answer = call(
        &stack,
        "GET",
        &format!("/forecast?city=Paris&api%6Bey={KEY_GOOD}"),
        &[
            ("x-http-method-override", "DELETE"),
            ("x-http-method", "DELETE"),
            ("x-method-override", "DELETE"),
        ],
    )
    .await;
    assert_eq!(answer.status, 200, "body: {}", answer.body);
    let seen = stack.upstream.last().expect("the upstream saw the call");
    assert_eq!(seen.query(), Some("city=Paris"));
    assert!(!seen.path_and_query.contains(KEY_GOOD));
    for name in [
        "x-http-method-override",
        "x-http-method",
        "x-method-override",
    ] {
        assert_eq!(seen.header(name), None, "{name} reached the upstream");
    }
    assert_eq!(stack.upstream.count(), 3);

    stack
        .tollgate
        .wait_metric("tollgate_decisions_total", &[("decision", "allow")], |n| {
            n == 3.0
        })
        .await;
    let checks = stack
        .tollgate
        .metric("tollgate_check_duration_seconds_count", &[])
        .await;
    assert!(checks.is_some_and(|n| n >= 2.0), "checks timed: {checks:?}");
}

#[tokio::test]
async fn missing_unknown_revoked_and_expired_keys_are_401() {
    let stack = prod_stack().await;

    let answer = call(&stack, "GET", "/forecast", &[]).await;
    assert_denied(&answer, 401, "unauthenticated");
    assert!(
        answer.header("www-authenticate").is_some(),
        "401 without credential needs www-authenticate: {:?}",
        answer.headers
    );

    for key in [KEY_UNKNOWN, KEY_REVOKED, KEY_EXPIRED] {
        let answer = get_with_key(&stack, "/forecast", key).await;
        assert_denied(&answer, 401, "unauthenticated");
        let answer = call(&stack, "GET", &format!("/forecast?apikey={key}"), &[]).await;
        assert_denied(&answer, 401, "unauthenticated");
    }
    assert_eq!(
        stack.upstream.count(),
        0,
        "a denied call reached the upstream"
    );

    // An expiry in the future is not an expiry.
    let answer = get_with_key(&stack, "/forecast", KEY_FUTURE).await;
    assert_eq!(answer.status, 200, "body: {}", answer.body);
    assert_eq!(stack.upstream.count(), 1);
}

#[tokio::test]
async fn revoked_app_unapproved_products_and_uncovered_requests_are_403() {
    let stack = prod_stack().await;

    let answer = get_with_key(&stack, "/forecast", KEY_BANNED_APP).await;
    assert_denied(&answer, 403, "forbidden");

    for path in ["/pending/x", "/withdrawn/x", "/admin", "/"] {
        let answer = get_with_key(&stack, path, KEY_GOOD).await;
        assert_denied(&answer, 403, "forbidden");
    }
    // weather_gold covers GET only.
    let answer = call(&stack, "DELETE", "/forecast", &[("x-api-key", KEY_GOOD)]).await;
    assert_denied(&answer, 403, "forbidden");
    assert_eq!(
        stack.upstream.count(),
        0,
        "a denied call reached the upstream"
    );

    let answer = get_with_key(&stack, "/forecast", KEY_GOOD).await;
    assert_eq!(answer.status, 200, "body: {}", answer.body);
}

#[tokio::test]
async fn product_limited_to_another_environment_is_403() {
    let prod = prod_stack().await;
    let answer = get_with_key(&prod, "/staging/x", KEY_GOOD).await;
    assert_denied(&answer, 403, "forbidden");
    assert_eq!(prod.upstream.count(), 0);
    drop(prod);

    let test = Stack::start(&base_config("test"), &catalog()).await;
    let answer = get_with_key(&test, "/staging/x", KEY_GOOD).await;
    assert_eq!(answer.status, 200, "body: {}", answer.body);
    let seen = test.upstream.last().expect("the upstream saw the call");
    assert_eq!(seen.header_all("x-tollgate-product"), vec!["test_only"]);
}

#[tokio::test]
async fn dangerous_paths_are_400_and_never_reach_the_upstream() {
    let stack = prod_stack().await;
    let port = stack.envoy.port;
    // Envoy (normalize_path off) forwards these unchanged, so tollgate must answer them itself.
    let via_tollgate: [&[u8]; 12] = [
        b"/forecast/../admin",
        b"/forecast/..",
        b"/forecast/%2e%2e/admin",
        b"/forecast/%2E%2E/admin",
        b"/forecast/.%2e/admin",
        b"/forecast/./x",
        b"/forecast/a%2fb",
        b"/forecast/a%2Fb",
        b"/forecast/a\\b",
        b"/forecast/a%5cb",
        b"/forecast/a%00b",
        b"/forecast/../forecast?city=Paris",
    ];
    for target in via_tollgate {
        let shown = String::from_utf8_lossy(target);
        let answer = raw_request(port, "GET", target, "localhost", &[("x-api-key", KEY_GOOD)]);
        assert_eq!(answer.status, 400, "{shown}: {answer:?}");
        let body = answer
            .json()
            .unwrap_or_else(|| panic!("{shown}: tollgate's JSON body expected: {answer:?}"));
        assert_eq!(body["error"], "bad_request", "{shown}: {body}");
    }
    // Envoy's codec refuses a raw NUL before any filter runs; either way the client gets no 2xx.
    let answer = raw_request(
        port,
        "GET",
        b"/forecast/a\0b",
        "localhost",
        &[("x-api-key", KEY_GOOD)],
    );
    assert!(
        !(200..300).contains(&answer.status),
        "raw NUL allowed: {answer:?}"
    );
    assert_eq!(
        stack.upstream.count(),
        0,
        "the upstream saw a dangerous path: {:?}",
        stack.upstream.requests()
    );

    // The same key on a clean path still works.
    let answer = raw_request(
        port,
        "GET",
        b"/forecast/paris",
        "localhost",
        &[("x-api-key", KEY_GOOD)],
    );
    assert_eq!(answer.status, 200, "{answer:?}");
}

#[tokio::test]
async fn exhausted_quota_is_429_with_retry_after_and_ratelimit_headers() {
    let stack = prod_stack().await;

    for remaining in [2, 1, 0] {
        let answer = get_with_key(&stack, "/tiny/x", KEY_GOOD).await;
        assert_eq!(answer.status, 200, "body: {}", answer.body);
        assert_eq!(answer.header_number("ratelimit-limit"), 3);
        assert_eq!(answer.header_number("ratelimit-remaining"), remaining);
    }
    let answer = get_with_key(&stack, "/tiny/x", KEY_GOOD).await;
    assert_denied(&answer, 429, "quota_exceeded");
    let retry_after = answer.header_number("retry-after");
    assert!(
        (1..=86_400).contains(&retry_after),
        "retry-after is the seconds to the day's end: {retry_after}"
    );
    assert_eq!(answer.header_number("ratelimit-limit"), 3);
    assert_eq!(answer.header_number("ratelimit-remaining"), 0);
    let reset = answer.header_number("ratelimit-reset");
    assert!((1..=86_400).contains(&reset), "ratelimit-reset: {reset}");
    assert_eq!(stack.upstream.with_path("/tiny/x").len(), 3);

    // Another product's quota is untouched.
    let answer = get_with_key(&stack, "/forecast", KEY_GOOD).await;
    assert_eq!(answer.status, 200, "body: {}", answer.body);
    assert_eq!(answer.header_number("ratelimit-remaining"), 999);

    stack
        .tollgate
        .wait_metric("tollgate_decisions_total", &[("decision", "deny")], |n| {
            n == 1.0
        })
        .await;
}

#[tokio::test]
async fn only_the_first_matching_product_is_charged() {
    let stack = prod_stack().await;

    for remaining in [1, 0] {
        let answer = get_with_key(&stack, "/shared/x", KEY_GOOD).await;
        assert_eq!(answer.status, 200, "body: {}", answer.body);
        assert_eq!(answer.header_number("ratelimit-limit"), 2);
        assert_eq!(answer.header_number("ratelimit-remaining"), remaining);
        assert_eq!(
            answer.echo_header("x-tollgate-product"),
            vec!["first_product"]
        );
    }
    // The first product is exhausted: no falling through to the second one.
    let answer = get_with_key(&stack, "/shared/x", KEY_GOOD).await;
    assert_denied(&answer, 429, "quota_exceeded");

    // The second product was never charged for /shared calls.
    let answer = get_with_key(&stack, "/second/x", KEY_GOOD).await;
    assert_eq!(answer.status, 200, "body: {}", answer.body);
    assert_eq!(
        answer.echo_header("x-tollgate-product"),
        vec!["second_product"]
    );
    assert_eq!(answer.header_number("ratelimit-limit"), 100);
    assert_eq!(answer.header_number("ratelimit-remaining"), 99);
}

#[tokio::test]
async fn a_route_without_the_api_extension_is_refused_unless_host_fallback_is_on() {
    let stack = prod_stack().await;
    let port = stack.envoy.port;
    // geo.example.test's route sets no context extension: the client's :authority must not pick the API.
    for key in [KEY_GEO, KEY_GOOD] {
        let answer = raw_request(
            port,
            "GET",
            b"/cities?q=Paris",
            "geo.example.test",
            &[("x-api-key", key)],
        );
        assert_eq!(answer.status, 403, "{answer:?}");
        let body = answer.json().expect("JSON body");
        assert_eq!(body["error"], "forbidden");
        assert!(
            body["message"]
                .as_str()
                .is_some_and(|m| m.contains("tollgate_api")),
            "{body}"
        );
    }
    assert_eq!(stack.upstream.count(), 0);
    stack
        .tollgate
        .wait_metric(
            "tollgate_decisions_total",
            &[("decision", "deny"), ("reason", "no_api")],
            |n| n == 2.0,
        )
        .await;
}

#[tokio::test]
async fn api_comes_from_the_context_extension_or_else_the_authority() {
    let config = format!("{}api_host_fallback: true\n", base_config("prod"));
    let stack = Stack::start(&config, &catalog()).await;
    let port = stack.envoy.port;
    let geo_key = [("x-api-key", KEY_GEO)];

    // With api_host_fallback, a route without the context extension takes its API from the host, with or
    // without a port.
    for host in ["geo.example.test", "geo.example.test:8443"] {
        let answer = raw_request(port, "GET", b"/cities?q=Paris", host, &geo_key);
        assert_eq!(answer.status, 200, "{host}: {answer:?}");
        let seen = stack.upstream.last().expect("the upstream saw the call");
        assert_eq!(seen.header_all("x-tollgate-app"), vec!["geoapp"]);
        assert_eq!(seen.header_all("x-tollgate-product"), vec!["geo_by_host"]);
    }
    // Same key and path on another host: the route says weatherapi, which geoapp has no product for.
    let answer = raw_request(port, "GET", b"/cities?q=Paris", "localhost", &geo_key);
    assert_eq!(answer.status, 403, "{answer:?}");
    assert_eq!(answer.json().expect("JSON body")["error"], "forbidden");
    // And weatherapp's products cover weatherapi, not the host API.
    let answer = raw_request(
        port,
        "GET",
        b"/forecast",
        "geo.example.test",
        &[("x-api-key", KEY_GOOD)],
    );
    assert_eq!(answer.status, 403, "{answer:?}");
    assert_eq!(stack.upstream.count(), 2);
}

#[tokio::test]
async fn listed_attributes_reach_the_upstream_through_envoy_metadata() {
    // Apigee's `deprecated` example: an attribute the operation carries, which Envoy turns into a header the
    // upstream can act on. Only listed attributes travel; the operation's value wins over the product's.
    let catalog = format!(
        "products:\n  - name: legacy\n    attributes: {{deprecated: 'false', tier: gold, internal: secret-plan}}\n    \
         operations:\n      - {{api: weatherapi, name: old, paths: [/v1/**], attributes: {{deprecated: 'true'}}}}\n      \
         - {{api: weatherapi, name: new, paths: [/v2/**]}}\n\
         developers:\n  - email: attr@weather.test\n    apps:\n      - name: attrapp\n        \
         products: [{{name: legacy}}]\n        keys: [{{hash: \"{}\"}}]\n",
        key_hash(KEY_GOOD)
    );
    let config = format!(
        "{}metadata_attributes: [deprecated, tier]\n",
        base_config("prod")
    );
    let tollgate = Tollgate::start(&config, &catalog).await;
    let upstream = EchoUpstream::start();
    let route =
        "                route: { cluster: upstream }\n                typed_per_filter_config:";
    let envoy_yaml = envoy_config(tollgate.grpc_port, upstream.port);
    assert!(
        envoy_yaml.contains(route),
        "the test Envoy config changed shape"
    );
    let metadata_header = |header: &str, attribute: &str| {
        format!(
            "                - header: {{ key: {header}, value: \"%DYNAMIC_METADATA(envoy.filters.http.ext_authz:attr_{attribute})%\" }}\n"
        )
    };
    let headers = format!(
        "                request_headers_to_add:\n{}{}{}",
        metadata_header("x-api-deprecated", "deprecated"),
        metadata_header("x-api-tier", "tier"),
        metadata_header("x-api-internal", "internal"),
    );
    let envoy = Envoy::start(&envoy_yaml.replacen(route, &format!("{headers}{route}"), 1)).await;
    let client = support::http_client();
    for (path, deprecated) in [("/v1/forecast", "true"), ("/v2/forecast", "false")] {
        let response = client
            .get(envoy.url(path))
            .header("x-api-key", KEY_GOOD)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200, "{path}");
        let seen = upstream.with_path(path).pop().unwrap();
        assert_eq!(seen.header("x-api-deprecated"), Some(deprecated), "{path}");
        assert_eq!(seen.header("x-api-tier"), Some("gold"), "{path}");
        assert_eq!(
            seen.header("x-api-internal").unwrap_or_default(),
            "",
            "an attribute not listed stays out of the metadata"
        );
    }
}

#[tokio::test]
async fn catalog_edits_apply_without_restart() {
    let stack = prod_stack().await;
    let answer = get_with_key(&stack, "/forecast", KEY_GOOD).await;
    assert_eq!(answer.status, 200, "body: {}", answer.body);
    let answer = get_with_key(&stack, "/forecast", KEY_SECOND).await;
    assert_denied(&answer, 401, "unauthenticated");

    // Revoke KEY_GOOD and add KEY_SECOND in one edit.
    let edited = CATALOG.replace(
        r#"- {hash: "@GOOD@", status: approved}"#,
        r#"- {hash: "@GOOD@", status: revoked}
          - {hash: "@SECOND@", status: approved}"#,
    );
    assert_ne!(edited, CATALOG, "the edit must change the catalog");
    stack.tollgate.reload_catalog(&fill(&edited)).await;

    let answer = get_with_key(&stack, "/forecast", KEY_GOOD).await;
    assert_denied(&answer, 401, "unauthenticated");
    let answer = get_with_key(&stack, "/forecast", KEY_SECOND).await;
    assert_eq!(answer.status, 200, "body: {}", answer.body);
}

#[tokio::test]
async fn broken_catalog_edits_are_rejected_and_the_old_catalog_kept() {
    let stack = prod_stack().await;
    let tollgate = &stack.tollgate;
    let generation = tollgate.catalog_generation().await;
    assert!(generation >= 1.0, "a loaded catalog has a generation");
    let errors_metric = "tollgate_catalog_reload_errors_total";
    let errors = tollgate.metric(errors_metric, &[]).await.unwrap_or(0.0);

    // Not YAML at all.
    tollgate.write_catalog("products: [ {name: broken\ndevelopers: ][\n");
    tollgate
        .wait_metric(errors_metric, &[], |n| n >= errors + 1.0)
        .await;
    let answer = get_with_key(&stack, "/forecast", KEY_GOOD).await;
    assert_eq!(answer.status, 200, "body: {}", answer.body);

    // Valid YAML, invalid catalog: an app subscribes to a product that does not exist, and the
    // edit would revoke KEY_GOOD; none of it may apply.
    let invalid = CATALOG
        .replace(
            "{name: weather_gold, status: approved}\n          - {name: tiny",
            "{name: no_such_product, status: approved}\n          - {name: tiny",
        )
        .replace(
            r#"- {hash: "@GOOD@", status: approved}"#,
            r#"- {hash: "@GOOD@", status: revoked}"#,
        );
    assert_ne!(invalid, CATALOG);
    tollgate.write_catalog(&fill(&invalid));
    tollgate
        .wait_metric(errors_metric, &[], |n| n >= errors + 2.0)
        .await;
    let answer = get_with_key(&stack, "/forecast", KEY_GOOD).await;
    assert_eq!(answer.status, 200, "body: {}", answer.body);
    assert_eq!(tollgate.catalog_generation().await, generation);

    // A good edit after the broken ones still applies.
    let revoked = CATALOG.replace(
        r#"- {hash: "@GOOD@", status: approved}"#,
        r#"- {hash: "@GOOD@", status: revoked}"#,
    );
    tollgate.reload_catalog(&fill(&revoked)).await;
    let answer = get_with_key(&stack, "/forecast", KEY_GOOD).await;
    assert_denied(&answer, 401, "unauthenticated");
}

#[tokio::test]
async fn envoy_fails_closed_when_tollgate_is_down() {
    let stack = prod_stack().await;
    let answer = get_with_key(&stack, "/forecast", KEY_GOOD).await;
    assert_eq!(answer.status, 200, "body: {}", answer.body);

    let Stack {
        envoy,
        tollgate,
        upstream,
        client,
    } = stack;
    drop(tollgate);
    let response = client
        .get(envoy.url("/forecast"))
        .header("x-api-key", KEY_GOOD)
        .send()
        .await
        .expect("request through Envoy");
    assert_eq!(response.status().as_u16(), 503);
    assert_eq!(upstream.count(), 1, "a call reached the upstream unchecked");
}

#[tokio::test]
async fn memory_quota_counters_survive_a_kill_9() {
    let mut stack = prod_stack().await;
    for remaining in [2, 1] {
        let answer = get_with_key(&stack, "/tiny/x", KEY_GOOD).await;
        assert_eq!(answer.status, 200, "body: {}", answer.body);
        assert_eq!(answer.header_number("ratelimit-remaining"), remaining);
    }
    // The counters reach metering.dir within quota.persist_interval (1 s by default).
    let saved = stack
        .tollgate
        .dir()
        .join("data")
        .join("quota-counters.json");
    poll_until("the quota counters to be saved", CHANGE_TIMEOUT, || {
        let saved = saved.clone();
        async move {
            std::fs::read_to_string(&saved)
                .ok()
                .filter(|text| text.contains("tiny") && text.contains("\"used\":2"))
        }
    })
    .await;
    stack.tollgate.kill();
    stack.tollgate.restart().await;
    let answer = get_with_key(&stack, "/tiny/x", KEY_GOOD).await;
    assert_eq!(answer.status, 200, "body: {}", answer.body);
    assert_eq!(answer.header_number("ratelimit-remaining"), 0);
    let answer = get_with_key(&stack, "/tiny/x", KEY_GOOD).await;
    assert_eq!(
        answer.status, 429,
        "a restart gave the quota back: {}",
        answer.body
    );
}
