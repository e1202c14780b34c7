//! What every drfs filesystem keeps for the kernel: the table from the u64 handles the
//! kernel holds to open objects, and the READDIR reply loop over a whole listing.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use parking_lot::RwLock;

/// Fills a READDIR reply from a whole listing (`.` and `..` first), starting at entry
/// `offset`; each entry's offset is its position plus one.
pub fn reply_entries<N: AsRef<std::ffi::OsStr>>(
    mut reply: fuser::ReplyDirectory,
    offset: u64,
    entries: impl IntoIterator<Item = (u64, fuser::FileType, N)>,
) {
    for (i, (ino, kind, name)) in entries.into_iter().enumerate().skip(offset as usize) {
        if reply.add(fuser::INodeNo(ino), i as u64 + 1, kind, name) {
            break;
        }
    }
    reply.ok();
}

/// A table from the u64 handles the kernel holds to our open objects.
pub struct Table<T> {
    map: RwLock<HashMap<u64, Arc<T>>>,
    next: AtomicU64,
}

impl<T> Default for Table<T> {
    fn default() -> Self {
        Table {
            map: RwLock::new(HashMap::new()),
            next: AtomicU64::new(1),
        }
    }
}

impl<T> Table<T> {
    pub fn insert(&self, v: T) -> u64 {
        let fh = self.next.fetch_add(1, Ordering::Relaxed);
        self.map.write().insert(fh, Arc::new(v));
        fh
    }

    pub fn get(&self, fh: u64) -> Option<Arc<T>> {
        self.map.read().get(&fh).cloned()
    }

    /// Every open object, at this moment.
    pub fn values(&self) -> Vec<Arc<T>> {
        self.map.read().values().cloned().collect()
    }

    pub fn remove(&self, fh: u64) -> Option<Arc<T>> {
        self.map.write().remove(&fh)
    }
}
