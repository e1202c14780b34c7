//! Copy-on-write for a cut: how a cycle ships exactly the content its cut saw while writes
//! go on. For every block frozen at the cut and not yet shipped, the first write after the
//! cut first copies the block's current (cut-time) content into a sparse side file
//! (`STATE/cow/<id>`, at the block's own offset). The shipper reads a block from the side
//! file if it was preserved, else from the store file, and marks it shipped, after which
//! writes need no copy. A striped lock per block orders the two.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};

use parking_lot::Mutex;

use crate::error::{At, Result};
use crate::sys::read_full;

const STRIPES: usize = 64;

/// A zeroed atomic bitset that costs nothing until touched (calloc'ed).
fn bitset(bits: u64) -> Box<[AtomicU64]> {
    let v: Vec<u64> = vec![0; bits.div_ceil(64) as usize + 1];
    // AtomicU64 has the same size and alignment as u64.
    unsafe { std::mem::transmute::<Box<[u64]>, Box<[AtomicU64]>>(v.into_boxed_slice()) }
}

fn test(set: &[AtomicU64], b: u64) -> bool {
    set.get((b / 64) as usize)
        .is_some_and(|w| w.load(Ordering::Acquire) & (1 << (b % 64)) != 0)
}

fn mark(set: &[AtomicU64], b: u64) {
    if let Some(w) = set.get((b / 64) as usize) {
        w.fetch_or(1 << (b % 64), Ordering::AcqRel);
    }
}

pub struct Cow {
    pub epoch: u64,
    /// The file's size at the cut: the cut holds blocks below it only.
    pub cut_size: u64,
    /// Every block below `cut_size` belongs to the cut (a resync), not just frozen ones.
    pub all: bool,
    bs: u64,
    blocks: u64,
    preserved: Box<[AtomicU64]>,
    shipped: Box<[AtomicU64]>,
    stripes: Vec<Mutex<()>>,
    side: Mutex<Option<File>>,
    side_path: PathBuf,
}

impl Cow {
    pub fn new(epoch: u64, cut_size: u64, all: bool, bs: u64, side_path: PathBuf) -> Cow {
        let blocks = cut_size.div_ceil(bs);
        Cow {
            epoch,
            cut_size,
            all,
            bs,
            blocks,
            preserved: bitset(blocks),
            shipped: bitset(blocks),
            stripes: (0..STRIPES).map(|_| Mutex::new(())).collect(),
            side: Mutex::new(None),
            side_path,
        }
    }

    pub fn block_size(&self) -> u64 {
        self.bs
    }

    pub fn blocks(&self) -> u64 {
        self.blocks
    }

    fn stripe(&self, b: u64) -> parking_lot::MutexGuard<'_, ()> {
        self.stripes[(b % STRIPES as u64) as usize].lock()
    }

    fn block_len(&self, b: u64) -> usize {
        (self.cut_size - b * self.bs).min(self.bs) as usize
    }

    /// Before `src` changes blocks `first..=last`: saves the cut-time content of those the
    /// cut holds (`frozen`) that are neither shipped nor saved yet.
    pub fn preserve(
        &self,
        src: &File,
        first: u64,
        last: u64,
        frozen: impl Fn(u64) -> bool,
    ) -> Result<()> {
        if first >= self.blocks {
            return Ok(());
        }
        let mut buf = Vec::new();
        for b in first..=last.min(self.blocks - 1) {
            if test(&self.shipped, b) || test(&self.preserved, b) || !(self.all || frozen(b)) {
                continue;
            }
            let _l = self.stripe(b);
            if test(&self.shipped, b) || test(&self.preserved, b) {
                continue;
            }
            let n = self.block_len(b);
            buf.resize(n, 0);
            let got = read_full(src, &mut buf, b * self.bs).at(&self.side_path)?;
            buf[got..].fill(0);
            self.side_write(&buf, b * self.bs)?;
            mark(&self.preserved, b);
        }
        Ok(())
    }

    fn side_write(&self, data: &[u8], off: u64) -> Result<()> {
        let mut side = self.side.lock();
        if side.is_none() {
            let f = OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(true)
                .open(&self.side_path)
                .at(&self.side_path)?;
            *side = Some(f);
        }
        match side.as_ref() {
            Some(f) if data.iter().any(|&x| x != 0) => {
                f.write_all_at(data, off).at(&self.side_path)
            }
            _ => Ok(()),
        }
    }

    /// Reads block `b` as the cut saw it into `buf` (resized to the block's length), marks
    /// it shipped, and says whether it is all zeros (then `buf`'s bytes are unspecified:
    /// a hole is neither filled nor scanned). `hole` tells whether the block is known to
    /// lie in a hole of `src`.
    pub fn read(&self, src: &File, b: u64, buf: &mut Vec<u8>, hole: bool) -> Result<bool> {
        let n = self.block_len(b);
        buf.resize(n, 0);
        let _l = self.stripe(b);
        if hole && !test(&self.preserved, b) {
            mark(&self.shipped, b);
            return Ok(true);
        }
        if test(&self.preserved, b) {
            let side = self.side.lock();
            let got = match side.as_ref() {
                Some(f) => read_full(f, buf, b * self.bs).at(&self.side_path)?,
                None => 0,
            };
            buf[got..].fill(0);
        } else {
            let got = read_full(src, buf, b * self.bs).at(&self.side_path)?;
            buf[got..].fill(0);
        }
        mark(&self.shipped, b);
        Ok(crate::sys::is_zero(buf))
    }

    /// Whether block `b` was saved before a change (so a hole in the store says nothing).
    pub fn preserved(&self, b: u64) -> bool {
        test(&self.preserved, b)
    }

    /// Removes the side file (the cycle is over).
    pub fn discard(&self) {
        *self.side.lock() = None;
        let _ = std::fs::remove_file(&self.side_path);
    }
}
