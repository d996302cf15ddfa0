//! Remote JWKS: fetched with reqwest, kept in memory, refreshed periodically and on unknown `kid`s (at most once
//! per minimum interval), and never replaced by a failed or empty fetch.

use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use jsonwebtoken::Algorithm;
use reqwest::Url;
use tokio::sync::{Mutex, watch};

use super::keys::{KeySet, parse_jwks};
use super::metrics::JwtMetrics;
use crate::util::clock::unix_now;

/// A JWKS larger than this is refused: real ones are a few KiB.
const MAX_JWKS_BYTES: usize = 1024 * 1024;

/// How long a Check waits for an unknown-`kid` fetch before answering 503: well inside the ext_authz
/// timeouts Envoy is usually given, so the caller gets tollgate's answer rather than Envoy's timeout.
const UNKNOWN_KID_WAIT: Duration = Duration::from_millis(250);

/// What an unknown-`kid` refresh came to, as far as the waiting Check is concerned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Refresh {
    /// The key set may have changed: look the key up again.
    Done,
    /// A fetch is still running: the key may be on its way (503, try again).
    Running,
    /// No fetch may start yet (one ran within the minimum interval): the key is unknown.
    Throttled,
}

/// Checks a `jwks_url`: https, or http only when the host is loopback; no credentials in the URL.
pub(crate) fn parse_jwks_url(raw: &str) -> Result<Url, String> {
    let url = Url::parse(raw).map_err(|e| format!("jwks_url is not a valid URL: {e}"))?;
    if !url.username().is_empty() || url.password().is_some() {
        return Err("jwks_url must not carry credentials".into());
    }
    let host = url.host_str().ok_or("jwks_url has no host")?;
    let bare = host.trim_start_matches('[').trim_end_matches(']');
    let loopback = bare.eq_ignore_ascii_case("localhost")
        || bare.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback());
    match url.scheme() {
        "https" => Ok(url),
        "http" if loopback => Ok(url),
        "http" => {
            Err("jwks_url must use https (plain http is allowed only for loopback hosts)".into())
        }
        other => Err(format!(
            "jwks_url scheme {other} is not supported (use https)"
        )),
    }
}

/// Why one fetch failed; shown in logs with the URL, never with a token.
#[derive(Debug, thiserror::Error)]
pub(crate) enum FetchError {
    #[error("request failed: {0}")]
    Request(reqwest::Error),
    #[error("answered HTTP {0}")]
    Status(reqwest::StatusCode),
    #[error("response is larger than {MAX_JWKS_BYTES} bytes")]
    TooLarge,
    #[error("{0}")]
    Invalid(String),
    #[error("JWKS holds no usable signature key ({skipped} skipped)")]
    NoUsableKey { skipped: usize },
}

/// Settings shared by every remote JWKS of one verifier.
#[derive(Clone)]
pub(crate) struct JwksSettings {
    pub(crate) client: reqwest::Client,
    pub(crate) min_refresh_interval: Duration,
    pub(crate) refresh_interval: Duration,
}

/// The key set of one provider's `jwks_url`.
pub(crate) struct RemoteJwks {
    provider: Arc<str>,
    url: Url,
    allow_list: Option<Vec<Algorithm>>,
    settings: JwksSettings,
    metrics: JwtMetrics,
    keys: ArcSwap<KeySet>,
    /// Bumped whenever the key set changes, so cached verifications made with older keys are re-checked.
    generation: AtomicU64,
    loaded: AtomicBool,
    /// One fetch at a time: the periodic refresh and an unknown-`kid` fetch never race to store.
    fetching: Mutex<()>,
    /// When the last fetch of any kind started, and the end signal of a running unknown-`kid` fetch.
    unknown_kid: std::sync::Mutex<UnknownKid>,
}

#[derive(Default)]
struct UnknownKid {
    last_fetch: Option<Instant>,
    /// Turns true when the running fetch has ended; `None` when none runs.
    running: Option<watch::Receiver<bool>>,
}

impl RemoteJwks {
    pub(crate) fn new(
        provider: Arc<str>,
        url: Url,
        allow_list: Option<Vec<Algorithm>>,
        settings: JwksSettings,
        metrics: JwtMetrics,
    ) -> Self {
        Self {
            provider,
            url,
            allow_list,
            settings,
            metrics,
            keys: ArcSwap::from_pointee(KeySet::default()),
            generation: AtomicU64::new(0),
            loaded: AtomicBool::new(false),
            fetching: Mutex::new(()),
            unknown_kid: std::sync::Mutex::new(UnknownKid::default()),
        }
    }

    pub(crate) fn keys(&self) -> Arc<KeySet> {
        self.keys.load_full()
    }

    pub(crate) fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    /// Whether a fetch has ever succeeded.
    pub(crate) fn is_loaded(&self) -> bool {
        self.loaded.load(Ordering::Acquire)
    }

    /// Refreshes because a token named a key we do not have. The fetch runs as its own task, shared by every
    /// Check that meets an unknown `kid` meanwhile: a Check that Envoy gives up on (its ext_authz timeout drops
    /// the call) must not cancel the fetch the next token needs. At most one starts per minimum interval.
    pub(crate) async fn refresh_for_unknown_key(self: &Arc<Self>, seen_generation: u64) -> Refresh {
        if self.generation() != seen_generation {
            return Refresh::Done;
        }
        let mut running = {
            let mut state = crate::util::sync::lock(&self.unknown_kid);
            match &state.running {
                Some(running) => running.clone(),
                None if state
                    .last_fetch
                    .is_some_and(|at| at.elapsed() < self.settings.min_refresh_interval) =>
                {
                    tracing::debug!(provider = %self.provider, "unknown JWT key id; JWKS refreshed recently, not fetching");
                    return Refresh::Throttled;
                }
                None => {
                    let (done, running) = watch::channel(false);
                    state.last_fetch = Some(Instant::now());
                    state.running = Some(running.clone());
                    let jwks = Arc::clone(self);
                    tokio::spawn(async move {
                        jwks.refresh_now("unknown_kid").await;
                        crate::util::sync::lock(&jwks.unknown_kid).running = None;
                        let _ = done.send(true);
                    });
                    running
                }
            }
        };
        match tokio::time::timeout(UNKNOWN_KID_WAIT, running.wait_for(|done| *done)).await {
            Ok(_) => Refresh::Done,
            Err(_) => Refresh::Running,
        }
    }

    /// Fetches now (start-up and the periodic refresh); returns whether the fetch succeeded.
    pub(crate) async fn refresh_now(&self, trigger: &'static str) -> bool {
        let _one_at_a_time = self.fetching.lock().await;
        crate::util::sync::lock(&self.unknown_kid).last_fetch = Some(Instant::now());
        self.fetch_and_store(trigger).await
    }

    async fn fetch_and_store(&self, trigger: &'static str) -> bool {
        match self.fetch().await {
            Ok((set, skipped)) => {
                let count = set.len();
                let changed = !self.keys.load().same_as(&set);
                if changed {
                    self.keys.store(Arc::new(set));
                    self.generation.fetch_add(1, Ordering::AcqRel);
                }
                self.loaded.store(true, Ordering::Release);
                self.metrics.jwks_fetched(&self.provider, true);
                self.metrics.jwks_loaded(&self.provider, count, unix_now());
                tracing::info!(provider = %self.provider, url = %self.url, trigger, keys = count, skipped, changed,
                    "JWKS fetched");
                true
            }
            Err(error) => {
                self.metrics.jwks_fetched(&self.provider, false);
                let kept = self.keys.load().len();
                tracing::warn!(provider = %self.provider, url = %self.url, trigger, %error, kept_keys = kept,
                    "JWKS fetch failed; keeping the last good key set");
                false
            }
        }
    }

    async fn fetch(&self) -> Result<(KeySet, usize), FetchError> {
        let mut response = self
            .settings
            .client
            .get(self.url.clone())
            .header(
                reqwest::header::ACCEPT,
                "application/jwk-set+json, application/json",
            )
            .send()
            .await
            .map_err(|e| FetchError::Request(e.without_url()))?;
        if !response.status().is_success() {
            return Err(FetchError::Status(response.status()));
        }
        if response
            .content_length()
            .is_some_and(|len| len > MAX_JWKS_BYTES as u64)
        {
            return Err(FetchError::TooLarge);
        }
        let mut body = Vec::new();
        while let Some(chunk) = response
            .chunk()
            .await
            .map_err(|e| FetchError::Request(e.without_url()))?
        {
            if body.len() + chunk.len() > MAX_JWKS_BYTES {
                return Err(FetchError::TooLarge);
            }
            body.extend_from_slice(&chunk);
        }
        let parsed = parse_jwks(&body, self.allow_list.as_deref()).map_err(FetchError::Invalid)?;
        if parsed.set.is_empty() {
            return Err(FetchError::NoUsableKey {
                skipped: parsed.skipped,
            });
        }
        Ok((parsed.set, parsed.skipped))
    }

    /// Starts the background refresh: every `refresh_interval` after a success, sooner (from the minimum interval,
    /// doubling) after a failure. The task ends when the verifier is dropped.
    pub(crate) fn spawn_refresh(
        self: &Arc<Self>,
        first_fetch_ok: bool,
    ) -> tokio::task::AbortHandle {
        let weak: Weak<Self> = Arc::downgrade(self);
        let regular = self.settings.refresh_interval.max(Duration::from_secs(1));
        let floor = self
            .settings
            .min_refresh_interval
            .max(Duration::from_secs(1))
            .min(regular);
        tokio::spawn(async move {
            let mut delay = if first_fetch_ok { regular } else { floor };
            let mut backoff = if first_fetch_ok {
                floor
            } else {
                (floor * 2).min(regular)
            };
            loop {
                tokio::time::sleep(delay).await;
                let Some(jwks) = weak.upgrade() else { break };
                if jwks.refresh_now("periodic").await {
                    delay = regular;
                    backoff = floor;
                } else {
                    delay = backoff;
                    backoff = (backoff * 2).min(regular);
                }
            }
        })
        .abort_handle()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn url_policy() {
        assert!(parse_jwks_url("https://idp.example.com/.well-known/jwks.json").is_ok());
        assert!(parse_jwks_url("http://127.0.0.1:8080/jwks").is_ok());
        assert!(parse_jwks_url("http://127.8.9.1/jwks").is_ok());
        assert!(parse_jwks_url("http://[::1]:9/jwks").is_ok());
        assert!(parse_jwks_url("http://localhost:9/jwks").is_ok());
        assert!(
            parse_jwks_url("http://idp.example.com/jwks")
                .unwrap_err()
                .contains("https")
        );
        assert!(
            parse_jwks_url("http://10.0.0.1/jwks")
                .unwrap_err()
                .contains("https")
        );
        assert!(parse_jwks_url("http://localhost.example.com/jwks").is_err());
        assert!(parse_jwks_url("file:///etc/passwd").is_err());
        assert!(
            parse_jwks_url("https://user:pw@idp.example.com/jwks")
                .unwrap_err()
                .contains("credentials")
        );
        assert!(parse_jwks_url("not a url").is_err());
    }
}
