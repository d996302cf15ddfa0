//! `envoy.service.accesslog.v3.AccessLogService`: HTTP access-log entries -> [`UsageRecord`]s -> metering.
//!
//! Envoy's gRPC access log expects no reply and has no acknowledgement: entries Envoy could not send (tollgate
//! away, stream broken, buffer full) are dropped on Envoy's side and counted only in its
//! `access_logs.grpc_access_log.logs_dropped` stat. When metering refuses records (spool full, write failed)
//! this service ends the stream with an error status, counts the refused records, and logs it, so nothing is
//! dropped silently here; Envoy then opens a new stream.
//!
//! Response headers that a `response_header:<name>` meter reads must be listed in the access logger's
//! `additional_response_headers_to_log`, or Envoy does not send them.
//!
//! Envoy's messages are decoded into the slim messages of `proto/tollgate/slim/v1/access_log.proto` (only what
//! a usage record reads; addresses, TLS properties, most timings and flags are skipped on the wire).
//!
//! Records become billed usage, so with `access_log_token` set a stream must carry it ([`TokenCheck`]).

use std::sync::Arc;
use std::time::Instant;

use envoy_types::pb::envoy::service::accesslog::v3::StreamAccessLogsResponse;
use envoy_types::pb::google::protobuf::{Duration, Timestamp};
use prometheus::{IntCounter, IntCounterVec, Opts, Registry};
use tokio::task::JoinSet;
use tonic::service::interceptor::InterceptedService;
use tonic::{Request, Response, Status, Streaming};

use crate::envoy::MAX_MESSAGE_BYTES;
use crate::envoy::metadata::{self, Field, Scalar};
use crate::envoy::slim::access_log_service_server::{
    AccessLogService as AccessLogServiceApi, AccessLogServiceServer,
};
use crate::envoy::slim::metadata_value::Kind;
use crate::envoy::slim::stream_access_logs_message::LogEntries;
use crate::envoy::slim::{self, StreamAccessLogsMessage};
use crate::envoy::stream_token::TokenCheck;
use crate::metering::{Metering, MeteringError, UsageRecord};
use crate::util::clock::now_ms;

/// Messages of one stream being made durable at once (they share group commits).
const IN_FLIGHT: usize = 16;

/// The access-log gRPC service.
#[derive(Clone)]
pub struct AccessLogService {
    metering: Metering,
    received: IntCounter,
    tcp_ignored: IntCounter,
    rejected: IntCounterVec,
    unauthenticated: IntCounter,
}

impl AccessLogService {
    /// Feeds `metering`; registers its metrics in `registry`.
    pub fn new(metering: Metering, registry: &Registry) -> Result<Self, prometheus::Error> {
        let received = IntCounter::new(
            "metering_records_received_total",
            "HTTP access-log entries received from Envoy",
        )?;
        let tcp_ignored = IntCounter::new(
            "metering_tcp_entries_ignored_total",
            "TCP access-log entries received and ignored (only HTTP requests are metered)",
        )?;
        let rejected = IntCounterVec::new(
            Opts::new(
                "metering_records_rejected_total",
                "HTTP access-log entries refused by metering (the stream got an error status)",
            ),
            &["reason"],
        )?;
        registry.register(Box::new(received.clone()))?;
        registry.register(Box::new(tcp_ignored.clone()))?;
        let unauthenticated = IntCounter::new(
            "metering_streams_unauthenticated_total",
            "access-log streams refused for want of the access_log_token",
        )?;
        registry.register(Box::new(rejected.clone()))?;
        registry.register(Box::new(unauthenticated.clone()))?;
        for reason in ["full", "error"] {
            rejected.with_label_values(&[reason]);
        }
        Ok(AccessLogService {
            metering,
            received,
            tcp_ignored,
            rejected,
            unauthenticated,
        })
    }

    /// The tonic service to add to the gRPC server; with `token`, only streams bearing it are served.
    pub fn into_server(
        self,
        token: Option<Arc<str>>,
    ) -> InterceptedService<AccessLogServiceServer<Self>, TokenCheck> {
        let check = TokenCheck::new(token, self.unauthenticated.clone(), "access-log");
        let server = AccessLogServiceServer::new(self).max_decoding_message_size(MAX_MESSAGE_BYTES);
        InterceptedService::new(server, check)
    }

    fn settle(
        &self,
        joined: Result<(usize, Result<(), MeteringError>), tokio::task::JoinError>,
        log_name: &str,
    ) -> Result<(), Status> {
        let (count, result) = match joined {
            Ok(done) => done,
            Err(e) => return Err(Status::internal(format!("metering task failed: {e}"))),
        };
        let Err(e) = result else {
            return Ok(());
        };
        let (reason, status) = match e {
            MeteringError::Full { .. } => ("full", Status::resource_exhausted(e.to_string())),
            _ => ("error", Status::unavailable(e.to_string())),
        };
        self.rejected
            .with_label_values(&[reason])
            .inc_by(count as u64);
        tracing::warn!(log_name, records = count, error = %e, "access-log records refused; ending the stream");
        Err(status)
    }
}

#[tonic::async_trait]
impl AccessLogServiceApi for AccessLogService {
    async fn stream_access_logs(
        &self,
        request: Request<Streaming<StreamAccessLogsMessage>>,
    ) -> Result<Response<StreamAccessLogsResponse>, Status> {
        let mut stream = request.into_inner();
        let mut log_name = String::new();
        let mut in_flight = JoinSet::new();
        let started = Instant::now();
        let outcome = loop {
            let message = match stream.message().await {
                Ok(Some(m)) => m,
                Ok(None) => break Ok(()),
                Err(status) => break Err(status),
            };
            // Envoy names the log only in a stream's first message.
            if let Some(id) = message.identifier.as_ref().filter(|_| log_name.is_empty()) {
                log_name.clone_from(&id.log_name);
                tracing::debug!(log_name, "access-log stream opened");
            }
            match message.log_entries {
                Some(LogEntries::HttpLogs(http)) => {
                    let records: Vec<UsageRecord> =
                        http.log_entry.iter().map(usage_record).collect();
                    self.received.inc_by(records.len() as u64);
                    while in_flight.len() >= IN_FLIGHT {
                        if let Some(joined) = in_flight.join_next().await
                            && let Err(status) = self.settle(joined, &log_name)
                        {
                            in_flight.detach_all();
                            return Err(status);
                        }
                    }
                    let metering = self.metering.clone();
                    in_flight.spawn(async move {
                        let count = records.len();
                        (count, metering.ingest(records).await)
                    });
                }
                Some(LogEntries::TcpLogs(tcp)) => {
                    self.tcp_ignored.inc_by(tcp.log_entry.len() as u64);
                }
                None => {}
            }
        };
        // Records already handed to metering finish even if the stream broke: they may be durable already.
        while let Some(joined) = in_flight.join_next().await {
            if let Err(status) = self.settle(joined, &log_name) {
                in_flight.detach_all();
                return Err(status);
            }
        }
        tracing::debug!(
            log_name,
            seconds = started.elapsed().as_secs_f64(),
            "access-log stream ended"
        );
        outcome.map(|()| Response::new(StreamAccessLogsResponse {}))
    }
}

/// A decoded HTTP access-log entry: the slim one tollgate serves, or envoy-types' full one (which tests, benches
/// and the fuzz targets read too). Each accessor answers as an absent message or field would: empty or zero.
/// The slim entry keeps Envoy's maps as the entries they are on the wire; where a key repeats, the accessors
/// answer as the map would (the last entry wins).
pub trait LogEntry {
    /// `request.request_id`.
    fn request_id(&self) -> &str;
    /// A logged request header (`additional_request_headers_to_log`).
    fn request_header(&self, name: &str) -> Option<&str>;
    /// `common_properties.start_time`.
    fn start_time(&self) -> Option<&Timestamp>;
    /// `common_properties.time_to_last_downstream_tx_byte`.
    fn time_to_last_downstream_tx_byte(&self) -> Option<&Duration>;
    /// The fields of `common_properties.metadata.filter_metadata[namespace]` (`None`: no such namespace). A key
    /// may come more than once from the slim entry: read them in order, the last one wins.
    fn metadata_fields(&self, namespace: &str) -> Option<impl Iterator<Item = (&str, Scalar<'_>)>>;
    /// `response.response_code` (0: none, e.g. the client went away).
    fn response_code(&self) -> u32;
    /// `request.request_body_bytes`.
    fn request_body_bytes(&self) -> u64;
    /// `response.response_body_bytes`.
    fn response_body_bytes(&self) -> u64;
    /// `response.response_headers`: the logged response headers (`additional_response_headers_to_log`), a
    /// repeated name's last value last.
    fn response_headers(&self) -> impl Iterator<Item = (&str, &str)>;
}

/// Implements [`LogEntry`] for an HTTP access-log entry type: the accessors both types share (the slim messages
/// keep Envoy's names, so one text reads both), then the ones that read a map, given per type. The slim and
/// full decodes can differ only on the wire, which is what tests/slim_decoding.rs checks.
macro_rules! log_entry {
    ($entry:ty; $($maps:tt)*) => {
        impl LogEntry for $entry {
            fn request_id(&self) -> &str {
                self.request.as_ref().map_or("", |r| r.request_id.as_str())
            }
            fn start_time(&self) -> Option<&Timestamp> {
                self.common_properties.as_ref()?.start_time.as_ref()
            }
            fn time_to_last_downstream_tx_byte(&self) -> Option<&Duration> {
                let common = self.common_properties.as_ref()?;
                common.time_to_last_downstream_tx_byte.as_ref()
            }
            fn response_code(&self) -> u32 {
                self.response
                    .as_ref()
                    .and_then(|r| r.response_code)
                    .map_or(0, |c| c.value)
            }
            fn request_body_bytes(&self) -> u64 {
                self.request.as_ref().map_or(0, |r| r.request_body_bytes)
            }
            fn response_body_bytes(&self) -> u64 {
                self.response.as_ref().map_or(0, |r| r.response_body_bytes)
            }
            $($maps)*
        }
    };
}

log_entry! {
    slim::HttpAccessLogEntry;
    fn request_header(&self, name: &str) -> Option<&str> {
        let headers = &self.request.as_ref()?.request_headers;
        let header = headers.iter().rev().find(|h| h.key == name)?;
        Some(header.value.as_str())
    }
    fn metadata_fields(
        &self,
        namespace: &str,
    ) -> Option<impl Iterator<Item = (&str, Scalar<'_>)>> {
        let common = self.common_properties.as_ref()?;
        let metadata = &common.metadata.as_ref()?.filter_metadata;
        // A map entry carries the namespace's whole struct: the last entry replaces the others.
        let entry = metadata.iter().rev().find(|m| m.key == namespace)?;
        let fields = entry.value.iter().flat_map(|s| s.fields.iter());
        Some(fields.map(|f| (f.key.as_str(), slim_scalar(f.value.as_ref()))))
    }
    fn response_headers(&self) -> impl Iterator<Item = (&str, &str)> {
        let headers = self.response.iter().flat_map(|r| r.response_headers.iter());
        headers.map(|h| (h.key.as_str(), h.value.as_str()))
    }
}

log_entry! {
    envoy_types::pb::envoy::data::accesslog::v3::HttpAccessLogEntry;
    fn request_header(&self, name: &str) -> Option<&str> {
        let request = self.request.as_ref()?;
        request.request_headers.get(name).map(String::as_str)
    }
    fn metadata_fields(
        &self,
        namespace: &str,
    ) -> Option<impl Iterator<Item = (&str, Scalar<'_>)>> {
        let common = self.common_properties.as_ref()?;
        let fields = &common.metadata.as_ref()?.filter_metadata.get(namespace)?.fields;
        Some(fields.iter().map(|(k, v)| (k.as_str(), Scalar::from(Some(v)))))
    }
    fn response_headers(&self) -> impl Iterator<Item = (&str, &str)> {
        let headers = self.response.iter().flat_map(|r| r.response_headers.iter());
        headers.map(|(k, v)| (k.as_str(), v.as_str()))
    }
}

/// A slim metadata value as the usage path reads it.
fn slim_scalar(value: Option<&slim::MetadataValue>) -> Scalar<'_> {
    match value.and_then(|v| v.kind.as_ref()) {
        Some(Kind::StringValue(text)) => Scalar::Text(text),
        Some(Kind::NumberValue(n)) => Scalar::Number(*n),
        _ => Scalar::Other,
    }
}

/// The usage record of one HTTP access-log entry.
pub fn usage_record(entry: &impl LogEntry) -> UsageRecord {
    // One pass over the Check's fields; a repeated key overrides, as in a map.
    let mut fields = [""; Field::ALL.len()];
    let mut quota_reserved = 0;
    for (key, value) in entry
        .metadata_fields(metadata::NAMESPACE)
        .into_iter()
        .flatten()
    {
        if key == metadata::QUOTA_RESERVED {
            quota_reserved = value.text().parse::<u64>().unwrap_or(0);
        } else if let Some(field) = Field::from_key(key) {
            fields[field as usize] = value.text();
        }
    }
    let field = |field: Field| fields[field as usize].to_owned();
    let request_id = match entry.request_id() {
        "" => entry.request_header("x-request-id").unwrap_or_default(),
        id => id,
    }
    .to_owned();
    let start_ms = start_ms(entry.start_time(), now_ms());
    let duration_us = entry.time_to_last_downstream_tx_byte().map_or(0, |d| {
        let us = d
            .seconds
            .saturating_mul(1_000_000)
            .saturating_add(i64::from(d.nanos) / 1_000);
        u64::try_from(us).unwrap_or(0)
    });
    // Envoy sends lowercase names. Two that differ only in case resolve the same way whatever order a map
    // yields them in (sorted by name: the last wins), and a repeated name keeps its order (a stable sort), so
    // a record never depends on a hash seed.
    let mut headers: Vec<(&str, &str)> = entry.response_headers().collect();
    headers.sort_by(|a, b| a.0.cmp(b.0));
    UsageRecord {
        request_id,
        start_ms,
        duration_us,
        decision: field(Field::Decision),
        reason: field(Field::Reason),
        app: field(Field::App),
        developer: field(Field::Developer),
        company: field(Field::Company),
        stripe_customer: field(Field::StripeCustomer),
        product: field(Field::Product),
        operation: field(Field::Operation),
        api: field(Field::Api),
        environment: field(Field::Environment),
        response_code: entry.response_code(),
        request_bytes: entry.request_body_bytes(),
        response_bytes: entry.response_body_bytes(),
        response_headers: headers
            .into_iter()
            .map(|(k, v)| (k.to_ascii_lowercase(), v.to_owned()))
            .collect(),
        usage: metadata::read_usage(
            entry
                .metadata_fields(metadata::USAGE_NAMESPACE)
                .into_iter()
                .flatten(),
        ),
        quota_reserved,
    }
}

/// Earliest request start taken at face value: 2000-01-01T00:00:00Z.
const EARLIEST_START_MS: i64 = 946_684_800_000;
/// How far ahead of tollgate's clock a start may lie and still be taken at face value.
const MAX_START_AHEAD_MS: i64 = 24 * 3_600 * 1_000;

/// The request start in Unix ms, or 0 (unknown: metering counts the record at its arrival) when it is
/// missing or outside [2000-01-01, now + 1 day]: the entry comes over the network, and a forged or broken time
/// must not reach window arithmetic.
fn start_ms(start_time: Option<&Timestamp>, now_ms: i64) -> i64 {
    start_time
        .and_then(|t| {
            t.seconds
                .checked_mul(1_000)?
                .checked_add(i64::from(t.nanos) / 1_000_000)
        })
        .filter(|&ms| ms >= EARLIEST_START_MS && ms <= now_ms.saturating_add(MAX_START_AHEAD_MS))
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::envoy::slim::{
        AccessLogCommon, FilterMetadata, HttpAccessLogEntry, HttpRequestProperties,
        HttpResponseProperties, Metadata, MetadataField, MetadataStruct, MetadataValue, Skipped,
        StringEntry,
    };
    use envoy_types::pb::google::protobuf::UInt32Value;

    fn field(key: &str, kind: Kind) -> MetadataField {
        MetadataField {
            key: key.into(),
            value: Some(MetadataValue { kind: Some(kind) }),
        }
    }

    fn text(key: &str, value: &str) -> MetadataField {
        field(key, Kind::StringValue(value.into()))
    }

    fn header(key: &str, value: &str) -> StringEntry {
        StringEntry {
            key: key.into(),
            value: value.into(),
        }
    }

    /// An entry whose metadata holds `namespaces` (name, fields) in this order.
    fn with_metadata(namespaces: Vec<(&str, Vec<MetadataField>)>) -> HttpAccessLogEntry {
        HttpAccessLogEntry {
            common_properties: Some(AccessLogCommon {
                metadata: Some(Metadata {
                    filter_metadata: namespaces
                        .into_iter()
                        .map(|(key, fields)| FilterMetadata {
                            key: key.into(),
                            value: Some(MetadataStruct { fields }),
                        })
                        .collect(),
                }),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    #[test]
    fn an_entry_maps_identity_status_bytes_and_headers() {
        let authz = vec![
            text("decision", "allow"),
            text("app", "weatherapp"),
            text("stripe_customer", "cus_1"),
            text("product", "weather_free"),
            text("api", "weatherapi"),
        ];
        let mut entry = with_metadata(vec![(metadata::NAMESPACE, authz)]);
        if let Some(common) = entry.common_properties.as_mut() {
            common.start_time = Some(Timestamp {
                seconds: 1_700_000_000,
                nanos: 250_000_000,
            });
            common.time_to_last_downstream_tx_byte = Some(Duration {
                seconds: 0,
                nanos: 1_500_000,
            });
        }
        entry.request = Some(HttpRequestProperties {
            request_id: "req-1".into(),
            request_body_bytes: 10,
            ..Default::default()
        });
        entry.response = Some(HttpResponseProperties {
            response_code: Some(UInt32Value { value: 201 }),
            response_body_bytes: 99,
            response_headers: vec![header("X-Tokens", "7")],
        });
        let r = usage_record(&entry);
        assert_eq!(r.request_id, "req-1");
        assert_eq!(r.start_ms, 1_700_000_000_250);
        assert_eq!(r.duration_us, 1_500);
        assert_eq!(
            (
                r.decision.as_str(),
                r.app.as_str(),
                r.stripe_customer.as_str()
            ),
            ("allow", "weatherapp", "cus_1")
        );
        assert_eq!(r.developer, "");
        assert_eq!(
            (r.response_code, r.request_bytes, r.response_bytes),
            (201, 10, 99)
        );
        assert_eq!(
            r.response_headers.get("x-tokens").map(String::as_str),
            Some("7")
        );
    }

    #[test]
    fn a_repeated_key_reads_as_a_map_would_the_last_entry_wins() {
        let first = vec![
            text("app", "first"),
            text("product", "kept-by-the-first-entry-only"),
        ];
        let second = vec![
            text("app", "early"),
            text("company", "acme"),
            text("app", "late"),
            field("company", Kind::BoolValue(true)),
            text(metadata::QUOTA_RESERVED, "5"),
            text(metadata::QUOTA_RESERVED, "7"),
        ];
        let usage = vec![
            field("tokens", Kind::NumberValue(3.0)),
            field("tokens", Kind::NumberValue(4.0)),
            field("images", Kind::NumberValue(1.0)),
            field("images", Kind::StructValue(Skipped {})),
            field("outcome", Kind::StringValue("complete".into())),
        ];
        let entry = with_metadata(vec![
            (metadata::NAMESPACE, first),
            (metadata::USAGE_NAMESPACE, usage),
            (metadata::NAMESPACE, second),
        ]);
        let r = usage_record(&entry);
        assert_eq!(r.app, "late");
        assert_eq!(
            r.product, "",
            "a later entry of a namespace replaces its whole struct"
        );
        assert_eq!(
            r.company, "",
            "a later non-string value overrides an earlier string"
        );
        assert_eq!(r.quota_reserved, 7);
        assert_eq!(
            r.usage.into_iter().collect::<Vec<_>>(),
            [("tokens".to_owned(), 4)],
            "a later non-number value leaves the key out"
        );
    }

    #[test]
    fn every_field_indexes_its_own_slot() {
        for (i, field) in Field::ALL.into_iter().enumerate() {
            assert_eq!(field as usize, i, "{field:?}");
            assert_eq!(Field::from_key(field.key()), Some(field));
        }
    }

    #[test]
    fn header_names_that_differ_only_in_case_resolve_the_same_way_every_time() {
        use envoy_types::pb::envoy::data::accesslog::v3 as full;
        for _ in 0..20 {
            // A fresh map each round: its iteration order changes with the hash seed.
            let entry = full::HttpAccessLogEntry {
                response: Some(full::HttpResponseProperties {
                    response_headers: [
                        ("X-Tokens".to_owned(), "upper".to_owned()),
                        ("x-tokens".to_owned(), "lower".to_owned()),
                    ]
                    .into_iter()
                    .collect(),
                    ..Default::default()
                }),
                ..Default::default()
            };
            assert_eq!(x_tokens(&entry).as_deref(), Some("lower"));
        }
        // The slim entry's list, in either order, resolves the same way.
        for headers in [
            vec![header("x-tokens", "lower"), header("X-Tokens", "upper")],
            vec![header("X-Tokens", "upper"), header("x-tokens", "lower")],
        ] {
            let entry = HttpAccessLogEntry {
                response: Some(HttpResponseProperties {
                    response_headers: headers,
                    ..Default::default()
                }),
                ..Default::default()
            };
            assert_eq!(x_tokens(&entry).as_deref(), Some("lower"));
        }
    }

    /// The `x-tokens` response header of `entry`'s usage record.
    fn x_tokens(entry: &impl LogEntry) -> Option<String> {
        usage_record(entry).response_headers.remove("x-tokens")
    }

    #[test]
    fn a_start_time_outside_the_sane_range_is_unknown() {
        let now = 1_800_000_000_000;
        let at = |seconds, nanos| start_ms(Some(&Timestamp { seconds, nanos }), now);
        assert_eq!(at(1_700_000_000, 250_000_000), 1_700_000_000_250);
        assert_eq!(at(946_684_800, 0), EARLIEST_START_MS, "2000-01-01 is fine");
        assert_eq!(at(1_800_086_400, 0), now + MAX_START_AHEAD_MS);
        for (seconds, nanos) in [
            (i64::MIN, 0),
            (i64::MIN, i32::MIN),
            (i64::MAX, i32::MAX),
            (i64::MAX / 1_000, 999_999_999),
            (-1, 0),
            (0, 0),
            (946_684_799, 999_999_999),
            (1_800_086_400, 1_000_000),
        ] {
            assert_eq!(at(seconds, nanos), 0, "{seconds}s {nanos}ns");
        }
        assert_eq!(start_ms(None, now), 0);
    }

    #[test]
    fn the_request_id_falls_back_to_the_logged_header_and_an_empty_entry_is_empty() {
        let entry = HttpAccessLogEntry {
            request: Some(HttpRequestProperties {
                request_headers: vec![
                    header("x-request-id", "earlier"),
                    header("x-request-id", "from-header"),
                ],
                ..Default::default()
            }),
            ..Default::default()
        };
        assert_eq!(usage_record(&entry).request_id, "from-header");
        assert_eq!(
            usage_record(&HttpAccessLogEntry::default()),
            UsageRecord::default()
        );
    }
}
