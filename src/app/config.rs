//! The config file (CONTRACT §2): YAML with `${VAR}` expansion, unknown keys refused, every error positioned.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Deserializer};

use crate::app::tls::{self, Alpn, TlsFiles};
use crate::billing::BillingConfig;
use crate::check::{MetadataMode, OnStoreError, RateLimitHeaders, Settings};
use crate::credits::CreditOptions;
use crate::identity::ApiKeyConfig;
use crate::identity::jwt::JwtConfig;
use crate::metering::MeteringOptions;
use crate::selfservice::Prefix;
use crate::source::{PathSeg, Source, SourceError};

/// The whole config file. No `Debug`: it holds the admin token and maybe a Redis password.
#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// ext_authz, access-log service and gRPC health.
    #[serde(default = "default_grpc_listen")]
    pub grpc_listen: SocketAddr,
    /// `/metrics`, `/healthz`, `/readyz`, `/v1/...`.
    #[serde(default = "default_admin_listen")]
    pub admin_listen: SocketAddr,
    /// TLS on the gRPC listener; with `client_ca_path`, every client (Envoy) must present a certificate.
    pub grpc_tls: Option<TlsFiles>,
    /// TLS on the admin listener.
    pub admin_tls: Option<TlsFiles>,
    /// Bearer token required by `/v1/...` when set (empty means unset).
    #[serde(default, deserialize_with = "empty_is_none")]
    pub admin_token: Option<String>,
    /// Bearer token every access-log and ext_proc stream must carry when set (empty means unset): both write
    /// what is billed.
    #[serde(default, deserialize_with = "empty_is_none")]
    pub access_log_token: Option<String>,
    /// The environment this gateway serves; products may be limited to environments.
    #[serde(default, deserialize_with = "empty_is_none")]
    pub environment: Option<String>,
    /// Where the catalog is.
    pub catalog: CatalogConfig,
    /// How callers identify themselves.
    #[serde(default)]
    pub identity: IdentityConfig,
    /// The route context extension naming the API.
    #[serde(default, deserialize_with = "empty_is_none")]
    pub api_context_extension: Option<String>,
    /// With `api_context_extension` set, match a route without the extension by its `:authority` host instead
    /// of denying it (the client chooses its `:authority`, so this lets it choose the API).
    #[serde(default)]
    pub api_host_fallback: bool,
    /// Let non-loopback listeners run without authentication (no `admin_token`, no `access_log_token`).
    #[serde(default)]
    pub insecure_listeners: bool,
    /// Whether allowed requests reach the upstream with `x-tollgate-app`, `-developer` and `-product`.
    #[serde(default = "default_true")]
    pub upstream_identity_headers: bool,
    /// Where quota counters live and what a store failure means.
    #[serde(default)]
    pub quota: QuotaConfig,
    /// The usage spool, its windows and disk budget.
    #[serde(default)]
    pub metering: MeteringConfig,
    /// Billing; absent means usage is metered and kept, and nothing is sent.
    pub billing: Option<BillingConfig>,
    /// The state store of run-time developers, apps and keys (CONTRACT §7).
    #[serde(default)]
    pub state: StateConfig,
    /// Prepaid credits: how replicas lease from the ledger in the state store (CONTRACT §9).
    #[serde(default)]
    pub credits: CreditsConfig,
    /// Partner self-service through Envoy (CONTRACT §10): requests under a path prefix answered by tollgate.
    #[serde(default)]
    pub self_service: SelfServiceConfig,
    /// Reading LLM response bodies through ext_proc (CONTRACT §11).
    #[serde(default)]
    pub genai: GenAiConfig,
    /// When allowed calls carry `ratelimit-*` headers: always (default), near_limit, on_deny. Envoy pays for every
    /// header it adds (bench/answer-parts).
    #[serde(default)]
    pub ratelimit_headers: RateLimitHeaders,
    /// What the ext_authz dynamic metadata carries: full (default) or billing (what metering reads).
    #[serde(default)]
    pub metadata: MetadataMode,
    /// Product and operation attributes put into the allow metadata as `attr_<name>` (CONTRACT §12).
    #[serde(default)]
    pub metadata_attributes: Vec<String>,
    /// The config file's folder: relative paths (catalog, metering dir, JWT key files) start there.
    #[serde(skip)]
    pub base_dir: PathBuf,
}

/// `genai:`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GenAiConfig {
    /// Most bytes held per response body read by ext_proc: a whole JSON body, or one server-sent event
    /// (decoded). A larger one counts 0 and is reported, never guessed.
    #[serde(default = "default_genai_buffer")]
    pub max_buffer_bytes: usize,
}

impl Default for GenAiConfig {
    fn default() -> Self {
        GenAiConfig {
            max_buffer_bytes: default_genai_buffer(),
        }
    }
}

fn default_genai_buffer() -> usize {
    4 << 20
}

/// `catalog:`: a file (`path`) or a document served over HTTPS (`url`), exactly one of them. No `Debug`: the
/// headers carry a bearer token.
#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CatalogConfig {
    /// The catalog file, relative to the config file's folder.
    pub path: Option<PathBuf>,
    /// A catalog served over HTTPS (http only to a loopback address), polled (CONTRACT §12).
    #[serde(default, deserialize_with = "empty_is_none")]
    pub url: Option<String>,
    /// Headers sent with every fetch of `url` (a bearer token from `${VAR}`).
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
    /// How often `url` is asked for a newer catalog.
    #[serde(default = "default_catalog_poll", deserialize_with = "duration")]
    pub poll_interval: Duration,
    /// Bound of one fetch of `url`, connection and body included.
    #[serde(default = "default_catalog_timeout", deserialize_with = "duration")]
    pub timeout: Duration,
    /// A PEM file of CA certificates trusted for `url` besides the system's (a private CA).
    pub ca_path: Option<PathBuf>,
}

fn default_catalog_poll() -> Duration {
    Duration::from_secs(30)
}

fn default_catalog_timeout() -> Duration {
    Duration::from_secs(10)
}

/// `identity:`
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IdentityConfig {
    /// API keys.
    #[serde(default)]
    pub api_key: ApiKeyConfig,
    /// JWT providers; absent means bearer tokens are not looked for.
    pub jwt: Option<JwtConfig>,
}

/// Which quota store holds the counters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StoreKind {
    /// In this process: exact for one replica.
    #[default]
    Memory,
    /// Shared by replicas.
    Redis,
}

/// `quota:` (no `Debug`: `redis_url` may carry a password).
#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QuotaConfig {
    /// memory | redis.
    #[serde(default)]
    pub store: StoreKind,
    /// The Redis URL for `store: redis` (`rediss://` for TLS; a password in the URL); with `redis_cluster`, a
    /// comma-separated list of node URLs.
    #[serde(default, deserialize_with = "empty_is_none")]
    pub redis_url: Option<String>,
    /// Use the Redis Cluster client.
    #[serde(default)]
    pub redis_cluster: bool,
    /// Bound of every quota store call; past it the call counts as a store error.
    #[serde(default = "default_store_timeout", deserialize_with = "duration")]
    pub timeout: Duration,
    /// Largest block of quota units a replica leases from Redis and serves locally (0: a Redis round trip
    /// per request). Leases shrink as the remaining quota shrinks; they never let replicas overshoot.
    #[serde(default = "default_max_lease")]
    pub max_lease: u64,
    /// deny (503) | allow (counted by this replica alone until the store is back).
    #[serde(default)]
    pub on_store_error: OnStoreError,
    /// Per-API overrides of `on_store_error`, by API id (a payments API fails closed, a catalog API open).
    #[serde(default)]
    pub on_store_error_by_api: HashMap<String, OnStoreError>,
    /// With `store: memory`, how often the counters are saved to `metering.dir`: the most of its charges a
    /// crash can give back.
    #[serde(default = "default_persist_interval", deserialize_with = "duration")]
    pub persist_interval: Duration,
    /// How long a token quota's reserve is held for a call whose access-log entry has not come; then it is
    /// given back (and a late entry counts afresh). Longer than the longest response.
    #[serde(default = "default_hold_timeout", deserialize_with = "duration")]
    pub hold_timeout: Duration,
}

impl Default for QuotaConfig {
    fn default() -> Self {
        QuotaConfig {
            store: StoreKind::default(),
            redis_url: None,
            redis_cluster: false,
            timeout: default_store_timeout(),
            max_lease: default_max_lease(),
            on_store_error: OnStoreError::default(),
            on_store_error_by_api: HashMap::new(),
            persist_interval: default_persist_interval(),
            hold_timeout: default_hold_timeout(),
        }
    }
}

/// `metering:`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MeteringConfig {
    /// Durable spool and billing outbox.
    #[serde(default = "default_metering_dir")]
    pub dir: PathBuf,
    /// Tumbling window length.
    #[serde(default = "default_window", deserialize_with = "duration")]
    pub window: Duration,
    /// How late a record may arrive and still join its window.
    #[serde(default = "default_lateness", deserialize_with = "duration")]
    pub lateness: Duration,
    /// How long after sealing a window still takes late records (as a new revision); default window + lateness.
    #[serde(default, deserialize_with = "optional_duration")]
    pub retention: Option<Duration>,
    /// Disk budget of the spool and the outbox; records are refused (loudly) beyond it.
    #[serde(default = "default_max_disk_bytes")]
    pub max_disk_bytes: u64,
    /// This instance's name in billing identifiers: unique per spool (default: a random id kept in
    /// `<dir>/PRODUCER`, created once, stable across restarts and pod renames).
    #[serde(default, deserialize_with = "empty_is_none")]
    pub producer: Option<String>,
    /// Least time between two fsyncs of the spool (records gather meanwhile; Envoy never waits for them).
    #[serde(default = "default_commit_interval", deserialize_with = "duration")]
    pub commit_interval: Duration,
}

impl Default for MeteringConfig {
    fn default() -> Self {
        MeteringConfig {
            dir: default_metering_dir(),
            window: default_window(),
            lateness: default_lateness(),
            retention: None,
            max_disk_bytes: default_max_disk_bytes(),
            producer: None,
            commit_interval: default_commit_interval(),
        }
    }
}

/// `state:` (no `Debug`: the URL may carry a password).
#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StateConfig {
    /// `sqlite://FILE` (relative to the config file's folder) or `postgres://…`; default
    /// `sqlite://<metering.dir>/state.db`.
    #[serde(default, deserialize_with = "empty_is_none")]
    pub url: Option<String>,
    /// How often a replica reads the changes other replicas made (PostgreSQL also wakes it at once).
    #[serde(default = "default_sync_interval", deserialize_with = "duration")]
    pub sync_interval: Duration,
}

impl Default for StateConfig {
    fn default() -> Self {
        StateConfig {
            url: None,
            sync_interval: default_sync_interval(),
        }
    }
}

/// `credits:`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreditsConfig {
    /// Largest block of credits a replica leases beyond the call that asked (0: a ledger call per prepaid
    /// Check). Also what a crash of a replica can cost each owner it held a lease for.
    #[serde(default = "default_credit_lease")]
    pub max_lease: u64,
    /// Balances below this are low: listed by `GET /v1/credits?below=` by default, logged once when crossed.
    #[serde(default = "default_low_balance")]
    pub low_balance: u64,
    /// After the ledger found a balance exhausted, how long a replica refuses that owner without asking again:
    /// the bound on how late a grant made through another replica becomes spendable here.
    #[serde(default = "default_exhausted_for", deserialize_with = "duration")]
    pub exhausted_for: Duration,
    /// Bound of one ledger call made for a Check; past it the call is refused with 503.
    #[serde(default = "default_ledger_timeout", deserialize_with = "duration")]
    pub timeout: Duration,
}

impl Default for CreditsConfig {
    fn default() -> Self {
        CreditsConfig {
            max_lease: default_credit_lease(),
            low_balance: default_low_balance(),
            exhausted_for: default_exhausted_for(),
            timeout: default_ledger_timeout(),
        }
    }
}

impl CreditsConfig {
    /// The spend engine's options.
    pub fn options(&self) -> CreditOptions {
        CreditOptions {
            max_lease: self.max_lease,
            low_balance: self.low_balance,
            exhausted_for: self.exhausted_for,
            timeout: self.timeout,
        }
    }
}

/// `self_service:`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SelfServiceConfig {
    /// Whether requests under `path_prefix` are answered by tollgate (false: they are ordinary requests).
    #[serde(default = "default_true")]
    pub enabled: bool,
    /// Requests whose path starts with it are answered by tollgate itself, never by the upstream.
    #[serde(default = "default_self_service_prefix")]
    pub path_prefix: String,
}

impl Default for SelfServiceConfig {
    fn default() -> Self {
        SelfServiceConfig {
            enabled: true,
            path_prefix: default_self_service_prefix(),
        }
    }
}

fn default_self_service_prefix() -> String {
    crate::selfservice::DEFAULT_PREFIX.to_owned()
}

/// A hot owner's Checks stay local while one ledger call (an fsynced SQLite commit takes about 3.5 ms here)
/// brings at least as many credits as they spend meanwhile: 100 capped one owner near 25k Checks/s
/// (BENCHMARKS.md). The journal makes a crash cost nothing; only after a reboot is up to this much lost.
fn default_credit_lease() -> u64 {
    1_000
}

fn default_low_balance() -> u64 {
    100
}

fn default_exhausted_for() -> Duration {
    Duration::from_secs(1)
}

fn default_ledger_timeout() -> Duration {
    Duration::from_secs(1)
}

fn default_sync_interval() -> Duration {
    Duration::from_secs(1)
}

fn default_grpc_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 9001))
}
fn default_admin_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 9002))
}
fn default_true() -> bool {
    true
}
fn default_commit_interval() -> Duration {
    crate::metering::DEFAULT_COMMIT_INTERVAL
}
fn default_metering_dir() -> PathBuf {
    PathBuf::from("data")
}
fn default_window() -> Duration {
    Duration::from_secs(60)
}
fn default_lateness() -> Duration {
    Duration::from_secs(10)
}
fn default_store_timeout() -> Duration {
    Duration::from_millis(50)
}
fn default_hold_timeout() -> Duration {
    Duration::from_secs(600)
}
fn default_persist_interval() -> Duration {
    crate::quota::persist::DEFAULT_INTERVAL
}
fn default_max_lease() -> u64 {
    100
}
fn default_max_disk_bytes() -> u64 {
    1 << 30
}

/// The state store URL with an SQLite path made absolute (relative to the config file's folder), or the
/// default SQLite file in `metering.dir`.
fn state_url(config: &Config, base: &Path) -> Result<String, String> {
    let Some(url) = &config.state.url else {
        return Ok(format!(
            "sqlite://{}",
            config.metering.dir.join("state.db").display()
        ));
    };
    match crate::state::sql::Backend::of(url) {
        Some(crate::state::sql::Backend::Sqlite) => {
            let rest = url.trim_start_matches("sqlite:").trim_start_matches("//");
            if rest.is_empty() || rest.starts_with('?') || rest.starts_with(":memory:") {
                return Err("state.url sqlite: needs a file (sqlite://state.db)".to_owned());
            }
            Ok(format!("sqlite://{}", base.join(rest).display()))
        }
        Some(crate::state::sql::Backend::Postgres) => Ok(url.clone()),
        None => Err(
            "state.url must be sqlite://FILE (one replica) or postgres://USER@HOST/DB (several)"
                .to_owned(),
        ),
    }
}

/// The first listener that binds beyond loopback with nothing to authenticate its callers: the key to blame and
/// one sentence naming what to set. Anyone reaching an open gRPC port can stream access-log entries that are
/// billed to any Stripe customer; anyone reaching an open admin port can read every partner's usage.
/// Checks that `catalog` names exactly one source and that a remote one is safe to poll; the error names the
/// key to fix under `catalog`.
fn catalog_source(catalog: &CatalogConfig) -> Result<(), (PathSeg<'static>, String)> {
    let url = match (&catalog.path, &catalog.url) {
        (Some(_), None) => return Ok(()),
        (None, Some(url)) => url,
        (Some(_), Some(_)) => {
            return Err((
                PathSeg::Key("url"),
                "set catalog.path or catalog.url, not both".into(),
            ));
        }
        (None, None) => {
            return Err((
                PathSeg::Key("path"),
                "set catalog.path (a file) or catalog.url (served over HTTPS)".into(),
            ));
        }
    };
    crate::catalog::remote::check_url(url).map_err(|m| (PathSeg::Key("url"), m))?;
    if catalog.poll_interval < Duration::from_secs(1) {
        return Err((
            PathSeg::Key("poll_interval"),
            "poll_interval must be at least 1s".into(),
        ));
    }
    if catalog.timeout.is_zero() {
        return Err((
            PathSeg::Key("timeout"),
            "timeout must be longer than 0s".into(),
        ));
    }
    for (name, value) in &catalog.headers {
        if reqwest::header::HeaderName::from_bytes(name.as_bytes()).is_err() {
            return Err((
                PathSeg::Key("headers"),
                format!("{name:?} is not a header name"),
            ));
        }
        if reqwest::header::HeaderValue::from_str(value).is_err() {
            // The value is not echoed: it is often a token.
            return Err((
                PathSeg::Key("headers"),
                format!("the value of header {name} is not a valid header value"),
            ));
        }
    }
    Ok(())
}

/// A client certificate checked against `grpc_tls.client_ca_path` authenticates the gRPC caller as well as
/// the token does.
fn open_listener(config: &Config) -> Result<(), (PathSeg<'static>, String)> {
    let mtls = config
        .grpc_tls
        .as_ref()
        .is_some_and(|t| t.client_ca_path.is_some());
    if !config.grpc_listen.ip().is_loopback() && config.access_log_token.is_none() && !mtls {
        return Err((
            PathSeg::Key("grpc_listen"),
            format!(
                "grpc_listen {} is not a loopback address and neither access_log_token nor \
                 grpc_tls.client_ca_path is set: anyone reaching it could stream billed usage; set \
                 access_log_token, or grpc_tls.client_ca_path for mTLS, or insecure_listeners: true",
                config.grpc_listen
            ),
        ));
    }
    if !config.admin_listen.ip().is_loopback() && config.admin_token.is_none() {
        return Err((
            PathSeg::Key("admin_listen"),
            format!(
                "admin_listen {} is not a loopback address and admin_token is not set: anyone reaching it \
                 could read partner data; set admin_token, or insecure_listeners: true",
                config.admin_listen
            ),
        ));
    }
    Ok(())
}

fn config_dir(config_path: &Path) -> &Path {
    match config_path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    }
}

fn empty_is_none<'de, D: Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    Ok(Option::<String>::deserialize(d)?.filter(|s| !s.is_empty()))
}

fn optional_duration<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
    duration(d).map(Some)
}

fn duration<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    let text = String::deserialize(d)?;
    humantime::parse_duration(&text).map_err(|e| {
        serde::de::Error::custom(format!("{text:?} is not a duration like 60s or 5m: {e}"))
    })
}

impl Config {
    /// Reads, expands and validates the config file; relative paths become relative to its folder.
    pub fn load(path: &Path) -> Result<Config, SourceError> {
        let source = Source::read(path)?.expand_env()?;
        Self::from_source(&source)
    }

    /// Validates an already read (and expanded) config source.
    pub fn from_source(source: &Source) -> Result<Config, SourceError> {
        let mut config: Config = source.parse()?;
        if config
            .identity
            .jwt
            .as_ref()
            .is_some_and(|jwt| jwt.providers.is_empty())
        {
            return Err(source.error_at(
                &[PathSeg::Key("identity"), PathSeg::Key("jwt")],
                "identity.jwt needs at least one provider",
            ));
        }
        if let Some(billing) = &config.billing
            && let Err(message) = billing.stripe.validate()
        {
            return Err(
                source.error_at(&[PathSeg::Key("billing"), PathSeg::Key("stripe")], message)
            );
        }
        if config.quota.store == StoreKind::Redis && config.quota.redis_url.is_none() {
            return Err(source.error_at(
                &[PathSeg::Key("quota"), PathSeg::Key("store")],
                "store: redis needs quota.redis_url",
            ));
        }
        if let Some(url) = &config.quota.redis_url {
            let urls: Vec<&str> = if config.quota.redis_cluster {
                url.split(',').map(str::trim).collect()
            } else {
                vec![url.as_str()]
            };
            // Parsing only (no connection): `tollgate check` must not need Redis to be up.
            if urls.iter().any(|u| redis::Client::open(*u).is_err()) {
                return Err(source.error_at(
                    &[PathSeg::Key("quota"), PathSeg::Key("redis_url")],
                    "redis_url is not a redis:// or rediss:// URL (for a cluster: a comma-separated list)",
                ));
            }
        }
        if config.quota.hold_timeout < Duration::from_secs(1) {
            return Err(source.error_at(
                &[PathSeg::Key("quota"), PathSeg::Key("hold_timeout")],
                "hold_timeout must be at least 1s (and longer than the longest response)",
            ));
        }
        if config.quota.persist_interval.is_zero() {
            return Err(source.error_at(
                &[PathSeg::Key("quota"), PathSeg::Key("persist_interval")],
                "persist_interval must be longer than 0s",
            ));
        }
        if config.quota.timeout.is_zero() {
            return Err(source.error_at(
                &[PathSeg::Key("quota"), PathSeg::Key("timeout")],
                "timeout must be longer than 0s",
            ));
        }
        let api_key = &config.identity.api_key;
        if api_key.headers.is_empty()
            && api_key.query_params.is_empty()
            && config.identity.jwt.is_none()
        {
            return Err(source.error_at(
                &[PathSeg::Key("identity"), PathSeg::Key("api_key")],
                "api_key needs at least one header or query parameter",
            ));
        }
        for (i, h) in api_key.headers.iter().enumerate() {
            if h.is_empty()
                || h.starts_with(':')
                || h.bytes()
                    .any(|b| b.is_ascii_uppercase() || b.is_ascii_whitespace())
            {
                return Err(source.error_at(
                    &[
                        PathSeg::Key("identity"),
                        PathSeg::Key("api_key"),
                        PathSeg::Key("headers"),
                        PathSeg::Index(i),
                    ],
                    format!("{h:?} is not a lowercase header name"),
                ));
            }
        }
        if !config.insecure_listeners {
            open_listener(&config).map_err(|(key, message)| source.error_at(&[key], message))?;
        }
        if config.metering.window.is_zero() {
            return Err(source.error_at(
                &[PathSeg::Key("metering"), PathSeg::Key("window")],
                "window must be longer than 0s",
            ));
        }
        let base = config_dir(source.path());
        config.catalog.path = config.catalog.path.as_ref().map(|p| base.join(p));
        config.catalog.ca_path = config.catalog.ca_path.as_ref().map(|p| base.join(p));
        catalog_source(&config.catalog)
            .map_err(|(key, message)| source.error_at(&[PathSeg::Key("catalog"), key], message))?;
        config.metering.dir = base.join(&config.metering.dir);
        config.base_dir = base.to_path_buf();
        config.state.url = Some(state_url(&config, base).map_err(|message| {
            source.error_at(&[PathSeg::Key("state"), PathSeg::Key("url")], message)
        })?);
        if config.state.sync_interval.is_zero() {
            return Err(source.error_at(
                &[PathSeg::Key("state"), PathSeg::Key("sync_interval")],
                "sync_interval must be longer than 0s",
            ));
        }
        if let Err(message) = Prefix::parse(&config.self_service.path_prefix) {
            return Err(source.error_at(
                &[PathSeg::Key("self_service"), PathSeg::Key("path_prefix")],
                message,
            ));
        }
        for (i, name) in config.metadata_attributes.iter().enumerate() {
            let here = [PathSeg::Key("metadata_attributes"), PathSeg::Index(i)];
            if name.is_empty() || name.chars().any(char::is_control) {
                return Err(source.error_at(&here, format!("{name:?} is not an attribute name")));
            }
            if config.metadata_attributes[..i].contains(name) {
                return Err(source.error_at(&here, format!("{name:?} is listed twice")));
            }
        }
        if let Some(files) = &config.admin_tls
            && files.client_ca_path.is_some()
        {
            // The kubelet's probes and Prometheus reach the admin port without a client certificate.
            return Err(source.error_at(
                &[PathSeg::Key("admin_tls"), PathSeg::Key("client_ca_path")],
                "admin_tls takes cert_path and key_path only: the admin port has no mTLS",
            ));
        }
        for (name, files, alpn) in [
            ("grpc_tls", &mut config.grpc_tls, Alpn::H2),
            ("admin_tls", &mut config.admin_tls, Alpn::Http11),
        ] {
            if let Some(files) = files {
                *files = files.resolved(base);
                // Reads and parses the files only (no listener): `tollgate check` can run it anywhere.
                if let Err(e) = tls::server_config(files, alpn) {
                    return Err(source.error_at(
                        &[PathSeg::Key(name), PathSeg::Key(e.key())],
                        format!("{name}.{e}"),
                    ));
                }
            }
        }
        Ok(config)
    }

    /// The metering options: the config's values; without a configured producer, the spool folder's own
    /// random one (a host name is neither unique per spool nor stable across pod restarts).
    pub fn metering_options(&self) -> MeteringOptions {
        let m = &self.metering;
        let mut options = match &m.producer {
            Some(producer) => MeteringOptions::new(&m.dir, m.window, m.lateness, producer.clone()),
            None => MeteringOptions::with_spool_producer(&m.dir, m.window, m.lateness),
        };
        if let Some(retention) = m.retention {
            options.retention = retention;
        }
        options.max_disk_bytes = m.max_disk_bytes;
        options.commit_interval = m.commit_interval;
        options
    }

    /// The state store URL (`Config::load` fills in the default and makes an SQLite path absolute).
    pub fn state_url(&self) -> &str {
        self.state.url.as_deref().unwrap_or_default()
    }

    /// The parts of the config that decisions depend on.
    pub fn settings(&self) -> Settings {
        Settings {
            environment: self.environment.clone(),
            api_context_extension: self.api_context_extension.clone(),
            api_host_fallback: self.api_host_fallback,
            upstream_identity_headers: self.upstream_identity_headers,
            api_key: self.identity.api_key.clone(),
            on_store_error: self.quota.on_store_error,
            on_store_error_by_api: self.quota.on_store_error_by_api.clone(),
            bearer: self.identity.jwt.is_some(),
            stripe_grace: i64::try_from(
                self.billing
                    .as_ref()
                    .map_or(crate::billing::config::DEFAULT_GRACE_PERIOD, |b| {
                        b.stripe.grace_period
                    })
                    .as_secs(),
            )
            .unwrap_or(i64::MAX),
            self_service: self
                .self_service
                .enabled
                .then(|| Prefix::parse(&self.self_service.path_prefix).ok())
                .flatten(),
            metadata_attributes: self.metadata_attributes.clone(),
            hold_timeout: i64::try_from(self.quota.hold_timeout.as_secs()).unwrap_or(i64::MAX),
            ratelimit_headers: self.ratelimit_headers,
            metadata: self.metadata,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load_text(text: &str, env: &[(&str, &str)]) -> Result<Config, SourceError> {
        let vars: Vec<(String, String)> = env
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        let source = Source::from_text("/etc/tollgate/tollgate.yaml", text.to_owned())
            .expand_with(|name| vars.iter().find(|(k, _)| k == name).map(|(_, v)| v.clone()))?;
        Config::from_source(&source)
    }

    /// The error a config text gives (`Config` has no `Debug`, so `unwrap_err` is not available).
    fn load_err(text: &str, env: &[(&str, &str)]) -> String {
        match load_text(text, env) {
            Ok(_) => panic!("expected an error"),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn the_contract_example_loads_with_defaults_and_expansion() {
        let text = "\
grpc_listen: 127.0.0.1:9101
admin_token: ${TOLLGATE_ADMIN_TOKEN:-}
environment: ${ENV:-prod}
catalog:
  path: catalog.yaml
identity:
  api_key: {headers: [x-api-key], query_params: [apikey]}
api_context_extension: tollgate_api
quota:
  store: memory
  on_store_error: allow
metering:
  dir: ./data
  window: 60s
  lateness: 10s
";
        let c = load_text(text, &[]).unwrap();
        assert_eq!(c.grpc_listen.port(), 9101);
        assert_eq!(c.admin_listen.port(), 9002);
        assert_eq!(c.admin_token, None);
        assert_eq!(c.environment.as_deref(), Some("prod"));
        assert_eq!(
            c.catalog.path,
            Some(PathBuf::from("/etc/tollgate/catalog.yaml"))
        );
        assert_eq!(c.metering.dir, PathBuf::from("/etc/tollgate/./data"));
        assert_eq!(c.quota.on_store_error, OnStoreError::Allow);
        let c = load_text(text, &[("TOLLGATE_ADMIN_TOKEN", "s3cret"), ("ENV", "test")]).unwrap();
        assert_eq!(c.admin_token.as_deref(), Some("s3cret"));
        assert_eq!(c.environment.as_deref(), Some("test"));
    }

    #[test]
    fn a_remote_catalog_is_one_safe_source() {
        let c = load_text(
            "catalog:\n  url: https://portal.example.com/catalog\n  headers: {authorization: 'Bearer ${T}'}\n  ca_path: ca.crt\n",
            &[("T", "tok")],
        )
        .unwrap();
        assert_eq!(c.catalog.path, None);
        assert_eq!(c.catalog.poll_interval, Duration::from_secs(30));
        assert_eq!(c.catalog.timeout, Duration::from_secs(10));
        assert_eq!(
            c.catalog.headers.get("authorization").map(String::as_str),
            Some("Bearer tok")
        );
        assert!(c.catalog.ca_path.is_some_and(|p| p.is_absolute()));
        for (text, expected) in [
            ("catalog: {}\n", "catalog.path (a file) or catalog.url"),
            (
                "catalog: {path: c.yaml, url: 'https://x.example/c'}\n",
                "not both",
            ),
            ("catalog: {url: 'http://x.example/c'}\n", "must be https"),
            (
                "catalog: {url: 'https://u:p@x.example/c'}\n",
                "put them in catalog.headers",
            ),
            (
                "catalog: {url: 'https://x.example/c', poll_interval: 10ms}\n",
                "at least 1s",
            ),
            (
                "catalog: {url: 'https://x.example/c', headers: {'bad name': x}}\n",
                "not a header name",
            ),
        ] {
            let e = load_err(text, &[]);
            assert!(e.contains(expected), "{text}: {e}");
        }
        let e = load_err(
            "catalog: {url: 'https://x.example/c', headers: {authorization: \"${T}\"}}\n",
            &[("T", "Bearer s3cret\u{1}")],
        );
        assert!(
            e.contains("not a valid header value") && !e.contains("s3cret"),
            "{e}"
        );
    }

    #[test]
    fn metadata_attributes_are_names_listed_once() {
        let c = load_text(
            "catalog: {path: c.yaml}\nmetadata_attributes: [deprecated, tier]\n",
            &[],
        )
        .unwrap();
        assert_eq!(c.settings().metadata_attributes, vec!["deprecated", "tier"]);
        let e = load_err(
            "catalog: {path: c.yaml}\nmetadata_attributes: [tier, tier]\n",
            &[],
        );
        assert!(e.contains("listed twice"), "{e}");
    }

    #[test]
    fn self_service_is_on_at_its_default_prefix_and_its_prefix_is_validated() {
        let c = load_text("catalog: {path: c.yaml}\n", &[]).unwrap();
        assert!(c.self_service.enabled);
        assert_eq!(
            c.settings().self_service.as_ref().map(Prefix::as_str),
            Some("/.tollgate/")
        );
        let c = load_text(
            "catalog: {path: c.yaml}\nself_service: {path_prefix: /partner/self/}\n",
            &[],
        )
        .unwrap();
        assert_eq!(
            c.settings().self_service.as_ref().map(Prefix::as_str),
            Some("/partner/self/")
        );
        let c = load_text(
            "catalog: {path: c.yaml}\nself_service: {enabled: false}\n",
            &[],
        )
        .unwrap();
        assert_eq!(c.settings().self_service, None);
        for bad in [
            "/",
            "tollgate/",
            "/tollgate",
            "/../",
            "/a/../b/",
            "/a//b/",
            "/a b/",
            "/a?b/",
            "/%2e/",
        ] {
            let text =
                format!("catalog: {{path: c.yaml}}\nself_service: {{path_prefix: '{bad}'}}\n");
            let got = load_err(&text, &[]);
            assert!(
                got.starts_with("/etc/tollgate/tollgate.yaml:2:29: path_prefix"),
                "{bad}: {got}"
            );
        }
        let got = load_err(
            "catalog: {path: c.yaml}\nself_service: {prefix: /x/}\n",
            &[],
        );
        assert!(got.contains("unknown field `prefix`"), "{got}");
    }

    #[test]
    fn errors_are_positioned() {
        let cases = [
            (
                "catalog: {path: c.yaml}\ngrpc_lissen: 1\n",
                "/etc/tollgate/tollgate.yaml:2:1: unknown field `grpc_lissen`",
            ),
            (
                "catalog: {path: c.yaml}\nquota: {store: redis, redis_url: 'not a url'}\n",
                "/etc/tollgate/tollgate.yaml:2:34: redis_url is not a redis:// or rediss:// URL",
            ),
            (
                "catalog: {path: c.yaml}\nquota: {store: mongo}\n",
                "/etc/tollgate/tollgate.yaml:2:16: quota.store: unknown variant `mongo`",
            ),
            (
                "catalog: {path: c.yaml}\ngrpc_listen: nowhere\n",
                "/etc/tollgate/tollgate.yaml:2:14: ",
            ),
            (
                "catalog: {path: c.yaml}\nmetering: {window: soon}\n",
                "/etc/tollgate/tollgate.yaml:2:11: metering: \"soon\" is not a duration",
            ),
            (
                "catalog: {path: c.yaml}\nidentity: {api_key: {headers: [X-Key]}}\n",
                "/etc/tollgate/tollgate.yaml:2:32: \"X-Key\" is not a lowercase header name",
            ),
            ("grpc_listen: 127.0.0.1:1\n", "/etc/tollgate/tollgate.yaml:"),
        ];
        for (text, want) in cases {
            let got = load_err(text, &[]);
            assert!(got.starts_with(want), "got {got:?}, want prefix {want:?}");
        }
    }

    #[test]
    fn a_token_that_spells_yaml_is_still_the_token() {
        let text = "catalog: {path: c.yaml}\nadmin_token: ${T}\n";
        for value in ["null", "~", "abc #def", "a: b"] {
            let c = load_text(text, &[("T", value)]).unwrap();
            assert_eq!(c.admin_token.as_deref(), Some(value), "{value:?}");
        }
    }

    #[test]
    fn listeners_beyond_loopback_need_their_token() {
        let open_grpc = "catalog: {path: c.yaml}\ngrpc_listen: 0.0.0.0:9001\n";
        let err = load_err(open_grpc, &[]);
        assert!(
            err.starts_with(
                "/etc/tollgate/tollgate.yaml:2:14: grpc_listen 0.0.0.0:9001 is not a loopback"
            ),
            "{err}"
        );
        assert!(err.contains("access_log_token"), "{err}");
        assert!(err.contains("grpc_tls.client_ca_path"), "{err}");
        let with_token = format!("{open_grpc}access_log_token: ${{T}}\n");
        assert!(load_text(&with_token, &[("T", "t0k3n")]).is_ok());
        assert!(load_text(&format!("{open_grpc}insecure_listeners: true\n"), &[]).is_ok());
        // An empty token is no token: `${VAR:-}` with VAR unset must not open the listener.
        let empty = format!("{open_grpc}access_log_token: ${{T:-}}\n");
        assert!(load_err(&empty, &[]).contains("grpc_listen"));

        let open_admin = "catalog: {path: c.yaml}\nadmin_listen: '[::]:9002'\n";
        let err = load_err(open_admin, &[]);
        assert!(
            err.contains("admin_listen [::]:9002 is not a loopback"),
            "{err}"
        );
        assert!(err.contains("admin_token"), "{err}");
        let with_token = format!("{open_admin}admin_token: s3cret\n");
        assert!(load_text(&with_token, &[]).is_ok());
        let loopback =
            "catalog: {path: c.yaml}\ngrpc_listen: '[::1]:9001'\nadmin_listen: 127.0.0.2:9002\n";
        assert!(load_text(loopback, &[]).is_ok());
    }

    /// A folder with `ca.crt`, and `tls.crt`/`tls.key` for localhost signed by it.
    fn tls_files() -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        let ca_key = rcgen::KeyPair::generate().unwrap();
        let mut ca = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let ca_cert = ca.self_signed(&ca_key).unwrap();
        let issuer = rcgen::Issuer::new(ca, ca_key);
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec!["localhost".to_owned()])
            .unwrap()
            .signed_by(&key, &issuer)
            .unwrap();
        std::fs::write(dir.path().join("ca.crt"), ca_cert.pem()).unwrap();
        std::fs::write(dir.path().join("tls.crt"), cert.pem()).unwrap();
        std::fs::write(dir.path().join("tls.key"), key.serialize_pem()).unwrap();
        dir
    }

    fn load_in(dir: &Path, text: &str) -> Result<Config, SourceError> {
        Config::from_source(&Source::from_text(
            dir.join("tollgate.yaml"),
            text.to_owned(),
        ))
    }

    #[test]
    fn tls_files_resolve_beside_the_config_and_are_checked_at_load() {
        let dir = tls_files();
        let text = "catalog: {path: c.yaml}\n\
                    grpc_tls: {cert_path: tls.crt, key_path: tls.key, client_ca_path: ca.crt}\n\
                    admin_tls: {cert_path: tls.crt, key_path: tls.key}\n";
        let Ok(c) = load_in(dir.path(), text) else {
            panic!("the TLS config did not load")
        };
        let grpc = c.grpc_tls.unwrap();
        assert_eq!(grpc.cert_path, dir.path().join("tls.crt"));
        assert_eq!(grpc.client_ca_path, Some(dir.path().join("ca.crt")));
        assert_eq!(c.admin_tls.unwrap().key_path, dir.path().join("tls.key"));

        let err = |text: &str| match load_in(dir.path(), text) {
            Ok(_) => panic!("expected an error for {text:?}"),
            Err(e) => e.to_string(),
        };
        let missing =
            err("catalog: {path: c.yaml}\ngrpc_tls: {cert_path: nope.crt, key_path: tls.key}\n");
        assert!(missing.contains(":2:"), "{missing}");
        assert!(missing.contains("grpc_tls.cert_path"), "{missing}");
        assert!(missing.contains("nope.crt cannot be read"), "{missing}");
        // The CA's certificate with the leaf's key: a pair that does not match.
        let mismatch =
            err("catalog: {path: c.yaml}\nadmin_tls: {cert_path: ca.crt, key_path: tls.key}\n");
        assert!(mismatch.contains(":2:"), "{mismatch}");
        assert!(
            mismatch.contains("does not match the certificate"),
            "{mismatch}"
        );
        let not_pem =
            err("catalog: {path: c.yaml}\nadmin_tls: {cert_path: tls.key, key_path: tls.key}\n");
        assert!(not_pem.contains("admin_tls.cert_path"), "{not_pem}");
        let key_as_cert =
            err("catalog: {path: c.yaml}\nadmin_tls: {cert_path: tls.crt, key_path: tls.crt}\n");
        assert!(key_as_cert.contains("admin_tls.key_path"), "{key_as_cert}");
        let admin_mtls = err("catalog: {path: c.yaml}\n\
             admin_tls: {cert_path: tls.crt, key_path: tls.key, client_ca_path: ca.crt}\n");
        assert!(admin_mtls.contains("no mTLS"), "{admin_mtls}");
    }

    #[test]
    fn grpc_mtls_stands_in_for_the_access_log_token() {
        let dir = tls_files();
        let open = "catalog: {path: c.yaml}\ngrpc_listen: 0.0.0.0:9001\n";
        let mtls = format!(
            "{open}grpc_tls: {{cert_path: tls.crt, key_path: tls.key, client_ca_path: ca.crt}}\n"
        );
        assert!(load_in(dir.path(), &mtls).is_ok());
        // TLS without client certificates authenticates nobody.
        let tls_only = format!("{open}grpc_tls: {{cert_path: tls.crt, key_path: tls.key}}\n");
        match load_in(dir.path(), &tls_only) {
            Ok(_) => panic!("server-only TLS opened the gRPC listener"),
            Err(e) => assert!(e.to_string().contains("access_log_token"), "{e}"),
        }
    }

    #[test]
    fn an_unset_variable_is_named_and_no_value_leaks() {
        let err = load_err("catalog: {path: c.yaml}\nadmin_token: ${NOPE}\n", &[]);
        assert!(err.contains("NOPE"), "{err}");
        let err = load_err(
            "catalog: {path: c.yaml}\ngrpc_listen: ${ADDR}\n",
            &[("ADDR", "hunter2")],
        );
        assert!(!err.contains("hunter2"), "{err}");
    }
}
