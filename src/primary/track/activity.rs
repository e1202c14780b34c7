//! The activity log (after DRBD's): the guard that makes tracking survive a host crash.
//! The bitmaps live in the page cache; a power loss can drop bits set since their last
//! msync. So before any write may touch an extent (default 64 MiB) that is not "hot", the
//! extent is recorded here and the record made durable (fdatasync). An extent stays hot
//! until a checkpoint has msync'ed every bitmap; then the log starts a new epoch. After a
//! host crash, every extent in the current epoch is marked dirty: an over-approximation,
//! never a miss.
//!
//! Format v1 (`STATE/activity`, preallocated so a record costs one data write and a flush):
//! a 4096-byte header (magic `DRFSAL01`, version u32, pad u32, epoch u64, slots u32), then
//! `slots` records of 32 bytes: file id u64, extent u64, epoch u64, crc32 u32, pad u32.
//! A record counts only if its epoch equals the header's and its crc matches.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use parking_lot::Mutex;

use crate::error::{At, Error, Result};

pub const MAGIC: &[u8; 8] = b"DRFSAL01";
pub const VERSION: u32 = 1;
const HEADER: u64 = 4096;
const RECORD: usize = 32;

pub struct ActivityLog {
    path: PathBuf,
    file: File,
    slots: u32,
    inner: Mutex<Inner>,
}

struct Inner {
    epoch: u64,
    used: u32,
}

/// The log has no free slot: a checkpoint must run first.
pub struct Full;

fn encode(id: u64, extent: u64, epoch: u64) -> [u8; RECORD] {
    let mut r = [0u8; RECORD];
    r[..8].copy_from_slice(&id.to_le_bytes());
    r[8..16].copy_from_slice(&extent.to_le_bytes());
    r[16..24].copy_from_slice(&epoch.to_le_bytes());
    let crc = crc32fast::hash(&r[..24]);
    r[24..28].copy_from_slice(&crc.to_le_bytes());
    r
}

fn decode(r: &[u8], epoch: u64) -> Option<(u64, u64)> {
    let le = |a: usize| u64::from_le_bytes(r[a..a + 8].try_into().unwrap_or([0; 8]));
    let crc = u32::from_le_bytes(r[24..28].try_into().unwrap_or([0; 4]));
    (le(16) == epoch && crc == crc32fast::hash(&r[..24])).then(|| (le(0), le(8)))
}

fn header(epoch: u64, slots: u32) -> Vec<u8> {
    let mut h = vec![0u8; HEADER as usize];
    h[..8].copy_from_slice(MAGIC);
    h[8..12].copy_from_slice(&VERSION.to_le_bytes());
    h[16..24].copy_from_slice(&epoch.to_le_bytes());
    h[24..28].copy_from_slice(&slots.to_le_bytes());
    h
}

impl ActivityLog {
    /// Opens (or creates) the log; returns it with the (file id, extent) pairs of the
    /// current epoch, which the caller must replay into the bitmaps and flush before it
    /// calls `reset`. Until then the log counts as full, so nothing can be activated.
    pub fn open(path: &Path, slots: u32) -> Result<(ActivityLog, Vec<(u64, u64)>)> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)
            .at(path)?;
        let size = HEADER + u64::from(slots) * RECORD as u64;
        let len = file.metadata().at(path)?.len();
        let (epoch, found) = if len >= HEADER {
            let n = len.min(size) as usize;
            let mut buf = vec![0u8; n];
            file.read_exact_at(&mut buf, 0).at(path)?;
            if &buf[..8] != MAGIC {
                return Err(Error::corrupt(path, "not a drfs activity log"));
            }
            let epoch = u64::from_le_bytes(buf[16..24].try_into().unwrap_or([0; 8]));
            let found = buf[HEADER as usize..]
                .chunks_exact(RECORD)
                .filter_map(|r| decode(r, epoch))
                .collect();
            (epoch, found)
        } else {
            (0, Vec::new())
        };
        let log = ActivityLog {
            path: path.to_path_buf(),
            file,
            slots,
            inner: Mutex::new(Inner { epoch, used: slots }),
        };
        Ok((log, found))
    }

    /// Durably records that extents of file `id` are about to be written.
    pub fn activate(&self, id: u64, extents: &[u64]) -> Result<std::result::Result<(), Full>> {
        if extents.is_empty() {
            return Ok(Ok(()));
        }
        let mut inner = self.inner.lock();
        if inner.used as usize + extents.len() > self.slots as usize {
            return Ok(Err(Full));
        }
        let mut buf = Vec::with_capacity(extents.len() * RECORD);
        for &e in extents {
            buf.extend_from_slice(&encode(id, e, inner.epoch));
        }
        let at = HEADER + u64::from(inner.used) * RECORD as u64;
        self.file.write_all_at(&buf, at).at(&self.path)?;
        self.file.sync_data().at(&self.path)?;
        inner.used += extents.len() as u32;
        Ok(Ok(()))
    }

    /// Starts a new epoch; only after every bitmap has been flushed.
    pub fn reset(&self) -> Result<()> {
        let mut inner = self.inner.lock();
        let epoch = inner.epoch + 1;
        let size = HEADER + u64::from(self.slots) * RECORD as u64;
        if self.file.metadata().at(&self.path)?.len() != size {
            // Real zeros, so in-place record writes need no metadata update and their
            // fdatasync is a single data write.
            self.file
                .write_all_at(&vec![0u8; size as usize], 0)
                .at(&self.path)?;
            self.file.set_len(size).at(&self.path)?;
            self.file.sync_all().at(&self.path)?;
        }
        self.file
            .write_all_at(&header(epoch, self.slots), 0)
            .at(&self.path)?;
        self.file.sync_data().at(&self.path)?;
        inner.epoch = epoch;
        inner.used = 0;
        Ok(())
    }

    pub fn used(&self) -> u32 {
        self.inner.lock().used
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_survive_reopen_until_reset() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("activity");
        let (al, found) = ActivityLog::open(&p, 4).unwrap();
        assert!(found.is_empty());
        assert!(al.activate(9, &[1]).unwrap().is_err(), "full until reset");
        al.reset().unwrap();
        assert!(al.activate(9, &[1, 2]).unwrap().is_ok());
        assert!(al.activate(9, &[3, 4, 5]).unwrap().is_err());
        drop(al);
        // A crash: the reopened log reports what the previous epoch held.
        let (al, found) = ActivityLog::open(&p, 4).unwrap();
        assert_eq!(found, vec![(9, 1), (9, 2)]);
        al.reset().unwrap();
        assert!(al.activate(1, &[7]).unwrap().is_ok());
        al.reset().unwrap();
        drop(al);
        let (_al, found) = ActivityLog::open(&p, 4).unwrap();
        assert!(found.is_empty());
    }
}
