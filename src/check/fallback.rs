//! The local count that takes over a bucket while the shared quota store fails (`on_store_error: allow`).
//!
//! Starting that count at zero would hand a bucket near its limit a whole fresh quota on every replica for
//! as long as the store is down. Instead each replica remembers, per bucket, what the store last reported
//! for the limit with the fewest units left, and the local count starts from there.
//!
//! The bound: during an outage, a bucket's tightest limit (as last reported) is overrun by at most what the
//! other replicas serve from their own copy of the same starting point, i.e. `(replicas - 1) × remaining`
//! at the moment the store failed; limits that were not the tightest start from zero locally and can each be
//! overrun by up to `replicas × limit` within their window. Nothing is remembered for APIs whose store errors
//! fail closed, so the default (`deny`) costs the Check path nothing.

use dashmap::DashMap;

use crate::quota::memory::MemoryStore;
use crate::quota::{Charge, Limit, LimitState, Outcome, QuotaStore, Window};

/// What the shared store last said about one bucket's tightest limit.
#[derive(Debug, Clone, Copy)]
struct Seen {
    limit: Limit,
    window: Window,
    used: u64,
}

/// The per-replica stand-in for the shared quota store.
#[derive(Debug, Default)]
pub struct Fallback {
    local: MemoryStore,
    seen: DashMap<Box<str>, Seen>,
}

impl Fallback {
    /// An empty fallback.
    pub fn new() -> Self {
        Self::default()
    }

    /// Remembers where the shared store put `charge`'s bucket.
    pub fn observe(&self, charge: &Charge<'_>, outcome: &Outcome) {
        let (Outcome::Allowed(state) | Outcome::Exceeded(state)) = outcome;
        let Some(limit) = limit_of(charge, state) else {
            return;
        };
        let seen = Seen {
            limit,
            window: limit.window(charge.now),
            used: limit.limit.saturating_sub(state.remaining),
        };
        match self.seen.get_mut(charge.bucket) {
            Some(mut entry) => *entry = seen,
            None => {
                self.seen.insert(charge.bucket.into(), seen);
            }
        }
    }

    /// Charges locally, starting from what the shared store last reported for the bucket.
    pub async fn charge(&self, charge: &Charge<'_>) -> Outcome {
        if let Some(seen) = self.seen.get(charge.bucket).map(|s| *s)
            && seen.window.end > charge.now
            && charge.limits.contains(&seen.limit)
        {
            self.local
                .raise(charge.bucket, &seen.limit, seen.window, seen.used);
        }
        match self.local.charge(charge).await {
            Ok(outcome) => outcome,
            // The memory store never fails; refuse rather than guess if that ever changes.
            Err(_) => Outcome::Exceeded(LimitState {
                limit: 0,
                remaining: 0,
                reset_secs: 1,
            }),
        }
    }

    /// Forgets windows that ended before `now`.
    pub async fn sweep(&self, now: i64) {
        self.local.sweep(now).await;
        self.seen.retain(|_, seen| seen.window.end > now);
    }
}

/// The limit of `charge` that `state` describes: the one with its limit and window end.
fn limit_of(charge: &Charge<'_>, state: &LimitState) -> Option<Limit> {
    let now = charge.now;
    charge
        .limits
        .iter()
        .find(|l| l.limit == state.limit && l.window(now).seconds_left(now) == state.reset_secs)
        .or_else(|| charge.limits.iter().find(|l| l.limit == state.limit))
        .copied()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quota::Unit;

    const NOW: i64 = 1_795_000_000;

    fn charge<'a>(limits: &'a [Limit]) -> Charge<'a> {
        Charge {
            bucket: "app\u{1f}gold",
            limits,
            cost: 1,
            now: NOW,
        }
    }

    #[tokio::test]
    async fn the_local_count_starts_where_the_store_left_the_bucket() {
        let limits = [Limit {
            limit: 10,
            interval: 1,
            unit: Unit::Day,
        }];
        let fallback = Fallback::new();
        let reset_secs = limits[0].window(NOW).seconds_left(NOW);
        let state = LimitState {
            limit: 10,
            remaining: 2,
            reset_secs,
        };
        fallback.observe(&charge(&limits), &Outcome::Allowed(state));
        let outcomes = [
            fallback.charge(&charge(&limits)).await,
            fallback.charge(&charge(&limits)).await,
            fallback.charge(&charge(&limits)).await,
        ];
        assert!(matches!(outcomes[0], Outcome::Allowed(s) if s.remaining == 1));
        assert!(matches!(outcomes[1], Outcome::Allowed(s) if s.remaining == 0));
        assert!(matches!(outcomes[2], Outcome::Exceeded(_)), "{outcomes:?}");

        // A new window owes nothing to the old report.
        let later = Charge {
            now: NOW + 86_400,
            ..charge(&limits)
        };
        fallback.sweep(NOW + 86_400).await;
        assert!(matches!(fallback.charge(&later).await, Outcome::Allowed(s) if s.remaining == 9));
    }
}
