//! The sent ledger: every outbox row Stripe confirmed, durable in `<metering dir>/billing/sent.jsonl`.
//!
//! The metering outbox forgets acknowledged rows once their windows close, so reconciliation reads its local
//! totals here. A row is written here before it is acknowledged in the outbox; a crash in between resends it,
//! Stripe answers "already exists", and the second copy of the line is ignored on read (same id).

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::{BillingError, jsonl};
use crate::metering::OutboxRow;

/// Entries older than this are dropped when the ledger is compacted (Stripe refuses events older than 35 days,
/// so nothing older can still change).
const KEEP_MS: i64 = 62 * 24 * 3_600_000;

/// One confirmed meter event.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SentRow {
    /// The outbox row id (the meter event `identifier`).
    pub id: String,
    /// `payload[stripe_customer_id]`.
    pub stripe_customer: String,
    /// The meter's event name.
    pub event_name: String,
    /// Window start, Unix ms (the event's `timestamp`).
    pub window_start_ms: i64,
    /// `payload[value]`.
    pub value: u64,
    /// When Stripe confirmed it, Unix ms.
    pub confirmed_ms: i64,
    /// `true` when Stripe answered "already exists" (an earlier attempt had landed).
    pub duplicate: bool,
}

impl SentRow {
    /// The ledger line for `row`.
    pub fn new(row: &OutboxRow, confirmed_ms: i64, duplicate: bool) -> Self {
        SentRow {
            id: row.id.clone(),
            stripe_customer: row.stripe_customer.clone(),
            event_name: row.event_name.clone(),
            window_start_ms: row.window_start_ms,
            value: row.value,
            confirmed_ms,
            duplicate,
        }
    }
}

/// `<billing dir>/sent.jsonl`.
pub fn path(billing_dir: &Path) -> PathBuf {
    billing_dir.join("sent.jsonl")
}

/// Appends `rows` durably.
pub fn record(billing_dir: &Path, rows: &[SentRow]) -> Result<(), BillingError> {
    jsonl::append(&path(billing_dir), rows)
}

/// Every confirmed row, each id once (the first line wins).
pub fn read(billing_dir: &Path) -> Result<Vec<SentRow>, BillingError> {
    let (rows, _) = jsonl::read::<SentRow>(&path(billing_dir))?;
    let mut seen = HashSet::new();
    Ok(rows
        .into_iter()
        .filter(|r| seen.insert(r.id.clone()))
        .collect())
}

/// Drops duplicate lines and rows whose window is older than the retention (at start, by the one server).
pub fn compact(billing_dir: &Path, now_ms: i64) -> Result<(), BillingError> {
    let path = path(billing_dir);
    let (all, _) = jsonl::read::<SentRow>(&path)?;
    let kept: Vec<SentRow> = read(billing_dir)?
        .into_iter()
        .filter(|r| r.window_start_ms >= now_ms - KEEP_MS)
        .collect();
    if kept.len() < all.len() {
        jsonl::rewrite(&path, &kept)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dedup_on_read_and_compaction() {
        let dir = tempfile::tempdir().unwrap();
        let row = |id: &str, start: i64| OutboxRow {
            id: id.into(),
            window_start_ms: start,
            value: 2,
            ..Default::default()
        };
        let now = 100 * 24 * 3_600_000;
        record(dir.path(), &[SentRow::new(&row("a", now), 1, false)]).unwrap();
        record(
            dir.path(),
            &[
                SentRow::new(&row("a", now), 2, true),
                SentRow::new(&row("old", 0), 1, false),
            ],
        )
        .unwrap();
        let rows = read(dir.path()).unwrap();
        assert_eq!(rows.len(), 2);
        assert!(!rows[0].duplicate);
        compact(dir.path(), now).unwrap();
        let ids: Vec<_> = read(dir.path())
            .unwrap()
            .into_iter()
            .map(|r| r.id)
            .collect();
        assert_eq!(ids, ["a"]);
    }
}
