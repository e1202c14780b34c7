//! The fine record: which 4 KiB pieces changed inside each dirty block since the last cut,
//! kept in memory beside a file's two bitmaps, so a cycle ships only those pieces of a
//! block instead of the whole block.
//!
//! The coarse bitmap is the authority; this record only narrows a dirty block, and only
//! where it is complete for that block since the last cut. A block has an entry only if
//! it was clean in the active map when its first recorded write came (the record was
//! there from the block's first change on); any change that does not record pieces
//! (punch, zero range, truncate, copy_file_range, mmap writeback) removes the entry. A
//! dirty block without an entry ships whole: after a restart (the record is memory only),
//! a failed cycle (its frozen set merges into the next one: the record is dropped), a
//! file whose tracking was closed and reopened, a block fully written, or past the budget.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};

/// The grain of the record: a page.
pub const PIECE: u64 = 4096;
/// How many block entries the record may hold across a store (about 40 bytes each: 40 MiB,
/// enough for 64 GiB of partly written 64 KiB blocks per cycle). Past it, new dirty
/// blocks ship whole.
pub const BUDGET: i64 = 1 << 20;

/// Per dirty block, the bit mask of its changed pieces (bit `i`: bytes `i*4096..`).
pub type Pieces = BTreeMap<u64, u64>;

/// The entries a store's files may still take.
pub struct Budget {
    left: AtomicI64,
}

impl Budget {
    pub fn new(entries: i64) -> Arc<Budget> {
        Arc::new(Budget {
            left: AtomicI64::new(entries),
        })
    }

    fn take(&self) -> bool {
        if self.left.fetch_sub(1, Ordering::AcqRel) > 0 {
            return true;
        }
        self.left.fetch_add(1, Ordering::AcqRel);
        false
    }

    fn give(&self, n: usize) {
        self.left.fetch_add(n as i64, Ordering::AcqRel);
    }

    pub fn left(&self) -> i64 {
        self.left.load(Ordering::Acquire)
    }
}

/// One file's record: the active side (changes since the last cut) and the frozen side
/// (what the current cut ships).
pub struct Fine {
    active: Pieces,
    frozen: Arc<Pieces>,
    budget: Arc<Budget>,
    /// Pieces per block; 0 when the block size gives no use for a record (4 KiB blocks)
    /// or more pieces than a mask holds (blocks above 256 KiB): every block ships whole.
    per_block: u64,
}

impl Fine {
    pub fn new(block_size: u64, budget: Arc<Budget>) -> Fine {
        let n = block_size / PIECE;
        Fine {
            active: Pieces::new(),
            frozen: Arc::new(Pieces::new()),
            budget,
            per_block: if (2..=64).contains(&n) { n } else { 0 },
        }
    }

    fn full(&self) -> u64 {
        if self.per_block == 64 {
            u64::MAX
        } else {
            (1 << self.per_block) - 1
        }
    }

    /// The pieces of block `b` that bytes `[off, off+len)` touch.
    fn mask(&self, b: u64, off: u64, len: u64) -> u64 {
        let bs = self.per_block * PIECE;
        let (start, end) = (b * bs, b * bs + bs);
        let (lo, hi) = (
            off.max(start) - start,
            off.saturating_add(len).min(end) - start,
        );
        let (p0, p1) = (lo / PIECE, hi.div_ceil(PIECE));
        let m = if p1 - p0 == 64 {
            u64::MAX
        } else {
            ((1u64 << (p1 - p0)) - 1) << p0
        };
        m & self.full()
    }

    /// A write of `[off, off+len)` (blocks `first..=last`) is about to happen; `clean(b)`
    /// tells whether block `b` is clean in the active map (before this write marks it).
    /// Called before the write marks its blocks, so a block it finds clean has had no
    /// change since the last cut.
    pub fn record(
        &mut self,
        first: u64,
        last: u64,
        off: u64,
        len: u64,
        clean: impl Fn(u64) -> bool,
    ) {
        if self.per_block == 0 || len == 0 {
            return;
        }
        let full = self.full();
        for b in first..=last {
            let m = self.mask(b, off, len);
            match self.active.get_mut(&b) {
                Some(have) => *have |= m,
                None if m != full && clean(b) && self.budget.take() => {
                    self.active.insert(b, m);
                }
                None => continue,
            }
            if self.active.get(&b) == Some(&full) {
                // Every piece: the block ships whole anyway; the entry is not needed.
                self.active.remove(&b);
                self.budget.give(1);
            }
        }
    }

    /// A change that records no pieces is about to touch blocks `first..=last` (after it
    /// marked them): they ship whole.
    pub fn forget(&mut self, first: u64, last: u64) {
        if self.active.is_empty() {
            return;
        }
        let mut mid = self.active.split_off(&first);
        let mut after = mid.split_off(&last.saturating_add(1));
        self.budget.give(mid.len());
        self.active.append(&mut after);
    }

    /// The cut: the active side becomes the frozen one; with `merged` (the last cycle did
    /// not ship, its frozen bits merge with the new ones) both are dropped: whole blocks.
    pub fn flip(&mut self, merged: bool) {
        self.budget.give(self.frozen.len());
        let active = std::mem::take(&mut self.active);
        if merged {
            self.budget.give(active.len());
            self.frozen = Arc::new(Pieces::new());
        } else {
            self.frozen = Arc::new(active);
        }
    }

    /// The cycle shipped: the frozen side is done with.
    pub fn shipped(&mut self) {
        self.budget.give(self.frozen.len());
        self.frozen = Arc::new(Pieces::new());
    }

    /// What the current cut ships by pieces.
    pub fn frozen(&self) -> Arc<Pieces> {
        self.frozen.clone()
    }
}

impl Drop for Fine {
    fn drop(&mut self) {
        self.budget.give(self.active.len() + self.frozen.len());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BS: u64 = 65536;

    #[test]
    fn pieces_of_clean_blocks_only_and_whole_after_any_other_change() {
        let budget = Budget::new(100);
        let mut f = Fine::new(BS, budget.clone());
        // 4 KiB at 8 KiB into block 0, and 8 KiB across blocks 1 and 2.
        f.record(0, 0, 8192, 4096, |_| true);
        f.record(1, 2, 2 * BS - 4096, 8192, |_| true);
        // Block 3 was already dirty when its first recorded write came: whole.
        f.record(3, 3, 3 * BS, 100, |_| false);
        // Block 4 written in two halves: every piece, so no entry.
        f.record(4, 4, 4 * BS, BS / 2, |_| true);
        f.record(4, 4, 4 * BS + BS / 2, BS / 2, |_| false);
        // Block 5 recorded, then punched: whole.
        f.record(5, 5, 5 * BS + 1, 1, |_| true);
        f.forget(5, 5);
        f.flip(false);
        let p = f.frozen();
        assert_eq!(p.get(&0), Some(&0b100));
        assert_eq!(p.get(&1), Some(&(1 << 15)));
        assert_eq!(p.get(&2), Some(&1));
        assert_eq!((p.get(&3), p.get(&4), p.get(&5)), (None, None, None));
        assert_eq!(budget.left(), 97);
        f.shipped();
        assert_eq!(budget.left(), 100);
    }

    #[test]
    fn a_failed_cycle_drops_the_record_and_the_budget_caps_it() {
        let budget = Budget::new(2);
        let mut f = Fine::new(BS, budget.clone());
        for b in 0..4 {
            f.record(b, b, b * BS, 4096, |_| true);
        }
        assert_eq!(budget.left(), 0);
        f.flip(false);
        assert_eq!(f.frozen().len(), 2, "past the budget, blocks are whole");
        f.record(9, 9, 9 * BS, 4096, |_| true);
        f.flip(true);
        assert!(f.frozen().is_empty());
        assert_eq!(budget.left(), 2);
        drop(f);
        assert_eq!(budget.left(), 2);
    }

    #[test]
    fn block_sizes_without_use_for_pieces_record_nothing() {
        for bs in [4096, 1 << 20] {
            let mut f = Fine::new(bs, Budget::new(10));
            f.record(0, 0, 0, 100, |_| true);
            f.flip(false);
            assert!(f.frozen().is_empty());
        }
    }
}
