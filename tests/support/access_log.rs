//! Access-log messages shaped as Envoy sends them, for tests that speak the access-log service directly.

use envoy_types::pb::envoy::config::core::v3::Metadata;
use envoy_types::pb::envoy::data::accesslog::v3::{
    AccessLogCommon, HttpAccessLogEntry, HttpRequestProperties, HttpResponseProperties,
};
use envoy_types::pb::envoy::service::accesslog::v3::StreamAccessLogsMessage;
use envoy_types::pb::envoy::service::accesslog::v3::stream_access_logs_message::{
    HttpAccessLogEntries, Identifier, LogEntries,
};
use envoy_types::pb::google::protobuf::{Struct, Timestamp, UInt32Value, Value, value::Kind};

/// A string protobuf `Value`.
pub fn text(s: &str) -> Value {
    Value {
        kind: Some(Kind::StringValue(s.to_owned())),
    }
}

/// An HTTP entry after ext_authz decided: `authz` as its dynamic metadata, started at `start_ms` (Unix ms),
/// answered with `status`.
pub fn authz_entry(
    id: &str,
    start_ms: i64,
    status: u32,
    authz: &[(&str, &str)],
) -> HttpAccessLogEntry {
    let authz = Struct {
        fields: authz
            .iter()
            .map(|(k, v)| ((*k).to_owned(), text(v)))
            .collect(),
    };
    HttpAccessLogEntry {
        common_properties: Some(AccessLogCommon {
            start_time: Some(Timestamp {
                seconds: start_ms / 1_000,
                nanos: i32::try_from((start_ms % 1_000) * 1_000_000).unwrap_or(0),
            }),
            metadata: Some(Metadata {
                filter_metadata: [("envoy.filters.http.ext_authz".to_owned(), authz)]
                    .into_iter()
                    .collect(),
                ..Default::default()
            }),
            ..Default::default()
        }),
        request: Some(HttpRequestProperties {
            request_id: id.to_owned(),
            ..Default::default()
        }),
        response: Some(HttpResponseProperties {
            response_code: Some(UInt32Value { value: status }),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// One stream message carrying `entries`; Envoy names the log only in a stream's first message.
pub fn http_message(
    entries: Vec<HttpAccessLogEntry>,
    log_name: Option<&str>,
) -> StreamAccessLogsMessage {
    StreamAccessLogsMessage {
        identifier: log_name.map(|name| Identifier {
            node: None,
            log_name: name.to_owned(),
        }),
        log_entries: Some(LogEntries::HttpLogs(HttpAccessLogEntries {
            log_entry: entries,
        })),
    }
}
