//! The memory store's counters across restarts: a snapshot file in `metering.dir`, rewritten every
//! `quota.persist_interval` while charges change it.
//!
//! Without it a restart of the embedded default would reset every monthly quota: a partner with 10,000 calls a
//! month would get 10,000 more after each deploy. A crash (even `kill -9`) loses at most the charges of the
//! last interval, since the file is replaced atomically (write to a temporary file, fsync, rename, fsync the
//! folder) and so is always either the previous or the new snapshot, never a torn one.

use std::fs::{self, File};
use std::io::BufReader;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use crate::quota::memory::{CounterRecord, MemoryStore};
use crate::util::clock::unix_now;
use crate::util::durable::replace_file;

/// The snapshot's file name in `metering.dir`.
pub const FILE_NAME: &str = "quota-counters.json";

/// The default `quota.persist_interval`.
pub const DEFAULT_INTERVAL: Duration = Duration::from_secs(1);

/// Why the snapshot could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum PersistError {
    /// The file system refused.
    #[error("quota counters {}: {source}", path.display())]
    Io {
        /// The file or folder.
        path: PathBuf,
        /// The failure.
        source: std::io::Error,
    },
    /// The file is not a snapshot this version wrote.
    #[error("quota counters {} are unreadable ({source}); kept as {}", path.display(), kept.display())]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// Where it was moved so the next snapshot does not overwrite the evidence.
        kept: PathBuf,
        /// What was wrong.
        source: serde_json::Error,
    },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> PersistError + '_ {
    move |source| PersistError::Io {
        path: path.to_owned(),
        source,
    }
}

/// Restores the counters saved in `dir` into `store`; returns how many windows were still open. A missing
/// file is a first start; an unreadable one is moved aside (and reported) so the store starts empty.
pub fn load(dir: &Path, store: &MemoryStore) -> Result<usize, PersistError> {
    let path = dir.join(FILE_NAME);
    let file = match File::open(&path) {
        Ok(file) => file,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(0),
        Err(e) => return Err(io(&path)(e)),
    };
    match serde_json::from_reader::<_, Vec<CounterRecord>>(BufReader::new(file)) {
        Ok(records) => Ok(store.restore(records, unix_now())),
        Err(source) => {
            let kept = dir.join(format!("{FILE_NAME}.corrupt"));
            fs::rename(&path, &kept).map_err(io(&path))?;
            Err(PersistError::Corrupt { path, kept, source })
        }
    }
}

/// Writes `store`'s open windows to `dir`, replacing the last snapshot atomically.
pub fn save(dir: &Path, store: &MemoryStore) -> Result<(), PersistError> {
    let records = store.snapshot(unix_now());
    let bytes = serde_json::to_vec(&records)
        .map_err(|e| io(&dir.join(FILE_NAME))(std::io::Error::other(e)))?;
    replace_file(dir, FILE_NAME, &bytes).map_err(|(path, source)| PersistError::Io { path, source })
}

/// Saves every `interval` while the counters change, until `shutdown` turns true; the caller saves once more
/// after the listeners have stopped, when no charge can follow.
pub async fn run(
    dir: PathBuf,
    store: Arc<MemoryStore>,
    interval: Duration,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut every = tokio::time::interval(interval.max(Duration::from_millis(10)));
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut saved = store.changes();
    let mut failing = false;
    loop {
        let stopping = tokio::select! {
            _ = every.tick() => false,
            _ = shutdown.changed() => true,
        };
        if stopping {
            return;
        }
        let changes = store.changes();
        if changes != saved {
            let (dir, store) = (dir.clone(), Arc::clone(&store));
            let result = tokio::task::spawn_blocking(move || save(&dir, &store)).await;
            match result {
                Ok(Ok(())) => {
                    if failing {
                        tracing::info!("quota counters are saved again");
                    }
                    failing = false;
                    saved = changes;
                }
                Ok(Err(error)) if !failing => {
                    failing = true;
                    tracing::warn!(%error, "quota counters could not be saved; a restart would lose the charges since the last save");
                }
                Ok(Err(_)) => {}
                Err(error) => tracing::warn!(%error, "quota counter save task failed"),
            }
        }
        if *shutdown.borrow() {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quota::{Charge, Limit, Outcome, QuotaStore, Unit};

    async fn spend(store: &MemoryStore, limits: &[Limit], n: usize) -> Vec<Outcome> {
        let mut out = Vec::new();
        for _ in 0..n {
            let charge = Charge {
                bucket: "app\u{1f}gold",
                limits,
                cost: 1,
                now: unix_now(),
            };
            out.push(store.charge(&charge).await.unwrap());
        }
        out
    }

    #[tokio::test]
    async fn counters_survive_a_save_and_load() {
        let dir = tempfile::tempdir().unwrap();
        let limits = [Limit {
            limit: 5,
            interval: 1,
            unit: Unit::Month,
        }];
        let first = MemoryStore::new();
        spend(&first, &limits, 3).await;
        save(dir.path(), &first).unwrap();

        let second = MemoryStore::new();
        assert_eq!(load(dir.path(), &second).unwrap(), 1);
        let outcomes = spend(&second, &limits, 3).await;
        assert!(matches!(outcomes[1], Outcome::Allowed(s) if s.remaining == 0));
        assert!(matches!(outcomes[2], Outcome::Exceeded(_)), "{outcomes:?}");
    }

    #[tokio::test]
    async fn a_missing_file_is_a_first_start_and_a_corrupt_one_is_kept_aside() {
        let dir = tempfile::tempdir().unwrap();
        let store = MemoryStore::new();
        assert_eq!(load(dir.path(), &store).unwrap(), 0);
        fs::write(dir.path().join(FILE_NAME), b"{not json").unwrap();
        let err = load(dir.path(), &store).unwrap_err();
        assert!(matches!(err, PersistError::Corrupt { .. }), "{err}");
        assert!(dir.path().join(format!("{FILE_NAME}.corrupt")).exists());
        assert_eq!(
            load(dir.path(), &store).unwrap(),
            0,
            "the next start is clean"
        );
    }

    #[tokio::test]
    async fn closed_and_misaligned_windows_are_not_restored() {
        let store = MemoryStore::new();
        let now = unix_now();
        let minute = |start: i64| CounterRecord {
            bucket: "b".into(),
            unit: Unit::Minute,
            interval: 1,
            window_start: start,
            window_end: start + 60,
            used: 7,
        };
        let current = now - now % 60;
        let records = vec![minute(current - 120), minute(current + 7), minute(current)];
        assert_eq!(store.restore(records, now), 1);
    }
}
