//! JWT verification cost: RS256 and ES256, cold (signature checked on every call) and cached.
//! Run: `cargo bench --bench jwt`. Fixtures come from tests/fixtures/jwt (made by PyJWT).

use std::path::PathBuf;

use criterion::{Criterion, criterion_group, criterion_main};
use prometheus::Registry;
use serde_json::{Value, json};
use tollgate::identity::jwt::{JwtConfig, JwtMetrics, JwtVerifier, ProviderConfig};

fn fixture_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/jwt")
}

fn token(name: &str) -> String {
    let text = std::fs::read_to_string(fixture_dir().join("tokens.json")).expect("tokens.json");
    let doc: Value = serde_json::from_str(&text).expect("tokens.json is JSON");
    doc["tokens"][name]
        .as_str()
        .expect("fixture token")
        .to_owned()
}

fn provider(name: &str, key: Value) -> ProviderConfig {
    let mut value = json!({
        "name": name,
        "issuer": format!("https://{name}.example.test"),
        "audiences": ["https://api.example.test"],
    });
    for (k, v) in key.as_object().expect("object") {
        value[k] = v.clone();
    }
    serde_json::from_value(value).expect("provider config")
}

fn verifier(rt: &tokio::runtime::Runtime, cache_capacity: u64) -> JwtVerifier {
    let config = JwtConfig {
        providers: vec![
            provider("file", json!({"jwks_path": "jwks_b.json"})),
            provider("ec", json!({"public_key_path": "ec_p256.pub.pem"})),
        ],
        cache_capacity,
        ..JwtConfig::default()
    };
    let metrics = JwtMetrics::register(&Registry::new()).expect("metrics");
    rt.block_on(JwtVerifier::new(&config, &fixture_dir(), &metrics))
        .expect("verifier")
}

fn bench(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let cold = verifier(&rt, 0);
    let cached = verifier(&rt, 10_000);
    let mut group = c.benchmark_group("jwt_verify");
    for (alg, name) in [("RS256", "rs256_file_jwks_valid"), ("ES256", "es256_valid")] {
        let token = token(name);
        rt.block_on(cached.verify(&token)).expect("valid token");
        group.bench_function(format!("{alg}/cold"), |b| {
            b.to_async(&rt)
                .iter(|| async { cold.verify(&token).await.expect("valid") })
        });
        group.bench_function(format!("{alg}/cached"), |b| {
            b.to_async(&rt)
                .iter(|| async { cached.verify(&token).await.expect("valid") })
        });
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
