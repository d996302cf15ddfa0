//! The durable spool: an append-only log of CRC-framed record batches, split into segment files.
//!
//! One writer appends batches and makes them durable with one `fdatasync` per group of batches (group
//! commit). Replay reads the segments in order and stops at the first invalid frame: a torn tail of the last
//! segment is cut off (it was never acknowledged). A whole segment is deleted once every window it holds is
//! closed for good and sealed, and its request ids are past the deduplication horizon.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use prost::Message;

use super::frame;
use super::record::{SpoolBatch, SpooledRecord};
use super::window::Horizon;

/// Segment file suffix.
const SUFFIX: &str = "seg";

/// The windows and arrival times one batch touches (what deciding a segment's deletion needs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct BatchMeta {
    /// Earliest window end of its records.
    pub min_window_end_ms: i64,
    /// Latest window end of its records.
    pub max_window_end_ms: i64,
    /// Latest arrival of its records.
    pub max_received_ms: i64,
}

impl BatchMeta {
    /// Nothing yet.
    pub(crate) const EMPTY: BatchMeta = BatchMeta {
        min_window_end_ms: i64::MAX,
        max_window_end_ms: i64::MIN,
        max_received_ms: i64::MIN,
    };

    /// Widens to include `record`.
    pub(crate) fn include(&mut self, record: &SpooledRecord) {
        let end = record.window_start_ms.saturating_add(record.window_len_ms);
        self.min_window_end_ms = self.min_window_end_ms.min(end);
        self.max_window_end_ms = self.max_window_end_ms.max(end);
        self.max_received_ms = self.max_received_ms.max(record.received_ms);
    }

    fn merge(&mut self, other: &BatchMeta) {
        self.min_window_end_ms = self.min_window_end_ms.min(other.min_window_end_ms);
        self.max_window_end_ms = self.max_window_end_ms.max(other.max_window_end_ms);
        self.max_received_ms = self.max_received_ms.max(other.max_received_ms);
    }
}

#[derive(Debug)]
struct Segment {
    id: u64,
    bytes: u64,
    meta: BatchMeta,
}

/// Why the spool cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum SpoolError {
    /// A file operation failed.
    #[error("metering spool {path}: {source}")]
    Io {
        /// The file or folder.
        path: PathBuf,
        /// The OS error.
        source: io::Error,
    },
    /// An earlier write failed and could not be undone, so the file's tail is unknown until a restart replays it.
    #[error(
        "metering spool is unusable after a failed write that could not be rolled back; restart tollgate"
    )]
    Poisoned,
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> SpoolError + '_ {
    move |source| SpoolError::Io {
        path: path.to_owned(),
        source,
    }
}

/// What replay found.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Replayed {
    /// Records handed to the callback.
    pub records: u64,
    /// Bytes of torn or corrupt frames cut off or skipped.
    pub dropped_bytes: u64,
}

/// The segment log.
#[derive(Debug)]
pub(crate) struct Spool {
    dir: PathBuf,
    /// Oldest first; the last one is the active segment.
    segments: Vec<Segment>,
    active: File,
    segment_limit: u64,
    poisoned: bool,
}

impl Spool {
    /// Opens (creating) the spool in `dir` and replays every durable record through `each`, oldest first.
    pub(crate) fn open(
        dir: &Path,
        segment_limit: u64,
        mut each: impl FnMut(SpooledRecord),
    ) -> Result<(Spool, Replayed), SpoolError> {
        fs::create_dir_all(dir).map_err(io_err(dir))?;
        let mut ids: Vec<u64> = Vec::new();
        for entry in fs::read_dir(dir).map_err(io_err(dir))? {
            let path = entry.map_err(io_err(dir))?.path();
            let id = path
                .extension()
                .filter(|e| *e == SUFFIX)
                .and_then(|_| path.file_stem())
                .and_then(|s| s.to_str())
                .and_then(|s| s.parse::<u64>().ok());
            if let Some(id) = id {
                ids.push(id);
            }
        }
        ids.sort_unstable();
        let mut replayed = Replayed::default();
        let mut segments = Vec::with_capacity(ids.len() + 1);
        let last = ids.last().copied();
        for id in ids {
            let path = segment_path(dir, id);
            let bytes = fs::read(&path).map_err(io_err(&path))?;
            let (frames, valid) = frame::decode_all(&bytes);
            let mut meta = BatchMeta::EMPTY;
            let mut valid_len = 0;
            for payload in frames {
                let Ok(batch) = SpoolBatch::decode(payload) else {
                    break;
                };
                for record in batch.records {
                    meta.include(&record);
                    replayed.records += 1;
                    each(record);
                }
                valid_len += frame::HEADER_LEN + payload.len();
            }
            debug_assert!(valid_len <= valid);
            let dropped = bytes.len() - valid_len;
            let mut kept = bytes.len() as u64;
            if dropped > 0 {
                replayed.dropped_bytes += dropped as u64;
                if Some(id) == last {
                    tracing::warn!(
                        segment = %path.display(),
                        dropped_bytes = dropped,
                        "cutting off the spool's torn tail (a write that was never acknowledged)"
                    );
                    let file = OpenOptions::new()
                        .write(true)
                        .open(&path)
                        .map_err(io_err(&path))?;
                    file.set_len(valid_len as u64).map_err(io_err(&path))?;
                    file.sync_all().map_err(io_err(&path))?;
                    kept = valid_len as u64;
                } else {
                    tracing::error!(
                        segment = %path.display(),
                        dropped_bytes = dropped,
                        "corrupt frame inside a sealed spool segment; the records after it are unreadable"
                    );
                }
            }
            segments.push(Segment {
                id,
                bytes: kept,
                meta,
            });
        }
        let (active, segments) = match segments.pop() {
            Some(seg) => {
                let path = segment_path(dir, seg.id);
                let file = open_append(&path)?;
                segments.push(seg);
                (file, segments)
            }
            None => {
                let file = create_segment(dir, 1)?;
                segments.push(Segment {
                    id: 1,
                    bytes: 0,
                    meta: BatchMeta::EMPTY,
                });
                (file, segments)
            }
        };
        Ok((
            Spool {
                dir: dir.to_owned(),
                segments,
                active,
                segment_limit,
                poisoned: false,
            },
            replayed,
        ))
    }

    /// Appends `frames` (whole frames) and makes them durable; on failure nothing of them stays.
    pub(crate) fn append(&mut self, frames: &[u8], meta: &BatchMeta) -> Result<(), SpoolError> {
        if self.poisoned {
            return Err(SpoolError::Poisoned);
        }
        if self.active_segment().bytes > 0
            && self.active_segment().bytes + frames.len() as u64 > self.segment_limit
        {
            self.rotate()?;
        }
        let before = self.active_segment().bytes;
        let written = self
            .active
            .write_all(frames)
            .and_then(|()| self.active.sync_data());
        if let Err(source) = written {
            let undone = self
                .active
                .set_len(before)
                .and_then(|()| self.active.sync_data());
            if undone.is_err() {
                self.poisoned = true;
            }
            return Err(SpoolError::Io {
                path: segment_path(&self.dir, self.active_segment().id),
                source,
            });
        }
        let active = self.active_segment_mut();
        active.bytes += frames.len() as u64;
        active.meta.merge(meta);
        Ok(())
    }

    /// Deletes segments nothing needs any more; returns the earliest window end the remaining segments hold.
    pub(crate) fn collect(
        &mut self,
        horizon: &Horizon,
        dedup_horizon_ms: i64,
        now_ms: i64,
    ) -> Result<Option<i64>, SpoolError> {
        let done = |meta: &BatchMeta| {
            meta.max_window_end_ms <= horizon.closed_before_ms
                && horizon
                    .min_live_end_ms
                    .is_none_or(|e| meta.max_window_end_ms < e)
                && meta.max_received_ms.saturating_add(dedup_horizon_ms) <= now_ms
        };
        if self.active_segment().bytes > 0 && done(&self.active_segment().meta) && !self.poisoned {
            self.rotate()?;
        }
        let active_id = self.active_segment().id;
        let doomed: Vec<u64> = self
            .segments
            .iter()
            .filter(|s| s.id != active_id && done(&s.meta))
            .map(|s| s.id)
            .collect();
        let mut failed = None;
        let mut deleted = false;
        for id in doomed {
            let path = segment_path(&self.dir, id);
            if let Err(source) = fs::remove_file(&path) {
                failed = Some(SpoolError::Io { path, source });
                break;
            }
            self.segments.retain(|s| s.id != id);
            deleted = true;
        }
        if deleted {
            sync_dir(&self.dir)?;
        }
        if let Some(e) = failed {
            return Err(e);
        }
        Ok(self
            .segments
            .iter()
            .filter(|s| s.bytes > 0)
            .map(|s| s.meta.min_window_end_ms)
            .min())
    }

    /// Bytes on disk.
    pub(crate) fn bytes(&self) -> u64 {
        self.segments.iter().map(|s| s.bytes).sum()
    }

    /// Whether a failed write could not be undone, so the spool refuses every append until restart.
    pub(crate) fn is_poisoned(&self) -> bool {
        self.poisoned
    }

    /// Number of segment files.
    #[cfg(test)]
    pub(crate) fn segment_count(&self) -> usize {
        self.segments.len()
    }

    fn rotate(&mut self) -> Result<(), SpoolError> {
        let id = self.active_segment().id + 1;
        self.active = create_segment(&self.dir, id)?;
        self.segments.push(Segment {
            id,
            bytes: 0,
            meta: BatchMeta::EMPTY,
        });
        Ok(())
    }

    fn active_segment(&self) -> &Segment {
        // invariant: `segments` always holds the active segment (open and rotate push it; collect keeps it).
        &self.segments[self.segments.len() - 1]
    }

    fn active_segment_mut(&mut self) -> &mut Segment {
        let last = self.segments.len() - 1; // invariant: see active_segment
        &mut self.segments[last] // invariant: the active segment is always held
    }
}

/// Encodes `records` as one frame appended to `out`, and hands them back.
pub(crate) fn encode_batch(records: Vec<SpooledRecord>, out: &mut Vec<u8>) -> Vec<SpooledRecord> {
    let batch = SpoolBatch { records };
    frame::encode_into(&batch.encode_to_vec(), out);
    batch.records
}

fn segment_path(dir: &Path, id: u64) -> PathBuf {
    dir.join(format!("{id:020}.{SUFFIX}"))
}

fn open_append(path: &Path) -> Result<File, SpoolError> {
    OpenOptions::new()
        .append(true)
        .open(path)
        .map_err(io_err(path))
}

fn create_segment(dir: &Path, id: u64) -> Result<File, SpoolError> {
    let path = segment_path(dir, id);
    // An empty file of this name is what an earlier attempt left when its folder fsync failed: take it
    // over (refusing it would wedge the spool on that name forever). A file with data is never overwritten.
    let file = OpenOptions::new()
        .append(true)
        .create(true)
        .open(&path)
        .map_err(io_err(&path))?;
    let len = file.metadata().map_err(io_err(&path))?.len();
    if len != 0 {
        return Err(SpoolError::Io {
            path,
            source: std::io::Error::new(
                std::io::ErrorKind::AlreadyExists,
                "the next spool segment already holds data",
            ),
        });
    }
    // The new name must survive a crash before anything acknowledged is written into it.
    sync_dir(dir)?;
    Ok(file)
}

/// Makes entries created, renamed or removed in `dir` durable.
pub(crate) fn sync_dir(dir: &Path) -> Result<(), SpoolError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_err(dir))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metering::record::UsageRecord;

    fn record(id: &str, window_start_ms: i64, received_ms: i64) -> SpooledRecord {
        SpooledRecord {
            record: Some(UsageRecord {
                request_id: id.into(),
                ..Default::default()
            }),
            received_ms,
            window_start_ms,
            window_len_ms: 1_000,
            ..Default::default()
        }
    }

    fn append(spool: &mut Spool, records: Vec<SpooledRecord>) {
        let mut meta = BatchMeta::EMPTY;
        records.iter().for_each(|r| meta.include(r));
        let mut out = Vec::new();
        encode_batch(records, &mut out);
        spool.append(&out, &meta).unwrap();
    }

    fn ids(dir: &Path) -> (Vec<String>, Replayed) {
        let mut seen = Vec::new();
        let (_, replayed) = Spool::open(dir, 1 << 20, |r| {
            seen.push(r.record.unwrap().request_id);
        })
        .unwrap();
        (seen, replayed)
    }

    #[test]
    fn records_replay_in_order_after_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let (mut spool, _) = Spool::open(dir.path(), 1 << 20, |_| {}).unwrap();
        append(&mut spool, vec![record("a", 0, 1), record("b", 0, 2)]);
        append(&mut spool, vec![record("c", 0, 3)]);
        drop(spool);
        let (seen, replayed) = ids(dir.path());
        assert_eq!(seen, ["a", "b", "c"]);
        assert_eq!(replayed.dropped_bytes, 0);
    }

    #[test]
    fn a_torn_tail_is_cut_off_and_never_misread() {
        let dir = tempfile::tempdir().unwrap();
        let (mut spool, _) = Spool::open(dir.path(), 1 << 20, |_| {}).unwrap();
        append(&mut spool, vec![record("a", 0, 1)]);
        let good = spool.bytes();
        drop(spool);
        let mut torn = Vec::new();
        encode_batch(vec![record("torn", 0, 2)], &mut torn);
        let path = segment_path(dir.path(), 1);
        for cut in [1, frame::HEADER_LEN, torn.len() - 1] {
            let mut file = OpenOptions::new().append(true).open(&path).unwrap();
            file.write_all(&torn[..cut]).unwrap();
            drop(file);
            let (seen, replayed) = ids(dir.path());
            assert_eq!(seen, ["a"], "cut at {cut}");
            assert_eq!(replayed.dropped_bytes, cut as u64);
            assert_eq!(
                fs::metadata(&path).unwrap().len(),
                good,
                "the tail is truncated"
            );
        }
        let (mut spool, _) = Spool::open(dir.path(), 1 << 20, |_| {}).unwrap();
        append(&mut spool, vec![record("b", 0, 3)]);
        drop(spool);
        assert_eq!(
            ids(dir.path()).0,
            ["a", "b"],
            "appends continue after the cut"
        );
    }

    #[test]
    fn a_corrupt_byte_inside_the_tail_frame_drops_that_frame_only() {
        let dir = tempfile::tempdir().unwrap();
        let (mut spool, _) = Spool::open(dir.path(), 1 << 20, |_| {}).unwrap();
        append(&mut spool, vec![record("a", 0, 1)]);
        append(&mut spool, vec![record("b", 0, 2)]);
        drop(spool);
        let path = segment_path(dir.path(), 1);
        let mut bytes = fs::read(&path).unwrap();
        let last = bytes.len() - 1;
        bytes[last] ^= 0xff;
        fs::write(&path, &bytes).unwrap();
        assert_eq!(ids(dir.path()).0, ["a"]);
    }

    #[test]
    fn a_rotation_whose_folder_fsync_failed_is_retried_on_the_same_empty_file() {
        let dir = tempfile::tempdir().unwrap();
        let (mut spool, _) = Spool::open(dir.path(), 1, |_| {}).unwrap();
        append(&mut spool, vec![record("a", 0, 10)]);
        // What a rotation leaves when it created the next segment and then failed to fsync the folder.
        let next = segment_path(dir.path(), spool.active_segment().id + 1);
        File::create(&next).unwrap();
        append(&mut spool, vec![record("b", 0, 20)]);
        assert!(!spool.is_poisoned());
        // A next segment that already holds data is never appended to.
        let after = segment_path(dir.path(), spool.active_segment().id + 1);
        fs::write(&after, b"not ours").unwrap();
        let mut meta = BatchMeta::EMPTY;
        let rec = vec![record("c", 0, 30)];
        rec.iter().for_each(|r| meta.include(r));
        let mut out = Vec::new();
        encode_batch(rec, &mut out);
        assert!(spool.append(&out, &meta).is_err());
        drop(spool);
        fs::remove_file(&after).unwrap();
        assert_eq!(ids(dir.path()).0, ["a", "b"]);
    }

    #[test]
    fn segments_rotate_and_are_collected_only_when_done() {
        let dir = tempfile::tempdir().unwrap();
        let (mut spool, _) = Spool::open(dir.path(), 1, |_| {}).unwrap();
        append(&mut spool, vec![record("a", 0, 10)]);
        append(&mut spool, vec![record("b", 5_000, 5_100)]);
        append(&mut spool, vec![record("c", 9_000, 9_100)]);
        assert_eq!(spool.segment_count(), 3);
        let horizon = Horizon {
            closed_before_ms: 6_000,
            min_live_end_ms: Some(6_000),
        };
        let oldest = spool.collect(&horizon, 100, 20_000).unwrap();
        assert_eq!(
            spool.segment_count(),
            2,
            "only the first is closed and not live"
        );
        assert_eq!(oldest, Some(6_000));
        let horizon = Horizon {
            closed_before_ms: 6_000,
            min_live_end_ms: None,
        };
        spool.collect(&horizon, 100, 5_150).unwrap();
        assert_eq!(
            spool.segment_count(),
            2,
            "ids still inside the dedup horizon"
        );
        spool.collect(&horizon, 100, 5_200).unwrap();
        assert_eq!(spool.segment_count(), 1);
        drop(spool);
        assert_eq!(ids(dir.path()).0, ["c"]);
    }
}
