//! `envoy.service.ext_proc.v3.ExternalProcessor`: response bodies -> [`Session`] -> `tollgate.usage` dynamic
//! metadata (CONTRACT §11).
//!
//! One gRPC stream per HTTP request. Envoy forwards the ext_authz metadata (`metadata_options.
//! forwarding_namespaces`); a call that was not allowed, or whose product counts no body value, gets a
//! `mode_override` with the response headers so Envoy stops sending its body. Otherwise every body chunk is
//! read in bounded memory and answered at once with "continue"; whenever the values change, the answer carries
//! them as dynamic metadata in the `tollgate.usage` namespace (accepted by Envoy when listed in
//! `metadata_options.receiving_namespaces`). The last values set stay in the request's metadata, so the access
//! log carries them even when the client cut the stream. Nothing here changes the response itself.

use std::sync::Arc;

use envoy_types::pb::envoy::config::core::v3::HeaderMap;
use envoy_types::pb::envoy::extensions::filters::http::ext_proc::v3::ProcessingMode;
use envoy_types::pb::envoy::extensions::filters::http::ext_proc::v3::processing_mode::{
    BodySendMode, HeaderSendMode,
};
use envoy_types::pb::envoy::service::ext_proc::v3::external_processor_server::{
    ExternalProcessor, ExternalProcessorServer,
};
use envoy_types::pb::envoy::service::ext_proc::v3::processing_request::Request as Message;
use envoy_types::pb::envoy::service::ext_proc::v3::processing_response::Response as Answer;
use envoy_types::pb::envoy::service::ext_proc::v3::{
    BodyResponse, HeadersResponse, ProcessingRequest, ProcessingResponse, TrailersResponse,
};
use envoy_types::pb::google::protobuf::{Struct, Value, value::Kind};
use prometheus::{IntCounter, IntCounterVec, Opts, Registry};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::service::interceptor::InterceptedService;
use tonic::{Request, Response, Status, Streaming};

use crate::catalog::CatalogHandle;
use crate::envoy::MAX_MESSAGE_BYTES;
use crate::envoy::metadata::{self, Field};
use crate::envoy::stream_token::TokenCheck;
use crate::genai::Outcome;
use crate::genai::session::{self, Report, Session};

/// Answers buffered per stream: Envoy waits for each one before sending the next chunk.
const ANSWERS: usize = 4;

/// The ext_proc gRPC service.
#[derive(Clone)]
pub struct ExtProcService {
    catalog: Arc<CatalogHandle>,
    max_buffer: usize,
    metrics: ExtProcMetrics,
}

/// What the service counts.
#[derive(Clone)]
struct ExtProcMetrics {
    /// Response bodies read, by outcome.
    responses: IntCounterVec,
    /// Streams whose body was not read (not allowed, or nothing counts a body value).
    skipped: IntCounter,
    /// SSE events skipped as unreadable.
    unreadable_events: IntCounter,
    /// Streams refused for want of the `access_log_token`.
    unauthenticated: IntCounter,
}

impl ExtProcService {
    /// Reads bodies of calls the current catalog of `catalog` meters by body values, holding at most
    /// `max_buffer` bytes per body (a JSON body, or one SSE event).
    pub fn new(
        catalog: Arc<CatalogHandle>,
        max_buffer: usize,
        registry: &Registry,
    ) -> Result<Self, prometheus::Error> {
        let responses = IntCounterVec::new(
            Opts::new(
                "genai_responses_total",
                "response bodies read by ext_proc, by outcome: complete, partial (cut: what was seen is billed, output at least one token per content delta sent), counted (a stream without usage: one output token per content delta sent), missing (no usage, no content: 0), or why unreadable (0)",
            ),
            &["outcome"],
        )?;
        let skipped = IntCounter::new(
            "genai_skipped_total",
            "ext_proc streams whose body was not read (the call was not allowed or its product counts no body value)",
        )?;
        let unreadable_events = IntCounter::new(
            "genai_unreadable_events_total",
            "server-sent events skipped because they were too large, not UTF-8 or not JSON",
        )?;
        registry.register(Box::new(responses.clone()))?;
        registry.register(Box::new(skipped.clone()))?;
        let unauthenticated = IntCounter::new(
            "genai_streams_unauthenticated_total",
            "ext_proc streams refused for want of the access_log_token",
        )?;
        registry.register(Box::new(unreadable_events.clone()))?;
        registry.register(Box::new(unauthenticated.clone()))?;
        Ok(ExtProcService {
            catalog,
            max_buffer,
            metrics: ExtProcMetrics {
                responses,
                skipped,
                unreadable_events,
                unauthenticated,
            },
        })
    }

    /// The tonic server for this service; with `token`, only streams bearing it are served (each stream
    /// reads a body and writes billed counts, so it is guarded like the access log's).
    pub fn into_server(
        self,
        token: Option<Arc<str>>,
    ) -> InterceptedService<ExternalProcessorServer<Self>, TokenCheck> {
        let check = TokenCheck::new(token, self.metrics.unauthenticated.clone(), "ext_proc");
        let server = ExternalProcessorServer::new(self)
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES);
        InterceptedService::new(server, check)
    }
}

/// Where one stream stands.
enum Stream {
    /// The first message has not told who called yet.
    New,
    /// The body is not read.
    Skip,
    /// The body will be read with these pointers, once the response headers name its type.
    Wanted(Vec<String>),
    /// The body is being read.
    Reading(Box<Session>),
    /// The body ended; its outcome is counted.
    Done,
}

impl ExtProcService {
    /// Answers one message and says what the stream does next.
    fn answer(&self, stream: &mut Stream, request: ProcessingRequest) -> ProcessingResponse {
        if matches!(stream, Stream::New) {
            *stream = self.plan(&request);
        }
        let mut out = ProcessingResponse::default();
        let Some(message) = request.request else {
            return out;
        };
        out.response = Some(match message {
            Message::RequestHeaders(_) => Answer::RequestHeaders(HeadersResponse::default()),
            Message::RequestBody(_) => Answer::RequestBody(BodyResponse::default()),
            Message::RequestTrailers(_) => Answer::RequestTrailers(TrailersResponse::default()),
            Message::ResponseTrailers(_) => {
                // Trailers follow the last body chunk, which then did not say end_of_stream: the body ended.
                self.read(stream, &[], true, &mut out);
                Answer::ResponseTrailers(TrailersResponse::default())
            }
            Message::ResponseHeaders(headers) => {
                match std::mem::replace(stream, Stream::Skip) {
                    Stream::Wanted(pointers) => {
                        let map = headers.headers.as_ref();
                        let session = Session::new(
                            header(map, "content-type").as_deref(),
                            header(map, "content-encoding").as_deref(),
                            &pointers,
                            self.max_buffer,
                        );
                        *stream = Stream::Reading(Box::new(session));
                        if headers.end_of_stream {
                            // No body: the response reported nothing.
                            self.read(stream, &[], true, &mut out);
                        }
                    }
                    _ => {
                        self.metrics.skipped.inc();
                        out.mode_override = Some(NO_BODY);
                    }
                }
                Answer::ResponseHeaders(HeadersResponse::default())
            }
            Message::ResponseBody(body) => {
                self.read(stream, &body.body, body.end_of_stream, &mut out);
                Answer::ResponseBody(BodyResponse::default())
            }
        });
        out
    }

    /// Whether and how the body of the call that `request` belongs to is read.
    fn plan(&self, request: &ProcessingRequest) -> Stream {
        let authz = request
            .metadata_context
            .as_ref()
            .and_then(|m| m.filter_metadata.get(metadata::NAMESPACE));
        if metadata::read(authz, Field::Decision) != "allow" {
            return Stream::Skip;
        }
        let product = metadata::read(authz, Field::Product);
        let operation = metadata::read(authz, Field::Operation);
        match session::wanted(&self.catalog.snapshot(), &product, &operation) {
            Some(pointers) => Stream::Wanted(pointers),
            None => Stream::Skip,
        }
    }

    /// Reads one body chunk into the session, putting a report into `out`'s dynamic metadata.
    fn read(&self, stream: &mut Stream, bytes: &[u8], end: bool, out: &mut ProcessingResponse) {
        let Stream::Reading(session) = stream else {
            return;
        };
        let report = session.chunk(bytes, end);
        if end {
            self.finish(session, report.as_ref().map(|r| r.outcome));
            *stream = Stream::Done;
        }
        if let Some(report) = report {
            out.dynamic_metadata = Some(usage_metadata(&report));
        }
    }

    /// Counts how a body's reading ended (`outcome`: the final one; `None`: cut before its end).
    fn finish(&self, session: &Session, outcome: Option<Outcome>) {
        let outcome = outcome.unwrap_or_else(|| session.outcome_so_far());
        self.metrics
            .responses
            .with_label_values(&[outcome.as_str()])
            .inc();
        self.metrics
            .unreadable_events
            .inc_by(session.unreadable_events());
    }
}

/// The mode override that stops Envoy from sending a response body (and trailers) tollgate does not read.
const NO_BODY: ProcessingMode = ProcessingMode {
    request_header_mode: HeaderSendMode::Skip as i32,
    response_header_mode: HeaderSendMode::Skip as i32,
    request_body_mode: BodySendMode::None as i32,
    response_body_mode: BodySendMode::None as i32,
    request_trailer_mode: HeaderSendMode::Skip as i32,
    response_trailer_mode: HeaderSendMode::Skip as i32,
};

/// The value of header `name` (lowercase) in Envoy's header map (`raw_value` since Envoy 1.27, else `value`).
fn header(map: Option<&HeaderMap>, name: &str) -> Option<String> {
    let h = map?.headers.iter().find(|h| h.key == name)?;
    if h.raw_value.is_empty() {
        Some(h.value.clone())
    } else {
        String::from_utf8(h.raw_value.clone()).ok()
    }
}

/// `{ "tollgate.usage": { <key>: <number>, …, "outcome": <text> } }`.
fn usage_metadata(report: &Report) -> Struct {
    let usage = metadata::write_usage(&report.usage, report.outcome.as_str());
    let mut fields = std::collections::HashMap::with_capacity(1);
    fields.insert(
        metadata::USAGE_NAMESPACE.to_owned(),
        Value {
            kind: Some(Kind::StructValue(usage)),
        },
    );
    Struct { fields }
}

#[tonic::async_trait]
impl ExternalProcessor for ExtProcService {
    type ProcessStream = ReceiverStream<Result<ProcessingResponse, Status>>;

    async fn process(
        &self,
        request: Request<Streaming<ProcessingRequest>>,
    ) -> Result<Response<Self::ProcessStream>, Status> {
        let mut inbound = request.into_inner();
        let (tx, rx) = mpsc::channel(ANSWERS);
        let service = self.clone();
        tokio::spawn(async move {
            let mut stream = Stream::New;
            // Ends when Envoy closes the stream (the response ended, or the client went away) or it breaks.
            while let Ok(Some(request)) = inbound.message().await {
                let answer = service.answer(&mut stream, request);
                if tx.send(Ok(answer)).await.is_err() {
                    break;
                }
            }
            if let Stream::Reading(session) = &stream {
                service.finish(session, None);
            }
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::catalog::{Catalog, parse};
    use crate::source::Source;
    use envoy_types::pb::envoy::config::core::v3::{HeaderValue, Metadata};
    use envoy_types::pb::envoy::service::ext_proc::v3::{HttpBody, HttpHeaders, HttpTrailers};

    const CATALOG: &str = "
products:
  - name: llm
    operations: [{api: ai, name: chat, paths: [/chat]}]
    meter: {event_name: tokens, value: genai:total_tokens}
  - name: plain
    operations: [{api: ai, name: p, paths: [/p]}]
";

    fn service() -> ExtProcService {
        let catalog: Catalog = parse(&Source::from_text("c.yaml", CATALOG.to_owned())).unwrap();
        ExtProcService::new(
            Arc::new(CatalogHandle::new(catalog)),
            1 << 20,
            &Registry::new(),
        )
        .unwrap()
    }

    fn with_identity(decision: &str, product: &str, message: Message) -> ProcessingRequest {
        let text = |s: &str| Value {
            kind: Some(Kind::StringValue(s.to_owned())),
        };
        let authz = Struct {
            fields: [
                ("decision".to_owned(), text(decision)),
                ("product".to_owned(), text(product)),
                ("operation".to_owned(), text("chat")),
            ]
            .into(),
        };
        ProcessingRequest {
            metadata_context: Some(Metadata {
                filter_metadata: [(metadata::NAMESPACE.to_owned(), authz)].into(),
                ..Metadata::default()
            }),
            request: Some(message),
            ..ProcessingRequest::default()
        }
    }

    fn response_headers(content_type: &str) -> Message {
        Message::ResponseHeaders(HttpHeaders {
            headers: Some(HeaderMap {
                headers: vec![HeaderValue {
                    key: "content-type".into(),
                    raw_value: content_type.as_bytes().to_vec(),
                    ..HeaderValue::default()
                }],
            }),
            ..HttpHeaders::default()
        })
    }

    fn body(bytes: &str, end: bool) -> ProcessingRequest {
        ProcessingRequest {
            request: Some(Message::ResponseBody(HttpBody {
                body: bytes.as_bytes().to_vec(),
                end_of_stream: end,
                ..HttpBody::default()
            })),
            ..ProcessingRequest::default()
        }
    }

    fn reported(answer: &ProcessingResponse, key: &str) -> Option<f64> {
        let usage = answer
            .dynamic_metadata
            .as_ref()?
            .fields
            .get(metadata::USAGE_NAMESPACE)?;
        let Some(Kind::StructValue(usage)) = &usage.kind else {
            return None;
        };
        match usage.fields.get(key)?.kind {
            Some(Kind::NumberValue(n)) => Some(n),
            _ => None,
        }
    }

    #[test]
    fn an_allowed_metered_body_reports_its_tokens_as_metadata() {
        let service = service();
        let mut stream = Stream::New;
        let headers = service.answer(
            &mut stream,
            with_identity("allow", "llm", response_headers("application/json")),
        );
        assert!(headers.mode_override.is_none());
        let first = service.answer(
            &mut stream,
            body("{\"usage\": {\"prompt_tokens\": 3,", false),
        );
        assert!(first.dynamic_metadata.is_none(), "JSON is read at its end");
        assert!(matches!(first.response, Some(Answer::ResponseBody(_))));
        let last = service.answer(
            &mut stream,
            body(" \"completion_tokens\": 4, \"total_tokens\": 7}}", true),
        );
        assert_eq!(reported(&last, "genai:total_tokens"), Some(7.0));
        assert_eq!(
            service
                .metrics
                .responses
                .with_label_values(&["complete"])
                .get(),
            1
        );
    }

    #[test]
    fn trailers_end_the_body_that_did_not_say_so() {
        let service = service();
        let mut stream = Stream::New;
        service.answer(
            &mut stream,
            with_identity("allow", "llm", response_headers("application/json")),
        );
        service.answer(
            &mut stream,
            body("{\"usage\": {\"total_tokens\": 9}}", false),
        );
        let trailers = ProcessingRequest {
            request: Some(Message::ResponseTrailers(HttpTrailers::default())),
            ..ProcessingRequest::default()
        };
        let answer = service.answer(&mut stream, trailers);
        assert!(matches!(answer.response, Some(Answer::ResponseTrailers(_))));
        assert_eq!(reported(&answer, "genai:total_tokens"), Some(9.0));
        assert!(matches!(stream, Stream::Done));
    }

    #[test]
    fn denied_calls_and_products_without_body_meters_skip_the_body() {
        let service = service();
        for (decision, product) in [("deny", "llm"), ("allow", "plain")] {
            let mut stream = Stream::New;
            let answer = service.answer(
                &mut stream,
                with_identity(decision, product, response_headers("application/json")),
            );
            assert_eq!(answer.mode_override, Some(NO_BODY));
            let late = service.answer(&mut stream, body("{\"usage\": {}}", true));
            assert!(late.dynamic_metadata.is_none());
        }
        assert_eq!(service.metrics.skipped.get(), 2);
    }
}
