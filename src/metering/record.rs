//! The usage record (one finished HTTP request) and what a product's meter makes of it.
//!
//! The structs double as the spool's wire format (protobuf via `prost`): new fields get new tags, so a spool
//! written by an older tollgate still replays.

use std::collections::BTreeMap;

use crate::catalog::{Catalog, MeterValue, StatusMatch};

/// One HTTP request Envoy finished, as the access log reports it.
#[derive(Clone, PartialEq, prost::Message)]
pub struct UsageRecord {
    /// `x-request-id`: the deduplication key (empty: the record is never deduplicated).
    #[prost(string, tag = "1")]
    pub request_id: String,
    /// When the request started, Unix milliseconds (0: unknown; the record then counts at its arrival).
    #[prost(int64, tag = "2")]
    pub start_ms: i64,
    /// From the first byte received to the last byte sent downstream, microseconds.
    #[prost(uint64, tag = "3")]
    pub duration_us: u64,
    /// ext_authz `decision`: `allow`, `deny`, or empty when ext_authz did not run.
    #[prost(string, tag = "4")]
    pub decision: String,
    /// ext_authz `reason`.
    #[prost(string, tag = "5")]
    pub reason: String,
    /// ext_authz `app`.
    #[prost(string, tag = "6")]
    pub app: String,
    /// ext_authz `developer`.
    #[prost(string, tag = "7")]
    pub developer: String,
    /// ext_authz `company`.
    #[prost(string, tag = "8")]
    pub company: String,
    /// ext_authz `stripe_customer`.
    #[prost(string, tag = "9")]
    pub stripe_customer: String,
    /// ext_authz `product`.
    #[prost(string, tag = "10")]
    pub product: String,
    /// ext_authz `operation`.
    #[prost(string, tag = "11")]
    pub operation: String,
    /// ext_authz `api`.
    #[prost(string, tag = "12")]
    pub api: String,
    /// ext_authz `environment`.
    #[prost(string, tag = "13")]
    pub environment: String,
    /// HTTP status sent downstream (0: none, e.g. the client went away).
    #[prost(uint32, tag = "14")]
    pub response_code: u32,
    /// Request body bytes.
    #[prost(uint64, tag = "15")]
    pub request_bytes: u64,
    /// Response body bytes.
    #[prost(uint64, tag = "16")]
    pub response_bytes: u64,
    /// Response headers Envoy logged (`additional_response_headers_to_log`), lowercase names.
    #[prost(btree_map = "string, string", tag = "17")]
    pub response_headers: BTreeMap<String, String>,
    /// What the response body reported (ext_proc's `tollgate.usage` metadata): `genai:input_tokens`, …,
    /// `response_json:<pointer>`.
    #[prost(btree_map = "string, uint64", tag = "18")]
    pub usage: BTreeMap<String, u64>,
    /// Units a token quota held for this call at the Check (ext_authz `quota_reserved`), settled against
    /// `usage` once.
    #[prost(uint64, tag = "19")]
    pub quota_reserved: u64,
}

impl UsageRecord {
    /// Whether ext_authz allowed the request.
    pub fn allowed(&self) -> bool {
        self.decision == "allow"
    }
}

/// A record as the spool keeps it: the record plus everything replay needs to reach the same totals, decided
/// once at ingest (a later catalog edit or config change does not rewrite history).
#[derive(Clone, PartialEq, prost::Message)]
pub(crate) struct SpooledRecord {
    /// The record.
    #[prost(message, optional, tag = "1")]
    pub record: Option<UsageRecord>,
    /// When the spool writer took it, Unix milliseconds.
    #[prost(int64, tag = "2")]
    pub received_ms: i64,
    /// Start of the window it counts in, Unix milliseconds.
    #[prost(int64, tag = "3")]
    pub window_start_ms: i64,
    /// Length of that window, milliseconds.
    #[prost(int64, tag = "4")]
    pub window_len_ms: i64,
    /// The product meter's event name (empty: the product has no meter or is unknown).
    #[prost(string, tag = "5")]
    pub meter: String,
    /// What the record adds to the meter when billable.
    #[prost(uint64, tag = "6")]
    pub value: u64,
    /// Allowed, metered, and its status matched the meter's success classes.
    #[prost(bool, tag = "7")]
    pub billable: bool,
}

/// One fsynced unit of the spool: the records of one ingest call, all or nothing.
#[derive(Clone, PartialEq, prost::Message)]
pub(crate) struct SpoolBatch {
    /// The records.
    #[prost(message, repeated, tag = "1")]
    pub records: Vec<SpooledRecord>,
}

/// What a product's meter makes of one record.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub(crate) struct Charge {
    /// The meter's event name, or empty.
    pub meter: String,
    /// What the record adds (0 unless billable).
    pub value: u64,
    /// Whether the record counts toward the bill.
    pub billable: bool,
    /// A `response_header:` meter found a missing or non-integer value (counted as 0).
    pub invalid_header: bool,
    /// A `genai:`/`response_json:` meter found no value in the record's usage (counted as 0).
    pub missing_usage: bool,
}

/// Applies the record's product meter: only allowed requests whose status matches a success class count.
pub(crate) fn charge(record: &UsageRecord, catalog: &Catalog) -> Charge {
    let Some(meter) = catalog
        .product_id(&record.product)
        .and_then(|id| catalog.product(id))
        .and_then(|p| p.meter.as_ref())
    else {
        return Charge::default();
    };
    let status = record.response_code;
    let success = meter.success.iter().any(|m| match *m {
        StatusMatch::Class(class) => status / 100 == u32::from(class),
        StatusMatch::Code(code) => status == u32::from(code),
    });
    let mut charge = Charge {
        meter: meter.event_name.clone(),
        ..Charge::default()
    };
    if !(record.allowed() && success) {
        return charge;
    }
    charge.billable = true;
    charge.value = match &meter.value {
        MeterValue::Calls => 1,
        MeterValue::RequestBytes => record.request_bytes,
        MeterValue::ResponseBytes => record.response_bytes,
        MeterValue::ResponseHeader(name) => {
            let parsed = record
                .response_headers
                .iter()
                .find(|(k, _)| k.eq_ignore_ascii_case(name))
                .and_then(|(_, v)| v.trim().parse::<u64>().ok());
            charge.invalid_header = parsed.is_none();
            parsed.unwrap_or(0)
        }
        MeterValue::Usage(key) => {
            let reported = record.usage.get(key).copied();
            charge.missing_usage = reported.is_none();
            reported.unwrap_or(0)
        }
    };
    charge
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::catalog::parse;
    use crate::source::Source;

    const CATALOG: &str = r#"
products:
  - name: calls
    operations: [{api: a, paths: [/]}]
    meter: {event_name: api_calls, value: calls, success: [2xx, 304]}
  - name: tokens
    operations: [{api: a, paths: [/]}]
    meter: {event_name: tokens, value: "response_header:x-tokens", success: [2xx]}
  - name: bytes
    operations: [{api: a, paths: [/]}]
    meter: {event_name: egress, value: response_bytes, success: [2xx]}
  - name: free
    operations: [{api: a, paths: [/]}]
"#;

    fn catalog() -> Catalog {
        parse(&Source::from_text("c.yaml", CATALOG.to_owned())).unwrap()
    }

    fn record(product: &str, decision: &str, status: u32) -> UsageRecord {
        UsageRecord {
            request_id: "r".into(),
            decision: decision.into(),
            product: product.into(),
            response_code: status,
            response_bytes: 512,
            ..Default::default()
        }
    }

    #[test]
    fn only_allowed_requests_with_a_success_status_are_billable() {
        let c = catalog();
        let ok = charge(&record("calls", "allow", 200), &c);
        assert_eq!(
            (ok.meter.as_str(), ok.value, ok.billable),
            ("api_calls", 1, true)
        );
        assert!(charge(&record("calls", "allow", 304), &c).billable);
        assert!(!charge(&record("calls", "allow", 302), &c).billable);
        assert!(!charge(&record("calls", "allow", 503), &c).billable);
        let denied = charge(&record("calls", "deny", 200), &c);
        assert_eq!(
            (denied.meter.as_str(), denied.value, denied.billable),
            ("api_calls", 0, false)
        );
        assert_eq!(charge(&record("free", "allow", 200), &c), Charge::default());
        assert_eq!(charge(&record("", "allow", 200), &c), Charge::default());
    }

    #[test]
    fn byte_and_header_meters_read_the_record() {
        let c = catalog();
        assert_eq!(charge(&record("bytes", "allow", 200), &c).value, 512);
        let mut r = record("tokens", "allow", 200);
        r.response_headers.insert("X-Tokens".into(), " 42 ".into());
        let ok = charge(&r, &c);
        assert_eq!((ok.value, ok.invalid_header), (42, false));
        r.response_headers.insert("X-Tokens".into(), "4.5".into());
        let bad = charge(&r, &c);
        assert_eq!(
            (bad.value, bad.billable, bad.invalid_header),
            (0, true, true)
        );
        let missing = charge(&record("tokens", "allow", 200), &c);
        assert!(missing.invalid_header);
    }
}
