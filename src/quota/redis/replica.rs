//! This replica's stable name in Redis, kept in `metering.dir` so a restart picks up its own leases.
//!
//! A replica's leases and served counts live in per-replica fields (`r:<id>`, `s:<id>`, `q:<id>`). Under a
//! fresh random id every start, a replica killed while holding leases strands them until their windows end
//! (a monthly quota: for the rest of the month). Under the same id, the restarted replica's first call on
//! each bucket settles with no local record, which releases what the old process still held there.
//!
//! The price of reclaiming: units the dead process served from its lease but had not reported yet (fewer
//! than `max_lease` per bucket, usually far fewer, since renewals report) are neither `used` nor
//! `reserved` after the release, so a kill -9 can let a bucket go over its limit by that much in the current
//! window, where a fresh id would have held the whole lease back from everyone until the window ended.
//!
//! The script refuses a call whose sequence number is not above the last one it applied for that replica
//! (a retried call must not undo a newer one). A restarted process therefore starts its sequence above
//! everything the previous one sent: sequence numbers are `boot << 32 | counter`, and `boot` is a counter
//! in the same file, raised and fsynced before the first call. Lua keeps numbers as doubles, exact below
//! 2^53: room for 2^21 restarts of 2^32 calls each.

use std::fs;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::util::durable::replace_file;

/// The file's name in `metering.dir`.
pub const FILE_NAME: &str = "quota-replica.json";

/// Bits of a sequence number below the boot counter.
const COUNTER_BITS: u32 = 32;
/// The largest boot counter whose sequence numbers stay exact in Lua.
const MAX_BOOT: u64 = (1 << (53 - COUNTER_BITS)) - 1;

/// Who this replica is in Redis, and where its sequence numbers start this time.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplicaId {
    /// The id in the per-replica field names.
    pub id: String,
    /// How many times this replica has started, this start included.
    pub boot: u64,
}

impl ReplicaId {
    /// A new random id that no restart will reuse (tests, and stores opened without a folder).
    pub fn ephemeral() -> ReplicaId {
        ReplicaId {
            id: format!("{:016x}", rand::random::<u64>()),
            boot: 0,
        }
    }

    /// The first sequence number of this start: above every number an earlier start of this id sent.
    pub fn first_seq(&self) -> u64 {
        (self.boot << COUNTER_BITS) | 1
    }
}

#[derive(Serialize, Deserialize)]
struct Saved {
    id: String,
    boot: u64,
}

/// Why the replica file could not be used.
#[derive(Debug, thiserror::Error)]
pub enum ReplicaError {
    /// The file system refused.
    #[error("Redis replica id {}: {source}", path.display())]
    Io {
        /// The file or folder.
        path: PathBuf,
        /// The failure.
        source: std::io::Error,
    },
    /// The file is not one tollgate wrote.
    #[error("Redis replica id {} is unreadable ({reason}); remove it to start under a new id", path.display())]
    Invalid {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
}

/// Reads this replica's id from `dir` (creating one on the first start), counts this start and saves it
/// before any call can use the new sequence numbers.
pub fn load_or_create(dir: &Path) -> Result<ReplicaId, ReplicaError> {
    let path = dir.join(FILE_NAME);
    let io = |path: &Path| {
        let path = path.to_owned();
        move |source| ReplicaError::Io { path, source }
    };
    let saved = match fs::read(&path) {
        Ok(bytes) => {
            let saved: Saved =
                serde_json::from_slice(&bytes).map_err(|e| ReplicaError::Invalid {
                    path: path.clone(),
                    reason: e.to_string(),
                })?;
            if saved.id.is_empty() || !saved.id.bytes().all(|b| b.is_ascii_alphanumeric()) {
                return Err(ReplicaError::Invalid {
                    path,
                    reason: "the id is not alphanumeric".into(),
                });
            }
            Some(saved)
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => return Err(io(&path)(e)),
    };
    let next = match saved {
        Some(saved) if saved.boot >= MAX_BOOT => {
            return Err(ReplicaError::Invalid {
                path,
                reason: format!("the boot counter reached {MAX_BOOT}"),
            });
        }
        Some(saved) => ReplicaId {
            id: saved.id,
            boot: saved.boot + 1,
        },
        None => ReplicaId {
            boot: 1,
            ..ReplicaId::ephemeral()
        },
    };
    let text = serde_json::to_vec(&Saved {
        id: next.id.clone(),
        boot: next.boot,
    })
    .map_err(|e| io(&path)(std::io::Error::other(e)))?;
    replace_file(dir, FILE_NAME, &text)
        .map_err(|(path, source)| ReplicaError::Io { path, source })?;
    Ok(next)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_id_is_kept_and_every_start_sequences_above_the_last() {
        let dir = tempfile::tempdir().unwrap();
        let first = load_or_create(dir.path()).unwrap();
        let second = load_or_create(dir.path()).unwrap();
        assert_eq!(first.id, second.id);
        assert_eq!((first.boot, second.boot), (1, 2));
        // However many calls the first start made, the second starts above them.
        assert!(second.first_seq() > first.first_seq() + u64::from(u32::MAX) - 1);
        assert!(second.first_seq() < 1 << 53);
    }

    #[test]
    fn a_foreign_file_is_refused_with_its_path() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join(FILE_NAME), br#"{"id": "a b", "boot": 1}"#).unwrap();
        let err = load_or_create(dir.path()).unwrap_err().to_string();
        assert!(
            err.contains(FILE_NAME) && err.contains("alphanumeric"),
            "{err}"
        );
        fs::write(dir.path().join(FILE_NAME), b"garbage").unwrap();
        assert!(load_or_create(dir.path()).is_err());
    }
}
