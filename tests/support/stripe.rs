//! The local Stripe emulator (`tests/support/stripe_emulator.py`) as a real process for tests: started on a
//! port it picks itself on 127.0.0.1, driven through its `/_emulator/` control endpoints, killed by PID.
//! Besides meter events it holds prices and subscriptions, moves them through their lifecycle and delivers
//! the events as signed webhooks (see the emulator's docstring for every endpoint and shape).
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

/// How long one control call may take: subscription calls wait for webhook deliveries (10 s each at most).
pub const CONTROL_TIMEOUT: Duration = Duration::from_secs(60);

/// `body` with the keys of `extra` (an object) set over it.
fn merge(body: &mut serde_json::Value, extra: serde_json::Value) {
    match extra {
        serde_json::Value::Object(fields) => {
            for (k, v) in fields {
                body[k] = v;
            }
        }
        serde_json::Value::Null => {}
        other => panic!("extra must be a JSON object, not {other}"),
    }
}

/// An object without its null fields (the emulator reads an absent field as "use the default").
fn without_nulls(value: serde_json::Value) -> serde_json::Value {
    match value {
        serde_json::Value::Object(fields) => {
            serde_json::Value::Object(fields.into_iter().filter(|(_, v)| !v.is_null()).collect())
        }
        other => other,
    }
}

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
        self.control(path, body).await;
    }

    /// POSTs JSON to a control endpoint and returns its JSON answer; panics (with the emulator's message)
    /// on anything but 2xx. Bounded by [`CONTROL_TIMEOUT`]: a call may wait for webhook deliveries.
    pub async fn control(&self, path: &str, body: serde_json::Value) -> serde_json::Value {
        let (status, answer) = self.try_control(path, body.clone()).await;
        assert!(
            (200..300).contains(&status),
            "POST {path} {body}: the emulator answered {status}: {answer}"
        );
        answer
    }

    /// POSTs JSON to a control endpoint and returns (HTTP status, JSON answer) whatever the status: for
    /// the calls that are meant to be refused (`{"error": "message"}` with 400 or 404).
    pub async fn try_control(
        &self,
        path: &str,
        body: serde_json::Value,
    ) -> (u16, serde_json::Value) {
        let resp = self
            .client
            .post(format!("{}{path}", self.url()))
            .timeout(CONTROL_TIMEOUT)
            .json(&body)
            .send()
            .await
            .unwrap_or_else(|e| panic!("POST {path} to the emulator: {e}"));
        let status = resp.status().as_u16();
        let text = resp.text().await.unwrap_or_default();
        let answer = serde_json::from_str(&text).unwrap_or_else(|e| {
            panic!("POST {path}: the emulator answered {status}, non-JSON ({e}): {text}")
        });
        (status, answer)
    }

    /// Creates a monthly price (1000 cents, usd) and returns its id (generated when `id` is None).
    pub async fn create_price(&self, id: Option<&str>, lookup_key: Option<&str>) -> String {
        let price = self
            .price(serde_json::json!({"id": id, "lookup_key": lookup_key}))
            .await;
        price["id"]
            .as_str()
            .expect("the price has an id")
            .to_owned()
    }

    /// Creates a price from the full spec (`id`, `lookup_key`, `product`, `unit_amount`, `currency`,
    /// `nickname`; all optional) and returns the price object.
    pub async fn price(&self, spec: serde_json::Value) -> serde_json::Value {
        let spec = without_nulls(spec);
        self.control("/_emulator/prices", spec).await
    }

    /// Where and how events are delivered from now on: `url`, `secret`, `extra_secrets` ([]),
    /// `deliver` ("now" | "hold" | "drop"), `duplicates` (0), `delay_ms` (0).
    pub async fn webhooks(&self, spec: serde_json::Value) -> serde_json::Value {
        self.control("/_emulator/webhooks", spec).await
    }

    /// Creates a subscription of `customer` to `price` (an id, or "lookup_key:NAME"); `extra` may hold
    /// `status` ("active" | "trialing" | "incomplete") and `deliver`. Returns the control answer
    /// `{"subscription", "events", "deliveries"}`.
    pub async fn subscribe(
        &self,
        customer: &str,
        price: &str,
        extra: serde_json::Value,
    ) -> serde_json::Value {
        let mut body = serde_json::json!({"customer": customer, "price": price});
        merge(&mut body, extra);
        self.control("/_emulator/subscriptions", body).await
    }

    /// Creates a paid one-off invoice of `customer` (how a customer buys prepaid credit), one line per
    /// (price id or "lookup_key:NAME", quantity); `extra` may hold `subscription` (the invoice's parent) and
    /// `deliver`. Emits invoice.paid. Returns the control answer `{"invoice", "event", "lines",
    /// "deliveries"}`.
    pub async fn invoice(
        &self,
        customer: &str,
        lines: &[(&str, u64)],
        extra: serde_json::Value,
    ) -> serde_json::Value {
        let lines: Vec<serde_json::Value> = lines
            .iter()
            .map(|(price, quantity)| serde_json::json!({"price": price, "quantity": quantity}))
            .collect();
        let mut body = serde_json::json!({"customer": customer, "lines": lines});
        merge(&mut body, extra);
        self.control("/_emulator/invoices", body).await
    }

    /// [`Self::invoice`] with no subscription, delivered as the webhook config says: (invoice id, the
    /// invoice.paid event id).
    pub async fn paid_invoice(&self, customer: &str, lines: &[(&str, u64)]) -> (String, String) {
        let answer = self.invoice(customer, lines, serde_json::Value::Null).await;
        let id = |key: &str| {
            answer[key]
                .as_str()
                .unwrap_or_else(|| panic!("no {key} in {answer}"))
                .to_owned()
        };
        (id("invoice"), id("event"))
    }

    /// `POST /_emulator/subscriptions/{sub}/{action}` with `body` (e.g. `{"deliver": "hold"}`): the
    /// general form of the lifecycle calls below.
    pub async fn subscription_action(
        &self,
        sub: &str,
        action: &str,
        body: serde_json::Value,
    ) -> serde_json::Value {
        self.control(&format!("/_emulator/subscriptions/{sub}/{action}"), body)
            .await
    }

    /// A plan change: the item moves to `price` (customer.subscription.updated).
    pub async fn change_price(&self, sub: &str, price: &str) -> serde_json::Value {
        self.subscription_action(sub, "price", serde_json::json!({"price": price}))
            .await
    }

    /// A renewal whose payment fails: the period rolls, status past_due (invoice.payment_failed,
    /// customer.subscription.updated).
    pub async fn fail_payment(&self, sub: &str) -> serde_json::Value {
        self.subscription_action(sub, "fail_payment", serde_json::json!({}))
            .await
    }

    /// The open invoice is paid: status active (invoice.paid, customer.subscription.updated).
    pub async fn pay(&self, sub: &str) -> serde_json::Value {
        self.subscription_action(sub, "pay", serde_json::json!({}))
            .await
    }

    /// Status canceled (customer.subscription.deleted).
    pub async fn cancel(&self, sub: &str) -> serde_json::Value {
        self.subscription_action(sub, "cancel", serde_json::json!({}))
            .await
    }

    /// Status paused (customer.subscription.paused).
    pub async fn pause(&self, sub: &str) -> serde_json::Value {
        self.subscription_action(sub, "pause", serde_json::json!({}))
            .await
    }

    /// Status active again (customer.subscription.resumed).
    pub async fn resume(&self, sub: &str) -> serde_json::Value {
        self.subscription_action(sub, "resume", serde_json::json!({}))
            .await
    }

    /// Any status (customer.subscription.updated).
    pub async fn set_status(&self, sub: &str, status: &str) -> serde_json::Value {
        self.subscription_action(sub, "status", serde_json::json!({"status": status}))
            .await
    }

    /// Delivers every held event, `order` "created" (oldest first) or "reverse", each `duplicates` extra
    /// times; returns `{"deliveries": [...]}`.
    pub async fn flush(&self, order: &str, duplicates: u32) -> serde_json::Value {
        self.control(
            "/_emulator/webhooks/flush",
            serde_json::json!({"order": order, "duplicates": duplicates}),
        )
        .await
    }

    /// Sends `event` again now, `tamper` None or "signature" | "stale" | "body"; returns the HTTP status the
    /// receiver answered (panics when the delivery itself failed).
    pub async fn resend(&self, event: &str, tamper: Option<&str>) -> u16 {
        let answer = self
            .control(
                "/_emulator/webhooks/resend",
                without_nulls(serde_json::json!({"event": event, "tamper": tamper})),
            )
            .await;
        match answer["status"].as_u64() {
            Some(status) => u16::try_from(status).expect("an HTTP status"),
            None => panic!("resending {event}: nothing answered: {answer}"),
        }
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
        totals_of(&self.state().await)
    }
}

/// The accepted totals per (customer, event name) of one `/_emulator/state` snapshot.
pub fn totals_of(state: &serde_json::Value) -> BTreeMap<(String, String), u64> {
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

impl Drop for StripeEmulator {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!("----- Stripe emulator stderr -----\n{}", self.logs());
        }
    }
}
