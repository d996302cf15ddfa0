//! The JSON Apigee's management API and apigeecli write, as serde types: lenient where Edge and X differ.
//!
//! Edge writes numbers as strings (`"quota": "1000"`, sometimes `"null"`), X writes int64 as strings too
//! (`"expiresAt": "-1"`), other tools write numbers: [`Scalar`] takes all of them. Lists may be `null`, and
//! a list of names may come as one comma-separated string. Fields tollgate does not read land in `other`,
//! so the conversion can name them instead of dropping them silently; their values are never printed.

use std::collections::BTreeMap;
use std::fmt;

use serde::Deserialize;
use serde::de::{self, Deserializer, IgnoredAny};
use serde_json::Value;

/// An API product (`apiproducts?expand=true` → `{"apiProduct": [...]}`).
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ApiProduct {
    /// The product's name, what apps and credentials refer to.
    pub name: String,
    /// Its human name.
    #[serde(default)]
    pub display_name: Option<String>,
    /// `auto` or `manual`.
    #[serde(default)]
    pub approval_type: Option<String>,
    /// Custom attributes, Apigee's bookkeeping ones (`access`) and the Envoy adapter's targets among them.
    #[serde(default, deserialize_with = "list")]
    pub attributes: Vec<Attribute>,
    /// Edge (legacy) resource paths, relative to each proxy's base path.
    #[serde(default, deserialize_with = "names")]
    pub api_resources: Vec<String>,
    /// Edge (legacy) API proxies.
    #[serde(default, deserialize_with = "names")]
    pub proxies: Vec<String>,
    /// Environments the product is bound to.
    #[serde(default, deserialize_with = "names")]
    pub environments: Vec<String>,
    /// OAuth scopes.
    #[serde(default, deserialize_with = "names")]
    pub scopes: Vec<String>,
    /// Product quota: calls per interval.
    #[serde(default)]
    pub quota: Scalar,
    /// Product quota: the interval, in time units.
    #[serde(default)]
    pub quota_interval: Scalar,
    /// Product quota: the time unit.
    #[serde(default)]
    pub quota_time_unit: Scalar,
    /// X (and Edge with operations): API sources with their resources, methods and quotas.
    #[serde(default)]
    pub operation_group: Option<OperationGroup>,
    /// Every other field, by name.
    #[serde(flatten)]
    pub other: BTreeMap<String, Value>,
}

/// `operationGroup` of a product.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct OperationGroup {
    /// `proxy` (API proxies) or `remoteservice` (Envoy targets).
    #[serde(default)]
    pub operation_config_type: Option<String>,
    /// The groups of operations.
    #[serde(default, deserialize_with = "list")]
    pub operation_configs: Vec<OperationConfig>,
    /// Every other field, by name.
    #[serde(flatten)]
    pub other: BTreeMap<String, Value>,
}

/// One `operationConfig`: an API source, its operations, and optionally a quota they share.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct OperationConfig {
    /// The API proxy or remote service target.
    #[serde(default)]
    pub api_source: String,
    /// Resource and method pairs.
    #[serde(default, deserialize_with = "list")]
    pub operations: Vec<Operation>,
    /// A quota of its own (one counter for all its operations).
    #[serde(default)]
    pub quota: Option<Quota>,
    /// Custom attributes of the group.
    #[serde(default, deserialize_with = "list")]
    pub attributes: Vec<Attribute>,
    /// Every other field, by name.
    #[serde(flatten)]
    pub other: BTreeMap<String, Value>,
}

/// One resource with its methods (none: every method).
#[derive(Debug, Deserialize)]
pub struct Operation {
    /// The resource path (relative to the proxy's base path).
    #[serde(default)]
    pub resource: String,
    /// HTTP methods; empty means every method.
    #[serde(default, deserialize_with = "names")]
    pub methods: Vec<String>,
}

/// An operationConfig's quota.
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Quota {
    /// Calls per interval.
    #[serde(default)]
    pub limit: Scalar,
    /// The interval, in time units.
    #[serde(default)]
    pub interval: Scalar,
    /// The time unit.
    #[serde(default)]
    pub time_unit: Scalar,
}

/// A `{name, value}` custom attribute.
#[derive(Debug, Deserialize)]
pub struct Attribute {
    /// The attribute's name.
    #[serde(default)]
    pub name: String,
    /// Its value (absent: empty).
    #[serde(default)]
    pub value: Scalar,
}

/// A developer (`developers?expand=true` → `{"developer": [...]}`).
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Developer {
    /// The developer's email, unique in the organization.
    pub email: String,
    /// The id apps refer to.
    #[serde(default)]
    pub developer_id: Option<String>,
    /// `active` or `inactive`.
    #[serde(default)]
    pub status: Option<String>,
    /// The developer's company, where the export names one.
    #[serde(default)]
    pub company_name: Option<String>,
    /// Edge: the companies the developer belongs to.
    #[serde(default, deserialize_with = "names")]
    pub companies: Vec<String>,
    /// Custom attributes (monetization ones among them).
    #[serde(default, deserialize_with = "list")]
    pub attributes: Vec<Attribute>,
    /// Every other field, by name.
    #[serde(flatten)]
    pub other: BTreeMap<String, Value>,
}

/// An Edge company (`companies?expand=true` → `{"company": [...]}`).
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Company {
    /// The company's name, what its apps' `companyName` holds.
    pub name: String,
    /// `active` or `inactive`.
    #[serde(default)]
    pub status: Option<String>,
    /// Custom attributes (monetization ones among them).
    #[serde(default, deserialize_with = "list")]
    pub attributes: Vec<Attribute>,
    /// Every other field, by name.
    #[serde(flatten)]
    pub other: BTreeMap<String, Value>,
}

/// An app (`apps?expand=true` → `{"app": [...]}`), owned by a developer, a company or (X) an app group.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct App {
    /// The app's name, unique per owner.
    pub name: String,
    /// The owning developer's id.
    #[serde(default)]
    pub developer_id: Option<String>,
    /// The owning developer's email (some Edge exports).
    #[serde(default)]
    pub developer_email: Option<String>,
    /// The owning company (Edge company apps).
    #[serde(default)]
    pub company_name: Option<String>,
    /// The owning app group (X's successor of companies).
    #[serde(default)]
    pub app_group: Option<String>,
    /// `approved` or `revoked`.
    #[serde(default)]
    pub status: Option<String>,
    /// The app's keys.
    #[serde(default, deserialize_with = "list")]
    pub credentials: Vec<Credential>,
    /// Custom attributes.
    #[serde(default, deserialize_with = "list")]
    pub attributes: Vec<Attribute>,
    /// OAuth scopes of the app.
    #[serde(default, deserialize_with = "names")]
    pub scopes: Vec<String>,
    /// Every other field, by name.
    #[serde(flatten)]
    pub other: BTreeMap<String, Value>,
}

/// One key of an app, with the products it may use.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Credential {
    /// The API key. Only ever hashed: never printed, never written.
    #[serde(default)]
    pub consumer_key: Option<Secret>,
    /// Read and dropped here so it can never reach `other` (or a message).
    #[serde(default)]
    #[allow(dead_code)]
    consumer_secret: IgnoredAny,
    /// Milliseconds since the epoch; -1 (or absent) is never.
    #[serde(default)]
    pub expires_at: Scalar,
    /// `approved` or `revoked`.
    #[serde(default)]
    pub status: Option<String>,
    /// The products this key may use, each with its own status.
    #[serde(default, deserialize_with = "list")]
    pub api_products: Vec<CredentialProduct>,
    /// OAuth scopes of the key.
    #[serde(default, deserialize_with = "names")]
    pub scopes: Vec<String>,
    /// Custom attributes.
    #[serde(default, deserialize_with = "list")]
    pub attributes: Vec<Attribute>,
    /// Every other field, by name.
    #[serde(flatten)]
    pub other: BTreeMap<String, Value>,
}

/// A credential's product and its status for that key.
#[derive(Debug, Deserialize)]
pub struct CredentialProduct {
    /// The product's name.
    #[serde(alias = "apiProduct", alias = "name")]
    pub apiproduct: String,
    /// `approved`, `pending` or `revoked`.
    #[serde(default)]
    pub status: Option<String>,
}

/// A secret read from the input: its Debug never shows it, and it has no Display.
#[derive(Clone, Deserialize, PartialEq, Eq)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    /// The secret itself, for hashing.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(…)")
    }
}

/// A scalar Apigee writes as a string or a number; `null`, `"null"` and blank text are absent.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Scalar(Option<String>);

impl Scalar {
    /// The value as text (trimmed), or `None` when absent.
    pub fn text(&self) -> Option<&str> {
        self.0.as_deref()
    }

    #[cfg(test)]
    pub(crate) fn of(text: &str) -> Scalar {
        Scalar(Some(text.to_owned()))
    }
}

impl<'de> Deserialize<'de> for Scalar {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        match Value::deserialize(deserializer)? {
            Value::Null => Ok(Scalar(None)),
            Value::String(s) => {
                let t = s.trim();
                if t.is_empty() || t == "null" {
                    Ok(Scalar(None))
                } else {
                    Ok(Scalar(Some(t.to_owned())))
                }
            }
            Value::Number(n) => Ok(Scalar(Some(n.to_string()))),
            Value::Bool(b) => Ok(Scalar(Some(b.to_string()))),
            Value::Array(_) | Value::Object(_) => Err(de::Error::custom(
                "expected a string or a number, found a list or an object",
            )),
        }
    }
}

/// A list that may be `null`.
fn list<'de, D, T>(deserializer: D) -> Result<Vec<T>, D::Error>
where
    D: Deserializer<'de>,
    T: Deserialize<'de>,
{
    Ok(Option::<Vec<T>>::deserialize(deserializer)?.unwrap_or_default())
}

/// A list of names: a JSON list (null entries skipped), one comma-separated string, or `null`.
fn names<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Vec<String>, D::Error> {
    match Value::deserialize(deserializer)? {
        Value::Null => Ok(Vec::new()),
        Value::String(s) => Ok(s.split(',').map(|n| n.trim().to_owned()).collect()),
        Value::Array(items) => items
            .into_iter()
            .filter(|v| !v.is_null())
            .map(|v| match v {
                Value::String(s) => Ok(s),
                Value::Number(n) => Ok(n.to_string()),
                _ => Err(de::Error::custom("expected a list of names")),
            })
            .collect(),
        _ => Err(de::Error::custom("expected a list of names")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn edge_strings_and_x_numbers_both_read() {
        let edge: ApiProduct = serde_json::from_str(
            r#"{"name": "p", "quota": "1000", "quotaInterval": "null", "quotaTimeUnit": " month ",
                "scopes": [""], "proxies": null, "apiResources": "/a, /b"}"#,
        )
        .unwrap();
        assert_eq!(edge.quota.text(), Some("1000"));
        assert_eq!(edge.quota_interval.text(), None);
        assert_eq!(edge.quota_time_unit.text(), Some("month"));
        assert_eq!(edge.scopes, vec![""]);
        assert!(edge.proxies.is_empty());
        assert_eq!(edge.api_resources, vec!["/a", "/b"]);
        let x: Quota =
            serde_json::from_str(r#"{"limit": 5, "interval": 1, "timeUnit": "minute"}"#).unwrap();
        assert_eq!(x.limit.text(), Some("5"));
        assert!(serde_json::from_str::<Quota>(r#"{"limit": [1]}"#).is_err());
    }

    #[test]
    fn secrets_never_show_in_debug_and_unknown_fields_are_kept_by_name() {
        let c: Credential = serde_json::from_str(
            r#"{"consumerKey": "k-123", "consumerSecret": "s-456", "issuedAt": "1"}"#,
        )
        .unwrap();
        let shown = format!("{c:?}");
        assert!(
            !shown.contains("k-123") && !shown.contains("s-456"),
            "{shown}"
        );
        assert_eq!(c.consumer_key.as_ref().map(Secret::expose), Some("k-123"));
        assert_eq!(c.other.keys().collect::<Vec<_>>(), vec!["issuedAt"]);
    }
}
