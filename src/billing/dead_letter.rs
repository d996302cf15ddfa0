//! Dead letters: outbox rows delivery stopped trying, with the reason, durable in
//! `<metering dir>/billing/dead_letters.jsonl` until an operator re-queues them.
//!
//! A dead-lettered row stays pending in the metering outbox (it was never acknowledged), so re-queueing only
//! has to forget the dead letter: delivery picks the row up again on its next pass. The file is an append-only
//! log of `dead` and `requeue` entries; `tollgate billing requeue` appends from another process while the
//! server runs, and the server notices by the file's length.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use serde::{Deserialize, Serialize};

use super::{BillingError, jsonl};
use crate::metering::OutboxRow;
use crate::util::clock::now_ms;
use crate::util::sync::lock;

/// Why delivery gave up on a row.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DeadLetterKind {
    /// Stripe refused it with a 4xx other than a duplicate identifier (or said not to retry).
    Rejected,
    /// Its window started more than 35 days ago: Stripe would refuse the timestamp, so it was never sent.
    TooOld,
    /// Unconfirmed for `give_up_after` (about 20 h): blind retries could bill twice once Stripe's 24 h
    /// identifier memory lapses. Check `tollgate billing reconcile` before re-queueing.
    Unconfirmed,
}

/// One dead-lettered outbox row.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeadLetter {
    /// The outbox row id (the meter event `identifier`).
    pub id: String,
    /// `payload[stripe_customer_id]`.
    pub stripe_customer: String,
    /// The meter's event name.
    pub event_name: String,
    /// `payload[value]`.
    pub value: u64,
    /// Window start, Unix ms.
    pub window_start_ms: i64,
    /// Why.
    pub kind: DeadLetterKind,
    /// Stripe's HTTP status, when Stripe answered.
    pub status: Option<u16>,
    /// Stripe's message or tollgate's explanation.
    pub reason: String,
    /// When it was dead-lettered, Unix ms.
    pub at_ms: i64,
}

impl DeadLetter {
    /// A dead letter for `row`.
    pub fn new(row: &OutboxRow, kind: DeadLetterKind, status: Option<u16>, reason: String) -> Self {
        DeadLetter {
            id: row.id.clone(),
            stripe_customer: row.stripe_customer.clone(),
            event_name: row.event_name.clone(),
            value: row.value,
            window_start_ms: row.window_start_ms,
            kind,
            status,
            reason,
            at_ms: now_ms(),
        }
    }
}

/// Which dead letters to re-queue.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Requeue {
    /// Every current dead letter.
    All,
    /// These ids.
    Ids(Vec<String>),
}

/// What a re-queue did.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct RequeueOutcome {
    /// Ids that were dead letters and are queued again.
    pub requeued: Vec<String>,
    /// Ids asked for that are not dead letters.
    pub unknown: Vec<String>,
}

#[derive(Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
enum Entry {
    Dead(DeadLetter),
    Requeue { id: String, at_ms: i64 },
}

#[derive(Default)]
struct View {
    len: u64,
    dead: BTreeMap<String, DeadLetter>,
    requeued_at: HashMap<String, i64>,
}

/// The dead-letter file and its current view.
pub struct DeadLetters {
    path: PathBuf,
    view: Mutex<View>,
}

impl DeadLetters {
    /// Opens (not creating) `<billing dir>/dead_letters.jsonl`.
    pub fn open(billing_dir: &Path) -> Result<DeadLetters, BillingError> {
        let store = DeadLetters {
            path: billing_dir.join("dead_letters.jsonl"),
            view: Mutex::new(View::default()),
        };
        store.refresh()?;
        Ok(store)
    }

    /// Re-reads the file if another process appended to it.
    pub fn refresh(&self) -> Result<(), BillingError> {
        if jsonl::len(&self.path) == self.lock().len {
            return Ok(());
        }
        let (entries, len) = jsonl::read::<Entry>(&self.path)?;
        let mut view = View {
            len,
            ..View::default()
        };
        for entry in entries {
            match entry {
                Entry::Dead(d) => {
                    view.dead.insert(d.id.clone(), d);
                }
                Entry::Requeue { id, at_ms } => {
                    view.dead.remove(&id);
                    view.requeued_at.insert(id, at_ms);
                }
            }
        }
        *self.lock() = view;
        Ok(())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, View> {
        lock(&self.view)
    }

    /// Current dead letters, oldest first.
    pub fn list(&self) -> Result<Vec<DeadLetter>, BillingError> {
        self.refresh()?;
        let mut out: Vec<DeadLetter> = self.lock().dead.values().cloned().collect();
        out.sort_by(|a, b| (a.at_ms, &a.id).cmp(&(b.at_ms, &b.id)));
        Ok(out)
    }

    /// Whether `id` is a dead letter now (as of the last refresh).
    pub fn contains(&self, id: &str) -> bool {
        self.lock().dead.contains_key(id)
    }

    /// How many dead letters there are (as of the last refresh).
    pub fn count(&self) -> usize {
        self.lock().dead.len()
    }

    /// When `id` was last re-queued (restarts its unconfirmed clock).
    pub fn requeued_at(&self, id: &str) -> Option<i64> {
        self.lock().requeued_at.get(id).copied()
    }

    /// Records `letter` durably.
    pub fn add(&self, letter: DeadLetter) -> Result<(), BillingError> {
        self.refresh()?;
        jsonl::append(&self.path, &[Entry::Dead(letter.clone())])?;
        let mut view = self.lock();
        view.len = jsonl::len(&self.path);
        view.dead.insert(letter.id.clone(), letter);
        Ok(())
    }

    /// Forgets the chosen dead letters durably so delivery sends their rows again.
    pub fn requeue(&self, which: &Requeue) -> Result<RequeueOutcome, BillingError> {
        self.refresh()?;
        let mut outcome = RequeueOutcome::default();
        {
            let view = self.lock();
            match which {
                Requeue::All => outcome.requeued = view.dead.keys().cloned().collect(),
                Requeue::Ids(ids) => {
                    for id in ids {
                        if view.dead.contains_key(id) {
                            outcome.requeued.push(id.clone());
                        } else {
                            outcome.unknown.push(id.clone());
                        }
                    }
                }
            }
        }
        let at_ms = now_ms();
        let entries: Vec<Entry> = outcome
            .requeued
            .iter()
            .map(|id| Entry::Requeue {
                id: id.clone(),
                at_ms,
            })
            .collect();
        jsonl::append(&self.path, &entries)?;
        self.refresh()?;
        Ok(outcome)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(id: &str) -> OutboxRow {
        OutboxRow {
            id: id.into(),
            stripe_customer: "cus_A".into(),
            event_name: "calls".into(),
            value: 3,
            ..Default::default()
        }
    }

    #[test]
    fn add_list_requeue_across_handles() {
        let dir = tempfile::tempdir().unwrap();
        let server = DeadLetters::open(dir.path()).unwrap();
        server
            .add(DeadLetter::new(
                &row("a"),
                DeadLetterKind::Rejected,
                Some(400),
                "no".into(),
            ))
            .unwrap();
        server
            .add(DeadLetter::new(
                &row("b"),
                DeadLetterKind::TooOld,
                None,
                "old".into(),
            ))
            .unwrap();
        // Another process (the CLI) re-queues one; the server sees it after a refresh.
        let cli = DeadLetters::open(dir.path()).unwrap();
        assert_eq!(cli.list().unwrap().len(), 2);
        let out = cli
            .requeue(&Requeue::Ids(vec!["a".into(), "zzz".into()]))
            .unwrap();
        assert_eq!(out.requeued, ["a"]);
        assert_eq!(out.unknown, ["zzz"]);
        assert!(server.contains("a"));
        server.refresh().unwrap();
        assert!(!server.contains("a"));
        assert!(server.requeued_at("a").is_some());
        let left: Vec<_> = server.list().unwrap().into_iter().map(|d| d.id).collect();
        assert_eq!(left, ["b"]);
        assert_eq!(cli.requeue(&Requeue::All).unwrap().requeued, ["b"]);
        assert_eq!(DeadLetters::open(dir.path()).unwrap().count(), 0);
    }
}
