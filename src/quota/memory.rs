//! The in-memory quota store: exact counters for a single replica.

use async_trait::async_trait;
use std::sync::atomic::{AtomicU64, Ordering};

use dashmap::DashMap;
use serde::{Deserialize, Serialize};

use super::{
    Charge, Hold, Limit, LimitState, LimitUsage, Outcome, QuotaStore, Settled, StoreError, Unit,
    Window,
};

/// One live counter as [`MemoryStore::snapshot`] exports it and [`MemoryStore::restore`] takes it back.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CounterRecord {
    /// The bucket the counter belongs to.
    pub bucket: String,
    /// The limit's unit.
    pub unit: Unit,
    /// The limit's interval in units.
    pub interval: u32,
    /// The window's start, Unix seconds.
    pub window_start: i64,
    /// The window's end (exclusive), Unix seconds.
    pub window_end: i64,
    /// Units spent in the window.
    pub used: u64,
}

/// Where a token quota reserve stands.
#[derive(Debug)]
enum HoldState {
    /// Charged and waiting for its settlement.
    Held(Held),
    /// Given back by its timeout; forgotten once `forget` (the end of its last window) has passed.
    Released { forget: i64 },
}

/// A token quota reserve held for a call.
#[derive(Debug)]
struct Held {
    bucket: Box<str>,
    limits: Vec<Limit>,
    reserve: u64,
    at: i64,
    until: i64,
}

/// Counters of one window length of one bucket.
#[derive(Debug, Clone, Copy)]
struct Counter {
    unit: Unit,
    interval: u32,
    window_start: i64,
    window_end: i64,
    used: u64,
}

/// Keeps counters in a sharded map; each bucket's limits are updated under one shard lock, so a call that
/// must fit several limits is charged atomically.
#[derive(Debug, Default)]
pub struct MemoryStore {
    buckets: DashMap<Box<str>, Vec<Counter>>,
    /// Token quota reserves by request id: held, or released by their timeout (kept until their last window
    /// ends, so a late settlement knows). Not persisted: after a restart a settlement of an unknown id counts
    /// as held, which the restored counters already include.
    holds: DashMap<Box<str>, HoldState>,
    /// Bumped by every charge, so the persister writes only when something changed.
    changes: AtomicU64,
}

impl MemoryStore {
    /// An empty store; a bucket appears on its first charge and goes when `sweep` finds its windows ended.
    pub fn new() -> Self {
        Self::default()
    }

    /// Number of buckets with a live window, i.e. what `sweep` has not reclaimed yet.
    pub fn buckets(&self) -> usize {
        self.buckets.len()
    }

    /// A number that differs whenever a charge may have changed a counter since it was last read.
    pub fn changes(&self) -> u64 {
        self.changes.load(Ordering::Relaxed)
    }

    /// Every counter whose window is still open at `now`.
    pub fn snapshot(&self, now: i64) -> Vec<CounterRecord> {
        let mut out = Vec::new();
        for entry in &self.buckets {
            for c in entry.value().iter().filter(|c| c.window_end > now) {
                out.push(CounterRecord {
                    bucket: entry.key().to_string(),
                    unit: c.unit,
                    interval: c.interval,
                    window_start: c.window_start,
                    window_end: c.window_end,
                    used: c.used,
                });
            }
        }
        out
    }

    /// Takes back counters from a snapshot, skipping windows closed at `now` and any that do not match
    /// their unit's calendar (a hand-edited or foreign file); a counter already present keeps the larger count.
    pub fn restore(&self, records: impl IntoIterator<Item = CounterRecord>, now: i64) -> usize {
        let mut restored = 0;
        for r in records {
            let limit = Limit {
                limit: 0,
                interval: r.interval.max(1),
                unit: r.unit,
            };
            let window = limit.window(r.window_start);
            if r.window_end <= now || window.start != r.window_start || window.end != r.window_end {
                continue;
            }
            self.raise(&r.bucket, &limit, window, r.used);
            restored += 1;
        }
        restored
    }

    /// Makes `bucket`'s counter of `limit` in `window` at least `used`: what a shared store last reported,
    /// so a local count that takes over from it starts there rather than at zero.
    pub fn raise(&self, bucket: &str, limit: &Limit, window: Window, used: u64) {
        let mut counters = self.buckets.entry(bucket.into()).or_default();
        match counters
            .iter_mut()
            .find(|c| c.unit == limit.unit && c.interval == limit.interval)
        {
            Some(c) if c.window_start == window.start => c.used = c.used.max(used),
            Some(c) if c.window_start < window.start => {
                c.window_start = window.start;
                c.window_end = window.end;
                c.used = used;
            }
            Some(_) => {}
            None => counters.push(Counter {
                unit: limit.unit,
                interval: limit.interval,
                window_start: window.start,
                window_end: window.end,
                used,
            }),
        }
    }

    /// Adds `delta` to `bucket`'s counter of each of `limits` in the window containing `at`, if that window is
    /// still counted; never below 0, never refusing.
    fn add(&self, bucket: &str, limits: &[Limit], delta: i64, at: i64) {
        if delta == 0 {
            return;
        }
        if let Some(mut counters) = self.buckets.get_mut(bucket) {
            for limit in limits {
                let window = limit.window(at);
                if let Some(c) = counters.iter_mut().find(|c| {
                    c.unit == limit.unit
                        && c.interval == limit.interval
                        && c.window_start == window.start
                }) {
                    c.used = c.used.saturating_add_signed(delta);
                }
            }
            self.changes.fetch_add(1, Ordering::Relaxed);
        }
    }

    fn charge_counters(counters: &mut Vec<Counter>, charge: &Charge<'_>) -> Outcome {
        // Plans rarely have more than a few limits: no allocation per request for those.
        let mut inline = [0usize; 4];
        let mut spilled = Vec::new();
        let slots: &mut [usize] = if charge.limits.len() <= inline.len() {
            &mut inline[..charge.limits.len()]
        } else {
            spilled.resize(charge.limits.len(), 0);
            &mut spilled
        };
        for (slot, limit) in slots.iter_mut().zip(charge.limits) {
            *slot = Self::slot(counters, limit, charge.now);
        }
        let slots = &*slots;
        for (limit, &slot) in charge.limits.iter().zip(slots) {
            let c = &counters[slot];
            if c.used.saturating_add(charge.cost) > limit.limit {
                return Outcome::Exceeded(LimitState {
                    limit: limit.limit,
                    remaining: limit.limit.saturating_sub(c.used),
                    reset_secs: window_secs_left(c, charge.now),
                });
            }
        }
        let mut tightest: Option<LimitState> = None;
        for (limit, &slot) in charge.limits.iter().zip(slots) {
            let c = &mut counters[slot];
            c.used = c.used.saturating_add(charge.cost);
            let state = LimitState {
                limit: limit.limit,
                remaining: limit.limit.saturating_sub(c.used),
                reset_secs: window_secs_left(c, charge.now),
            };
            if tightest.is_none_or(|t| state.remaining < t.remaining) {
                tightest = Some(state);
            }
        }
        // A charge with no limits is not sent to a store; report an unlimited-looking state defensively.
        Outcome::Allowed(tightest.unwrap_or(LimitState {
            limit: u64::MAX,
            remaining: u64::MAX,
            reset_secs: 0,
        }))
    }

    /// Index of the counter for `limit`'s window length, reset when its window has moved on.
    fn slot(counters: &mut Vec<Counter>, limit: &Limit, now: i64) -> usize {
        let window = limit.window(now);
        let found = counters
            .iter()
            .position(|c| c.unit == limit.unit && c.interval == limit.interval);
        match found {
            Some(i) => {
                let c = &mut counters[i];
                if c.window_start != window.start {
                    c.window_start = window.start;
                    c.window_end = window.end;
                    c.used = 0;
                }
                i
            }
            None => {
                counters.push(Counter {
                    unit: limit.unit,
                    interval: limit.interval,
                    window_start: window.start,
                    window_end: window.end,
                    used: 0,
                });
                counters.len() - 1
            }
        }
    }
}

fn window_secs_left(c: &Counter, now: i64) -> u64 {
    u64::try_from(c.window_end.saturating_sub(now))
        .unwrap_or(0)
        .max(1)
}

#[async_trait]
impl QuotaStore for MemoryStore {
    async fn charge(&self, charge: &Charge<'_>) -> Result<Outcome, StoreError> {
        self.changes.fetch_add(1, Ordering::Relaxed);
        if let Some(mut counters) = self.buckets.get_mut(charge.bucket) {
            return Ok(Self::charge_counters(&mut counters, charge));
        }
        let mut counters = self.buckets.entry(charge.bucket.into()).or_default();
        Ok(Self::charge_counters(&mut counters, charge))
    }

    async fn usage(
        &self,
        bucket: &str,
        limits: &[Limit],
        now: i64,
    ) -> Result<Vec<LimitUsage>, StoreError> {
        let counters = self.buckets.get(bucket);
        Ok(limits
            .iter()
            .map(|limit| {
                let window = limit.window(now);
                let used = counters
                    .as_deref()
                    .and_then(|counters| {
                        counters.iter().find(|c| {
                            c.unit == limit.unit
                                && c.interval == limit.interval
                                && c.window_start == window.start
                        })
                    })
                    .map_or(0, |c| c.used);
                LimitUsage {
                    limit: *limit,
                    window,
                    used,
                    reserved: 0,
                }
            })
            .collect())
    }

    async fn hold(&self, hold: &Hold<'_>) -> Result<(), StoreError> {
        let held = Held {
            bucket: hold.bucket.into(),
            limits: hold.limits.to_vec(),
            reserve: hold.reserve,
            at: hold.at,
            until: hold.until,
        };
        self.holds.insert(hold.id.into(), HoldState::Held(held));
        Ok(())
    }

    async fn settle(&self, hold: &Hold<'_>, used: u64) -> Result<Settled, StoreError> {
        let used = i64::try_from(used).unwrap_or(i64::MAX);
        let reserve = i64::try_from(hold.reserve).unwrap_or(i64::MAX);
        // One removal decides: a release racing this settlement either ran before (the mark is here) or finds
        // nothing to release.
        match self.holds.remove(hold.id) {
            Some((_, HoldState::Released { .. })) => {
                self.add(hold.bucket, hold.limits, used, hold.at);
                Ok(Settled::Released)
            }
            // The windows the Check charged, as held (the access log's start may lie across a boundary).
            Some((_, HoldState::Held(held))) => {
                let reserve = i64::try_from(held.reserve).unwrap_or(i64::MAX);
                self.add(
                    &held.bucket,
                    &held.limits,
                    used.saturating_sub(reserve),
                    held.at,
                );
                Ok(Settled::Held)
            }
            None => {
                self.add(
                    hold.bucket,
                    hold.limits,
                    used.saturating_sub(reserve),
                    hold.at,
                );
                Ok(Settled::Held)
            }
        }
    }

    async fn release_expired(&self, now: i64) -> Result<usize, StoreError> {
        let mut released = 0;
        let mut refunds = Vec::new();
        self.holds.retain(|_, state| match state {
            HoldState::Held(held) if held.until < now => {
                let forget = held
                    .limits
                    .iter()
                    .map(|l| l.window(held.at).end)
                    .max()
                    .unwrap_or(now);
                let HoldState::Held(held) =
                    std::mem::replace(state, HoldState::Released { forget })
                else {
                    return true;
                };
                refunds.push(held);
                released += 1;
                true
            }
            HoldState::Held(_) => true,
            HoldState::Released { forget } => *forget > now,
        });
        for held in refunds {
            let reserve = i64::try_from(held.reserve).unwrap_or(i64::MAX);
            self.add(&held.bucket, &held.limits, -reserve, held.at);
        }
        Ok(released)
    }

    async fn ping(&self) -> Result<(), StoreError> {
        Ok(())
    }

    async fn sweep(&self, now: i64) {
        self.buckets.retain(|_, counters| {
            counters.retain(|c| c.window_end > now);
            !counters.is_empty()
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const T0: i64 = 1_795_000_000; // 2026-11-18T...Z, an arbitrary instant

    fn limit(limit: u64, unit: Unit) -> Limit {
        Limit {
            limit,
            interval: 1,
            unit,
        }
    }

    async fn charge(
        store: &MemoryStore,
        bucket: &str,
        limits: &[Limit],
        cost: u64,
        now: i64,
    ) -> Outcome {
        store
            .charge(&Charge {
                bucket,
                limits,
                cost,
                now,
            })
            .await
            .unwrap()
    }

    #[tokio::test]
    async fn usage_reads_the_current_windows_without_charging() {
        let store = MemoryStore::new();
        let limits = [limit(10, Unit::Minute), limit(100, Unit::Day)];
        let now = T0 - T0 % 60 + 10;
        for _ in 0..3 {
            charge(&store, "a", &limits, 2, now).await;
        }
        let read = |bucket: &'static str, at: i64| {
            let store = &store;
            let limits = &limits;
            async move { store.usage(bucket, limits, at).await.unwrap() }
        };
        let usage = read("a", now).await;
        assert_eq!(
            usage
                .iter()
                .map(|u| (u.used, u.reserved))
                .collect::<Vec<_>>(),
            [(6, 0), (6, 0)]
        );
        assert_eq!(usage[0].window, limits[0].window(now));
        assert_eq!(read("a", now).await, usage, "reading charges nothing");
        assert!(read("other", now).await.iter().all(|u| u.used == 0));
        let next_minute = read("a", now + 60).await;
        assert_eq!((next_minute[0].used, next_minute[1].used), (0, 6));
    }

    #[tokio::test]
    async fn counts_up_to_the_limit_then_refuses() {
        let store = MemoryStore::new();
        let limits = [limit(3, Unit::Minute)];
        let now = T0 - T0 % 60 + 10;
        for remaining in [2, 1, 0] {
            match charge(&store, "a", &limits, 1, now).await {
                Outcome::Allowed(s) => {
                    assert_eq!(s.remaining, remaining);
                    assert_eq!(s.limit, 3);
                    assert_eq!(s.reset_secs, 50);
                }
                other => panic!("expected allow, got {other:?}"),
            }
        }
        assert_eq!(
            charge(&store, "a", &limits, 1, now).await,
            Outcome::Exceeded(LimitState {
                limit: 3,
                remaining: 0,
                reset_secs: 50
            })
        );
        // Another bucket is independent.
        assert!(matches!(
            charge(&store, "b", &limits, 1, now).await,
            Outcome::Allowed(_)
        ));
    }

    #[tokio::test]
    async fn a_new_window_starts_from_zero() {
        let store = MemoryStore::new();
        let limits = [limit(1, Unit::Second)];
        assert!(matches!(
            charge(&store, "a", &limits, 1, T0).await,
            Outcome::Allowed(_)
        ));
        assert!(matches!(
            charge(&store, "a", &limits, 1, T0).await,
            Outcome::Exceeded(_)
        ));
        assert!(matches!(
            charge(&store, "a", &limits, 1, T0 + 1).await,
            Outcome::Allowed(_)
        ));
    }

    #[tokio::test]
    async fn cost_is_spent_and_an_oversized_call_spends_nothing() {
        let store = MemoryStore::new();
        let limits = [limit(10, Unit::Hour)];
        assert!(
            matches!(charge(&store, "a", &limits, 7, T0).await, Outcome::Allowed(s) if s.remaining == 3)
        );
        assert!(
            matches!(charge(&store, "a", &limits, 4, T0).await, Outcome::Exceeded(s) if s.remaining == 3)
        );
        assert!(
            matches!(charge(&store, "a", &limits, 3, T0).await, Outcome::Allowed(s) if s.remaining == 0)
        );
    }

    #[tokio::test]
    async fn every_limit_must_fit_and_the_exhausted_one_is_reported() {
        let store = MemoryStore::new();
        let limits = [limit(500, Unit::Month), limit(2, Unit::Second)];
        let now = T0;
        assert!(
            matches!(charge(&store, "a", &limits, 1, now).await, Outcome::Allowed(s) if s.limit == 2 && s.remaining == 1)
        );
        assert!(
            matches!(charge(&store, "a", &limits, 1, now).await, Outcome::Allowed(s) if s.limit == 2 && s.remaining == 0)
        );
        // The spike limit refuses; the monthly allowance is not charged for the refused call.
        assert!(
            matches!(charge(&store, "a", &limits, 1, now).await, Outcome::Exceeded(s) if s.limit == 2)
        );
        let monthly_only = [limit(500, Unit::Month)];
        assert!(
            matches!(charge(&store, "a", &monthly_only, 1, now + 1).await, Outcome::Allowed(s) if s.remaining == 497)
        );
    }

    #[tokio::test]
    async fn sweep_frees_ended_windows() {
        let store = MemoryStore::new();
        let limits = [limit(5, Unit::Second)];
        charge(&store, "a", &limits, 1, T0).await;
        charge(&store, "b", &[limit(5, Unit::Day)], 1, T0).await;
        assert_eq!(store.buckets(), 2);
        store.sweep(T0 + 1).await;
        assert_eq!(store.buckets(), 1);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_charges_never_overshoot() {
        let store = std::sync::Arc::new(MemoryStore::new());
        let limits = [limit(1_000, Unit::Day)];
        let mut tasks = Vec::new();
        for _ in 0..8 {
            let store = store.clone();
            tasks.push(tokio::spawn(async move {
                let mut allowed = 0u64;
                for _ in 0..500 {
                    if let Outcome::Allowed(_) = charge(&store, "hot", &limits, 1, T0).await {
                        allowed += 1;
                    }
                }
                allowed
            }));
        }
        let mut total = 0;
        for t in tasks {
            total += t.await.unwrap();
        }
        assert_eq!(total, 1_000);
    }
}
