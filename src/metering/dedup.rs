//! The index that makes an access-log entry seen twice count once.
//!
//! An entry is recognised by its request id together with what makes it that request: its start time,
//! duration, response status and app. Envoy re-sending an entry (a retried access-log stream) repeats all of
//! them; distinct calls that share an `x-request-id` (mesh callers that propagate one, Envoy's
//! `preserve_external_request_id`) differ in at least the start or the duration, and so are each billed.
//!
//! It keeps a keyed 64-bit hash of every such identity for `horizon` after the first copy arrived: about 40
//! bytes per entry (1.4 M entries, ~60 MB, at 10k req/s with the default 140 s horizon). A false duplicate
//! needs a SipHash collision under a per-process random key among the entries inside one horizon, about
//! n²/2⁶⁵.

use std::collections::hash_map::RandomState;
use std::collections::{HashMap, VecDeque};
use std::hash::BuildHasher;

use super::record::UsageRecord;

/// What identifies one entry: its request id and the facts a re-sent copy repeats.
fn identity(r: &UsageRecord) -> (&str, i64, u64, u32, &str) {
    (
        &r.request_id,
        r.start_ms,
        r.duration_us,
        r.response_code,
        &r.app,
    )
}

/// Request ids seen within the horizon.
#[derive(Debug)]
pub(crate) struct Dedup {
    keys: RandomState,
    /// id hash -> when it is forgotten (Unix ms).
    seen: HashMap<u64, i64>,
    /// (forget at, id hash) in arrival order; entries removed from `seen` are skipped lazily.
    order: VecDeque<(i64, u64)>,
    horizon_ms: i64,
}

impl Dedup {
    /// An empty index that remembers ids for `horizon_ms`.
    pub(crate) fn new(horizon_ms: i64) -> Self {
        Dedup {
            keys: RandomState::new(),
            seen: HashMap::new(),
            order: VecDeque::new(),
            horizon_ms,
        }
    }

    /// Records `record` as seen at `now_ms`; false if it was already seen within the horizon. Records without
    /// a request id are never duplicates (there is nothing to recognise them by).
    pub(crate) fn insert(&mut self, record: &UsageRecord, now_ms: i64) -> bool {
        if record.request_id.is_empty() {
            return true;
        }
        let hash = self.keys.hash_one(identity(record));
        let forget_at = now_ms.saturating_add(self.horizon_ms);
        match self.seen.entry(hash) {
            std::collections::hash_map::Entry::Occupied(_) => false,
            std::collections::hash_map::Entry::Vacant(slot) => {
                slot.insert(forget_at);
                self.order.push_back((forget_at, hash));
                true
            }
        }
    }

    /// Forgets `record` again (its batch was not made durable).
    pub(crate) fn remove(&mut self, record: &UsageRecord) {
        if !record.request_id.is_empty() {
            self.seen.remove(&self.keys.hash_one(identity(record)));
        }
    }

    /// Forgets ids whose horizon ended by `now_ms`.
    pub(crate) fn expire(&mut self, now_ms: i64) {
        while let Some(&(forget_at, hash)) = self.order.front() {
            if forget_at > now_ms {
                break;
            }
            self.order.pop_front();
            if self.seen.get(&hash) == Some(&forget_at) {
                self.seen.remove(&hash);
            }
        }
    }

    /// How many ids are remembered.
    pub(crate) fn len(&self) -> usize {
        self.seen.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(id: &str, start_ms: i64) -> UsageRecord {
        UsageRecord {
            request_id: id.into(),
            start_ms,
            duration_us: 1_500,
            response_code: 200,
            app: "weatherapp".into(),
            ..UsageRecord::default()
        }
    }

    #[test]
    fn a_second_copy_within_the_horizon_is_a_duplicate() {
        let mut d = Dedup::new(1_000);
        assert!(d.insert(&entry("a", 7), 0));
        assert!(!d.insert(&entry("a", 7), 999));
        assert!(d.insert(&entry("b", 7), 10));
        d.expire(999);
        assert!(!d.insert(&entry("a", 7), 999));
        d.expire(1_000);
        assert_eq!(d.len(), 1);
        assert!(
            d.insert(&entry("a", 7), 1_000),
            "forgotten after the horizon"
        );
    }

    #[test]
    fn distinct_calls_sharing_a_request_id_each_count() {
        let mut d = Dedup::new(1_000);
        assert!(d.insert(&entry("mesh-id", 7), 0));
        assert!(d.insert(&entry("mesh-id", 8), 0), "another start");
        let mut slower = entry("mesh-id", 7);
        slower.duration_us += 1;
        assert!(d.insert(&slower, 0), "another duration");
        let mut failed = entry("mesh-id", 7);
        failed.response_code = 503;
        assert!(d.insert(&failed, 0), "another status");
        let mut other_app = entry("mesh-id", 7);
        other_app.app = "geoapp".into();
        assert!(d.insert(&other_app, 0), "another app");
        assert!(!d.insert(&entry("mesh-id", 7), 0), "the same entry again");
    }

    #[test]
    fn removed_entries_count_again_and_empty_ids_never_collide() {
        let mut d = Dedup::new(1_000);
        assert!(d.insert(&entry("a", 7), 0));
        d.remove(&entry("a", 7));
        assert!(d.insert(&entry("a", 7), 5));
        d.expire(1_000);
        assert!(
            !d.insert(&entry("a", 7), 1_000),
            "the stale queue entry of the removed copy must not evict the new one"
        );
        d.expire(1_005);
        assert!(d.insert(&entry("a", 7), 1_005));
        assert!(d.insert(&entry("", 7), 0));
        assert!(d.insert(&entry("", 7), 0));
    }
}
