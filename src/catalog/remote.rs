//! A catalog served over HTTPS (`catalog.url`, CONTRACT §12), as Apigee's adapter polls its remote service.
//!
//! - **Polling.** Every `poll_interval` one conditional GET (`If-None-Match`, `If-Modified-Since`): a 304 costs
//!   no parse and no reload, nor does a 200 whose bytes are the ones already served. A fetch is retried with
//!   exponential backoff and jitter on transport errors, 408, 429 and 5xx; any other status, a redirect, a
//!   content type that is neither JSON nor YAML, a body past [`MAX_BYTES`] or an invalid catalog fails the poll.
//!   A failed poll keeps the catalog served (log line, `tollgate_catalog_fetches_total{result}`).
//! - **The last good copy** is kept in `metering.dir` (`catalog.remote` and its metadata, written atomically
//!   after the catalog was installed), so a replica restarted while the remote is down serves what it served
//!   before. The copy is trusted only for the same URL and only when its digest matches; its validators go with
//!   the first request, so a restart with an unchanged remote costs a 304.
//! - **Safety.** https, or http to a loopback address only; credentials belong in `catalog.headers` (never in
//!   the URL, which logs name without its query); headers are marked sensitive; the remote's document is never
//!   `${VAR}`-expanded (it must not read this process's environment).

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use reqwest::header::{self, HeaderMap, HeaderName, HeaderValue};
use reqwest::{StatusCode, Url};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tokio::sync::watch;

use super::metrics::CatalogMetrics;
use super::watch::{Installer, Loaded, install, parse_text};
use crate::app::config::CatalogConfig;
use crate::source::SourceError;
use crate::util::durable::replace_file;

/// Largest catalog document accepted (a million keys is about 150 MB of YAML).
pub const MAX_BYTES: usize = 256 * 1024 * 1024;
/// Tries of one fetch before the poll counts as failed.
const ATTEMPTS: u32 = 3;
/// First wait between tries; it doubles, with jitter, up to [`MAX_BACKOFF`].
const INITIAL_BACKOFF: Duration = Duration::from_millis(500);
/// Cap of the wait between tries.
const MAX_BACKOFF: Duration = Duration::from_secs(10);
/// The cached document, in `metering.dir`.
const CACHE_FILE: &str = "catalog.remote";
/// What the cached document is: its URL's and its own digests, its validators.
const CACHE_META: &str = "catalog.remote.json";

/// Checks that `text` is a URL tollgate may poll for its catalog; the error is one sentence for the config.
pub fn check_url(text: &str) -> Result<Url, String> {
    let url = Url::parse(text).map_err(|e| format!("catalog.url is not a URL: {e}"))?;
    if !url.username().is_empty() || url.password().is_some() {
        return Err("catalog.url must not carry credentials: put them in catalog.headers".into());
    }
    match url.scheme() {
        "https" => Ok(url),
        "http" if is_loopback(&url) => Ok(url),
        "http" => Err(
            "catalog.url must be https (plain http only to a loopback address): the catalog holds every key"
                .into(),
        ),
        other => Err(format!("catalog.url scheme {other} is not https")),
    }
}

fn is_loopback(url: &Url) -> bool {
    match url.host() {
        Some(url::Host::Ipv4(ip)) => ip.is_loopback(),
        Some(url::Host::Ipv6(ip)) => ip.is_loopback(),
        Some(url::Host::Domain(name)) => name.eq_ignore_ascii_case("localhost"),
        None => false,
    }
}

/// The URL as logs and errors name it: no query (it may hold a token).
fn shown(url: &Url) -> String {
    let mut shown = url.clone();
    shown.set_query(None);
    shown.set_fragment(None);
    shown.to_string()
}

/// What makes the next fetch conditional.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Validators {
    /// The last `ETag`, sent back as `If-None-Match`.
    pub etag: Option<String>,
    /// The last `Last-Modified`, sent back as `If-Modified-Since`.
    pub last_modified: Option<String>,
}

/// A catalog document as the remote served it.
#[derive(Debug, Clone)]
pub struct Document {
    /// The text (JSON or YAML).
    pub text: String,
    /// Its validators.
    pub validators: Validators,
}

/// What one fetch brought.
#[derive(Debug)]
pub enum Fetched {
    /// 304: what was sent last is still current.
    NotModified,
    /// A document.
    Fresh(Document),
}

/// Why a fetch failed.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    /// No answer (connection, TLS, timeout).
    #[error("cannot fetch the catalog from {url}: {cause}")]
    Transport {
        /// The URL, without its query.
        url: String,
        /// What failed, with its causes (never the URL, which may carry a query).
        cause: String,
    },
    /// An answer that is not a catalog.
    #[error("cannot fetch the catalog from {url}: {problem}")]
    Refused {
        /// The URL, without its query.
        url: String,
        /// What was wrong with the answer.
        problem: String,
        /// Whether another try may succeed (408, 429, 5xx).
        retry: bool,
    },
}

impl FetchError {
    fn retryable(&self) -> bool {
        match self {
            FetchError::Transport { .. } => true,
            FetchError::Refused { retry, .. } => *retry,
        }
    }
}

/// Why the remote catalog could not be set up or first loaded.
#[derive(Debug, thiserror::Error)]
pub enum RemoteError {
    /// The config cannot make a client (a bad `ca_path`, header).
    #[error("catalog.url: {0}")]
    Setup(String),
    /// The remote could not be read.
    #[error("{0}")]
    Fetch(FetchError),
    /// The first fetch at start failed and no cached copy exists.
    #[error("{0}; no cached copy to serve instead")]
    NoCopy(FetchError),
    /// The document (fetched or cached) is not a valid catalog.
    #[error(transparent)]
    Invalid(#[from] SourceError),
}

/// The cached copy's metadata.
#[derive(Serialize, Deserialize)]
struct CacheMeta {
    /// SHA-256 of the full URL: a copy of another remote is never served.
    url: String,
    /// SHA-256 of the cached text: a torn pair of files is never served.
    text: String,
    validators: Validators,
}

/// A remote catalog: its client, where its cached copy lives, and its metrics.
pub struct Remote {
    url: Url,
    shown: String,
    client: reqwest::Client,
    headers: HeaderMap,
    poll_interval: Duration,
    cache_dir: PathBuf,
    metrics: CatalogMetrics,
}

impl Remote {
    /// A remote for `config.url`, caching its last good copy in `cache_dir`.
    pub fn new(
        config: &CatalogConfig,
        cache_dir: &Path,
        metrics: CatalogMetrics,
    ) -> Result<Remote, RemoteError> {
        let url = config.url.as_deref().unwrap_or_default();
        let url = check_url(url).map_err(RemoteError::Setup)?;
        let mut headers = HeaderMap::new();
        headers.insert(
            header::ACCEPT,
            HeaderValue::from_static("application/json, application/yaml;q=0.9, */*;q=0.1"),
        );
        for (name, value) in &config.headers {
            let name = HeaderName::from_bytes(name.as_bytes())
                .map_err(|_| RemoteError::Setup(format!("{name:?} is not a header name")))?;
            let mut value = HeaderValue::from_str(value).map_err(|_| {
                RemoteError::Setup(format!("the value of header {name} is not a header value"))
            })?;
            value.set_sensitive(true);
            headers.insert(name, value);
        }
        let mut builder = reqwest::Client::builder()
            .timeout(config.timeout)
            .connect_timeout(config.timeout)
            .redirect(reqwest::redirect::Policy::none())
            .user_agent(concat!("tollgate/", env!("CARGO_PKG_VERSION")));
        if let Some(path) = &config.ca_path {
            let pem = std::fs::read(path).map_err(|e| {
                RemoteError::Setup(format!("cannot read ca_path {}: {e}", path.display()))
            })?;
            let certificates = reqwest::Certificate::from_pem_bundle(&pem)
                .map_err(|e| RemoteError::Setup(format!("ca_path {}: {e}", path.display())))?;
            if certificates.is_empty() {
                return Err(RemoteError::Setup(format!(
                    "ca_path {} holds no PEM certificate",
                    path.display()
                )));
            }
            for certificate in certificates {
                builder = builder.add_root_certificate(certificate);
            }
        }
        let client = builder
            .build()
            .map_err(|e| RemoteError::Setup(format!("cannot build the HTTP client: {e}")))?;
        Ok(Remote {
            shown: shown(&url),
            url,
            client,
            headers,
            poll_interval: config.poll_interval,
            cache_dir: cache_dir.to_path_buf(),
            metrics,
        })
    }

    /// The URL as logs name it.
    pub fn shown(&self) -> &str {
        &self.shown
    }

    /// Fetches once, validates, and never looks at the cache: what `tollgate check` does.
    pub async fn fetch_valid(&self) -> Result<Loaded, RemoteError> {
        match self
            .fetch(&Validators::default())
            .await
            .map_err(RemoteError::Fetch)?
        {
            Fetched::Fresh(document) => Ok(self.parse(document.text, None).await?.ok_or_else(
                // Without a known digest every parse yields a catalog; this only keeps the types honest.
                || RemoteError::Setup("the document was not parsed".into()),
            )?),
            Fetched::NotModified => Err(RemoteError::Fetch(
                self.refused("304 Not Modified to an unconditional request".into(), false),
            )),
        }
    }

    /// The first catalog at start: fetched, else the cached copy (logged); the validators it was served with.
    pub async fn start(&self) -> Result<(Loaded, Validators), RemoteError> {
        let cached = self.read_cache();
        let asked = cached
            .as_ref()
            .map(|d| d.validators.clone())
            .unwrap_or_default();
        let failure = match self.fetch(&asked).await {
            Ok(Fetched::Fresh(document)) => match self.parse(document.text.clone(), None).await {
                Ok(Some(loaded)) => {
                    self.metrics.fetch("ok");
                    return Ok((loaded, self.keep(document).await));
                }
                Ok(None) => return Err(RemoteError::Setup("the document was not parsed".into())),
                Err(invalid) => {
                    self.metrics.fetch("invalid");
                    RemoteError::Invalid(invalid)
                }
            },
            Ok(Fetched::NotModified) => match cached {
                Some(document) => {
                    self.metrics.fetch("not_modified");
                    let loaded = self.parse_cached(document.text).await?;
                    return Ok((loaded, document.validators));
                }
                None => RemoteError::NoCopy(
                    self.refused("304 Not Modified to an unconditional request".into(), false),
                ),
            },
            Err(e) => {
                self.metrics.fetch("error");
                RemoteError::NoCopy(e)
            }
        };
        let Some(document) = self.read_cache() else {
            return Err(failure);
        };
        tracing::warn!(
            url = %self.shown,
            error = %failure,
            "remote catalog unavailable at start; serving the cached copy"
        );
        let loaded = self.parse_cached(document.text).await?;
        Ok((loaded, document.validators))
    }

    /// Polls until `shutdown` changes, installing each new valid catalog through `installer`.
    pub async fn run(
        self,
        installer: Installer,
        mut validators: Validators,
        mut digest: [u8; 32],
        mut shutdown: watch::Receiver<bool>,
    ) {
        let mut poll = tokio::time::interval(self.poll_interval);
        poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        poll.tick().await;
        loop {
            tokio::select! {
                _ = shutdown.changed() => return,
                _ = poll.tick() => {}
            }
            let fetched = tokio::select! {
                _ = shutdown.changed() => return,
                fetched = self.fetch(&validators) => fetched,
            };
            let document = match fetched {
                Ok(Fetched::NotModified) => {
                    self.metrics.fetch("not_modified");
                    continue;
                }
                Ok(Fetched::Fresh(document)) => document,
                Err(e) => {
                    self.metrics.fetch("error");
                    tracing::warn!(error = %e, "catalog fetch failed; keeping the last good catalog");
                    continue;
                }
            };
            match self.parse(document.text.clone(), Some(digest)).await {
                Ok(None) => {
                    self.metrics.fetch("unchanged");
                    validators = document.validators;
                }
                Ok(Some(loaded)) => match install(&installer, loaded, &self.metrics) {
                    Ok(installed) => {
                        self.metrics.fetch("ok");
                        digest = installed;
                        validators = self.keep(document).await;
                    }
                    Err(e) => {
                        self.metrics.fetch("invalid");
                        self.metrics.reload_errors.inc();
                        tracing::warn!(url = %self.shown, error = %e, "remote catalog rejected; keeping the last good catalog");
                    }
                },
                Err(e) => {
                    self.metrics.fetch("invalid");
                    self.metrics.reload_errors.inc();
                    tracing::warn!(error = %e, "remote catalog rejected; keeping the last good catalog");
                }
            }
        }
    }

    /// One fetch, tried up to [`ATTEMPTS`] times while the failure is one a retry may cure.
    pub async fn fetch(&self, validators: &Validators) -> Result<Fetched, FetchError> {
        let mut attempt = 1;
        loop {
            match self.fetch_once(validators).await {
                Err(e) if e.retryable() && attempt < ATTEMPTS => {
                    let wait = crate::billing::backoff(INITIAL_BACKOFF, MAX_BACKOFF, attempt, None);
                    tracing::debug!(error = %e, attempt, "catalog fetch failed; retrying");
                    tokio::time::sleep(wait).await;
                    attempt += 1;
                }
                other => return other,
            }
        }
    }

    async fn fetch_once(&self, validators: &Validators) -> Result<Fetched, FetchError> {
        let transport = |e: reqwest::Error| FetchError::Transport {
            url: self.shown.clone(),
            cause: causes(&e.without_url()),
        };
        let mut request = self
            .client
            .get(self.url.clone())
            .headers(self.headers.clone());
        if let Some(etag) = validators.etag.as_deref() {
            request = request.header(header::IF_NONE_MATCH, etag);
        }
        if let Some(since) = validators.last_modified.as_deref() {
            request = request.header(header::IF_MODIFIED_SINCE, since);
        }
        let mut response = request.send().await.map_err(transport)?;
        let status = response.status();
        if status == StatusCode::NOT_MODIFIED {
            return Ok(Fetched::NotModified);
        }
        if status.is_redirection() {
            return Err(self.refused(
                format!(
                    "{status}: redirects are not followed; set catalog.url to the final address"
                ),
                false,
            ));
        }
        if !status.is_success() {
            let retry = status.is_server_error()
                || status == StatusCode::TOO_MANY_REQUESTS
                || status == StatusCode::REQUEST_TIMEOUT;
            return Err(self.refused(format!("answered {status}"), retry));
        }
        let json = match response
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
        {
            None => false,
            Some(content_type) => match media_type(content_type) {
                Some(Format::Json) => true,
                Some(Format::Yaml) => false,
                None => {
                    return Err(self.refused(
                        format!("content type {content_type:?} is not a catalog (JSON or YAML)"),
                        false,
                    ));
                }
            },
        };
        let text_of = |name: header::HeaderName| {
            response
                .headers()
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned)
        };
        let validators = Validators {
            etag: text_of(header::ETAG),
            last_modified: text_of(header::LAST_MODIFIED),
        };
        if response
            .content_length()
            .is_some_and(|len| len > MAX_BYTES as u64)
        {
            return Err(self.refused(
                format!("the catalog is larger than {MAX_BYTES} bytes"),
                false,
            ));
        }
        let mut body = Vec::new();
        while let Some(chunk) = response.chunk().await.map_err(transport)? {
            if body.len() + chunk.len() > MAX_BYTES {
                return Err(self.refused(
                    format!("the catalog is larger than {MAX_BYTES} bytes"),
                    false,
                ));
            }
            body.extend_from_slice(&chunk);
        }
        // Up to MAX_BYTES of UTF-8 and JSON checks: off the async workers.
        let checked = tokio::task::spawn_blocking(move || {
            let text =
                String::from_utf8(body).map_err(|_| "the catalog is not UTF-8".to_owned())?;
            if json && let Err(e) = serde_json::from_str::<serde::de::IgnoredAny>(&text) {
                return Err(format!(
                    "served as JSON, but it is not JSON (line {}, column {}): {e}",
                    e.line(),
                    e.column()
                ));
            }
            Ok(text)
        })
        .await
        .map_err(|e| format!("the check was interrupted: {e}"));
        match checked {
            Ok(Ok(text)) => Ok(Fetched::Fresh(Document { text, validators })),
            Ok(Err(problem)) | Err(problem) => Err(self.refused(problem, false)),
        }
    }

    fn refused(&self, problem: String, retry: bool) -> FetchError {
        FetchError::Refused {
            url: self.shown.clone(),
            problem,
            retry,
        }
    }

    async fn parse(
        &self,
        text: String,
        known: Option<[u8; 32]>,
    ) -> Result<Option<Loaded>, SourceError> {
        parse_text(PathBuf::from(&self.shown), text, known).await
    }

    async fn parse_cached(&self, text: String) -> Result<Loaded, RemoteError> {
        let name = self.cache_dir.join(CACHE_FILE);
        parse_text(name, text, None)
            .await?
            .ok_or_else(|| RemoteError::Setup("the cached copy was not parsed".into()))
    }

    /// Keeps `document` as the last good copy, written and fsynced on a blocking thread (a failure is logged:
    /// the catalog is served all the same), and returns its validators.
    async fn keep(&self, document: Document) -> Validators {
        self.metrics.fetched_at(SystemTime::now());
        let validators = document.validators.clone();
        let url = hex::encode(Sha256::digest(self.url.as_str().as_bytes()));
        let dir = self.cache_dir.clone();
        let written = tokio::task::spawn_blocking(move || {
            let meta = CacheMeta {
                url,
                text: hex::encode(Sha256::digest(document.text.as_bytes())),
                validators: document.validators,
            };
            std::fs::create_dir_all(&dir)
                .map_err(|e| (dir.clone(), e))
                .and_then(|()| replace_file(&dir, CACHE_FILE, document.text.as_bytes()))
                .and_then(|()| {
                    let json = serde_json::to_vec(&meta).unwrap_or_default();
                    replace_file(&dir, CACHE_META, &json)
                })
        })
        .await;
        match written {
            Ok(Ok(())) => {}
            Ok(Err((path, e))) => {
                tracing::warn!(path = %path.display(), error = %e, "cannot keep the remote catalog's copy; a restart without the remote will not serve it")
            }
            Err(e) => {
                tracing::warn!(error = %e, "keeping the remote catalog's copy was interrupted")
            }
        }
        validators
    }

    /// The cached copy of this URL's catalog, when one is there and whole.
    fn read_cache(&self) -> Option<Document> {
        let meta = std::fs::read(self.cache_dir.join(CACHE_META)).ok()?;
        let meta: CacheMeta = serde_json::from_slice(&meta).ok()?;
        if meta.url != hex::encode(Sha256::digest(self.url.as_str().as_bytes())) {
            return None;
        }
        let text = std::fs::read_to_string(self.cache_dir.join(CACHE_FILE)).ok()?;
        if meta.text != hex::encode(Sha256::digest(text.as_bytes())) {
            tracing::warn!(dir = %self.cache_dir.display(), "the cached remote catalog does not match its digest; ignoring it");
            return None;
        }
        Some(Document {
            text,
            validators: meta.validators,
        })
    }
}

/// `e` and its sources, `: `-separated, each said once (reqwest repeats itself down the chain).
fn causes(e: &(dyn std::error::Error + 'static)) -> String {
    let mut said: Vec<String> = Vec::new();
    let mut next = Some(e);
    while let Some(e) = next {
        let text = e.to_string();
        if !said.iter().any(|s| s.contains(&text)) {
            said.push(text);
        }
        next = e.source();
    }
    said.join(": ")
}

/// How a served document is read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Format {
    Json,
    /// YAML, and what YAML reads (plain text, bytes): JSON is YAML too.
    Yaml,
}

/// The format of a `content-type`, `None` for one that is no catalog (HTML, an image).
fn media_type(content_type: &str) -> Option<Format> {
    let essence = content_type
        .split(';')
        .next()
        .unwrap_or_default()
        .trim()
        .to_ascii_lowercase();
    match essence.as_str() {
        "application/json" => Some(Format::Json),
        t if t.starts_with("application/") && t.ends_with("+json") => Some(Format::Json),
        "application/yaml"
        | "application/x-yaml"
        | "text/yaml"
        | "text/x-yaml"
        | "text/plain"
        | "application/octet-stream" => Some(Format::Yaml),
        t if t.ends_with("+yaml") => Some(Format::Yaml),
        _ => None,
    }
}

/// Seconds since the Unix epoch, for the last-success gauge.
pub(crate) fn unix_seconds(at: SystemTime) -> i64 {
    at.duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_https_or_loopback_http_without_credentials() {
        assert!(check_url("https://catalog.example.com/c.yaml").is_ok());
        assert!(check_url("http://127.0.0.1:8080/c").is_ok());
        assert!(check_url("http://[::1]:8080/c").is_ok());
        assert!(check_url("http://localhost/c").is_ok());
        for bad in [
            "http://catalog.example.com/c",
            "http://10.0.0.1/c",
            "ftp://127.0.0.1/c",
            "https://user:pw@catalog.example.com/c",
            "catalog.yaml",
        ] {
            assert!(check_url(bad).is_err(), "{bad}");
        }
        let err = check_url("https://u:secret@example.com/").unwrap_err();
        assert!(!err.contains("secret"), "{err}");
    }

    #[test]
    fn logs_name_the_url_without_its_query() {
        let url = Url::parse("https://c.example.com/catalog?token=s3cret#x").unwrap();
        assert_eq!(shown(&url), "https://c.example.com/catalog");
    }

    #[test]
    fn content_types_choose_the_parser() {
        assert_eq!(
            media_type("application/json; charset=utf-8"),
            Some(Format::Json)
        );
        assert_eq!(
            media_type("application/vnd.tollgate+json"),
            Some(Format::Json)
        );
        assert_eq!(media_type("application/yaml"), Some(Format::Yaml));
        assert_eq!(media_type("text/plain"), Some(Format::Yaml));
        assert_eq!(media_type("text/html"), None);
        assert_eq!(media_type("image/png"), None);
    }
}
