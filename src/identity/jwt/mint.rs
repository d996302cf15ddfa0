//! `tollgate token mint`: an HS256 token from a configured provider's secret, for the quickstart and local tests.

use std::time::Duration;

use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{Map, Value};

use super::config::ProviderConfig;
use super::error::{JwtConfigError, MintError};
use super::provider::check_hmac_secret;
use crate::util::clock::unix_now;

/// Claims the minting command sets itself.
const RESERVED: [&str; 5] = ["iss", "aud", "exp", "iat", "nbf"];

/// Mints an HS256 token for `provider`: `iss` and the first audience from the config, `sub` (and the developer
/// claim), the app claim from `client_id`, `extra` claims, `iat` now and `exp` now + `ttl`.
pub fn mint_hs256(
    provider: &ProviderConfig,
    sub: &str,
    client_id: Option<&str>,
    extra: &Map<String, Value>,
    ttl: Duration,
) -> Result<String, MintError> {
    let secret = provider
        .hs256_secret
        .as_deref()
        .ok_or_else(|| MintError::NoSecret(provider.name.clone()))?;
    check_hmac_secret(&provider.name, secret, &[Algorithm::HS256])?;
    if ttl.is_zero() {
        return Err(MintError::ZeroTtl);
    }
    if let Some(reserved) = extra.keys().find(|k| RESERVED.contains(&k.as_str())) {
        return Err(MintError::ReservedClaim(reserved.clone()));
    }
    let audience = provider.audiences.first().ok_or_else(|| {
        JwtConfigError::provider(&provider.name, "audiences must list at least one audience")
    })?;
    let now = unix_now();
    let ttl_secs = i64::try_from(ttl.as_secs()).unwrap_or(i64::MAX);
    let mut claims = extra.clone();
    claims.insert("sub".into(), sub.into());
    claims.insert(provider.claims.developer.clone(), sub.into());
    if let Some(client_id) = client_id {
        claims.insert(provider.claims.app.clone(), client_id.into());
    }
    claims.insert("iss".into(), provider.issuer.clone().into());
    claims.insert("aud".into(), audience.clone().into());
    claims.insert("iat".into(), now.into());
    claims.insert("exp".into(), now.saturating_add(ttl_secs).into());
    jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        &claims,
        &EncodingKey::from_secret(secret.as_bytes()),
    )
    .map_err(MintError::Sign)
}
