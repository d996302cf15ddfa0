//! `tollgate::envoy::access_log::usage_record` on arbitrary protobuf bytes decoded as Envoy's
//! `HTTPAccessLogEntry` (bytes that do not decode are skipped: tonic refuses them before tollgate sees them).
//!
//! Oracles (fuzz/src/invariants.rs): start_ms is 0 or within [2000-01-01, now + 1 day] and kept exactly when
//! surely in range; the duration is the entry's, clamped at 0 and saturated; ids, sizes, status, lower-cased
//! response headers and the ext_authz metadata fields are what the entry carried.
#![no_main]

use envoy_types::pb::envoy::data::accesslog::v3::HttpAccessLogEntry;
use libfuzzer_sys::fuzz_target;
use prost::Message;
use tollgate_fuzz::invariants::check_access_log_entry;

fuzz_target!(|data: &[u8]| {
    let Ok(entry) = HttpAccessLogEntry::decode(data) else {
        return;
    };
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX));
    check_access_log_entry(&entry, now_ms);
});
