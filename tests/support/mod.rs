//! Harness for integration tests that run real processes: the tollgate binary, a real Envoy, Redis and
//! PostgreSQL servers and an in-process echo upstream, all on loopback.
//!
//! Every wait is a bounded poll; every process is killed and reaped by its own PID when its handle drops,
//! and its stderr is printed when the test is failing.

// Each integration-test crate compiles this module and uses its own subset of it.
#![allow(dead_code, unused_imports)]

mod access_log;
mod echo;
mod envoy;
mod llm;
mod pki;
mod postgres;
mod raw;
mod redis;
mod tollgate;

pub use access_log::{authz_entry, http_message, text};
pub use echo::{EchoUpstream, Recorded};
pub use envoy::{
    Envoy, envoy_binary, envoy_config, envoy_config_llm, envoy_config_replicas,
    envoy_config_webhook, with_stream_token,
};
pub use llm::FakeLlm;
pub use pki::{Leaf, Pki};
pub use postgres::PostgresServer;
pub use raw::{RawResponse, raw_request};
pub use redis::{RedisConfig, RedisServer};
pub use tollgate::{Tollgate, https_client, parse_metric};

use std::future::Future;
use std::net::TcpListener;
use std::path::PathBuf;
use std::time::{Duration, Instant};

/// How long a process may take to become ready before the test fails.
pub const STARTUP_TIMEOUT: Duration = Duration::from_secs(30);

/// How long a catalog edit or a metric may take to show before the test fails (the contract says ~1 s).
pub const CHANGE_TIMEOUT: Duration = Duration::from_secs(10);

/// The project root (where Cargo.toml is).
pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// A loopback TCP port that was free a moment ago (the OS picks it).
pub fn free_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    listener.local_addr().expect("local_addr").port()
}

/// An HTTP client for loopback calls: no proxy from the environment, bounded timeouts.
pub fn http_client() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .redirect(reqwest::redirect::Policy::none())
        .timeout(Duration::from_secs(10))
        .build()
        .expect("build reqwest client")
}

/// Calls `probe` until it returns `Some`, at most `timeout`; panics naming `what` otherwise.
pub async fn poll_until<T, F, Fut>(what: &str, timeout: Duration, mut probe: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(value) = probe().await {
            return value;
        }
        if Instant::now() >= deadline {
            panic!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The usual tollgate config for tests, without `grpc_listen`/`admin_listen` (the harness adds those).
pub fn base_config(environment: &str) -> String {
    format!(
        "environment: {environment}
catalog:
  path: catalog.yaml
identity:
  api_key: {{headers: [x-api-key], query_params: [apikey]}}
api_context_extension: tollgate_api
quota:
  store: memory
"
    )
}

/// The `sha256:` hash the catalog stores for `key` (what `tollgate key hash` prints).
pub fn key_hash(key: &str) -> String {
    use sha2::{Digest, Sha256};
    format!("sha256:{}", hex::encode(Sha256::digest(key.as_bytes())))
}

/// A whole stack: echo upstream <- Envoy (ext_authz) -> tollgate.
pub struct Stack {
    /// Envoy; dropped first so nothing reaches the others while they stop.
    pub envoy: Envoy,
    /// The tollgate process.
    pub tollgate: Tollgate,
    /// The in-process upstream that records what Envoy forwards.
    pub upstream: EchoUpstream,
    /// A client for calls through Envoy.
    pub client: reqwest::Client,
}

impl Stack {
    /// Starts upstream, tollgate (`config_yaml` without listen addresses, plus `catalog_yaml`) and Envoy.
    pub async fn start(config_yaml: &str, catalog_yaml: &str) -> Stack {
        let upstream = EchoUpstream::start();
        let tollgate = Tollgate::start(config_yaml, catalog_yaml).await;
        let envoy = Envoy::start(&envoy_config(tollgate.grpc_port, upstream.port)).await;
        Stack {
            envoy,
            tollgate,
            upstream,
            client: http_client(),
        }
    }

    /// A URL on Envoy's listener.
    pub fn url(&self, path_and_query: &str) -> String {
        self.envoy.url(path_and_query)
    }
}
