//! The Redis driver: connection setup (single node, cluster, TLS), the timeouts around every call, error
//! mapping, and keeping passwords out of everything shown.
//!
//! It knows nothing of leases: the engine hands it a call and gets back a value or a [`StoreError`].

use std::future::Future;
use std::time::{Duration, Instant};

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::cluster::ClusterClientBuilder;
use redis::cluster_async::ClusterConnection;
use redis::{ErrorKind, RedisError, RedisResult, ScriptInvocation};

use super::super::StoreError;
use super::metrics::StoreMetrics;
use super::{RedisOptions, RedisStoreError};

/// The shortest budget for establishing a connection (a TLS handshake may need more than `timeout`).
const CONNECT_BUDGET: Duration = Duration::from_secs(2);

/// A connection to a single node or a cluster; both reconnect in the background.
#[derive(Clone)]
enum Conn {
    Single(ConnectionManager),
    Cluster(ClusterConnection),
}

impl Conn {
    async fn eval(&self, call: &ScriptInvocation<'_>) -> RedisResult<Vec<i64>> {
        match self.clone() {
            Conn::Single(mut c) => call.invoke_async(&mut c).await,
            Conn::Cluster(mut c) => call.invoke_async(&mut c).await,
        }
    }

    /// The `used` and `reserved` fields of one window's hash (absent: nothing counted yet).
    async fn used_and_reserved(&self, key: &str) -> RedisResult<(Option<u64>, Option<u64>)> {
        let mut read = redis::cmd("HMGET");
        read.arg(key).arg("used").arg("reserved");
        match self.clone() {
            Conn::Single(mut c) => read.query_async(&mut c).await,
            Conn::Cluster(mut c) => read.query_async(&mut c).await,
        }
    }

    async fn query<T: redis::FromRedisValue>(&self, cmd: &redis::Cmd) -> RedisResult<T> {
        match self.clone() {
            Conn::Single(mut c) => cmd.query_async(&mut c).await,
            Conn::Cluster(mut c) => cmd.query_async(&mut c).await,
        }
    }

    async fn ping(&self) -> RedisResult<()> {
        let ping = redis::cmd("PING");
        let _: String = match self.clone() {
            Conn::Single(mut c) => ping.query_async(&mut c).await?,
            Conn::Cluster(mut c) => ping.query_async(&mut c).await?,
        };
        Ok(())
    }
}

/// The connection with its call bound and what it may show of its URL.
pub(super) struct Client {
    conn: Conn,
    timeout: Duration,
    shown_url: String,
    secrets: Vec<String>,
}

impl Client {
    /// Builds the client for `options`. A single node connects lazily; a cluster must answer now, because
    /// its client learns the topology from it.
    pub(super) async fn open(options: &RedisOptions) -> Result<Client, RedisStoreError> {
        install_crypto_provider();
        let shown_url = redact_urls(&options.url);
        let secrets = url_secrets(&options.url);
        let invalid = |e: RedisError| RedisStoreError::InvalidUrl {
            url: shown_url.clone(),
            reason: redact(&e.to_string(), &secrets),
        };
        let connect_budget = options.timeout.max(CONNECT_BUDGET);
        let conn = if options.cluster {
            let nodes: Vec<&str> = options
                .url
                .split(',')
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .collect();
            if nodes.is_empty() {
                return Err(RedisStoreError::InvalidUrl {
                    url: shown_url,
                    reason: "no cluster node URL".into(),
                });
            }
            let client = ClusterClientBuilder::new(nodes)
                .connection_timeout(connect_budget)
                .response_timeout(options.timeout)
                .retries(2)
                .build()
                .map_err(invalid)?;
            let connected = tokio::time::timeout(connect_budget, client.get_async_connection())
                .await
                .map_err(|_| RedisStoreError::Connect {
                    url: shown_url.clone(),
                    reason: "timed out".into(),
                })?;
            match connected {
                Ok(conn) => Conn::Cluster(conn),
                Err(e) if is_auth_error(&e) => {
                    return Err(RedisStoreError::Auth {
                        url: shown_url,
                        reason: redact(&e.to_string(), &secrets),
                    });
                }
                Err(e) => {
                    return Err(RedisStoreError::Connect {
                        url: shown_url,
                        reason: redact(&e.to_string(), &secrets),
                    });
                }
            }
        } else {
            let client = redis::Client::open(options.url.as_str()).map_err(invalid)?;
            let config = ConnectionManagerConfig::new()
                .set_connection_timeout(Some(connect_budget))
                .set_response_timeout(Some(options.timeout))
                .set_number_of_retries(2)
                .set_max_delay(Duration::from_millis(500));
            let manager =
                ConnectionManager::new_lazy_with_config(client, config).map_err(invalid)?;
            Conn::Single(manager)
        };
        Ok(Client {
            conn,
            timeout: options.timeout,
            shown_url,
            secrets,
        })
    }

    /// Pings once at start: `Ok(true)` when Redis answered, `Ok(false)` (logged) when it is not reachable
    /// yet and the client keeps trying in the background; refused credentials are the only error.
    pub(super) async fn first_ping(&self) -> Result<bool, RedisStoreError> {
        let connect_budget = self.timeout.max(CONNECT_BUDGET);
        match tokio::time::timeout(connect_budget, self.conn.ping()).await {
            Ok(Ok(())) => Ok(true),
            Ok(Err(e)) if is_auth_error(&e) => Err(RedisStoreError::Auth {
                url: self.shown_url.clone(),
                reason: redact(&e.to_string(), &self.secrets),
            }),
            Ok(Err(e)) => {
                tracing::warn!(url = %self.shown_url, error = %redact(&e.to_string(), &self.secrets), "Redis quota store not reachable yet; retrying in the background");
                Ok(false)
            }
            Err(_) => {
                tracing::warn!(url = %self.shown_url, "Redis quota store did not answer in time; retrying in the background");
                Ok(false)
            }
        }
    }

    /// The bound of every call, and of every charge as a whole.
    pub(super) fn timeout(&self) -> Duration {
        self.timeout
    }

    /// The URL(s) with credentials masked.
    pub(super) fn shown_url(&self) -> &str {
        &self.shown_url
    }

    /// Runs the quota script once, bounded, counted and timed as `op`.
    pub(super) async fn eval(
        &self,
        metrics: &StoreMetrics,
        op: &'static str,
        call: &ScriptInvocation<'_>,
    ) -> Result<Vec<i64>, StoreError> {
        self.timed(metrics, op, self.conn.eval(call)).await
    }

    /// Runs one command, bounded, counted and timed as `op`.
    pub(super) async fn query<T: redis::FromRedisValue>(
        &self,
        metrics: &StoreMetrics,
        op: &'static str,
        cmd: &redis::Cmd,
    ) -> Result<T, StoreError> {
        self.timed(metrics, op, self.conn.query(cmd)).await
    }

    /// The `used` and `reserved` fields of each of `keys`, in one bounded `usage` call.
    pub(super) async fn used_and_reserved(
        &self,
        metrics: &StoreMetrics,
        keys: &[String],
    ) -> Result<Vec<(Option<u64>, Option<u64>)>, StoreError> {
        let read = async {
            let mut out = Vec::with_capacity(keys.len());
            for key in keys {
                out.push(self.conn.used_and_reserved(key).await?);
            }
            Ok(out)
        };
        self.timed(metrics, "usage", read).await
    }

    /// Pings Redis, bounded, counted and timed.
    pub(super) async fn ping(&self, metrics: &StoreMetrics) -> Result<(), StoreError> {
        self.timed(metrics, "ping", self.conn.ping()).await
    }

    async fn timed<T>(
        &self,
        metrics: &StoreMetrics,
        op: &'static str,
        call: impl Future<Output = RedisResult<T>>,
    ) -> Result<T, StoreError> {
        metrics.calls.with_label_values(&[op]).inc();
        let started = Instant::now();
        let result = tokio::time::timeout(self.timeout, call).await;
        metrics
            .duration
            .with_label_values(&[op])
            .observe(started.elapsed().as_secs_f64());
        match result {
            Ok(Ok(value)) => Ok(value),
            Ok(Err(e)) if e.is_timeout() => {
                metrics.timed_out();
                Err(StoreError::Timeout)
            }
            Ok(Err(e)) => {
                metrics.failed();
                Err(StoreError::Backend(redact(&e.to_string(), &self.secrets)))
            }
            Err(_) => {
                metrics.timed_out();
                Err(StoreError::Timeout)
            }
        }
    }
}

fn is_auth_error(e: &RedisError) -> bool {
    matches!(e.kind(), ErrorKind::AuthenticationFailed)
        || e.code()
            .is_some_and(|c| matches!(c, "WRONGPASS" | "NOAUTH" | "NOPERM"))
}

/// rustls needs one process-wide crypto provider; the first caller installs ring, later ones keep it.
fn install_crypto_provider() {
    // An Err only says a provider is already installed, which is what we want.
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// `url` (or a comma-separated list) with every `user:password@` replaced by `***@`.
pub(super) fn redact_urls(urls: &str) -> String {
    urls.split(',')
        .map(|u| {
            let u = u.trim();
            let Some((scheme, rest)) = u.split_once("://") else {
                return u.to_string();
            };
            let authority_end = rest.find('/').unwrap_or(rest.len());
            match rest[..authority_end].rfind('@') {
                Some(at) => format!("{scheme}://***@{}", &rest[at + 1..]),
                None => u.to_string(),
            }
        })
        .collect::<Vec<_>>()
        .join(",")
}

/// Every password (raw and percent-decoded) in `urls`, to scrub from error texts.
fn url_secrets(urls: &str) -> Vec<String> {
    let mut out = Vec::new();
    for u in urls.split(',') {
        let Some((_, rest)) = u.trim().split_once("://") else {
            continue;
        };
        let authority = &rest[..rest.find('/').unwrap_or(rest.len())];
        let Some(at) = authority.rfind('@') else {
            continue;
        };
        let userinfo = &authority[..at];
        let password = userinfo.split_once(':').map_or(userinfo, |(_, p)| p);
        if password.is_empty() {
            continue;
        }
        out.push(password.to_string());
        let decoded = percent_encoding::percent_decode_str(password)
            .decode_utf8_lossy()
            .into_owned();
        if decoded != password {
            out.push(decoded);
        }
    }
    out
}

/// `text` with URL credentials masked and every one of `secrets` replaced by `***`: Redis errors may echo
/// the URL or the password.
fn redact(text: &str, secrets: &[String]) -> String {
    let mut out = redact_urls(text);
    for s in secrets {
        out = out.replace(s.as_str(), "***");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_are_shown_without_credentials() {
        assert_eq!(
            redact_urls("rediss://user:s3cr%40t@host:6380/0"),
            "rediss://***@host:6380/0"
        );
        assert_eq!(
            redact_urls("redis://:pw@a:1,redis://b:2"),
            "redis://***@a:1,redis://b:2"
        );
        let secrets = url_secrets("redis://user:s3cr%40t@host:6380/0");
        assert_eq!(secrets, vec!["s3cr%40t".to_string(), "s3cr@t".to_string()]);
        assert_eq!(redact("bad s3cr@t here", &secrets), "bad *** here");
        let debug = format!(
            "{:?}",
            RedisOptions {
                url: "redis://:hunter2@h:1".into(),
                ..RedisOptions::default()
            }
        );
        assert!(!debug.contains("hunter2"), "{debug}");
    }
}
