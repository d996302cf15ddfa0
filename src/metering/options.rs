//! How metering is set up: [`MeteringOptions`] and its defaults.

use std::path::PathBuf;
use std::time::Duration;

/// Default [`MeteringOptions::commit_interval`]: at most 100 fsyncs a second, each costing the kernel more
/// CPU than encoding the records it covers. Envoy never waits for the access log, so it costs no request time.
pub const DEFAULT_COMMIT_INTERVAL: Duration = Duration::from_millis(10);

/// How metering is set up (the lead maps `metering:` of the config file onto it).
#[derive(Debug, Clone)]
pub struct MeteringOptions {
    /// Folder of the spool (`spool/`), the outbox (`outbox.log`) and the lock file (`LOCK`).
    pub dir: PathBuf,
    /// Tumbling window length.
    pub window: Duration,
    /// How long after a window's end records still join revision 0.
    pub lateness: Duration,
    /// How long after the lateness a sealed window still takes late records (as new revisions) and stays in
    /// `/v1/usage`; records arriving later count in the window of their arrival.
    pub retention: Duration,
    /// Bound of the spool plus the outbox on disk; beyond it records are refused.
    pub max_disk_bytes: u64,
    /// Size at which the spool starts a new segment file (segments are deleted whole).
    pub segment_bytes: u64,
    /// This instance's id, part of every outbox row id, so replicas with their own spools never collide.
    /// `None`: a random id created once per spool folder and kept in `<dir>/PRODUCER`.
    pub producer: Option<String>,
    /// Least time between two group commits: under load, records gather for this long into one fsync.
    pub commit_interval: Duration,
}

impl MeteringOptions {
    /// Options with defaults: retention = window + lateness, 1 GiB of disk, 64 MiB segments.
    pub fn new(
        dir: impl Into<PathBuf>,
        window: Duration,
        lateness: Duration,
        producer: impl Into<String>,
    ) -> Self {
        MeteringOptions {
            producer: Some(producer.into()),
            ..Self::with_spool_producer(dir, window, lateness)
        }
    }

    /// Like [`MeteringOptions::new`], with the producer id the spool folder keeps (`<dir>/PRODUCER`).
    pub fn with_spool_producer(
        dir: impl Into<PathBuf>,
        window: Duration,
        lateness: Duration,
    ) -> Self {
        MeteringOptions {
            dir: dir.into(),
            window,
            lateness,
            retention: window + lateness,
            max_disk_bytes: 1 << 30,
            segment_bytes: 64 << 20,
            producer: None,
            commit_interval: DEFAULT_COMMIT_INTERVAL,
        }
    }

    /// How long a request id is remembered after its first copy arrived.
    pub fn dedup_horizon(&self) -> Duration {
        self.window + self.lateness + self.retention
    }
}

/// `d` in whole milliseconds, saturating (window arithmetic runs on Unix-ms `i64`s).
pub(super) fn millis(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}
