//! The billing outbox: sealed window revisions waiting for delivery, durable until acknowledged.
//!
//! An append-only file of CRC frames, each a new row or the acknowledgement of one. A row is never edited:
//! a late record makes a new row (the next revision). Compaction rewrites the file without acknowledged rows
//! that nothing can need again (write to a temporary file, fsync, rename, fsync the folder).

use std::collections::HashMap;
use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

use prost::Message;
use sha2::{Digest, Sha256};

use super::frame;
use super::spool::{SpoolError, sync_dir};
use super::window::GroupKey;

/// One sealed revision of one (window, Stripe customer, meter): one Stripe meter event.
#[derive(Clone, PartialEq, Eq, prost::Message, serde::Serialize)]
pub struct OutboxRow {
    /// Deterministic id, at most 100 characters: send it as the meter event's `identifier`.
    #[prost(string, tag = "1")]
    pub id: String,
    /// The tollgate instance that sealed it (`MeteringOptions::producer`).
    #[prost(string, tag = "2")]
    pub producer: String,
    /// Window start, Unix ms (the event's `timestamp` is this in seconds: [`OutboxRow::timestamp`]).
    #[prost(int64, tag = "3")]
    pub window_start_ms: i64,
    /// Window end (exclusive), Unix ms.
    #[prost(int64, tag = "4")]
    pub window_end_ms: i64,
    /// 0 for the first seal, then one more per batch of late records.
    #[prost(uint32, tag = "5")]
    pub revision: u32,
    /// `payload[stripe_customer_id]`.
    #[prost(string, tag = "6")]
    pub stripe_customer: String,
    /// The meter's `event_name`.
    #[prost(string, tag = "7")]
    pub event_name: String,
    /// `payload[value]`: the billable total of this revision (only what earlier revisions did not hold).
    #[prost(uint64, tag = "8")]
    pub value: u64,
    /// When it was sealed, Unix ms.
    #[prost(int64, tag = "9")]
    pub sealed_at_ms: i64,
}

impl OutboxRow {
    /// A new row for `key`; the id depends only on (producer, window, revision, customer, meter).
    pub(crate) fn new(
        producer: &str,
        key: &GroupKey,
        revision: u32,
        value: u64,
        sealed_at_ms: i64,
    ) -> Self {
        OutboxRow {
            id: row_id(producer, key, revision),
            producer: producer.to_owned(),
            window_start_ms: key.window.start_ms,
            window_end_ms: key.window.end_ms(),
            revision,
            stripe_customer: key.customer.clone(),
            event_name: key.meter.clone(),
            value,
            sealed_at_ms,
        }
    }

    /// The meter event's `timestamp`: the window start in Unix seconds.
    pub fn timestamp(&self) -> i64 {
        self.window_start_ms.div_euclid(1_000)
    }
}

/// `tg-<window start s>-r<revision>-<32 hex of SHA-256 over every key part>`: at most 50 characters whatever
/// the customer and meter names, readable enough to find in Stripe, and collision-free in practice.
fn row_id(producer: &str, key: &GroupKey, revision: u32) -> String {
    let mut h = Sha256::new();
    for part in [producer, &key.customer, &key.meter] {
        h.update((part.len() as u64).to_le_bytes());
        h.update(part.as_bytes());
    }
    h.update(key.window.start_ms.to_le_bytes());
    h.update(key.window.len_ms.to_le_bytes());
    h.update(revision.to_le_bytes());
    let digest = hex::encode(h.finalize());
    format!(
        "tg-{}-r{revision}-{}",
        key.window.start_ms.div_euclid(1_000),
        &digest[..32]
    )
}

/// One line of the outbox file.
#[derive(Clone, PartialEq, prost::Message)]
struct Entry {
    /// A new sealed row.
    #[prost(message, optional, tag = "1")]
    row: Option<OutboxRow>,
    /// The id of a delivered row.
    #[prost(string, tag = "2")]
    ack: String,
}

/// What acknowledging an id did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum AckOutcome {
    /// The row was pending and is now delivered.
    Acked,
    /// The row was already acknowledged (acks are idempotent).
    AlreadyAcked,
    /// No row has this id (or it was compacted away long after its acknowledgement).
    Unknown,
}

/// A sealed outbox row and whether delivery acknowledged it (for `/v1/outbox`).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct OutboxItem {
    /// The row.
    #[serde(flatten)]
    pub row: OutboxRow,
    /// Acknowledged by [`UsageOutbox::ack`](super::UsageOutbox::ack).
    pub delivered: bool,
}

/// The outbox file and its rows in memory.
#[derive(Debug)]
pub(crate) struct OutboxLog {
    path: PathBuf,
    file: File,
    /// (row, acknowledged), in seal order.
    rows: Vec<(OutboxRow, bool)>,
    index: HashMap<String, usize>,
    bytes: u64,
    /// A failed write could not be rolled back, or a compaction could not reopen the file: nothing more may
    /// be written until a restart replays it.
    poisoned: bool,
    /// Makes the next compaction fail between its rename and the reopen.
    #[cfg(test)]
    fail_after_rename: bool,
}

impl OutboxLog {
    /// Opens (creating) the outbox at `path`, cutting off a torn tail.
    pub(crate) fn open(path: &Path) -> Result<OutboxLog, SpoolError> {
        let io = |source| SpoolError::Io {
            path: path.to_owned(),
            source,
        };
        let bytes = match fs::read(path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
            Err(e) => return Err(io(e)),
        };
        let (frames, _) = frame::decode_all(&bytes);
        let mut outbox = OutboxLog {
            path: path.to_owned(),
            file: OpenOptions::new()
                .append(true)
                .create(true)
                .open(path)
                .map_err(io)?,
            rows: Vec::new(),
            index: HashMap::new(),
            bytes: 0,
            poisoned: false,
            #[cfg(test)]
            fail_after_rename: false,
        };
        let mut valid = 0;
        for payload in frames {
            let Ok(entry) = Entry::decode(payload) else {
                break;
            };
            outbox.apply(entry);
            valid += frame::HEADER_LEN + payload.len();
        }
        if valid < bytes.len() {
            tracing::warn!(
                outbox = %path.display(),
                dropped_bytes = bytes.len() - valid,
                "cutting off the outbox's torn tail (a write that was never acknowledged)"
            );
            outbox.file.set_len(valid as u64).map_err(io)?;
            outbox.file.sync_all().map_err(io)?;
        }
        outbox.bytes = valid as u64;
        if let Some(dir) = path.parent() {
            sync_dir(dir)?;
        }
        Ok(outbox)
    }

    /// Applies one entry; a row whose id is already held is ignored, so a row written twice (a failed write's
    /// tail followed by its retry) stays one row, acknowledged by an ack of either copy.
    fn apply(&mut self, entry: Entry) {
        if let Some(row) = entry.row {
            if self.index.contains_key(&row.id) {
                tracing::warn!(id = %row.id, "ignoring a second outbox row with an id already held");
                return;
            }
            self.index.insert(row.id.clone(), self.rows.len());
            self.rows.push((row, false));
        } else if let Some(&i) = self.index.get(&entry.ack) {
            self.rows[i].1 = true; // invariant: index values point into rows
        }
    }

    /// Appends `rows` durably (one fsync).
    pub(crate) fn append(&mut self, rows: &[OutboxRow]) -> Result<(), SpoolError> {
        let mut out = Vec::new();
        for row in rows {
            let entry = Entry {
                row: Some(row.clone()),
                ack: String::new(),
            };
            frame::encode_into(&entry.encode_to_vec(), &mut out);
        }
        self.write(&out)?;
        for row in rows {
            self.apply(Entry {
                row: Some(row.clone()),
                ack: String::new(),
            });
        }
        Ok(())
    }

    /// Marks the row `id` delivered, durably.
    pub(crate) fn ack(&mut self, id: &str) -> Result<AckOutcome, SpoolError> {
        match self
            .index
            .get(id)
            .and_then(|&i| self.rows.get(i))
            .map(|(_, acked)| *acked)
        {
            None => return Ok(AckOutcome::Unknown),
            Some(true) => return Ok(AckOutcome::AlreadyAcked),
            Some(false) => {}
        }
        let entry = Entry {
            row: None,
            ack: id.to_owned(),
        };
        let mut out = Vec::new();
        frame::encode_into(&entry.encode_to_vec(), &mut out);
        self.write(&out)?;
        self.apply(entry);
        Ok(AckOutcome::Acked)
    }

    fn write(&mut self, out: &[u8]) -> Result<(), SpoolError> {
        if self.poisoned {
            return Err(SpoolError::Poisoned);
        }
        let before = self.bytes;
        let written = self
            .file
            .write_all(out)
            .and_then(|()| self.file.sync_data());
        if let Err(source) = written {
            let undone = self
                .file
                .set_len(before)
                .and_then(|()| self.file.sync_data());
            if undone.is_err() {
                // What of `out` reached the file is unknown, so nothing more is appended behind it.
                self.poisoned = true;
                tracing::error!(
                    outbox = %self.path.display(),
                    "a failed outbox write could not be rolled back; sealing and acknowledging stop until restart"
                );
            }
            return Err(SpoolError::Io {
                path: self.path.clone(),
                source,
            });
        }
        self.bytes += out.len() as u64;
        Ok(())
    }

    /// Rows not yet acknowledged, in seal order.
    pub(crate) fn pending(&self) -> Vec<OutboxRow> {
        self.rows
            .iter()
            .filter(|(_, acked)| !acked)
            .map(|(row, _)| row.clone())
            .collect()
    }

    /// Every row held, with whether it is acknowledged.
    pub(crate) fn rows(&self) -> impl Iterator<Item = (&OutboxRow, bool)> {
        self.rows.iter().map(|(row, acked)| (row, *acked))
    }

    /// Bytes on disk.
    pub(crate) fn bytes(&self) -> u64 {
        self.bytes
    }

    /// Whether the outbox refuses every write until restart (a failed write or compaction left it unsure).
    pub(crate) fn is_poisoned(&self) -> bool {
        self.poisoned
    }

    /// The step between the compaction's rename and the reopen, where tests inject a failure.
    #[cfg(not(test))]
    fn after_rename(&self) -> Result<(), SpoolError> {
        Ok(())
    }

    #[cfg(test)]
    fn after_rename(&self) -> Result<(), SpoolError> {
        if self.fail_after_rename {
            return Err(SpoolError::Io {
                path: self.path.clone(),
                source: std::io::Error::other("injected"),
            });
        }
        Ok(())
    }

    /// Rewrites the file without the acknowledged rows `keep` refuses, when that frees enough to be worth it.
    pub(crate) fn compact(
        &mut self,
        keep: impl Fn(&OutboxRow) -> bool,
    ) -> Result<bool, SpoolError> {
        if self.poisoned {
            return Err(SpoolError::Poisoned);
        }
        let droppable = self
            .rows
            .iter()
            .filter(|(row, acked)| *acked && !keep(row))
            .count();
        if droppable == 0 || (droppable < 1_024 && droppable * 2 < self.rows.len()) {
            return Ok(false);
        }
        let kept: Vec<(OutboxRow, bool)> = self
            .rows
            .iter()
            .filter(|(row, acked)| !*acked || keep(row))
            .cloned()
            .collect();
        let mut out = Vec::new();
        for (row, acked) in &kept {
            let entry = Entry {
                row: Some(row.clone()),
                ack: String::new(),
            };
            frame::encode_into(&entry.encode_to_vec(), &mut out);
            if *acked {
                let entry = Entry {
                    row: None,
                    ack: row.id.clone(),
                };
                frame::encode_into(&entry.encode_to_vec(), &mut out);
            }
        }
        let tmp = self.path.with_extension("compact");
        let io = |path: &Path| {
            let path = path.to_owned();
            move |source| SpoolError::Io { path, source }
        };
        let mut file = File::create(&tmp).map_err(io(&tmp))?;
        file.write_all(&out)
            .and_then(|()| file.sync_all())
            .map_err(io(&tmp))?;
        fs::rename(&tmp, &self.path).map_err(io(&self.path))?;
        // From here the path names the new file while `self.file` still writes into the old, now unlinked,
        // one: unless the reopen succeeds, nothing more may be appended anywhere.
        let reopened = self
            .after_rename()
            .and_then(|()| self.path.parent().map_or(Ok(()), sync_dir))
            .and_then(|()| {
                OpenOptions::new()
                    .append(true)
                    .open(&self.path)
                    .map_err(io(&self.path))
            });
        self.file = match reopened {
            Ok(file) => file,
            Err(e) => {
                self.poisoned = true;
                tracing::error!(outbox = %self.path.display(), error = %e,
                    "the outbox could not be reopened after compaction; sealing and acknowledging stop until restart");
                return Err(e);
            }
        };
        self.bytes = out.len() as u64;
        self.index = kept
            .iter()
            .enumerate()
            .map(|(i, (row, _))| (row.id.clone(), i))
            .collect();
        self.rows = kept;
        Ok(true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metering::window::WindowKey;

    fn key(customer: &str, start_ms: i64) -> GroupKey {
        GroupKey {
            window: WindowKey {
                start_ms,
                len_ms: 60_000,
            },
            customer: customer.into(),
            meter: "m".repeat(200),
        }
    }

    #[test]
    fn ids_are_deterministic_short_and_distinct() {
        let a = OutboxRow::new("pod-a", &key("cus_1", 1_767_225_600_000), 0, 5, 1);
        let again = OutboxRow::new("pod-a", &key("cus_1", 1_767_225_600_000), 0, 9, 2);
        assert_eq!(a.id, again.id, "the id ignores value and seal time");
        assert!(a.id.len() <= 100, "{}", a.id);
        assert!(a.id.starts_with("tg-1767225600-r0-"), "{}", a.id);
        let others = [
            OutboxRow::new("pod-b", &key("cus_1", 1_767_225_600_000), 0, 5, 1),
            OutboxRow::new("pod-a", &key("cus_2", 1_767_225_600_000), 0, 5, 1),
            OutboxRow::new("pod-a", &key("cus_1", 1_767_225_660_000), 0, 5, 1),
            OutboxRow::new("pod-a", &key("cus_1", 1_767_225_600_000), 1, 5, 1),
        ];
        for other in others {
            assert_ne!(a.id, other.id);
        }
        assert_eq!(a.timestamp(), 1_767_225_600);
    }

    #[test]
    fn rows_and_acks_survive_reopen_and_a_torn_tail() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("outbox.log");
        let mut outbox = OutboxLog::open(&path).unwrap();
        let rows: Vec<OutboxRow> = (0..3)
            .map(|i| OutboxRow::new("p", &key("cus", i * 60_000), 0, 1, 1))
            .collect();
        outbox.append(&rows).unwrap();
        assert_eq!(outbox.ack(&rows[1].id).unwrap(), AckOutcome::Acked);
        assert_eq!(outbox.ack(&rows[1].id).unwrap(), AckOutcome::AlreadyAcked);
        assert_eq!(outbox.ack("nope").unwrap(), AckOutcome::Unknown);
        drop(outbox);
        let mut file = OpenOptions::new().append(true).open(&path).unwrap();
        file.write_all(&[0x31, 0x46, 0x47]).unwrap();
        drop(file);
        let outbox = OutboxLog::open(&path).unwrap();
        let pending: Vec<_> = outbox.pending().into_iter().map(|r| r.id).collect();
        assert_eq!(pending, [rows[0].id.clone(), rows[2].id.clone()]);
    }

    #[test]
    fn a_row_written_twice_is_one_row_acknowledged_by_one_ack() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("outbox.log");
        let mut outbox = OutboxLog::open(&path).unwrap();
        let row = OutboxRow::new("p", &key("cus", 0), 0, 5, 1);
        let other = OutboxRow::new("p", &key("cus", 60_000), 0, 1, 1);
        outbox.append(std::slice::from_ref(&row)).unwrap();
        // What a retry writes after a failed write whose rollback did not take.
        outbox.append(&[row.clone(), other.clone()]).unwrap();
        assert_eq!(outbox.rows().count(), 2);
        assert_eq!(outbox.ack(&row.id).unwrap(), AckOutcome::Acked);
        let pending = |o: &OutboxLog| o.pending().into_iter().map(|r| r.id).collect::<Vec<_>>();
        assert_eq!(pending(&outbox), std::slice::from_ref(&other.id));
        drop(outbox);
        let outbox = OutboxLog::open(&path).unwrap();
        assert_eq!(
            pending(&outbox),
            std::slice::from_ref(&other.id),
            "after replay too"
        );
        let held: Vec<_> = outbox
            .rows()
            .map(|(r, _)| (r.id.clone(), r.value))
            .collect();
        assert_eq!(held, [(row.id, 5), (other.id, 1)], "replay counts it once");
    }

    #[test]
    fn a_failed_write_that_cannot_be_rolled_back_poisons_the_outbox() {
        // Writes to /dev/full fail (ENOSPC) and it cannot be truncated, so the rollback fails too.
        let path = PathBuf::from("/dev/full");
        let Ok(file) = OpenOptions::new().append(true).open(&path) else {
            panic!("/dev/full is needed for this test");
        };
        let mut outbox = OutboxLog {
            path,
            file,
            rows: Vec::new(),
            index: HashMap::new(),
            bytes: 0,
            poisoned: false,
            fail_after_rename: false,
        };
        let row = OutboxRow::new("p", &key("cus", 0), 0, 5, 1);
        let first = outbox.append(std::slice::from_ref(&row));
        assert!(matches!(first, Err(SpoolError::Io { .. })), "{first:?}");
        assert!(outbox.pending().is_empty());
        let again = outbox.append(std::slice::from_ref(&row));
        assert!(matches!(again, Err(SpoolError::Poisoned)), "{again:?}");
        assert!(matches!(outbox.ack(&row.id), Ok(AckOutcome::Unknown)));
        assert!(matches!(
            outbox.compact(|_| false),
            Err(SpoolError::Poisoned)
        ));
    }

    #[test]
    fn a_compaction_that_fails_after_its_rename_poisons_the_outbox() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("outbox.log");
        let mut outbox = OutboxLog::open(&path).unwrap();
        let rows: Vec<OutboxRow> = (0..4)
            .map(|i| OutboxRow::new("p", &key("cus", i * 60_000), 0, 1, 1))
            .collect();
        outbox.append(&rows).unwrap();
        for row in &rows[..3] {
            outbox.ack(&row.id).unwrap();
        }
        outbox.fail_after_rename = true;
        assert!(outbox.compact(|_| false).is_err());
        // Had the old handle stayed in use, this row would go into the unlinked file and be lost.
        let late = OutboxRow::new("p", &key("cus", 600_000), 0, 1, 1);
        assert!(matches!(
            outbox.append(std::slice::from_ref(&late)),
            Err(SpoolError::Poisoned)
        ));
        assert!(outbox.is_poisoned());
        drop(outbox);
        let reopened = OutboxLog::open(&path).unwrap();
        assert_eq!(
            reopened
                .pending()
                .into_iter()
                .map(|r| r.id)
                .collect::<Vec<_>>(),
            [rows[3].id.clone()],
            "the compacted file holds every pending row"
        );
    }

    #[test]
    fn compaction_keeps_pending_and_wanted_rows() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("outbox.log");
        let mut outbox = OutboxLog::open(&path).unwrap();
        let rows: Vec<OutboxRow> = (0..4)
            .map(|i| OutboxRow::new("p", &key("cus", i * 60_000), 0, 1, 1))
            .collect();
        outbox.append(&rows).unwrap();
        for row in &rows[..3] {
            outbox.ack(&row.id).unwrap();
        }
        let keep_from = rows[2].window_start_ms;
        assert!(outbox.compact(|r| r.window_start_ms >= keep_from).unwrap());
        let before = outbox.bytes();
        drop(outbox);
        let mut outbox = OutboxLog::open(&path).unwrap();
        assert_eq!(outbox.bytes(), before);
        let held: Vec<_> = outbox.rows().map(|(r, a)| (r.id.clone(), a)).collect();
        assert_eq!(
            held,
            [(rows[2].id.clone(), true), (rows[3].id.clone(), false)]
        );
        assert_eq!(outbox.ack(&rows[3].id).unwrap(), AckOutcome::Acked);
    }
}
