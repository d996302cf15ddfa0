//! What a verified token says about its caller, read through the provider's claim names.

use std::sync::Arc;

use serde_json::{Map, Value};

use super::config::ClaimNames;

/// What a provider lets its tokens decide beyond who the caller is.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Trust {
    /// `portal_tokens`.
    pub(crate) portal: bool,
    /// `stripe_customer_from_token`.
    pub(crate) stripe_customer: bool,
}

/// What a valid token says about its caller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifiedToken {
    /// Name of the provider that issued and verified it.
    pub provider: Arc<str>,
    /// The `sub` claim.
    pub subject: Option<String>,
    /// The developer claim (`claims.developer`, default `sub`).
    pub developer: Option<String>,
    /// The app claim (`claims.app`, default `client_id`): matched against catalog apps' `client_id`.
    pub app: Option<String>,
    /// The company claim (`claims.company`, default `org_id`).
    pub company: Option<String>,
    /// Products the token itself entitles (`claims.products`: array, or space/comma-separated string).
    pub products: Vec<String>,
    /// Scopes (`claims.scope`: space-separated string or array).
    pub scopes: Vec<String>,
    /// Stripe customer id (`claims.stripe_customer`), kept only from providers with
    /// `stripe_customer_from_token: true`.
    pub stripe_customer: Option<String>,
    /// Whether the provider issues portal tokens (`portal_tokens: true`): only then may a token that names no
    /// catalog app be entitled by its products claim.
    pub portal: bool,
    /// The `exp` claim, Unix seconds.
    pub expires_at: i64,
}

impl VerifiedToken {
    /// Reads a verified claims set; `exp` has been checked by then.
    pub(crate) fn from_claims(
        provider: Arc<str>,
        trust: Trust,
        names: &ClaimNames,
        claims: &Map<String, Value>,
    ) -> Self {
        let text = |name: &str| claims.get(name).and_then(as_text);
        Self {
            provider,
            subject: text("sub"),
            developer: text(&names.developer),
            app: text(&names.app),
            company: text(&names.company),
            products: claims
                .get(&names.products)
                .map(|v| as_list(v, &[' ', ',']))
                .unwrap_or_default(),
            scopes: claims
                .get(&names.scope)
                .map(|v| as_list(v, &[' ']))
                .unwrap_or_default(),
            stripe_customer: text(&names.stripe_customer).filter(|_| trust.stripe_customer),
            portal: trust.portal,
            expires_at: claims.get("exp").and_then(as_seconds).unwrap_or(0),
        }
    }
}

/// A string claim; numeric ids are accepted as their decimal text; empty strings count as absent.
fn as_text(value: &Value) -> Option<String> {
    match value {
        Value::String(s) if !s.is_empty() => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

/// A list claim: an array of strings, or one string split on `separators` (whitespace always splits).
fn as_list(value: &Value, separators: &[char]) -> Vec<String> {
    let split = |s: &str| -> Vec<String> {
        s.split(|c: char| c.is_whitespace() || separators.contains(&c))
            .filter(|part| !part.is_empty())
            .map(str::to_owned)
            .collect()
    };
    match value {
        Value::String(s) => split(s),
        Value::Array(items) => items
            .iter()
            .filter_map(Value::as_str)
            .flat_map(split)
            .collect(),
        _ => Vec::new(),
    }
}

/// A NumericDate claim in whole seconds (fractions floored).
pub(crate) fn as_seconds(value: &Value) -> Option<i64> {
    value
        .as_i64()
        .or_else(|| value.as_u64().map(|v| i64::try_from(v).unwrap_or(i64::MAX)))
        .or_else(|| {
            // Floor so that a fractional exp never extends the cache past the real expiry.
            value
                .as_f64()
                .filter(|f| f.is_finite())
                .map(|f| f.floor() as i64)
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn read(claims: Value, names: &ClaimNames) -> VerifiedToken {
        let trust = Trust {
            portal: false,
            stripe_customer: true,
        };
        VerifiedToken::from_claims(Arc::from("p"), trust, names, claims.as_object().unwrap())
    }

    #[test]
    fn the_stripe_customer_claim_counts_only_when_the_provider_says_so() {
        let claims = json!({"sub": "dev", "stripe_customer": "cus_1", "exp": 1999999999});
        let claims = claims.as_object().unwrap();
        let names = ClaimNames::default();
        let distrusted =
            VerifiedToken::from_claims(Arc::from("p"), Trust::default(), &names, claims);
        assert_eq!(distrusted.stripe_customer, None);
        assert!(!distrusted.portal);
        let trust = Trust {
            portal: true,
            stripe_customer: true,
        };
        let trusted = VerifiedToken::from_claims(Arc::from("p"), trust, &names, claims);
        assert_eq!(trusted.stripe_customer.as_deref(), Some("cus_1"));
        assert!(trusted.portal);
    }

    #[test]
    fn default_names() {
        let t = read(
            json!({"sub": "dev", "client_id": "app", "org_id": 42, "api_products": ["a", "b"],
                   "scope": "read  write", "stripe_customer": "cus_1", "exp": 1999999999}),
            &ClaimNames::default(),
        );
        assert_eq!(t.subject.as_deref(), Some("dev"));
        assert_eq!(t.developer.as_deref(), Some("dev"));
        assert_eq!(t.app.as_deref(), Some("app"));
        assert_eq!(t.company.as_deref(), Some("42"));
        assert_eq!(t.products, ["a", "b"]);
        assert_eq!(t.scopes, ["read", "write"]);
        assert_eq!(t.stripe_customer.as_deref(), Some("cus_1"));
        assert_eq!(t.expires_at, 1999999999);
    }

    #[test]
    fn custom_names_and_shapes() {
        let names = ClaimNames {
            app: "azp".into(),
            developer: "email".into(),
            company: "tenant".into(),
            products: "plans".into(),
            scope: "scp".into(),
            stripe_customer: "cus".into(),
        };
        let t = read(
            json!({"sub": "s", "azp": "portal-app", "email": "n@t.com", "tenant": "", "plans": "gold,silver bronze",
                   "scp": ["read", "write"], "client_id": "ignored", "exp": 1999999999.7}),
            &names,
        );
        assert_eq!(t.app.as_deref(), Some("portal-app"));
        assert_eq!(t.developer.as_deref(), Some("n@t.com"));
        assert_eq!(t.company, None);
        assert_eq!(t.products, ["gold", "silver", "bronze"]);
        assert_eq!(t.scopes, ["read", "write"]);
        assert_eq!(t.stripe_customer, None);
        assert_eq!(t.expires_at, 1999999999);
    }

    #[test]
    fn wrong_types_are_ignored() {
        let t = read(
            json!({"client_id": {"x": 1}, "scope": 7, "api_products": [1, "ok"]}),
            &ClaimNames::default(),
        );
        assert_eq!(t.app, None);
        assert!(t.scopes.is_empty());
        assert_eq!(t.products, ["ok"]);
    }
}
