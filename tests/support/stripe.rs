//! The local Stripe emulator (`tests/support/stripe_emulator.py`) as a real process for tests: started on a
//! port it picks itself on 127.0.0.1, driven through its `/_emulator/` control endpoints, killed by PID.
//!
//! Self-contained (no `super::` items) so it can be included on its own with
//! `#[path = "support/stripe.rs"] mod stripe_support;`.

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::fs::File;
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tempfile::TempDir;

/// How long the emulator may take to listen before the test fails.
pub const EMULATOR_STARTUP: Duration = Duration::from_secs(30);

/// The API key the emulator accepts.
pub const API_KEY: &str = "sk_test_tollgate_emulator";

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The Python that runs the emulator: `$TOLLGATE_PYTHON`, else `<root>/.venv/bin/python`.
pub fn python() -> PathBuf {
    match std::env::var_os("TOLLGATE_PYTHON") {
        Some(p) if !p.is_empty() => PathBuf::from(p),
        _ => root().join(".venv/bin/python"),
    }
}

/// A running emulator.
pub struct StripeEmulator {
    child: Child,
    /// Its port on 127.0.0.1.
    pub port: u16,
    dir: TempDir,
    client: reqwest::Client,
}

impl StripeEmulator {
    /// Starts the emulator and waits (bounded) until it listens. Panics with the fix when Python or
    /// jsonschema is missing.
    pub fn start() -> StripeEmulator {
        let python = python();
        let probe = Command::new(&python)
            .args(["-c", "import jsonschema"])
            .output();
        match probe {
            Ok(out) if out.status.success() => {}
            _ => panic!(
                "{} cannot import jsonschema: run `source scripts/lib.sh && tg_pip_install \
                 scripts/requirements-stripe.txt` (or point TOLLGATE_PYTHON at a Python that has it)",
                python.display()
            ),
        }
        let dir = tempfile::tempdir().expect("tempdir for the emulator");
        let port_file = dir.path().join("port");
        let stderr = File::create(dir.path().join("stderr")).expect("emulator stderr file");
        let child = Command::new(&python)
            .arg(root().join("tests/support/stripe_emulator.py"))
            .args(["--port", "0", "--api-key", API_KEY, "--port-file"])
            .arg(&port_file)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .expect("spawn the Stripe emulator");
        let mut emulator = StripeEmulator {
            child,
            port: 0,
            dir,
            client: reqwest::Client::builder()
                .no_proxy()
                .timeout(Duration::from_secs(10))
                .build()
                .expect("reqwest client"),
        };
        let deadline = Instant::now() + EMULATOR_STARTUP;
        loop {
            if let Ok(Some(status)) = emulator.child.try_wait() {
                panic!(
                    "the Stripe emulator exited ({status}); its stderr:\n{}",
                    emulator.logs()
                );
            }
            let port = std::fs::read_to_string(&port_file)
                .ok()
                .and_then(|p| p.trim().parse::<u16>().ok());
            if let Some(port) = port
                && TcpStream::connect(("127.0.0.1", port)).is_ok()
            {
                emulator.port = port;
                return emulator;
            }
            if Instant::now() >= deadline {
                panic!(
                    "the Stripe emulator did not listen within {EMULATOR_STARTUP:?}; its stderr:\n{}",
                    emulator.logs()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// `http://127.0.0.1:<port>`: the `billing.stripe.api_base` to configure.
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// What the emulator wrote to stderr.
    pub fn logs(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("stderr")).unwrap_or_default()
    }

    async fn post(&self, path: &str, body: serde_json::Value) {
        let resp = self
            .client
            .post(format!("{}{path}", self.url()))
            .json(&body)
            .send()
            .await
            .unwrap_or_else(|e| panic!("POST {path} to the emulator: {e}"));
        assert!(resp.status().is_success(), "POST {path}: {}", resp.status());
    }

    /// Replaces the fault injection: `seed`, `rate_429`, `rate_500`, `rate_timeout`, `timeout_s`,
    /// `commit_on_fault`, `latency_ms`, `retry_after_s`, `auth_failure`, `reject_customers`, `session_ttl_s`.
    pub async fn faults(&self, spec: serde_json::Value) {
        self.post("/_emulator/faults", spec).await;
    }

    /// Makes every v2 session token expire now.
    pub async fn expire_sessions(&self) {
        self.post("/_emulator/expire_sessions", serde_json::json!({}))
            .await;
    }

    /// Records an event nobody sent (a planted mismatch).
    pub async fn plant(&self, customer: &str, event_name: &str, value: u64, timestamp: i64) {
        self.post(
            "/_emulator/plant",
            serde_json::json!({"customer": customer, "event_name": event_name, "value": value,
                               "timestamp": timestamp}),
        )
        .await;
    }

    /// Everything the emulator saw (see the emulator's docstring).
    pub async fn state(&self) -> serde_json::Value {
        self.client
            .get(format!("{}/_emulator/state", self.url()))
            .send()
            .await
            .expect("GET /_emulator/state")
            .json()
            .await
            .expect("emulator state JSON")
    }

    /// Accepted totals per (customer, event name).
    pub async fn totals(&self) -> BTreeMap<(String, String), u64> {
        let state = self.state().await;
        let mut out = BTreeMap::new();
        if let Some(customers) = state["totals"].as_object() {
            for (customer, meters) in customers {
                for (meter, v) in meters.as_object().into_iter().flatten() {
                    out.insert(
                        (customer.clone(), meter.clone()),
                        v.as_u64().expect("whole totals"),
                    );
                }
            }
        }
        out
    }
}

impl Drop for StripeEmulator {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!("----- Stripe emulator stderr -----\n{}", self.logs());
        }
    }
}
