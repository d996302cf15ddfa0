//! Calendar-aligned quota windows in UTC (CONTRACT §3).
//!
//! Windows of `interval` units are counted from the Unix epoch: a 2-hour window starts at an even hour, a
//! 3-month window at January, April, July or October 1970 + 3k months. Weeks start on Monday 00:00Z. The
//! arithmetic is done on plain integers (days from the epoch, Howard Hinnant's civil-date algorithms) so it is
//! total over every `i64` second the caller can produce and never panics.

use serde::{Deserialize, Serialize};

/// A calendar unit that quota windows are measured in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Unit {
    /// One second; n-second windows start at multiples of n since the epoch.
    Second,
    /// Sixty seconds (Unix time has no leap seconds), from :00.
    Minute,
    /// Sixty minutes, from :00:00.
    Hour,
    /// A UTC day, from 00:00Z.
    Day,
    /// A week from Monday 00:00Z.
    Week,
    /// A calendar month from the 1st, 00:00Z.
    Month,
}

impl Unit {
    /// The unit's name as written in the catalog.
    pub fn as_str(self) -> &'static str {
        match self {
            Unit::Second => "second",
            Unit::Minute => "minute",
            Unit::Hour => "hour",
            Unit::Day => "day",
            Unit::Week => "week",
            Unit::Month => "month",
        }
    }
}

/// A half-open window `[start, end)` in Unix seconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Window {
    /// First second of the window.
    pub start: i64,
    /// First second after the window.
    pub end: i64,
}

impl Window {
    /// Seconds from `now` until the window ends (at least 1, so a `retry-after` is never 0).
    pub fn seconds_left(&self, now: i64) -> u64 {
        u64::try_from(self.end.saturating_sub(now))
            .unwrap_or(0)
            .max(1)
    }
}

const DAY: i64 = 86_400;
/// 1970-01-01 was a Thursday: the Monday of that week is 3 days earlier.
const EPOCH_WEEKDAY_FROM_MONDAY: i64 = 3;

/// The window of `interval` (at least 1; 0 is treated as 1) `unit`s that contains `now` (Unix seconds).
pub fn window_at(now: i64, unit: Unit, interval: u32) -> Window {
    let n = i64::from(interval.max(1));
    match unit {
        Unit::Second => fixed(now, n),
        Unit::Minute => fixed(now, n.saturating_mul(60)),
        Unit::Hour => fixed(now, n.saturating_mul(3_600)),
        Unit::Day => fixed(now, n.saturating_mul(DAY)),
        Unit::Week => {
            let shifted = now.saturating_add(EPOCH_WEEKDAY_FROM_MONDAY * DAY);
            let w = fixed(shifted, n.saturating_mul(7 * DAY));
            Window {
                start: w.start.saturating_sub(EPOCH_WEEKDAY_FROM_MONDAY * DAY),
                end: w.end.saturating_sub(EPOCH_WEEKDAY_FROM_MONDAY * DAY),
            }
        }
        Unit::Month => {
            let (y, m, _) = civil_from_days(now.div_euclid(DAY));
            let month_index = (y - 1970).saturating_mul(12).saturating_add(m - 1);
            let first = month_index.div_euclid(n).saturating_mul(n);
            Window {
                start: month_start(first),
                end: month_start(first.saturating_add(n)),
            }
        }
    }
}

fn fixed(now: i64, len: i64) -> Window {
    let start = now.div_euclid(len).saturating_mul(len);
    Window {
        start,
        end: start.saturating_add(len),
    }
}

/// Unix seconds of the first day of the month `index` months after January 1970.
fn month_start(index: i64) -> i64 {
    let year = 1970 + index.div_euclid(12);
    let month = index.rem_euclid(12) + 1;
    days_from_civil(year, month, 1).saturating_mul(DAY)
}

/// Days since 1970-01-01 of a proleptic Gregorian date.
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era.saturating_mul(146_097).saturating_add(doe - 719_468)
}

/// The proleptic Gregorian (year, month, day) of a day count since 1970-01-01.
fn civil_from_days(z: i64) -> (i64, i64, i64) {
    let z = z.saturating_add(719_468);
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Unix seconds of a UTC date-time, computed by chrono as an independent reference.
    fn at(s: &str) -> i64 {
        chrono::DateTime::parse_from_rfc3339(s).unwrap().timestamp()
    }

    fn win(now: &str, unit: Unit, interval: u32) -> (i64, i64) {
        let w = window_at(at(now), unit, interval);
        (w.start, w.end)
    }

    #[test]
    fn fixed_units_align_to_the_epoch() {
        let cases = [
            (
                "2026-11-23T12:34:56Z",
                Unit::Second,
                1,
                "2026-11-23T12:34:56Z",
                "2026-11-23T12:34:57Z",
            ),
            (
                "2026-11-23T12:34:56Z",
                Unit::Second,
                10,
                "2026-11-23T12:34:50Z",
                "2026-11-23T12:35:00Z",
            ),
            (
                "2026-11-23T12:34:56Z",
                Unit::Minute,
                1,
                "2026-11-23T12:34:00Z",
                "2026-11-23T12:35:00Z",
            ),
            (
                "2026-11-23T12:34:56Z",
                Unit::Minute,
                15,
                "2026-11-23T12:30:00Z",
                "2026-11-23T12:45:00Z",
            ),
            (
                "2026-11-23T12:34:56Z",
                Unit::Hour,
                1,
                "2026-11-23T12:00:00Z",
                "2026-11-23T13:00:00Z",
            ),
            (
                "2026-11-23T13:34:56Z",
                Unit::Hour,
                2,
                "2026-11-23T12:00:00Z",
                "2026-11-23T14:00:00Z",
            ),
            (
                "2026-11-23T23:59:59Z",
                Unit::Day,
                1,
                "2026-11-23T00:00:00Z",
                "2026-11-24T00:00:00Z",
            ),
            (
                "2026-11-24T00:00:00Z",
                Unit::Day,
                1,
                "2026-11-24T00:00:00Z",
                "2026-11-25T00:00:00Z",
            ),
            // 1970-01-01 + 2k days: 2026-11-23 is day 20780, an even day.
            (
                "2026-11-24T05:00:00Z",
                Unit::Day,
                2,
                "2026-11-23T00:00:00Z",
                "2026-11-25T00:00:00Z",
            ),
        ];
        for (now, unit, n, start, end) in cases {
            assert_eq!(
                win(now, unit, n),
                (at(start), at(end)),
                "{now} {unit:?}x{n}"
            );
        }
    }

    #[test]
    fn weeks_start_on_monday() {
        // 2026-11-23 is a Monday.
        let monday = ("2026-11-23T00:00:00Z", "2026-11-30T00:00:00Z");
        for now in [
            "2026-11-23T00:00:00Z",
            "2026-11-26T12:00:00Z",
            "2026-11-29T23:59:59Z",
        ] {
            assert_eq!(
                win(now, Unit::Week, 1),
                (at(monday.0), at(monday.1)),
                "{now}"
            );
        }
        assert_eq!(
            win("2026-11-22T23:59:59Z", Unit::Week, 1),
            (at("2026-11-16T00:00:00Z"), at("2026-11-23T00:00:00Z"))
        );
        // The epoch itself (a Thursday) belongs to the week of Monday 1969-12-29.
        assert_eq!(
            win("1970-01-01T00:00:00Z", Unit::Week, 1),
            (at("1969-12-29T00:00:00Z"), at("1970-01-05T00:00:00Z"))
        );
        // Two-week windows are counted from that first Monday: week 0 and 1 together, 2 and 3, ...
        let w = window_at(at("2026-11-23T00:00:00Z"), Unit::Week, 2);
        assert_eq!(w.end - w.start, 14 * DAY);
        assert_eq!((w.start - at("1969-12-29T00:00:00Z")) % (14 * DAY), 0);
        assert!(w.start <= at("2026-11-23T00:00:00Z") && at("2026-11-23T00:00:00Z") < w.end);
    }

    #[test]
    fn months_follow_the_calendar() {
        let cases = [
            (
                "2026-01-31T23:59:59Z",
                1,
                "2026-01-01T00:00:00Z",
                "2026-02-01T00:00:00Z",
            ),
            (
                "2026-02-28T12:00:00Z",
                1,
                "2026-02-01T00:00:00Z",
                "2026-03-01T00:00:00Z",
            ),
            (
                "2024-02-29T12:00:00Z",
                1,
                "2024-02-01T00:00:00Z",
                "2024-03-01T00:00:00Z",
            ),
            (
                "2000-02-29T00:00:00Z",
                1,
                "2000-02-01T00:00:00Z",
                "2000-03-01T00:00:00Z",
            ),
            (
                "2026-12-31T23:59:59Z",
                1,
                "2026-12-01T00:00:00Z",
                "2027-01-01T00:00:00Z",
            ),
            (
                "2027-01-01T00:00:00Z",
                1,
                "2027-01-01T00:00:00Z",
                "2027-02-01T00:00:00Z",
            ),
            // Quarters counted from January 1970 are calendar quarters.
            (
                "2026-11-23T00:00:00Z",
                3,
                "2026-10-01T00:00:00Z",
                "2027-01-01T00:00:00Z",
            ),
            (
                "2026-03-31T23:59:59Z",
                3,
                "2026-01-01T00:00:00Z",
                "2026-04-01T00:00:00Z",
            ),
            // 5-month windows: month index (2026-1970)*12+10 = 682 -> 680 = 2026-09.
            (
                "2026-11-23T00:00:00Z",
                5,
                "2026-09-01T00:00:00Z",
                "2027-02-01T00:00:00Z",
            ),
            (
                "1969-12-15T00:00:00Z",
                1,
                "1969-12-01T00:00:00Z",
                "1970-01-01T00:00:00Z",
            ),
            (
                "2026-11-23T00:00:00Z",
                12,
                "2026-01-01T00:00:00Z",
                "2027-01-01T00:00:00Z",
            ),
        ];
        for (now, n, start, end) in cases {
            assert_eq!(
                win(now, Unit::Month, n),
                (at(start), at(end)),
                "{now} month x{n}"
            );
        }
    }

    #[test]
    fn civil_dates_round_trip_over_four_centuries() {
        for day in (-146_097 * 2..146_097 * 2).step_by(13) {
            let (y, m, d) = civil_from_days(day);
            assert_eq!(days_from_civil(y, m, d), day);
            let reference = chrono::DateTime::from_timestamp(day * DAY, 0).unwrap();
            use chrono::Datelike;
            assert_eq!(
                (y, m, d),
                (
                    i64::from(reference.year()),
                    i64::from(reference.month()),
                    i64::from(reference.day())
                )
            );
        }
    }

    #[test]
    fn extreme_inputs_do_not_panic() {
        for now in [i64::MIN, i64::MIN / 2, -1, 0, i64::MAX / 2, i64::MAX] {
            for unit in [
                Unit::Second,
                Unit::Minute,
                Unit::Hour,
                Unit::Day,
                Unit::Week,
                Unit::Month,
            ] {
                for n in [0, 1, 7, u32::MAX] {
                    let w = window_at(now, unit, n);
                    let _ = w.seconds_left(now);
                }
            }
        }
    }

    #[test]
    fn seconds_left_is_at_least_one() {
        let w = window_at(at("2026-11-23T12:34:56Z"), Unit::Minute, 1);
        assert_eq!(w.seconds_left(at("2026-11-23T12:34:56Z")), 4);
        assert_eq!(w.seconds_left(w.end), 1);
    }
}
