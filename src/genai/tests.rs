//! The scanner against the fixtures (tests/fixtures/genai, counts in its README), every chunking, the
//! encodings, hostile bodies, pointers; then property tests: chunking never changes the result, random bytes
//! never panic and stay within the memory bound, the two JSON readers agree.

use std::io::Write;

use flate2::Compression;
use flate2::write::{DeflateEncoder, GzEncoder, ZlibEncoder};
use proptest::prelude::*;
use serde_json::{Value, json};

use super::usage::{Parts, read_document, read_parts};
use super::*;

const JSON: Option<&str> = Some("application/json");
const SSE: Option<&str> = Some("text/event-stream");
const MAX: usize = 1 << 20;

macro_rules! fixture {
    ($name:literal) => {
        (
            $name,
            include_str!(concat!("../../tests/fixtures/genai/", $name)),
        )
    };
}

/// (file, body, content type, input, output, total, outcome)
type Fixture = (
    &'static str,
    &'static str,
    Option<&'static str>,
    Option<u64>,
    Option<u64>,
    Option<u64>,
    Outcome,
);

fn fixtures() -> Vec<Fixture> {
    use Outcome::{Complete, Counted};
    let f = |(name, body): (&'static str, &'static str), ct, i, o, t, outcome| {
        (name, body, ct, i, o, t, outcome)
    };
    vec![
        f(
            fixture!("openai_chat.json"),
            JSON,
            Some(19),
            Some(10),
            Some(29),
            Complete,
        ),
        f(
            fixture!("openai_chat_stream.sse"),
            SSE,
            Some(13),
            Some(7),
            Some(20),
            Complete,
        ),
        f(
            fixture!("openai_chat_stream_no_usage.sse"),
            SSE,
            None,
            Some(7),
            Some(7),
            Counted,
        ),
        f(
            fixture!("openai_responses.json"),
            JSON,
            Some(36),
            Some(87),
            Some(123),
            Complete,
        ),
        f(
            fixture!("openai_responses_stream.sse"),
            SSE,
            Some(14),
            Some(9),
            Some(23),
            Complete,
        ),
        f(
            fixture!("anthropic_messages.json"),
            JSON,
            Some(325),
            Some(15),
            Some(340),
            Complete,
        ),
        f(
            fixture!("anthropic_messages_stream.sse"),
            SSE,
            Some(1496),
            Some(89),
            Some(1585),
            Complete,
        ),
        f(
            fixture!("gemini.json"),
            JSON,
            Some(8),
            Some(32),
            Some(40),
            Complete,
        ),
        f(
            fixture!("gemini_stream.sse"),
            SSE,
            Some(9),
            Some(33),
            Some(42),
            Complete,
        ),
    ]
}

/// What a scan ended with, compared whole across chunkings.
#[derive(Debug, PartialEq, Eq)]
struct Seen {
    usage: Usage,
    outcome: Outcome,
    unreadable_events: u64,
    unreadable_pointers: u64,
}

/// Scans `chunks` to the end, checking the memory bound after every chunk.
fn scan_with<'a>(
    content_type: Option<&str>,
    encoding: Option<&str>,
    pointers: &[&str],
    max: usize,
    chunks: impl IntoIterator<Item = &'a [u8]>,
) -> Seen {
    let pointers: Vec<String> = pointers.iter().map(|p| p.to_string()).collect();
    let mut s = Scanner::new(content_type, encoding, &pointers, max);
    for chunk in chunks {
        s.feed(chunk);
        assert!(
            s.held() <= 2 * max + 65,
            "held {} > bound for max {max}",
            s.held()
        );
    }
    let outcome = s.finish();
    Seen {
        usage: s.usage().clone(),
        outcome,
        unreadable_events: s.unreadable_events(),
        unreadable_pointers: s.unreadable_pointers(),
    }
}

fn scan(content_type: Option<&str>, body: &[u8]) -> Seen {
    scan_with(content_type, None, &[], MAX, [body])
}

fn counts(seen: &Seen) -> (Option<u64>, Option<u64>, Option<u64>) {
    (
        seen.usage.input_tokens,
        seen.usage.output_tokens,
        seen.usage.total_tokens,
    )
}

fn gzip(bytes: &[u8]) -> Vec<u8> {
    let mut e = GzEncoder::new(Vec::new(), Compression::default());
    e.write_all(bytes).unwrap();
    e.finish().unwrap()
}

/// The same stream with every line end as `end`.
fn with_line_ends(body: &str, end: &str) -> String {
    body.replace("\r\n", "\n").replace('\n', end)
}

// ---- fixtures ----

#[test]
fn every_fixture_gives_its_documented_counts() {
    for (name, body, ct, input, output, total, outcome) in fixtures() {
        let seen = scan(ct, body.as_bytes());
        assert_eq!(counts(&seen), (input, output, total), "{name}");
        assert_eq!(seen.outcome, outcome, "{name}");
        assert_eq!(seen.unreadable_events, 0, "{name}");
        assert_eq!(seen.usage.get(INPUT_TOKENS), input, "{name}");
        assert_eq!(seen.usage.get(OUTPUT_TOKENS), output, "{name}");
        assert_eq!(seen.usage.get(TOTAL_TOKENS), total, "{name}");
    }
}

#[test]
fn every_fixture_split_at_every_byte_gives_the_same_result() {
    for (name, body, ct, ..) in fixtures() {
        let body = body.as_bytes();
        let whole = scan(ct, body);
        for i in 0..=body.len() {
            let seen = scan_with(ct, None, &[], MAX, [&body[..i], &body[i..]]);
            assert_eq!(seen, whole, "{name} split at {i}");
        }
        let bytewise = scan_with(ct, None, &[], MAX, body.chunks(1));
        assert_eq!(bytewise, whole, "{name} byte by byte");
    }
}

#[test]
fn sse_fixtures_read_the_same_with_lf_crlf_and_cr() {
    for (name, body, ct, input, output, total, outcome) in fixtures() {
        if ct != SSE {
            continue;
        }
        for end in ["\n", "\r\n", "\r"] {
            let body = with_line_ends(body, end);
            let seen = scan(ct, body.as_bytes());
            assert_eq!(counts(&seen), (input, output, total), "{name} {end:?}");
            assert_eq!(seen.outcome, outcome, "{name} {end:?}");
            // Split in three everywhere for the CRLF form: inside `\r\n`, inside `data:`.
            if end == "\r\n" && name == "anthropic_messages_stream.sse" {
                let b = body.as_bytes();
                for i in (0..b.len()).step_by(7) {
                    for j in (i..b.len()).step_by(13) {
                        let parts = [&b[..i], &b[i..j], &b[j..]];
                        assert_eq!(scan_with(ct, None, &[], MAX, parts), seen, "{i},{j}");
                    }
                }
            }
        }
    }
}

#[test]
fn feed_reports_exactly_when_usage_changes() {
    // Gemini: each of the three events changes the cumulative counts.
    let (_, body) = fixture!("gemini_stream.sse");
    let mut s = Scanner::new(SSE, None, &[], MAX);
    let changes: Vec<bool> = body
        .split_inclusive("\r\n\r\n")
        .map(|event| s.feed(event.as_bytes()))
        .collect();
    assert_eq!(changes, [true, true, true]);
    assert_eq!(s.usage().total_tokens, Some(42));
    // OpenAI chat: each content delta raises the floor, then the usage chunk; not the role chunk (empty
    // content), the finish chunk (empty delta) or `[DONE]`.
    let (_, body) = fixture!("openai_chat_stream.sse");
    let mut s = Scanner::new(SSE, None, &[], MAX);
    let changes: Vec<bool> = body
        .split_inclusive("\n\n")
        .map(|event| s.feed(event.as_bytes()))
        .collect();
    assert_eq!(
        changes,
        [
            false, true, true, true, true, true, true, true, false, true, false
        ]
    );
    assert_eq!(s.deltas(), 7);
    // JSON is parsed at the end: feed never reports a change, finish does the work.
    let (_, body) = fixture!("openai_chat.json");
    let mut s = Scanner::new(JSON, None, &[], MAX);
    assert!(!s.feed(body.as_bytes()));
    assert_eq!(s.usage(), &Usage::default());
    assert_eq!(s.finish(), Outcome::Complete);
    assert_eq!(s.usage().total_tokens, Some(29));
}

#[test]
fn cut_streams_bill_what_was_seen() {
    let cut_at = |body: &str, ct, end: usize| {
        let mut s = Scanner::new(ct, None, &[], MAX);
        s.feed(&body.as_bytes()[..end]);
        (counts_of(s.usage()), s.outcome_so_far())
    };
    let cut = |body: &str, ct, upto: &str| cut_at(body, ct, body.find(upto).unwrap() + upto.len());
    let (_, anthropic) = fixture!("anthropic_messages_stream.sse");
    assert_eq!(
        cut(anthropic, SSE, "event: content_block_start"),
        ((Some(1496), Some(2), Some(1498)), Outcome::Partial)
    );
    // Even at its last byte, a stream not finished is Partial: the caller bills what it saw.
    assert_eq!(
        cut(anthropic, SSE, "message_stop\"}\n\n"),
        ((Some(1496), Some(89), Some(1585)), Outcome::Partial)
    );
    let (_, gemini) = fixture!("gemini_stream.sse");
    let second = gemini.match_indices("\r\n\r\n").nth(1).unwrap().0;
    assert_eq!(
        cut_at(gemini, SSE, second + 4),
        ((Some(9), Some(18), Some(27)), Outcome::Partial)
    );
    let (_, chat) = fixture!("openai_chat_stream.sse");
    // OpenAI says nothing before its last event: the content sent is the floor, one token per delta (the
    // fixture's usage chunk says 7 completion tokens for its 7 deltas).
    assert_eq!(
        cut(chat, SSE, "\"finish_reason\":\"stop\""),
        ((None, Some(7), Some(7)), Outcome::Counted)
    );
    assert_eq!(
        cut(chat, SSE, "\"content\":\" gopher\""),
        ((None, Some(3), Some(3)), Outcome::Counted)
    );
    let (_, responses) = fixture!("openai_responses_stream.sse");
    assert_eq!(
        cut(responses, SSE, "response.output_text.done"),
        ((None, Some(8), Some(8)), Outcome::Counted)
    );
    // Anthropic: the input is known from `message_start`; the output floor is the deltas sent (6), above
    // the initial count (2), below the final one (89).
    assert_eq!(
        cut(anthropic, SSE, "event: content_block_stop"),
        ((Some(1496), Some(6), Some(1502)), Outcome::Partial)
    );
    // An event half received is not read before finish.
    assert_eq!(
        cut(gemini, SSE, "\"totalTokenCount\":14"),
        ((None, None, None), Outcome::Missing)
    );
    // A JSON body is parsed only at its end: cut, it is unreadable; nothing received, nothing missing.
    let (_, json) = fixture!("openai_chat.json");
    assert_eq!(
        cut(json, JSON, "\"total_tokens\": 29"),
        ((None, None, None), Outcome::Unreadable(Reason::Truncated))
    );
    assert_eq!(
        Scanner::new(JSON, None, &[], MAX).outcome_so_far(),
        Outcome::Missing
    );
}

fn counts_of(u: &Usage) -> (Option<u64>, Option<u64>, Option<u64>) {
    (u.input_tokens, u.output_tokens, u.total_tokens)
}

// ---- shapes ----

#[test]
fn anthropic_message_delta_with_input_and_cache_overrides_message_start() {
    let body = "event: message_start\n\
        data: {\"type\":\"message_start\",\"message\":{\"usage\":{\"input_tokens\":10,\"cache_creation_input_tokens\":5,\"cache_read_input_tokens\":0,\"output_tokens\":1}}}\n\n\
        event: message_delta\n\
        data: {\"type\":\"message_delta\",\"delta\":{\"stop_reason\":\"end_turn\"},\"usage\":{\"input_tokens\":12,\"cache_read_input_tokens\":3,\"output_tokens\":40}}\n\n\
        event: message_stop\ndata: {\"type\":\"message_stop\"}\n\n";
    let seen = scan(SSE, body.as_bytes());
    // input 12 (newer) + cache creation 5 (kept from message_start) + cache read 3 (newer)
    assert_eq!(counts(&seen), (Some(20), Some(40), Some(60)));
    assert_eq!(seen.outcome, Outcome::Complete);
    // Without cache fields, input is Anthropic's input_tokens.
    let seen = scan(
        JSON,
        br#"{"type":"message","usage":{"input_tokens":7,"output_tokens":3}}"#,
    );
    assert_eq!(counts(&seen), (Some(7), Some(3), Some(10)));
}

#[test]
fn gemini_thoughts_are_output_and_tool_use_prompt_is_input() {
    let seen = scan(
        JSON,
        br#"{"usageMetadata":{"promptTokenCount":10,"toolUsePromptTokenCount":4,"candidatesTokenCount":6,"thoughtsTokenCount":30,"cachedContentTokenCount":8,"totalTokenCount":50}}"#,
    );
    assert_eq!(counts(&seen), (Some(14), Some(36), Some(50)));
    // Only thoughts so far (a thinking model's first chunks): output is the thoughts.
    let seen = scan(
        JSON,
        br#"{"usageMetadata":{"promptTokenCount":10,"thoughtsTokenCount":30,"totalTokenCount":40}}"#,
    );
    assert_eq!(counts(&seen), (Some(10), Some(30), Some(40)));
}

#[test]
fn gemini_json_array_stream_takes_the_last_usage() {
    let body = br#"[{"candidates":[],"usageMetadata":{"promptTokenCount":5,"candidatesTokenCount":1,"totalTokenCount":6}},
        {"candidates":[]},
        {"candidates":[],"usageMetadata":{"promptTokenCount":5,"candidatesTokenCount":9,"totalTokenCount":14}}]"#;
    let seen = scan(JSON, body);
    assert_eq!(counts(&seen), (Some(5), Some(9), Some(14)));
    // Arrays are followed one level only.
    let seen = scan(JSON, br#"[[{"usage":{"prompt_tokens":1}}]]"#);
    assert_eq!(seen.outcome, Outcome::Missing);
}

#[test]
fn total_is_reported_else_the_sum_when_both_known() {
    let seen = scan(
        JSON,
        br#"{"usage":{"prompt_tokens":3,"completion_tokens":4,"total_tokens":100}}"#,
    );
    assert_eq!(seen.usage.total_tokens, Some(100));
    let seen = scan(
        JSON,
        br#"{"usage":{"prompt_tokens":3,"completion_tokens":4}}"#,
    );
    assert_eq!(seen.usage.total_tokens, Some(7));
    let seen = scan(JSON, br#"{"usage":{"prompt_tokens":3}}"#);
    assert_eq!(counts(&seen), (Some(3), None, None));
    assert_eq!(seen.outcome, Outcome::Complete);
    // A sum that overflows is no count.
    let seen = scan(
        JSON,
        br#"{"usage":{"input_tokens":18446744073709551615,"cache_read_input_tokens":1,"output_tokens":1}}"#,
    );
    assert_eq!(counts(&seen), (None, Some(1), None));
}

#[test]
fn usage_null_and_unexpected_types_say_nothing() {
    for body in [
        &br#"{"usage":null}"#[..],
        br#"{"usage":"many"}"#,
        br#"{"usage":[1,2]}"#,
        br#"{"usage":{"prompt_tokens":-1,"completion_tokens":1.5,"total_tokens":true}}"#,
        br#"{"response":"x","message":7,"usageMetadata":[]}"#,
        br#"{"response":{"usage":null}}"#,
        br#"{"choices":[{"usage":{"prompt_tokens":5}}]}"#,
        b"null",
        b"42",
        br#""usage""#,
        b"[]",
        b"{}",
    ] {
        let seen = scan(JSON, body);
        assert_eq!(
            seen.outcome,
            Outcome::Missing,
            "{}",
            String::from_utf8_lossy(body)
        );
        assert!(seen.usage.is_empty());
    }
    // Counts written as 12.0 or "12" are counts.
    let seen = scan(
        JSON,
        br#"{"usage":{"prompt_tokens":"12","completion_tokens":3.0}}"#,
    );
    assert_eq!(counts(&seen), (Some(12), Some(3), Some(15)));
}

#[test]
fn duplicate_keys_last_wins_in_both_readers() {
    let body = r#"{"usage":{"prompt_tokens":1},"usage":{"prompt_tokens":2}}"#;
    assert_eq!(read_parts(body).unwrap().parts.input, Some(2));
    assert_eq!(read_document(body, &[]).unwrap().parts.input, Some(2));
}

// ---- content types ----

#[test]
fn content_types_with_parameters_and_case() {
    let (_, json) = fixture!("openai_chat.json");
    let (_, sse) = fixture!("openai_chat_stream.sse");
    for ct in [
        "application/json; charset=utf-8",
        "Application/JSON",
        " application/json ;charset=UTF-8",
        "application/vnd.api+json",
        "application/problem+JSON",
    ] {
        assert_eq!(
            scan(Some(ct), json.as_bytes()).usage.total_tokens,
            Some(29),
            "{ct}"
        );
    }
    for ct in ["text/event-stream; charset=utf-8", "TEXT/EVENT-STREAM"] {
        assert_eq!(
            scan(Some(ct), sse.as_bytes()).usage.total_tokens,
            Some(20),
            "{ct}"
        );
    }
}

#[test]
fn unknown_content_type_sniffs_json_else_missing() {
    let (_, json) = fixture!("gemini.json");
    for ct in [None, Some("text/plain"), Some("application/octet-stream")] {
        let body = format!(" \r\n\t{json}");
        let seen = scan(ct, body.as_bytes());
        assert_eq!(seen.usage.total_tokens, Some(40), "{ct:?}");
        // Chunked so the first byte arrives alone after blank chunks.
        let seen = scan_with(
            ct,
            None,
            &[],
            MAX,
            [&b"  "[..], b"", b"\n", json.as_bytes()],
        );
        assert_eq!(seen.usage.total_tokens, Some(40), "{ct:?}");
    }
    let (_, sse) = fixture!("openai_chat_stream.sse");
    assert_eq!(scan(None, sse.as_bytes()).outcome, Outcome::Missing);
    assert_eq!(scan(Some("text/html"), b"<html>").outcome, Outcome::Missing);
    assert_eq!(scan(None, b"").outcome, Outcome::Missing);
    assert_eq!(scan(None, b"   ").outcome, Outcome::Missing);
    // A sniffed JSON body is bounded like a declared one.
    let big = format!("{{\"pad\":\"{}\"}}", "x".repeat(200));
    let seen = scan_with(None, None, &[], 100, [big.as_bytes()]);
    assert_eq!(seen.outcome, Outcome::Unreadable(Reason::TooLarge));
}

// ---- hostile JSON ----

#[test]
fn json_garbage_truncation_and_non_utf8_are_unreadable() {
    let cases: [(&[u8], Reason); 7] = [
        (b"{\"usage\":{\"prompt_tokens\":1}", Reason::Truncated),
        (b"{\"usage\":", Reason::Truncated),
        (b"garbage", Reason::Malformed),
        (
            b"{\"usage\":{\"prompt_tokens\":1}} trailing",
            Reason::Malformed,
        ),
        (b"{\"usage\":{\"prompt_tokens\":1}}{}", Reason::Malformed),
        (b"{\"a\":\"\xff\xfe\"}", Reason::NotUtf8),
        (b"\xEF\xBB\xBF{}", Reason::Malformed),
    ];
    for (body, reason) in cases {
        let seen = scan(JSON, body);
        assert_eq!(
            seen.outcome,
            Outcome::Unreadable(reason),
            "{}",
            String::from_utf8_lossy(body)
        );
        assert!(seen.usage.is_empty());
    }
    assert_eq!(scan(JSON, b"").outcome, Outcome::Missing);
    // Deep nesting: never the stack. The skipping reader walks it iteratively (unclosed: truncated,
    // closed: no usage); the whole-document reader (with pointers) stops at serde_json's recursion limit.
    let open = "[".repeat(100_000);
    let closed = open.clone() + &"]".repeat(100_000);
    let usage_deep = format!("{{\"usage\":{}", "{\"a\":".repeat(10_000));
    assert_eq!(
        scan(JSON, open.as_bytes()).outcome,
        Outcome::Unreadable(Reason::Truncated)
    );
    assert_eq!(scan(JSON, closed.as_bytes()).outcome, Outcome::Missing);
    assert_eq!(
        scan(JSON, usage_deep.as_bytes()).outcome,
        Outcome::Unreadable(Reason::Malformed)
    );
    for body in [&open, &closed, &usage_deep] {
        let seen = scan_with(JSON, None, &["/a"], MAX, [body.as_bytes()]);
        assert_eq!(seen.outcome, Outcome::Unreadable(Reason::Malformed));
    }
}

#[test]
fn json_past_max_buffer_is_too_large_and_never_held() {
    let (_, body) = fixture!("openai_responses.json");
    let n = body.len();
    assert_eq!(
        scan_with(JSON, None, &[], n, [body.as_bytes()]).outcome,
        Outcome::Complete,
        "exactly at the bound"
    );
    let seen = scan_with(JSON, None, &[], n - 1, body.as_bytes().chunks(10));
    assert_eq!(seen.outcome, Outcome::Unreadable(Reason::TooLarge));
    assert!(seen.usage.is_empty());
    // max_buffer 0: nothing fits.
    assert_eq!(
        scan_with(JSON, None, &[], 0, [&b"{}"[..]]).outcome,
        Outcome::Unreadable(Reason::TooLarge)
    );
    // A huge body past the bound: the scanner stops holding at once and stays that way.
    let mut s = Scanner::new(JSON, None, &[], 4096);
    let chunk = vec![b' '; 64 * 1024];
    for _ in 0..256 {
        s.feed(&chunk);
        assert_eq!(s.held(), 0);
    }
    assert_eq!(s.outcome_so_far(), Outcome::Unreadable(Reason::TooLarge));
    assert_eq!(s.finish(), Outcome::Unreadable(Reason::TooLarge));
}

// ---- hostile SSE ----

#[test]
fn sse_unreadable_events_are_skipped_and_counted() {
    let usage = "data: {\"usage\":{\"prompt_tokens\":2,\"completion_tokens\":3}}\n\n";
    // Garbage before the usage: the stream goes on, the usage is complete.
    let body = format!(
        "data: garbage\n\ndata: {{\"x\":\n\ndata: \u{0}\n\n{}data: [DONE]\n\n",
        usage
    );
    let seen = scan(SSE, body.as_bytes());
    assert_eq!(counts(&seen), (Some(2), Some(3), Some(5)));
    assert_eq!(seen.outcome, Outcome::Complete);
    assert_eq!(seen.unreadable_events, 3);
    // Garbage after the usage: it may have been the final word, so Partial.
    let body = format!("{usage}data: {{\"usage\":{{\"prompt_tokens\":\n\n");
    let seen = scan(SSE, body.as_bytes());
    assert_eq!(seen.outcome, Outcome::Partial);
    assert_eq!(counts(&seen), (Some(2), Some(3), Some(5)));
    // Only garbage: unreadable, with the last reason.
    assert_eq!(
        scan(SSE, b"data: nope\n\ndata: {\"a\":\n\n").outcome,
        Outcome::Unreadable(Reason::Truncated)
    );
    assert_eq!(
        scan(SSE, b"data: {\"a\":\"\xff\"}\n\n").outcome,
        Outcome::Unreadable(Reason::NotUtf8)
    );
    // Non-UTF-8 in one event does not spoil the next.
    let body = [&b"data: \xc3\n\n"[..], usage.as_bytes()].concat();
    let seen = scan(SSE, &body);
    assert_eq!(
        (seen.outcome, seen.unreadable_events),
        (Outcome::Complete, 1)
    );
    // Keep-alives, comments, empty events and [DONE] are not unreadable.
    let seen = scan(
        SSE,
        b": ping\n\ndata:\n\ndata:   \n\nevent: ping\n\ndata: [DONE]\n\n",
    );
    assert_eq!(
        (seen.outcome, seen.unreadable_events),
        (Outcome::Missing, 0)
    );
}

#[test]
fn sse_event_past_max_buffer_is_skipped_and_the_stream_goes_on() {
    let big = format!("data: {{\"pad\":\"{}\"}}\n\n", "x".repeat(5000));
    let usage = "data: {\"usage\":{\"input_tokens\":4,\"output_tokens\":6}}\n\n";
    let body = format!("{big}{usage}{big}");
    let seen = scan_with(SSE, None, &[], 1000, body.as_bytes().chunks(3));
    assert_eq!(counts(&seen), (Some(4), Some(6), Some(10)));
    assert_eq!(
        seen.outcome,
        Outcome::Partial,
        "an oversized event followed the usage"
    );
    assert_eq!(seen.unreadable_events, 2);
    let seen = scan_with(SSE, None, &[], 1000, [big.as_bytes()]);
    assert_eq!(seen.outcome, Outcome::Unreadable(Reason::TooLarge));
    // Multi-line data adding up past the bound.
    let many = "data: {\"usage\":\n".to_string() + &"data: 1\n".repeat(600) + "\n" + usage;
    let seen = scan_with(SSE, None, &[], 1000, [many.as_bytes()]);
    assert_eq!(
        (seen.outcome, seen.unreadable_events),
        (Outcome::Complete, 1)
    );
}

#[test]
fn sse_multi_line_data_is_one_document() {
    let body = "event: message_delta\ndata: {\"usage\":\ndata: {\"output_tokens\": 8,\ndata:  \"input_tokens\": 2}}\n\n";
    let seen = scan(SSE, body.as_bytes());
    assert_eq!(counts(&seen), (Some(2), Some(8), Some(10)));
}

#[test]
fn sse_last_event_without_blank_line_is_read_at_finish() {
    let body = "data: {\"usage\":{\"prompt_tokens\":1,\"completion_tokens\":1}}";
    let mut s = Scanner::new(SSE, None, &[], MAX);
    s.feed(body.as_bytes());
    assert_eq!(
        s.outcome_so_far(),
        Outcome::Missing,
        "not read before the end"
    );
    assert_eq!(s.finish(), Outcome::Complete);
    assert_eq!(s.usage().total_tokens, Some(2));
}

#[test]
fn a_million_tiny_chunks() {
    // ~1 MB of chat chunks fed one byte at a time, the usage at the end.
    let (_, chat) = fixture!("openai_chat_stream.sse");
    let head = &chat[..chat.find("data: {\"id\":\"chatcmpl-7fK2nXb1\",\"object\":\"chat.completion.chunk\",\"created\":1741569952,\"model\":\"gpt-4o-mini-2024-07-18\",\"system_fingerprint\":\"fp_44709d6fcb\",\"choices\":[]").unwrap()];
    let tail = &chat[head.len()..];
    let body = head.repeat(1_000_000 / head.len()) + tail;
    let mut s = Scanner::new(SSE, None, &[], 64 * 1024);
    let mut changes = 0;
    for b in body.as_bytes() {
        changes += usize::from(s.feed(std::slice::from_ref(b)));
    }
    assert_eq!(s.finish(), Outcome::Complete);
    // One report per content delta (the floor rises), one for the usage chunk; the end bills the usage.
    let deltas = 7 * (1_000_000 / head.len());
    assert_eq!(s.deltas(), u64::try_from(deltas).unwrap());
    assert_eq!(changes, deltas + 1);
    assert_eq!(counts_of(s.usage()), (Some(13), Some(7), Some(20)));
    assert!(s.held() < 4096, "held {}", s.held());
}

// ---- encodings ----

#[test]
fn gzip_fixtures_read_the_same_in_any_chunking() {
    for (name, body, ct, input, output, total, outcome) in fixtures() {
        let gz = gzip(body.as_bytes());
        for encoding in ["gzip", "x-gzip", "GZIP"] {
            let seen = scan_with(ct, Some(encoding), &[], MAX, [&gz[..]]);
            assert_eq!(counts(&seen), (input, output, total), "{name}");
            assert_eq!(seen.outcome, outcome, "{name}");
        }
        let whole = scan_with(ct, Some("gzip"), &[], MAX, [&gz[..]]);
        for i in 0..=gz.len() {
            let seen = scan_with(ct, Some("gzip"), &[], MAX, [&gz[..i], &gz[i..]]);
            assert_eq!(seen, whole, "{name} gzip split at {i}");
        }
        assert_eq!(scan_with(ct, Some("gzip"), &[], MAX, gz.chunks(1)), whole);
    }
}

#[test]
fn deflate_zlib_and_raw() {
    let (_, body) = fixture!("anthropic_messages_stream.sse");
    let mut z = ZlibEncoder::new(Vec::new(), Compression::default());
    z.write_all(body.as_bytes()).unwrap();
    let z = z.finish().unwrap();
    let mut raw = DeflateEncoder::new(Vec::new(), Compression::best());
    raw.write_all(body.as_bytes()).unwrap();
    let raw = raw.finish().unwrap();
    for encoded in [z, raw] {
        for step in [1, 2, 5, 1000] {
            let seen = scan_with(SSE, Some("deflate"), &[], MAX, encoded.chunks(step));
            assert_eq!(counts(&seen), (Some(1496), Some(89), Some(1585)));
            assert_eq!(seen.outcome, Outcome::Complete);
        }
    }
}

#[test]
fn unsupported_encodings_count_nothing_and_say_so() {
    let (_, body) = fixture!("openai_chat.json");
    for encoding in ["br", "zstd", "compress", "gzip, br", "snappy"] {
        let mut s = Scanner::new(JSON, Some(encoding), &[], MAX);
        let expected = Outcome::Unreadable(Reason::UnsupportedEncoding);
        assert_eq!(s.outcome_so_far(), expected, "{encoding}");
        assert!(!s.feed(body.as_bytes()));
        assert_eq!(s.finish(), expected);
        assert!(s.usage().is_empty());
    }
    assert_eq!(
        scan_with(JSON, Some("identity"), &[], MAX, [body.as_bytes()]).outcome,
        Outcome::Complete
    );
}

#[test]
fn corrupt_or_truncated_gzip() {
    let (_, json) = fixture!("openai_chat.json");
    let gz = gzip(json.as_bytes());
    // Not gzip at all.
    assert_eq!(
        scan_with(JSON, Some("gzip"), &[], MAX, [json.as_bytes()]).outcome,
        Outcome::Unreadable(Reason::CorruptEncoding)
    );
    // Truncated: a JSON body is all or nothing.
    assert_eq!(
        scan_with(JSON, Some("gzip"), &[], MAX, [&gz[..gz.len() - 4]]).outcome,
        Outcome::Unreadable(Reason::CorruptEncoding)
    );
    // A bad CRC.
    let mut bad = gz.clone();
    let n = bad.len();
    bad[n - 8] ^= 1;
    assert_eq!(
        scan_with(JSON, Some("gzip"), &[], MAX, [&bad[..]]).outcome,
        Outcome::Unreadable(Reason::CorruptEncoding)
    );
    // A stream keeps what it read before the encoding broke.
    let (_, sse) = fixture!("anthropic_messages_stream.sse");
    let gz = gzip(sse.as_bytes());
    let seen = scan_with(SSE, Some("gzip"), &[], MAX, [&gz[..gz.len() - 4]]);
    assert_eq!(seen.outcome, Outcome::Partial);
    assert_eq!(seen.usage.output_tokens, Some(89));
    let seen = scan_with(SSE, Some("gzip"), &[], MAX, [&gz[..20]]);
    assert_eq!(seen.outcome, Outcome::Unreadable(Reason::CorruptEncoding));
    // An empty body with a gzip header is empty.
    assert_eq!(
        scan_with(JSON, Some("gzip"), &[], MAX, [&b""[..]]).outcome,
        Outcome::Missing
    );
}

#[test]
fn gzip_bomb_json_stops_at_the_bound() {
    // 1 GiB of spaces inside a JSON object, as 1026 gzip members (one body, RFC 1952 §2.2) in about 1 MiB;
    // only max_buffer of it is ever inflated.
    let spaces = gzip(&vec![b' '; 1 << 20]);
    let mut bomb = gzip(b"{\"pad\":\"");
    for _ in 0..1024 {
        bomb.extend_from_slice(&spaces);
    }
    bomb.extend(gzip(b"\",\"usage\":{\"prompt_tokens\":1}}"));
    let max = 256 * 1024;
    let mut s = Scanner::new(JSON, Some("gzip"), &[], max);
    let mut chunks = bomb.chunks(16 * 1024);
    // The first 16 KiB hold sixteen 1 MiB members: the bound is passed, the decoder stops for good.
    s.feed(chunks.next().unwrap());
    assert!(s.stopped());
    assert_eq!(s.held(), 0);
    for chunk in chunks {
        assert!(!s.feed(chunk));
    }
    assert_eq!(s.finish(), Outcome::Unreadable(Reason::TooLarge));
}

#[test]
fn gzip_bomb_sse_stops_at_its_inflate_budget() {
    // 16 MiB of one endless line, then a usage event: a compressed body inflates to at most 16 times the
    // buffer (at least 1 MiB), so the bomb is not inflated to its end and its usage is not read: too large.
    let mut e = GzEncoder::new(Vec::new(), Compression::best());
    e.write_all(b"data: ").unwrap();
    let zeros = vec![b'0'; 1 << 20];
    for _ in 0..16 {
        e.write_all(&zeros).unwrap();
    }
    e.write_all(b"\n\ndata: {\"usage\":{\"prompt_tokens\":3,\"completion_tokens\":4}}\n\n")
        .unwrap();
    let bomb = e.finish().unwrap();
    let seen = scan_with(SSE, Some("gzip"), &[], 64 * 1024, bomb.chunks(4096));
    assert_eq!(counts(&seen), (None, None, None));
    assert_eq!(seen.outcome, Outcome::Unreadable(Reason::TooLarge));
    // The same stream within its budget is read whole.
    let seen = scan_with(SSE, Some("gzip"), &[], 2 * 1024 * 1024, bomb.chunks(4096));
    assert_eq!(counts(&seen), (Some(3), Some(4), Some(7)));
    assert_eq!(
        (seen.outcome, seen.unreadable_events),
        (Outcome::Complete, 1)
    );
}

// ---- pointers ----

#[test]
fn response_json_pointers_on_json() {
    let body = br#"{"usage":{"total_tokens":29,"units":"12","ratio":2.5,"neg":-3,"f":7.0,"s":"abc","n":null,"o":{}},"a/b":{"m~n":5},"arr":[10,20]}"#;
    let pointers = [
        "/usage/total_tokens",
        "/usage/units",
        "/usage/ratio",
        "/usage/neg",
        "/usage/f",
        "/usage/s",
        "/usage/n",
        "/usage/o",
        "/usage/absent",
        "/a~1b/m~0n",
        "/arr/1",
        "no-slash",
    ];
    let seen = scan_with(JSON, None, &pointers, MAX, [&body[..]]);
    let got: Vec<(&str, u64)> = seen
        .usage
        .pointers
        .iter()
        .map(|(k, v)| (k.as_str(), *v))
        .collect();
    assert_eq!(
        got,
        [
            ("/arr/1", 20),
            ("/a~1b/m~0n", 5),
            ("/usage/f", 7),
            ("/usage/total_tokens", 29),
            ("/usage/units", 12),
        ]
    );
    // ratio 2.5, neg -3, "abc", {}: present but not counts.
    assert_eq!(seen.unreadable_pointers, 4);
    assert_eq!(seen.outcome, Outcome::Complete);
    assert_eq!(
        seen.usage.get("response_json:/usage/total_tokens"),
        Some(29)
    );
    assert_eq!(seen.usage.get("response_json:/usage/ratio"), None);
    assert_eq!(seen.usage.get("response_json:/nowhere"), None);
    assert_eq!(seen.usage.get("genai:nope"), None);
    // A pointer-only API: the pointer alone makes the usage complete; nothing found is Missing.
    let seen = scan_with(
        JSON,
        None,
        &["/meta/units"],
        MAX,
        [&br#"{"meta":{"units":3}}"#[..]],
    );
    assert_eq!(
        (seen.outcome, seen.usage.get("response_json:/meta/units")),
        (Outcome::Complete, Some(3))
    );
    let seen = scan_with(JSON, None, &["/meta/units"], MAX, [&br#"{"meta":{}}"#[..]]);
    assert_eq!(seen.outcome, Outcome::Missing);
    // The root pointer "" is the whole document.
    let seen = scan_with(None, None, &[""], MAX, [&b"[1]"[..]]);
    assert_eq!(
        (seen.outcome, seen.unreadable_pointers),
        (Outcome::Missing, 1)
    );
}

#[test]
fn response_json_pointers_on_sse_latest_wins() {
    let body = "data: {\"n\":1}\n\ndata: {\"other\":true}\n\ndata: {\"n\":5}\n\ndata: {\"n\":\"x\"}\n\ndata: [DONE]\n\n";
    let mut s = Scanner::new(SSE, None, &["/n".to_string()], MAX);
    let changes: Vec<bool> = body
        .split_inclusive("\n\n")
        .map(|e| s.feed(e.as_bytes()))
        .collect();
    assert_eq!(changes, [true, false, true, false, false]);
    assert_eq!(s.finish(), Outcome::Complete);
    assert_eq!(s.usage().get("response_json:/n"), Some(5));
    assert_eq!(s.unreadable_pointers(), 1);
    // Pointers and provider fields together, on every fixture: the same counts as without pointers.
    for (name, body, ct, input, output, total, outcome) in fixtures() {
        let seen = scan_with(
            ct,
            None,
            &["/usage/output_tokens", "/usage/completion_tokens"],
            MAX,
            [body.as_bytes()],
        );
        assert_eq!(counts(&seen), (input, output, total), "{name}");
        assert_eq!(seen.outcome, outcome, "{name}");
    }
    let (_, anthropic) = fixture!("anthropic_messages_stream.sse");
    let seen = scan_with(
        SSE,
        None,
        &["/usage/output_tokens", "/message/usage/input_tokens"],
        MAX,
        [anthropic.as_bytes()],
    );
    assert_eq!(
        seen.usage.get("response_json:/usage/output_tokens"),
        Some(89)
    );
    assert_eq!(
        seen.usage.get("response_json:/message/usage/input_tokens"),
        Some(472)
    );
}

// ---- the API around it ----

#[test]
fn finish_is_idempotent_and_later_chunks_are_ignored() {
    let (_, body) = fixture!("openai_chat.json");
    let mut s = Scanner::new(JSON, None, &[], MAX);
    s.feed(body.as_bytes());
    assert_eq!(s.finish(), Outcome::Complete);
    assert!(!s.feed(b"{\"usage\":{\"prompt_tokens\":1}}"));
    assert_eq!(s.finish(), Outcome::Complete);
    assert_eq!(s.outcome_so_far(), Outcome::Complete);
    assert_eq!(s.usage().total_tokens, Some(29));
}

#[test]
fn meter_keys_and_labels() {
    assert_eq!(
        response_json_pointer("response_json:/usage/x"),
        Some("/usage/x")
    );
    assert_eq!(response_json_pointer("genai:input_tokens"), None);
    assert!(is_body_meter(INPUT_TOKENS) && is_body_meter(TOTAL_TOKENS));
    assert!(is_body_meter("response_json:/a") && !is_body_meter("calls"));
    assert_eq!(Outcome::Complete.as_str(), "complete");
    assert_eq!(Outcome::Unreadable(Reason::NotUtf8).to_string(), "not_utf8");
    assert_eq!(Reason::UnsupportedEncoding.as_str(), "unsupported_encoding");
    fn send<T: Send + Sync>() {}
    send::<Scanner>();
    let s = Scanner::new(SSE, None, &[], 10);
    assert!(format!("{s:?}").contains("Missing"));
}

// ---- properties ----

fn config() -> ProptestConfig {
    ProptestConfig {
        cases: 128,
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

/// Cut points that split `len` bytes into chunks (sorted, deduplicated).
fn cuts(len: usize) -> impl Strategy<Value = Vec<usize>> {
    prop::collection::vec(0..=len, 0..24).prop_map(|mut v| {
        v.sort_unstable();
        v.dedup();
        v
    })
}

fn chunked<'a>(bytes: &'a [u8], cuts: &[usize]) -> Vec<&'a [u8]> {
    let mut out = Vec::new();
    let mut at = 0;
    for &c in cuts {
        let c = c.min(bytes.len());
        out.push(&bytes[at..c.max(at)]);
        at = c.max(at);
    }
    out.push(&bytes[at..]);
    out
}

/// Pieces of SSE streams chosen for the traps: line ends of every kind, comments, names, [DONE], garbage,
/// non-UTF-8, usage of each provider, events with and without data.
const SSE_ATOMS: &[&str] = &[
    "data: {\"usage\":{\"prompt_tokens\":3,\"completion_tokens\":4,\"total_tokens\":7}}\n\n",
    "data: {\"type\":\"message_delta\",\"usage\":{\"output_tokens\":9}}\r\n\r\n",
    "data: {\"message\":{\"usage\":{\"input_tokens\":5,\"cache_read_input_tokens\":2}}}\r\r",
    "data: {\"usageMetadata\":{\"promptTokenCount\":1,\"totalTokenCount\":8}}\n\n",
    "data: {\"response\":{\"usage\":{\"input_tokens\":6,\"output_tokens\":1}}}\n\n",
    "data: {\"usage\":null}\n\n",
    "data: [DONE]\n\n",
    "event: message_start\n",
    ": comment\r\n",
    "data: {\"usage\":\n",
    "data: {\"prompt_tokens\":11}}\n",
    "\n",
    "\r\n",
    "\r",
    "data: garbage\n\n",
    "data: \u{e9}\u{2603}\n",
    "data:{\"n\":4}\n\n",
    "data: {\"n\":\"4.5\"}\n\n",
    "id: 1\nretry: 5\n",
    "data: {\"pad\":\"xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx\"}\n\n",
];

/// No pointers (the visitor path), or pointers (the `Value` path), including the root.
const POINTER_SETS: &[&[&str]] = &[&[], &["/usage/total_tokens", ""]];

fn sse_stream() -> impl Strategy<Value = Vec<u8>> {
    (
        prop::collection::vec(prop::sample::select(SSE_ATOMS), 0..30),
        prop::option::of(prop::collection::vec(any::<u8>(), 0..8)),
    )
        .prop_map(|(atoms, junk)| {
            let mut bytes = atoms.concat().into_bytes();
            if let Some(junk) = junk {
                bytes.extend(junk);
            }
            bytes
        })
}

/// JSON values with the usage carriers at the places the readers look, and elsewhere.
fn json_value() -> impl Strategy<Value = Value> {
    let count = prop_oneof![
        (0u64..1000).prop_map(|n| json!(n)),
        Just(json!(null)),
        Just(json!(-1)),
        Just(json!(2.5)),
        Just(json!(4.0)),
        Just(json!("17")),
        Just(json!("x")),
        Just(json!(u64::MAX)),
    ];
    let key = prop::sample::select(
        &[
            "prompt_tokens",
            "completion_tokens",
            "total_tokens",
            "input_tokens",
            "output_tokens",
            "cache_creation_input_tokens",
            "cache_read_input_tokens",
            "promptTokenCount",
            "candidatesTokenCount",
            "thoughtsTokenCount",
            "toolUsePromptTokenCount",
            "totalTokenCount",
            "other",
        ][..],
    );
    let leaf = prop_oneof![
        prop::collection::btree_map(key, count, 0..6)
            .prop_map(|m| Value::Object(m.into_iter().map(|(k, v)| (k.to_string(), v)).collect())),
        Just(json!(null)),
        Just(json!("s")),
        Just(json!(1)),
    ];
    leaf.prop_recursive(3, 32, 4, |inner| {
        let carrier = prop::sample::select(
            &[
                "usage",
                "usageMetadata",
                "response",
                "message",
                "choices",
                "x",
            ][..],
        );
        prop_oneof![
            prop::collection::btree_map(carrier, inner.clone(), 0..4).prop_map(|m| Value::Object(
                m.into_iter().map(|(k, v)| (k.to_string(), v)).collect()
            )),
            prop::collection::vec(inner, 0..4).prop_map(Value::Array),
        ]
    })
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn chunking_never_changes_a_fixture(index in 0usize..9, cuts in cuts(5000), gz in any::<bool>()) {
        let all = fixtures();
        let (name, body, ct, ..) = all[index];
        let bytes = if gz { gzip(body.as_bytes()) } else { body.as_bytes().to_vec() };
        let encoding = gz.then_some("gzip");
        let whole = scan_with(ct, encoding, &[], MAX, [&bytes[..]]);
        let seen = scan_with(ct, encoding, &[], MAX, chunked(&bytes, &cuts));
        prop_assert_eq!(seen, whole, "{}", name);
    }

    #[test]
    fn chunking_never_changes_an_sse_stream(
        stream in sse_stream(),
        cuts in cuts(2000),
        max in prop::sample::select(&[16usize, 70, 4096][..]),
        pointer in any::<bool>(),
    ) {
        let pointers: &[&str] = if pointer { &["/n"] } else { &[] };
        let whole = scan_with(SSE, None, pointers, max, [&stream[..]]);
        let seen = scan_with(SSE, None, pointers, max, chunked(&stream, &cuts));
        prop_assert_eq!(&seen, &whole);
        // Cut anywhere without finish: never a panic, and Partial only with some usage seen.
        let mut s = Scanner::new(SSE, None, &[], max);
        for chunk in chunked(&stream, &cuts) {
            s.feed(chunk);
            let so_far = s.outcome_so_far();
            prop_assert!(so_far != Outcome::Complete);
            prop_assert_eq!(so_far == Outcome::Partial, !s.usage().is_empty());
        }
    }

    #[test]
    fn random_bytes_never_panic_and_stay_bounded(
        bytes in prop::collection::vec(any::<u8>(), 0..4096),
        cuts in cuts(4096),
        ct in prop::sample::select(&[None, JSON, SSE, Some("text/plain")][..]),
        encoding in prop::sample::select(&[None, Some("gzip"), Some("deflate"), Some("br")][..]),
        max in prop::sample::select(&[0usize, 1, 64, 1024][..]),
        pointers in prop::sample::select(POINTER_SETS),
    ) {
        // scan_with asserts the bound after every chunk; finish must give some outcome.
        let seen = scan_with(ct, encoding, pointers, max, chunked(&bytes, &cuts));
        if seen.outcome == Outcome::Missing {
            prop_assert!(seen.usage.is_empty());
        }
        // The same bytes gzipped, too.
        let gz = gzip(&bytes);
        let _ = scan_with(ct, Some("gzip"), pointers, max, chunked(&gz, &cuts));
    }

    #[test]
    fn both_json_readers_agree(value in json_value()) {
        let text = value.to_string();
        let fast: Parts = read_parts(&text).unwrap().parts;
        let whole: Parts = read_document(&text, &[]).unwrap().parts;
        prop_assert_eq!(fast, whole, "{}", text);
    }
}

// ---- floors: content deltas sent ----

#[test]
fn content_deltas_of_every_stream_shape_are_counted_and_nothing_else() {
    let cases: [(&str, u64); 16] = [
        // OpenAI chat: content, refusal, reasoning, tool-call arguments; one per choice.
        (r#"{"choices":[{"delta":{"content":"Hi"}}]}"#, 1),
        (r#"{"choices":[{"delta":{"refusal":"No"}}]}"#, 1),
        (r#"{"choices":[{"delta":{"reasoning_content":"Hm"}}]}"#, 1),
        (
            r#"{"choices":[{"delta":{"tool_calls":[{"index":0,"function":{"arguments":"{\"a"}}]}}]}"#,
            1,
        ),
        (
            r#"{"choices":[{"index":0,"delta":{"content":"a"}},{"index":1,"delta":{"content":"b"}}]}"#,
            2,
        ),
        // Nothing sent: the role chunk, a tool call's name chunk, the finish chunk, the usage chunk.
        (
            r#"{"choices":[{"delta":{"role":"assistant","content":"","refusal":null}}]}"#,
            0,
        ),
        (
            r#"{"choices":[{"delta":{"tool_calls":[{"index":0,"id":"c","function":{"name":"f","arguments":""}}]}}]}"#,
            0,
        ),
        (
            r#"{"choices":[{"delta":{},"finish_reason":"stop"}],"usage":null}"#,
            0,
        ),
        (r#"{"choices":[],"usage":{"prompt_tokens":1}}"#, 0),
        // OpenAI responses: any `*.delta` event's string.
        (
            r#"{"type":"response.function_call_arguments.delta","delta":"{\"x"}"#,
            1,
        ),
        (r#"{"type":"response.output_text.delta","delta":""}"#, 0),
        // Anthropic: text, tool input, thinking; not the signature or the message_delta.
        (
            r#"{"type":"content_block_delta","delta":{"type":"input_json_delta","partial_json":"{\"q"}}"#,
            1,
        ),
        (
            r#"{"type":"content_block_delta","delta":{"type":"thinking_delta","thinking":"so"}}"#,
            1,
        ),
        (
            r#"{"type":"content_block_delta","delta":{"type":"signature_delta","signature":"EqQB"}}"#,
            0,
        ),
        (
            r#"{"type":"message_delta","delta":{"stop_reason":"end_turn"},"usage":{"output_tokens":9}}"#,
            0,
        ),
        // Odd types are valid JSON that sends nothing, not an error.
        (r#"{"choices":"x","delta":7}"#, 0),
    ];
    for (doc, want) in cases {
        assert_eq!(read_parts(doc).unwrap().deltas, want, "{doc}");
        assert_eq!(read_document(doc, &[]).unwrap().deltas, want, "{doc}");
    }
    // A whole JSON body (not a stream) is never floored: its usage is all or nothing.
    let mut s = Scanner::new(JSON, None, &[], MAX);
    s.feed(br#"{"choices":[{"delta":{"content":"Hi"}}]}"#);
    assert_eq!(s.finish(), Outcome::Missing);
    assert_eq!(s.usage(), &Usage::default());
}
