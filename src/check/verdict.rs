//! The one owned answer of a Check: everything the adapter maps to Envoy's response, nothing borrowed.
//!
//! Building it here rather than in the adapter keeps every rule about what reaches the upstream (credentials
//! stripped, spoofed `x-tollgate-*` headers removed) in the protocol-free core, where it is unit-tested.

use std::collections::BTreeMap;

use crate::check::decision::{Decision, Identity};
use crate::check::{MetadataMode, RateLimitHeaders, Reason, Request, Settings};
use crate::quota::LimitState;

/// Prefix of the headers tollgate sends upstream; clients may never set them.
pub const OWN_HEADER_PREFIX: &str = "x-tollgate-";

/// Headers that make some upstream frameworks treat a request as another method than the one tollgate
/// matched: a `GET` allowed by a read-only product must not arrive as a `DELETE`.
pub const METHOD_OVERRIDE_HEADERS: [&str; 3] = [
    "x-http-method-override",
    "x-http-method",
    "x-method-override",
];

/// The answer to one Check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verdict {
    /// Why; also says whether the request is allowed.
    pub reason: Reason,
    /// For denials, what to fix (never a secret); empty on allow.
    pub message: String,
    /// Who the caller turned out to be, as far as the decision got.
    pub identity: Identified,
    /// The API id the request was matched against, when there was one.
    pub api: Option<String>,
    /// The environment this sidecar serves.
    pub environment: Option<String>,
    /// The quota state for `ratelimit-*` headers.
    pub ratelimit: Option<LimitState>,
    /// For a 429: seconds until the exhausted limit's window ends (`retry-after`).
    pub retry_after: Option<u64>,
    /// On an allowed prepaid call: the owner's balance left (`tollgate-credits-remaining`).
    pub credits_remaining: Option<u64>,
    /// For a 401: the `www-authenticate` challenge naming every accepted scheme.
    pub challenge: Option<String>,
    /// On allow: the covered operation's attributes that `metadata_attributes` lists, by name.
    pub attributes: Vec<(String, String)>,
    /// On an allowed call under a token quota: the units held (metadata `quota_reserved`; 0: none).
    pub quota_reserved: u64,
    /// On allow: how the request is changed on its way upstream.
    pub upstream: Upstream,
    /// With [`Reason::SelfService`]: tollgate's own answer, sent to the client instead of the upstream's.
    pub answer: Option<Answer>,
}

/// A response tollgate gives itself (a self-service request): the adapter sends it as the client's response,
/// whatever its status, and the upstream never sees the request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Answer {
    /// The HTTP status.
    pub status: u16,
    /// Response headers (lowercase names), `content-type` included.
    pub headers: Vec<(&'static str, String)>,
    /// The body.
    pub body: String,
}

/// The caller's names, owned so the adapter can move them into protobuf without copying again.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Identified {
    /// The catalog app the credential belongs to (none for a portal token).
    pub app: Option<String>,
    /// Developer e-mail.
    pub developer: Option<String>,
    /// The developer's company, which owns a portal account's quota and usage.
    pub company: Option<String>,
    /// The Stripe customer billed for the call's usage.
    pub stripe_customer: Option<String>,
    /// The product that covered the request.
    pub product: Option<String>,
    /// The operation that covered the request.
    pub operation: Option<String>,
}

/// What an allowed request loses and gains before the upstream sees it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Upstream {
    /// Headers set (overwriting any the client sent): tollgate's own `x-tollgate-*` identity headers.
    pub headers: Vec<(&'static str, String)>,
    /// Headers removed: the credential's and every client-sent `x-tollgate-*` not overwritten.
    pub remove_headers: Vec<String>,
    /// Query parameters removed: those that carried an API key.
    pub remove_query_params: Vec<String>,
}

impl Verdict {
    /// Whether the request goes through.
    pub fn allowed(&self) -> bool {
        self.reason.allows()
    }

    /// Completes `decision` for `request`; `challenge` is the precomputed `www-authenticate` value.
    pub(crate) fn new(
        decision: Decision<'_>,
        request: &Request<'_>,
        settings: &Settings,
        challenge: &str,
    ) -> Verdict {
        let reason = decision.reason;
        let (upstream, attributes) = if reason.allows() {
            (
                upstream(&decision.identity, request, settings),
                listed_attributes(decision.identity.attributes, &settings.metadata_attributes),
            )
        } else {
            (Upstream::default(), Vec::new())
        };
        let mut id = decision.identity;
        let mut api = Some(decision.api).filter(|a| !a.is_empty());
        let mut environment = decision.environment;
        if settings.metadata == MetadataMode::Billing {
            // Metering reads none of these; a portal account (no app) keeps its owner for token quotas.
            api = None;
            environment = None;
            if id.app.is_some() {
                id.developer = None;
                id.company = None;
            }
        }
        let ratelimit = decision
            .ratelimit
            .filter(|state| shows_ratelimit(settings.ratelimit_headers, reason, *state));
        let own = |s: Option<&str>| s.map(str::to_owned);
        Verdict {
            reason,
            message: decision.message,
            identity: Identified {
                app: own(id.app),
                developer: own(id.developer),
                company: own(id.company),
                stripe_customer: own(id.stripe_customer),
                product: own(id.product),
                operation: own(id.operation),
            },
            api: own(api),
            environment: own(environment),
            ratelimit,
            retry_after: decision.retry_after,
            credits_remaining: decision.credits_remaining,
            quota_reserved: decision.quota_reserved,
            challenge: (reason.http_status() == 401).then(|| challenge.to_owned()),
            attributes,
            upstream,
            answer: None,
        }
    }
}

/// Whether a call decided for `reason` carries its quota state as `ratelimit-*` headers under `option`.
fn shows_ratelimit(option: RateLimitHeaders, reason: Reason, state: LimitState) -> bool {
    match option {
        _ if !reason.allows() => true,
        RateLimitHeaders::Always => true,
        RateLimitHeaders::NearLimit => state.remaining.saturating_mul(10) <= state.limit,
        RateLimitHeaders::OnDeny => false,
    }
}

/// The attributes among `listed` that the covered operation (or its product) carries, in `listed` order.
fn listed_attributes(
    attributes: Option<&BTreeMap<String, String>>,
    listed: &[String],
) -> Vec<(String, String)> {
    let Some(attributes) = attributes else {
        return Vec::new();
    };
    listed
        .iter()
        .filter_map(|name| Some((name.clone(), attributes.get(name)?.clone())))
        .collect()
}

/// One challenge per accepted scheme (RFC 9110 §11.6.1 allows several, comma-separated).
pub(crate) fn www_authenticate(settings: &Settings) -> String {
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

fn upstream<'a>(identity: &Identity<'a>, request: &Request<'_>, settings: &Settings) -> Upstream {
    // Envoy pays for every header it adds (bench/answer-parts: about 5 % of req/s for these three).
    let set = |value: Option<&'a str>| value.filter(|_| settings.upstream_identity_headers);
    let own = [
        ("x-tollgate-app", set(identity.app)),
        ("x-tollgate-developer", set(identity.developer)),
        ("x-tollgate-product", set(identity.product)),
    ];
    let headers = own
        .iter()
        .filter_map(|(name, value)| value.map(|v| (*name, v.to_owned())))
        .collect();
    let mut remove_headers: Vec<String> = Vec::new();
    request.headers.for_each(&mut |name, _| {
        // A list may name a header twice (a map could not): remove it once.
        if name.starts_with(OWN_HEADER_PREFIX)
            && !own
                .iter()
                .any(|(own_name, value)| value.is_some() && *own_name == name)
            && !remove_headers.iter().any(|r| r == name)
        {
            remove_headers.push(name.to_owned());
        }
    });
    let carried = settings
        .api_key
        .headers
        .iter()
        .map(String::as_str)
        .chain(METHOD_OVERRIDE_HEADERS)
        .filter(|h| request.headers.contains(h))
        .map(str::to_owned);
    remove_headers.extend(carried);
    // Asking Envoy to rewrite the query costs it measurable CPU per request: only when a key parameter is there.
    let remove_query_params = match request.path.split_once('?') {
        Some((_, query)) => key_params_as_sent(query, &settings.api_key.query_params),
        None => Vec::new(),
    };
    Upstream {
        headers,
        remove_headers,
        remove_query_params,
    }
}

/// The names, as the client wrote them, of the query parameters whose decoded name is a key parameter.
/// Envoy removes parameters by their name as written, so `?api%6Bey=KEY` must be removed as `api%6Bey`: the
/// decoded `apikey` would leave the key in the query the upstream sees.
fn key_params_as_sent(query: &str, key_params: &[String]) -> Vec<String> {
    let mut found: Vec<String> = Vec::new();
    for pair in query.split('&') {
        let raw = pair.split_once('=').map_or(pair, |(name, _)| name);
        let is_key = form_urlencoded::parse(raw.as_bytes())
            .next()
            .is_some_and(|(decoded, _)| key_params.iter().any(|k| *k == decoded));
        if is_key && !found.iter().any(|f| f == raw) {
            found.push(raw.to_owned());
        }
    }
    found
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;
    use crate::identity::ApiKeyConfig;

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
            credits_remaining: None,
            quota_reserved: 0,
        }
    }

    fn request<'a>(path: &'a str, headers: &'a HashMap<String, String>) -> Request<'a> {
        static EMPTY: std::sync::LazyLock<HashMap<String, String>> =
            std::sync::LazyLock::new(HashMap::new);
        Request {
            method: "GET",
            path,
            authority: "h",
            headers,
            context_extensions: &*EMPTY,
        }
    }

    fn headers(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    #[test]
    fn ratelimit_headers_follow_the_option_and_denials_always_carry_them() {
        let headers = headers(&[]);
        let request = request("/a", &headers);
        let with = |option: RateLimitHeaders, reason: Reason, remaining: u64| {
            let mut settings = settings();
            settings.ratelimit_headers = option;
            let mut d = decision(reason);
            d.ratelimit = Some(LimitState {
                limit: 100,
                remaining,
                reset_secs: 30,
            });
            Verdict::new(d, &request, &settings, "c")
                .ratelimit
                .is_some()
        };
        assert!(with(RateLimitHeaders::Always, Reason::Allowed, 90));
        assert!(!with(RateLimitHeaders::NearLimit, Reason::Allowed, 90));
        assert!(with(RateLimitHeaders::NearLimit, Reason::Allowed, 10));
        assert!(!with(RateLimitHeaders::OnDeny, Reason::Allowed, 0));
        for option in [RateLimitHeaders::NearLimit, RateLimitHeaders::OnDeny] {
            assert!(with(option, Reason::QuotaExceeded, 0), "{option:?}");
        }
    }

    #[test]
    fn billing_metadata_keeps_what_metering_reads() {
        let headers = headers(&[]);
        let request = request("/a", &headers);
        let mut settings = settings();
        settings.metadata = MetadataMode::Billing;
        let v = Verdict::new(decision(Reason::Allowed), &request, &settings, "c");
        assert_eq!(v.identity.app.as_deref(), Some("weatherapp"));
        assert_eq!(v.identity.product.as_deref(), Some("free"));
        assert_eq!(
            (v.api, v.environment, v.identity.developer),
            (None, None, None)
        );
        assert!(
            v.upstream
                .headers
                .iter()
                .any(|(name, value)| *name == "x-tollgate-developer" && value == "d@x"),
            "the upstream still hears who called"
        );
        let mut portal = decision(Reason::Allowed);
        portal.identity.app = None;
        let v = Verdict::new(portal, &request, &settings, "c");
        assert_eq!(
            v.identity.developer.as_deref(),
            Some("d@x"),
            "an account's owner stays"
        );
    }

    #[test]
    fn only_listed_attributes_of_an_allowed_call_are_carried() {
        let attributes: BTreeMap<String, String> = [("deprecated", "true"), ("tier", "gold")]
            .into_iter()
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect();
        let mut settings = settings();
        settings.metadata_attributes = vec!["deprecated".into(), "absent".into()];
        let headers = headers(&[]);
        let request = request("/a", &headers);
        let mut allowed = decision(Reason::Allowed);
        allowed.identity.attributes = Some(&attributes);
        let verdict = Verdict::new(allowed, &request, &settings, "c");
        assert_eq!(
            verdict.attributes,
            vec![("deprecated".to_owned(), "true".to_owned())]
        );
        let mut denied = decision(Reason::QuotaExceeded);
        denied.identity.attributes = Some(&attributes);
        let verdict = Verdict::new(denied, &request, &settings, "c");
        assert!(verdict.attributes.is_empty(), "allow metadata only");
    }

    #[test]
    fn an_allow_strips_credentials_and_spoofed_headers() {
        let headers = headers(&[
            ("x-api-key", "secret"),
            ("x-tollgate-app", "evil"),
            ("x-tollgate-company", "evil"),
            ("accept", "*/*"),
        ]);
        let request = request("/a?apikey=secret&x=1", &headers);
        let verdict = Verdict::new(decision(Reason::Allowed), &request, &settings(), "c");
        assert!(verdict.allowed());
        assert_eq!(verdict.challenge, None);
        let up = &verdict.upstream;
        assert!(
            up.headers
                .contains(&("x-tollgate-app", "weatherapp".to_owned()))
        );
        let mut removed = up.remove_headers.clone();
        removed.sort();
        assert_eq!(removed, vec!["x-api-key", "x-tollgate-company"]);
        assert_eq!(up.remove_query_params, vec!["apikey"]);
        assert_eq!(verdict.identity.app.as_deref(), Some("weatherapp"));
        assert_eq!(verdict.identity.company, None);
        assert_eq!(verdict.api.as_deref(), Some("weather"));
    }

    #[test]
    fn without_identity_headers_every_client_sent_own_header_is_removed() {
        let headers = headers(&[("x-tollgate-app", "evil"), ("x-api-key", "k")]);
        let request = request("/a", &headers);
        let settings = Settings {
            upstream_identity_headers: false,
            ..settings()
        };
        let verdict = Verdict::new(decision(Reason::Allowed), &request, &settings, "c");
        assert!(verdict.upstream.headers.is_empty());
        let mut removed = verdict.upstream.remove_headers.clone();
        removed.sort();
        assert_eq!(removed, vec!["x-api-key", "x-tollgate-app"]);
        assert_eq!(
            verdict.identity.app.as_deref(),
            Some("weatherapp"),
            "metadata keeps the identity"
        );
    }

    #[test]
    fn a_header_listed_twice_is_removed_once() {
        // The adapter lends the headers as Envoy's entries, where a name can repeat (a map could not).
        let list = vec![
            ("x-tollgate-app", "evil"),
            ("x-api-key", "k"),
            ("x-tollgate-app", "worse"),
        ];
        let none = headers(&[]);
        let request = Request {
            headers: &list,
            ..request("/a", &none)
        };
        let settings = Settings {
            upstream_identity_headers: false,
            ..settings()
        };
        let verdict = Verdict::new(decision(Reason::Allowed), &request, &settings, "c");
        let mut removed = verdict.upstream.remove_headers.clone();
        removed.sort();
        assert_eq!(removed, vec!["x-api-key", "x-tollgate-app"]);
    }

    #[test]
    fn denials_change_nothing_upstream_and_challenge_only_on_401() {
        let headers = headers(&[("x-api-key", "k")]);
        let request = request("/a?apikey=k", &headers);
        let verdict = Verdict::new(decision(Reason::QuotaExceeded), &request, &settings(), "c");
        assert_eq!(verdict.upstream, Upstream::default());
        assert_eq!(verdict.challenge, None);
        assert_eq!(verdict.retry_after, Some(30));
        let verdict = Verdict::new(
            decision(Reason::MissingCredential),
            &request,
            &settings(),
            "c",
        );
        assert_eq!(verdict.challenge.as_deref(), Some("c"));
    }

    #[test]
    fn method_overrides_and_encoded_key_names_do_not_reach_the_upstream() {
        let headers = headers(&[
            ("x-http-method-override", "DELETE"),
            ("x-http-method", "DELETE"),
            ("x-method-override", "PUT"),
        ]);
        let request = request("/a?api%6Bey=K&x=1&apikey=K&api%6bey=K&apikey=K2", &headers);
        let verdict = Verdict::new(decision(Reason::Allowed), &request, &settings(), "c");
        let mut removed = verdict.upstream.remove_headers.clone();
        removed.sort();
        assert_eq!(
            removed,
            vec![
                "x-http-method",
                "x-http-method-override",
                "x-method-override"
            ]
        );
        assert_eq!(
            verdict.upstream.remove_query_params,
            vec!["api%6Bey", "apikey", "api%6bey"]
        );
        let request = request_plain("/a?apikeys=1&xapikey=2&apikey");
        let verdict = Verdict::new(decision(Reason::Allowed), &request, &settings(), "c");
        assert_eq!(verdict.upstream.remove_query_params, vec!["apikey"]);
    }

    fn request_plain(path: &str) -> Request<'_> {
        static NONE: std::sync::LazyLock<HashMap<String, String>> =
            std::sync::LazyLock::new(HashMap::new);
        request(path, &NONE)
    }

    #[test]
    fn the_challenge_names_every_accepted_scheme() {
        let bearer = Settings {
            bearer: true,
            ..settings()
        };
        assert_eq!(
            www_authenticate(&bearer),
            "Bearer realm=\"tollgate\", APIKey realm=\"tollgate\", header=\"x-api-key\""
        );
    }
}
