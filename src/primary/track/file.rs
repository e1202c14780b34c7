//! One tracked file while the daemon holds it: its two bitmaps (the active one takes new
//! writes; the frozen one holds what the current cut must ship), its hot activity-log
//! extents, its size as the mount changes it, a read-only descriptor on the store file
//! (which outlives renames and unlinks, so a cycle can always read what its cut saw), and
//! the copy-on-write state of the cycle in progress.

use std::fs::File;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};

use parking_lot::{Mutex, RwLock};

use crate::error::Result;
use crate::model::FileId;
use crate::primary::track::activity::ActivityLog;
use crate::primary::track::bitmap::Bitmap;
use crate::primary::track::cow::Cow;
use crate::primary::track::fine::{Fine, Pieces};

/// An activity-log extent number that stands for "the whole file".
pub const WHOLE_FILE: u64 = u64::MAX;
/// A change spanning more extents than this is recorded as whole-file.
const WHOLE_FILE_AFTER: u64 = 64;

pub struct FileTrack {
    pub id: FileId,
    pub fd: File,
    size: AtomicU64,
    bits: RwLock<Bits>,
    cow: RwLock<Option<Arc<Cow>>>,
    /// The 4 KiB pieces changed inside dirty blocks (`fine`); taken after `bits`. The
    /// tracker keeps it while this tracking is dropped and loaded again, with the bitmaps.
    fine: Arc<Mutex<Fine>>,
    /// Its slot in the run's stamps (`UNSET` until its first operation, `NO_SLOT` when
    /// none was free).
    stamp: AtomicU32,
}

const UNSET: u32 = u32::MAX;
const NO_SLOT: u32 = u32::MAX - 1;

struct Bits {
    maps: [Bitmap; 2],
    active: usize,
    frozen_dirty: bool,
    hot: Vec<AtomicU64>,
    whole_hot: AtomicBool,
}

pub enum Mark {
    Done,
    LogFull,
}

impl Bits {
    fn active(&self) -> &Bitmap {
        &self.maps[self.active]
    }

    fn frozen(&self) -> &Bitmap {
        &self.maps[1 - self.active]
    }

    fn extents_hot(&self, e0: u64, e1: u64) -> bool {
        self.whole_hot.load(Ordering::Acquire) || (e0..=e1).all(|e| self.is_hot(e))
    }

    fn is_hot(&self, e: u64) -> bool {
        self.hot
            .get((e / 64) as usize)
            .is_some_and(|w| w.load(Ordering::Acquire) & (1 << (e % 64)) != 0)
    }

    fn set_hot(&mut self, e: u64) {
        if e == WHOLE_FILE {
            self.whole_hot.store(true, Ordering::Release);
            return;
        }
        let w = (e / 64) as usize;
        if self.hot.len() <= w {
            self.hot.resize_with(w + 1, || AtomicU64::new(0));
        }
        self.hot[w].fetch_or(1 << (e % 64), Ordering::AcqRel);
    }
}

impl FileTrack {
    /// Builds the tracking of file `id` from its two bitmap files.
    pub(crate) fn load(
        id: FileId,
        fd: File,
        size: u64,
        maps: [Bitmap; 2],
        fine: Arc<Mutex<Fine>>,
    ) -> FileTrack {
        let active = usize::from(maps[1].stamp() > maps[0].stamp());
        let frozen_dirty = maps[1 - active].any();
        FileTrack {
            id,
            fd,
            size: AtomicU64::new(size),
            bits: RwLock::new(Bits {
                maps,
                active,
                frozen_dirty,
                hot: Vec::new(),
                whole_hot: AtomicBool::new(false),
            }),
            cow: RwLock::new(None),
            fine,
            stamp: AtomicU32::new(UNSET),
        }
    }

    /// Its stamp slot, taken from `take` on first use.
    pub(crate) fn stamp_slot(&self, take: impl FnOnce() -> Option<u32>) -> Option<u32> {
        match self.stamp.load(Ordering::Relaxed) {
            NO_SLOT => None,
            UNSET => {
                let s = take();
                self.stamp.store(s.unwrap_or(NO_SLOT), Ordering::Relaxed);
                s
            }
            s => Some(s),
        }
    }

    pub fn size(&self) -> u64 {
        self.size.load(Ordering::Acquire)
    }

    /// A write ending at `end` happened.
    pub fn grew(&self, end: u64) {
        self.size.fetch_max(end, Ordering::AcqRel);
    }

    pub fn set_size(&self, size: u64) {
        self.size.store(size, Ordering::Release);
    }

    /// Marks bytes `[off, off+len)` in the active map, recording cold extents in the
    /// activity log first.
    pub(crate) fn try_mark(
        &self,
        al: &ActivityLog,
        bs: u64,
        ext: u64,
        off: u64,
        len: u64,
    ) -> Result<Mark> {
        let end = off.saturating_add(len) - 1;
        let (first, last) = (off / bs, end / bs);
        let (e0, e1) = (off / ext, end / ext);
        {
            let bits = self.bits.read();
            if bits.active().capacity() > last && bits.extents_hot(e0, e1) {
                bits.active().set(first, last);
                return Ok(Mark::Done);
            }
        }
        let mut bits = self.bits.write();
        let a = bits.active;
        bits.maps[a].grow(last + 1)?;
        if !bits.extents_hot(e0, e1) {
            let cold: Vec<u64> = if e1 - e0 >= WHOLE_FILE_AFTER {
                vec![WHOLE_FILE]
            } else {
                (e0..=e1).filter(|&e| !bits.is_hot(e)).collect()
            };
            if al.activate(self.id.0, &cold)?.is_err() {
                return Ok(Mark::LogFull);
            }
            for e in cold {
                bits.set_hot(e);
            }
        }
        bits.active().set(first, last);
        Ok(Mark::Done)
    }

    /// A write of `[off, off+len)` is about to mark its blocks: records its pieces
    /// (before `try_mark`, so a block found clean had no change since the cut).
    pub(crate) fn record_pieces(&self, bs: u64, off: u64, len: u64) {
        let bits = self.bits.read();
        let active = bits.active();
        let last = (off.saturating_add(len) - 1) / bs;
        self.fine
            .lock()
            .record(off / bs, last, off, len, |b| !active.test(b));
    }

    /// A change that records no pieces marked blocks `first..=last`: they ship whole.
    pub(crate) fn forget_pieces(&self, first: u64, last: u64) {
        self.fine.lock().forget(first, last);
    }

    /// The pieces the current cut ships of its partly written blocks.
    pub fn frozen_pieces(&self) -> Arc<Pieces> {
        self.fine.lock().frozen()
    }

    /// Saves the cut-time content of blocks `first..=last` a change is about to alter.
    pub(crate) fn preserve(&self, first: u64, last: u64) -> Result<()> {
        let Some(cow) = self.cow.read().clone() else {
            return Ok(());
        };
        let bits = self.bits.read();
        cow.preserve(&self.fd, first, last, |b| bits.frozen().test(b))
    }

    /// The cut: the active map's bits become the frozen set (merged into it if the last
    /// cycle failed to ship its own), and `cow` protects them until shipped.
    pub(crate) fn flip(&self, epoch: u64, cow: Arc<Cow>) -> Result<()> {
        let mut bits = self.bits.write();
        if bits.frozen_dirty {
            let (a, f) = (bits.active, 1 - bits.active);
            let cap = bits.maps[a].capacity();
            bits.maps[f].grow(cap)?;
            let (lo, hi) = bits.maps.split_at_mut(1);
            let (active, frozen) = if a == 0 {
                (&lo[0], &hi[0])
            } else {
                (&hi[0], &lo[0])
            };
            frozen.or_from(active);
            active.clear();
        } else {
            bits.active = 1 - bits.active;
            let a = bits.active;
            bits.maps[a].set_stamp(epoch);
        }
        self.fine.lock().flip(bits.frozen_dirty);
        bits.frozen_dirty = true;
        drop(bits);
        *self.cow.write() = Some(cow);
        Ok(())
    }

    pub fn cow(&self) -> Option<Arc<Cow>> {
        self.cow.read().clone()
    }

    /// The frozen set's runs `[first, end)`.
    pub fn frozen_ranges(&self) -> Vec<(u64, u64)> {
        self.bits.read().frozen().ranges()
    }

    /// The cycle is over: if it shipped, its frozen set is done with.
    pub(crate) fn end_cycle(&self, shipped: bool) {
        if let Some(cow) = self.cow.write().take() {
            cow.discard();
        }
        if shipped {
            let mut bits = self.bits.write();
            bits.frozen().clear();
            bits.frozen_dirty = false;
            self.fine.lock().shipped();
        }
    }

    /// Every block not yet shipped: the active and the frozen map together.
    pub fn ranges(&self) -> Vec<(u64, u64)> {
        let bits = self.bits.read();
        let mut all: Vec<[u64; 2]> = bits
            .maps
            .iter()
            .flat_map(|m| m.ranges())
            .map(|(a, b)| [a, b])
            .collect();
        all = crate::model::runs::union(all);
        all.into_iter().map(|r| (r[0], r[1])).collect()
    }

    pub(crate) fn flush(&self) -> Result<()> {
        let bits = self.bits.read();
        bits.maps[0].flush()?;
        bits.maps[1].flush()
    }

    pub(crate) fn clear_hot(&self) {
        let bits = self.bits.read();
        bits.whole_hot.store(false, Ordering::Release);
        for w in &bits.hot {
            w.store(0, Ordering::Release);
        }
    }
}

impl Drop for FileTrack {
    fn drop(&mut self) {
        // Bits set here may still sit in the page cache; a checkpoint after this drop
        // would not see this file, so make them durable now.
        let bits = self.bits.get_mut();
        for m in &bits.maps {
            if let Err(e) = m.flush() {
                tracing::error!("flushing bitmap of {}: {e}", self.id);
            }
        }
    }
}
