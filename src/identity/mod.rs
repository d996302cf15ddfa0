//! Who is calling: the credential a request presents, and what it resolves to in the catalog.

pub mod api_key;
pub mod jwt;

use std::borrow::Cow;
use std::fmt;

use serde::Deserialize;

use crate::check::Pairs;

/// Where API keys are looked for (`identity.api_key` in the config).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApiKeyConfig {
    /// Request headers that may carry the key, tried in order (lowercase, as Envoy sends them).
    #[serde(default = "default_headers")]
    pub headers: Vec<String>,
    /// Query parameters that may carry the key, tried after the headers.
    #[serde(default = "default_query_params")]
    pub query_params: Vec<String>,
}

impl Default for ApiKeyConfig {
    fn default() -> Self {
        ApiKeyConfig {
            headers: default_headers(),
            query_params: default_query_params(),
        }
    }
}

fn default_headers() -> Vec<String> {
    vec!["x-api-key".to_owned()]
}

fn default_query_params() -> Vec<String> {
    vec!["apikey".to_owned()]
}

/// The credential a request presents (its `Debug` never shows a key or a token).
#[derive(Clone, PartialEq, Eq)]
pub enum Presented<'a> {
    /// None of the configured places carries a credential.
    Nothing,
    /// A bearer token from the `authorization` header (only looked for when JWT providers are configured).
    Bearer(&'a str),
    /// An API key (decoded from the query string when it came from there).
    ApiKey {
        /// The key as presented; never logged.
        key: Cow<'a, str>,
    },
}

/// The credential of a request after the asynchronous part of identification (token verification); what
/// [`crate::check::plan()`] resolves against the catalog.
pub enum Caller<'a> {
    /// No credential.
    Nothing,
    /// An API key, not yet looked up.
    ApiKey {
        /// The key as presented; never logged.
        key: Cow<'a, str>,
    },
    /// A bearer token, verified or refused.
    Token(Result<std::sync::Arc<jwt::VerifiedToken>, jwt::JwtRejection>),
}

impl fmt::Debug for Presented<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Presented::Nothing => f.write_str("Nothing"),
            Presented::Bearer(_) => f.write_str("Bearer(<redacted>)"),
            Presented::ApiKey { .. } => f.write_str("ApiKey(<redacted>)"),
        }
    }
}

impl fmt::Debug for Caller<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Caller::Nothing => f.write_str("Nothing"),
            Caller::ApiKey { .. } => f.write_str("ApiKey(<redacted>)"),
            Caller::Token(Ok(token)) => write!(f, "Token(verified by {})", token.provider),
            Caller::Token(Err(rejection)) => write!(f, "Token(refused: {rejection})"),
        }
    }
}

/// Finds the credential a request carries: a bearer token when `bearer` (JWT providers are configured) and
/// the `authorization` header holds one, else the first configured API-key header, else the first configured
/// query parameter. Empty values count as absent.
pub fn presented<'a>(
    headers: &'a dyn Pairs,
    path: &'a str,
    config: &ApiKeyConfig,
    bearer: bool,
) -> Presented<'a> {
    if bearer && let Some(token) = headers.get("authorization").and_then(|v| bearer_token(v)) {
        return Presented::Bearer(token);
    }
    for name in &config.headers {
        if let Some(value) = headers.get(name) {
            let value = value.trim();
            if !value.is_empty() {
                return Presented::ApiKey {
                    key: Cow::Borrowed(value),
                };
            }
        }
    }
    if let Some((_, query)) = path.split_once('?') {
        for name in &config.query_params {
            let found = form_urlencoded::parse(query.as_bytes())
                .find(|(k, v)| k == name.as_str() && !v.is_empty());
            if let Some((_, value)) = found {
                return Presented::ApiKey { key: value };
            }
        }
    }
    Presented::Nothing
}

/// The token of an `authorization: Bearer <token>` header (scheme case-insensitive, RFC 7235).
fn bearer_token(value: &str) -> Option<&str> {
    let (scheme, token) = value.trim().split_once(' ')?;
    let token = token.trim();
    (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty()).then_some(token)
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;
    use crate::check::Request;

    fn request<'a>(
        path: &'a str,
        headers: &'a HashMap<String, String>,
        ext: &'a HashMap<String, String>,
    ) -> Request<'a> {
        Request {
            method: "GET",
            path,
            authority: "api.example.com",
            headers,
            context_extensions: ext,
        }
    }

    #[test]
    fn header_wins_over_query_and_query_is_decoded() {
        let config = ApiKeyConfig::default();
        let ext = HashMap::new();
        let mut headers = HashMap::new();
        let r = request("/x?apikey=q%2Bkey&a=1", &headers, &ext);
        assert_eq!(
            presented(r.headers, r.path, &config, false),
            Presented::ApiKey {
                key: Cow::Owned("q+key".into())
            }
        );
        headers.insert("x-api-key".to_owned(), "hkey".to_owned());
        let r = request("/x?apikey=qkey", &headers, &ext);
        assert_eq!(
            presented(r.headers, r.path, &config, false),
            Presented::ApiKey {
                key: Cow::Borrowed("hkey")
            }
        );
    }

    #[test]
    fn bearer_tokens_only_count_when_jwt_is_configured() {
        let config = ApiKeyConfig::default();
        let ext = HashMap::new();
        let mut headers = HashMap::new();
        headers.insert(
            "authorization".to_owned(),
            "bearer  abc.def.ghi ".to_owned(),
        );
        headers.insert("x-api-key".to_owned(), "hkey".to_owned());
        let r = request("/x", &headers, &ext);
        assert_eq!(
            presented(r.headers, r.path, &config, true),
            Presented::Bearer("abc.def.ghi")
        );
        assert!(matches!(
            presented(r.headers, r.path, &config, false),
            Presented::ApiKey { .. }
        ));
        headers.insert("authorization".to_owned(), "Basic Zm9vOmJhcg==".to_owned());
        let r = request("/x", &headers, &ext);
        assert!(matches!(
            presented(r.headers, r.path, &config, true),
            Presented::ApiKey { .. }
        ));
    }

    #[test]
    fn empty_values_and_other_params_are_not_credentials() {
        let config = ApiKeyConfig::default();
        let ext = HashMap::new();
        let mut headers = HashMap::new();
        headers.insert("x-api-key".to_owned(), "  ".to_owned());
        let r = request("/x?apikey=&apikeyx=1&x=apikey", &headers, &ext);
        assert_eq!(
            presented(r.headers, r.path, &config, false),
            Presented::Nothing
        );
    }
}
