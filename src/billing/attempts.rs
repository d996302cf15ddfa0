//! When each outbox row was first sent, durable in `<metering dir>/billing/attempts.jsonl`, so the
//! "unconfirmed for about 20 hours" rule survives restarts.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::{BillingError, jsonl};

#[derive(Serialize, Deserialize)]
struct Entry {
    id: String,
    first_ms: i64,
}

/// First-attempt times of the rows being delivered (only the server writes this file).
pub(crate) struct Attempts {
    path: PathBuf,
    first: HashMap<String, i64>,
}

impl Attempts {
    /// Loads `<billing dir>/attempts.jsonl`.
    pub(crate) fn open(billing_dir: &Path) -> Result<Attempts, BillingError> {
        let path = billing_dir.join("attempts.jsonl");
        let (entries, _) = jsonl::read::<Entry>(&path)?;
        let mut first = HashMap::new();
        for e in entries {
            first.entry(e.id).or_insert(e.first_ms);
        }
        Ok(Attempts { path, first })
    }

    /// When `id` was first sent, if it was.
    pub(crate) fn first(&self, id: &str) -> Option<i64> {
        self.first.get(id).copied()
    }

    /// Records `now_ms` as the first attempt of every id in `ids` that has none yet (one fsync).
    pub(crate) fn record<'a>(
        &mut self,
        ids: impl IntoIterator<Item = &'a str>,
        now_ms: i64,
    ) -> Result<(), BillingError> {
        let new: Vec<Entry> = ids
            .into_iter()
            .filter(|id| !self.first.contains_key(*id))
            .map(|id| Entry {
                id: id.to_owned(),
                first_ms: now_ms,
            })
            .collect();
        jsonl::append(&self.path, &new)?;
        for e in new {
            self.first.insert(e.id, e.first_ms);
        }
        Ok(())
    }

    /// Keeps only the ids still pending (rewrites the file when that drops anything).
    pub(crate) fn retain(&mut self, pending: &HashSet<&str>) -> Result<(), BillingError> {
        let before = self.first.len();
        self.first.retain(|id, _| pending.contains(id.as_str()));
        if self.first.len() == before {
            return Ok(());
        }
        let entries: Vec<Entry> = self
            .first
            .iter()
            .map(|(id, &first_ms)| Entry {
                id: id.clone(),
                first_ms,
            })
            .collect();
        jsonl::rewrite(&self.path, &entries)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_attempt_survives_reopen_and_retain() {
        let dir = tempfile::tempdir().unwrap();
        let mut a = Attempts::open(dir.path()).unwrap();
        a.record(["x", "y"], 10).unwrap();
        a.record(["x", "z"], 20).unwrap();
        let mut b = Attempts::open(dir.path()).unwrap();
        assert_eq!(b.first("x"), Some(10));
        assert_eq!(b.first("z"), Some(20));
        b.retain(&["z"].into_iter().collect()).unwrap();
        let c = Attempts::open(dir.path()).unwrap();
        assert_eq!((c.first("x"), c.first("z")), (None, Some(20)));
    }
}
