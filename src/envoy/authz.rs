//! `envoy.service.auth.v3.Authorization`: CheckRequest -> [`Request`], [`Decision`] -> CheckResponse.

use std::borrow::Cow;
use std::collections::HashMap;
use std::sync::{Arc, LazyLock};
use std::time::Instant;

use envoy_types::ext_authz::v3::pb::{
    Authorization, CheckRequest, CheckResponse, DeniedHttpResponse, HeaderAppendAction,
    HeaderValue, HeaderValueOption, HttpResponse, HttpStatus, OkHttpResponse,
};
use envoy_types::pb::envoy::service::auth::v3::attribute_context::HttpRequest;
use envoy_types::pb::google::protobuf::{Struct, Value, value::Kind};
use envoy_types::pb::google::rpc;
use tonic::{Request as GrpcRequest, Response, Status};

use crate::authorizer::Authorizer;
use crate::decision::{Decision, Reason, Request, Settings};

/// Prefix of the headers tollgate sends upstream; clients may never set them.
const OWN_HEADER_PREFIX: &str = "x-tollgate-";

static EMPTY: LazyLock<HashMap<String, String>> = LazyLock::new(HashMap::new);

/// The ext_authz gRPC service.
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
        request: GrpcRequest<CheckRequest>,
    ) -> Result<Response<CheckResponse>, Status> {
        let started = Instant::now();
        let check = request.into_inner();
        let http = check
            .attributes
            .as_ref()
            .and_then(|a| a.request.as_ref())
            .and_then(|r| r.http.as_ref());
        let Some(http) = http else {
            return Err(Status::invalid_argument(
                "CheckRequest carries no HTTP request attributes",
            ));
        };
        let headers = headers_of(http);
        let context_extensions = check
            .attributes
            .as_ref()
            .map_or(&*EMPTY, |a| &a.context_extensions);
        let authority = if http.host.is_empty() {
            headers.get(":authority").map_or("", String::as_str)
        } else {
            http.host.as_str()
        };
        let request = Request {
            method: &http.method,
            path: &http.path,
            authority,
            headers: &headers,
            context_extensions,
        };
        let caller = self.authorizer.identify(&request).await;
        let catalog = self.authorizer.snapshot();
        let decision = self.authorizer.decide(&request, &caller, &catalog).await;
        tracing::debug!(
            reason = decision.reason.as_str(),
            app = decision.identity.app,
            product = decision.identity.product,
            api = decision.api,
            method = request.method,
            "check"
        );
        let response = check_response(&decision, &request, self.authorizer.settings());
        self.authorizer
            .metrics()
            .check_duration
            .observe(started.elapsed().as_secs_f64());
        Ok(Response::new(response))
    }
}

/// Request headers, from the plain map or, when Envoy sends raw headers (`encode_raw_headers`), the header map.
fn headers_of(http: &HttpRequest) -> Cow<'_, HashMap<String, String>> {
    match &http.header_map {
        Some(map) if http.headers.is_empty() => {
            let mut headers: HashMap<String, String> = HashMap::with_capacity(map.headers.len());
            for h in &map.headers {
                let value = if h.raw_value.is_empty() {
                    h.value.clone()
                } else {
                    String::from_utf8_lossy(&h.raw_value).into_owned()
                };
                headers
                    .entry(h.key.to_ascii_lowercase())
                    .and_modify(|v| {
                        v.push(',');
                        v.push_str(&value);
                    })
                    .or_insert(value);
            }
            Cow::Owned(headers)
        }
        _ => Cow::Borrowed(&http.headers),
    }
}

/// Builds Envoy's answer to a decision.
pub fn check_response(
    decision: &Decision<'_>,
    request: &Request<'_>,
    settings: &Settings,
) -> CheckResponse {
    let reason = decision.reason;
    let http_response = if reason.allows() {
        HttpResponse::OkResponse(ok_response(decision, request, settings))
    } else {
        HttpResponse::DeniedResponse(denied_response(decision, settings))
    };
    let code = match reason.http_status() {
        200 => rpc::Code::Ok,
        401 => rpc::Code::Unauthenticated,
        429 => rpc::Code::ResourceExhausted,
        503 => rpc::Code::Unavailable,
        _ => rpc::Code::PermissionDenied,
    };
    CheckResponse {
        status: Some(rpc::Status {
            code: code as i32,
            message: String::new(),
            details: Vec::new(),
        }),
        dynamic_metadata: Some(metadata(decision)),
        http_response: Some(http_response),
    }
}

fn ok_response<'a>(
    decision: &Decision<'a>,
    request: &Request<'_>,
    settings: &Settings,
) -> OkHttpResponse {
    let identity = &decision.identity;
    // Envoy pays for every header it adds (bench/answer-parts: about 5 % of req/s for these three).
    let set = |value: Option<&'a str>| value.filter(|_| settings.upstream_identity_headers);
    let own = [
        ("x-tollgate-app", set(identity.app)),
        ("x-tollgate-developer", set(identity.developer)),
        ("x-tollgate-product", set(identity.product)),
    ];
    let headers = own
        .iter()
        .filter_map(|(name, value)| value.map(|v| header(name, v)))
        .collect();
    let mut headers_to_remove: Vec<String> = request
        .headers
        .keys()
        .filter(|name| {
            name.starts_with(OWN_HEADER_PREFIX)
                && !own
                    .iter()
                    .any(|(own_name, value)| value.is_some() && own_name == name)
        })
        .cloned()
        .collect();
    headers_to_remove.extend(
        settings
            .api_key
            .headers
            .iter()
            .filter(|h| request.headers.contains_key(h.as_str()))
            .cloned(),
    );
    // Asking Envoy to rewrite the query costs it measurable CPU per request: only when a key parameter is there.
    let query_parameters_to_remove = match request.path.split_once('?') {
        Some((_, query)) => settings
            .api_key
            .query_params
            .iter()
            .filter(|name| {
                form_urlencoded::parse(query.as_bytes()).any(|(k, _)| k == name.as_str())
            })
            .cloned()
            .collect(),
        None => Vec::new(),
    };
    OkHttpResponse {
        headers,
        headers_to_remove,
        response_headers_to_add: ratelimit_headers(decision),
        query_parameters_to_remove,
        ..Default::default()
    }
}

fn denied_response(decision: &Decision<'_>, settings: &Settings) -> DeniedHttpResponse {
    let reason = decision.reason;
    let mut headers = vec![header("content-type", "application/json")];
    if reason.http_status() == 401 {
        headers.push(header("www-authenticate", &www_authenticate(settings)));
    }
    if let (Reason::QuotaExceeded, Some(after)) = (reason, decision.retry_after) {
        headers.push(header("retry-after", &after.to_string()));
    }
    headers.extend(ratelimit_headers(decision));
    let body = serde_json::json!({ "error": reason.error_code(), "message": decision.message })
        .to_string();
    DeniedHttpResponse {
        status: Some(HttpStatus {
            code: i32::from(reason.http_status()),
        }),
        headers,
        body,
    }
}

/// One challenge per accepted scheme (RFC 9110 §11.6.1 allows several, comma-separated).
fn www_authenticate(settings: &Settings) -> String {
    let mut challenges = Vec::new();
    if settings.bearer {
        challenges.push("Bearer realm=\"tollgate\"".to_owned());
    }
    match settings.api_key.headers.first() {
        Some(h) => challenges.push(format!("APIKey realm=\"tollgate\", header=\"{h}\"")),
        None => challenges.push("APIKey realm=\"tollgate\"".to_owned()),
    }
    challenges.join(", ")
}

fn ratelimit_headers(decision: &Decision<'_>) -> Vec<HeaderValueOption> {
    let Some(state) = decision.ratelimit else {
        return Vec::new();
    };
    vec![
        header("ratelimit-limit", &state.limit.to_string()),
        header("ratelimit-remaining", &state.remaining.to_string()),
        header("ratelimit-reset", &state.reset_secs.to_string()),
    ]
}

fn header(key: &str, value: &str) -> HeaderValueOption {
    HeaderValueOption {
        header: Some(HeaderValue {
            key: key.to_owned(),
            value: value.to_owned(),
            raw_value: Vec::new(),
        }),
        append_action: HeaderAppendAction::OverwriteIfExistsOrAdd as i32,
        ..Default::default()
    }
}

/// The `envoy.filters.http.ext_authz` dynamic metadata (CONTRACT §4), on allow and on deny.
fn metadata(decision: &Decision<'_>) -> Struct {
    let id = &decision.identity;
    let fields = [
        (
            "decision",
            Some(if decision.allowed() { "allow" } else { "deny" }),
        ),
        ("reason", Some(decision.reason.as_str())),
        ("app", id.app),
        ("developer", id.developer),
        ("company", id.company),
        ("stripe_customer", id.stripe_customer),
        ("product", id.product),
        ("operation", id.operation),
        ("api", Some(decision.api).filter(|a| !a.is_empty())),
        ("environment", decision.environment),
    ];
    // Sized up front: collecting a filtered iterator would grow (and rehash) the table three times per Check.
    let mut map = HashMap::with_capacity(fields.len());
    for (k, v) in fields {
        if let Some(v) = v {
            let value = Value {
                kind: Some(Kind::StringValue(v.to_owned())),
            };
            map.insert(k.to_owned(), value);
        }
    }
    Struct { fields: map }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::decision::Identity;
    use crate::identity::ApiKeyConfig;
    use crate::quota::LimitState;

    fn settings() -> Settings {
        Settings {
            api_key: ApiKeyConfig::default(),
            upstream_identity_headers: true,
            ..Default::default()
        }
    }

    fn decision(reason: Reason) -> Decision<'static> {
        Decision {
            reason,
            message: "m".into(),
            identity: Identity {
                app: Some("weatherapp"),
                developer: Some("d@x"),
                product: Some("free"),
                ..Default::default()
            },
            api: "weather",
            environment: Some("test"),
            ratelimit: Some(LimitState {
                limit: 10,
                remaining: 0,
                reset_secs: 30,
            }),
            retry_after: Some(30),
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
    fn an_allow_strips_credentials_and_spoofed_headers() {
        let headers: HashMap<String, String> = [
            ("x-api-key", "secret"),
            ("x-tollgate-app", "evil"),
            ("x-tollgate-company", "evil"),
            ("accept", "*/*"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect();
        let request = Request {
            method: "GET",
            path: "/a?apikey=secret&x=1",
            authority: "h",
            headers: &headers,
            context_extensions: &EMPTY,
        };
        let response = check_response(&decision(Reason::Allowed), &request, &settings());
        assert_eq!(response.status.unwrap().code, 0);
        let Some(HttpResponse::OkResponse(ok)) = response.http_response else {
            panic!("expected an OkResponse");
        };
        assert_eq!(
            header_value(&ok.headers, "x-tollgate-app"),
            Some("weatherapp")
        );
        let mut removed = ok.headers_to_remove.clone();
        removed.sort();
        assert_eq!(removed, vec!["x-api-key", "x-tollgate-company"]);
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
    fn without_identity_headers_every_client_sent_own_header_is_removed() {
        let headers: HashMap<String, String> = [("x-tollgate-app", "evil"), ("x-api-key", "k")]
            .into_iter()
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect();
        let request = Request {
            method: "GET",
            path: "/a",
            authority: "h",
            headers: &headers,
            context_extensions: &EMPTY,
        };
        let settings = Settings {
            upstream_identity_headers: false,
            ..settings()
        };
        let response = check_response(&decision(Reason::Allowed), &request, &settings);
        let Some(HttpResponse::OkResponse(ok)) = response.http_response else {
            panic!("expected an OkResponse");
        };
        assert!(ok.headers.is_empty(), "{:?}", ok.headers);
        let mut removed = ok.headers_to_remove.clone();
        removed.sort();
        assert_eq!(removed, vec!["x-api-key", "x-tollgate-app"]);
        let metadata = response.dynamic_metadata.unwrap_or_default();
        assert!(metadata.fields.contains_key("app"), "metadata is kept");
    }

    #[test]
    fn denials_carry_status_json_and_headers() {
        let request = Request {
            method: "GET",
            path: "/a",
            authority: "h",
            headers: &EMPTY,
            context_extensions: &EMPTY,
        };
        let response = check_response(&decision(Reason::QuotaExceeded), &request, &settings());
        let Some(HttpResponse::DeniedResponse(denied)) = response.http_response else {
            panic!("expected a DeniedResponse");
        };
        assert_eq!(denied.status.unwrap().code, 429);
        assert_eq!(header_value(&denied.headers, "retry-after"), Some("30"));
        assert_eq!(header_value(&denied.headers, "ratelimit-limit"), Some("10"));
        let body: serde_json::Value = serde_json::from_str(&denied.body).unwrap();
        assert_eq!(
            body,
            serde_json::json!({"error": "quota_exceeded", "message": "m"})
        );

        let response = check_response(&decision(Reason::MissingCredential), &request, &settings());
        let Some(HttpResponse::DeniedResponse(denied)) = response.http_response else {
            panic!("expected a DeniedResponse");
        };
        assert_eq!(denied.status.unwrap().code, 401);
        assert!(header_value(&denied.headers, "www-authenticate").is_some());
        assert_eq!(
            response.status.unwrap().code,
            rpc::Code::Unauthenticated as i32
        );
    }
}
