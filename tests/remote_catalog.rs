//! `catalog.url` (CONTRACT §12) against an HTTPS server with a private CA, through a real Envoy 1.40: the
//! bearer header is sent, a 304 costs no reload, a new document is installed, a broken one (invalid catalog,
//! HTML, 500) keeps the last good catalog, and a restart with the server down serves the cached copy. Also:
//! `tollgate check` fetches the remote, and `serve` without a remote or a cached copy exits with one sentence.

mod support;

use std::convert::Infallible;
use std::path::Path;
use std::process::Command;
use std::sync::{Arc, Mutex};

use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use support::{
    CHANGE_TIMEOUT, EchoUpstream, Envoy, Pki, Tollgate, envoy_config, http_client, key_hash,
    poll_until,
};
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;

const KEY_FIRST: &str = "tg_test_RemoteFirstKeyuZBoBcuk7Kp4aggzLahAQ5tv";
const KEY_SECOND: &str = "tg_test_RemoteSecondKeyZBoBcuk7Kp4aggzLahAQ5tv";
const TOKEN: &str = "catalog-reader-token";

/// A catalog whose app holds the hashes of `keys`.
fn catalog(keys: &[&str]) -> String {
    let keys: Vec<String> = keys
        .iter()
        .map(|k| format!("{{hash: \"{}\"}}", key_hash(k)))
        .collect();
    format!(
        "products:\n  - name: weather\n    operations: [{{api: weatherapi, paths: [/forecast], methods: [GET]}}]\n\
         developers:\n  - email: remote@example.test\n    apps:\n      - name: remote_app\n        \
         products: [{{name: weather}}]\n        keys: [{}]\n",
        keys.join(", ")
    )
}

/// What the catalog server answers, and what it saw.
#[derive(Default)]
struct Served {
    body: String,
    content_type: String,
    etag: String,
    /// When set, every answer has this status and no body.
    status: Option<u16>,
    requests: u32,
    not_modified: u32,
    /// The `authorization` header of the last request.
    authorization: Option<String>,
}

/// An HTTPS server of one catalog document, with a certificate of the test's private CA.
struct CatalogServer {
    port: u16,
    served: Arc<Mutex<Served>>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl CatalogServer {
    async fn start(pki: &Pki, body: &str, etag: &str) -> CatalogServer {
        let leaf = pki.leaf(&["127.0.0.1", "localhost"], 7, false);
        let certs = vec![CertificateDer::from_pem_slice(leaf.cert_pem.as_bytes()).unwrap()];
        let key = PrivateKeyDer::from_pem_slice(leaf.key_pem.as_bytes()).unwrap();
        let config = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .unwrap();
        let acceptor = TlsAcceptor::from(Arc::new(config));
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let served = Arc::new(Mutex::new(Served {
            body: body.to_owned(),
            content_type: "application/yaml".into(),
            etag: etag.to_owned(),
            ..Served::default()
        }));
        let state = Arc::clone(&served);
        let task = tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    continue;
                };
                let acceptor = acceptor.clone();
                let state = Arc::clone(&state);
                tokio::spawn(async move {
                    let Ok(tls) = acceptor.accept(tcp).await else {
                        return;
                    };
                    let service = service_fn(move |request: Request<Incoming>| {
                        let state = Arc::clone(&state);
                        async move { Ok::<_, Infallible>(answer(&state, &request)) }
                    });
                    let _ = http1::Builder::new()
                        .serve_connection(TokioIo::new(tls), service)
                        .await;
                });
            }
        });
        CatalogServer {
            port,
            served,
            task: Some(task),
        }
    }

    fn url(&self) -> String {
        format!("https://127.0.0.1:{}/catalog?edition=live", self.port)
    }

    fn serve(&self, body: &str, content_type: &str, etag: &str) {
        let mut served = self.served.lock().unwrap();
        served.body = body.to_owned();
        served.content_type = content_type.to_owned();
        served.etag = etag.to_owned();
        served.status = None;
    }

    fn fail_with(&self, status: u16) {
        self.served.lock().unwrap().status = Some(status);
    }

    fn seen(&self) -> (u32, u32, Option<String>) {
        let served = self.served.lock().unwrap();
        (
            served.requests,
            served.not_modified,
            served.authorization.clone(),
        )
    }
}

impl CatalogServer {
    /// Stops serving and closes the port: connections are refused from now on.
    async fn stop(mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
            let _ = task.await;
        }
    }
}

impl Drop for CatalogServer {
    fn drop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

fn answer(state: &Mutex<Served>, request: &Request<Incoming>) -> Response<Full<Bytes>> {
    let mut served = state.lock().unwrap();
    served.requests += 1;
    served.authorization = request
        .headers()
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    if let Some(status) = served.status {
        return Response::builder()
            .status(status)
            .body(Full::new(Bytes::new()))
            .unwrap();
    }
    let matches = request
        .headers()
        .get("if-none-match")
        .is_some_and(|v| v.as_bytes() == served.etag.as_bytes());
    if matches {
        served.not_modified += 1;
        return Response::builder()
            .status(StatusCode::NOT_MODIFIED)
            .header("etag", served.etag.clone())
            .body(Full::new(Bytes::new()))
            .unwrap();
    }
    Response::builder()
        .header("content-type", served.content_type.clone())
        .header("etag", served.etag.clone())
        .body(Full::new(Bytes::from(served.body.clone())))
        .unwrap()
}

fn config(url: &str, ca: &Path) -> String {
    format!(
        "environment: prod
catalog:
  url: '{url}'
  headers: {{authorization: 'Bearer {TOKEN}'}}
  poll_interval: 1s
  timeout: 2s
  ca_path: {ca}
identity:
  api_key: {{headers: [x-api-key]}}
api_context_extension: tollgate_api
",
        ca = ca.display()
    )
}

async fn status_of(client: &reqwest::Client, envoy: &Envoy, key: &str) -> u16 {
    client
        .get(envoy.url("/forecast"))
        .header("x-api-key", key)
        .send()
        .await
        .map_or(0, |r| r.status().as_u16())
}

async fn fetches(tollgate: &Tollgate, result: &str) -> f64 {
    tollgate
        .metric("tollgate_catalog_fetches_total", &[("result", result)])
        .await
        .unwrap_or(0.0)
}

#[tokio::test]
async fn a_remote_catalog_is_polled_kept_when_broken_and_served_from_its_copy_after_a_restart() {
    let pki = Pki::new();
    let server = CatalogServer::start(&pki, &catalog(&[KEY_FIRST]), "\"v1\"").await;
    let mut tollgate = Tollgate::start(&config(&server.url(), &pki.path("ca.crt")), "").await;
    let upstream = EchoUpstream::start();
    let envoy = Envoy::start(&envoy_config(tollgate.grpc_port, upstream.port)).await;
    let client = http_client();

    assert_eq!(status_of(&client, &envoy, KEY_FIRST).await, 200);
    assert_eq!(status_of(&client, &envoy, KEY_SECOND).await, 401);
    let (_, _, authorization) = server.seen();
    assert_eq!(
        authorization.as_deref(),
        Some("Bearer catalog-reader-token")
    );

    // Unchanged: conditional requests answered 304, no reload. tollgate counts a fetch once it has read the
    // answer, a moment after the server counted it.
    poll_until("two polls answered 304", CHANGE_TIMEOUT, || async {
        (server.seen().1 >= 2 && fetches(&tollgate, "not_modified").await >= 2.0).then_some(())
    })
    .await;
    assert_eq!(tollgate.catalog_generation().await, 1.0);

    // A new document is installed.
    server.serve(
        &catalog(&[KEY_FIRST, KEY_SECOND]),
        "application/yaml",
        "\"v2\"",
    );
    poll_until("the second catalog", CHANGE_TIMEOUT, || async {
        (tollgate.catalog_generation().await == 2.0).then_some(())
    })
    .await;
    assert_eq!(status_of(&client, &envoy, KEY_SECOND).await, 200);

    // An invalid catalog, an HTML page and a 500 keep the last good catalog.
    let broken = catalog(&[KEY_FIRST]).replace("paths: [/forecast]", "paths: [/fore*cast]");
    server.serve(&broken, "application/yaml", "\"v3\"");
    poll_until("the broken catalog refused", CHANGE_TIMEOUT, || async {
        (fetches(&tollgate, "invalid").await >= 1.0).then_some(())
    })
    .await;
    server.serve("<html>maintenance</html>", "text/html", "\"v4\"");
    let errors = fetches(&tollgate, "error").await;
    poll_until("the HTML page refused", CHANGE_TIMEOUT, || async {
        (fetches(&tollgate, "error").await > errors).then_some(())
    })
    .await;
    server.fail_with(500);
    let errors = fetches(&tollgate, "error").await;
    poll_until("the 500 counted", CHANGE_TIMEOUT, || async {
        (fetches(&tollgate, "error").await > errors).then_some(())
    })
    .await;
    assert_eq!(tollgate.catalog_generation().await, 2.0);
    assert_eq!(status_of(&client, &envoy, KEY_SECOND).await, 200);
    let logs = tollgate.logs();
    assert!(logs.contains("keeping the last good catalog"), "{logs}");
    assert!(logs.contains("remote catalog rejected"), "{logs}");
    assert!(
        !logs.contains(TOKEN) && !logs.contains("edition=live"),
        "neither the token nor the URL's query reaches the log"
    );

    // The server goes away; a restarted replica serves the copy it kept (the second catalog).
    server.stop().await;
    tollgate.restart().await;
    assert_eq!(status_of(&client, &envoy, KEY_SECOND).await, 200);
    assert!(
        tollgate.logs().contains("serving the cached copy"),
        "{}",
        tollgate.logs()
    );
}

#[tokio::test]
async fn a_json_catalog_is_read_as_json_and_a_restart_with_an_unchanged_remote_costs_a_304() {
    let pki = Pki::new();
    let yaml: serde_yaml_ng::Value = serde_yaml_ng::from_str(&catalog(&[KEY_FIRST])).unwrap();
    let json = serde_json::to_string_pretty(&yaml).unwrap();
    let server = CatalogServer::start(&pki, &json, "\"j1\"").await;
    server.serve(&json, "application/json; charset=utf-8", "\"j1\"");
    let mut tollgate = Tollgate::start(&config(&server.url(), &pki.path("ca.crt")), "").await;
    assert_eq!(tollgate.catalog_generation().await, 1.0);
    let (before, not_modified, _) = server.seen();
    assert_eq!(not_modified, 0);

    tollgate.restart().await;
    let (after, not_modified, _) = server.seen();
    assert!(after > before);
    assert!(
        not_modified >= 1,
        "the cached copy's ETag goes with the first request"
    );

    // A document served as JSON that is not JSON is refused, even though YAML would read it.
    server.serve(&catalog(&[KEY_SECOND]), "application/json", "\"j2\"");
    poll_until(
        "the mislabelled document refused",
        CHANGE_TIMEOUT,
        || async { (fetches(&tollgate, "error").await >= 1.0).then_some(()) },
    )
    .await;
    assert_eq!(tollgate.catalog_generation().await, 1.0);
    assert!(
        tollgate
            .logs()
            .contains("served as JSON, but it is not JSON")
    );
}

#[tokio::test]
async fn check_fetches_the_remote_and_serve_without_remote_or_copy_says_why() {
    let pki = Pki::new();
    let server = CatalogServer::start(&pki, &catalog(&[KEY_FIRST]), "\"c1\"").await;
    let dir = tempfile::tempdir().unwrap();
    let write = |name: &str, text: String| {
        let path = dir.path().join(name);
        std::fs::write(&path, text).unwrap();
        path
    };
    let good = write("good.yaml", config(&server.url(), &pki.path("ca.crt")));
    let out = run(&["check", "--config"], &good).await;
    assert!(out.status.success(), "{}", stderr(&out));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains(&format!(
            "catalog https://127.0.0.1:{}/catalog: ok",
            server.port
        )),
        "{stdout}"
    );

    // Another CA: the server's certificate is not trusted.
    let stranger = Pki::new();
    let untrusting = write(
        "untrusting.yaml",
        config(&server.url(), &stranger.path("ca.crt")),
    );
    let out = run(&["check", "--config"], &untrusting).await;
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("cannot fetch the catalog"),
        "{}",
        stderr(&out)
    );

    // serve with the remote down and no cached copy: exit 1, one sentence.
    let port = server.port;
    server.stop().await;
    let down = write(
        "down.yaml",
        format!(
            "grpc_listen: 127.0.0.1:0\nadmin_listen: 127.0.0.1:0\n{}",
            config(
                &format!("https://127.0.0.1:{port}/catalog"),
                &pki.path("ca.crt")
            )
        ),
    );
    let out = run(&["serve", "--config"], &down).await;
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("no cached copy to serve instead"),
        "{}",
        stderr(&out)
    );
}

/// Runs the binary off the test's runtime thread, which serves the catalog meanwhile.
async fn run(args: &[&str], config: &Path) -> std::process::Output {
    let mut command = Command::new(env!("CARGO_BIN_EXE_tollgate"));
    command
        .args(args)
        .arg(config)
        .current_dir(config.parent().unwrap());
    tokio::task::spawn_blocking(move || command.output().unwrap())
        .await
        .unwrap()
}

fn stderr(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}
