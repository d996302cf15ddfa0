//! The tollgate binary as a child process, with its config and catalog in a temporary folder.

use std::fs::File;
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use tempfile::TempDir;

use super::{CHANGE_TIMEOUT, STARTUP_TIMEOUT, free_port, http_client, poll_until};

/// How many times a start is retried when a port picked by `free_port` was taken in the meantime.
const PORT_RETRIES: usize = 3;

/// A running `tollgate serve`; killed and reaped by PID on drop.
pub struct Tollgate {
    child: Child,
    /// The ext_authz gRPC port.
    pub grpc_port: u16,
    /// The admin HTTP port.
    pub admin_port: u16,
    dir: TempDir,
    stderr_path: PathBuf,
    edits: AtomicU32,
    /// `http`, or `https` when the admin listener speaks TLS.
    admin_scheme: &'static str,
    /// The client for admin calls (trusting the admin certificate's CA over TLS).
    admin_client: reqwest::Client,
}

impl Tollgate {
    /// Writes `config_yaml` (every key except `grpc_listen`/`admin_listen`, which the harness adds) and
    /// `catalog_yaml` (as `catalog.yaml`) to a temporary folder, starts `tollgate serve` and waits for
    /// `/readyz` and the gRPC port.
    pub async fn start(config_yaml: &str, catalog_yaml: &str) -> Tollgate {
        Self::start_with_admin_ca(config_yaml, catalog_yaml, None).await
    }

    /// [`Tollgate::start`] for a config with `admin_tls`: admin calls go over https, trusting `admin_ca_pem`
    /// (a PEM CA certificate) only.
    pub async fn start_with_admin_ca(
        config_yaml: &str,
        catalog_yaml: &str,
        admin_ca_pem: Option<&[u8]>,
    ) -> Tollgate {
        assert!(
            !config_yaml.contains("grpc_listen") && !config_yaml.contains("admin_listen"),
            "Tollgate::start picks the listen addresses itself"
        );
        let mut last_logs = String::new();
        for _ in 0..PORT_RETRIES {
            match Self::try_start(config_yaml, catalog_yaml, admin_ca_pem).await {
                Ok(tollgate) => return tollgate,
                Err(logs) => last_logs = logs,
            }
        }
        panic!("tollgate kept failing to bind its ports; its last stderr:\n{last_logs}");
    }

    /// Starts once; `Err(stderr)` only when the process exited because an address was in use.
    async fn try_start(
        config_yaml: &str,
        catalog_yaml: &str,
        admin_ca_pem: Option<&[u8]>,
    ) -> Result<Tollgate, String> {
        let dir = tempfile::tempdir().expect("tollgate tempdir");
        let grpc_port = free_port();
        let admin_port = free_port();
        let config = format!(
            "grpc_listen: 127.0.0.1:{grpc_port}\nadmin_listen: 127.0.0.1:{admin_port}\n{config_yaml}"
        );
        let config_path = dir.path().join("tollgate.yaml");
        std::fs::write(&config_path, config).expect("write tollgate.yaml");
        std::fs::write(dir.path().join("catalog.yaml"), catalog_yaml).expect("write catalog.yaml");
        let stderr_path = dir.path().join("tollgate.stderr");
        let child = spawn(dir.path(), &stderr_path);
        let (admin_scheme, admin_client) = match admin_ca_pem {
            None => ("http", http_client()),
            Some(pem) => ("https", https_client(pem)),
        };
        let mut tollgate = Tollgate {
            child,
            grpc_port,
            admin_port,
            dir,
            stderr_path,
            edits: AtomicU32::new(0),
            admin_scheme,
            admin_client,
        };
        tollgate.wait_ready().await?;
        Ok(tollgate)
    }

    /// Kills the process with SIGKILL (no shutdown path runs) and reaps it.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Starts `tollgate serve` again on the same folder, config and ports (after [`Tollgate::kill`]).
    pub async fn restart(&mut self) {
        self.kill();
        self.child = spawn(self.dir.path(), &self.stderr_path);
        if let Err(logs) = self.wait_ready().await {
            panic!("tollgate did not come back after a restart; its stderr:\n{logs}");
        }
    }

    /// Waits for `/readyz` and the gRPC port; `Err(stderr)` when the process exited because an address was
    /// in use.
    async fn wait_ready(&mut self) -> Result<(), String> {
        let tollgate = self;
        let grpc_port = tollgate.grpc_port;
        let client = tollgate.admin_client.clone();
        let readyz = tollgate.admin_url("/readyz");
        let deadline = Instant::now() + STARTUP_TIMEOUT;
        loop {
            if let Ok(Some(status)) = tollgate.child.try_wait() {
                let logs = tollgate.logs();
                if logs.to_ascii_lowercase().contains("in use") {
                    return Err(logs);
                }
                panic!("tollgate exited during startup ({status}); its stderr:\n{logs}");
            }
            let ready = match client
                .get(&readyz)
                .timeout(Duration::from_secs(1))
                .send()
                .await
            {
                Ok(r) => r.status().is_success(),
                Err(_) => false,
            };
            let grpc_open = TcpStream::connect(("127.0.0.1", grpc_port)).is_ok();
            if ready && grpc_open {
                return Ok(());
            }
            if Instant::now() >= deadline {
                panic!(
                    "tollgate not ready after {STARTUP_TIMEOUT:?} (/readyz 200: {ready}, gRPC port open: \
                     {grpc_open}); its stderr:\n{}",
                    tollgate.logs()
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// `http://127.0.0.1:<admin port>` + `path` (`https://` when started with an admin CA).
    pub fn admin_url(&self, path: &str) -> String {
        format!(
            "{}://127.0.0.1:{}{}",
            self.admin_scheme, self.admin_port, path
        )
    }

    /// The folder with `tollgate.yaml` and `catalog.yaml`.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The catalog file tollgate watches.
    pub fn catalog_path(&self) -> PathBuf {
        self.dir.path().join("catalog.yaml")
    }

    /// Replaces the catalog the way editors and Kubernetes do: write a new file beside it, then rename it
    /// over the old one, so tollgate never reads a half-written file.
    pub fn write_catalog(&self, catalog_yaml: &str) {
        let n = self.edits.fetch_add(1, Ordering::Relaxed);
        let tmp = self.dir.path().join(format!(".catalog.yaml.{n}.tmp"));
        std::fs::write(&tmp, catalog_yaml).expect("write the new catalog");
        std::fs::rename(&tmp, self.catalog_path()).expect("rename the new catalog into place");
    }

    /// `GET /metrics` as text.
    pub async fn metrics(&self) -> String {
        self.admin_client
            .get(self.admin_url("/metrics"))
            .send()
            .await
            .expect("GET /metrics")
            .error_for_status()
            .expect("/metrics answers 2xx")
            .text()
            .await
            .expect("/metrics body")
    }

    /// The sum of every series of metric `name` whose labels include all of `labels` (None if none).
    pub async fn metric(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        parse_metric(&self.metrics().await, name, labels)
    }

    /// `tollgate_catalog_generation` now (0 when absent).
    pub async fn catalog_generation(&self) -> f64 {
        self.metric("tollgate_catalog_generation", &[])
            .await
            .unwrap_or(0.0)
    }

    /// Writes `catalog_yaml` and waits (bounded) until tollgate has loaded it (generation goes up).
    pub async fn reload_catalog(&self, catalog_yaml: &str) {
        let before = self.catalog_generation().await;
        self.write_catalog(catalog_yaml);
        poll_until(
            "tollgate_catalog_generation to go up after a catalog edit",
            CHANGE_TIMEOUT,
            || async move { (self.catalog_generation().await > before).then_some(()) },
        )
        .await;
    }

    /// Waits (bounded) until metric `name` with `labels` satisfies `pred`; returns its value.
    pub async fn wait_metric(
        &self,
        name: &str,
        labels: &[(&str, &str)],
        pred: impl Fn(f64) -> bool,
    ) -> f64 {
        let deadline = Instant::now() + CHANGE_TIMEOUT;
        loop {
            let value = self.metric(name, labels).await;
            if let Some(v) = value.filter(|v| pred(*v)) {
                return v;
            }
            if Instant::now() >= deadline {
                panic!(
                    "metric {name} {labels:?} did not reach the expected value within \
                     {CHANGE_TIMEOUT:?}; last value: {value:?}"
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// What tollgate wrote to stderr so far.
    pub fn logs(&self) -> String {
        std::fs::read_to_string(&self.stderr_path).unwrap_or_default()
    }
}

/// [`http_client`] that trusts only the CA certificate `ca_pem` (for an admin listener with TLS).
pub fn https_client(ca_pem: &[u8]) -> reqwest::Client {
    let ca = reqwest::Certificate::from_pem(ca_pem).expect("CA certificate PEM");
    reqwest::Client::builder()
        .no_proxy()
        .redirect(reqwest::redirect::Policy::none())
        .timeout(Duration::from_secs(10))
        .tls_built_in_root_certs(false)
        .add_root_certificate(ca)
        .build()
        .expect("build reqwest https client")
}

/// Spawns `tollgate serve --config <dir>/tollgate.yaml`, stderr appended to `stderr_path`.
fn spawn(dir: &Path, stderr_path: &Path) -> Child {
    let stderr = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(stderr_path)
        .expect("open tollgate stderr file");
    Command::new(env!("CARGO_BIN_EXE_tollgate"))
        .arg("serve")
        .arg("--config")
        .arg(dir.join("tollgate.yaml"))
        .current_dir(dir)
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(stderr)
        .spawn()
        .expect("spawn the tollgate binary")
}

impl Drop for Tollgate {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!("----- tollgate stderr -----\n{}", self.logs());
        }
    }
}

/// Sums the samples of metric `name` in Prometheus text `text` whose labels include all of `labels`.
pub fn parse_metric(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    let mut total = None;
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let Some((series, value)) = split_sample(line) else {
            continue;
        };
        let (series_name, series_labels) = match series.split_once('{') {
            Some((n, rest)) => (n, parse_labels(rest.trim_end_matches('}'))),
            None => (series, Vec::new()),
        };
        if series_name != name {
            continue;
        }
        let matches = labels
            .iter()
            .all(|(k, v)| series_labels.iter().any(|(sk, sv)| sk == k && sv == v));
        if matches {
            *total.get_or_insert(0.0) += value;
        }
    }
    total
}

/// Splits `series value [timestamp]`; label values may contain spaces, so split after the closing brace.
fn split_sample(line: &str) -> Option<(&str, f64)> {
    let split_at = match line.rfind('}') {
        Some(brace) => brace + 1,
        None => line.find(' ')?,
    };
    let (series, rest) = line.split_at(split_at);
    let value = rest.split_whitespace().next()?.parse().ok()?;
    Some((series.trim(), value))
}

fn parse_labels(text: &str) -> Vec<(String, String)> {
    let mut labels = Vec::new();
    let mut chars = text.chars().peekable();
    loop {
        while chars.peek().is_some_and(|c| *c == ',' || c.is_whitespace()) {
            chars.next();
        }
        let key: String = chars.by_ref().take_while(|c| *c != '=').collect();
        if key.is_empty() {
            return labels;
        }
        if chars.next() != Some('"') {
            return labels;
        }
        let mut value = String::new();
        while let Some(c) = chars.next() {
            match c {
                '\\' => match chars.next() {
                    Some('n') => value.push('\n'),
                    Some(other) => value.push(other),
                    None => break,
                },
                '"' => break,
                other => value.push(other),
            }
        }
        labels.push((key.trim().to_owned(), value));
    }
}
