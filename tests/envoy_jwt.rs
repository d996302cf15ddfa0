//! JWT callers end to end through a real Envoy 1.40: tokens made by PyJWT (tests/fixtures/jwt, an
//! implementation independent of the crate under test), HS256 from a shared secret, RS256 through a JWKS
//! endpoint this test serves (and rotates), PS256 from a PEM file; apps resolved by `client_id`, product
//! scopes, portal tokens entitled by their `products` claim, and every rejection reaching the client as 401.

mod support;

use std::sync::{Arc, Mutex};

use axum::Router;
use axum::routing::get;
use serde_json::Value;
use support::{Stack, poll_until};

const FIXTURES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/jwt");

/// A token from tokens.json, by name.
fn fixture_token(name: &str) -> String {
    let text =
        std::fs::read_to_string(format!("{FIXTURES}/tokens.json")).expect("read tokens.json");
    let all: Value = serde_json::from_str(&text).expect("parse tokens.json");
    let token = &all["tokens"][name];
    token
        .as_str()
        .or_else(|| token["token"].as_str())
        .unwrap_or_else(|| panic!("no token {name} in tokens.json"))
        .to_owned()
}

fn hs256_secret() -> String {
    let text =
        std::fs::read_to_string(format!("{FIXTURES}/tokens.json")).expect("read tokens.json");
    let all: Value = serde_json::from_str(&text).expect("parse tokens.json");
    all["meta"]["hs256_secret"]
        .as_str()
        .expect("meta.hs256_secret")
        .to_owned()
}

/// A JWKS endpoint on loopback whose document the test can swap.
struct Jwks {
    port: u16,
    document: Arc<Mutex<String>>,
    task: tokio::task::JoinHandle<()>,
}

impl Jwks {
    async fn serve(file: &str) -> Jwks {
        let document = Arc::new(Mutex::new(read_jwks(file)));
        let served = document.clone();
        let app = Router::new().route(
            "/jwks",
            get(move || {
                let served = served.clone();
                async move { served.lock().expect("jwks lock").clone() }
            }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind jwks");
        let port = listener.local_addr().expect("jwks addr").port();
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Jwks {
            port,
            document,
            task,
        }
    }

    fn replace(&self, file: &str) {
        *self.document.lock().expect("jwks lock") = read_jwks(file);
    }
}

impl Drop for Jwks {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn read_jwks(file: &str) -> String {
    std::fs::read_to_string(format!("{FIXTURES}/{file}")).expect("read jwks fixture")
}

fn config(jwks_port: u16) -> String {
    format!(
        "environment: test
catalog:
  path: catalog.yaml
identity:
  api_key: {{headers: [x-api-key]}}
  jwt:
    jwks_min_refresh_interval: 1s
    providers:
      - name: portal
        issuer: https://portal.example.test
        audiences: [https://api.example.test]
        hs256_secret: {secret}
      - name: idp
        issuer: https://idp.example.test
        audiences: [https://api.example.test]
        jwks_url: http://127.0.0.1:{jwks_port}/jwks
      - name: pss
        issuer: https://pss.example.test
        audiences: [https://api.example.test]
        public_key_path: {FIXTURES}/rsa_a.pub.pem
        algorithms: [PS256]
api_context_extension: tollgate_api
quota:
  store: memory
",
        secret = hs256_secret()
    )
}

/// weatherapp is the app the fixture tokens name by `client_id`; `weather_free` wants scope `read` (the
/// tokens have `read write`), `weather_admin` wants `admin`.
const CATALOG: &str = r#"
products:
  - name: weather_free
    scopes: [read]
    quota: {limit: 1000, unit: day}
    operations:
      - {api: weatherapi, paths: [/forecast, /forecast/**], methods: [GET]}
  - name: weather_admin
    scopes: [admin]
    operations:
      - {api: weatherapi, paths: [/admin/**]}
  - name: weather_pro
    quota: {limit: 5, unit: day}
    operations:
      - {api: weatherapi, paths: [/pro/**]}
developers:
  - email: dev-ntesla
    company: theremin
    stripe_customer: cus_Ntesla0001
    apps:
      - name: weatherapp
        client_id: weatherapp
        products:
          - {name: weather_free}
          - {name: weather_admin}
"#;

async fn call(stack: &Stack, path: &str, token: &str) -> (u16, Value) {
    let response = stack
        .client
        .get(stack.url(path))
        .header("authorization", format!("Bearer {token}"))
        .send()
        .await
        .expect("request through envoy");
    let status = response.status().as_u16();
    let text = response.text().await.expect("body");
    (
        status,
        serde_json::from_str(&text).unwrap_or(Value::String(text)),
    )
}

#[tokio::test]
async fn valid_tokens_resolve_to_the_catalog_app() {
    let jwks = Jwks::serve("jwks_a.json").await;
    let stack = Stack::start(&config(jwks.port), CATALOG).await;

    for name in ["hs256_valid", "rs256_jwks_valid", "ps256_valid"] {
        let (status, body) = call(&stack, "/forecast?city=Oslo", &fixture_token(name)).await;
        assert_eq!(status, 200, "{name}: {body}");
        let seen = stack.upstream.last().expect("upstream saw the request");
        assert_eq!(seen.header("x-tollgate-app"), Some("weatherapp"), "{name}");
        assert_eq!(
            seen.header("x-tollgate-developer"),
            Some("dev-ntesla"),
            "{name}"
        );
        assert_eq!(
            seen.header("x-tollgate-product"),
            Some("weather_free"),
            "{name}"
        );
    }
    let allowed = stack
        .tollgate
        .metric(
            "tollgate_decisions_total",
            &[("decision", "allow"), ("reason", "allowed")],
        )
        .await;
    assert_eq!(allowed, Some(3.0));
}

#[tokio::test]
async fn product_scopes_are_enforced() {
    let jwks = Jwks::serve("jwks_a.json").await;
    let stack = Stack::start(&config(jwks.port), CATALOG).await;

    // `read write` covers weather_free but not weather_admin.
    let (status, body) = call(&stack, "/admin/users", &fixture_token("hs256_valid")).await;
    assert_eq!(status, 403, "{body}");
    assert_eq!(body["error"], "forbidden");
    assert_eq!(
        body["message"],
        "token has no scope that product weather_admin requires (one of: admin)"
    );
    // The same app with a token whose scope array holds `admin`.
    let (status, body) = call(&stack, "/admin/users", &fixture_token("hs256_scope_array")).await;
    assert_eq!(status, 200, "{body}");
}

#[tokio::test]
async fn every_rejection_is_a_401_that_never_echoes_the_token() {
    let jwks = Jwks::serve("jwks_a.json").await;
    let stack = Stack::start(&config(jwks.port), CATALOG).await;

    let cases = [
        ("expired", "token has expired"),
        ("not_yet_valid", "token is not valid yet"),
        ("wrong_issuer", "token issuer is not trusted"),
        ("wrong_audience", "token audience is not accepted"),
        ("alg_none", "unsigned tokens (alg none) are not accepted"),
        ("tampered_signature", "token signature is invalid"),
        ("tampered_payload", "token signature is invalid"),
        (
            "alg_confusion_pem",
            "token algorithm is not allowed for this issuer",
        ),
        (
            "alg_confusion_jwks",
            "token algorithm is not allowed for this issuer",
        ),
        ("oversized", "token is too large"),
        ("wrong_secret", "token signature is invalid"),
    ];
    for (name, message) in cases {
        let token = fixture_token(name);
        let (status, body) = call(&stack, "/forecast", &token).await;
        assert_eq!(status, 401, "{name}: {body}");
        assert_eq!(body["error"], "unauthenticated", "{name}");
        assert_eq!(body["message"], message, "{name}");
        let signature = token.rsplit('.').next().unwrap_or_default();
        assert!(
            signature.len() < 8 || !body.to_string().contains(signature),
            "{name} echoed its token"
        );
    }
    assert_eq!(
        stack.upstream.count(),
        0,
        "no rejected token reached the upstream"
    );
}

#[tokio::test]
async fn an_unknown_kid_is_accepted_once_the_jwks_rotates_it_in() {
    let jwks = Jwks::serve("jwks_a.json").await;
    let stack = Stack::start(&config(jwks.port), CATALOG).await;
    let rotated = fixture_token("rs256_jwks_rotated");

    let (status, body) = call(&stack, "/forecast", &rotated).await;
    assert_eq!(status, 401, "{body}");
    assert_eq!(body["message"], "token signing key is not known");

    jwks.replace("jwks_ab.json");
    // The refresh an unknown kid triggers is rate-limited (1 s here): poll until it happens.
    poll_until(
        "the rotated key to be accepted",
        support::CHANGE_TIMEOUT,
        || async {
            let (status, _) = call(&stack, "/forecast", &rotated).await;
            (status == 200).then_some(())
        },
    )
    .await;
    // The old key still works.
    let (status, _) = call(&stack, "/forecast", &fixture_token("rs256_jwks_valid")).await;
    assert_eq!(status, 200);
}

#[tokio::test]
async fn portal_tokens_without_an_app_are_entitled_by_their_products_claim() {
    let jwks = Jwks::serve("jwks_a.json").await;
    // No catalog app carries the token's client_id: its `api_products` claim (weather_free, weather_pro)
    // entitles it, and its company owns the quota bucket.
    let catalog = CATALOG.replace("client_id: weatherapp", "client_id: another-client");
    let token = fixture_token("hs256_valid");
    // Only from a provider that says it issues portal tokens.
    {
        let stack = Stack::start(&config(jwks.port), &catalog).await;
        let (status, body) = call(&stack, "/pro/report", &token).await;
        assert_eq!(status, 401, "{body}");
        assert_eq!(body["message"], "token's app is not registered");
        assert_eq!(stack.upstream.count(), 0);
    }
    let portal = config(jwks.port).replace(
        "        hs256_secret: ",
        "        portal_tokens: true\n        hs256_secret: ",
    );
    let stack = Stack::start(&portal, &catalog).await;

    for _ in 0..5 {
        let (status, body) = call(&stack, "/pro/report", &token).await;
        assert_eq!(status, 200, "{body}");
    }
    let seen = stack.upstream.last().expect("upstream saw the request");
    assert_eq!(seen.header("x-tollgate-app"), None);
    assert_eq!(seen.header("x-tollgate-developer"), Some("dev-ntesla"));
    assert_eq!(seen.header("x-tollgate-product"), Some("weather_pro"));
    let (status, body) = call(&stack, "/pro/report", &token).await;
    assert_eq!(status, 429, "{body}");
    // A product the token does not list is not reachable, whatever the catalog app subscribes to.
    let (status, body) = call(&stack, "/admin/users", &token).await;
    assert_eq!(status, 403, "{body}");
    assert_eq!(
        body["message"],
        "account theremin has no product for GET /admin/users on API weatherapi"
    );
}

#[tokio::test]
async fn a_missing_credential_names_both_schemes() {
    let jwks = Jwks::serve("jwks_a.json").await;
    let stack = Stack::start(&config(jwks.port), CATALOG).await;
    let response = stack
        .client
        .get(stack.url("/forecast"))
        .send()
        .await
        .expect("request");
    assert_eq!(response.status().as_u16(), 401);
    let challenge = response
        .headers()
        .get("www-authenticate")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    assert!(
        challenge.starts_with("Bearer realm=\"tollgate\""),
        "{challenge}"
    );
    assert!(challenge.contains("APIKey"), "{challenge}");
}
