//! The lockdown of a planned failover of a mounted store: once locked, every operation
//! that would change the store is refused with EROFS, and the lock is taken only when no
//! file is open for writing through the mount.
//!
//! Every change (data, namespace, metadata) and every open for writing passes the
//! tracker's gate as a reader; `lock` takes it as the writer, so an operation runs
//! wholly before the lock (and the final cycle's cut sees it) or is refused after it.

use std::sync::atomic::Ordering;

use parking_lot::RwLockReadGuard;

use crate::error::{Error, Result};
use crate::primary::track::Tracker;

impl Tracker {
    /// The gate as a reader, unless the store is locked.
    pub(super) fn writable(&self) -> Result<RwLockReadGuard<'_, ()>> {
        let g = self.gate.read();
        if self.read_only.load(Ordering::Acquire) {
            return Err(read_only());
        }
        Ok(g)
    }

    /// Held while a file is opened for writing (until its handle is registered), so a
    /// lock either sees the handle or refuses the open.
    pub fn opening_for_write(&self) -> Result<RwLockReadGuard<'_, ()>> {
        self.writable()
    }

    /// Turns the store read-only once every operation in flight is over, unless files
    /// are open for writing: then nothing changes and their paths come back.
    pub fn lock_writes(&self, open_writers: impl Fn() -> Vec<String>) -> Vec<String> {
        let _w = self.gate.write();
        let writers = open_writers();
        if writers.is_empty() {
            self.read_only.store(true, Ordering::Release);
        }
        writers
    }

    /// Accepts changes again (a planned failover that failed before the switch).
    pub fn unlock_writes(&self) {
        let _w = self.gate.write();
        self.read_only.store(false, Ordering::Release);
    }

    pub fn is_read_only(&self) -> bool {
        self.read_only.load(Ordering::Acquire)
    }
}

/// The error a change of a locked store gets (EROFS through the mount).
fn read_only() -> Error {
    Error::Io {
        path: "store locked for a planned failover".into(),
        source: std::io::Error::from_raw_os_error(libc::EROFS),
    }
}
