//! A verifier with one HS256 provider and the one token it must accept, for the `jwt` fuzz target and the
//! JWT properties (tests/properties.rs includes this file too).

use std::time::Duration;

use tollgate::identity::jwt::{JwtConfig, JwtMetrics, JwtVerifier, ProviderConfig, mint_hs256};

/// The provider's secret: 32 bytes, the least HS256 takes (RFC 7518 section 3.2).
pub const SECRET: &str = "fuzz-secret-0123456789abcdefghij";
/// Its issuer, which routes a token to it.
pub const ISSUER: &str = "https://portal.example.test";
/// Its audience.
pub const AUDIENCE: &str = "https://api.example.test";

/// The HS256 provider the tests of src/identity/jwt use, with a fixed secret.
pub fn provider() -> ProviderConfig {
    serde_json::from_value(serde_json::json!({
        "name": "portal",
        "issuer": ISSUER,
        "audiences": [AUDIENCE],
        "hs256_secret": SECRET,
    }))
    .expect("a valid provider config")
}

/// A verifier trusting [`provider`] only, with the token cache off so every call verifies for real.
pub async fn verifier() -> JwtVerifier {
    let config = JwtConfig {
        providers: vec![provider()],
        cache_capacity: 0,
        ..JwtConfig::default()
    };
    let metrics = JwtMetrics::register(&prometheus::Registry::new()).expect("fresh registry");
    JwtVerifier::new(&config, std::path::Path::new("."), &metrics)
        .await
        .expect("an HS256-only verifier builds")
}

/// A token [`verifier`] accepts for a day.
pub fn valid_token() -> String {
    mint_hs256(
        &provider(),
        "dev-1",
        Some("app-1"),
        &serde_json::Map::new(),
        Duration::from_secs(86_400),
    )
    .expect("minting with a configured secret")
}
