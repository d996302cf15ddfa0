//! The spend journal: what this replica served per owner, written to a file in `metering.dir` before each
//! prepaid call is allowed, so a restart after a crash reports exactly what was served instead of keeping
//! the whole lease as spent.
//!
//! A write is a `pwrite` of 8 bytes into the page cache, not an fsync: it survives the process being killed
//! (kill -9, OOM, a panic) because the kernel keeps the page, not a reboot of the machine. So the journal is
//! trusted only when it was written under the running kernel (the boot id it records is the current one);
//! after a reboot, or without a journal, the restart keeps the whole lease as spent (the bound in
//! [`super`]'s docs).
//!
//! Layout: a 128-byte header (magic, boot id, replica id), then one 272-byte slot per owner: the owner's
//! name (length-prefixed, at most [`MAX_OWNER`] bytes) and, at the end, its served total (u64, little-endian).
//! A slot is written once with its name and total 0 before the owner's first spend.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};

use crate::util::sync::lock;

/// The journal's file name in `metering.dir`.
pub const FILE_NAME: &str = "credits.journal";
/// Longest owner name a slot holds; longer owners are not journaled (their crash cost is the lease bound).
pub const MAX_OWNER: usize = 256;

const MAGIC: &[u8; 8] = b"TGCRJNL1";
const HEADER: u64 = 128;
const SLOT: u64 = 272;
const SERVED_AT: u64 = SLOT - 8;

/// What a previous life of this replica journaled.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Previous {
    /// Served totals by owner; empty when the journal is missing or not trusted.
    pub served: HashMap<String, u64>,
    /// Why the journal is not used, when it is not.
    pub untrusted: Option<String>,
}

impl Default for Previous {
    fn default() -> Self {
        Previous {
            served: HashMap::new(),
            untrusted: Some("no spend journal".to_owned()),
        }
    }
}

impl Previous {
    /// The served totals, when the journal can be trusted.
    pub fn trusted(&self) -> Option<&HashMap<String, u64>> {
        self.untrusted.is_none().then_some(&self.served)
    }
}

/// The open journal of this replica's current life.
#[derive(Debug)]
pub struct Journal {
    file: File,
    path: PathBuf,
    replica: String,
    boot: Option<String>,
    /// Slots handed out in this life.
    slots: Mutex<u64>,
    /// A write failed: the file is marked untrusted and nothing more is written in this life.
    poisoned: AtomicBool,
}

impl Journal {
    /// Opens (or creates) the journal in `dir` and reads what a previous life of `replica` wrote. The file is
    /// left as it is until [`Journal::begin_life`], so a crash before the previous life is settled loses
    /// nothing.
    pub fn open(dir: &Path, replica: &str) -> io::Result<(Journal, Previous)> {
        let path = dir.join(FILE_NAME);
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)?;
        let boot = boot_id();
        let previous = read(&file, replica, boot.as_deref())?;
        Ok((
            Journal {
                file,
                path,
                replica: replica.to_owned(),
                boot,
                slots: Mutex::new(0),
                poisoned: AtomicBool::new(false),
            },
            previous,
        ))
    }

    /// Starts this life's journal (empty, under the current boot id); call once the previous life's leases
    /// are settled in the ledger.
    ///
    /// The old header is made unreadable first, so a failure half-way never leaves the last life's totals
    /// looking like this one's; on failure the journal is poisoned.
    pub fn begin_life(&self) -> io::Result<()> {
        let mut header = [0u8; HEADER as usize];
        header[..8].copy_from_slice(MAGIC);
        put_text(&mut header[8..72], self.boot.as_deref().unwrap_or(""));
        put_text(&mut header[72..128], &self.replica);
        let begun = self
            .file
            .write_all_at(&[0; 8], 0)
            .and_then(|()| self.file.set_len(0))
            .and_then(|()| self.file.write_all_at(&header, 0));
        if begun.is_err() {
            self.poison();
        }
        *lock(&self.slots) = 0;
        begun
    }

    /// Stops journaling for this life and makes the file untrusted, so the next start keeps what this life
    /// held as spent instead of believing totals that may be stale. Called when a write fails.
    pub fn poison(&self) {
        self.poisoned.store(true, Ordering::Release);
        // Best effort: if even this fails the disk is gone, and so is the file's next read.
        let _ = self.file.write_all_at(&[0; 8], 0);
    }

    /// Gives `owner` a slot with a served total of 0; `None` when its name is too long to journal or the
    /// journal is poisoned (its spends are then not journaled, and a restart keeps its lease as spent).
    pub fn slot(&self, owner: &str) -> io::Result<Option<u64>> {
        if owner.len() > MAX_OWNER || self.poisoned.load(Ordering::Acquire) {
            return Ok(None);
        }
        let mut slots = lock(&self.slots);
        let at = HEADER + *slots * SLOT;
        let mut slot = [0u8; SLOT as usize];
        slot[..2].copy_from_slice(&(owner.len() as u16).to_le_bytes());
        slot[2..2 + owner.len()].copy_from_slice(owner.as_bytes());
        self.file.write_all_at(&slot, at)?;
        *slots += 1;
        Ok(Some(at + SERVED_AT))
    }

    /// Records an owner's served total at the slot [`Journal::slot`] gave; a failure poisons the journal (a
    /// stale total would give served credits back at the next start).
    pub fn record(&self, at: u64, served_total: u64) -> io::Result<()> {
        if self.poisoned.load(Ordering::Acquire) {
            return Ok(());
        }
        let written = self.file.write_all_at(&served_total.to_le_bytes(), at);
        if written.is_err() {
            self.poison();
        }
        written
    }

    /// Where the journal lives.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// The running kernel's boot id (Linux); `None` elsewhere, where the journal is never trusted.
fn boot_id() -> Option<String> {
    std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .ok()
        .map(|s| s.trim().to_owned())
        .filter(|s| !s.is_empty() && s.len() < 64)
}

fn put_text(field: &mut [u8], text: &str) {
    let n = text.len().min(field.len() - 1);
    field[0] = n as u8;
    field[1..1 + n].copy_from_slice(&text.as_bytes()[..n]);
}

fn get_text(field: &[u8]) -> &[u8] {
    let n = usize::from(field[0]).min(field.len() - 1);
    &field[1..1 + n]
}

fn read(file: &File, replica: &str, boot: Option<&str>) -> io::Result<Previous> {
    let untrusted = |why: &str| Previous {
        served: HashMap::new(),
        untrusted: Some(why.to_owned()),
    };
    let len = file.metadata()?.len();
    if len == 0 {
        return Ok(untrusted("no journal yet"));
    }
    let mut header = [0u8; HEADER as usize];
    if len < HEADER || file.read_exact_at(&mut header, 0).is_err() || &header[..8] != MAGIC {
        return Ok(untrusted("the journal is not one this version wrote"));
    }
    if get_text(&header[72..128]) != replica.as_bytes() {
        return Ok(untrusted("the journal belongs to another replica id"));
    }
    match boot {
        Some(boot) if get_text(&header[8..72]) == boot.as_bytes() => {}
        _ => return Ok(untrusted("the machine restarted since it was written")),
    }
    let mut served = HashMap::new();
    let mut slot = [0u8; SLOT as usize];
    let mut at = HEADER;
    // A slot torn by the crash (the file ends inside it) holds nothing served yet: its name is written first.
    while at + SLOT <= len {
        file.read_exact_at(&mut slot, at)?;
        let n = usize::from(u16::from_le_bytes([slot[0], slot[1]]));
        if n == 0 || n > MAX_OWNER {
            break;
        }
        let owner = String::from_utf8_lossy(&slot[2..2 + n]).into_owned();
        let mut total = [0u8; 8];
        total.copy_from_slice(&slot[SERVED_AT as usize..]);
        served.insert(owner, u64::from_le_bytes(total));
        at += SLOT;
    }
    Ok(Previous {
        served,
        untrusted: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn slot(journal: &Journal, owner: &str) -> io::Result<u64> {
        journal
            .slot(owner)?
            .ok_or_else(|| io::Error::other("no slot"))
    }

    #[test]
    fn a_new_life_reads_what_the_last_one_served() -> io::Result<()> {
        let dir = tempfile::tempdir()?;
        let (first, previous) = Journal::open(dir.path(), "r1")?;
        assert_eq!(previous.untrusted.as_deref(), Some("no journal yet"));
        first.begin_life()?;
        let acme = slot(&first, "acme")?;
        let dev = slot(&first, "dev@example.com")?;
        first.record(acme, 7)?;
        first.record(dev, 3)?;
        first.record(acme, 9)?;
        assert_eq!(first.slot(&"x".repeat(MAX_OWNER + 1))?, None);
        drop(first);

        let (second, previous) = Journal::open(dir.path(), "r1")?;
        if boot_id().is_some() {
            assert_eq!(previous.untrusted, None);
            assert_eq!(previous.served.get("acme"), Some(&9));
            assert_eq!(previous.served.get("dev@example.com"), Some(&3));
        }
        // Another replica's journal tells nothing, and neither does a new life's empty one.
        let (_, other) = Journal::open(dir.path(), "r2")?;
        assert!(other.served.is_empty());
        second.begin_life()?;
        let (_, fresh) = Journal::open(dir.path(), "r1")?;
        assert!(fresh.served.is_empty());
        // A poisoned journal tells the next start nothing, and takes no more slots.
        let at = slot(&second, "acme")?;
        second.record(at, 4)?;
        second.poison();
        assert_eq!(second.slot("other")?, None);
        let (_, after) = Journal::open(dir.path(), "r1")?;
        assert!(after.trusted().is_none());
        Ok(())
    }
}
