//! Property tests of the parsers that face untrusted or hand-written input: request paths and patterns,
//! the catalog, `${VAR}` expansion, access-log entries and JWTs. The oracles live in
//! fuzz/src/invariants.rs and are shared with the fuzz targets (fuzz/README.md), so a proptest failure and a
//! fuzz crash mean the same thing; here the inputs are generated with structure (and shrunk on failure),
//! there they are mutated by coverage. Cases are bounded so the whole file runs in seconds in debug.

#[path = "../fuzz/src/invariants.rs"]
mod invariants;
#[path = "../fuzz/src/jwt.rs"]
mod jwt;

use std::collections::HashMap;
use std::sync::OnceLock;

use envoy_types::pb::envoy::config::core::v3::Metadata;
use envoy_types::pb::envoy::data::accesslog::v3::{
    AccessLogCommon, HttpAccessLogEntry, HttpRequestProperties, HttpResponseProperties,
};
use envoy_types::pb::google::protobuf::{
    Duration as PbDuration, Struct, Timestamp, UInt32Value, Value, value::Kind,
};
use proptest::prelude::*;
use prost::Message;
use tollgate::identity::jwt::JwtVerifier;
use tollgate::matching::path::{PathPattern, UnsafePath, sanitize};
use tollgate::source::Source;

use invariants::{
    check_access_log_entry, check_catalog, check_catalog_text, check_expansion, check_pattern,
    check_sanitize, secret_env,
};

fn config() -> ProptestConfig {
    ProptestConfig {
        cases: 256,
        // Failures are reproduced from the printed minimal case; no regression files in the tree.
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

/// Pieces of request paths chosen for the traps: dot segments raw and encoded, encoded slashes and
/// backslashes, double encoding, `;` parameters, wildcards, query and fragment, non-ASCII and controls.
const PATH_ATOMS: &[&str] = &[
    "/", "/", "/", "a", "b", "x", ".", "..", "%2e", "%2E", "%2f", "%2F", "%25", "%252e", "%5c",
    "\\", "%00", "%1f", "%7f", "%", "%g", ";", ";x", "*", "**", "%2A", "?", "?q=1", "#", "%23",
    "%3F", "é", "%c3%a9", "%c3", "%c2%85", "~",
];

fn raw_path() -> impl Strategy<Value = String> {
    (
        prop::bool::weighted(0.9),
        prop::collection::vec(prop::sample::select(PATH_ATOMS), 0..24),
    )
        .prop_map(|(absolute, atoms)| {
            let body = atoms.concat();
            if absolute { format!("/{body}") } else { body }
        })
}

/// Patterns as operators write them, plus the encoded and malformed ones.
fn pattern() -> impl Strategy<Value = String> {
    let segment =
        prop::sample::select(&["a", "b", "x", "*", "**", "%61", "%2A", "é", ".", "a*", ""][..]);
    (prop::collection::vec(segment, 0..6), prop::bool::ANY).prop_map(|(segments, slash)| {
        let mut p = format!("/{}", segments.join("/"));
        if slash && p.len() > 1 {
            p.push('/');
        }
        p
    })
}

/// Segments that survive sanitize unchanged and are literals in a pattern.
fn plain_segments() -> impl Strategy<Value = Vec<String>> {
    prop::collection::vec("[a-z0-9_~-]{1,6}", 1..20)
}

/// A `..` segment in one of the spellings sanitize must refuse.
fn traversal() -> impl Strategy<Value = &'static str> {
    prop::sample::select(
        &[
            "..",
            ".",
            "%2e%2e",
            "%2E%2e",
            ".%2e",
            "%2e.",
            "..;x",
            ".;",
            "%2e%2e;",
            "%252e%252e",
            "%252e",
            ".%252e",
        ][..],
    )
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn sanitized_paths_hold_no_traversal_and_split_like_a_naive_split(raw in raw_path()) {
        check_sanitize(&raw);
    }

    #[test]
    fn a_dot_segment_in_any_spelling_is_refused(
        before in plain_segments(),
        dots in traversal(),
        after in prop::collection::vec("[a-z]{1,4}", 0..3),
        query in prop::option::of("[a-z=&.]{0,8}"),
    ) {
        let mut raw = format!("/{}/{dots}", before.join("/"));
        for segment in &after {
            raw.push('/');
            raw.push_str(segment);
        }
        if let Some(q) = query {
            raw.push('?');
            raw.push_str(&q);
        }
        let refused = sanitize(&raw);
        prop_assert!(
            matches!(refused, Err(UnsafePath::DotSegment | UnsafePath::DoubleEncoding)),
            "{raw:?} was {refused:?}"
        );
    }

    #[test]
    fn compiled_patterns_match_as_the_documented_model_says(p in pattern(), raw in raw_path()) {
        check_pattern(&p, &raw);
    }

    #[test]
    fn a_path_matches_its_own_literal_pattern_and_its_prefixes(segments in plain_segments(), cut in 0usize..20) {
        let raw = format!("/{}", segments.join("/"));
        let path = sanitize(&raw).expect("plain segments are safe");
        let exact = PathPattern::parse(&raw).expect("a plain path is a pattern");
        prop_assert!(exact.matches(&path), "{raw} against itself");
        let cut = cut % segments.len();
        let prefix = format!("/{}", segments[..cut].join("/"));
        let prefix = if cut == 0 { "/**".to_owned() } else { format!("{prefix}/**") };
        let under = PathPattern::parse(&prefix).expect("a prefix pattern");
        prop_assert!(under.matches(&path), "{prefix} against {raw}");
        // The base of a `**` pattern itself is not under it.
        let base_raw = format!("/{}", segments[..cut].join("/"));
        let base = sanitize(&base_raw).expect("safe");
        prop_assert!(!under.matches(&base), "{prefix} against its own base");
    }

    #[test]
    fn catalog_text_never_panics_and_errors_are_located(text in catalog_text()) {
        check_catalog_text(&text);
    }

    #[test]
    fn a_consistent_catalog_parses_and_resolves(
        products in prop::collection::btree_set("[a-z]{1,8}", 1..6),
        apps in prop::collection::vec((any::<prop::sample::Index>(), prop::bool::ANY), 0..6),
    ) {
        let products: Vec<String> = products.into_iter().collect();
        let mut text = String::from("products:\n");
        for name in &products {
            text.push_str(&format!("  - name: p_{name}\n    operations: [{{api: a, paths: [/{name}/**]}}]\n"));
        }
        text.push_str("developers:\n");
        for (i, (product, approved)) in apps.iter().enumerate() {
            let status = if *approved { "approved" } else { "pending" };
            text.push_str(&format!(
                "  - email: dev{i}@example.com\n    apps:\n      - name: app{i}\n        products: [{{name: p_{}, status: {status}}}]\n",
                product.get(&products)
            ));
        }
        let catalog = tollgate::catalog::parse(&Source::from_text("catalog.yaml", text.clone()))
            .unwrap_or_else(|e| panic!("{text}\n{e}"));
        prop_assert_eq!(catalog.products().len(), products.len());
        prop_assert_eq!(catalog.app_count(), apps.len());
        check_catalog(&catalog);
    }

    #[test]
    fn expansion_never_echoes_secrets_and_keeps_lines(text in expansion_text()) {
        check_expansion(&text);
    }

    #[test]
    fn an_error_on_line_n_is_reported_on_line_n(
        lines in prop::collection::vec(prop::sample::select(&["k: ${A}", "k: \"${B}\"", "# ${NOPE}", "", "k: $${x}", "k: ${C:-d}"][..]), 0..12),
        at in any::<prop::sample::Index>(),
        bad in prop::sample::select(&["k: ${NOPE}", "k: ${A", "k: ${1A}", "k: ${A:x}"][..]),
        breaks in prop::sample::select(&["\n", "\r\n", "\r", "\u{2028}"][..]),
    ) {
        let mut lines: Vec<&str> = lines;
        let index = if lines.is_empty() { 0 } else { at.index(lines.len() + 1) };
        lines.insert(index, bad);
        let text = lines.join(breaks);
        let error = Source::from_text("c.yaml", text.clone())
            .expand_with(secret_env)
            .err()
            .unwrap_or_else(|| panic!("{text:?} should not expand"));
        prop_assert_eq!(error.position.map(|p| p.line), Some(index + 1), "{:?}: {}", text, error);
        prop_assert_eq!(error.position.map(|p| p.column), Some(4), "{:?}: {}", text, error);
        check_expansion(&text);
    }

    #[test]
    fn set_variables_reach_the_value_as_is(vars in prop::collection::vec(prop::sample::select(&["A", "B", "C", "H"][..]), 1..8)) {
        let text: String = vars.iter().enumerate().map(|(i, v)| format!("k{i}: x${{{v}}}y\n")).collect();
        let source = Source::from_text("c.yaml", text).expand_with(secret_env).expect("all set");
        let parsed: HashMap<String, String> = source.parse().expect("a flat map");
        for (i, v) in vars.iter().enumerate() {
            let want = format!("x{}y", secret_env(v).expect("set"));
            prop_assert_eq!(parsed.get(&format!("k{i}")), Some(&want));
        }
    }

    #[test]
    fn access_log_records_follow_their_entries(entry in access_log_entry()) {
        let now = now_ms();
        check_access_log_entry(&entry, now);
        // The bytes Envoy sends decode to the same entry and so to the same record.
        let decoded = HttpAccessLogEntry::decode(entry.encode_to_vec().as_slice()).expect("round trip");
        prop_assert_eq!(check_access_log_entry(&decoded, now), check_access_log_entry(&entry, now));
    }

    #[test]
    fn arbitrary_protobuf_bytes_never_break_the_record(bytes in prop::collection::vec(any::<u8>(), 0..256)) {
        if let Ok(entry) = HttpAccessLogEntry::decode(bytes.as_slice()) {
            check_access_log_entry(&entry, now_ms());
        }
    }

    #[test]
    fn only_the_minted_token_verifies(token in jwt_candidate()) {
        let rig = jwt_rig();
        let verified = rig.runtime.block_on(rig.verifier.verify(&token));
        prop_assert!(verified.is_err() || token == rig.valid, "{token:?} verified");
    }

    #[test]
    fn any_change_to_the_minted_token_is_refused(edits in prop::collection::vec((any::<prop::sample::Index>(), 0x21u8..0x7f), 1..4)) {
        let rig = jwt_rig();
        let mut bytes = rig.valid.clone().into_bytes();
        for (at, byte) in &edits {
            let at = at.index(bytes.len());
            bytes[at] = *byte;
        }
        let token = String::from_utf8(bytes).expect("ASCII edits");
        let verified = rig.runtime.block_on(rig.verifier.verify(&token));
        prop_assert!(verified.is_err() || token == rig.valid, "{token:?} verified");
    }
}

/// The minted token must verify, or the two JWT properties above would pass for a broken rig.
#[test]
fn the_minted_token_verifies() {
    let rig = jwt_rig();
    assert!(
        rig.runtime
            .block_on(rig.verifier.verify(&rig.valid))
            .is_ok()
    );
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

/// Catalog-shaped YAML lines, well-formed or not.
fn catalog_text() -> impl Strategy<Value = String> {
    let line = prop::sample::select(
        &[
            "products:",
            "developers:",
            "  - name: p",
            "  - name: q",
            "    operations: [{api: a, paths: [/x/**]}]",
            "    operations: [{api: a, paths: [x]}]",
            "    quota: {limit: 1, unit: minute}",
            "    quota: {limit: -1}",
            "    meter: {event_name: e, value: calls, success: [2xx]}",
            "    meter: {event_name: e, value: bogus}",
            "  - email: a@example.com",
            "    apps:",
            "      - name: app",
            "        products: [{name: p}]",
            "        products: [{name: nope}]",
            "        keys: [{hash: 'sha256:00'}]",
            "        client_id: c",
            "[",
            "{",
            "- ",
            ": ",
            "&a x",
            "*a",
            "!!binary x",
            "\t",
            "\u{feff}",
            "---",
            "...",
            "#",
            "\"\\u00",
        ][..],
    );
    prop::collection::vec(line, 0..16).prop_map(|lines| lines.join("\n"))
}

/// `${VAR}` references well-formed and not, line breaks of every kind, comments and YAML around them.
fn expansion_text() -> impl Strategy<Value = String> {
    let atom = prop::sample::select(
        &[
            "${A}",
            "${B}",
            "${H}",
            "${C:-dflt}",
            "${UNSET:-}",
            "${UNSET}",
            "$${",
            "$",
            "${",
            "}",
            "${1A}",
            "${A:x}",
            "k: ",
            "- ",
            "# ",
            "  ",
            "\n",
            "\r\n",
            "\r",
            "\u{85}",
            "\u{2028}",
            "\"",
            "'",
            "|",
            "[",
            "]",
            "{",
            ":",
            "products:",
            "  - name: ",
            "developers:",
            "  - email: ",
            "x",
        ][..],
    );
    prop::collection::vec(atom, 0..32).prop_map(|atoms| atoms.concat())
}

fn text(value: &str) -> Value {
    Value {
        kind: Some(Kind::StringValue(value.to_owned())),
    }
}

/// Entries as Envoy sends them, with forged times, durations, mixed-case headers and metadata of any kind.
fn access_log_entry() -> impl Strategy<Value = HttpAccessLogEntry> {
    let start = prop_oneof![
        Just(None),
        (any::<i64>(), any::<i32>()).prop_map(Some),
        (946_684_700i64..2_000_000_000, 0i32..1_000_000_000).prop_map(Some),
    ];
    let duration = prop_oneof![
        Just(None),
        (any::<i64>(), any::<i32>()).prop_map(Some),
        (0i64..100, 0i32..1_000_000_000).prop_map(Some),
    ];
    let headers = prop::collection::hash_map("[a-zA-Z-]{1,6}", "[ -~]{0,6}", 0..6);
    let field = prop::sample::select(
        &[
            "decision",
            "reason",
            "app",
            "product",
            "stripe_customer",
            "environment",
            "other",
        ][..],
    );
    let fields = prop::collection::vec((field, "[a-z]{0,5}", prop::bool::ANY), 0..8);
    (
        start,
        duration,
        headers,
        fields,
        prop::option::of("[a-z0-9-]{0,8}"),
        prop::option::of("[a-z0-9-]{0,8}"),
        prop::option::of(any::<u32>()),
        any::<u64>(),
    )
        .prop_map(
            |(start, duration, headers, fields, id, header_id, code, bytes)| {
                let authz = Struct {
                    fields: fields
                        .into_iter()
                        .map(|(k, v, as_text)| {
                            let value = if as_text {
                                text(&v)
                            } else {
                                Value {
                                    kind: Some(Kind::NumberValue(1.0)),
                                }
                            };
                            (k.to_owned(), value)
                        })
                        .collect(),
                };
                HttpAccessLogEntry {
                    common_properties: Some(AccessLogCommon {
                        start_time: start.map(|(seconds, nanos)| Timestamp { seconds, nanos }),
                        time_to_last_downstream_tx_byte: duration
                            .map(|(seconds, nanos)| PbDuration { seconds, nanos }),
                        metadata: Some(Metadata {
                            filter_metadata: [("envoy.filters.http.ext_authz".to_owned(), authz)]
                                .into_iter()
                                .collect(),
                            ..Default::default()
                        }),
                        ..Default::default()
                    }),
                    request: id.map(|request_id| HttpRequestProperties {
                        request_id,
                        request_headers: header_id
                            .into_iter()
                            .map(|v| ("x-request-id".to_owned(), v))
                            .collect(),
                        request_body_bytes: bytes,
                        ..Default::default()
                    }),
                    response: Some(HttpResponseProperties {
                        response_code: code.map(|value| UInt32Value { value }),
                        response_body_bytes: bytes / 2,
                        response_headers: headers,
                        ..Default::default()
                    }),
                    ..Default::default()
                }
            },
        )
}

struct JwtRig {
    runtime: tokio::runtime::Runtime,
    verifier: JwtVerifier,
    valid: String,
}

fn jwt_rig() -> &'static JwtRig {
    static RIG: OnceLock<JwtRig> = OnceLock::new();
    RIG.get_or_init(|| {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a tokio runtime");
        let verifier = runtime.block_on(jwt::verifier());
        JwtRig {
            runtime,
            verifier,
            valid: jwt::valid_token(),
        }
    })
}

/// Tokens near the valid one: its parts recombined with random ones, `alg` swapped, parts dropped or added.
fn jwt_candidate() -> impl Strategy<Value = String> {
    let valid = jwt::valid_token();
    let parts: Vec<String> = valid.split('.').map(str::to_owned).collect();
    let b64 = "[A-Za-z0-9_-]{0,40}";
    let alg = prop::sample::select(
        &[
            "none", "None", "HS384", "HS512", "RS256", "ES256", "EdDSA", "hs256", "",
        ][..],
    );
    prop_oneof![
        "[ -~]{0,80}",
        (b64, b64, b64).prop_map(|(a, b, c)| format!("{a}.{b}.{c}")),
        {
            let (h, p) = (parts[0].clone(), parts[1].clone());
            b64.prop_map(move |sig| format!("{h}.{p}.{sig}"))
        },
        {
            let (p, s) = (parts[1].clone(), parts[2].clone());
            alg.prop_map(move |alg| {
                use base64::Engine as _;
                let header = base64::engine::general_purpose::URL_SAFE_NO_PAD
                    .encode(format!(r#"{{"alg":"{alg}","typ":"JWT"}}"#));
                format!("{header}.{p}.{s}")
            })
        },
        {
            let valid = valid.clone();
            prop::sample::select(&["", ".", "..", " ", "=", ".x"][..])
                .prop_map(move |extra| format!("{valid}{extra}"))
        },
        {
            let (h, p) = (parts[0].clone(), parts[1].clone());
            Just(format!("{h}.{p}."))
        },
    ]
}
