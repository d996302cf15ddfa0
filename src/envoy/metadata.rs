//! The ext_authz dynamic metadata (CONTRACT §4): the one coupling of the Check and usage paths.
//!
//! The Check writes these fields on allow and on deny; Envoy hands them to the access log, whose entries
//! become usage records. Both directions go through [`Field`], so a key is spelt exactly once.

use std::collections::{BTreeMap, HashMap};

use envoy_types::pb::google::protobuf::{Struct, Value, value::Kind};

use crate::check::Verdict;

/// The dynamic-metadata namespace ext_authz writes and the access log reads.
pub const NAMESPACE: &str = "envoy.filters.http.ext_authz";

/// The namespace ext_proc writes what a response body reported into (CONTRACT §11), and the access log reads.
pub const USAGE_NAMESPACE: &str = "tollgate.usage";

/// The key of the ext_authz metadata that carries a token quota's reserve (a number, as a string like every
/// other field), written on allowed calls under a token quota only.
pub const QUOTA_RESERVED: &str = "quota_reserved";

/// Prefix of the keys that carry `metadata_attributes` (`attr_deprecated`).
pub const ATTRIBUTE_PREFIX: &str = "attr_";

/// One metadata field.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Field {
    /// `allow`, `deny`, or `self_service` (tollgate answered the request itself: neither allowed nor denied).
    Decision,
    /// The decision's reason (`allowed`, `quota_exceeded`, …).
    Reason,
    /// The app.
    App,
    /// The developer's e-mail.
    Developer,
    /// The developer's company.
    Company,
    /// The Stripe customer billed for the call.
    StripeCustomer,
    /// The product that covered the call.
    Product,
    /// The operation that covered the call.
    Operation,
    /// The API id.
    Api,
    /// The environment this sidecar serves.
    Environment,
}

impl Field {
    /// Every field, in the order the contract lists them.
    pub const ALL: [Field; 10] = [
        Field::Decision,
        Field::Reason,
        Field::App,
        Field::Developer,
        Field::Company,
        Field::StripeCustomer,
        Field::Product,
        Field::Operation,
        Field::Api,
        Field::Environment,
    ];

    /// The field whose key in the metadata `Struct` is `key`, if any.
    pub fn from_key(key: &str) -> Option<Field> {
        Field::ALL.into_iter().find(|field| field.key() == key)
    }

    /// The field's key in the metadata `Struct`.
    pub fn key(self) -> &'static str {
        match self {
            Field::Decision => "decision",
            Field::Reason => "reason",
            Field::App => "app",
            Field::Developer => "developer",
            Field::Company => "company",
            Field::StripeCustomer => "stripe_customer",
            Field::Product => "product",
            Field::Operation => "operation",
            Field::Api => "api",
            Field::Environment => "environment",
        }
    }
}

/// The string fields of `verdict`'s metadata, in the contract's order (absent ones `None`).
fn values(verdict: &Verdict) -> [(Field, Option<&str>); 10] {
    let id = &verdict.identity;
    [
        (Field::Decision, Some(verdict.reason.decision())),
        (Field::Reason, Some(verdict.reason.as_str())),
        (Field::App, id.app.as_deref()),
        (Field::Developer, id.developer.as_deref()),
        (Field::Company, id.company.as_deref()),
        (Field::StripeCustomer, id.stripe_customer.as_deref()),
        (Field::Product, id.product.as_deref()),
        (Field::Operation, id.operation.as_deref()),
        (Field::Api, verdict.api.as_deref()),
        (Field::Environment, verdict.environment.as_deref()),
    ]
}

/// The metadata of `verdict`.
pub fn write(verdict: &Verdict) -> Struct {
    let string = |value: &str| Value {
        kind: Some(Kind::StringValue(value.to_owned())),
    };
    // Sized up front: collecting a filtered iterator would grow (and rehash) the table three times.
    let mut fields = HashMap::with_capacity(Field::ALL.len() + 1 + verdict.attributes.len());
    for (field, value) in values(verdict) {
        if let Some(value) = value {
            fields.insert(field.key().to_owned(), string(value));
        }
    }
    if verdict.quota_reserved > 0 {
        fields.insert(
            QUOTA_RESERVED.to_owned(),
            string(&verdict.quota_reserved.to_string()),
        );
    }
    for (name, value) in &verdict.attributes {
        fields.insert(format!("{ATTRIBUTE_PREFIX}{name}"), string(value));
    }
    Struct { fields }
}

/// Appends to `key` everything [`write`] reads of `verdict`, unambiguously (each value length-prefixed), so
/// two verdicts with the same key have the same metadata.
pub fn key(verdict: &Verdict, key: &mut Vec<u8>) {
    let mut push = |value: Option<&str>| match value {
        None => key.push(0),
        Some(value) => {
            key.push(1);
            key.extend_from_slice(&value.len().to_le_bytes());
            key.extend_from_slice(value.as_bytes());
        }
    };
    for (_, value) in values(verdict) {
        push(value);
    }
    for (name, value) in &verdict.attributes {
        push(Some(name));
        push(Some(value));
    }
    // After the attributes' pairs (which start with 1) a 0 ends them, then the reserve.
    push(None);
    key.extend_from_slice(&verdict.quota_reserved.to_le_bytes());
}

/// A metadata value as the usage path reads it: a string, a number, or anything else (absent included).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Scalar<'a> {
    /// A `string_value`.
    Text(&'a str),
    /// A `number_value`.
    Number(f64),
    /// No kind, or a null, bool, struct or list.
    Other,
}

impl<'a> Scalar<'a> {
    /// The text, or empty when the value is not a string.
    pub fn text(self) -> &'a str {
        match self {
            Scalar::Text(text) => text,
            _ => "",
        }
    }
}

impl<'a> From<Option<&'a Value>> for Scalar<'a> {
    fn from(value: Option<&'a Value>) -> Self {
        match value.and_then(|v| v.kind.as_ref()) {
            Some(Kind::StringValue(text)) => Scalar::Text(text),
            Some(Kind::NumberValue(n)) => Scalar::Number(*n),
            _ => Scalar::Other,
        }
    }
}

/// The usage values among a `tollgate.usage` struct's `fields` (in wire order: a later entry of a key overrides
/// an earlier one, as in a protobuf map): whole, non-negative numbers; anything else leaves the key out, so the
/// meter reports the value missing rather than a guess.
pub fn read_usage<'a>(
    fields: impl IntoIterator<Item = (&'a str, Scalar<'a>)>,
) -> BTreeMap<String, u64> {
    let mut usage = BTreeMap::new();
    for (key, value) in fields {
        match value {
            Scalar::Number(n) if n >= 0.0 && n.fract() == 0.0 && n <= MAX_EXACT => {
                // Exact: a whole f64 up to 2^53 converts without loss.
                #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
                usage.insert(key.to_owned(), n as u64);
            }
            _ => {
                usage.remove(key);
            }
        }
    }
    usage
}

/// The `tollgate.usage` struct of `usage` (values above 2^53 are clamped: no response reports that many).
pub fn write_usage(usage: &BTreeMap<String, u64>, outcome: &str) -> Struct {
    let mut fields: HashMap<String, Value> = usage
        .iter()
        .map(|(key, &n)| {
            #[allow(clippy::cast_precision_loss)]
            let n = n.min(MAX_EXACT as u64) as f64;
            let value = Value {
                kind: Some(Kind::NumberValue(n)),
            };
            (key.clone(), value)
        })
        .collect();
    fields.insert(
        "outcome".to_owned(),
        Value {
            kind: Some(Kind::StringValue(outcome.to_owned())),
        },
    );
    Struct { fields }
}

/// The largest whole number an f64 holds exactly (2^53).
const MAX_EXACT: f64 = 9_007_199_254_740_992.0;

/// The string value of `field` in `metadata`, empty when it is absent or not a string.
pub fn read(metadata: Option<&Struct>, field: Field) -> String {
    Scalar::from(metadata.and_then(|s| s.fields.get(field.key())))
        .text()
        .to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::check::{Identified, Reason, Upstream};

    #[test]
    fn every_field_written_reads_back() {
        let verdict = Verdict {
            reason: Reason::QuotaExceeded,
            message: String::new(),
            identity: Identified {
                app: Some("app".into()),
                developer: Some("developer".into()),
                company: Some("company".into()),
                stripe_customer: Some("stripe_customer".into()),
                product: Some("product".into()),
                operation: Some("operation".into()),
            },
            api: Some("api".into()),
            environment: Some("environment".into()),
            ratelimit: None,
            retry_after: None,
            credits_remaining: None,
            challenge: None,
            upstream: Upstream::default(),
            attributes: Vec::new(),
            quota_reserved: 0,
            answer: None,
        };
        let metadata = write(&verdict);
        assert_eq!(metadata.fields.len(), Field::ALL.len());
        for field in Field::ALL {
            let expected = match field {
                Field::Decision => "deny",
                Field::Reason => "quota_exceeded",
                other => other.key(),
            };
            assert_eq!(read(Some(&metadata), field), expected, "{field:?}");
        }
    }

    #[test]
    fn listed_attributes_become_attr_fields() {
        let verdict = Verdict {
            reason: Reason::Allowed,
            message: String::new(),
            identity: Identified::default(),
            api: None,
            environment: None,
            ratelimit: None,
            retry_after: None,
            credits_remaining: None,
            challenge: None,
            upstream: Upstream::default(),
            attributes: vec![("deprecated".into(), "true".into())],
            quota_reserved: 0,
            answer: None,
        };
        let metadata = write(&verdict);
        let value = metadata
            .fields
            .get("attr_deprecated")
            .and_then(|v| v.kind.clone());
        assert_eq!(value, Some(Kind::StringValue("true".into())));
    }

    #[test]
    fn absent_names_are_left_out_and_read_as_empty() {
        let verdict = Verdict {
            reason: Reason::MissingCredential,
            message: String::new(),
            identity: Identified::default(),
            api: None,
            environment: None,
            ratelimit: None,
            retry_after: None,
            credits_remaining: None,
            challenge: None,
            upstream: Upstream::default(),
            attributes: Vec::new(),
            quota_reserved: 0,
            answer: None,
        };
        let metadata = write(&verdict);
        assert_eq!(metadata.fields.len(), 2);
        assert_eq!(read(Some(&metadata), Field::App), "");
        assert_eq!(read(None, Field::Decision), "");
    }
}
