//! TLS and mTLS on both listeners (CONTRACT §2) with a private CA made here: a real Envoy 1.40 reaches
//! tollgate's gRPC port over mTLS, clients without a certificate or without TLS are refused, the admin port
//! speaks HTTPS only, and rotated certificate files reach new connections while open ones keep theirs.

mod support;

use std::sync::Arc;
use std::time::Duration;

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use support::{
    CHANGE_TIMEOUT, EchoUpstream, Envoy, Leaf, Pki, Tollgate, envoy_config, http_client,
    https_client, key_hash, poll_until,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;

const KEY: &str = "tg_test_TlsAppKeyZBoBcuk7Kp4aggzLahAQ5tvTRefxE";

/// How long one raw exchange (a handshake, an HTTP/2 frame) may take.
const IO_TIMEOUT: Duration = Duration::from_secs(5);

/// The HTTP/2 client preface and an empty SETTINGS frame.
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\0\0\0\x04\0\0\0\0\0";

fn catalog() -> String {
    format!(
        r#"
products:
  - name: weather
    operations: [{{api: weatherapi, paths: [/forecast], methods: [GET]}}]
    meter: {{event_name: weather_api_calls, value: calls}}
developers:
  - email: tls@example.test
    apps:
      - name: tls_app
        products: [{{name: weather}}]
        keys: [{{hash: "{}"}}]
"#,
        key_hash(KEY)
    )
}

/// The server certificate's names: what Envoy's `sni`/SAN check and the test clients use.
const SERVER_NAMES: &[&str] = &["localhost", "127.0.0.1"];

/// Writes a server certificate for each listener and a client certificate for Envoy, and starts tollgate with
/// `grpc_tls` (mTLS) and `admin_tls`.
async fn start_tollgate(pki: &Pki) -> (Tollgate, Leaf, Leaf) {
    let server = pki.leaf(SERVER_NAMES, 1, false);
    pki.write_leaf("grpc", &server);
    pki.write_leaf("admin", &pki.leaf(SERVER_NAMES, 2, false));
    let client = pki.leaf(&["envoy.test"], 3, true);
    pki.write_leaf("client", &client);
    let config = format!(
        "{}grpc_tls: {{cert_path: {}, key_path: {}, client_ca_path: {}}}\n\
         admin_tls: {{cert_path: {}, key_path: {}}}\n",
        support::base_config("test"),
        pki.path("grpc.crt").display(),
        pki.path("grpc.key").display(),
        pki.path("ca.crt").display(),
        pki.path("admin.crt").display(),
        pki.path("admin.key").display(),
    );
    let tollgate =
        Tollgate::start_with_admin_ca(&config, &catalog(), Some(pki.ca_pem.as_bytes())).await;
    (tollgate, server, client)
}

/// A TLS connection to `port` trusting the test CA, offering ALPN `h2`, with `client` as client certificate.
async fn tls_connect(
    port: u16,
    ca_pem: &str,
    client: Option<&Leaf>,
) -> std::io::Result<TlsStream<TcpStream>> {
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(CertificateDer::from_pem_slice(ca_pem.as_bytes()).unwrap())
        .unwrap();
    let builder = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots);
    let mut config = match client {
        Some(leaf) => builder
            .with_client_auth_cert(
                vec![leaf.der.clone()],
                PrivateKeyDer::from_pem_slice(leaf.key_pem.as_bytes()).unwrap(),
            )
            .unwrap(),
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = vec![b"h2".to_vec()];
    let tcp = TcpStream::connect(("127.0.0.1", port)).await?;
    let name = ServerName::try_from("localhost").unwrap();
    tokio::time::timeout(
        IO_TIMEOUT,
        TlsConnector::from(Arc::new(config)).connect(name, tcp),
    )
    .await
    .map_err(|_| std::io::Error::other("TLS handshake timed out"))?
}

/// The server's leaf certificate on `stream`.
fn peer_leaf(stream: &TlsStream<TcpStream>) -> CertificateDer<'static> {
    stream.get_ref().1.peer_certificates().unwrap()[0].clone()
}

/// Writes `bytes` and reads HTTP/2 frames until one of `frame_type` with `flags` arrives; false when the
/// server closes, errs or sends something else than HTTP/2 within [`IO_TIMEOUT`].
async fn h2_frame_after<S>(stream: &mut S, bytes: &[u8], frame_type: u8, flags: u8) -> bool
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let exchange = async {
        stream.write_all(bytes).await?;
        stream.flush().await?;
        loop {
            let mut header = [0u8; 9];
            stream.read_exact(&mut header).await?;
            let len = u32::from_be_bytes([0, header[0], header[1], header[2]]) as usize;
            if len > 1 << 16 {
                return Ok::<bool, std::io::Error>(false);
            }
            let mut payload = vec![0u8; len];
            stream.read_exact(&mut payload).await?;
            if header[3] == frame_type && header[4] & flags == flags {
                return Ok(true);
            }
        }
    };
    matches!(
        tokio::time::timeout(IO_TIMEOUT, exchange).await,
        Ok(Ok(true))
    )
}

/// Speaks the HTTP/2 preface and waits for the server's SETTINGS.
async fn h2_settings<S>(stream: &mut S) -> bool
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    h2_frame_after(stream, H2_PREFACE, 0x4, 0).await
}

/// Sends an HTTP/2 PING and waits for its ACK.
async fn h2_ping<S>(stream: &mut S) -> bool
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    h2_frame_after(stream, b"\0\0\x08\x06\0\0\0\0\0tollgate", 0x6, 0x1).await
}

/// The tollgate cluster of the test Envoy config with an mTLS transport socket: Envoy presents the client
/// certificate and checks tollgate's against the CA and the name `localhost`.
fn envoy_mtls_config(tollgate_port: u16, upstream_port: u16, pki: &Pki) -> String {
    let yaml = envoy_config(tollgate_port, upstream_port);
    let anchor = "    load_assignment:\n      cluster_name: tollgate_grpc\n";
    assert!(yaml.contains(anchor), "the test Envoy config changed shape");
    let socket = format!(
        r#"    transport_socket:
      name: envoy.transport_sockets.tls
      typed_config:
        "@type": type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext
        sni: localhost
        common_tls_context:
          tls_params: {{ tls_maximum_protocol_version: TLSv1_3 }}
          alpn_protocols: [h2]
          tls_certificates:
          - certificate_chain: {{ filename: {cert} }}
            private_key: {{ filename: {key} }}
          validation_context:
            trusted_ca: {{ filename: {ca} }}
            match_typed_subject_alt_names:
            - san_type: DNS
              matcher: {{ exact: localhost }}
"#,
        cert = pki.path("client.crt").display(),
        key = pki.path("client.key").display(),
        ca = pki.path("ca.crt").display(),
    );
    yaml.replace(anchor, &format!("{socket}{anchor}"))
}

#[tokio::test]
async fn envoy_reaches_tollgate_over_mtls_for_checks_and_access_logs() {
    let pki = Pki::new();
    let (tollgate, _, _) = start_tollgate(&pki).await;
    let upstream = EchoUpstream::start();
    let envoy = Envoy::start(&envoy_mtls_config(tollgate.grpc_port, upstream.port, &pki)).await;
    let client = http_client();

    let allowed = client
        .get(envoy.url("/forecast"))
        .header("x-api-key", KEY)
        .send()
        .await
        .unwrap();
    assert_eq!(allowed.status(), 200, "{}", envoy.logs());
    // A denial proves the answer came from tollgate's check, not from a path around it.
    let denied = client.get(envoy.url("/forecast")).send().await.unwrap();
    assert_eq!(denied.status(), 401);
    assert!(
        envoy
            .stat("cluster.tollgate_grpc.ssl.handshake")
            .await
            .unwrap_or(0)
            >= 1,
        "Envoy made no TLS handshake to tollgate"
    );
    // The access-log stream rides the same mTLS cluster.
    tollgate
        .wait_metric("tollgate_metering_records_received_total", &[], |v| {
            v >= 1.0
        })
        .await;
}

#[tokio::test]
async fn a_client_without_a_certificate_is_refused() {
    let pki = Pki::new();
    let (tollgate, server, client) = start_tollgate(&pki).await;

    let mut with_cert = tls_connect(tollgate.grpc_port, &pki.ca_pem, Some(&client))
        .await
        .expect("handshake with a client certificate");
    assert_eq!(peer_leaf(&with_cert), server.der);
    assert_eq!(
        with_cert.get_ref().1.alpn_protocol(),
        Some(&b"h2"[..]),
        "gRPC listener does not offer h2"
    );
    assert!(
        h2_settings(&mut with_cert).await,
        "mTLS client got no HTTP/2 SETTINGS"
    );

    // With TLS 1.3 the client may finish its side before the server refuses: the refusal shows as an alert
    // on the first read at the latest.
    let refused = match tls_connect(tollgate.grpc_port, &pki.ca_pem, None).await {
        Err(_) => true,
        Ok(mut stream) => !h2_settings(&mut stream).await,
    };
    assert!(refused, "a client without a certificate was served");

    // A certificate from another CA is refused too.
    let stranger = Pki::new().leaf(&["envoy.test"], 9, true);
    let refused = match tls_connect(tollgate.grpc_port, &pki.ca_pem, Some(&stranger)).await {
        Err(_) => true,
        Ok(mut stream) => !h2_settings(&mut stream).await,
    };
    assert!(refused, "a client certificate from another CA was served");
    // Both refusals are counted for the gRPC listener.
    tollgate
        .wait_metric(
            "tollgate_tls_handshake_failures_total",
            &[("listener", "grpc_tls")],
            |n| n >= 2.0,
        )
        .await;
    assert!(
        tollgate.logs().lines().all(|l| !l.contains("panicked")),
        "{}",
        tollgate.logs()
    );
}

#[tokio::test]
async fn plain_text_to_the_tls_grpc_port_is_refused() {
    let pki = Pki::new();
    let (tollgate, _, _) = start_tollgate(&pki).await;
    let mut tcp = TcpStream::connect(("127.0.0.1", tollgate.grpc_port))
        .await
        .unwrap();
    assert!(
        !h2_settings(&mut tcp).await,
        "the TLS gRPC port answered clear-text HTTP/2"
    );
}

#[tokio::test]
async fn the_admin_port_speaks_https_only() {
    let pki = Pki::new();
    let (tollgate, _, _) = start_tollgate(&pki).await;
    let https = https_client(pki.ca_pem.as_bytes());
    let health = https
        .get(tollgate.admin_url("/healthz"))
        .send()
        .await
        .unwrap();
    assert_eq!(health.status(), 200);
    assert!(tollgate.admin_url("/").starts_with("https://"));

    let plain = http_client()
        .get(format!("http://127.0.0.1:{}/healthz", tollgate.admin_port))
        .send()
        .await;
    assert!(
        plain.is_err() || !plain.unwrap().status().is_success(),
        "plain HTTP was served on the TLS admin port"
    );
    // A client that does not trust the CA refuses tollgate's certificate.
    let untrusting = https_client(Pki::new().ca_pem.as_bytes())
        .get(tollgate.admin_url("/healthz"))
        .send()
        .await;
    assert!(
        untrusting.is_err(),
        "a certificate from an unknown CA was accepted"
    );
}

#[tokio::test]
async fn rotated_files_reach_new_connections_and_open_ones_keep_theirs() {
    let pki = Pki::new();
    let (tollgate, first, client) = start_tollgate(&pki).await;
    let mut open = tls_connect(tollgate.grpc_port, &pki.ca_pem, Some(&client))
        .await
        .unwrap();
    assert_eq!(peer_leaf(&open), first.der);
    assert!(h2_settings(&mut open).await);

    // A broken rotation keeps the last good certificate and says so once.
    pki.write(
        "grpc.crt",
        "-----BEGIN CERTIFICATE-----\nbm90IGEgY2VydA==\n-----END CERTIFICATE-----\n",
    );
    poll_until(
        "tollgate to refuse the broken certificate file",
        CHANGE_TIMEOUT,
        || async {
            tollgate
                .logs()
                .contains("new TLS files refused")
                .then_some(())
        },
    )
    .await;
    let during = tls_connect(tollgate.grpc_port, &pki.ca_pem, Some(&client))
        .await
        .expect("handshake while the files are broken");
    assert_eq!(peer_leaf(&during), first.der);

    // A good rotation: new serial, one more name.
    let second = pki.leaf(&["localhost", "127.0.0.1", "rotated.test"], 42, false);
    pki.write_leaf("grpc", &second);
    poll_until(
        "new connections to get the rotated certificate",
        CHANGE_TIMEOUT,
        || async {
            let stream = tls_connect(tollgate.grpc_port, &pki.ca_pem, Some(&client))
                .await
                .ok()?;
            (peer_leaf(&stream) == second.der).then_some(())
        },
    )
    .await;
    assert!(tollgate.logs().contains("TLS certificate reloaded"));

    // The connection opened before the rotation still works, with the certificate it was made with.
    assert_eq!(peer_leaf(&open), first.der);
    assert!(
        h2_ping(&mut open).await,
        "the open connection stopped working"
    );
    let warnings = tollgate
        .logs()
        .lines()
        .filter(|l| l.contains("new TLS files refused"))
        .count();
    assert!(
        warnings <= 2,
        "a bad file is reported once (plus at most one half-rotated pair):\n{}",
        tollgate.logs()
    );
}
