//! Why metering refused or failed: [`MeteringError`].

use std::path::PathBuf;

use super::spool::SpoolError;
use super::usage_api::BadQuery;

/// Why metering refused or failed.
#[derive(Debug, thiserror::Error)]
pub enum MeteringError {
    /// The disk bound is reached: the records were not accepted (nothing was dropped silently).
    #[error(
        "metering spool is full ({used} of {limit} bytes): usage records are refused until sealed windows are delivered and collected"
    )]
    Full {
        /// Bytes in use.
        used: u64,
        /// `max_disk_bytes`.
        limit: u64,
    },
    /// The spool or outbox failed.
    #[error(transparent)]
    Spool(#[from] SpoolError),
    /// A group commit failed; the records were not accepted.
    #[error("metering spool write failed: {0}")]
    Commit(String),
    /// Another process holds the folder.
    #[error("metering folder {0} is in use by another tollgate process")]
    Locked(PathBuf),
    /// The writer has stopped.
    #[error("metering has stopped")]
    Stopped,
    /// A usage query named no or both subjects.
    #[error(transparent)]
    BadQuery(#[from] BadQuery),
    /// Invalid options.
    #[error("metering options: {0}")]
    Options(String),
    /// Metrics could not be registered.
    #[error("metering metrics: {0}")]
    Metrics(#[from] prometheus::Error),
}
