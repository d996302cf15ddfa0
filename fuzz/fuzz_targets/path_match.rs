//! `tollgate::matching::path`: `sanitize` on arbitrary `:path`s and Apigee patterns compiled and matched.
//!
//! Input: text, `pattern\npath` (the first line is compiled as a pattern, the rest is the request path);
//! the whole input is also sanitized as a path. Oracles: fuzz/src/invariants.rs (no dot segment or encoded
//! traversal survives sanitize, even decoded twice; segments agree with a naive split; matching agrees
//! with a model of the documented table).
#![no_main]

use libfuzzer_sys::fuzz_target;
use tollgate_fuzz::invariants::{check_pattern, check_sanitize};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    check_sanitize(text);
    let (pattern, path) = text.split_once('\n').unwrap_or((text, "/"));
    check_pattern(pattern, path);
});
