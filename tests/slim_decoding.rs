//! The slim Envoy messages (proto/tollgate/slim/v1/) read exactly what envoy-types' full messages read.
//!
//! - Recorded messages of a real Envoy 1.40 (tests/fixtures/envoy/): each one decoded both ways gives the
//!   same core `Request` and the same `UsageRecord`s.
//! - A live recording: a real Envoy sends its Checks and access logs to a capture server that keeps their
//!   raw bytes, and the same comparison runs on them. `TOLLGATE_RECORD_ENVOY_FIXTURES=1` writes them as the
//!   fixtures above (after an Envoy upgrade, say).
//! - Properties: random full messages with every field Envoy may send filled in (bodies, peers, node, TLS,
//!   typed metadata...), encoded and decoded both ways.

mod support;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration as StdDuration;

use envoy_types::pb::envoy::config::core::v3::{
    Address, HeaderMap, HeaderValue, Metadata, Node, SocketAddress, address,
    socket_address::PortSpecifier,
};
use envoy_types::pb::envoy::data::accesslog::v3::{
    AccessLogCommon, ConnectionProperties, HttpAccessLogEntry, HttpRequestProperties,
    HttpResponseProperties, ResponseFlags, TcpAccessLogEntry,
};
use envoy_types::pb::envoy::service::accesslog::v3::stream_access_logs_message::{
    HttpAccessLogEntries, Identifier, LogEntries, TcpAccessLogEntries,
};
use envoy_types::pb::envoy::service::accesslog::v3::{
    StreamAccessLogsMessage, StreamAccessLogsResponse,
};
use envoy_types::pb::envoy::service::auth::v3::attribute_context::{
    HttpRequest, Peer, Request as AttributeRequest, TlsSession,
};
use envoy_types::pb::envoy::service::auth::v3::check_response::HttpResponse;
use envoy_types::pb::envoy::service::auth::v3::{
    AttributeContext, CheckRequest, CheckResponse, DeniedHttpResponse, OkHttpResponse,
};
use envoy_types::pb::envoy::r#type::v3::HttpStatus;
use envoy_types::pb::google::protobuf::{
    Any, Duration, ListValue, Struct, Timestamp, UInt32Value, Value, value::Kind,
};
use envoy_types::pb::google::rpc;
use proptest::prelude::*;
use prost::Message;
use prost::bytes::{Buf, BufMut};
use support::{CHANGE_TIMEOUT, EchoUpstream, Envoy, http_client, poll_until, raw_request, root};
use tollgate::check::Pairs;
use tollgate::envoy::access_log::usage_record;
use tollgate::envoy::authz::{CheckMessage, CheckParts, Unreadable};
use tollgate::envoy::metadata::{self, Field};
use tollgate::envoy::slim;
use tollgate::metering::UsageRecord;
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::codegen::{Body, BoxFuture, Context, Poll, Service, StdError, http};
use tonic::server::{ClientStreamingService, Grpc, NamedService, UnaryService};
use tonic::{Status, Streaming};

// ---------------------------------------------------------------------------------------------------------
// Both decodes of one message.

/// What the adapter hands the core for one CheckRequest, as comparable values.
#[derive(Debug, PartialEq)]
struct PlainRequest {
    method: String,
    path: String,
    authority: String,
    headers: BTreeMap<String, String>,
    context_extensions: BTreeMap<String, String>,
}

fn plain(parts: Result<CheckParts<'_>, Unreadable>) -> Option<PlainRequest> {
    let parts = parts.ok()?;
    let request = parts.request();
    Some(PlainRequest {
        method: request.method.to_owned(),
        path: request.path.to_owned(),
        authority: request.authority.to_owned(),
        headers: collected(request.headers),
        context_extensions: collected(request.context_extensions),
    })
}

/// Every pair, in name order (a name given twice keeps its last value, as the core's lookups do).
fn collected(pairs: &dyn Pairs) -> BTreeMap<String, String> {
    let mut all = BTreeMap::new();
    pairs.for_each(&mut |name, value| {
        all.insert(name.to_owned(), value.to_owned());
    });
    all
}

/// Decodes `bytes` as envoy-types' full CheckRequest and as the slim one; asserts the core reads the same.
fn check_both_ways(bytes: &[u8]) -> Option<PlainRequest> {
    let full = CheckRequest::decode(bytes).expect("envoy-types decodes the CheckRequest");
    let slim = slim::CheckRequest::decode(bytes).expect("the slim CheckRequest decodes it");
    let (from_full, from_slim) = (plain(full.parts()), plain(slim.parts()));
    assert_eq!(
        from_slim, from_full,
        "slim and full CheckRequest decodes differ"
    );
    from_full
}

/// What the access-log adapter reads of one stream message, as comparable values.
#[derive(Debug, Default, PartialEq)]
struct Batch {
    log_name: Option<String>,
    records: Vec<UsageRecord>,
    tcp_entries: Option<usize>,
}

fn full_batch(message: &StreamAccessLogsMessage) -> Batch {
    let mut batch = Batch {
        log_name: message.identifier.as_ref().map(|i| i.log_name.clone()),
        ..Batch::default()
    };
    match &message.log_entries {
        Some(LogEntries::HttpLogs(http)) => {
            batch.records = http.log_entry.iter().map(usage_record).collect();
        }
        Some(LogEntries::TcpLogs(tcp)) => batch.tcp_entries = Some(tcp.log_entry.len()),
        None => {}
    }
    batch
}

fn slim_batch(message: &slim::StreamAccessLogsMessage) -> Batch {
    use slim::stream_access_logs_message::LogEntries;
    let mut batch = Batch {
        log_name: message.identifier.as_ref().map(|i| i.log_name.clone()),
        ..Batch::default()
    };
    match &message.log_entries {
        Some(LogEntries::HttpLogs(http)) => {
            batch.records = http.log_entry.iter().map(usage_record).collect();
        }
        Some(LogEntries::TcpLogs(tcp)) => batch.tcp_entries = Some(tcp.log_entry.len()),
        None => {}
    }
    batch
}

/// Decodes `bytes` as envoy-types' full access-log message and as the slim one; asserts the same records.
fn log_both_ways(bytes: &[u8]) -> Batch {
    let full = StreamAccessLogsMessage::decode(bytes).expect("envoy-types decodes the message");
    let slim = slim::StreamAccessLogsMessage::decode(bytes).expect("the slim message decodes it");
    let (from_full, from_slim) = (full_batch(&full), slim_batch(&slim));
    assert_eq!(
        from_slim, from_full,
        "slim and full access-log decodes differ"
    );
    from_full
}

/// Asserts that `checks` and `logs` exercise every field the slim messages keep, so that the comparisons
/// above are not between two empty values.
fn assert_variety(checks: &[Vec<u8>], logs: &[Vec<u8>]) {
    let full_checks: Vec<CheckRequest> = checks
        .iter()
        .map(|b| CheckRequest::decode(b.as_slice()).expect("CheckRequest"))
        .collect();
    let http = |c: &CheckRequest| {
        c.attributes
            .as_ref()
            .and_then(|a| a.request.as_ref())
            .and_then(|r| r.http.clone())
            .unwrap_or_default()
    };
    let with = |what: &str, found: bool| assert!(found, "no recorded CheckRequest {what}");
    with(
        "with a plain header map",
        full_checks.iter().any(|c| !http(c).headers.is_empty()),
    );
    with(
        "with raw headers (encode_raw_headers)",
        full_checks.iter().any(|c| {
            http(c).headers.is_empty()
                && http(c)
                    .header_map
                    .is_some_and(|m| m.headers.iter().any(|h| !h.raw_value.is_empty()))
        }),
    );
    with(
        "with a body",
        full_checks
            .iter()
            .any(|c| !http(c).body.is_empty() || !http(c).raw_body.is_empty()),
    );
    with(
        "with a query",
        full_checks.iter().any(|c| http(c).path.contains('?')),
    );
    let plains: Vec<PlainRequest> = checks.iter().filter_map(|b| check_both_ways(b)).collect();
    with(
        "with context extensions",
        plains
            .iter()
            .any(|p| p.context_extensions.contains_key("tollgate_api")),
    );
    with(
        "without context extensions",
        plains.iter().any(|p| p.context_extensions.is_empty()),
    );
    with(
        "with a repeated header joined",
        plains
            .iter()
            .any(|p| p.headers.get("x-multi").is_some_and(|v| v.contains(','))),
    );
    with(
        "with an :authority",
        plains.iter().all(|p| !p.authority.is_empty()),
    );

    let batches: Vec<Batch> = logs.iter().map(|b| log_both_ways(b)).collect();
    let records: Vec<&UsageRecord> = batches.iter().flat_map(|b| &b.records).collect();
    let with = |what: &str, found: bool| assert!(found, "no recorded access-log {what}");
    with(
        "message naming its log",
        batches
            .iter()
            .any(|b| b.log_name.as_deref() == Some("tollgate")),
    );
    with(
        "entry with ext_authz metadata",
        records
            .iter()
            .any(|r| r.decision == "allow" && r.app == "weatherapp" && r.quota_reserved == 3),
    );
    with(
        "entry denied",
        records
            .iter()
            .any(|r| r.decision == "deny" && r.response_code == 403),
    );
    with(
        "entry with tollgate.usage",
        records
            .iter()
            .any(|r| r.usage.get("input_tokens") == Some(&12)),
    );
    with(
        "entry with a logged response header",
        records
            .iter()
            .any(|r| r.response_headers.get("x-tokens").map(String::as_str) == Some("7")),
    );
    with(
        "entry with request and response bytes",
        records
            .iter()
            .any(|r| r.request_bytes > 0 && r.response_bytes > 0),
    );
    with(
        "entry with a start, a duration and a request id",
        records
            .iter()
            .any(|r| r.start_ms > 0 && r.duration_us > 0 && !r.request_id.is_empty()),
    );
}

// ---------------------------------------------------------------------------------------------------------
// Recorded fixtures.

fn fixture_dir() -> PathBuf {
    root().join("tests/fixtures/envoy")
}

/// The fixtures whose names start with `prefix`, in name order.
fn fixtures(prefix: &str) -> Vec<Vec<u8>> {
    let mut paths: Vec<PathBuf> = std::fs::read_dir(fixture_dir())
        .expect("tests/fixtures/envoy")
        .map(|e| e.expect("fixture entry").path())
        .filter(|p| {
            p.extension().is_some_and(|e| e == "bin")
                && p.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.starts_with(prefix))
        })
        .collect();
    paths.sort();
    paths
        .iter()
        .map(|p| std::fs::read(p).expect("read fixture"))
        .collect()
}

/// A slim CheckRequest whose headers are `pairs` (raw bytes) on a GET of `/`.
fn slim_check(pairs: &[(&[u8], &[u8])]) -> Vec<u8> {
    use slim::attribute_context::{HttpRequest as SlimHttp, Request as SlimRequest};
    slim::CheckRequest {
        attributes: Some(slim::AttributeContext {
            request: Some(SlimRequest {
                http: Some(SlimHttp {
                    method: "GET".into(),
                    path: "/".into(),
                    host: "api.example.com".into(),
                    headers: pairs
                        .iter()
                        .map(|(k, v)| slim::MapEntry {
                            key: k.to_vec().into(),
                            value: v.to_vec().into(),
                        })
                        .collect(),
                    header_map: None,
                }),
            }),
            context_extensions: Vec::new(),
        }),
    }
    .encode_to_vec()
}

#[test]
fn a_header_given_twice_on_the_wire_reads_as_the_map_keeps_it() {
    // Envoy never sends a name twice in its map, but protobuf lets a later entry replace an earlier one: the
    // slim list must read what a map decode reads.
    let bytes = slim_check(&[(b"x-api-key", b"first"), (b"x-api-key", b"second")]);
    let plain = check_both_ways(&bytes).expect("an HTTP request");
    assert_eq!(plain.headers["x-api-key"], "second");
    let slim = slim::CheckRequest::decode(bytes.as_slice()).expect("decodes");
    let parts = slim.parts().expect("readable");
    assert_eq!(parts.request().headers.get("x-api-key"), Some("second"));
}

#[test]
fn access_log_keys_given_twice_on_the_wire_read_as_the_maps_keep_them() {
    // The slim access-log entry reads Envoy's maps (the metadata namespaces, a struct's fields, the logged
    // headers) as lists; protobuf lets a later map entry replace an earlier one, and the records must be what
    // the map decode reads. Encoding the slim message puts every repeated key on the wire as given.
    use slim::metadata_value::Kind as SlimKind;
    let field = |key: &str, kind: SlimKind| slim::MetadataField {
        key: key.into(),
        value: Some(slim::MetadataValue { kind: Some(kind) }),
    };
    let text = |key: &str, value: &str| field(key, SlimKind::StringValue(value.into()));
    let namespace = |key: &str, fields: Vec<slim::MetadataField>| slim::FilterMetadata {
        key: key.into(),
        value: Some(slim::MetadataStruct { fields }),
    };
    let header = |key: &str, value: &str| slim::StringEntry {
        key: key.into(),
        value: value.into(),
    };
    let entry = slim::HttpAccessLogEntry {
        common_properties: Some(slim::AccessLogCommon {
            metadata: Some(slim::Metadata {
                filter_metadata: vec![
                    namespace(metadata::NAMESPACE, vec![text("product", "replaced")]),
                    namespace(
                        metadata::USAGE_NAMESPACE,
                        vec![
                            field("tokens", SlimKind::NumberValue(3.0)),
                            field("tokens", SlimKind::NumberValue(4.0)),
                            field("images", SlimKind::NumberValue(2.0)),
                            field("images", SlimKind::ListValue(slim::Skipped {})),
                        ],
                    ),
                    namespace(
                        metadata::NAMESPACE,
                        vec![
                            text("decision", "allow"),
                            text("app", "early"),
                            text("app", "late"),
                            text("company", "acme"),
                            field("company", SlimKind::BoolValue(true)),
                            text(metadata::QUOTA_RESERVED, "5"),
                            text(metadata::QUOTA_RESERVED, "9"),
                        ],
                    ),
                ],
            }),
            ..Default::default()
        }),
        request: Some(slim::HttpRequestProperties {
            request_headers: vec![header("x-request-id", "a"), header("x-request-id", "b")],
            ..Default::default()
        }),
        response: Some(slim::HttpResponseProperties {
            response_headers: vec![
                header("x-tokens", "1"),
                header("X-Tokens", "2"),
                header("x-tokens", "3"),
            ],
            ..Default::default()
        }),
    };
    let message = slim::StreamAccessLogsMessage {
        identifier: None,
        log_entries: Some(slim::stream_access_logs_message::LogEntries::HttpLogs(
            slim::stream_access_logs_message::HttpAccessLogEntries {
                log_entry: vec![entry],
            },
        )),
    };
    let batch = log_both_ways(&message.encode_to_vec());
    let [record] = batch.records.as_slice() else {
        panic!("one record: {batch:?}");
    };
    assert_eq!(
        (record.app.as_str(), record.decision.as_str()),
        ("late", "allow")
    );
    assert_eq!(
        record.product, "",
        "the later namespace entry replaces the struct"
    );
    assert_eq!(record.company, "", "the later value is not a string");
    assert_eq!(record.quota_reserved, 9);
    assert_eq!(record.request_id, "b");
    assert_eq!(record.response_headers["x-tokens"], "3");
    assert_eq!(
        record.usage.iter().collect::<Vec<_>>(),
        [(&"tokens".to_owned(), &4)]
    );
}

#[test]
fn a_header_that_is_not_utf8_refuses_the_check_as_a_string_decode_does() {
    let bytes = slim_check(&[(b"x-api-key", b"key"), (b"x-other", b"\xff\xfe")]);
    assert!(
        CheckRequest::decode(bytes.as_slice()).is_err(),
        "envoy-types refuses a string that is not UTF-8"
    );
    let slim = slim::CheckRequest::decode(bytes.as_slice()).expect("bytes decode as bytes");
    assert_eq!(
        slim.parts().err(),
        Some(Unreadable::NotUtf8("a header")),
        "the slim read refuses it too, naming the field, never the value"
    );
}

#[test]
fn recorded_envoy_messages_read_the_same_both_ways() {
    let checks = fixtures("check-");
    let logs = fixtures("access-log-");
    assert!(
        checks.len() >= 10 && logs.len() >= 4,
        "fixtures missing: {} checks, {} access-log messages",
        checks.len(),
        logs.len()
    );
    for check in &checks {
        assert!(check_both_ways(check).is_some());
    }
    for log in &logs {
        log_both_ways(log);
    }
    assert_variety(&checks, &logs);
}

#[test]
fn the_slim_servers_answer_on_envoys_paths() {
    use envoy_types::pb::envoy::service::accesslog::v3::access_log_service_server as full_log;
    use envoy_types::pb::envoy::service::auth::v3::authorization_server as full_authz;
    assert_eq!(
        slim::authorization_server::SERVICE_NAME,
        full_authz::SERVICE_NAME
    );
    assert_eq!(
        slim::access_log_service_server::SERVICE_NAME,
        full_log::SERVICE_NAME
    );
}

// ---------------------------------------------------------------------------------------------------------
// Live recording from a real Envoy.

/// Raw gRPC messages, undecoded: what Envoy put on the wire.
#[derive(Clone, Copy, Default)]
struct RawCodec;

impl Codec for RawCodec {
    type Encode = Vec<u8>;
    type Decode = Vec<u8>;
    type Encoder = RawCodec;
    type Decoder = RawCodec;

    fn encoder(&mut self) -> RawCodec {
        RawCodec
    }

    fn decoder(&mut self) -> RawCodec {
        RawCodec
    }
}

impl Encoder for RawCodec {
    type Item = Vec<u8>;
    type Error = Status;

    fn encode(&mut self, item: Vec<u8>, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        dst.put_slice(&item);
        Ok(())
    }
}

impl Decoder for RawCodec {
    type Item = Vec<u8>;
    type Error = Status;

    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Vec<u8>>, Status> {
        let mut bytes = vec![0; src.remaining()];
        src.copy_to_slice(&mut bytes);
        Ok(Some(bytes))
    }
}

/// What the capture server received, in arrival order.
#[derive(Clone, Default)]
struct Captured {
    checks: Arc<Mutex<Vec<Vec<u8>>>>,
    logs: Arc<Mutex<Vec<Vec<u8>>>>,
}

impl Captured {
    fn checks(&self) -> Vec<Vec<u8>> {
        self.checks.lock().expect("checks lock").clone()
    }

    fn logs(&self) -> Vec<Vec<u8>> {
        self.logs.lock().expect("logs lock").clone()
    }

    /// HTTP entries received so far.
    fn http_entries(&self) -> usize {
        self.logs()
            .iter()
            .filter_map(|b| StreamAccessLogsMessage::decode(b.as_slice()).ok())
            .map(|m| match m.log_entries {
                Some(LogEntries::HttpLogs(http)) => http.log_entry.len(),
                _ => 0,
            })
            .sum()
    }
}

fn text(s: &str) -> Value {
    Value {
        kind: Some(Kind::StringValue(s.to_owned())),
    }
}

/// The capture's answer: allow with tollgate's metadata, or for `/deny` a 403 as tollgate denies.
fn answer(check: &[u8]) -> CheckResponse {
    let path = CheckRequest::decode(check)
        .ok()
        .and_then(|c| c.attributes?.request?.http)
        .map(|h| h.path)
        .unwrap_or_default();
    let deny = path.starts_with("/deny");
    let mut fields: std::collections::HashMap<String, Value> = Field::ALL
        .into_iter()
        .map(|field| {
            let value = match field {
                Field::Decision => if deny { "deny" } else { "allow" }.to_owned(),
                Field::Reason => if deny { "quota_exceeded" } else { "allowed" }.to_owned(),
                Field::App => "weatherapp".to_owned(),
                other => format!("{}-value", other.key()),
            };
            (field.key().to_owned(), text(&value))
        })
        .collect();
    fields.insert(metadata::QUOTA_RESERVED.to_owned(), text("3"));
    fields.insert(format!("{}tier", metadata::ATTRIBUTE_PREFIX), text("gold"));
    let (code, http_response) = if deny {
        let denied = DeniedHttpResponse {
            status: Some(HttpStatus { code: 403 }),
            headers: Vec::new(),
            body: "{\"error\":\"quota_exceeded\"}".to_owned(),
        };
        (
            rpc::Code::PermissionDenied,
            HttpResponse::DeniedResponse(denied),
        )
    } else {
        (
            rpc::Code::Ok,
            HttpResponse::OkResponse(OkHttpResponse::default()),
        )
    };
    CheckResponse {
        status: Some(rpc::Status {
            code: code as i32,
            ..Default::default()
        }),
        dynamic_metadata: Some(Struct { fields }),
        http_response: Some(http_response),
    }
}

/// Envoy's ext_authz service: keeps each CheckRequest's bytes and answers with [`answer`].
#[derive(Clone)]
struct CheckCapture(Captured);

/// Envoy's access-log service: keeps each stream message's bytes.
#[derive(Clone)]
struct LogCapture(Captured);

impl NamedService for CheckCapture {
    const NAME: &'static str = "envoy.service.auth.v3.Authorization";
}

impl NamedService for LogCapture {
    const NAME: &'static str = "envoy.service.accesslog.v3.AccessLogService";
}

impl UnaryService<Vec<u8>> for CheckCapture {
    type Response = Vec<u8>;
    type Future = BoxFuture<tonic::Response<Vec<u8>>, Status>;

    fn call(&mut self, request: tonic::Request<Vec<u8>>) -> Self::Future {
        let bytes = request.into_inner();
        let response = answer(&bytes).encode_to_vec();
        self.0.checks.lock().expect("checks lock").push(bytes);
        Box::pin(async move { Ok(tonic::Response::new(response)) })
    }
}

impl ClientStreamingService<Vec<u8>> for LogCapture {
    type Response = Vec<u8>;
    type Future = BoxFuture<tonic::Response<Vec<u8>>, Status>;

    fn call(&mut self, request: tonic::Request<Streaming<Vec<u8>>>) -> Self::Future {
        let captured = self.0.clone();
        Box::pin(async move {
            let mut stream = request.into_inner();
            while let Some(message) = stream.message().await? {
                captured.logs.lock().expect("logs lock").push(message);
            }
            Ok(tonic::Response::new(
                StreamAccessLogsResponse {}.encode_to_vec(),
            ))
        })
    }
}

impl<B> Service<http::Request<B>> for CheckCapture
where
    B: Body + Send + 'static,
    B::Error: Into<StdError> + Send + 'static,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = std::convert::Infallible;
    type Future = BoxFuture<Self::Response, Self::Error>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let service = self.clone();
        Box::pin(async move { Ok(Grpc::new(RawCodec).unary(service, request).await) })
    }
}

impl<B> Service<http::Request<B>> for LogCapture
where
    B: Body + Send + 'static,
    B::Error: Into<StdError> + Send + 'static,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = std::convert::Infallible;
    type Future = BoxFuture<Self::Response, Self::Error>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let service = self.clone();
        Box::pin(async move { Ok(Grpc::new(RawCodec).client_streaming(service, request).await) })
    }
}

/// Serves the capture on a loopback port; returns the port.
async fn start_capture(captured: &Captured) -> u16 {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind the capture server");
    let port = listener.local_addr().expect("capture address").port();
    let server = tonic::transport::Server::builder()
        .add_service(CheckCapture(captured.clone()))
        .add_service(LogCapture(captured.clone()));
    let incoming = tonic::transport::server::TcpIncoming::from(listener);
    tokio::spawn(server.serve_with_incoming(incoming));
    port
}

/// Envoy in front of the echo upstream, with ext_authz and the gRPC access log both sent to the capture.
/// `raw` switches ext_authz to the header map (`encode_raw_headers`) and the body to bytes.
fn recording_config(capture_port: u16, upstream_port: u16, raw: bool) -> String {
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
                  envoy_grpc: {{ cluster_name: capture }}
                buffer_flush_interval: 0.3s
                buffer_size_bytes: 65536
              additional_request_headers_to_log: [x-request-id, user-agent]
              additional_response_headers_to_log: [x-tokens, content-type]
          route_config:
            name: recording
            virtual_hosts:
            - name: api_from_authority
              domains: ["geo.example.test", "geo.example.test:*"]
              routes:
              - match: {{ prefix: "/" }}
                route: {{ cluster: upstream }}
            - name: api_from_context_extension
              domains: ["*"]
              routes:
              - match: {{ prefix: "/" }}
                route: {{ cluster: upstream }}
                typed_per_filter_config:
                  envoy.filters.http.ext_authz:
                    "@type": type.googleapis.com/envoy.extensions.filters.http.ext_authz.v3.ExtAuthzPerRoute
                    check_settings:
                      context_extensions: {{ tollgate_api: weatherapi, tier: gold }}
          http_filters:
          - name: envoy.filters.http.set_metadata
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.set_metadata.v3.Config
              metadata:
              - metadata_namespace: tollgate.usage
                value: {{ input_tokens: 12, output_tokens: 30, outcome: ok }}
              - metadata_namespace: example.other
                value: {{ note: not read by tollgate, nested: {{ list: [1, two, true] }} }}
          - name: envoy.filters.http.ext_authz
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.ext_authz.v3.ExtAuthz
              transport_api_version: V3
              failure_mode_allow: false
              encode_raw_headers: {raw}
              metadata_context_namespaces: [example.other]
              with_request_body:
                max_request_bytes: 4096
                allow_partial_message: true
                pack_as_bytes: {raw}
              grpc_service:
                envoy_grpc: {{ cluster_name: capture }}
                timeout: 2s
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
  - name: capture
    type: STATIC
    connect_timeout: 1s
    typed_extension_protocol_options:
      envoy.extensions.upstreams.http.v3.HttpProtocolOptions:
        "@type": type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions
        explicit_http_config:
          http2_protocol_options: {{}}
    load_assignment:
      cluster_name: capture
      endpoints:
      - lb_endpoints:
        - endpoint:
            address:
              socket_address: {{ address: 127.0.0.1, port_value: {capture_port} }}
"#
    )
}

/// An allowed GET through `envoy` with a query, credentials, a metered response and a repeated header.
async fn get_forecast(envoy: &Envoy) {
    let get = http_client()
        .get(envoy.url("/weather/forecast?city=paris&apikey=k1"))
        .header("x-api-key", "k1")
        .header("x-echo-tokens", "7")
        .header("x-multi", "a")
        .header("x-multi", "b")
        .header("user-agent", "slim-recorder/1")
        .send()
        .await
        .expect("GET through Envoy");
    assert_eq!(get.status(), 200);
}

/// Calls through `envoy`: [`get_forecast`]; a POST with a JSON body; a denied call; a call to the host-routed
/// API (no context extension). Returns how many were sent.
async fn drive(envoy: &Envoy) -> usize {
    get_forecast(envoy).await;
    let client = http_client();
    let post = client
        .post(envoy.url("/weather/report"))
        .header("content-type", "application/json")
        .header("x-request-id", "rec-post-1")
        .body(r#"{"city":"paris","readings":[1,2,3]}"#)
        .send()
        .await
        .expect("POST through Envoy");
    assert_eq!(post.status(), 200);
    let denied = client
        .get(envoy.url("/deny?reason=test"))
        .send()
        .await
        .expect("denied GET through Envoy");
    assert_eq!(denied.status(), 403);
    let port = envoy.port;
    let geo = tokio::task::spawn_blocking(move || {
        raw_request(
            port,
            "GET",
            b"/v1/cities?near=paris",
            "geo.example.test",
            &[("x-api-key", "k2")],
        )
    })
    .await
    .expect("raw request task");
    assert_eq!(geo.status, 200);
    4
}

/// Runs Envoy with [`recording_config`], drives it, and returns the captured Check and access-log bytes.
///
/// One call first, logged alone: a stream's first message also carries Envoy's node description (tens of
/// KiB); the calls after it make the batches Envoy sends from then on.
async fn record(raw: bool) -> (Vec<Vec<u8>>, Vec<Vec<u8>>) {
    let captured = Captured::default();
    let capture_port = start_capture(&captured).await;
    let upstream = EchoUpstream::start();
    let envoy = Envoy::start(&recording_config(capture_port, upstream.port, raw)).await;
    let logged = |count: usize| {
        let captured = captured.clone();
        move || {
            let done = captured.http_entries() >= count;
            async move { done.then_some(()) }
        }
    };
    get_forecast(&envoy).await;
    poll_until(
        "Envoy's access log of the first call",
        CHANGE_TIMEOUT,
        logged(1),
    )
    .await;
    let sent = 1 + drive(&envoy).await;
    poll_until(
        "Envoy's access log of every call",
        CHANGE_TIMEOUT,
        logged(sent),
    )
    .await;
    // Envoy flushes the log on its own timer; stop it so a late message cannot slip in mid-assert.
    drop(envoy);
    tokio::time::sleep(StdDuration::from_millis(100)).await;
    assert_eq!(captured.checks().len(), sent, "one Check per call");
    (captured.checks(), captured.logs())
}

/// Writes the recording as fixtures `<kind>-<variant>-<n>.bin`, replacing the variant's earlier ones.
fn write_fixtures(dir: &Path, variant: &str, checks: &[Vec<u8>], logs: &[Vec<u8>]) {
    for entry in std::fs::read_dir(dir).expect("fixture dir") {
        let path = entry.expect("fixture entry").path();
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
        if name.starts_with(&format!("check-{variant}-"))
            || name.starts_with(&format!("access-log-{variant}-"))
        {
            std::fs::remove_file(&path).expect("remove an old fixture");
        }
    }
    for (kind, messages) in [("check", checks), ("access-log", logs)] {
        for (n, bytes) in messages.iter().enumerate() {
            let path = dir.join(format!("{kind}-{variant}-{n}.bin"));
            std::fs::write(&path, bytes).expect("write a fixture");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_real_envoys_messages_read_the_same_both_ways() {
    let mut all_checks = Vec::new();
    let mut all_logs = Vec::new();
    for (variant, raw) in [("headers", false), ("raw-headers", true)] {
        let (checks, logs) = record(raw).await;
        for check in &checks {
            assert!(
                check_both_ways(check).is_some(),
                "{variant}: no HTTP request"
            );
        }
        for log in &logs {
            log_both_ways(log);
        }
        if std::env::var_os("TOLLGATE_RECORD_ENVOY_FIXTURES").is_some_and(|v| v == "1") {
            write_fixtures(&fixture_dir(), variant, &checks, &logs);
        }
        all_checks.extend(checks);
        all_logs.extend(logs);
    }
    assert_variety(&all_checks, &all_logs);
}

// ---------------------------------------------------------------------------------------------------------
// Properties: random full messages, every field filled in.

fn small_text() -> impl Strategy<Value = String> {
    "[ -~]{0,10}"
}

fn text_map() -> impl Strategy<Value = std::collections::HashMap<String, String>> {
    prop::collection::hash_map("[a-zA-Z:_-]{1,8}", small_text(), 0..5)
}

fn timestamp() -> impl Strategy<Value = Option<Timestamp>> {
    prop::option::of(
        prop_oneof![
            (any::<i64>(), any::<i32>()),
            (946_684_800i64..1_800_000_000, 0i32..1_000_000_000),
        ]
        .prop_map(|(seconds, nanos)| Timestamp { seconds, nanos }),
    )
}

fn duration() -> impl Strategy<Value = Option<Duration>> {
    prop::option::of(
        prop_oneof![
            (any::<i64>(), any::<i32>()),
            (0i64..100, 0i32..1_000_000_000)
        ]
        .prop_map(|(seconds, nanos)| Duration { seconds, nanos }),
    )
}

fn address() -> impl Strategy<Value = Option<Address>> {
    prop::option::of(
        ("[0-9.]{1,15}", any::<u16>()).prop_map(|(ip, port)| Address {
            address: Some(address::Address::SocketAddress(SocketAddress {
                address: ip,
                port_specifier: Some(PortSpecifier::PortValue(u32::from(port))),
                ..Default::default()
            })),
        }),
    )
}

/// Any JSON-like value: what a filter's metadata may hold.
fn value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Kind::NullValue(0)),
        any::<bool>().prop_map(Kind::BoolValue),
        (0u32..100_000).prop_map(|n| Kind::NumberValue(f64::from(n))),
        (-1.0e6f64..1.0e6).prop_map(Kind::NumberValue),
        small_text().prop_map(Kind::StringValue),
    ];
    leaf.prop_map(|kind| Value { kind: Some(kind) })
        .prop_recursive(3, 16, 4, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..4)
                    .prop_map(|values| Kind::ListValue(ListValue { values })),
                prop::collection::hash_map("[a-z_]{1,6}", inner, 0..4)
                    .prop_map(|fields| Kind::StructValue(Struct { fields })),
            ]
            .prop_map(|kind| Value { kind: Some(kind) })
        })
}

/// A metadata struct whose keys are often the ones tollgate reads.
fn metadata_struct() -> impl Strategy<Value = Struct> {
    let key = prop_oneof![
        prop::sample::select(
            Field::ALL
                .iter()
                .map(|f| f.key().to_owned())
                .chain([
                    metadata::QUOTA_RESERVED.to_owned(),
                    "input_tokens".to_owned(),
                    "outcome".to_owned(),
                ])
                .collect::<Vec<_>>()
        ),
        "[a-z_]{1,8}",
    ];
    let value = prop_oneof![
        value(),
        "[0-9]{1,4}".prop_map(|s| text(&s)),
        (0u32..1_000).prop_map(|n| Value {
            kind: Some(Kind::NumberValue(f64::from(n)))
        }),
    ];
    prop::collection::hash_map(key, value, 0..8).prop_map(|fields| Struct { fields })
}

fn any_message() -> impl Strategy<Value = Any> {
    ("[a-z./]{0,20}", prop::collection::vec(any::<u8>(), 0..16))
        .prop_map(|(type_url, value)| Any { type_url, value })
}

fn metadata() -> impl Strategy<Value = Option<Metadata>> {
    let namespace = prop_oneof![
        Just(metadata::NAMESPACE.to_owned()),
        Just(metadata::USAGE_NAMESPACE.to_owned()),
        "[a-z.]{1,12}",
    ];
    prop::option::of(
        (
            prop::collection::hash_map(namespace, metadata_struct(), 0..4),
            prop::collection::hash_map("[a-z.]{1,8}", any_message(), 0..2),
        )
            .prop_map(|(filter_metadata, typed_filter_metadata)| Metadata {
                filter_metadata,
                typed_filter_metadata,
            }),
    )
}

fn peer() -> impl Strategy<Value = Option<Peer>> {
    prop::option::of(
        (address(), small_text(), text_map(), small_text()).prop_map(
            |(address, service, labels, principal)| Peer {
                address,
                service,
                labels,
                principal,
                certificate: "-----BEGIN CERTIFICATE-----".to_owned(),
            },
        ),
    )
}

fn header_map() -> impl Strategy<Value = Option<HeaderMap>> {
    let header = (
        "[a-zA-Z:-]{1,6}",
        small_text(),
        prop::collection::vec(any::<u8>(), 0..8),
    )
        .prop_map(|(key, value, raw_value)| HeaderValue {
            key,
            value,
            raw_value,
        });
    prop::option::of(prop::collection::vec(header, 0..8).prop_map(|headers| HeaderMap { headers }))
}

fn http_request() -> impl Strategy<Value = HttpRequest> {
    let plain = (
        small_text(),
        prop::sample::select(&["GET", "POST", "DELETE", ""][..]),
        prop_oneof![text_map(), Just(Default::default())],
        header_map(),
        "/[ -~]{0,16}",
        prop::option::of("[a-z.:0-9]{1,12}"),
    );
    let noise = (
        small_text(),
        small_text(),
        small_text(),
        any::<i64>(),
        small_text(),
        small_text(),
        prop::collection::vec(any::<u8>(), 0..32),
    );
    (plain, noise).prop_map(
        |(
            (id, method, headers, header_map, path, host),
            (scheme, query, fragment, size, protocol, body, raw_body),
        )| HttpRequest {
            id,
            method: method.to_owned(),
            headers,
            header_map,
            path,
            host: host.unwrap_or_default(),
            scheme,
            query,
            fragment,
            size,
            protocol,
            body,
            raw_body,
        },
    )
}

fn check_request() -> impl Strategy<Value = CheckRequest> {
    let attributes = (
        peer(),
        peer(),
        prop::option::of((timestamp(), prop::option::of(http_request()))),
        text_map(),
        metadata(),
        metadata(),
        prop::option::of(small_text()),
    )
        .prop_map(
            |(source, destination, request, context_extensions, meta, route_meta, sni)| {
                AttributeContext {
                    source,
                    destination,
                    request: request.map(|(time, http)| AttributeRequest { time, http }),
                    context_extensions,
                    metadata_context: meta,
                    route_metadata_context: route_meta,
                    tls_session: sni.map(|sni| TlsSession { sni }),
                }
            },
        );
    prop::option::of(attributes).prop_map(|attributes| CheckRequest { attributes })
}

fn common() -> impl Strategy<Value = Option<AccessLogCommon>> {
    let read = (timestamp(), duration(), metadata());
    let noise = (
        0.0f64..=1.0,
        address(),
        address(),
        duration(),
        duration(),
        small_text(),
        any::<[bool; 4]>(),
        text_map(),
        prop::collection::hash_map("[a-z.]{1,8}", any_message(), 0..2),
        any::<u64>(),
        0i32..15,
    );
    prop::option::of((read, noise).prop_map(
        |(
            (start_time, time_to_last_downstream_tx_byte, metadata),
            (
                sample_rate,
                remote,
                local,
                rx,
                duration,
                cluster,
                flags,
                custom_tags,
                filter_state_objects,
                wire,
                access_log_type,
            ),
        )| AccessLogCommon {
            sample_rate,
            downstream_remote_address: remote,
            downstream_local_address: local,
            start_time,
            time_to_last_rx_byte: rx,
            time_to_last_downstream_tx_byte,
            upstream_cluster: cluster.clone(),
            response_flags: Some(ResponseFlags {
                failed_local_healthcheck: flags[0],
                no_healthy_upstream: flags[1],
                rate_limited: flags[2],
                downstream_remote_reset: flags[3],
                ..Default::default()
            }),
            metadata,
            route_name: cluster,
            filter_state_objects,
            custom_tags,
            duration,
            downstream_wire_bytes_sent: wire,
            access_log_type,
            ..Default::default()
        },
    ))
}

fn http_entry() -> impl Strategy<Value = HttpAccessLogEntry> {
    let request = prop::option::of(
        (
            small_text(),
            any::<u64>(),
            prop_oneof![
                text_map(),
                "[a-z0-9-]{0,8}"
                    .prop_map(|id| [("x-request-id".to_owned(), id)].into_iter().collect())
            ],
            0i32..10,
            small_text(),
            prop::option::of(any::<u32>()),
        )
            .prop_map(
                |(request_id, request_body_bytes, request_headers, method, path, port)| {
                    HttpRequestProperties {
                        request_method: method,
                        path: path.clone(),
                        original_path: path,
                        port: port.map(|value| UInt32Value { value }),
                        user_agent: "ua".to_owned(),
                        request_id,
                        request_body_bytes,
                        request_headers,
                        request_headers_bytes: 300,
                        ..Default::default()
                    }
                },
            ),
    );
    let response = prop::option::of(
        (
            prop::option::of(any::<u32>()),
            any::<u64>(),
            text_map(),
            text_map(),
            small_text(),
        )
            .prop_map(
                |(code, response_body_bytes, response_headers, response_trailers, details)| {
                    HttpResponseProperties {
                        response_code: code.map(|value| UInt32Value { value }),
                        response_body_bytes,
                        response_headers,
                        response_trailers,
                        response_code_details: details,
                        response_headers_bytes: 120,
                        ..Default::default()
                    }
                },
            ),
    );
    (common(), 0i32..5, request, response).prop_map(
        |(common_properties, protocol_version, request, response)| HttpAccessLogEntry {
            common_properties,
            protocol_version,
            request,
            response,
        },
    )
}

fn access_log_message() -> impl Strategy<Value = StreamAccessLogsMessage> {
    let identifier = prop::option::of(("[a-z-]{0,8}", small_text(), metadata_struct()).prop_map(
        |(log_name, id, node_metadata)| Identifier {
            node: Some(Node {
                id,
                cluster: "edge".to_owned(),
                metadata: Some(node_metadata),
                user_agent_name: "envoy".to_owned(),
                client_features: vec!["envoy.lb.does_not_support_overprovisioning".to_owned()],
                ..Default::default()
            }),
            log_name,
        },
    ));
    let tcp = (common(), any::<u64>()).prop_map(|(common_properties, bytes)| TcpAccessLogEntry {
        common_properties,
        connection_properties: Some(ConnectionProperties {
            received_bytes: bytes,
            sent_bytes: bytes / 2,
        }),
    });
    let entries = prop::option::of(prop_oneof![
        3 => prop::collection::vec(http_entry(), 0..5)
            .prop_map(|log_entry| LogEntries::HttpLogs(HttpAccessLogEntries { log_entry })),
        1 => prop::collection::vec(tcp, 0..3)
            .prop_map(|log_entry| LogEntries::TcpLogs(TcpAccessLogEntries { log_entry })),
    ]);
    (identifier, entries).prop_map(|(identifier, log_entries)| StreamAccessLogsMessage {
        identifier,
        log_entries,
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn random_check_requests_read_the_same_both_ways(check in check_request()) {
        check_both_ways(&check.encode_to_vec());
    }

    #[test]
    fn random_access_log_messages_read_the_same_both_ways(message in access_log_message()) {
        let batch = log_both_ways(&message.encode_to_vec());
        prop_assert_eq!(
            batch.records.len(),
            match &message.log_entries {
                Some(LogEntries::HttpLogs(http)) => http.log_entry.len(),
                _ => 0,
            }
        );
    }
}
