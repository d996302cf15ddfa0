//! `tollgate::catalog::parse` on arbitrary text (no `${VAR}` expansion: see var_expansion for that).
//!
//! Oracles: no panic; an error's position lies inside the file; a catalog that parsed is consistent
//! (names resolve to their index, no dangling reference, every path pattern compiles to itself).
#![no_main]

use libfuzzer_sys::fuzz_target;
use tollgate_fuzz::invariants::check_catalog_text;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        check_catalog_text(text);
    }
});
