//! The daemon's own operations on each file, in a shared mapping (`STATE/stamps`) so they
//! survive a SIGKILL: per file, when the newest operation that changes it began, when the
//! newest finished one ended, and how many are in flight. After a kill the next mount
//! compares each file's ctime with them (`Stamp::bound`): a ctime no later than the
//! daemon's own last operation came from the daemon, whose bitmap already holds every
//! block it changed (invariant 1); a later one means something else changed the file
//! after the daemon died, and only that file needs a resync.
//!
//! Every operation that can change a file's ctime is stamped: data writes, truncates,
//! fallocate, copy_file_range, chmod/chown/utimens, xattrs, links, unlinks, renames and
//! creates. A ctime is set from the kernel's clock at some moment inside the system call,
//! so it is never later than the end stamp taken after the call returned.
//!
//! Format v1: a 4096-byte header (magic `DRFSST01`, version u32, overflow u32: nonzero
//! when a file found no free slot, run id u64: the run of the daemon that wrote it), then
//! `SLOTS` records of 32 bytes: file id u64, begin ns u64, end ns u64, in flight u64
//! (times in ns since the epoch, on the realtime clock). Each run starts a new, sparse
//! file; the previous run's is read first.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::Read;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};

use memmap2::MmapMut;
use parking_lot::Mutex;

use crate::error::{At, Error, Result};
use crate::sys;

pub const MAGIC: &[u8; 8] = b"DRFSST01";
pub const VERSION: u32 = 1;
const HEADER: usize = 4096;
const RECORD: usize = 32;
/// Files one run can stamp; a file beyond them falls back to the heartbeat rule.
pub const SLOTS: usize = 65536;

/// How long after its begin stamp an operation in flight at the kill may still have set
/// the file's ctime (it waited for the inode lock, or was preempted before its system
/// call): part of the window in which a direct write right after the kill goes unseen.
pub const INFLIGHT_SLACK_NS: i128 = 20_000_000;

/// One file's stamps from a previous run.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Stamp {
    pub begin: i128,
    pub end: i128,
    pub inflight: u64,
}

impl Stamp {
    /// The latest ctime the daemon's own operations can explain: the end of its last
    /// finished operation, or, while one was in flight at the kill, a little after the
    /// newest began or after the daemon's last heartbeat (`alive_ns`: it was alive then,
    /// so an operation in flight had reached at least that far).
    pub fn bound(&self, alive_ns: i128) -> i128 {
        if self.inflight == 0 {
            self.end
        } else {
            self.end
                .max(self.begin + INFLIGHT_SLACK_NS)
                .max(alive_ns + INFLIGHT_SLACK_NS)
        }
    }
}

/// A previous run's stamps.
#[derive(Debug, Default)]
pub struct Found {
    pub run: u64,
    /// Some file of that run was not stamped: files without a stamp fall back.
    pub overflow: bool,
    pub files: HashMap<u64, Stamp>,
}

/// Reads the stamps a previous run left; None if there are none (or they are not ours).
pub fn read(path: &Path) -> Result<Option<Found>> {
    let mut f = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e).at(path),
    };
    let mut buf = Vec::new();
    f.read_to_end(&mut buf).at(path)?;
    if buf.len() < HEADER || &buf[..8] != MAGIC {
        return Ok(None);
    }
    let u32_at = |a: usize| u32::from_le_bytes([buf[a], buf[a + 1], buf[a + 2], buf[a + 3]]);
    if u32_at(8) != VERSION {
        return Err(Error::corrupt(
            path,
            format!("version {} (this drfs reads {VERSION})", u32_at(8)),
        ));
    }
    let u64_at = |a: usize| {
        let mut b = [0u8; 8];
        b.copy_from_slice(&buf[a..a + 8]);
        u64::from_le_bytes(b)
    };
    let mut found = Found {
        run: u64_at(16),
        overflow: u32_at(12) != 0,
        files: HashMap::new(),
    };
    for r in buf[HEADER..].chunks_exact(RECORD) {
        let at = |k: usize| {
            let mut b = [0u8; 8];
            b.copy_from_slice(&r[k * 8..k * 8 + 8]);
            u64::from_le_bytes(b)
        };
        if at(0) == 0 {
            continue;
        }
        found.files.insert(
            at(0),
            Stamp {
                begin: i128::from(at(1)),
                end: i128::from(at(2)),
                inflight: at(3),
            },
        );
    }
    Ok(Some(found))
}

/// This run's stamps, mapped shared.
pub struct Stamps {
    _file: File,
    map: MmapMut,
    slots: Mutex<HashMap<u64, u32>>,
}

/// A stamp slot: an index into the records.
pub type Slot = u32;

/// One operation in progress on a file; its end is stamped when this drops.
pub struct Op<'a> {
    stamps: &'a Stamps,
    slot: Slot,
}

impl Drop for Op<'_> {
    fn drop(&mut self) {
        let now = sys::now_ns().max(0) as u64;
        self.stamps
            .word(self.slot, 2)
            .fetch_max(now, Ordering::Relaxed);
        self.stamps
            .word(self.slot, 3)
            .fetch_sub(1, Ordering::Relaxed);
    }
}

impl Stamps {
    /// Starts this run's stamps (replacing the previous run's, which must have been read).
    pub fn create(path: &Path, run: u64) -> Result<Stamps> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(path)
            .at(path)?;
        let mut h = vec![0u8; HEADER];
        h[..8].copy_from_slice(MAGIC);
        h[8..12].copy_from_slice(&VERSION.to_le_bytes());
        h[16..24].copy_from_slice(&run.to_le_bytes());
        use std::os::unix::fs::FileExt;
        file.write_all_at(&h, 0).at(path)?;
        file.set_len((HEADER + SLOTS * RECORD) as u64).at(path)?;
        let map = unsafe { MmapMut::map_mut(&file) }.at(path)?;
        Ok(Stamps {
            _file: file,
            map,
            slots: Mutex::new(HashMap::new()),
        })
    }

    fn word(&self, slot: Slot, k: usize) -> &AtomicU64 {
        let off = HEADER + slot as usize * RECORD + k * 8;
        // In bounds (slot < SLOTS, k < 4) and 8-byte aligned in a page-aligned mapping
        // that lives as long as `self`.
        unsafe { &*(self.map.as_ptr().add(off) as *const AtomicU64) }
    }

    /// The slot of file `id`, taken on its first operation of this run; None when every
    /// slot is taken (the header then says so).
    pub fn slot(&self, id: u64) -> Option<Slot> {
        let mut slots = self.slots.lock();
        if let Some(&s) = slots.get(&id) {
            return Some(s);
        }
        let s = slots.len();
        if s >= SLOTS {
            let flag =
                unsafe { &*(self.map.as_ptr().add(12) as *const std::sync::atomic::AtomicU32) };
            if flag.swap(1, Ordering::Relaxed) == 0 {
                tracing::warn!(
                    "more than {SLOTS} files changed in this run: after a crash the others are judged by the heartbeat"
                );
            }
            return None;
        }
        let s = s as Slot;
        self.word(s, 0).store(id, Ordering::Relaxed);
        slots.insert(id, s);
        Some(s)
    }

    /// Stamps the start of an operation on the file in `slot`.
    pub fn begin(&self, slot: Slot) -> Op<'_> {
        let now = sys::now_ns().max(0) as u64;
        self.word(slot, 3).fetch_add(1, Ordering::Relaxed);
        self.word(slot, 1).fetch_max(now, Ordering::Relaxed);
        Op { stamps: self, slot }
    }

    /// Stamps an operation that began at `began` and has just finished (a create: the
    /// file's id is known only once it exists).
    pub fn done(&self, slot: Slot, began: i128) {
        let now = sys::now_ns().max(0) as u64;
        self.word(slot, 1)
            .fetch_max(began.max(0) as u64, Ordering::Relaxed);
        self.word(slot, 2).fetch_max(now, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stamps_survive_in_the_file_and_bound_ctimes() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("stamps");
        let s = Stamps::create(&p, 42).unwrap();
        let a = s.slot(7).unwrap();
        let b = s.slot(9).unwrap();
        assert_eq!(s.slot(7), Some(a), "one slot per file");
        drop(s.begin(a));
        let t0 = sys::now_ns();
        let inflight = s.begin(b);
        // A "kill": the mapping's contents are what the next run reads.
        std::mem::forget(inflight);
        let found = read(&p).unwrap().unwrap();
        assert_eq!(found.run, 42);
        assert!(!found.overflow);
        let (fa, fb) = (found.files[&7], found.files[&9]);
        assert_eq!(fa.inflight, 0);
        assert!(fa.end >= fa.begin && fa.end <= t0);
        assert_eq!(
            fa.bound(0),
            fa.end,
            "an idle file: its last operation's end"
        );
        assert_eq!(fb.inflight, 1);
        assert!(fb.bound(0) >= fb.begin + INFLIGHT_SLACK_NS);
        assert_eq!(
            fb.bound(t0 + 1_000_000_000),
            t0 + 1_000_000_000 + INFLIGHT_SLACK_NS
        );
        drop(s);
        // A new run starts afresh.
        let s2 = Stamps::create(&p, 43).unwrap();
        s2.done(s2.slot(5).unwrap(), t0);
        let found = read(&p).unwrap().unwrap();
        assert_eq!(found.run, 43);
        assert_eq!(found.files.len(), 1);
        assert_eq!(found.files[&5].begin, t0);
    }

    #[test]
    fn missing_or_foreign_files_have_no_stamps() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("stamps");
        assert!(read(&p).unwrap().is_none());
        std::fs::write(&p, b"not ours").unwrap();
        assert!(read(&p).unwrap().is_none());
    }
}
