//! Verifier tests against fixtures made by an independent implementation (PyJWT, tests/fixtures/jwt/generate.py),
//! RFC 7515 / RFC 8037 example vectors, and a JWKS endpoint served by the test. Compiled only under
//! `#[cfg(test)]` (see `mod tests` in mod.rs).

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header};
use prometheus::Registry;
use serde_json::{Value, json};

use super::*;

fn fixture_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/jwt")
}

fn fixture_text(name: &str) -> String {
    std::fs::read_to_string(fixture_dir().join(name)).unwrap()
}

struct Fixtures {
    tokens: HashMap<String, String>,
    secret: String,
}

fn fixtures() -> Fixtures {
    let doc: Value = serde_json::from_str(&fixture_text("tokens.json")).unwrap();
    let tokens = serde_json::from_value(doc["tokens"].clone()).unwrap();
    let secret = doc["meta"]["hs256_secret"].as_str().unwrap().to_owned();
    Fixtures { tokens, secret }
}

impl Fixtures {
    fn token(&self, name: &str) -> &str {
        self.tokens
            .get(name)
            .unwrap_or_else(|| panic!("fixture token {name} missing"))
    }
}

const AUD: &str = "https://api.example.test";

fn provider(name: &str, extra: Value) -> ProviderConfig {
    let mut value = json!({
        "name": name,
        "issuer": format!("https://{name}.example.test"),
        "audiences": [AUD, "https://second.example.test"],
    });
    for (k, v) in extra.as_object().unwrap() {
        value[k] = v.clone();
    }
    serde_json::from_value(value).unwrap()
}

/// Every fixture provider except the remote one; `jwks_url` adds `idp`.
fn config(fx: &Fixtures, jwks_url: Option<&str>) -> JwtConfig {
    let mut providers = vec![
        provider(
            "portal",
            json!({"hs256_secret": fx.secret, "portal_tokens": true, "stripe_customer_from_token": true}),
        ),
        provider(
            "pss",
            json!({"public_key_path": "rsa_a.pub.pem", "algorithms": ["PS256"]}),
        ),
        provider("ec", json!({"public_key_path": "ec_p256.pub.pem"})),
        provider("ec384", json!({"public_key_path": "ec_p384.pub.pem"})),
        provider("ed", json!({"public_key_path": "ed25519.pub.pem"})),
        provider("file", json!({"jwks_path": "jwks_b.json"})),
    ];
    if let Some(url) = jwks_url {
        providers.push(provider("idp", json!({"jwks_url": url})));
    }
    JwtConfig {
        providers,
        ..JwtConfig::default()
    }
}

async fn verifier(config: &JwtConfig) -> (JwtVerifier, Registry) {
    let registry = Registry::new();
    let metrics = JwtMetrics::register(&registry).unwrap();
    let verifier = JwtVerifier::new(config, &fixture_dir(), &metrics)
        .await
        .unwrap();
    (verifier, registry)
}

fn metric(registry: &Registry, name: &str, labels: &[(&str, &str)]) -> f64 {
    registry
        .gather()
        .iter()
        .filter(|family| family.name() == name)
        .flat_map(|family| family.get_metric().iter())
        .filter(|m| {
            labels.iter().all(|(k, v)| {
                m.get_label()
                    .iter()
                    .any(|l| l.name() == *k && l.value() == *v)
            })
        })
        .map(|m| m.get_counter().get_value() + m.get_gauge().get_value())
        .sum()
}

/// A JWKS endpoint whose document can be swapped, or taken down (503), while tokens are verified.
struct JwksServer {
    url: String,
    state: Arc<Mutex<JwksState>>,
    task: tokio::task::JoinHandle<()>,
}

struct JwksState {
    body: Option<String>,
    hits: usize,
    /// How long each answer takes.
    delay: Duration,
}

impl JwksServer {
    async fn start(body: Option<String>) -> Self {
        let state = Arc::new(Mutex::new(JwksState {
            body,
            hits: 0,
            delay: Duration::ZERO,
        }));
        let app = Router::new()
            .route("/jwks", get(serve_jwks))
            .with_state(Arc::clone(&state));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/jwks", listener.local_addr().unwrap());
        let task = tokio::spawn(async move {
            axum::serve(listener, app).await.unwrap();
        });
        Self { url, state, task }
    }

    fn serve(&self, body: Option<String>) {
        self.state.lock().unwrap().body = body;
    }

    fn hits(&self) -> usize {
        self.state.lock().unwrap().hits
    }

    fn answer_after(&self, delay: Duration) {
        self.state.lock().unwrap().delay = delay;
    }
}

impl Drop for JwksServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn serve_jwks(State(state): State<Arc<Mutex<JwksState>>>) -> Result<String, StatusCode> {
    let (body, delay) = {
        let mut state = state.lock().unwrap();
        state.hits += 1;
        (state.body.clone(), state.delay)
    };
    tokio::time::sleep(delay).await;
    body.ok_or(StatusCode::SERVICE_UNAVAILABLE)
}

/// The same token with a different header: the key lookup happens before the (now broken) signature check.
fn with_header(token: &str, header: Value) -> String {
    let rest = token.split_once('.').unwrap().1;
    format!("{}.{rest}", URL_SAFE_NO_PAD.encode(header.to_string()))
}

#[tokio::test]
async fn valid_tokens_of_every_algorithm_verify() {
    let fx = fixtures();
    let server = JwksServer::start(Some(fixture_text("jwks_a.json"))).await;
    let (verifier, registry) = verifier(&config(&fx, Some(&server.url))).await;
    for (name, provider) in [
        ("hs256_valid", "portal"),
        ("hs256_scope_array", "portal"),
        ("hs256_minimal", "portal"),
        ("rs256_jwks_valid", "idp"),
        ("rs256_jwks_no_kid", "idp"),
        ("es256_jwks_valid", "idp"),
        ("rs256_file_jwks_valid", "file"),
        ("ps256_valid", "pss"),
        ("es256_valid", "ec"),
        ("es384_valid", "ec384"),
        ("eddsa_valid", "ed"),
    ] {
        let verified = verifier
            .verify(fx.token(name))
            .await
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(&*verified.provider, provider, "{name}");
        assert_eq!(verified.expires_at, 4102444800, "{name}");
    }
    assert_eq!(
        metric(
            &registry,
            "jwt_verifications_total",
            &[("outcome", "valid")]
        ),
        11.0
    );
    assert_eq!(
        metric(&registry, "jwt_jwks_keys", &[("provider", "idp")]),
        2.0
    );

    let full = verifier.verify(fx.token("hs256_valid")).await.unwrap();
    assert_eq!(full.subject.as_deref(), Some("dev-ntesla"));
    assert_eq!(full.developer.as_deref(), Some("dev-ntesla"));
    assert_eq!(full.app.as_deref(), Some("weatherapp"));
    assert_eq!(full.company.as_deref(), Some("theremin"));
    assert_eq!(full.products, ["weather_free", "weather_pro"]);
    assert_eq!(full.scopes, ["read", "write"]);
    assert_eq!(full.stripe_customer.as_deref(), Some("cus_Ntesla0001"));

    let array = verifier
        .verify(fx.token("hs256_scope_array"))
        .await
        .unwrap();
    assert_eq!(array.scopes, ["read", "admin"]);
    assert_eq!(array.products, ["weather_free"]);

    let minimal = verifier.verify(fx.token("hs256_minimal")).await.unwrap();
    assert_eq!(
        (minimal.app.as_deref(), minimal.company.as_deref()),
        (None, None)
    );
    assert!(minimal.products.is_empty() && minimal.scopes.is_empty());
}

#[tokio::test]
async fn every_rejection_from_the_fixtures() {
    let fx = fixtures();
    let server = JwksServer::start(Some(fixture_text("jwks_a.json"))).await;
    let (verifier, registry) = verifier(&config(&fx, Some(&server.url))).await;
    use JwtRejection::*;
    let cases = [
        ("expired", Expired),
        ("not_yet_valid", NotYetValid),
        ("missing_exp", MissingClaim("exp")),
        ("wrong_issuer", UntrustedIssuer),
        ("issuer_trailing_slash", UntrustedIssuer),
        ("wrong_audience", WrongAudience),
        ("missing_audience", MissingClaim("aud")),
        ("alg_none", AlgNone),
        ("alg_none_idp", AlgNone),
        ("wrong_secret", InvalidSignature),
        ("tampered_signature", InvalidSignature),
        ("tampered_payload", InvalidSignature),
        ("alg_confusion_pem", AlgorithmNotAllowed),
        ("alg_confusion_jwks", AlgorithmNotAllowed),
        ("rs256_to_ps256_provider", AlgorithmNotAllowed),
        ("rs256_kid_of_other_provider", UnknownKey),
        ("crit_header", UnsupportedCritical),
        ("oversized", Oversized),
    ];
    for (name, want) in &cases {
        let token = fx.token(name);
        let got = verifier.verify(token).await.map(|_| ()).unwrap_err();
        assert_eq!(&got, want, "{name}");
        let message = got.to_string();
        for part in token.split('.').filter(|p| p.len() > 8) {
            assert!(!message.contains(part), "{name}: message echoes the token");
        }
        assert!(
            !message.contains("dev-ntesla") && !message.contains(&fx.secret),
            "{name}: {message}"
        );
    }
    assert_eq!(
        metric(
            &registry,
            "jwt_verifications_total",
            &[("outcome", "valid")]
        ),
        0.0
    );
    assert_eq!(
        metric(&registry, "jwt_verifications_total", &[]),
        cases.len() as f64
    );
    assert_eq!(
        metric(
            &registry,
            "jwt_verifications_total",
            &[("provider", "none"), ("outcome", "alg_none")]
        ),
        2.0
    );
    assert_eq!(
        metric(
            &registry,
            "jwt_verifications_total",
            &[("provider", "pss"), ("outcome", "algorithm_not_allowed")]
        ),
        2.0
    );
}

#[tokio::test]
async fn junk_is_refused_before_any_key_is_tried() {
    let fx = fixtures();
    let (verifier, _registry) = verifier(&config(&fx, None)).await;
    for junk in [
        "",
        "abc",
        "a.b.c",
        "....",
        "Bearer x.y.z",
        "eyJhbGciOiJIUzI1NiJ9.e30.x",
    ] {
        assert!(verifier.verify(junk).await.is_err(), "{junk:?}");
    }
    let valid = fx.token("hs256_valid");
    let none_upper = with_header(valid, json!({"alg": "NONE"}));
    assert_eq!(
        verifier.verify(&none_upper).await.unwrap_err(),
        JwtRejection::AlgNone
    );
    let unsigned = format!("{}.", valid.rsplit_once('.').unwrap().0);
    assert_eq!(
        verifier.verify(&unsigned).await.unwrap_err(),
        JwtRejection::InvalidSignature
    );
    let hs512 = with_header(valid, json!({"alg": "HS512"}));
    assert_eq!(
        verifier.verify(&hs512).await.unwrap_err(),
        JwtRejection::AlgorithmNotAllowed
    );
}

#[tokio::test]
async fn verified_tokens_are_cached_by_hash() {
    let fx = fixtures();
    let (verifier, registry) = verifier(&config(&fx, None)).await;
    let token = fx.token("es256_valid");
    let first = verifier.verify(token).await.unwrap();
    assert_eq!(metric(&registry, "jwt_cache_hits_total", &[]), 0.0);
    let second = verifier.verify(token).await.unwrap();
    assert!(
        Arc::ptr_eq(&first, &second),
        "the second answer comes from the cache"
    );
    assert_eq!(
        metric(&registry, "jwt_cache_hits_total", &[("provider", "ec")]),
        1.0
    );
    assert_eq!(
        metric(
            &registry,
            "jwt_verifications_total",
            &[("provider", "ec"), ("outcome", "valid")]
        ),
        2.0
    );

    // A rejected token is never cached, so a tampered copy is checked every time.
    let forged = fx.token("wrong_secret");
    for _ in 0..2 {
        assert_eq!(
            verifier.verify(forged).await.unwrap_err(),
            JwtRejection::InvalidSignature
        );
    }

    let no_cache = JwtConfig {
        cache_capacity: 0,
        ..config(&fx, None)
    };
    let (uncached, registry) = super::tests::verifier(&no_cache).await;
    let a = uncached.verify(token).await.unwrap();
    let b = uncached.verify(token).await.unwrap();
    assert!(!Arc::ptr_eq(&a, &b));
    assert_eq!(metric(&registry, "jwt_cache_hits_total", &[]), 0.0);
}

fn hs256(secret: &str, claims: Value) -> String {
    jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        &claims,
        &EncodingKey::from_secret(secret.as_bytes()),
    )
    .unwrap()
}

#[tokio::test]
async fn leeway_applies_to_exp_and_nbf_and_the_cache_stops_at_exp() {
    let fx = fixtures();
    let now = unix_now();
    let claims = |exp: i64, nbf: Option<i64>| {
        let mut c =
            json!({"iss": "https://portal.example.test", "aud": AUD, "sub": "s", "exp": exp});
        if let Some(nbf) = nbf {
            c["nbf"] = nbf.into();
        }
        c
    };
    let just_expired = hs256(&fx.secret, claims(now - 10, None));
    let long_expired = hs256(&fx.secret, claims(now - 100, None));
    let soon_valid = hs256(&fx.secret, claims(now + 3600, Some(now + 10)));
    let later_valid = hs256(&fx.secret, claims(now + 3600, Some(now + 100)));

    let (verifier, registry) = verifier(&config(&fx, None)).await;
    assert!(verifier.verify(&just_expired).await.is_ok());
    assert!(verifier.verify(&just_expired).await.is_ok());
    assert_eq!(
        metric(&registry, "jwt_cache_hits_total", &[]),
        0.0,
        "past exp: never cached"
    );
    assert_eq!(
        verifier.verify(&long_expired).await.unwrap_err(),
        JwtRejection::Expired
    );
    assert!(verifier.verify(&soon_valid).await.is_ok());
    assert_eq!(
        verifier.verify(&later_valid).await.unwrap_err(),
        JwtRejection::NotYetValid
    );

    let strict = JwtConfig {
        leeway: Duration::ZERO,
        ..config(&fx, None)
    };
    let (strict, _registry) = super::tests::verifier(&strict).await;
    assert_eq!(
        strict.verify(&just_expired).await.unwrap_err(),
        JwtRejection::Expired
    );
    assert_eq!(
        strict.verify(&soon_valid).await.unwrap_err(),
        JwtRejection::NotYetValid
    );
}

#[tokio::test]
async fn jwks_rotation_outage_and_recovery() {
    let fx = fixtures();
    let server = JwksServer::start(Some(fixture_text("jwks_a.json"))).await;
    let cfg = JwtConfig {
        jwks_min_refresh_interval: Duration::ZERO,
        ..config(&fx, Some(&server.url))
    };
    let (verifier, registry) = verifier(&cfg).await;
    assert_eq!(server.hits(), 1, "fetched at start");
    let old = fx.token("rs256_jwks_valid");
    let rotated = fx.token("rs256_jwks_rotated");
    let junk_kid = with_header(old, json!({"alg": "RS256", "kid": "junk"}));

    assert!(verifier.verify(old).await.is_ok());
    assert_eq!(
        verifier.verify(rotated).await.unwrap_err(),
        JwtRejection::UnknownKey
    );
    assert_eq!(server.hits(), 2, "an unknown kid triggered a refresh");

    // The IdP rotates in key b: the unknown kid refreshes the set and the new token verifies.
    server.serve(Some(fixture_text("jwks_ab.json")));
    assert_eq!(
        verifier.verify(rotated).await.unwrap().subject.as_deref(),
        Some("dev-rotated")
    );
    assert_eq!(server.hits(), 3);
    assert_eq!(
        metric(&registry, "jwt_jwks_keys", &[("provider", "idp")]),
        3.0
    );

    // The IdP goes down: fetches fail, the last good set keeps answering.
    server.serve(None);
    assert_eq!(
        verifier.verify(&junk_kid).await.unwrap_err(),
        JwtRejection::UnknownKey
    );
    assert_eq!(server.hits(), 4);
    assert_eq!(
        metric(
            &registry,
            "jwt_jwks_fetches_total",
            &[("provider", "idp"), ("result", "error")]
        ),
        1.0
    );
    assert!(verifier.verify(fx.token("es256_jwks_valid")).await.is_ok());
    assert!(verifier.verify(rotated).await.is_ok());
    assert_eq!(
        metric(&registry, "jwt_jwks_keys", &[("provider", "idp")]),
        3.0
    );

    // It comes back having retired key a: tokens signed with a, even cached ones, stop verifying.
    server.serve(Some(fixture_text("jwks_b.json")));
    assert_eq!(
        verifier.verify(&junk_kid).await.unwrap_err(),
        JwtRejection::UnknownKey
    );
    assert_eq!(server.hits(), 5);
    // Its cached verification is stale (the key set changed), and its kid now triggers a refresh like any other.
    assert_eq!(
        verifier.verify(old).await.unwrap_err(),
        JwtRejection::UnknownKey
    );
    assert_eq!(server.hits(), 6);
    assert!(verifier.verify(rotated).await.is_ok());
    assert_eq!(
        metric(
            &registry,
            "jwt_jwks_fetches_total",
            &[("provider", "idp"), ("result", "ok")]
        ),
        5.0
    );
}

#[tokio::test]
async fn unknown_kids_cannot_hammer_the_idp() {
    let fx = fixtures();
    let server = JwksServer::start(Some(fixture_text("jwks_a.json"))).await;
    let cfg = JwtConfig {
        jwks_min_refresh_interval: Duration::from_secs(3600),
        ..config(&fx, Some(&server.url))
    };
    let (verifier, _registry) = verifier(&cfg).await;
    let valid = fx.token("rs256_jwks_valid");
    for i in 0..25 {
        let junk = with_header(valid, json!({"alg": "RS256", "kid": format!("junk-{i}")}));
        assert_eq!(
            verifier.verify(&junk).await.unwrap_err(),
            JwtRejection::UnknownKey
        );
    }
    assert_eq!(server.hits(), 1, "only the start-up fetch reached the IdP");
    assert!(verifier.verify(valid).await.is_ok());
}

#[tokio::test]
async fn a_failed_first_fetch_is_not_fatal() {
    let fx = fixtures();
    let server = JwksServer::start(None).await;
    let cfg = JwtConfig {
        jwks_min_refresh_interval: Duration::ZERO,
        ..config(&fx, Some(&server.url))
    };
    let (verifier, registry) = verifier(&cfg).await;
    let token = fx.token("rs256_jwks_valid");
    assert_eq!(
        verifier.verify(token).await.unwrap_err(),
        JwtRejection::KeysUnavailable
    );
    assert_eq!(
        metric(&registry, "jwt_jwks_fetches_total", &[("result", "error")]),
        2.0
    );
    assert!(
        verifier.verify(fx.token("hs256_valid")).await.is_ok(),
        "other providers work meanwhile"
    );
    server.serve(Some(fixture_text("jwks_a.json")));
    assert!(verifier.verify(token).await.is_ok());
}

#[tokio::test]
async fn an_unknown_kid_fetch_outlives_a_cancelled_check_and_answers_unavailable_meanwhile() {
    let fx = fixtures();
    let server = JwksServer::start(Some(fixture_text("jwks_a.json"))).await;
    let cfg = JwtConfig {
        jwks_min_refresh_interval: Duration::ZERO,
        ..config(&fx, Some(&server.url))
    };
    let (verifier, _registry) = verifier(&cfg).await;
    let rotated = fx.token("rs256_jwks_rotated");
    server.serve(Some(fixture_text("jwks_ab.json")));
    server.answer_after(Duration::from_millis(1_500));
    // Envoy's ext_authz timeout drops the Check while the fetch runs.
    let cancelled = tokio::time::timeout(Duration::from_millis(50), verifier.verify(rotated)).await;
    assert!(cancelled.is_err(), "the check should still be waiting");
    // The fetch goes on: meanwhile the same token is "try again", not "unknown key".
    assert_eq!(
        verifier.verify(rotated).await.unwrap_err(),
        JwtRejection::KeysUnavailable
    );
    assert_eq!(server.hits(), 2, "one shared fetch, not one per check");
    let mut outcome = verifier.verify(rotated).await;
    for _ in 0..40 {
        if outcome.is_ok() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        outcome = verifier.verify(rotated).await;
    }
    assert!(outcome.is_ok(), "{outcome:?}");
}

#[tokio::test]
async fn keys_rotate_through_the_periodic_refresh() {
    let fx = fixtures();
    let server = JwksServer::start(Some(fixture_text("jwks_a.json"))).await;
    // Unknown kids may not trigger a fetch for an hour; only the 1 s periodic refresh can bring key b.
    let cfg = JwtConfig {
        jwks_min_refresh_interval: Duration::from_secs(3600),
        jwks_refresh_interval: Duration::from_secs(1),
        ..config(&fx, Some(&server.url))
    };
    let (verifier, _registry) = verifier(&cfg).await;
    let rotated = fx.token("rs256_jwks_rotated");
    assert_eq!(
        verifier.verify(rotated).await.unwrap_err(),
        JwtRejection::UnknownKey
    );
    server.serve(Some(fixture_text("jwks_ab.json")));
    let start = server.hits();
    for _ in 0..100 {
        if server.hits() > start {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(server.hits() > start, "the periodic refresh ran");
    // The fetch that was counted may still be parsing; give it a moment to land.
    let mut outcome = verifier.verify(rotated).await;
    for _ in 0..20 {
        if outcome.is_ok() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        outcome = verifier.verify(rotated).await;
    }
    assert!(outcome.is_ok(), "{outcome:?}");
}

async fn build_error(config: &JwtConfig) -> String {
    let registry = Registry::new();
    let metrics = JwtMetrics::register(&registry).unwrap();
    match JwtVerifier::new(config, &fixture_dir(), &metrics).await {
        Ok(_) => panic!("config was accepted"),
        Err(e) => e.to_string(),
    }
}

#[tokio::test]
async fn unsafe_provider_configs_are_refused() {
    let fx = fixtures();
    let one = |p: ProviderConfig| JwtConfig {
        providers: vec![p],
        ..JwtConfig::default()
    };
    let cases = [
        (
            provider(
                "x",
                json!({"public_key_path": "rsa_a.pub.pem", "algorithms": ["RS256", "HS256"]}),
            ),
            "algorithm confusion",
        ),
        (
            provider(
                "x",
                json!({"public_key_path": "ec_p256.pub.pem", "algorithms": ["ES384"]}),
            ),
            "does not fit a P-256 key",
        ),
        (
            provider(
                "x",
                json!({"hs256_secret": fx.secret, "algorithms": ["RS256"]}),
            ),
            "does not fit an HMAC secret",
        ),
        (
            provider(
                "x",
                json!({"jwks_url": "https://idp.example.test/jwks", "algorithms": ["HS256"]}),
            ),
            "shared secret",
        ),
        (
            provider("x", json!({"jwks_url": "http://idp.example.test/jwks"})),
            "https",
        ),
        (
            provider(
                "x",
                json!({"hs256_secret": fx.secret, "jwks_path": "jwks_a.json"}),
            ),
            "exactly one",
        ),
        (provider("x", json!({})), "exactly one"),
        (provider("x", json!({"hs256_secret": ""})), "empty"),
        (
            provider("x", json!({"hs256_secret": "short-secret"})),
            "at least 32",
        ),
        (
            provider(
                "x",
                json!({"hs256_secret": fx.secret, "algorithms": ["HS512"]}),
            ),
            "at least 64",
        ),
        (
            provider(
                "x",
                json!({"hs256_secret": fx.secret, "algorithms": ["none"]}),
            ),
            "never allowed",
        ),
        (
            provider("x", json!({"hs256_secret": fx.secret, "algorithms": []})),
            "algorithms is empty",
        ),
        (
            provider("x", json!({"hs256_secret": fx.secret, "audiences": []})),
            "audiences",
        ),
        (
            provider("x", json!({"public_key_path": "missing.pem"})),
            "cannot read",
        ),
        (
            provider("x", json!({"public_key_path": "jwks_a.json"})),
            "no RSA",
        ),
    ];
    for (p, want) in cases {
        let message = build_error(&one(p)).await;
        assert!(message.contains(want), "want {want:?} in {message:?}");
        assert!(message.contains("provider x"), "{message}");
        assert!(!message.contains(&fx.secret), "{message}");
    }
    let twice = JwtConfig {
        providers: vec![
            provider("a", json!({"hs256_secret": fx.secret})),
            provider("a", json!({"hs256_secret": fx.secret})),
        ],
        ..JwtConfig::default()
    };
    assert!(build_error(&twice).await.contains("name is used"));
    let mut same_issuer = provider("b", json!({"hs256_secret": fx.secret}));
    same_issuer.issuer = "https://a.example.test".into();
    let clash = JwtConfig {
        providers: vec![
            provider("a", json!({"hs256_secret": fx.secret})),
            same_issuer,
        ],
        ..JwtConfig::default()
    };
    assert!(build_error(&clash).await.contains("issuer is used"));
}

#[tokio::test]
async fn minted_tokens_verify() {
    let fx = fixtures();
    let cfg = config(&fx, None);
    let portal = &cfg.providers[0];
    let extra = json!({"org_id": "theremin", "scope": "read"})
        .as_object()
        .unwrap()
        .clone();
    let token = mint_hs256(
        portal,
        "dev-1",
        Some("weatherapp"),
        &extra,
        Duration::from_secs(600),
    )
    .unwrap();
    let (verifier, _registry) = verifier(&cfg).await;
    let verified = verifier.verify(&token).await.unwrap();
    assert_eq!(verified.developer.as_deref(), Some("dev-1"));
    assert_eq!(verified.app.as_deref(), Some("weatherapp"));
    assert_eq!(verified.company.as_deref(), Some("theremin"));
    assert_eq!(verified.scopes, ["read"]);
    assert!((verified.expires_at - unix_now() - 600).abs() <= 5);

    let no_secret = mint_hs256(
        &cfg.providers[1],
        "d",
        None,
        &serde_json::Map::new(),
        Duration::from_secs(60),
    );
    assert!(matches!(no_secret, Err(MintError::NoSecret(_))));
    let reserved = json!({"exp": 1}).as_object().unwrap().clone();
    assert!(matches!(
        mint_hs256(portal, "d", None, &reserved, Duration::from_secs(60)),
        Err(MintError::ReservedClaim(_))
    ));
    assert!(matches!(
        mint_hs256(portal, "d", None, &serde_json::Map::new(), Duration::ZERO),
        Err(MintError::ZeroTtl)
    ));
}

fn rfc_vectors() -> Value {
    serde_json::from_str(&fixture_text("rfc_vectors.json")).unwrap()
}

fn decoding_key(jwk: &Value) -> DecodingKey {
    let s = |k: &str| jwk[k].as_str().unwrap();
    match s("kty") {
        "oct" => DecodingKey::from_secret(&URL_SAFE_NO_PAD.decode(s("k")).unwrap()),
        "RSA" => DecodingKey::from_rsa_components(s("n"), s("e")).unwrap(),
        "EC" => DecodingKey::from_ec_components(s("x"), s("y")).unwrap(),
        "OKP" => DecodingKey::from_ed_components(s("x")).unwrap(),
        other => panic!("kty {other}"),
    }
}

/// The RFC examples expired in 2011 (and RFC 8037's payload is not a claims set), so their signatures are checked
/// with jsonwebtoken's low-level `crypto::verify`, which applies no claim rules.
#[test]
fn rfc_example_signatures_verify_with_the_backend() {
    let vectors = rfc_vectors();
    for (name, alg) in [
        ("rfc7515_a1_hs256", Algorithm::HS256),
        ("rfc7515_a2_rs256", Algorithm::RS256),
        ("rfc7515_a3_es256", Algorithm::ES256),
        ("rfc8037_a4_eddsa", Algorithm::EdDSA),
    ] {
        let vector = &vectors[name];
        let key = decoding_key(&vector["jwk"]);
        let (message, signature) = vector["token"].as_str().unwrap().rsplit_once('.').unwrap();
        assert!(
            jsonwebtoken::crypto::verify(signature, message.as_bytes(), &key, alg).unwrap(),
            "{name}"
        );
        let altered = format!("{message}A");
        assert!(
            !jsonwebtoken::crypto::verify(signature, altered.as_bytes(), &key, alg)
                .unwrap_or(false),
            "{name}"
        );
    }
}

/// Through the whole verifier the RFC 7515 RS256 and ES256 examples pass the signature check and then fail on the
/// claim rules (they carry no `aud`), while a flipped signature fails first; the unsecured A.5 is refused as none.
#[tokio::test]
async fn rfc_examples_through_the_verifier() {
    let vectors = rfc_vectors();
    let dir = tempfile::tempdir().unwrap();
    let jwks = json!({"keys": [
        {"kid": "rsa", "alg": "RS256", "kty": "RSA", "n": vectors["rfc7515_a2_rs256"]["jwk"]["n"], "e": "AQAB"},
        {"kid": "ec", "kty": "EC", "crv": "P-256", "x": vectors["rfc7515_a3_es256"]["jwk"]["x"],
         "y": vectors["rfc7515_a3_es256"]["jwk"]["y"]},
    ]});
    std::fs::write(dir.path().join("rfc.json"), jwks.to_string()).unwrap();
    let joe: ProviderConfig = serde_json::from_value(json!({
        "name": "joe", "issuer": "joe", "audiences": [AUD], "jwks_path": "rfc.json"
    }))
    .unwrap();
    let cfg = JwtConfig {
        providers: vec![joe],
        ..JwtConfig::default()
    };
    let registry = Registry::new();
    let verifier = JwtVerifier::new(&cfg, dir.path(), &JwtMetrics::register(&registry).unwrap())
        .await
        .unwrap();
    for name in ["rfc7515_a2_rs256", "rfc7515_a3_es256"] {
        let token = vectors[name]["token"].as_str().unwrap();
        assert_eq!(
            verifier.verify(token).await.unwrap_err(),
            JwtRejection::MissingClaim("aud"),
            "{name}"
        );
        let (head, sig) = token.rsplit_once('.').unwrap();
        let flipped = format!(
            "{head}.{}{}",
            if sig.starts_with('A') { "B" } else { "A" },
            &sig[1..]
        );
        assert_eq!(
            verifier.verify(&flipped).await.unwrap_err(),
            JwtRejection::InvalidSignature,
            "{name}"
        );
    }
    let unsecured = vectors["rfc7515_a5_none"]["token"].as_str().unwrap();
    assert_eq!(
        verifier.verify(unsecured).await.unwrap_err(),
        JwtRejection::AlgNone
    );
}

/// A compact HS256 token with exactly this header and payload, signed with `secret`.
fn signed_hs256(header: Value, payload: Value, secret: &str) -> String {
    use base64::Engine as _;
    let b64 = |v: &Value| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.to_string());
    let message = format!("{}.{}", b64(&header), b64(&payload));
    let key = jsonwebtoken::EncodingKey::from_secret(secret.as_bytes());
    let signature =
        jsonwebtoken::crypto::sign(message.as_bytes(), &key, jsonwebtoken::Algorithm::HS256)
            .unwrap();
    format!("{message}.{signature}")
}

const STRICT_SECRET: &str = "a-strict-provider-secret-of-32-bytes!!";

async fn strict_verifier(extra: Value) -> JwtVerifier {
    let mut settings = json!({"hs256_secret": STRICT_SECRET});
    for (k, v) in extra.as_object().unwrap() {
        settings[k] = v.clone();
    }
    let config = JwtConfig {
        providers: vec![provider("strict", settings)],
        ..JwtConfig::default()
    };
    verifier(&config).await.0
}

fn strict_claims(iat: Option<i64>, exp: i64) -> Value {
    let mut claims =
        json!({"iss": "https://strict.example.test", "aud": AUD, "sub": "s", "exp": exp});
    if let Some(iat) = iat {
        claims["iat"] = json!(iat);
    }
    claims
}

#[tokio::test]
async fn typ_is_checked_only_when_the_provider_names_one() {
    let now = unix_now();
    let claims = strict_claims(Some(now), now + 600);
    let sign = |typ: Option<&str>| {
        let mut header = json!({"alg": "HS256"});
        if let Some(typ) = typ {
            header["typ"] = json!(typ);
        }
        signed_hs256(header, claims.clone(), STRICT_SECRET)
    };
    let any = strict_verifier(json!({})).await;
    for typ in [None, Some("JWT"), Some("at+jwt")] {
        assert!(any.verify(&sign(typ)).await.is_ok(), "{typ:?}");
    }
    let at = strict_verifier(json!({"typ": "at+jwt"})).await;
    assert!(at.verify(&sign(Some("at+jwt"))).await.is_ok());
    assert!(at.verify(&sign(Some("application/AT+JWT"))).await.is_ok());
    for typ in [None, Some("JWT"), Some("id+jwt")] {
        assert_eq!(
            at.verify(&sign(typ)).await.unwrap_err(),
            JwtRejection::WrongType,
            "{typ:?}"
        );
    }
}

#[tokio::test]
async fn tokens_issued_in_the_future_or_living_too_long_are_refused() {
    let now = unix_now();
    let header = json!({"alg": "HS256"});
    let plain = strict_verifier(json!({})).await;
    let future = signed_hs256(
        header.clone(),
        strict_claims(Some(now + 3_600), now + 7_200),
        STRICT_SECRET,
    );
    assert_eq!(
        plain.verify(&future).await.unwrap_err(),
        JwtRejection::IssuedInFuture
    );
    let within_leeway = signed_hs256(
        header.clone(),
        strict_claims(Some(now + 10), now + 600),
        STRICT_SECRET,
    );
    assert!(plain.verify(&within_leeway).await.is_ok());
    let bad_iat = signed_hs256(
        header.clone(),
        json!({"iss": "https://strict.example.test", "aud": AUD, "exp": now + 60, "iat": "yesterday"}),
        STRICT_SECRET,
    );
    assert_eq!(
        plain.verify(&bad_iat).await.unwrap_err(),
        JwtRejection::InvalidClaim("iat")
    );

    let bounded = strict_verifier(json!({"max_token_lifetime": "1h"})).await;
    let day = signed_hs256(
        header.clone(),
        strict_claims(Some(now), now + 86_400),
        STRICT_SECRET,
    );
    assert_eq!(
        bounded.verify(&day).await.unwrap_err(),
        JwtRejection::LifetimeTooLong
    );
    // Without iat the lifetime left is what counts.
    let day_no_iat = signed_hs256(
        header.clone(),
        strict_claims(None, now + 86_400),
        STRICT_SECRET,
    );
    assert_eq!(
        bounded.verify(&day_no_iat).await.unwrap_err(),
        JwtRejection::LifetimeTooLong
    );
    let hour = signed_hs256(header, strict_claims(Some(now), now + 3_000), STRICT_SECRET);
    assert!(bounded.verify(&hour).await.is_ok());
    assert!(
        plain.verify(&day).await.is_ok(),
        "no bound without max_token_lifetime"
    );
}

#[tokio::test]
async fn key_carrying_headers_are_ignored() {
    let now = unix_now();
    let claims = strict_claims(Some(now), now + 600);
    let verifier = strict_verifier(json!({})).await;
    // An attacker's own key, offered in the header: the signature is checked with the configured key only.
    let attacker_secret = "the-attackers-own-secret-of-32-bytes!!";
    let forged_headers = [
        json!({"alg": "HS256", "jwk": {"kty": "oct", "k": "dGhlLWF0dGFja2Vycy1vd24tc2VjcmV0LW9mLTMyLWJ5dGVzISE"}}),
        json!({"alg": "HS256", "jku": "http://127.0.0.1:9/jwks.json"}),
        json!({"alg": "HS256", "x5u": "http://127.0.0.1:9/cert.pem"}),
        json!({"alg": "HS256", "x5c": ["MIIB"]}),
    ];
    for header in &forged_headers {
        let forged = signed_hs256(header.clone(), claims.clone(), attacker_secret);
        assert_eq!(
            verifier.verify(&forged).await.unwrap_err(),
            JwtRejection::InvalidSignature,
            "{header}"
        );
        // Signed with the provider's key, the same headers change nothing: nothing is fetched or used.
        let genuine = signed_hs256(header.clone(), claims.clone(), STRICT_SECRET);
        assert!(verifier.verify(&genuine).await.is_ok(), "{header}");
    }
}
