//! The parts of the config that decisions depend on.

use std::collections::HashMap;

use serde::Deserialize;

use crate::identity::ApiKeyConfig;
use crate::selfservice::Prefix;

/// What happens when the quota store cannot answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OnStoreError {
    /// Fail closed: 503.
    #[default]
    Deny,
    /// Fail open: the request goes through uncounted by the store.
    Allow,
}

/// When allowed calls carry `ratelimit-*` response headers (`ratelimit_headers`); denials always do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RateLimitHeaders {
    /// On every call with a quota (the contract's default).
    #[default]
    Always,
    /// On allowed calls only once at most a tenth of the limit is left, and on denials.
    NearLimit,
    /// On denials only: Envoy adds no headers to allowed calls.
    OnDeny,
}

/// What the ext_authz dynamic metadata carries (`metadata`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MetadataMode {
    /// Every field of CONTRACT §4.
    #[default]
    Full,
    /// What metering, billing and token quotas read: decision, reason, app, stripe customer, product,
    /// operation (a portal account's developer and company too), the reserve and listed attributes; no api,
    /// environment, nor an app's developer and company.
    Billing,
}

/// The parts of the config that decisions depend on.
#[derive(Debug, Clone, Default)]
pub struct Settings {
    /// The environment this sidecar serves (`environment`).
    pub environment: Option<String>,
    /// The context extension carrying the API id (`api_context_extension`).
    pub api_context_extension: Option<String>,
    /// `api_host_fallback`: a route without the context extension is matched by its `:authority` host.
    pub api_host_fallback: bool,
    /// `upstream_identity_headers`: name the caller to the upstream in `x-tollgate-*` headers.
    pub upstream_identity_headers: bool,
    /// Where API keys are looked for.
    pub api_key: ApiKeyConfig,
    /// `quota.on_store_error`.
    pub on_store_error: OnStoreError,
    /// `quota.on_store_error_by_api`: overrides by API id.
    pub on_store_error_by_api: HashMap<String, OnStoreError>,
    /// Whether bearer tokens are accepted (JWT providers are configured).
    pub bearer: bool,
    /// `billing.stripe.grace_period` in seconds: how long a past-due subscription keeps access.
    pub stripe_grace: i64,
    /// `self_service.path_prefix` when `self_service.enabled`: requests under it are answered by tollgate
    /// (`crate::selfservice`); `None` treats them as any other request.
    pub self_service: Option<Prefix>,
    /// `metadata_attributes`: product and operation attributes the allow metadata carries as `attr_<name>`.
    pub metadata_attributes: Vec<String>,
    /// `quota.hold_timeout` in seconds: how long a token quota's reserve waits for its settlement.
    pub hold_timeout: i64,
    /// `ratelimit_headers`: when allowed calls carry `ratelimit-*` headers.
    pub ratelimit_headers: RateLimitHeaders,
    /// `metadata`: what the dynamic metadata carries.
    pub metadata: MetadataMode,
}

impl Settings {
    /// What a quota store failure means for a request to `api`.
    pub fn on_store_error_for(&self, api: &str) -> OnStoreError {
        self.on_store_error_by_api
            .get(api)
            .copied()
            .unwrap_or(self.on_store_error)
    }
}
