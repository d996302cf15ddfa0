//! Oracles shared by the fuzz targets (`fuzz/fuzz_targets/`) and the property tests (`tests/properties.rs`,
//! which includes this file with `#[path]`), so a fuzz finding and a proptest failure mean the same thing.
//!
//! Only tollgate's public API and crates tollgate itself depends on are used here, because the file is
//! compiled both inside the fuzz crate and as part of the main crate's test suite. Every check panics with
//! a message naming the input: a panic is how libFuzzer and proptest both learn of a violation.

use std::collections::BTreeMap;

use envoy_types::pb::envoy::data::accesslog::v3::HttpAccessLogEntry;
use envoy_types::pb::google::protobuf::value::Kind;
use percent_encoding::percent_decode_str;
use tollgate::catalog::Catalog;
use tollgate::envoy::access_log::usage_record;
use tollgate::matching::path::{PathPattern, SafePath, sanitize};
use tollgate::metering::UsageRecord;
use tollgate::source::{Source, SourceError};

/// Earliest start `usage_record` takes at face value (2000-01-01T00:00:00Z), per its doc.
pub const EARLIEST_START_MS: i64 = 946_684_800_000;
/// How far ahead of the clock a start may lie, per `usage_record`'s doc (one day), plus a minute of slack
/// for the time between the call and this check.
pub const MAX_START_AHEAD_MS: i64 = 24 * 3_600 * 1_000 + 60_000;

/// `.`/`..` alone or before a `;` parameter: what sanitize promises no segment is (servlet `..;x` included).
/// Written independently of src so a bug there is not copied here.
pub fn is_dot_segment(segment: &[u8]) -> bool {
    let head = segment.split(|&b| b == b';').next().unwrap_or_default();
    head == b"." || head == b".."
}

/// The segments of a decoded path computed naively (split on `/`, one trailing slash ignored), to check
/// `SafePath::segments`, whose offsets are computed once and spill past 16 segments.
pub fn naive_segments(path: &str) -> Vec<&str> {
    let body = path.strip_prefix('/').unwrap_or(path);
    let body = if path.len() > 1 {
        body.strip_suffix('/').unwrap_or(body)
    } else {
        body
    };
    if body.is_empty() && path.len() <= 2 {
        // "/" and "//" both have no segments once the one insignificant trailing slash is dropped.
        return Vec::new();
    }
    body.split('/').collect()
}

/// Everything `sanitize` promises about one raw `:path` (with or without a query string).
pub fn check_sanitize(raw: &str) {
    let Ok(safe) = sanitize(raw) else {
        return;
    };
    let path = safe.as_str();
    assert!(
        path.starts_with('/'),
        "{raw:?}: sanitized {path:?} is not absolute"
    );
    // `#` may appear decoded (from `%23`): only a raw one is a fragment, and the upstream gets it raw.
    for forbidden in ['\\', '\0'] {
        assert!(
            !path.contains(forbidden),
            "{raw:?}: sanitized {path:?} holds {forbidden:?}"
        );
    }
    assert!(
        !path.chars().any(char::is_control),
        "{raw:?}: sanitized {path:?} holds a control character"
    );
    let segments: Vec<&str> = safe.segments().collect();
    assert_eq!(
        segments.len(),
        safe.segment_count(),
        "{raw:?}: segment_count disagrees"
    );
    assert_eq!(
        segments,
        naive_segments(path),
        "{raw:?}: segments of {path:?}"
    );
    for segment in &segments {
        assert!(
            !is_dot_segment(segment.as_bytes()),
            "{raw:?}: dot segment {segment:?} survived"
        );
    }
    // An upstream that decodes once more must see the same segments: no new slash, backslash, NUL or
    // control byte, and no dot segment (`%252e%252e` is `%2e%2e` after one decode).
    let twice: Vec<u8> = percent_decode_str(path).collect();
    let slashes = |b: &[u8]| b.iter().filter(|&&c| c == b'/').count();
    assert_eq!(
        slashes(&twice),
        slashes(path.as_bytes()),
        "{raw:?}: a second decode adds a slash"
    );
    assert!(
        !twice.iter().any(|&b| b == b'\\' || b.is_ascii_control()),
        "{raw:?}: a second decode of {path:?} yields a backslash, NUL or control byte"
    );
    for segment in twice.split(|&b| b == b'/') {
        assert!(
            !is_dot_segment(segment),
            "{raw:?}: a second decode of {path:?} yields a dot segment"
        );
    }
    // The query string never changes the path.
    if let Some((before, _)) = raw.split_once('?') {
        assert_eq!(
            sanitize(before).as_ref(),
            Ok(&safe),
            "{raw:?}: the query changed the path"
        );
    }
    // With nothing left to decode (and no decoded `?`/`#` that would read as query or fragment when sent
    // raw), sanitizing the result again is the identity.
    if !path.contains(['%', '?', '#']) {
        let again =
            sanitize(path).unwrap_or_else(|e| panic!("{raw:?}: re-sanitizing {path:?}: {e}"));
        assert_eq!(
            again.as_str(),
            path,
            "{raw:?}: re-sanitizing is not the identity"
        );
    }
}

/// A model of Apigee matching written from the table in `src/matching/path.rs`, over the pattern's own
/// sanitized segments: `*` one non-empty segment, a last `**` one or more further segments with at least one
/// non-empty, `/` everything. `raw_segments` are the pattern's segments as written (to tell `*` from `%2A`).
pub fn model_matches(pattern: &str, path: &SafePath<'_>) -> bool {
    if pattern == "/" {
        return true;
    }
    let Ok(decoded) = sanitize(pattern) else {
        return false;
    };
    let raw_body = pattern.strip_prefix('/').unwrap_or(pattern);
    let raw_body = raw_body.strip_suffix('/').unwrap_or(raw_body);
    let raw: Vec<&str> = raw_body.split('/').collect();
    let want: Vec<&str> = decoded.segments().collect();
    let got: Vec<&str> = path.segments().collect();
    let (fixed, prefix) = match raw.last() {
        Some(&"**") => (want.len() - 1, true),
        _ => (want.len(), false),
    };
    let accepts = |i: usize| match raw[i] {
        "*" => !got[i].is_empty(),
        _ => got[i] == want[i],
    };
    if prefix {
        got.len() > fixed && (0..fixed).all(accepts) && got[fixed..].iter().any(|s| !s.is_empty())
    } else {
        got.len() == fixed && (0..fixed).all(accepts)
    }
}

/// Compiles `pattern` and matches it against `raw_path`, checking the compiled pattern against the model
/// and its own invariants (`as_str` round trip, matching is insensitive to one trailing slash).
pub fn check_pattern(pattern: &str, raw_path: &str) {
    check_sanitize(pattern);
    check_sanitize(raw_path);
    let Ok(compiled) = PathPattern::parse(pattern) else {
        return;
    };
    assert_eq!(compiled.as_str(), pattern);
    assert_eq!(
        PathPattern::parse(compiled.as_str()).as_ref(),
        Ok(&compiled)
    );
    assert!(
        !pattern.contains(['?', '#']),
        "pattern {pattern:?} with a query or fragment compiled"
    );
    let Ok(path) = sanitize(raw_path) else {
        return;
    };
    let got = compiled.matches(&path);
    assert_eq!(
        got,
        model_matches(pattern, &path),
        "pattern {pattern:?} against {raw_path:?} (decoded {:?})",
        path.as_str()
    );
    // One trailing slash on the request is insignificant (a second one is not).
    if !raw_path.contains('?') && !raw_path.ends_with('/') {
        let slashed = format!("{raw_path}/");
        if let Ok(slashed_path) = sanitize(&slashed) {
            assert_eq!(
                compiled.matches(&slashed_path),
                got,
                "pattern {pattern:?}: {raw_path:?} and {slashed:?} disagree"
            );
        }
    }
}

/// Invariants of a catalog that parsed: names resolve to their own index, every cross reference is in
/// range, and every operation path is a pattern that compiles to itself.
pub fn check_catalog(catalog: &Catalog) {
    for (id, product) in catalog.products().iter().enumerate() {
        assert_eq!(
            catalog.product_id(&product.name),
            Some(id),
            "product {:?}",
            product.name
        );
        for op in &product.operations {
            for pattern in &op.paths {
                assert_eq!(PathPattern::parse(pattern.as_str()).as_ref(), Ok(pattern));
            }
        }
    }
    for developer in catalog.developers() {
        assert!(catalog.developer_by_email(&developer.email).is_some());
    }
    for (_, app) in catalog.apps() {
        assert!(
            catalog.developer(app.developer).is_some(),
            "app {:?}: dangling developer",
            app.name
        );
        for subscription in &app.products {
            assert!(
                catalog.product(subscription.product).is_some(),
                "app {:?}: dangling product",
                app.name
            );
        }
    }
    let mut keys = 0;
    for key in catalog.keys() {
        keys += 1;
        assert!(catalog.app(key.app).is_some(), "key with a dangling app");
        assert!(
            catalog.key(&key.hash).is_some(),
            "key not found by its own hash"
        );
    }
    assert_eq!(keys, catalog.key_count());
}

/// Lines as `Source` counts them (libyaml's breaks; `\r\n` is one), for checking error positions.
pub fn line_count(text: &str) -> usize {
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    let mut lines = 1;
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\r' => {
                if chars.peek() == Some(&'\n') {
                    chars.next();
                }
                lines += 1;
            }
            '\n' | '\u{85}' | '\u{2028}' | '\u{2029}' => lines += 1,
            _ => {}
        }
    }
    lines
}

/// A position, when present, lies inside the file as written.
pub fn check_position(error: &SourceError, original: &str) {
    if let Some(position) = error.position {
        assert!(
            position.line >= 1 && position.column >= 1,
            "{error}: 0-based position"
        );
        assert!(
            position.line <= line_count(original),
            "{error}: line {} past the {} lines of the file",
            position.line,
            line_count(original)
        );
    }
}

/// Parses `text` as a catalog (no expansion): errors must be located inside the file, successes consistent.
pub fn check_catalog_text(text: &str) {
    match tollgate::catalog::parse(&Source::from_text("catalog.yaml", text.to_owned())) {
        Ok(catalog) => check_catalog(&catalog),
        Err(error) => check_position(&error, text),
    }
}

/// The environment a `${VAR}` check expands with: `A`..`H` hold distinctive values, everything else is unset.
/// The values are long (so they are hidden from messages on every line, see src/source.rs) and hold no
/// YAML syntax, so YAML never rewrites them before a message could echo them.
pub fn secret_env(name: &str) -> Option<String> {
    let index = ["A", "B", "C", "D", "E", "F", "G", "H"]
        .iter()
        .position(|&n| n == name)?;
    Some(format!("Zq9SecretValue{index}x"))
}

/// Every value of [`secret_env`].
pub fn secret_values() -> Vec<String> {
    ["A", "B", "C", "D", "E", "F", "G", "H"]
        .iter()
        .filter_map(|n| secret_env(n))
        .collect()
}

/// `${VAR}` expansion of `text` with [`secret_env`], then the generic parse and the catalog parse:
/// no error message (expansion, YAML or catalog) echoes an environment value that the file does not spell
/// out itself, and every error position is inside the file as written (expansion never adds lines).
pub fn check_expansion(text: &str) {
    let secrets: Vec<String> = secret_values()
        .into_iter()
        .filter(|s| !text.contains(s.as_str()))
        .collect();
    let check = |error: &SourceError| {
        check_position(error, text);
        let shown = error.to_string();
        for secret in &secrets {
            // Substrings count too: a message cut short must not leak a prefix of a secret either.
            assert!(
                !shown.contains(&secret[..8]) || text.contains(&secret[..8]),
                "message echoes the value {secret:?}: {shown}"
            );
        }
    };
    let source = Source::from_text("config.yaml", text.to_owned());
    let expanded = match source.expand_with(secret_env) {
        Ok(expanded) => expanded,
        Err(error) => return check(&error),
    };
    assert_eq!(
        expanded.text(),
        text.strip_prefix('\u{feff}').unwrap_or(text),
        "text() is not the original"
    );
    if let Err(error) = expanded.parse::<serde_yaml_ng::Value>() {
        check(&error);
    }
    match tollgate::catalog::parse(&expanded) {
        Ok(catalog) => check_catalog(&catalog),
        Err(error) => check(&error),
    }
}

/// The record of one access-log entry, checked against the entry it came from; returns it for the caller.
/// `now_ms` is the clock read just before the call.
pub fn check_access_log_entry(entry: &HttpAccessLogEntry, now_ms: i64) -> UsageRecord {
    let record = usage_record(entry);
    let common = entry.common_properties.as_ref();
    // The start in exact arithmetic: taken at face value when surely in range, 0 when surely outside.
    let start = common
        .and_then(|c| c.start_time.as_ref())
        .map(|t| i128::from(t.seconds) * 1_000 + i128::from(t.nanos) / 1_000_000);
    match start {
        Some(ms) if ms >= i128::from(EARLIEST_START_MS) && ms <= i128::from(now_ms) => {
            assert_eq!(
                i128::from(record.start_ms),
                ms,
                "an in-range start was not kept"
            );
        }
        Some(ms)
            if ms < i128::from(EARLIEST_START_MS)
                || ms > i128::from(now_ms) + i128::from(MAX_START_AHEAD_MS) =>
        {
            assert_eq!(record.start_ms, 0, "an out-of-range start {ms} was kept");
        }
        None => assert_eq!(record.start_ms, 0, "a start without start_time"),
        Some(_) => {}
    }
    assert!(
        record.start_ms == 0
            || (EARLIEST_START_MS..=now_ms.saturating_add(MAX_START_AHEAD_MS))
                .contains(&record.start_ms),
        "start_ms {} outside [2000-01-01, now + 1 day]",
        record.start_ms
    );
    if let Some(d) = common.and_then(|c| c.time_to_last_downstream_tx_byte.as_ref()) {
        let us = i128::from(d.seconds) * 1_000_000 + i128::from(d.nanos) / 1_000;
        if us < 0 {
            assert_eq!(record.duration_us, 0, "a negative duration {d:?} was kept");
        } else if us <= i128::from(i64::MAX) - 1_000_000_000 {
            assert_eq!(i128::from(record.duration_us), us, "duration of {d:?}");
        } else {
            // Saturated (a forged entry): within |nanos| / 1000 (at most 2.2e6) of i64::MAX µs is fine.
            assert!(
                record.duration_us >= i64::MAX as u64 - 3_000_000,
                "duration of {d:?}"
            );
        }
    } else {
        assert_eq!(
            record.duration_us, 0,
            "a duration without time_to_last_downstream_tx_byte"
        );
    }
    let request = entry.request.as_ref();
    let want_id = request
        .map(|r| {
            if r.request_id.is_empty() {
                r.request_headers
                    .get("x-request-id")
                    .cloned()
                    .unwrap_or_default()
            } else {
                r.request_id.clone()
            }
        })
        .unwrap_or_default();
    assert_eq!(record.request_id, want_id);
    assert_eq!(
        record.request_bytes,
        request.map_or(0, |r| r.request_body_bytes)
    );
    let response = entry.response.as_ref();
    assert_eq!(
        record.response_bytes,
        response.map_or(0, |r| r.response_body_bytes)
    );
    assert_eq!(
        record.response_code,
        response
            .and_then(|r| r.response_code)
            .map_or(0, |c| c.value)
    );
    // Header names are lower-cased, and each one comes from a header the entry carried.
    let sent: BTreeMap<String, Vec<&String>> = response
        .map(|r| {
            let mut by_name: BTreeMap<String, Vec<&String>> = BTreeMap::new();
            for (k, v) in &r.response_headers {
                by_name.entry(k.to_ascii_lowercase()).or_default().push(v);
            }
            by_name
        })
        .unwrap_or_default();
    assert_eq!(
        record.response_headers.keys().collect::<Vec<_>>(),
        sent.keys().collect::<Vec<_>>(),
        "header names"
    );
    for (name, value) in &record.response_headers {
        assert!(
            sent[name].contains(&value),
            "header {name:?} has a value no header carried"
        );
    }
    // Every metadata field is the string the ext_authz namespace carries, or empty for any other kind.
    let authz = common
        .and_then(|c| c.metadata.as_ref())
        .and_then(|m| m.filter_metadata.get("envoy.filters.http.ext_authz"));
    let field = |key: &str| match authz
        .and_then(|s| s.fields.get(key))
        .and_then(|v| v.kind.as_ref())
    {
        Some(Kind::StringValue(s)) => s.clone(),
        _ => String::new(),
    };
    let fields = [
        ("decision", &record.decision),
        ("reason", &record.reason),
        ("app", &record.app),
        ("developer", &record.developer),
        ("company", &record.company),
        ("stripe_customer", &record.stripe_customer),
        ("product", &record.product),
        ("operation", &record.operation),
        ("api", &record.api),
        ("environment", &record.environment),
    ];
    for (key, got) in fields {
        assert_eq!(*got, field(key), "metadata field {key}");
    }
    record
}
