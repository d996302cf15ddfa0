//! One response's usage reading, as the ext_proc adapter drives it: whether the call needs its body read at
//! all (a product whose meter or token quota counts a body value), then chunk by chunk what to report.
//!
//! Reports are cumulative: each one replaces the last in Envoy's dynamic metadata, so a stream the client cuts
//! leaves the last report in place for the access log (CONTRACT §11: a cut stream bills what was sent).

use std::collections::BTreeMap;

use super::scan::{Outcome, Scanner};
use super::usage::{INPUT_TOKENS, OUTPUT_TOKENS, RESPONSE_JSON, TOTAL_TOKENS, Usage};
use crate::catalog::{Catalog, MeterValue};

/// What one report says: the values read so far, by meter key, and how the reading went.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Report {
    /// `genai:input_tokens`, …, `response_json:<pointer>` -> value; only the values the body reported.
    pub usage: BTreeMap<String, u64>,
    /// `complete`, `partial`, `missing` or why the body was unreadable.
    pub outcome: Outcome,
}

/// The JSON pointers a call allowed under `product` (operation `operation`) needs read from its response, or
/// `None` when its body need not be read (nothing of the product counts a body value).
pub fn wanted(catalog: &Catalog, product: &str, operation: &str) -> Option<Vec<String>> {
    let product = catalog
        .product_id(product)
        .and_then(|id| catalog.product(id))?;
    let operation = product.operations.iter().find(|o| o.name == operation);
    let quota_counts = match operation {
        Some(op) if op.quota.is_some() => op.quota_tokens.as_ref(),
        _ => product.quota_tokens.as_ref(),
    }
    .map(|t| t.counts.as_str());
    let meter = product.meter.as_ref().and_then(|m| match &m.value {
        MeterValue::Usage(key) => Some(key.as_str()),
        _ => None,
    });
    if meter.is_none() && quota_counts.is_none() {
        return None;
    }
    let mut pointers: Vec<String> = [meter, quota_counts]
        .into_iter()
        .flatten()
        .filter_map(|key| key.strip_prefix(RESPONSE_JSON))
        .map(str::to_owned)
        .collect();
    pointers.dedup();
    Some(pointers)
}

/// The reading of one response body.
pub struct Session {
    scanner: Scanner,
}

impl Session {
    /// A session for a response with these headers, reading `pointers`, holding at most `max_buffer` bytes.
    pub fn new(
        content_type: Option<&str>,
        content_encoding: Option<&str>,
        pointers: &[String],
        max_buffer: usize,
    ) -> Session {
        Session {
            scanner: Scanner::new(content_type, content_encoding, pointers, max_buffer),
        }
    }

    /// Reads one body chunk; `end` is Envoy's `end_of_stream`. Returns a report when the values changed, and
    /// always at the end (with the final outcome).
    pub fn chunk(&mut self, bytes: &[u8], end: bool) -> Option<Report> {
        let changed = self.scanner.feed(bytes);
        if end {
            let outcome = self.scanner.finish();
            return Some(Report {
                usage: values(self.scanner.usage()),
                outcome,
            });
        }
        changed.then(|| Report {
            usage: values(self.scanner.usage()),
            outcome: self.scanner.outcome_so_far(),
        })
    }

    /// How the reading stands if the body stops here (the client went away).
    pub fn outcome_so_far(&self) -> Outcome {
        self.scanner.outcome_so_far()
    }

    /// SSE events skipped because they could not be read.
    pub fn unreadable_events(&self) -> u64 {
        self.scanner.unreadable_events()
    }
}

/// The known values of `usage`, by meter key.
fn values(usage: &Usage) -> BTreeMap<String, u64> {
    let mut out = BTreeMap::new();
    for (key, value) in [
        (INPUT_TOKENS, usage.input_tokens),
        (OUTPUT_TOKENS, usage.output_tokens),
        (TOTAL_TOKENS, usage.total_tokens),
    ] {
        if let Some(v) = value {
            out.insert(key.to_owned(), v);
        }
    }
    for (pointer, v) in &usage.pointers {
        out.insert(format!("{RESPONSE_JSON}{pointer}"), *v);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::catalog::parse;
    use crate::source::Source;

    const CATALOG: &str = "
products:
  - name: llm
    quota: {limit: 5000, unit: day, counts: 'response_json:/usage/total_tokens', reserve: 100}
    operations: [{api: ai, name: chat, paths: [/chat]}]
    meter: {event_name: tokens, value: genai:total_tokens}
  - name: calls
    operations: [{api: ai, name: plain, paths: [/plain]}]
    meter: {event_name: calls, value: calls}
";

    #[test]
    fn only_products_counting_a_body_value_read_bodies() {
        let c = parse(&Source::from_text("c.yaml", CATALOG.to_owned())).unwrap();
        assert_eq!(
            wanted(&c, "llm", "chat"),
            Some(vec!["/usage/total_tokens".to_owned()])
        );
        assert_eq!(wanted(&c, "calls", "plain"), None);
        assert_eq!(wanted(&c, "nope", "x"), None);
    }

    #[test]
    fn a_stream_reports_as_it_goes_and_at_its_end() {
        let mut s = Session::new(Some("text/event-stream"), None, &[], 1 << 20);
        let first = s.chunk(
            b"data: {\"usageMetadata\": {\"promptTokenCount\": 4, \"candidatesTokenCount\": 1, \"totalTokenCount\": 5}}\n\n",
            false,
        );
        let first = first.expect("usage seen");
        assert_eq!(first.usage.get(TOTAL_TOKENS), Some(&5));
        assert_eq!(first.outcome, Outcome::Partial);
        assert_eq!(s.chunk(b": keep-alive\n\n", false), None);
        let last = s.chunk(b"", true).expect("always a final report");
        assert_eq!(last.usage.get(INPUT_TOKENS), Some(&4));
    }
}
