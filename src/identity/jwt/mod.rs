//! Bearer JWT verification: providers routed by `iss`, static keys and JWKS, RFC 8725 hardening and a
//! verified-token cache. The catalog mapping of the verified claims lives with the caller.

mod cache;
mod claims;
mod config;
mod error;
mod jwks;
mod keys;
mod metrics;
mod mint;
mod provider;
mod token;

#[cfg(test)]
mod tests;

use crate::util::clock::unix_now;
use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

pub use claims::VerifiedToken;
pub use config::{ClaimNames, JwtConfig, ProviderConfig};
pub use error::{JwtConfigError, JwtRejection, MintError};
pub use metrics::JwtMetrics;
pub use mint::mint_hs256;

use cache::{TokenCache, token_hash};
use jwks::JwksSettings;
use metrics::NO_PROVIDER;
use provider::Provider;

/// Verifies bearer tokens for every configured provider.
pub struct JwtVerifier {
    providers: Vec<Provider>,
    by_issuer: HashMap<String, usize>,
    max_token_bytes: usize,
    cache: TokenCache,
    metrics: JwtMetrics,
    refresh_tasks: Vec<tokio::task::AbortHandle>,
}

impl JwtVerifier {
    /// Builds providers (reads key files relative to `base_dir`; exactly one key source per provider; validates
    /// the algorithm allow-list against the key type) and loads JWKS (a failed first fetch is logged and retried,
    /// not fatal).
    pub async fn new(
        config: &JwtConfig,
        base_dir: &Path,
        metrics: &JwtMetrics,
    ) -> Result<Self, JwtConfigError> {
        if config.max_token_bytes == 0 {
            return Err(JwtConfigError::Invalid(
                "max_token_bytes must be more than zero".into(),
            ));
        }
        let jwks = if config.providers.iter().any(|p| p.jwks_url.is_some()) {
            let client = reqwest::Client::builder()
                .timeout(config.jwks_fetch_timeout)
                .connect_timeout(config.jwks_fetch_timeout)
                .redirect(reqwest::redirect::Policy::none())
                .user_agent(concat!("tollgate/", env!("CARGO_PKG_VERSION")))
                .build()
                .map_err(JwtConfigError::HttpClient)?;
            Some(JwksSettings {
                client,
                min_refresh_interval: config.jwks_min_refresh_interval,
                refresh_interval: config.jwks_refresh_interval,
            })
        } else {
            None
        };

        let mut providers = Vec::with_capacity(config.providers.len());
        let mut by_issuer = HashMap::new();
        for cfg in &config.providers {
            if cfg.name.is_empty() {
                return Err(JwtConfigError::Invalid(
                    "a provider has an empty name".into(),
                ));
            }
            if providers.iter().any(|p: &Provider| *p.name == *cfg.name) {
                return Err(JwtConfigError::provider(
                    &cfg.name,
                    "the name is used by another provider",
                ));
            }
            if by_issuer.contains_key(&cfg.issuer) {
                return Err(JwtConfigError::provider(
                    &cfg.name,
                    "the issuer is used by another provider",
                ));
            }
            let provider = Provider::build(cfg, config, base_dir, jwks.as_ref(), metrics)?;
            by_issuer.insert(provider.issuer.clone(), providers.len());
            providers.push(provider);
        }

        let mut refresh_tasks = Vec::new();
        for remote in providers.iter().filter_map(Provider::remote) {
            let ok = remote.refresh_now("startup").await;
            refresh_tasks.push(remote.spawn_refresh(ok));
        }

        Ok(Self {
            providers,
            by_issuer,
            max_token_bytes: config.max_token_bytes,
            cache: TokenCache::new(config.cache_capacity, config.cache_max_ttl),
            metrics: metrics.clone(),
            refresh_tasks,
        })
    }

    /// Verifies a token (the raw value after `Bearer `); cached by SHA-256 of the token, never longer than its exp.
    pub async fn verify(&self, token: &str) -> Result<Arc<VerifiedToken>, JwtRejection> {
        if token.len() > self.max_token_bytes {
            return Err(self.rejected(None, JwtRejection::Oversized));
        }
        let hash = token_hash(token);
        if let Some(hit) = self.cache.get(&hash).await {
            let provider = &self.providers[hit.provider]; // invariant: cache entries hold indexes into self.providers
            if hit.generation == provider.generation() && hit.token.expires_at > unix_now() {
                provider.counters.valid.inc();
                provider.counters.cache_hits.inc();
                return Ok(hit.token);
            }
            self.cache.remove(&hash).await;
        }

        let peeked = token::peek(token).map_err(|r| self.rejected(None, r))?;
        let Some(&index) = self.by_issuer.get(&peeked.iss) else {
            return Err(self.rejected(None, JwtRejection::UntrustedIssuer));
        };
        let provider = &self.providers[index]; // invariant: by_issuer holds indexes into self.providers
        let (claims, generation) = provider
            .verify(token, &peeked)
            .await
            .map_err(|r| self.rejected(Some(provider), r))?;
        let verified = Arc::new(VerifiedToken::from_claims(
            Arc::clone(&provider.name),
            provider.trust(),
            provider.claim_names(),
            &claims,
        ));
        provider.counters.valid.inc();
        self.cache
            .insert(hash, Arc::clone(&verified), index, generation)
            .await;
        Ok(verified)
    }

    fn rejected(&self, provider: Option<&Provider>, rejection: JwtRejection) -> JwtRejection {
        let name = provider.map_or(NO_PROVIDER, |p| &*p.name);
        self.metrics.rejected(name, rejection.code());
        tracing::debug!(provider = name, reason = rejection.code(), "JWT rejected");
        rejection
    }
}

impl Drop for JwtVerifier {
    fn drop(&mut self) {
        for task in &self.refresh_tasks {
            task.abort();
        }
    }
}
