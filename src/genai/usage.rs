//! The usage shapes: where each provider writes its token counts in one JSON document, and how the documents
//! of a body fold into one [`Usage`] (the latest reported value of each field wins).
//!
//! Two readers give the same [`Parts`]: [`read_parts`] walks the document with a visitor that keeps only the
//! four usage carriers and skips everything else unallocated (the per-event path of a stream without
//! `response_json` pointers), [`read_document`] builds the whole `serde_json::Value` because pointers can
//! name any field. Both end in [`parts_of`], so the shapes are written once.

use std::collections::BTreeMap;
use std::fmt;

use serde::de::{self, DeserializeSeed, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde_json::{Map, Value};

/// The meter value of the input tokens (CONTRACT §11).
pub const INPUT_TOKENS: &str = "genai:input_tokens";
/// The meter value of the output tokens.
pub const OUTPUT_TOKENS: &str = "genai:output_tokens";
/// The meter value of the total tokens.
pub const TOTAL_TOKENS: &str = "genai:total_tokens";
/// The prefix of a meter value read at a JSON pointer: `response_json:/usage/total_tokens`.
pub const RESPONSE_JSON: &str = "response_json:";

/// The JSON pointer of a `response_json:<pointer>` meter value, `None` for any other meter value.
pub fn response_json_pointer(meter: &str) -> Option<&str> {
    meter.strip_prefix(RESPONSE_JSON)
}

/// Whether a meter value is read from the response body (a `genai:` count or a `response_json:` pointer).
pub fn is_body_meter(meter: &str) -> bool {
    matches!(meter, INPUT_TOKENS | OUTPUT_TOKENS | TOTAL_TOKENS) || meter.starts_with(RESPONSE_JSON)
}

/// What a response body said about usage so far.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Usage {
    /// Billed input tokens (see the module doc for what each provider's figure includes).
    pub input_tokens: Option<u64>,
    /// Billed output tokens, reasoning and thinking included.
    pub output_tokens: Option<u64>,
    /// The reported total, else input + output when both are known.
    pub total_tokens: Option<u64>,
    /// `response_json` pointer (without the prefix) -> the latest non-negative integer found there.
    pub pointers: BTreeMap<String, u64>,
}

impl Usage {
    /// The value for a meter key: `genai:input_tokens` | `genai:output_tokens` | `genai:total_tokens` |
    /// `response_json:/ptr`; `None` when the body did not say (the record then counts 0).
    pub fn get(&self, key: &str) -> Option<u64> {
        match key {
            INPUT_TOKENS => self.input_tokens,
            OUTPUT_TOKENS => self.output_tokens,
            TOTAL_TOKENS => self.total_tokens,
            _ => response_json_pointer(key).and_then(|p| self.pointers.get(p).copied()),
        }
    }

    /// Whether nothing at all is known.
    pub fn is_empty(&self) -> bool {
        self.input_tokens.is_none()
            && self.output_tokens.is_none()
            && self.total_tokens.is_none()
            && self.pointers.is_empty()
    }
}

/// The provider fields one document (or a whole body, merged) reported. Kept apart rather than summed at
/// once because streams report them in different events: Anthropic sends the cache counts in
/// `message_start` and may send only `output_tokens` in `message_delta`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Parts {
    /// `prompt_tokens` | `input_tokens` | `promptTokenCount`.
    pub input: Option<u64>,
    /// Anthropic `cache_creation_input_tokens` (not part of its `input_tokens`).
    pub cache_creation: Option<u64>,
    /// Anthropic `cache_read_input_tokens` (not part of its `input_tokens`).
    pub cache_read: Option<u64>,
    /// Gemini `toolUsePromptTokenCount` (not part of `promptTokenCount`, part of `totalTokenCount`).
    pub tool_use_prompt: Option<u64>,
    /// `completion_tokens` | `output_tokens` | `candidatesTokenCount`.
    pub output: Option<u64>,
    /// Gemini `thoughtsTokenCount` (not part of `candidatesTokenCount`, billed as output).
    pub thoughts: Option<u64>,
    /// `total_tokens` | `totalTokenCount`.
    pub total: Option<u64>,
}

impl Parts {
    /// Whether the document reported no count at all.
    pub(crate) fn is_empty(&self) -> bool {
        *self == Parts::default()
    }

    /// Takes every field `newer` reported; the others keep their earlier value (stream counts are cumulative).
    pub(crate) fn merge(&mut self, newer: &Parts) {
        fn take(old: &mut Option<u64>, new: Option<u64>) {
            if new.is_some() {
                *old = new;
            }
        }
        take(&mut self.input, newer.input);
        take(&mut self.cache_creation, newer.cache_creation);
        take(&mut self.cache_read, newer.cache_read);
        take(&mut self.tool_use_prompt, newer.tool_use_prompt);
        take(&mut self.output, newer.output);
        take(&mut self.thoughts, newer.thoughts);
        take(&mut self.total, newer.total);
    }

    /// Billed input: the prompt plus the input counts the provider reports beside it.
    pub(crate) fn input_tokens(&self) -> Option<u64> {
        sum_reported(&[
            self.input,
            self.cache_creation,
            self.cache_read,
            self.tool_use_prompt,
        ])
    }

    /// Billed output: the candidates plus Gemini's thoughts.
    pub(crate) fn output_tokens(&self) -> Option<u64> {
        sum_reported(&[self.output, self.thoughts])
    }

    /// The reported total, else input + output when both are known.
    pub(crate) fn total_tokens(&self) -> Option<u64> {
        self.total
            .or_else(|| self.input_tokens()?.checked_add(self.output_tokens()?))
    }
}

/// The sum of the reported values, `None` when none was reported or the sum overflows (a count that large
/// is not a count; billing a saturated value would be a guess).
fn sum_reported(values: &[Option<u64>]) -> Option<u64> {
    let mut sum = None;
    for value in values.iter().flatten() {
        sum = Some(match sum {
            None => *value,
            Some(acc) => u64::checked_add(acc, *value)?,
        });
    }
    sum
}

/// A JSON value as a token count: a non-negative integer, also written as a float with no fraction
/// (`12.0`) or a string of ASCII digits (`"12"`, how proto3 JSON writes 64-bit integers). `Ok(None)` for
/// `null` (no value); `Err` for anything else (negative, fractional, other strings, booleans, containers).
pub(crate) fn count_of(value: &Value) -> Result<Option<u64>, ()> {
    match value {
        Value::Null => Ok(None),
        Value::Number(n) => {
            if let Some(u) = n.as_u64() {
                return Ok(Some(u));
            }
            match n.as_f64() {
                // 2^64 is exactly representable; every finite f64 below it with no fraction fits a u64.
                Some(f) if f >= 0.0 && f.fract() == 0.0 && f < 18_446_744_073_709_551_616.0 => {
                    Ok(Some(f as u64))
                }
                _ => Err(()),
            }
        }
        Value::String(s) if !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()) => {
            s.parse::<u64>().map(Some).map_err(|_| ())
        }
        _ => Err(()),
    }
}

/// A provider field: its count, or `None` when absent, `null` or not a count.
fn field(object: &Map<String, Value>, name: &str) -> Option<u64> {
    object.get(name).and_then(|v| count_of(v).ok().flatten())
}

/// The `usage` object of OpenAI chat completions (`prompt_tokens`, `completion_tokens`, `total_tokens`),
/// OpenAI responses and Anthropic messages (`input_tokens`, `output_tokens`, `total_tokens` for OpenAI,
/// Anthropic's two cache counts).
fn usage_fields(usage: &Map<String, Value>) -> Parts {
    Parts {
        input: field(usage, "prompt_tokens").or_else(|| field(usage, "input_tokens")),
        cache_creation: field(usage, "cache_creation_input_tokens"),
        cache_read: field(usage, "cache_read_input_tokens"),
        tool_use_prompt: None,
        output: field(usage, "completion_tokens").or_else(|| field(usage, "output_tokens")),
        thoughts: None,
        total: field(usage, "total_tokens"),
    }
}

/// Gemini's `usageMetadata`.
fn gemini_fields(meta: &Map<String, Value>) -> Parts {
    Parts {
        input: field(meta, "promptTokenCount"),
        cache_creation: None,
        cache_read: None,
        tool_use_prompt: field(meta, "toolUsePromptTokenCount"),
        output: field(meta, "candidatesTokenCount"),
        thoughts: field(meta, "thoughtsTokenCount"),
        total: field(meta, "totalTokenCount"),
    }
}

/// The parts of one document from its four carriers: `response.usage` (OpenAI responses stream events),
/// `message.usage` (Anthropic `message_start`), `usage` (every other OpenAI and Anthropic body and event),
/// `usageMetadata` (Gemini). A carrier that is `null` or not an object says nothing.
fn parts_of(
    response_usage: Option<&Value>,
    message_usage: Option<&Value>,
    usage: Option<&Value>,
    usage_metadata: Option<&Value>,
) -> Parts {
    let mut parts = Parts::default();
    for carrier in [response_usage, message_usage, usage].into_iter().flatten() {
        if let Value::Object(object) = carrier {
            parts.merge(&usage_fields(object));
        }
    }
    if let Some(Value::Object(meta)) = usage_metadata {
        parts.merge(&gemini_fields(meta));
    }
    parts
}

/// Whether a delta field carries something sent: a non-empty string or array.
fn says(value: Option<&Value>) -> bool {
    match value {
        Some(Value::String(s)) => !s.is_empty(),
        Some(Value::Array(items)) => !items.is_empty(),
        _ => false,
    }
}

/// The content deltas one stream event sent (see [`Reading::deltas`]): OpenAI responses' `*.delta` events
/// (a string `delta`), Anthropic's `content_block_delta` (a `delta` with `text`, `partial_json` or `thinking`;
/// a `signature_delta` or the `message_delta`'s stop reason send no tokens), and each OpenAI chat choice
/// whose `delta` has `content`, `refusal`, `reasoning_content` or tool-call `arguments`.
fn deltas_of(delta: Option<&Value>, choices: Option<&Value>) -> u64 {
    let top = match delta {
        Some(Value::String(s)) => !s.is_empty(),
        Some(Value::Object(d)) => ["text", "partial_json", "thinking"]
            .iter()
            .any(|k| says(d.get(*k))),
        _ => false,
    };
    let Some(Value::Array(choices)) = choices else {
        return u64::from(top);
    };
    let chosen = choices
        .iter()
        .filter_map(|choice| choice.get("delta")?.as_object())
        .filter(|d| {
            ["content", "refusal", "reasoning_content"]
                .iter()
                .any(|k| says(d.get(*k)))
                || d.get("tool_calls")
                    .and_then(Value::as_array)
                    .is_some_and(|calls| {
                        calls
                            .iter()
                            .any(|c| says(c.get("function").and_then(|f| f.get("arguments"))))
                    })
        })
        .count();
    u64::from(top).saturating_add(u64::try_from(chosen).unwrap_or(u64::MAX))
}

/// The parts of a parsed document. A top-level array is a sequence of documents, latest wins (Gemini's
/// `streamGenerateContent` without `alt=sse` answers a JSON array of cumulative responses); arrays are
/// followed one level only.
fn parts_of_value(value: &Value, in_array: bool) -> Parts {
    match value {
        Value::Object(object) => parts_of(
            object.get("response").and_then(|r| r.get("usage")),
            object.get("message").and_then(|m| m.get("usage")),
            object.get("usage"),
            object.get("usageMetadata"),
        ),
        Value::Array(items) if !in_array => {
            let mut parts = Parts::default();
            for item in items {
                parts.merge(&parts_of_value(item, true));
            }
            parts
        }
        _ => Parts::default(),
    }
}

/// What one document said: the provider parts and the `response_json` pointer values.
#[derive(Debug, Default)]
pub(crate) struct Reading {
    /// The provider fields.
    pub parts: Parts,
    /// (index into the scanner's pointers, value) for each pointer that held a count.
    pub values: Vec<(usize, u64)>,
    /// Pointers that held something other than a count or `null`.
    pub bad_pointers: u64,
    /// Content deltas the document sent to the client (stream events; a whole body has none), each carrying
    /// at least one output token (the floor of a stream whose provider did not report its output).
    pub deltas: u64,
}

/// Reads the provider parts of one document without building it (no pointers to answer).
pub(crate) fn read_parts(json: &str) -> Result<Reading, serde_json::Error> {
    let mut de = serde_json::Deserializer::from_str(json);
    let (parts, deltas) = Doc { in_array: false }.deserialize(&mut de)?;
    de.end()?;
    Ok(Reading {
        parts,
        deltas,
        ..Reading::default()
    })
}

/// Reads one document whole: the provider parts and every pointer (RFC 6901, `Value::pointer`).
pub(crate) fn read_document(json: &str, pointers: &[String]) -> Result<Reading, serde_json::Error> {
    let value: Value = serde_json::from_str(json)?;
    let mut reading = Reading {
        parts: parts_of_value(&value, false),
        deltas: match &value {
            Value::Object(object) => deltas_of(object.get("delta"), object.get("choices")),
            _ => 0,
        },
        ..Reading::default()
    };
    for (index, pointer) in pointers.iter().enumerate() {
        match value.pointer(pointer).map(count_of) {
            None | Some(Ok(None)) => {}
            Some(Ok(Some(count))) => reading.values.push((index, count)),
            Some(Err(())) => reading.bad_pointers += 1,
        }
    }
    Ok(reading)
}

/// The keys the visitor keeps; every other key's value is skipped with `IgnoredAny`.
enum Key {
    Usage,
    UsageMetadata,
    Response,
    Message,
    Delta,
    Choices,
    Other,
}

impl<'de> de::Deserialize<'de> for Key {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Key, D::Error> {
        struct KeyVisitor;
        impl Visitor<'_> for KeyVisitor {
            type Value = Key;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("an object key")
            }
            fn visit_str<E: de::Error>(self, key: &str) -> Result<Key, E> {
                Ok(match key {
                    "usage" => Key::Usage,
                    "usageMetadata" => Key::UsageMetadata,
                    "response" => Key::Response,
                    "message" => Key::Message,
                    "delta" => Key::Delta,
                    "choices" => Key::Choices,
                    _ => Key::Other,
                })
            }
        }
        deserializer.deserialize_identifier(KeyVisitor)
    }
}

/// Accepts a scalar of any type as "no usage here": a document or carrier of an unexpected type is valid
/// JSON that says nothing, not an error (the `Value` reader sees it the same way).
macro_rules! scalars_say_nothing {
    ($value:expr) => {
        fn visit_bool<E: de::Error>(self, _: bool) -> Result<Self::Value, E> {
            Ok($value)
        }
        fn visit_i64<E: de::Error>(self, _: i64) -> Result<Self::Value, E> {
            Ok($value)
        }
        fn visit_u64<E: de::Error>(self, _: u64) -> Result<Self::Value, E> {
            Ok($value)
        }
        fn visit_f64<E: de::Error>(self, _: f64) -> Result<Self::Value, E> {
            Ok($value)
        }
        fn visit_str<E: de::Error>(self, _: &str) -> Result<Self::Value, E> {
            Ok($value)
        }
        fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
            Ok($value)
        }
    };
}

/// One document (or, at the top, an array of them) read into [`Parts`] and its content deltas.
struct Doc {
    in_array: bool,
}

impl<'de> DeserializeSeed<'de> for Doc {
    type Value = (Parts, u64);
    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<(Parts, u64), D::Error> {
        deserializer.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Doc {
    type Value = (Parts, u64);

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a JSON document")
    }

    scalars_say_nothing!((Parts::default(), 0));

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(Parts, u64), A::Error> {
        let (mut response, mut message, mut usage, mut meta) = (None, None, None, None);
        let (mut delta, mut choices) = (None, None);
        // Duplicate keys: the last one wins, as in serde_json's `Value`.
        while let Some(key) = map.next_key::<Key>()? {
            match key {
                Key::Usage => usage = Some(map.next_value::<Value>()?),
                Key::UsageMetadata => meta = Some(map.next_value::<Value>()?),
                Key::Response => response = map.next_value::<Nested>()?.0,
                Key::Message => message = map.next_value::<Nested>()?.0,
                // Arrays of documents (Gemini without SSE) are whole bodies: their deltas send nothing apart.
                Key::Delta if !self.in_array => delta = Some(map.next_value::<Value>()?),
                Key::Choices if !self.in_array => choices = Some(map.next_value::<Value>()?),
                Key::Delta | Key::Choices | Key::Other => {
                    map.next_value::<IgnoredAny>()?;
                }
            }
        }
        let parts = parts_of(
            response.as_ref(),
            message.as_ref(),
            usage.as_ref(),
            meta.as_ref(),
        );
        Ok((parts, deltas_of(delta.as_ref(), choices.as_ref())))
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(Parts, u64), A::Error> {
        let mut parts = Parts::default();
        if self.in_array {
            while seq.next_element::<IgnoredAny>()?.is_some() {}
        } else {
            while let Some((item, _)) = seq.next_element_seed(Doc { in_array: true })? {
                parts.merge(&item);
            }
        }
        Ok((parts, 0))
    }
}

/// The `usage` member of a `response` or `message` object (the rest of which, the whole generated output
/// in a `response.completed` event, is skipped).
struct Nested(Option<Value>);

impl<'de> de::Deserialize<'de> for Nested {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Nested, D::Error> {
        deserializer.deserialize_any(NestedVisitor)
    }
}

struct NestedVisitor;

impl<'de> Visitor<'de> for NestedVisitor {
    type Value = Nested;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("any JSON value")
    }

    scalars_say_nothing!(Nested(None));

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Nested, A::Error> {
        let mut usage = None;
        while let Some(key) = map.next_key::<Key>()? {
            match key {
                Key::Usage => usage = Some(map.next_value::<Value>()?),
                _ => {
                    map.next_value::<IgnoredAny>()?;
                }
            }
        }
        Ok(Nested(usage))
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Nested, A::Error> {
        while seq.next_element::<IgnoredAny>()?.is_some() {}
        Ok(Nested(None))
    }
}
