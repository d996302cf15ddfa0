//! Closed windows into the usage history: each window closed for good becomes one batch of hourly rows,
//! added to the [`HistoryStore`] once; until it is added the spool keeps the window's records.
//!
//! A batch is named by the spool's producer and the window (`<producer>:<start ms>:<length ms>`): a crash
//! before the add replays the spool, closes the same window again and offers the same batch, which the
//! store's mark refuses once it is in. Batches the store refused (down) wait in memory and are offered
//! again every seal pass; the seal pass tells the spool to keep every record of their windows meanwhile.

use std::collections::BTreeMap;
use std::sync::Arc;

use crate::history::{Batch, Counts as HourCounts, Dims, HistoryStore, Rollup};
use crate::metering::window::{Counts, UsageKey};
use crate::util::clock::unix_now;

/// One closed window's batch, with the window's end so the spool knows what to keep.
#[derive(Debug, Clone)]
pub(super) struct Pending {
    /// Unix ms; the spool keeps every segment with records of windows ending at or after it.
    pub end_ms: i64,
    /// The rows.
    pub batch: Batch,
}

/// The batches of `closed` usage counters, one per window; rows of nobody (no app, no customer) are left out.
pub(super) fn batches(producer: &str, closed: Vec<(UsageKey, Counts)>) -> Vec<Pending> {
    let mut by_window: BTreeMap<(i64, i64), BTreeMap<Dims, HourCounts>> = BTreeMap::new();
    for (key, counts) in closed {
        if key.app.is_empty() && key.customer.is_empty() {
            continue;
        }
        let dims = Dims {
            customer: key.customer,
            app: key.app,
            product: key.product,
            meter: key.meter,
        };
        by_window
            .entry((key.window.start_ms, key.window.len_ms))
            .or_default()
            .entry(dims)
            .or_default()
            .add(&HourCounts {
                allowed: counts.allowed,
                denied: counts.denied,
                billable: counts.billable,
                value: counts.value,
            });
    }
    by_window
        .into_iter()
        .map(|((start_ms, len_ms), rows)| {
            // A window counts in the hour it starts in (windows divide hours in every sane config).
            let start = start_ms.div_euclid(1000);
            let hour = start - start.rem_euclid(3600);
            Pending {
                end_ms: start_ms.saturating_add(len_ms),
                batch: Batch {
                    id: format!("{producer}:{start_ms}:{len_ms}"),
                    rows: rows
                        .into_iter()
                        .map(|(dims, counts)| Rollup { hour, dims, counts })
                        .collect(),
                },
            }
        })
        .collect()
}

/// Offers every pending batch to `store`, oldest first; returns those it could not add.
pub(super) async fn add(
    store: &Arc<dyn HistoryStore>,
    pending: Vec<Pending>,
    metrics: &prometheus::IntCounterVec,
) -> Vec<Pending> {
    let mut left = Vec::new();
    let mut failed = false;
    for p in pending {
        // After one failure the store is down: keep the rest for the next pass without trying.
        if failed {
            left.push(p);
            continue;
        }
        match store.add(&p.batch, unix_now()).await {
            Ok(true) => metrics.with_label_values(&["added"]).inc(),
            Ok(false) => metrics.with_label_values(&["duplicate"]).inc(),
            Err(error) => {
                metrics.with_label_values(&["error"]).inc();
                tracing::warn!(%error, batch = %p.batch.id,
                    "usage history not written; the spool keeps the window's records and it is tried again");
                failed = true;
                left.push(p);
            }
        }
    }
    left
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metering::window::WindowKey;

    fn key(start_ms: i64, app: &str, customer: &str) -> UsageKey {
        UsageKey {
            window: WindowKey {
                start_ms,
                len_ms: 60_000,
            },
            meter: "calls".into(),
            app: app.into(),
            customer: customer.into(),
            product: "geo".into(),
        }
    }

    fn counts(allowed: u64, value: u64) -> Counts {
        Counts {
            records: allowed,
            allowed,
            denied: 0,
            billable: allowed,
            value,
        }
    }

    #[test]
    fn a_batch_per_window_in_the_hour_it_starts() {
        let hour = 1_800_001_234_i64 - 1_800_001_234 % 3600;
        let closed = vec![
            (key(hour * 1000 + 60_000, "a", "cus_1"), counts(2, 2)),
            (key(hour * 1000 + 60_000, "b", "cus_1"), counts(1, 5)),
            (key(hour * 1000 + 3_540_000, "a", "cus_1"), counts(3, 3)),
            // Nobody's: an unidentified caller without a customer.
            (key(hour * 1000 + 60_000, "", ""), counts(9, 0)),
        ];
        let batches = batches("p1", closed);
        assert_eq!(batches.len(), 2);
        assert_eq!(
            batches[0].batch.id,
            format!("p1:{}:60000", hour * 1000 + 60_000)
        );
        assert_eq!(batches[0].end_ms, hour * 1000 + 120_000);
        assert_eq!(batches[0].batch.rows.len(), 2);
        assert!(
            batches
                .iter()
                .flat_map(|b| &b.batch.rows)
                .all(|r| r.hour == hour)
        );
        let b = &batches[0].batch.rows[1];
        assert_eq!((b.dims.app.as_str(), b.counts.value), ("b", 5));
    }
}
