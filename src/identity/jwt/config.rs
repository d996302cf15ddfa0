//! `identity.jwt` in the config file: providers, their key sources and the verifier's limits.

use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Deserializer};

/// `identity.jwt` in the config file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JwtConfig {
    /// Trusted token issuers; a token is routed to the one whose `issuer` equals its `iss`.
    #[serde(default)]
    pub providers: Vec<ProviderConfig>,
    /// Clock skew tolerated on `exp` and `nbf`.
    #[serde(default = "default_leeway", deserialize_with = "duration")]
    pub leeway: Duration,
    /// Larger tokens are refused before any parsing.
    #[serde(default = "default_max_token_bytes")]
    pub max_token_bytes: usize,
    /// Least time between two JWKS fetches triggered by unknown `kid`s or failed fetches.
    #[serde(default = "default_min_refresh", deserialize_with = "duration")]
    pub jwks_min_refresh_interval: Duration,
    /// Period of the background JWKS refresh, so keys rotate without a restart.
    #[serde(
        default = "default_refresh",
        alias = "jwks_ttl",
        deserialize_with = "duration"
    )]
    pub jwks_refresh_interval: Duration,
    /// Whole-request timeout of one JWKS fetch.
    #[serde(default = "default_fetch_timeout", deserialize_with = "duration")]
    pub jwks_fetch_timeout: Duration,
    /// Verified tokens kept in memory; 0 turns the cache off.
    #[serde(default = "default_cache_capacity")]
    pub cache_capacity: u64,
    /// Longest time a verified token is served from the cache, whatever its `exp`.
    #[serde(default = "default_cache_max_ttl", deserialize_with = "duration")]
    pub cache_max_ttl: Duration,
}

impl Default for JwtConfig {
    fn default() -> Self {
        Self {
            providers: Vec::new(),
            leeway: default_leeway(),
            max_token_bytes: default_max_token_bytes(),
            jwks_min_refresh_interval: default_min_refresh(),
            jwks_refresh_interval: default_refresh(),
            jwks_fetch_timeout: default_fetch_timeout(),
            cache_capacity: default_cache_capacity(),
            cache_max_ttl: default_cache_max_ttl(),
        }
    }
}

/// One trusted issuer: `identity.jwt.providers[]`.
#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProviderConfig {
    /// Short name used in metrics, logs and `VerifiedToken::provider`.
    pub name: String,
    /// Exact `iss` value of this provider's tokens.
    pub issuer: String,
    /// A token's `aud` must contain one of these exactly.
    pub audiences: Vec<String>,
    /// Shared HMAC secret (HS256 by default; HS384/HS512 via `algorithms`).
    #[serde(default)]
    pub hs256_secret: Option<String>,
    /// PEM public key (SPKI `PUBLIC KEY`, or PKCS#1 `RSA PUBLIC KEY`): RSA, P-256, P-384 or Ed25519.
    #[serde(default)]
    pub public_key_path: Option<PathBuf>,
    /// Local JWKS file, read once at start.
    #[serde(default)]
    pub jwks_path: Option<PathBuf>,
    /// Remote JWKS: https, or http for loopback hosts only.
    #[serde(default)]
    pub jwks_url: Option<String>,
    /// Allow-list of `alg` values; absent means what the key type implies.
    #[serde(default)]
    pub algorithms: Option<Vec<String>>,
    /// Which claims carry app, developer, company, products, scopes and Stripe customer.
    #[serde(default)]
    pub claims: ClaimNames,
    /// Required `typ` header (e.g. `at+jwt` for RFC 9068 access tokens); absent: any or none. Compared
    /// case-insensitively, with or without the `application/` prefix (RFC 7515 section 4.1.9).
    #[serde(default)]
    pub typ: Option<String>,
    /// Longest accepted lifetime (`exp` minus `iat`, or minus now without `iat`): a leaked long-lived token
    /// is refused even though it verifies.
    #[serde(default, deserialize_with = "optional_duration")]
    pub max_token_lifetime: Option<Duration>,
    /// Whether this provider issues portal tokens: tokens that name no catalog app and are entitled by their
    /// products claim. Off, such a token is refused as naming an unregistered app.
    #[serde(default)]
    pub portal_tokens: bool,
    /// Whether a portal token's Stripe customer claim is believed. Off, the customer comes from the catalog
    /// developer whose e-mail is the token's developer: a token must not choose whom usage is billed to.
    #[serde(default)]
    pub stripe_customer_from_token: bool,
}

impl fmt::Debug for ProviderConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ProviderConfig")
            .field("name", &self.name)
            .field("issuer", &self.issuer)
            .field("audiences", &self.audiences)
            .field(
                "hs256_secret",
                &self.hs256_secret.as_ref().map(|_| "[redacted]"),
            )
            .field("public_key_path", &self.public_key_path)
            .field("jwks_path", &self.jwks_path)
            .field("jwks_url", &self.jwks_url)
            .field("algorithms", &self.algorithms)
            .field("claims", &self.claims)
            .field("typ", &self.typ)
            .field("max_token_lifetime", &self.max_token_lifetime)
            .field("portal_tokens", &self.portal_tokens)
            .field(
                "stripe_customer_from_token",
                &self.stripe_customer_from_token,
            )
            .finish()
    }
}

/// Claim names per contract §2 `claims`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ClaimNames {
    /// Selects the catalog app by its `client_id` (default `client_id`).
    pub app: String,
    /// Names the developer (default `sub`).
    pub developer: String,
    /// Names the company (default `org_id`).
    pub company: String,
    /// Products the token itself entitles (default `api_products`).
    pub products: String,
    /// Scopes, space-separated string or array (default `scope`).
    pub scope: String,
    /// Stripe customer id (default `stripe_customer`).
    pub stripe_customer: String,
}

impl Default for ClaimNames {
    fn default() -> Self {
        Self {
            app: "client_id".into(),
            developer: "sub".into(),
            company: "org_id".into(),
            products: "api_products".into(),
            scope: "scope".into(),
            stripe_customer: "stripe_customer".into(),
        }
    }
}

fn default_leeway() -> Duration {
    Duration::from_secs(30)
}

fn default_max_token_bytes() -> usize {
    8 * 1024
}

fn default_min_refresh() -> Duration {
    Duration::from_secs(30)
}

fn default_refresh() -> Duration {
    Duration::from_secs(600)
}

fn default_fetch_timeout() -> Duration {
    Duration::from_secs(5)
}

fn default_cache_capacity() -> u64 {
    10_000
}

fn default_cache_max_ttl() -> Duration {
    Duration::from_secs(300)
}

/// Durations are written like `30s`, `10m`, `1h 30m`; a bare integer means seconds.
fn optional_duration<'de, D: Deserializer<'de>>(
    deserializer: D,
) -> Result<Option<Duration>, D::Error> {
    duration(deserializer).map(Some)
}

fn duration<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Duration, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Raw {
        Seconds(u64),
        Text(String),
    }
    match Raw::deserialize(deserializer)? {
        Raw::Seconds(secs) => Ok(Duration::from_secs(secs)),
        Raw::Text(text) => humantime::parse_duration(text.trim()).map_err(|e| {
            serde::de::Error::custom(format!(
                "invalid duration {text:?} (use e.g. 30s, 10m): {e}"
            ))
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_apply_and_durations_parse() {
        let config: JwtConfig = serde_json::from_value(serde_json::json!({
            "providers": [{"name": "portal", "issuer": "https://p", "audiences": ["a"], "hs256_secret": "s"}],
            "leeway": "5s",
            "jwks_ttl": "2m",
        }))
        .unwrap();
        assert_eq!(config.leeway, Duration::from_secs(5));
        assert_eq!(config.jwks_refresh_interval, Duration::from_secs(120));
        assert_eq!(config.jwks_min_refresh_interval, Duration::from_secs(30));
        assert_eq!(config.max_token_bytes, 8192);
        assert_eq!(config.providers[0].claims, ClaimNames::default());
        assert_eq!(config.providers[0].claims.developer, "sub");
    }

    #[test]
    fn unknown_keys_are_refused() {
        let err =
            serde_json::from_value::<JwtConfig>(serde_json::json!({"leway": "5s"})).unwrap_err();
        assert!(err.to_string().contains("leway"), "{err}");
        let err =
            serde_json::from_value::<ClaimNames>(serde_json::json!({"ap": "azp"})).unwrap_err();
        assert!(err.to_string().contains("ap"), "{err}");
    }

    #[test]
    fn bad_duration_is_explained() {
        let err =
            serde_json::from_value::<JwtConfig>(serde_json::json!({"leeway": "soon"})).unwrap_err();
        assert!(err.to_string().contains("invalid duration"), "{err}");
    }

    #[test]
    fn debug_redacts_the_secret() {
        let provider: ProviderConfig = serde_json::from_value(serde_json::json!({
            "name": "portal", "issuer": "https://p", "audiences": ["a"], "hs256_secret": "hunter2-hunter2"
        }))
        .unwrap();
        let shown = format!("{provider:?}");
        assert!(!shown.contains("hunter2"), "{shown}");
        assert!(shown.contains("[redacted]"));
    }
}
