//! The metering folder's guards: the lock file that keeps a second process out, and the disk budget that
//! refuses records before the spool and the outbox together outgrow `max_disk_bytes`.

use std::fs::File;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use fs4::fs_std::FileExt;

use super::error::MeteringError;
use super::metrics::{MeteringMetrics, gauge};
use super::spool::SpoolError;

/// Takes `<dir>/LOCK` exclusively; the folder stays locked while the returned file is open.
pub(super) fn lock(dir: &Path) -> Result<File, MeteringError> {
    let path = dir.join("LOCK");
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(|source| SpoolError::Io {
            path: path.clone(),
            source,
        })?;
    match file.try_lock_exclusive() {
        Ok(true) => Ok(file),
        Ok(false) => Err(MeteringError::Locked(dir.to_owned())),
        Err(source) => Err(SpoolError::Io { path, source }.into()),
    }
}

/// Bytes the spool and the outbox use against `max_disk_bytes`, and whether records are refused for it.
///
/// The writer thread owns the spool and the async side the outbox, so the outbox's size is published here
/// for the writer to add to its own.
#[derive(Debug)]
pub(super) struct DiskBudget {
    full: AtomicBool,
    outbox_bytes: AtomicU64,
    limit: u64,
}

impl DiskBudget {
    /// A budget of `limit` bytes, with the outbox as replayed.
    pub(super) fn new(limit: u64, outbox_bytes: u64) -> Self {
        DiskBudget {
            full: AtomicBool::new(false),
            outbox_bytes: AtomicU64::new(outbox_bytes),
            limit,
        }
    }

    /// `max_disk_bytes`.
    pub(super) fn limit(&self) -> u64 {
        self.limit
    }

    /// Whether records are refused.
    pub(super) fn is_full(&self) -> bool {
        self.full.load(Ordering::Relaxed)
    }

    /// Publishes the outbox's size after it changed.
    pub(super) fn set_outbox_bytes(&self, bytes: u64) {
        self.outbox_bytes.store(bytes, Ordering::Relaxed);
    }

    /// Bytes in use with a spool of `spool_bytes`.
    pub(super) fn used(&self, spool_bytes: u64) -> u64 {
        spool_bytes + self.outbox_bytes.load(Ordering::Relaxed)
    }

    /// Refreshes the disk gauge; after a collection, clears `full` once 10% of the bound is free (so a
    /// spool at the edge does not flap between refusing and accepting).
    pub(super) fn refresh(&self, spool_bytes: u64, collected: bool, metrics: &MeteringMetrics) {
        let used = self.used(spool_bytes);
        metrics.spool_bytes.set(gauge(used));
        if collected && used <= self.limit - self.limit / 10 {
            self.set_full(false, used, metrics);
        }
    }

    /// Turns refusing on or off, saying so once per change.
    pub(super) fn set_full(&self, full: bool, used: u64, metrics: &MeteringMetrics) {
        if self.full.swap(full, Ordering::Relaxed) == full {
            return;
        }
        metrics.spool_full.set(i64::from(full));
        if full {
            tracing::error!(
                used_bytes = used,
                max_disk_bytes = self.limit,
                "metering spool is FULL: usage records are refused (access-log streams get RESOURCE_EXHAUSTED) \
                 until sealed windows are delivered and collected, or max_disk_bytes is raised"
            );
        } else {
            tracing::warn!(
                used_bytes = used,
                "metering spool has room again; accepting records"
            );
        }
    }
}
