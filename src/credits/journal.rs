//! The spend journal: what this replica served per owner, written to a file in `metering.dir` before each
//! prepaid call is allowed, so a restart after a crash reports exactly what was served instead of keeping
//! the whole lease as spent.
//!
//! A served total is an 8-byte store through a shared mapping of the file ([`Slot`]), not a syscall per
//! Check: the store lands in the kernel's page cache page for that file offset, the very page a `pwrite`
//! would have written, so it survives the process being killed (kill -9, OOM, a panic) but not a reboot of the
//! machine. So the journal is trusted only when it was written under the running kernel (the boot id it
//! records is the current one); after a reboot, or without a journal, the restart keeps the whole lease as
//! spent (the bound in [`super`]'s docs).
//!
//! Layout: a 128-byte header (magic, boot id, replica id), then one 272-byte slot per owner: the owner's
//! name (length-prefixed, at most [`MAX_OWNER`] bytes) and, at the end, its served total (u64, little-endian).
//! A slot is written once with its name and total 0 (a `pwrite` that extends the file) before the owner's
//! first spend, and only then handed out: the file always covers a mapped slot, and every slot in the file
//! belongs to an owner whose spends are journaled.
//!
//! Writing the slot allocates its disk blocks, so later stores need none on an in-place filesystem (ext4,
//! XFS). On a copy-on-write one (btrfs, ZFS) with the disk full, the kernel may refuse a store with SIGBUS,
//! where a `pwrite` would have failed and poisoned the journal: the process ends before that call is allowed,
//! so the file still holds the total of every allowed call, as after any crash.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use memmap2::{MmapOptions, MmapRaw};

use crate::util::sync::lock;

/// The journal's file name in `metering.dir`.
pub const FILE_NAME: &str = "credits.journal";
/// Longest owner name a slot holds; longer owners are not journaled (their crash cost is the lease bound).
pub const MAX_OWNER: usize = 256;

const MAGIC: &[u8; 8] = b"TGCRJNL1";
const HEADER: u64 = 128;
const SLOT: u64 = 272;
const SERVED_AT: u64 = SLOT - 8;
/// Slots per mapping: 4096 slots of 272 bytes are 272 pages of 4 KiB, about 1 MiB of address space mapped
/// at a time, so a replica with few owners maps little and one with many needs no remapping of live slots.
const CHUNK_SLOTS: u64 = 4096;

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
    life: Mutex<Life>,
    /// A write failed: the file is marked untrusted and nothing more is written in this life.
    poisoned: AtomicBool,
}

/// The slots of this life.
#[derive(Debug, Default)]
struct Life {
    /// [`Journal::begin_life`] succeeded. Slots are handed out only after it: it truncates the file, which
    /// must never happen under a mapped slot.
    begun: bool,
    /// Slots handed out.
    slots: u64,
    /// The mapping the next slot falls in, once made.
    chunk: Option<Arc<Chunk>>,
}

/// A shared, writable mapping of [`CHUNK_SLOTS`] slots of the file, starting at slot `first`.
struct Chunk {
    map: MmapRaw,
    first: u64,
}

impl std::fmt::Debug for Chunk {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Chunk")
            .field("first", &self.first)
            .field("len", &self.map.len())
            .finish()
    }
}

impl Chunk {
    /// Maps the chunk holding slot `first` (a multiple of [`CHUNK_SLOTS`]). The mapping may reach past the
    /// end of the file: only slots the file already covers are ever touched through it.
    fn map(file: &File, first: u64) -> io::Result<Chunk> {
        let len = usize::try_from(CHUNK_SLOTS * SLOT).map_err(io::Error::other)?;
        let map = MmapOptions::new()
            .offset(HEADER + first * SLOT)
            .len(len)
            .map_raw(file)?;
        // Served totals sit at 8-byte-aligned file offsets and a mapping starts on a page boundary plus the
        // offset's remainder, so they are aligned in memory as well; checked rather than assumed, as
        // `Slot::total` relies on it.
        let total_at = map.as_ptr().wrapping_add(SERVED_AT as usize);
        if !total_at.cast::<AtomicU64>().is_aligned() {
            return Err(io::Error::other(
                "the spend journal's mapping is not aligned for 8-byte totals",
            ));
        }
        Ok(Chunk { map, first })
    }
}

/// Where one owner's served total is journaled in this life: given by [`Journal::slot`], written by
/// [`Journal::record`].
#[derive(Debug, Clone)]
pub struct Slot {
    chunk: Arc<Chunk>,
    /// Byte offset of the served total in the chunk's mapping.
    at: usize,
}

impl Slot {
    /// The slot's served total, in the mapped page.
    fn total(&self) -> &AtomicU64 {
        let ptr = self
            .chunk
            .map
            .as_mut_ptr()
            .wrapping_add(self.at)
            .cast::<u64>();
        // SAFETY: `AtomicU64::from_ptr` needs a pointer aligned for `AtomicU64`, valid for reads and writes
        // for the returned lifetime, and only atomic accesses to it meanwhile.
        // - In bounds and aligned: `at + 8 <= CHUNK_SLOTS * SLOT`, the mapping's length (`Journal::slot`), and
        //   `at` is `SERVED_AT` plus a multiple of `SLOT` (8-aligned) from a base `Chunk::map` checked aligned.
        // - Valid: the mapping lives as long as `self.chunk`, which `&self` borrows. The file covers these
        //   bytes (the slot was written through the file before it was handed out), so touching them cannot
        //   fault; the file only shrinks in `begin_life`, which refuses once a slot was handed out.
        // - Only atomic accesses: in this process these 8 bytes are reached only through this function (the
        //   slot's `pwrite` finished before the slot existed; the kernel's copies are not Rust accesses). The
        //   file belongs to this replica's locked `metering.dir`: no other process writes it.
        unsafe { AtomicU64::from_ptr(ptr) }
    }
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
                life: Mutex::new(Life::default()),
                poisoned: AtomicBool::new(false),
            },
            previous,
        ))
    }

    /// Starts this life's journal (empty, under the current boot id); call once the previous life's leases
    /// are settled in the ledger, before any [`Journal::slot`].
    ///
    /// The old header is made unreadable first, so a failure half-way never leaves the last life's totals
    /// looking like this one's; on failure the journal is poisoned. Refused once this life handed out a slot
    /// (the file would shrink under it).
    pub fn begin_life(&self) -> io::Result<()> {
        let mut life = lock(&self.life);
        if life.slots > 0 {
            return Err(io::Error::other(
                "the spend journal's life has begun and handed out slots",
            ));
        }
        let mut header = [0u8; HEADER as usize];
        header[..8].copy_from_slice(MAGIC);
        put_text(&mut header[8..72], self.boot.as_deref().unwrap_or(""));
        put_text(&mut header[72..128], &self.replica);
        // No slot exists, so nothing is mapped over what the truncation removes but this unused mapping.
        life.chunk = None;
        let begun = self
            .file
            .write_all_at(&[0; 8], 0)
            .and_then(|()| self.file.set_len(0))
            .and_then(|()| self.file.write_all_at(&header, 0));
        life.begun = begun.is_ok();
        if begun.is_err() {
            self.poison();
        }
        begun
    }

    /// Stops journaling for this life and makes the file untrusted, so the next start keeps what this life
    /// held as spent instead of believing totals that may be stale. Called when a write fails.
    pub fn poison(&self) {
        self.poisoned.store(true, Ordering::Release);
        // Best effort: if even this fails the disk is gone, and so is the file's next read.
        let _ = self.file.write_all_at(&[0; 8], 0);
    }

    /// Gives `owner` a slot with a served total of 0; `None` when its name is too long to journal, the
    /// journal is poisoned, or this life has not begun (its spends are then not journaled, and a restart
    /// keeps its lease as spent).
    ///
    /// Everything that can fail happens before the slot is written to the file, and the slot is written at the
    /// file's end: a slot the file holds in full was handed out, so the next start never reads a total of 0
    /// for an owner whose spends went unjournaled.
    pub fn slot(&self, owner: &str) -> io::Result<Option<Slot>> {
        if owner.len() > MAX_OWNER || self.poisoned.load(Ordering::Acquire) {
            return Ok(None);
        }
        let mut life = lock(&self.life);
        if !life.begun {
            return Ok(None);
        }
        let index = life.slots;
        let first = index - index % CHUNK_SLOTS;
        let chunk = match &life.chunk {
            Some(chunk) if chunk.first == first => Arc::clone(chunk),
            _ => {
                let chunk = Arc::new(Chunk::map(&self.file, first)?);
                life.chunk = Some(Arc::clone(&chunk));
                chunk
            }
        };
        let at = usize::try_from((index - first) * SLOT + SERVED_AT).map_err(io::Error::other)?;
        let mut slot = [0u8; SLOT as usize];
        slot[..2].copy_from_slice(&(owner.len() as u16).to_le_bytes());
        slot[2..2 + owner.len()].copy_from_slice(owner.as_bytes());
        self.file.write_all_at(&slot, HEADER + index * SLOT)?;
        life.slots += 1;
        Ok(Some(Slot { chunk, at }))
    }

    /// Records an owner's served total in the slot [`Journal::slot`] gave: one store into the page cache,
    /// which cannot fail (the slot's page was written when the slot was made). Callers keep totals in order
    /// (a smaller total after a larger one would give served credits back at the next start).
    pub fn record(&self, slot: &Slot, served_total: u64) {
        if self.poisoned.load(Ordering::Relaxed) {
            return;
        }
        // Release: whatever the caller does after (answering the call) comes after the store.
        slot.total().store(served_total.to_le(), Ordering::Release);
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

    fn slot(journal: &Journal, owner: &str) -> io::Result<Slot> {
        journal
            .slot(owner)?
            .ok_or_else(|| io::Error::other("no slot"))
    }

    /// The served total of slot `index` as the file holds it (what the next life reads).
    fn total_in_file(dir: &Path, index: u64) -> io::Result<u64> {
        let file = File::open(dir.join(FILE_NAME))?;
        let mut total = [0u8; 8];
        file.read_exact_at(&mut total, HEADER + index * SLOT + SERVED_AT)?;
        Ok(u64::from_le_bytes(total))
    }

    #[test]
    fn a_new_life_reads_what_the_last_one_served() -> io::Result<()> {
        let dir = tempfile::tempdir()?;
        let (first, previous) = Journal::open(dir.path(), "r1")?;
        assert_eq!(previous.untrusted.as_deref(), Some("no journal yet"));
        first.begin_life()?;
        let acme = slot(&first, "acme")?;
        let dev = slot(&first, "dev@example.com")?;
        first.record(&acme, 7);
        first.record(&dev, 3);
        first.record(&acme, 9);
        assert!(first.slot(&"x".repeat(MAX_OWNER + 1))?.is_none());
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
        second.record(&at, 4);
        second.poison();
        assert!(second.slot("other")?.is_none());
        let (_, after) = Journal::open(dir.path(), "r1")?;
        assert!(after.trusted().is_none());
        Ok(())
    }

    #[test]
    fn a_total_stored_through_the_mapping_is_the_files_little_endian_u64() -> io::Result<()> {
        let dir = tempfile::tempdir()?;
        let (journal, _) = Journal::open(dir.path(), "r1")?;
        journal.begin_life()?;
        let a = slot(&journal, "a")?;
        let b = slot(&journal, "bb")?;
        assert_eq!(total_in_file(dir.path(), 0)?, 0);
        let big = 0x0102_0304_0506_0708;
        journal.record(&b, big);
        journal.record(&a, 42);
        // The name is untouched by the total, and the neighbour's total by this one.
        let file = File::open(dir.path().join(FILE_NAME))?;
        let mut name = [0u8; 4];
        file.read_exact_at(&mut name, HEADER + SLOT)?;
        assert_eq!(&name, &[2, 0, b'b', b'b']);
        assert_eq!(total_in_file(dir.path(), 0)?, 42);
        assert_eq!(total_in_file(dir.path(), 1)?, big);
        let mut raw = [0u8; 8];
        file.read_exact_at(&mut raw, HEADER + SLOT + SERVED_AT)?;
        assert_eq!(raw, [8, 7, 6, 5, 4, 3, 2, 1]);
        assert_eq!(file.metadata()?.len(), HEADER + 2 * SLOT);
        Ok(())
    }

    #[test]
    fn slots_past_one_mapping_land_where_the_next_life_reads_them() -> io::Result<()> {
        let dir = tempfile::tempdir()?;
        let (journal, _) = Journal::open(dir.path(), "r1")?;
        journal.begin_life()?;
        let slots = (0..CHUNK_SLOTS + 2)
            .map(|i| slot(&journal, &format!("owner{i}")))
            .collect::<io::Result<Vec<_>>>()?;
        for (i, s) in slots.iter().enumerate() {
            journal.record(s, i as u64 * 3 + 1);
        }
        for i in [0, CHUNK_SLOTS - 1, CHUNK_SLOTS, CHUNK_SLOTS + 1] {
            assert_eq!(total_in_file(dir.path(), i)?, i * 3 + 1, "slot {i}");
        }
        drop(slots);
        drop(journal);
        let (_, previous) = Journal::open(dir.path(), "r1")?;
        if boot_id().is_some() {
            assert_eq!(previous.served.len() as u64, CHUNK_SLOTS + 2);
            assert_eq!(
                previous.served.get(&format!("owner{CHUNK_SLOTS}")),
                Some(&(CHUNK_SLOTS * 3 + 1))
            );
        }
        Ok(())
    }

    #[test]
    fn slots_come_only_after_the_life_began_and_the_life_never_restarts_under_them()
    -> io::Result<()> {
        let dir = tempfile::tempdir()?;
        let (journal, _) = Journal::open(dir.path(), "r1")?;
        // Before `begin_life` the file is the last life's, which `begin_life` truncates.
        assert!(journal.slot("acme")?.is_none());
        journal.begin_life()?;
        // Beginning again before any slot is harmless.
        journal.begin_life()?;
        let acme = slot(&journal, "acme")?;
        assert!(journal.begin_life().is_err());
        // The refused restart changed nothing: the slot is still in the file and still written.
        journal.record(&acme, 5);
        assert_eq!(total_in_file(dir.path(), 0)?, 5);
        assert!(!journal.poisoned.load(Ordering::Relaxed));
        Ok(())
    }

    const CHILD_DIR: &str = "TOLLGATE_JOURNAL_CHILD_DIR";
    const RECORDED: &str = "journal-child: recorded";

    /// Run by `a_kill_9_after_the_store_keeps_the_total` in a process of its own: records through the
    /// mapping, says so, and waits to be killed.
    #[test]
    #[ignore = "the child process of a_kill_9_after_the_store_keeps_the_total"]
    fn journal_child_records_then_waits() -> io::Result<()> {
        let Some(dir) = std::env::var_os(CHILD_DIR) else {
            return Ok(());
        };
        let (journal, _) = Journal::open(Path::new(&dir), "r1")?;
        journal.begin_life()?;
        let acme = slot(&journal, "acme")?;
        let dev = slot(&journal, "dev@example.com")?;
        journal.record(&acme, 1_234);
        journal.record(&dev, 56);
        journal.record(&acme, 1_235);
        println!("{RECORDED}");
        std::thread::sleep(std::time::Duration::from_secs(60));
        Ok(())
    }

    #[test]
    fn a_kill_9_after_the_store_keeps_the_total() -> io::Result<()> {
        use std::io::BufRead;
        let dir = tempfile::tempdir()?;
        let mut child = std::process::Command::new(std::env::current_exe()?)
            .args([
                "credits::journal::tests::journal_child_records_then_waits",
                "--exact",
                "--ignored",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(CHILD_DIR, dir.path())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .spawn()?;
        let stdout = child
            .stdout
            .take()
            .ok_or_else(|| io::Error::other("no stdout"))?;
        let recorded = io::BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
            .any(|line| line.contains(RECORDED));
        // SIGKILL: no destructor, no munmap, no flush of anything the process held.
        child.kill()?;
        child.wait()?;
        assert!(recorded, "the child process never said it recorded");
        assert_eq!(total_in_file(dir.path(), 0)?, 1_235);
        assert_eq!(total_in_file(dir.path(), 1)?, 56);
        let (_, previous) = Journal::open(dir.path(), "r1")?;
        if boot_id().is_some() {
            assert_eq!(previous.untrusted, None);
            assert_eq!(previous.served.get("acme"), Some(&1_235));
            assert_eq!(previous.served.get("dev@example.com"), Some(&56));
        }
        Ok(())
    }
}
