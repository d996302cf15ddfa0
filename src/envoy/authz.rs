//! `envoy.service.auth.v3.Authorization`: CheckRequest -> [`Request`], one call to
//! [`Authorizer::check`], [`Verdict`] -> CheckResponse.
//!
//! Envoy's CheckRequest is decoded into the slim message of `proto/tollgate/slim/v1/authz.proto` (only what a
//! Check reads; the body, peers, TLS and metadata contexts are skipped on the wire); the answer is the slim
//! CheckResponse of the same file, Envoy's on the wire, whose dynamic metadata is copied already encoded from
//! [`answers`](crate::envoy::answers).

use std::borrow::Cow;
use std::collections::HashMap;
use std::sync::Arc;

use envoy_types::pb::google::rpc;
use prost::bytes::Bytes;
use tonic::{Request as GrpcRequest, Response, Status};

use crate::check::{Answer, Authorizer, Pairs, Reason, Request, Verdict};
use crate::envoy::answers;
use crate::envoy::slim;
use crate::envoy::slim::authorization_server::Authorization;
use crate::envoy::slim::check_response::HttpResponse;
use crate::envoy::slim::{
    CheckResponse, DeniedHttpResponse, HeaderAppendAction, HeaderValue, HeaderValueOption,
    HttpStatus, OkHttpResponse,
};
use crate::quota::LimitState;

/// The ext_authz gRPC service (serve it with [`slim::authorization_server::AuthorizationServer`]).
pub struct AuthzService {
    authorizer: Arc<Authorizer>,
}

impl AuthzService {
    /// Serves Checks with `authorizer`.
    pub fn new(authorizer: Arc<Authorizer>) -> Self {
        AuthzService { authorizer }
    }
}

#[tonic::async_trait]
impl Authorization for AuthzService {
    async fn check(
        &self,
        request: GrpcRequest<slim::CheckRequest>,
    ) -> Result<Response<CheckResponse>, Status> {
        let check = request.into_inner();
        let parts = check
            .parts()
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        let verdict = self.authorizer.check(&parts.request()).await;
        Ok(Response::new(check_response(verdict)))
    }
}

/// Why a CheckRequest cannot be decided (Envoy gets `INVALID_ARGUMENT` and applies its failure mode).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum Unreadable {
    /// No `attributes.request.http`.
    #[error("CheckRequest carries no HTTP request attributes")]
    NotHttp,
    /// A string field holds bytes that are not UTF-8. A `string` decode refused the whole message too (as
    /// `INTERNAL`); this names the field (never its value) and answers `INVALID_ARGUMENT`.
    #[error("CheckRequest: {0} is not UTF-8")]
    NotUtf8(&'static str),
}

/// What a Check reads of a CheckRequest, borrowed from the decoded message.
pub struct CheckParts<'a> {
    method: &'a str,
    path: &'a str,
    host: &'a str,
    headers: Lent<'a>,
    context_extensions: Lent<'a>,
}

/// Headers or context extensions as the adapter lends them to the core.
enum Lent<'a> {
    /// The slim message's entries, as decoded.
    List(Vec<(&'a str, &'a str)>),
    /// envoy-types' decoded map.
    Map(&'a HashMap<String, String>),
    /// A header list (`encode_raw_headers`) joined into the plain map's shape.
    Joined(HashMap<String, String>),
}

impl Lent<'_> {
    fn pairs(&self) -> &dyn Pairs {
        match self {
            Lent::List(list) => list,
            Lent::Map(map) => *map,
            Lent::Joined(map) => map,
        }
    }
}

impl CheckParts<'_> {
    /// The request the core decides.
    pub fn request(&self) -> Request<'_> {
        let headers = self.headers.pairs();
        let authority = if self.host.is_empty() {
            headers.get(":authority").unwrap_or("")
        } else {
            self.host
        };
        Request {
            method: self.method,
            path: self.path,
            authority,
            headers,
            context_extensions: self.context_extensions.pairs(),
        }
    }
}

/// A decoded CheckRequest: the slim one tollgate serves, or envoy-types' full one (which tests and benches
/// hold the slim one to, in tests/slim_decoding.rs).
pub trait CheckMessage {
    /// What a Check reads of it.
    fn parts(&self) -> Result<CheckParts<'_>, Unreadable>;
}

/// A CheckRequest's HTTP request attributes, and its header list joined into a map when Envoy sent one
/// (`encode_raw_headers`: the plain map is then empty). A macro because the slim and full messages are
/// different types with the same field names.
macro_rules! http_attributes {
    ($check:expr) => {{
        let attributes = $check.attributes.as_ref().ok_or(Unreadable::NotHttp)?;
        let http = attributes
            .request
            .as_ref()
            .and_then(|r| r.http.as_ref())
            .ok_or(Unreadable::NotHttp)?;
        let joined = match &http.header_map {
            Some(map) if http.headers.is_empty() => Some(joined_headers(
                map.headers.len(),
                map.headers
                    .iter()
                    .map(|h| (h.key.as_str(), h.value.as_str(), h.raw_value.as_slice())),
            )),
            _ => None,
        };
        (attributes, http, joined)
    }};
}

impl CheckMessage for slim::CheckRequest {
    fn parts(&self) -> Result<CheckParts<'_>, Unreadable> {
        let (attributes, http, joined) = http_attributes!(self);
        let headers = match joined {
            Some(joined) => Lent::Joined(joined),
            None => Lent::List(entries(&http.headers, "a header")?),
        };
        Ok(CheckParts {
            method: text(&http.method, "the method")?,
            path: text(&http.path, "the path")?,
            host: text(&http.host, "the host")?,
            headers,
            context_extensions: Lent::List(entries(
                &attributes.context_extensions,
                "a context extension",
            )?),
        })
    }
}

impl CheckMessage for envoy_types::pb::envoy::service::auth::v3::CheckRequest {
    fn parts(&self) -> Result<CheckParts<'_>, Unreadable> {
        let (attributes, http, joined) = http_attributes!(self);
        Ok(CheckParts {
            method: &http.method,
            path: &http.path,
            host: &http.host,
            headers: joined.map_or(Lent::Map(&http.headers), Lent::Joined),
            context_extensions: Lent::Map(&attributes.context_extensions),
        })
    }
}

/// A `bytes` field that a full decode reads as a `string`.
fn text<'a>(bytes: &'a Bytes, what: &'static str) -> Result<&'a str, Unreadable> {
    std::str::from_utf8(bytes).map_err(|_| Unreadable::NotUtf8(what))
}

/// A map's entries, as text.
fn entries<'a>(
    entries: &'a [slim::MapEntry],
    what: &'static str,
) -> Result<Vec<(&'a str, &'a str)>, Unreadable> {
    entries
        .iter()
        .map(|e| Ok((text(&e.key, what)?, text(&e.value, what)?)))
        .collect()
}

/// The plain header map of a header list of (name, value, raw value): lowercase names, repeated headers joined
/// with commas (as Envoy joins them in the plain map); a value Envoy sent as raw bytes is read lossily.
fn joined_headers<'a>(
    len: usize,
    headers: impl Iterator<Item = (&'a str, &'a str, &'a [u8])>,
) -> HashMap<String, String> {
    let mut joined: HashMap<String, String> = HashMap::with_capacity(len);
    for (key, value, raw_value) in headers {
        let value = if raw_value.is_empty() {
            Cow::Borrowed(value)
        } else {
            String::from_utf8_lossy(raw_value)
        };
        joined
            .entry(key.to_ascii_lowercase())
            .and_modify(|v| {
                v.push(',');
                v.push_str(&value);
            })
            .or_insert_with(|| value.into_owned());
    }
    joined
}

/// Builds Envoy's answer to a verdict.
pub fn check_response(mut verdict: Verdict) -> CheckResponse {
    let reason = verdict.reason;
    let answer = verdict.answer.take();
    // Any status but OK makes Envoy send the denied response as the client's answer, even a 200: that is how
    // a self-service answer reaches the client without the upstream seeing the request.
    let code = match (&answer, reason.http_status()) {
        (Some(_), _) => rpc::Code::PermissionDenied,
        (None, 200) => rpc::Code::Ok,
        (None, 401) => rpc::Code::Unauthenticated,
        (None, 429) => rpc::Code::ResourceExhausted,
        (None, 503) => rpc::Code::Unavailable,
        (None, _) => rpc::Code::PermissionDenied,
    };
    let dynamic_metadata = answers::encoded_metadata(&verdict);
    let http_response = match answer {
        Some(answer) => HttpResponse::DeniedResponse(answered_response(answer)),
        None if reason.allows() => HttpResponse::OkResponse(ok_response(verdict)),
        None => HttpResponse::DeniedResponse(denied_response(verdict)),
    };
    CheckResponse {
        status: Some(slim::Status {
            code: code as i32,
            message: String::new(),
        }),
        dynamic_metadata,
        http_response: Some(http_response),
    }
}

/// The response header that tells a prepaid caller its balance after the call (CONTRACT §9).
const CREDITS_REMAINING: &str = "tollgate-credits-remaining";

fn ok_response(verdict: Verdict) -> OkHttpResponse {
    let upstream = verdict.upstream;
    let mut response_headers = ratelimit_headers(verdict.ratelimit);
    if let Some(left) = verdict.credits_remaining {
        response_headers.push(header(CREDITS_REMAINING, left.to_string()));
    }
    OkHttpResponse {
        headers: upstream
            .headers
            .into_iter()
            .map(|(name, value)| header(name, value))
            .collect(),
        headers_to_remove: upstream.remove_headers,
        response_headers_to_add: response_headers,
        query_parameters_to_remove: upstream.remove_query_params,
    }
}

fn denied_response(verdict: Verdict) -> DeniedHttpResponse {
    let reason = verdict.reason;
    let mut headers = vec![header("content-type", "application/json".to_owned())];
    if let Some(challenge) = verdict.challenge {
        headers.push(header("www-authenticate", challenge));
    }
    if let (Reason::QuotaExceeded, Some(after)) = (reason, verdict.retry_after) {
        headers.push(header("retry-after", after.to_string()));
    }
    headers.extend(ratelimit_headers(verdict.ratelimit));
    let body =
        serde_json::json!({ "error": reason.error_code(), "message": verdict.message }).to_string();
    DeniedHttpResponse {
        status: Some(HttpStatus {
            code: i32::from(reason.http_status()),
        }),
        headers,
        body,
    }
}

/// Tollgate's own answer (a self-service request), sent as is.
fn answered_response(answer: Answer) -> DeniedHttpResponse {
    DeniedHttpResponse {
        status: Some(HttpStatus {
            code: i32::from(answer.status),
        }),
        headers: answer
            .headers
            .into_iter()
            .map(|(name, value)| header(name, value))
            .collect(),
        body: answer.body,
    }
}

fn ratelimit_headers(state: Option<LimitState>) -> Vec<HeaderValueOption> {
    let Some(state) = state else {
        return Vec::new();
    };
    vec![
        header("ratelimit-limit", state.limit.to_string()),
        header("ratelimit-remaining", state.remaining.to_string()),
        header("ratelimit-reset", state.reset_secs.to_string()),
    ]
}

fn header(key: &str, value: String) -> HeaderValueOption {
    HeaderValueOption {
        header: Some(HeaderValue {
            key: key.to_owned(),
            value,
            raw_value: Vec::new(),
        }),
        append_action: HeaderAppendAction::OverwriteIfExistsOrAdd as i32,
    }
}

#[cfg(test)]
mod tests {
    use envoy_types::ext_authz::v3::pb::{CheckResponse, HeaderValueOption, HttpResponse};
    use envoy_types::pb::google::protobuf::value::Kind;
    use prost::Message;

    use super::{Answer, LimitState, Reason, Verdict, rpc};
    use crate::check::{Identified, Upstream};

    /// tollgate's answer to `verdict` as Envoy reads it: the slim response's bytes decoded as Envoy's own.
    fn check_response(verdict: Verdict) -> CheckResponse {
        let bytes = super::check_response(verdict).encode_to_vec();
        CheckResponse::decode(bytes.as_slice()).expect("Envoy's CheckResponse decodes tollgate's")
    }

    fn verdict(reason: Reason) -> Verdict {
        Verdict {
            reason,
            message: "m".into(),
            identity: Identified {
                app: Some("weatherapp".into()),
                developer: Some("d@x".into()),
                product: Some("free".into()),
                ..Default::default()
            },
            api: Some("weather".into()),
            environment: Some("test".into()),
            ratelimit: Some(LimitState {
                limit: 10,
                remaining: 0,
                reset_secs: 30,
            }),
            retry_after: Some(30),
            credits_remaining: None,
            challenge: (reason.http_status() == 401).then(|| "APIKey realm=\"tollgate\"".into()),
            upstream: Upstream::default(),
            attributes: Vec::new(),
            quota_reserved: 0,
            answer: None,
        }
    }

    fn header_value<'a>(headers: &'a [HeaderValueOption], name: &str) -> Option<&'a str> {
        headers
            .iter()
            .filter_map(|h| h.header.as_ref())
            .find(|h| h.key == name)
            .map(|h| h.value.as_str())
    }

    #[test]
    fn an_allow_maps_upstream_changes_headers_and_metadata() {
        let mut allow = verdict(Reason::Allowed);
        allow.upstream = Upstream {
            headers: vec![("x-tollgate-app", "weatherapp".into())],
            remove_headers: vec!["x-api-key".into()],
            remove_query_params: vec!["apikey".into()],
        };
        let response = check_response(allow);
        assert_eq!(response.status.unwrap().code, 0);
        let Some(HttpResponse::OkResponse(ok)) = response.http_response else {
            panic!("expected an OkResponse");
        };
        assert_eq!(
            header_value(&ok.headers, "x-tollgate-app"),
            Some("weatherapp")
        );
        assert_eq!(ok.headers_to_remove, vec!["x-api-key"]);
        assert_eq!(ok.query_parameters_to_remove, vec!["apikey"]);
        assert_eq!(
            header_value(&ok.response_headers_to_add, "ratelimit-remaining"),
            Some("0")
        );
        let metadata = response.dynamic_metadata.unwrap();
        let get = |k: &str| match metadata.fields.get(k).and_then(|v| v.kind.clone()) {
            Some(Kind::StringValue(s)) => Some(s),
            _ => None,
        };
        assert_eq!(get("decision").as_deref(), Some("allow"));
        assert_eq!(get("app").as_deref(), Some("weatherapp"));
        assert_eq!(get("environment").as_deref(), Some("test"));
        assert_eq!(get("company"), None);
    }

    #[test]
    fn a_self_service_answer_is_sent_as_is_and_never_allowed() {
        let mut answered = verdict(Reason::SelfService);
        answered.identity.product = None;
        answered.ratelimit = None;
        answered.retry_after = None;
        answered.answer = Some(Answer {
            status: 200,
            headers: vec![
                ("content-type", "application/json".into()),
                ("cache-control", "no-store".into()),
            ],
            body: "{\"app\":\"weatherapp\"}".into(),
        });
        let response = check_response(answered);
        assert_eq!(
            response.status.unwrap().code,
            rpc::Code::PermissionDenied as i32,
            "an OK status would let Envoy forward the request upstream"
        );
        let Some(HttpResponse::DeniedResponse(denied)) = response.http_response else {
            panic!("expected a DeniedResponse carrying the answer");
        };
        assert_eq!(denied.status.unwrap().code, 200);
        assert_eq!(denied.body, "{\"app\":\"weatherapp\"}");
        assert_eq!(
            header_value(&denied.headers, "cache-control"),
            Some("no-store")
        );
        assert_eq!(header_value(&denied.headers, "www-authenticate"), None);
        let metadata = response.dynamic_metadata.unwrap();
        let get = |k: &str| match metadata.fields.get(k).and_then(|v| v.kind.clone()) {
            Some(Kind::StringValue(s)) => Some(s),
            _ => None,
        };
        assert_eq!(get("decision").as_deref(), Some("self_service"));
        assert_eq!(get("reason").as_deref(), Some("self_service"));
        assert_eq!(
            get("product"),
            None,
            "no product: metering has no meter to bill"
        );
    }

    #[test]
    fn denials_carry_status_json_and_headers() {
        let response = check_response(verdict(Reason::QuotaExceeded));
        let Some(HttpResponse::DeniedResponse(denied)) = response.http_response else {
            panic!("expected a DeniedResponse");
        };
        assert_eq!(denied.status.unwrap().code, 429);
        assert_eq!(header_value(&denied.headers, "retry-after"), Some("30"));
        assert_eq!(header_value(&denied.headers, "ratelimit-limit"), Some("10"));
        assert_eq!(header_value(&denied.headers, "www-authenticate"), None);
        let body: serde_json::Value = serde_json::from_str(&denied.body).unwrap();
        assert_eq!(
            body,
            serde_json::json!({"error": "quota_exceeded", "message": "m"})
        );

        let response = check_response(verdict(Reason::MissingCredential));
        let Some(HttpResponse::DeniedResponse(denied)) = response.http_response else {
            panic!("expected a DeniedResponse");
        };
        assert_eq!(denied.status.unwrap().code, 401);
        assert!(header_value(&denied.headers, "www-authenticate").is_some());
        assert_eq!(header_value(&denied.headers, "retry-after"), None);
        assert_eq!(
            response.status.unwrap().code,
            rpc::Code::Unauthenticated as i32
        );
    }
}
