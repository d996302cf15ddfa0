//! `${VAR}` expansion (`tollgate::source::Source::expand_with`), then YAML and catalog parsing of the result.
//!
//! Variables `A`..`H` are set to distinctive values, the rest unset. Oracles: no panic; no error message
//! echoes a value from the environment (unless the file spells it out itself); every error position is
//! inside the file as written, i.e. expansion kept the line count; `text()` is the original.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tollgate_fuzz::invariants::check_expansion;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        check_expansion(text);
    }
});
