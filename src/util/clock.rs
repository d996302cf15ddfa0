//! The wall clock as the integers quota windows, usage records and Stripe timestamps are kept in.
//!
//! A clock before 1970 reads as 0 and one past `i64::MAX` saturates: neither is a time any window, record or
//! meter event can hold, so callers need no error path for them.

use std::time::{SystemTime, UNIX_EPOCH};

/// Seconds since the Unix epoch.
pub fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seconds_and_milliseconds_agree() {
        let (s, ms) = (unix_now(), now_ms());
        assert!(s > 1_600_000_000, "{s}");
        assert!((ms / 1000 - s).abs() <= 1, "{ms} vs {s}");
    }
}
