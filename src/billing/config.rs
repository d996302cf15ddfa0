//! The `billing:` section of the config file (CONTRACT §2 `billing.stripe`).

use std::fmt;
use std::num::NonZeroU32;
use std::time::Duration;

use serde::{Deserialize, Deserializer};

/// `billing:`; absent means usage is metered and kept, nothing is sent.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BillingConfig {
    /// `billing.stripe`.
    pub stripe: StripeConfig,
}

/// How meter events reach Stripe.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StripeMode {
    /// `POST /v1/billing/meter_events`, one event per request, one in flight per (customer, meter).
    #[default]
    V1,
    /// The v2 meter event stream: session tokens, up to 100 events per request.
    V2Stream,
}

/// `billing.stripe`.
#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StripeConfig {
    /// Base URL of the Stripe API (tests point it at the local emulator).
    #[serde(default = "default_api_base")]
    pub api_base: String,
    /// Base URL of the v2 meter event stream; defaults to Stripe's stream host for Stripe's API, else `api_base`.
    #[serde(default)]
    pub stream_base: Option<String>,
    /// Secret or restricted key, sent as a bearer token (never logged).
    pub api_key: String,
    /// Pinned `Stripe-Version`.
    #[serde(default = "default_api_version")]
    pub api_version: String,
    /// `v1` or `v2_stream`.
    #[serde(default)]
    pub mode: StripeMode,
    /// Cap of the exponential backoff between retries.
    #[serde(default = "default_max_backoff", deserialize_with = "duration")]
    pub max_backoff: Duration,
    /// First backoff step; doubles per failed attempt up to `max_backoff`.
    #[serde(default = "default_initial_backoff", deserialize_with = "duration")]
    pub initial_backoff: Duration,
    /// Writes per second to Stripe, all meters together (Stripe's test mode allows about 25).
    #[serde(default = "default_rate_limit")]
    pub rate_limit: NonZeroU32,
    /// Timeout of one HTTP request to Stripe.
    #[serde(default = "default_request_timeout", deserialize_with = "duration")]
    pub request_timeout: Duration,
    /// A row unconfirmed this long after its first attempt stops being retried blindly and is reported, since
    /// Stripe remembers identifiers for (at least) 24 hours only.
    #[serde(default = "default_give_up_after", deserialize_with = "duration")]
    pub give_up_after: Duration,
    /// How often the outbox is checked for new rows.
    #[serde(default = "default_poll_interval", deserialize_with = "duration")]
    pub poll_interval: Duration,
    /// The webhook endpoint's signing secret (`whsec_…`, never logged); enables `POST /stripe/webhook`. Empty
    /// (`${STRIPE_WEBHOOK_SECRET:-}` unset) means no webhook, like an empty `admin_token`.
    #[serde(default)]
    pub webhook_secret: Option<String>,
    /// How long a past-due subscription keeps access after the period whose payment failed.
    #[serde(default = "default_grace_period", deserialize_with = "duration")]
    pub grace_period: Duration,
    /// How often every known customer's subscriptions are read again from Stripe, to heal missed webhooks.
    #[serde(default = "default_resync_interval", deserialize_with = "duration")]
    pub resync_interval: Duration,
}

/// Default `grace_period`: three days, Stripe's first retries of a failed renewal.
pub const DEFAULT_GRACE_PERIOD: Duration = Duration::from_secs(72 * 3600);

/// Stripe's public API host (the default `api_base`).
pub const STRIPE_API_BASE: &str = "https://api.stripe.com";
/// Stripe's meter event stream host (the v2 stream is served there, not on `api.stripe.com`).
pub const STRIPE_STREAM_BASE: &str = "https://meter-events.stripe.com";
/// Longest `give_up_after`: an hour short of the 24 hours Stripe deduplicates identifiers for.
pub const MAX_GIVE_UP_AFTER: Duration = Duration::from_secs(23 * 3600);
/// The API version of the schemas in `shared/stripe/`.
pub const DEFAULT_API_VERSION: &str = "2026-09-30.endive";

fn default_api_base() -> String {
    STRIPE_API_BASE.to_owned()
}
fn default_api_version() -> String {
    DEFAULT_API_VERSION.to_owned()
}
fn default_max_backoff() -> Duration {
    Duration::from_secs(30)
}
fn default_initial_backoff() -> Duration {
    Duration::from_millis(500)
}
fn default_rate_limit() -> NonZeroU32 {
    NonZeroU32::new(20).unwrap_or(NonZeroU32::MIN) // invariant: 20 is not zero
}
fn default_request_timeout() -> Duration {
    Duration::from_secs(30)
}
fn default_give_up_after() -> Duration {
    Duration::from_secs(20 * 3600)
}
fn default_poll_interval() -> Duration {
    Duration::from_secs(1)
}
fn default_grace_period() -> Duration {
    DEFAULT_GRACE_PERIOD
}
fn default_resync_interval() -> Duration {
    Duration::from_secs(3600)
}

fn duration<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    let text = String::deserialize(d)?;
    humantime::parse_duration(&text).map_err(|e| {
        serde::de::Error::custom(format!("{text:?} is not a duration like 30s or 5m: {e}"))
    })
}

impl StripeConfig {
    /// A config with every default, for `api_base` and `api_key`.
    pub fn new(api_base: impl Into<String>, api_key: impl Into<String>) -> Self {
        StripeConfig {
            api_base: api_base.into(),
            stream_base: None,
            api_key: api_key.into(),
            api_version: default_api_version(),
            mode: StripeMode::V1,
            max_backoff: default_max_backoff(),
            initial_backoff: default_initial_backoff(),
            rate_limit: default_rate_limit(),
            request_timeout: default_request_timeout(),
            give_up_after: default_give_up_after(),
            poll_interval: default_poll_interval(),
            webhook_secret: None,
            grace_period: default_grace_period(),
            resync_interval: default_resync_interval(),
        }
    }

    /// Checks what serde cannot: a usable key, URLs, and sane durations. The message names the key.
    pub fn validate(&self) -> Result<(), String> {
        if self.api_key.trim().is_empty() {
            return Err("billing.stripe.api_key is empty (is STRIPE_API_KEY set?)".into());
        }
        for (name, url) in [
            ("api_base", Some(&self.api_base)),
            ("stream_base", self.stream_base.as_ref()),
        ] {
            if let Some(url) = url {
                let parsed = reqwest::Url::parse(url)
                    .map_err(|e| format!("billing.stripe.{name} {url:?} is not a URL: {e}"))?;
                match parsed.scheme() {
                    "https" => {}
                    // The API key goes in every request: cleartext only to this machine (tests, emulator).
                    "http" if is_loopback(&parsed) => {}
                    "http" => {
                        return Err(format!(
                            "billing.stripe.{name} {url:?} must be https: http is allowed only to a loopback \
                             host (127.0.0.0/8, ::1, localhost), since the API key goes in every request"
                        ));
                    }
                    _ => {
                        return Err(format!(
                            "billing.stripe.{name} {url:?} must be an http(s) URL"
                        ));
                    }
                }
            }
        }
        if self.api_version.trim().is_empty() {
            return Err("billing.stripe.api_version is empty".into());
        }
        if self.initial_backoff.is_zero() || self.max_backoff < self.initial_backoff {
            return Err(
                "billing.stripe.max_backoff must be at least initial_backoff, which must be above 0"
                    .into(),
            );
        }
        if self.request_timeout.is_zero() || self.poll_interval.is_zero() {
            return Err("billing.stripe.request_timeout and poll_interval must be above 0".into());
        }
        if self.resync_interval < Duration::from_secs(1) {
            return Err("billing.stripe.resync_interval must be at least 1s".into());
        }
        if self.give_up_after > MAX_GIVE_UP_AFTER {
            return Err(format!(
                "billing.stripe.give_up_after {} is above {}: Stripe remembers identifiers for 24 hours, and a \
                 retry after that can bill the same usage twice",
                humantime::format_duration(self.give_up_after),
                humantime::format_duration(MAX_GIVE_UP_AFTER),
            ));
        }
        Ok(())
    }

    /// The webhook secret, when one is set and not blank.
    pub fn webhook_secret(&self) -> Option<&str> {
        self.webhook_secret
            .as_deref()
            .map(str::trim)
            .filter(|s| !s.is_empty())
    }

    /// Where the v2 stream is served.
    pub fn stream_base(&self) -> &str {
        match &self.stream_base {
            Some(s) => s,
            None if self.api_base.trim_end_matches('/') == STRIPE_API_BASE => STRIPE_STREAM_BASE,
            None => &self.api_base,
        }
    }
}

/// Whether `url` names this machine: an IP in 127.0.0.0/8, `::1`, or `localhost`.
fn is_loopback(url: &reqwest::Url) -> bool {
    let Some(host) = url.host_str() else {
        return false;
    };
    let bare = host.trim_start_matches('[').trim_end_matches(']');
    match bare.parse::<std::net::IpAddr>() {
        Ok(ip) => ip.is_loopback(),
        Err(_) => host.eq_ignore_ascii_case("localhost") || host.eq_ignore_ascii_case("localhost."),
    }
}

impl fmt::Debug for StripeConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StripeConfig")
            .field("api_base", &self.api_base)
            .field("stream_base", &self.stream_base)
            .field("api_key", &"<redacted>")
            .field("api_version", &self.api_version)
            .field("mode", &self.mode)
            .field("max_backoff", &self.max_backoff)
            .field("initial_backoff", &self.initial_backoff)
            .field("rate_limit", &self.rate_limit)
            .field("request_timeout", &self.request_timeout)
            .field("give_up_after", &self.give_up_after)
            .field("poll_interval", &self.poll_interval)
            .field(
                "webhook_secret",
                &self.webhook_secret.as_ref().map(|_| "<redacted>"),
            )
            .field("grace_period", &self.grace_period)
            .field("resync_interval", &self.resync_interval)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_unknown_keys_and_redaction() {
        let c: BillingConfig =
            serde_yaml_ng::from_str("stripe: {api_key: sk_test_secret, mode: v2_stream}").unwrap();
        let s = &c.stripe;
        assert_eq!(s.api_base, STRIPE_API_BASE);
        assert_eq!(s.stream_base(), STRIPE_STREAM_BASE);
        assert_eq!(s.api_version, "2026-09-30.endive");
        assert_eq!(s.max_backoff, Duration::from_secs(30));
        assert_eq!(s.rate_limit.get(), 20);
        assert_eq!(s.mode, StripeMode::V2Stream);
        assert!(s.validate().is_ok());
        assert!(!format!("{s:?}").contains("sk_test_secret"));
        assert_eq!(s.grace_period, DEFAULT_GRACE_PERIOD);
        assert_eq!(s.resync_interval, Duration::from_secs(3600));
        let hooked: BillingConfig = serde_yaml_ng::from_str(
            "stripe: {api_key: k, webhook_secret: whsec_shh, grace_period: 5s, resync_interval: 10m}",
        )
        .unwrap();
        assert!(!format!("{:?}", hooked.stripe).contains("whsec_shh"));
        assert_eq!(hooked.stripe.grace_period, Duration::from_secs(5));
        assert_eq!(hooked.stripe.webhook_secret(), Some("whsec_shh"));
        let mut blank = hooked.stripe.clone();
        blank.webhook_secret = Some(" ".into());
        assert!(blank.validate().is_ok());
        assert_eq!(blank.webhook_secret(), None, "blank means no webhook");

        let bad = serde_yaml_ng::from_str::<BillingConfig>("stripe: {api_key: k, retries: 3}");
        assert!(bad.unwrap_err().to_string().contains("retries"));
        let slow: BillingConfig = serde_yaml_ng::from_str(
            "stripe: {api_key: k, api_base: 'http://127.0.0.1:1', max_backoff: 2m}",
        )
        .unwrap();
        assert_eq!(slow.stripe.max_backoff, Duration::from_secs(120));
        assert_eq!(slow.stripe.stream_base(), "http://127.0.0.1:1");
        let empty = StripeConfig::new("http://127.0.0.1:1", " ");
        assert!(empty.validate().unwrap_err().contains("api_key"));
        let not_url = StripeConfig::new("ftp://x", "k");
        assert!(not_url.validate().unwrap_err().contains("api_base"));
    }

    #[test]
    fn give_up_after_stays_inside_stripes_dedup_day() {
        let mut c = StripeConfig::new("https://api.example.test", "k");
        c.give_up_after = MAX_GIVE_UP_AFTER;
        assert!(c.validate().is_ok());
        c.give_up_after = MAX_GIVE_UP_AFTER + Duration::from_secs(1);
        assert!(c.validate().unwrap_err().contains("give_up_after"));
        let parsed: BillingConfig =
            serde_yaml_ng::from_str("stripe: {api_key: k, give_up_after: 25h}").unwrap();
        assert!(parsed.stripe.validate().unwrap_err().contains("24 hours"));
    }

    #[test]
    fn cleartext_http_only_to_loopback() {
        for ok in [
            "http://127.0.0.1:8080",
            "http://127.3.2.1",
            "http://[::1]:9",
            "http://localhost:12111",
            "http://LOCALHOST",
            "https://stripe.example.test",
        ] {
            let c = StripeConfig::new(ok, "k");
            assert!(c.validate().is_ok(), "{ok}: {:?}", c.validate());
        }
        for remote in [
            "http://10.0.0.1",
            "http://128.0.0.1",
            "http://[::2]",
            "http://[::ffff:127.0.0.1]",
            "http://stripe.example.test",
            "http://localhost.example.test",
            "http://127.0.0.1.example.test",
        ] {
            let c = StripeConfig::new(remote, "k");
            let err = c.validate().unwrap_err();
            assert!(
                err.contains("api_base") && err.contains("https"),
                "{remote}: {err}"
            );
        }
        let mut stream = StripeConfig::new("https://api.example.test", "k");
        stream.stream_base = Some("http://meter.example.test".into());
        assert!(stream.validate().unwrap_err().contains("stream_base"));
        stream.stream_base = Some("http://127.0.0.1:7".into());
        assert!(stream.validate().is_ok());
    }
}
