//! Tumbling windows per (stripe customer, meter): totals, sealing after the lateness allowance, late revisions.
//!
//! Pure state, no I/O and no clock: callers pass `now`, so the rules are unit-tested directly. A window
//! `[start, end)` is sealed (revision 0) once `now >= end + lateness`. A record that still arrives for it later
//! adds to its total; the difference to what was already sealed becomes the next revision, sealed `lateness`
//! after the first such record arrived. A window is *closed for good* `lateness + retention` after its end:
//! records arriving later count in the window of their arrival instead, so a closed window's rows never change.

use std::collections::BTreeMap;

use super::record::SpooledRecord;

/// A window: Unix-ms start and length (the length is part of the key, so a config change never merges
/// windows of different lengths).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub(crate) struct WindowKey {
    /// Start, Unix ms, a multiple of `len_ms` since the epoch.
    pub start_ms: i64,
    /// Length, ms.
    pub len_ms: i64,
}

impl WindowKey {
    /// The window of length `len_ms` that holds `t_ms`; for any input, without overflow (times too early for
    /// a whole window before them get the earliest whole window).
    pub(crate) fn containing(t_ms: i64, len_ms: i64) -> Self {
        let len_ms = len_ms.max(1);
        // From here `t - rem` stays above i64::MIN, since 0 <= rem < len_ms.
        let t_ms = t_ms.max(i64::MIN + len_ms);
        WindowKey {
            start_ms: t_ms - t_ms.rem_euclid(len_ms),
            len_ms,
        }
    }

    /// End (exclusive), Unix ms.
    pub(crate) fn end_ms(&self) -> i64 {
        self.start_ms.saturating_add(self.len_ms)
    }
}

/// What is billed together: one window, one customer, one meter.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub(crate) struct GroupKey {
    /// The window.
    pub window: WindowKey,
    /// Stripe customer id.
    pub customer: String,
    /// Meter event name.
    pub meter: String,
}

/// The billable total of a group and how much of it is sealed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Group {
    /// Sum of billable values.
    pub total: u64,
    /// Sum of the values of the sealed revisions.
    pub sealed: u64,
    /// Number of sealed revisions.
    pub revisions: u32,
    /// When the first record not yet sealed arrived after the first seal (Unix ms).
    late_since_ms: Option<i64>,
    /// The earliest request start among records not yet sealed (for the lag metric).
    oldest_start_ms: Option<i64>,
}

/// Per-app usage, billable or not, for the usage report.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub(crate) struct UsageKey {
    /// The window.
    pub window: WindowKey,
    /// Meter event name (empty: no meter).
    pub meter: String,
    /// App name (empty: unidentified caller).
    pub app: String,
    /// Stripe customer id (may be empty).
    pub customer: String,
    /// Product name (empty: none matched).
    pub product: String,
}

/// Counters of one [`UsageKey`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Counts {
    /// Records.
    pub records: u64,
    /// Of which allowed by ext_authz.
    pub allowed: u64,
    /// Of which denied.
    pub denied: u64,
    /// Of which billable.
    pub billable: u64,
    /// Sum of billable values.
    pub value: u64,
}

/// A revision ready to be sealed into the outbox.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Due {
    /// The group.
    pub key: GroupKey,
    /// Revision number (0 for the first seal).
    pub revision: u32,
    /// The value not yet sealed.
    pub value: u64,
    /// The earliest request start it covers.
    pub oldest_start_ms: Option<i64>,
}

/// What the spool may forget: everything in windows ending by `closed_before_ms`, unless a live window needs it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Horizon {
    /// Windows ending at or before this are closed for good.
    pub closed_before_ms: i64,
    /// The earliest end of a window still held (sealed or not).
    pub min_live_end_ms: Option<i64>,
}

/// All open and recently sealed windows.
#[derive(Debug)]
pub(crate) struct Windows {
    lateness_ms: i64,
    retention_ms: i64,
    /// Monotonic: only grows, even if the wall clock steps back.
    closed_before_ms: i64,
    groups: BTreeMap<GroupKey, Group>,
    usage: BTreeMap<UsageKey, Counts>,
    /// Usage of windows closed by [`Windows::advance`], until [`Windows::take_closed`].
    closed_usage: Vec<(UsageKey, Counts)>,
}

impl Windows {
    /// Empty state; windows stay open for records `lateness_ms + retention_ms` after their end.
    pub(crate) fn new(lateness_ms: i64, retention_ms: i64) -> Self {
        Windows {
            lateness_ms,
            retention_ms,
            closed_before_ms: i64::MIN,
            groups: BTreeMap::new(),
            usage: BTreeMap::new(),
            closed_usage: Vec::new(),
        }
    }

    /// The window a record counts in: its request start's, unless that window is closed for good or the
    /// start lies more than a window ahead of arrival (a skewed clock or a forged time); then the arrival's.
    pub(crate) fn assign(&self, start_ms: i64, received_ms: i64, len_ms: i64) -> WindowKey {
        let window = WindowKey::containing(start_ms, len_ms);
        let closed = self.closed_before_ms.max(
            received_ms
                .saturating_sub(self.lateness_ms)
                .saturating_sub(self.retention_ms),
        );
        if window.end_ms() <= closed || start_ms > received_ms.saturating_add(len_ms) {
            WindowKey::containing(received_ms.max(self.closed_before_ms), len_ms)
        } else {
            window
        }
    }

    /// Adds a durable record (live or replayed).
    pub(crate) fn add(&mut self, spooled: &SpooledRecord) {
        let Some(record) = spooled.record.as_ref() else {
            return;
        };
        let window = WindowKey {
            start_ms: spooled.window_start_ms,
            len_ms: spooled.window_len_ms,
        };
        let counts = self
            .usage
            .entry(UsageKey {
                window,
                meter: spooled.meter.clone(),
                app: record.app.clone(),
                customer: record.stripe_customer.clone(),
                product: record.product.clone(),
            })
            .or_default();
        counts.records += 1;
        if record.allowed() {
            counts.allowed += 1;
        } else if record.decision == "deny" {
            counts.denied += 1;
        }
        if !spooled.billable {
            return;
        }
        counts.billable += 1;
        counts.value = counts.value.saturating_add(spooled.value);
        if record.stripe_customer.is_empty() || spooled.meter.is_empty() {
            return;
        }
        let group = self
            .groups
            .entry(GroupKey {
                window,
                customer: record.stripe_customer.clone(),
                meter: spooled.meter.clone(),
            })
            .or_default();
        group.total = group.total.saturating_add(spooled.value);
        if spooled.received_ms >= window.end_ms().saturating_add(self.lateness_ms)
            && group.late_since_ms.is_none()
        {
            group.late_since_ms = Some(spooled.received_ms);
        }
        // A record counted at its arrival (start missing, skewed or in a closed window) started, as far as
        // the lag metric is concerned, when it arrived.
        let start = if (window.start_ms..window.end_ms()).contains(&record.start_ms) {
            record.start_ms
        } else {
            spooled.received_ms
        };
        group.oldest_start_ms = Some(group.oldest_start_ms.map_or(start, |t| t.min(start)));
    }

    /// Replays a sealed outbox row: `value` of `key` is already sealed.
    pub(crate) fn load_sealed(&mut self, key: GroupKey, value: u64) {
        let group = self.groups.entry(key).or_default();
        group.sealed = group.sealed.saturating_add(value);
        group.revisions = group.revisions.saturating_add(1);
    }

    /// The revisions due at `now_ms`, oldest window first.
    pub(crate) fn due(&self, now_ms: i64) -> Vec<Due> {
        self.groups
            .iter()
            .filter(|(key, g)| {
                g.total > g.sealed
                    && if g.revisions == 0 {
                        now_ms >= key.window.end_ms().saturating_add(self.lateness_ms)
                    } else {
                        g.late_since_ms
                            .is_none_or(|t| now_ms >= t.saturating_add(self.lateness_ms))
                    }
            })
            .map(|(key, g)| Due {
                key: key.clone(),
                revision: g.revisions,
                value: g.total - g.sealed,
                oldest_start_ms: g.oldest_start_ms,
            })
            .collect()
    }

    /// Marks `due` as durably sealed at `now_ms`.
    pub(crate) fn mark_sealed(&mut self, due: &Due, now_ms: i64) {
        let Some(group) = self.groups.get_mut(&due.key) else {
            return;
        };
        group.sealed = group.sealed.saturating_add(due.value);
        group.revisions = due.revision.saturating_add(1);
        // Records added while the row was being written are not in it: they wait for the next revision.
        let rest = group.total > group.sealed;
        group.late_since_ms = rest.then_some(now_ms);
        if !rest {
            group.oldest_start_ms = None;
        }
    }

    /// Closes windows whose time is over and forgets those fully sealed; returns what the spool may drop.
    pub(crate) fn advance(&mut self, now_ms: i64) -> Horizon {
        let closed = now_ms
            .saturating_sub(self.lateness_ms)
            .saturating_sub(self.retention_ms);
        self.closed_before_ms = self.closed_before_ms.max(closed);
        let closed = self.closed_before_ms;
        self.groups
            .retain(|key, g| key.window.end_ms() > closed || g.total > g.sealed);
        let closing = &mut self.closed_usage;
        self.usage.retain(|key, counts| {
            let open = key.window.end_ms() > closed;
            if !open {
                closing.push((key.clone(), *counts));
            }
            open
        });
        Horizon {
            closed_before_ms: closed,
            min_live_end_ms: self.groups.keys().map(|k| k.window.end_ms()).min(),
        }
    }

    /// The final usage counts of the windows closed since the last call: no record joins them any more.
    pub(crate) fn take_closed(&mut self) -> Vec<(UsageKey, Counts)> {
        std::mem::take(&mut self.closed_usage)
    }

    /// Every live group.
    pub(crate) fn groups(&self) -> &BTreeMap<GroupKey, Group> {
        &self.groups
    }

    /// Every usage counter of the retained windows.
    pub(crate) fn usage(&self) -> &BTreeMap<UsageKey, Counts> {
        &self.usage
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metering::record::UsageRecord;

    const LEN: i64 = 1_000;
    const LATENESS: i64 = 500;
    const RETENTION: i64 = 2_000;

    fn spooled(
        w: &Windows,
        customer: &str,
        start_ms: i64,
        received_ms: i64,
        value: u64,
    ) -> SpooledRecord {
        let window = w.assign(start_ms, received_ms, LEN);
        SpooledRecord {
            record: Some(UsageRecord {
                request_id: format!("{customer}-{start_ms}-{received_ms}"),
                start_ms,
                decision: "allow".into(),
                app: "app".into(),
                stripe_customer: customer.into(),
                response_code: 200,
                ..Default::default()
            }),
            received_ms,
            window_start_ms: window.start_ms,
            window_len_ms: window.len_ms,
            meter: "calls".into(),
            value,
            billable: true,
        }
    }

    fn key(customer: &str, start_ms: i64) -> GroupKey {
        GroupKey {
            window: WindowKey {
                start_ms,
                len_ms: LEN,
            },
            customer: customer.into(),
            meter: "calls".into(),
        }
    }

    fn seal_all(w: &mut Windows, now: i64) -> Vec<Due> {
        let due = w.due(now);
        for d in &due {
            w.mark_sealed(d, now);
        }
        due
    }

    #[test]
    fn windows_are_aligned_and_keyed_per_customer() {
        assert_eq!(WindowKey::containing(1_999, LEN).start_ms, 1_000);
        assert_eq!(WindowKey::containing(-1, LEN).start_ms, -1_000);
        let mut w = Windows::new(LATENESS, RETENTION);
        let a = spooled(&w, "cus_a", 1_100, 1_200, 2);
        let b = spooled(&w, "cus_b", 1_900, 1_950, 3);
        let a2 = spooled(&w, "cus_a", 1_999, 2_010, 4);
        for r in [&a, &b, &a2] {
            w.add(r);
        }
        assert_eq!(w.groups()[&key("cus_a", 1_000)].total, 6);
        assert_eq!(w.groups()[&key("cus_b", 1_000)].total, 3);
    }

    #[test]
    fn a_window_seals_once_after_the_lateness() {
        let mut w = Windows::new(LATENESS, RETENTION);
        let r = spooled(&w, "cus_a", 1_100, 1_200, 5);
        w.add(&r);
        assert!(seal_all(&mut w, 2_499).is_empty(), "still within lateness");
        let due = seal_all(&mut w, 2_500);
        assert_eq!(
            due,
            vec![Due {
                key: key("cus_a", 1_000),
                revision: 0,
                value: 5,
                oldest_start_ms: Some(1_100)
            }]
        );
        assert!(
            seal_all(&mut w, 9_000).is_empty(),
            "a sealed row is not sealed again"
        );
    }

    #[test]
    fn records_within_lateness_join_revision_zero() {
        let mut w = Windows::new(LATENESS, RETENTION);
        let on_time = spooled(&w, "cus_a", 1_100, 1_200, 1);
        let late_but_in = spooled(&w, "cus_a", 1_900, 2_400, 1);
        w.add(&on_time);
        w.add(&late_but_in);
        let due = seal_all(&mut w, 2_500);
        assert_eq!(due.len(), 1);
        assert_eq!((due[0].revision, due[0].value), (0, 2));
    }

    #[test]
    fn late_records_become_a_new_revision_with_only_the_difference() {
        let mut w = Windows::new(LATENESS, RETENTION);
        let r = spooled(&w, "cus_a", 1_100, 1_200, 5);
        w.add(&r);
        seal_all(&mut w, 2_500);
        let late = spooled(&w, "cus_a", 1_500, 2_600, 3);
        assert_eq!(
            late.window_start_ms, 1_000,
            "still within retention: its own window"
        );
        w.add(&late);
        assert!(
            seal_all(&mut w, 3_099).is_empty(),
            "late records wait one lateness"
        );
        let due = seal_all(&mut w, 3_100);
        assert_eq!(due.len(), 1);
        assert_eq!((due[0].revision, due[0].value), (1, 3));
        assert_eq!(w.groups()[&key("cus_a", 1_000)].sealed, 8);
    }

    #[test]
    fn a_record_added_during_a_seal_waits_for_the_next_revision() {
        let mut w = Windows::new(LATENESS, RETENTION);
        let r = spooled(&w, "cus_a", 1_100, 1_200, 5);
        w.add(&r);
        let due = w.due(2_500);
        let racing = spooled(&w, "cus_a", 1_200, 2_500, 1);
        w.add(&racing);
        w.mark_sealed(&due[0], 2_501);
        assert!(w.due(2_501).is_empty());
        let next = w.due(3_001);
        assert_eq!((next[0].revision, next[0].value), (1, 1));
    }

    #[test]
    fn records_for_a_closed_window_count_in_their_arrival_window() {
        let mut w = Windows::new(LATENESS, RETENTION);
        let r = spooled(&w, "cus_a", 1_100, 1_200, 5);
        w.add(&r);
        seal_all(&mut w, 2_500);
        let h = w.advance(3_500);
        assert_eq!(h.closed_before_ms, 1_000);
        assert_eq!(h.min_live_end_ms, Some(2_000));
        let h = w.advance(4_500);
        assert_eq!(h.min_live_end_ms, None, "sealed and closed: forgotten");
        assert!(w.usage().is_empty());
        let very_late = spooled(&w, "cus_a", 1_100, 4_000, 2);
        assert_eq!(very_late.window_start_ms, 4_000);
        let future = spooled(&w, "cus_a", 90_000, 4_100, 2);
        assert_eq!(
            future.window_start_ms, 4_000,
            "a start far ahead of arrival is clock skew"
        );
    }

    #[test]
    fn any_start_time_gets_a_window_that_seals() {
        assert_eq!(
            WindowKey::containing(i64::MIN, LEN).start_ms,
            i64::MIN + LEN - (i64::MIN + LEN).rem_euclid(LEN)
        );
        assert_eq!(
            WindowKey::containing(i64::MAX, 1).start_ms,
            i64::MAX,
            "no overflow at the top either"
        );
        for start in [i64::MIN, i64::MIN + 1, -1, 0, i64::MAX - 1, i64::MAX] {
            let mut w = Windows::new(LATENESS, RETENTION);
            let r = spooled(&w, "cus_a", start, 50_000, 3);
            assert_eq!(r.window_start_ms, 50_000, "start {start} counts on arrival");
            w.add(&r);
            let due = seal_all(&mut w, 51_500);
            assert_eq!(due.len(), 1, "start {start}: the window seals");
            assert_eq!(due[0].oldest_start_ms, Some(50_000));
            assert_eq!(w.advance(60_000).min_live_end_ms, None);
        }
    }

    #[test]
    fn an_unsealed_window_is_kept_past_its_horizon_until_sealed() {
        let mut w = Windows::new(LATENESS, RETENTION);
        let r = spooled(&w, "cus_a", 1_100, 1_200, 5);
        w.add(&r);
        let h = w.advance(10_000);
        assert_eq!(h.min_live_end_ms, Some(2_000));
        assert_eq!(seal_all(&mut w, 10_000).len(), 1);
        assert_eq!(w.advance(10_000).min_live_end_ms, None);
    }

    #[test]
    fn replayed_seals_continue_the_revision_count() {
        let mut w = Windows::new(LATENESS, RETENTION);
        w.load_sealed(key("cus_a", 1_000), 5);
        let r = spooled(&w, "cus_a", 1_100, 1_200, 5);
        w.add(&r);
        assert!(
            w.due(2_500).is_empty(),
            "replayed total equals what was sealed"
        );
        let late = spooled(&w, "cus_a", 1_100, 2_700, 1);
        w.add(&late);
        let due = w.due(3_200);
        assert_eq!((due[0].revision, due[0].value), (1, 1));
    }

    #[test]
    fn denied_and_unmetered_records_are_usage_but_never_billed() {
        let mut w = Windows::new(LATENESS, RETENTION);
        let mut denied = spooled(&w, "cus_a", 1_100, 1_200, 0);
        denied.billable = false;
        if let Some(r) = denied.record.as_mut() {
            r.decision = "deny".into();
        }
        w.add(&denied);
        assert!(w.groups().is_empty());
        let counts = w.usage().values().next().copied().unwrap();
        assert_eq!((counts.records, counts.denied, counts.billable), (1, 1, 0));
    }
}
