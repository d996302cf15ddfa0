//! Naming and expiry of the Redis keys: one hash per (bucket, unit, interval, window start).

use super::super::Unit;

/// Keys live this long after their window ends, so late lease returns still find them.
pub const KEY_GRACE_SECS: i64 = 120;

/// `tollgate:quota:{<bucket>}:<unit>:<interval>:<window start>`; the `{<bucket>}` hash tag keeps every key
/// of a bucket on one Redis Cluster slot, so one script can touch all of them.
pub(super) fn window_key(bucket: &str, unit: Unit, interval: u32, start: i64) -> String {
    let mut key = String::with_capacity(bucket.len() + 48);
    key.push_str("tollgate:quota:");
    push_tag(&mut key, bucket);
    key.push(':');
    key.push_str(unit.as_str());
    key.push(':');
    key.push_str(&interval.max(1).to_string());
    key.push(':');
    key.push_str(&start.to_string());
    key
}

/// `tollgate:holds:{<bucket>}`: the token quota reserves held on a bucket (request id -> `reserve|window
/// key|…`, or `released`), in the slot of the bucket's windows so one script settles both.
pub(super) fn holds_key(bucket: &str) -> String {
    let mut key = String::from("tollgate:holds:");
    push_tag(&mut key, bucket);
    key
}

/// `tollgate:holds:{<bucket>}:due`: the bucket's held request ids scored by when they are released.
pub(super) fn holds_due_key(bucket: &str) -> String {
    let mut key = holds_key(bucket);
    key.push_str(":due");
    key
}

/// The set of buckets that may have holds to release (any slot: read one bucket at a time).
pub(super) const HOLDS_INDEX: &str = "tollgate:holds:buckets";

/// `{<bucket>}`: the hash tag of a bucket's keys. Braces in the name would end the tag early and split a
/// bucket's keys over slots, so they are escaped.
fn push_tag(key: &mut String, bucket: &str) {
    key.push('{');
    for c in bucket.chars() {
        match c {
            '%' => key.push_str("%25"),
            '{' => key.push_str("%7B"),
            '}' => key.push_str("%7D"),
            c => key.push(c),
        }
    }
    key.push('}');
}

/// Seconds a key of a window ending at `end` must live from `now`: the rest of the window plus the grace.
pub(super) fn ttl(end: i64, now: i64) -> i64 {
    end.saturating_sub(now)
        .max(1)
        .saturating_add(KEY_GRACE_SECS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_share_a_hash_tag_and_escape_braces() {
        let k = window_key("app/prod/op", Unit::Minute, 1, 60);
        assert_eq!(k, "tollgate:quota:{app/prod/op}:minute:1:60");
        let k = window_key("a}b{c%", Unit::Day, 2, 0);
        assert_eq!(k, "tollgate:quota:{a%7Db%7Bc%25}:day:2:0");
    }
}
