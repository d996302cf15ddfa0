//! Verified-token cache: moka, keyed by the SHA-256 of the token, each entry expiring no later than the token's
//! `exp` (and no later than `cache_max_ttl`).

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use moka::Expiry;
use moka::future::Cache;
use sha2::{Digest, Sha256};

use super::claims::VerifiedToken;

/// SHA-256 of a raw token: the cache never holds the token itself.
pub(crate) type TokenHash = [u8; 32];

pub(crate) fn token_hash(token: &str) -> TokenHash {
    Sha256::digest(token.as_bytes()).into()
}

/// One cached verification.
#[derive(Clone)]
pub(crate) struct CachedToken {
    pub(crate) token: Arc<VerifiedToken>,
    /// Index of the provider that verified it.
    pub(crate) provider: usize,
    /// The provider's key-set generation at verification; a rotation makes the entry stale.
    pub(crate) generation: u64,
    ttl: Duration,
}

struct UntilExp;

impl Expiry<TokenHash, CachedToken> for UntilExp {
    fn expire_after_create(
        &self,
        _key: &TokenHash,
        value: &CachedToken,
        _created_at: Instant,
    ) -> Option<Duration> {
        Some(value.ttl)
    }
}

/// The cache, or nothing when `cache_capacity` is 0.
pub(crate) struct TokenCache {
    cache: Option<Cache<TokenHash, CachedToken>>,
    max_ttl: Duration,
}

impl TokenCache {
    pub(crate) fn new(capacity: u64, max_ttl: Duration) -> Self {
        let cache = (capacity > 0 && !max_ttl.is_zero()).then(|| {
            Cache::builder()
                .max_capacity(capacity)
                .expire_after(UntilExp)
                .build()
        });
        Self { cache, max_ttl }
    }

    pub(crate) async fn get(&self, hash: &TokenHash) -> Option<CachedToken> {
        self.cache.as_ref()?.get(hash).await
    }

    /// Caches a verified token until its `exp` (never past it); tokens already at or past `exp` are not cached.
    pub(crate) async fn insert(
        &self,
        hash: TokenHash,
        token: Arc<VerifiedToken>,
        provider: usize,
        generation: u64,
    ) {
        let Some(cache) = &self.cache else { return };
        let Ok(exp_secs) = u64::try_from(token.expires_at) else {
            return;
        };
        let until_exp = (UNIX_EPOCH + Duration::from_secs(exp_secs))
            .duration_since(SystemTime::now())
            .unwrap_or(Duration::ZERO);
        let ttl = until_exp.min(self.max_ttl);
        if ttl.is_zero() {
            return;
        }
        cache
            .insert(
                hash,
                CachedToken {
                    token,
                    provider,
                    generation,
                    ttl,
                },
            )
            .await;
    }

    pub(crate) async fn remove(&self, hash: &TokenHash) {
        if let Some(cache) = &self.cache {
            cache.invalidate(hash).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn token(expires_at: i64) -> Arc<VerifiedToken> {
        Arc::new(VerifiedToken {
            provider: Arc::from("p"),
            subject: None,
            developer: None,
            app: None,
            company: None,
            products: Vec::new(),
            scopes: Vec::new(),
            stripe_customer: None,
            portal: false,
            expires_at,
        })
    }

    fn now() -> i64 {
        crate::util::clock::unix_now()
    }

    #[tokio::test]
    async fn live_tokens_are_cached_and_expired_ones_are_not() {
        let cache = TokenCache::new(100, Duration::from_secs(300));
        cache
            .insert(token_hash("live"), token(now() + 3600), 0, 0)
            .await;
        cache
            .insert(token_hash("dead"), token(now() - 1), 0, 0)
            .await;
        assert!(cache.get(&token_hash("live")).await.is_some());
        assert!(cache.get(&token_hash("dead")).await.is_none());
        cache.remove(&token_hash("live")).await;
        assert!(cache.get(&token_hash("live")).await.is_none());
    }

    #[tokio::test]
    async fn entries_leave_at_exp() {
        let cache = TokenCache::new(100, Duration::from_secs(300));
        cache
            .insert(token_hash("short"), token(now() + 1), 0, 0)
            .await;
        // exp is at most 1 s away; 2.1 s later the entry must be gone whatever the sub-second phase was.
        tokio::time::sleep(Duration::from_millis(2100)).await;
        assert!(cache.get(&token_hash("short")).await.is_none());
    }

    #[tokio::test]
    async fn capacity_zero_disables_the_cache() {
        let cache = TokenCache::new(0, Duration::from_secs(300));
        cache
            .insert(token_hash("live"), token(now() + 3600), 0, 0)
            .await;
        assert!(cache.get(&token_hash("live")).await.is_none());
    }
}
