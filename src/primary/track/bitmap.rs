//! The per-file persistent change bitmap: one bit per block (default 64 KiB), in a file
//! `STATE/bitmaps/<id>.bm` mapped shared into the daemon. Bits are set with atomic
//! `fetch_or` straight into the shared mapping, so they live in the page cache the moment
//! they are set and survive a SIGKILL of the daemon. Format v1: a 4096-byte header
//! (magic `DRFSBM01`, version u32, block size u32, file id u64, role stamp u64) then the
//! bits, little-endian u64 words, block `b` is bit `b % 64` of word `b / 64`. The file
//! grows a page of bits at a time. Each file has two maps (`<id>.bm`, `<id>.2.bm`): the
//! one with the larger role stamp takes new writes, the other holds a cut's frozen set.

use std::fs::{File, OpenOptions};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use memmap2::MmapMut;

use crate::error::{At, Error, Result};

pub const MAGIC: &[u8; 8] = b"DRFSBM01";
pub const VERSION: u32 = 1;
pub const HEADER: usize = 4096;
/// Capacity grows by one page of bits: 32768 blocks (2 GiB of file at 64 KiB blocks).
const GROW_BLOCKS: u64 = 4096 * 8;

pub struct Bitmap {
    path: PathBuf,
    file: File,
    map: MmapMut,
    blocks: u64,
}

fn header(block_size: u64, id: u64) -> Vec<u8> {
    let mut h = vec![0u8; HEADER];
    h[..8].copy_from_slice(MAGIC);
    h[8..12].copy_from_slice(&VERSION.to_le_bytes());
    h[12..16].copy_from_slice(&(block_size as u32).to_le_bytes());
    h[16..24].copy_from_slice(&id.to_le_bytes());
    h
}

fn check_header(path: &Path, h: &[u8], block_size: u64) -> Result<()> {
    if h.len() < HEADER || &h[..8] != MAGIC {
        return Err(Error::corrupt(path, "not a drfs bitmap"));
    }
    let v = u32::from_le_bytes([h[8], h[9], h[10], h[11]]);
    let bs = u32::from_le_bytes([h[12], h[13], h[14], h[15]]);
    if v != VERSION || u64::from(bs) != block_size {
        return Err(Error::corrupt(
            path,
            format!("version {v} block size {bs}, want {VERSION}/{block_size}"),
        ));
    }
    Ok(())
}

impl Bitmap {
    /// Opens the bitmap of file `id`, creating an empty one if it does not exist.
    pub fn open(path: &Path, block_size: u64, id: u64, min_blocks: u64) -> Result<Bitmap> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)
            .at(path)?;
        let len = file.metadata().at(path)?.len();
        if len == 0 {
            use std::os::unix::fs::FileExt;
            file.write_all_at(&header(block_size, id), 0).at(path)?;
        } else {
            let mut h = vec![0u8; HEADER];
            use std::os::unix::fs::FileExt;
            file.read_exact_at(&mut h, 0).at(path)?;
            check_header(path, &h, block_size)?;
        }
        let blocks = round_up(min_blocks.max(existing_blocks(len)));
        file.set_len(HEADER as u64 + blocks / 8).at(path)?;
        let map = unsafe { MmapMut::map_mut(&file) }.at(path)?;
        Ok(Bitmap {
            path: path.to_path_buf(),
            file,
            map,
            blocks,
        })
    }

    pub fn capacity(&self) -> u64 {
        self.blocks
    }

    /// Makes room for at least `blocks` blocks.
    pub fn grow(&mut self, blocks: u64) -> Result<()> {
        if blocks <= self.blocks {
            return Ok(());
        }
        let want = round_up(blocks);
        self.file.set_len(HEADER as u64 + want / 8).at(&self.path)?;
        self.map = unsafe { MmapMut::map_mut(&self.file) }.at(&self.path)?;
        self.blocks = want;
        Ok(())
    }

    fn words(&self) -> &[AtomicU64] {
        let bytes = &self.map[HEADER..];
        // The mapping is page-aligned and HEADER is a page, so the words are aligned.
        unsafe { std::slice::from_raw_parts(bytes.as_ptr().cast::<AtomicU64>(), bytes.len() / 8) }
    }

    /// Sets blocks `first..=last`; the caller has made sure they fit.
    pub fn set(&self, first: u64, last: u64) {
        let words = self.words();
        let mut b = first;
        while b <= last {
            let w = (b / 64) as usize;
            let lo = b % 64;
            let hi = (last - (b - lo)).min(63);
            let mask = mask_bits(lo, hi);
            let word = &words[w];
            if word.load(Ordering::Relaxed) & mask != mask {
                word.fetch_or(mask, Ordering::AcqRel);
            }
            b = b - lo + 64;
        }
    }

    /// Whether block `b` is set.
    pub fn test(&self, b: u64) -> bool {
        self.words()
            .get((b / 64) as usize)
            .is_some_and(|w| w.load(Ordering::Acquire) & (1 << (b % 64)) != 0)
    }

    /// Whether any block is set.
    pub fn any(&self) -> bool {
        self.words().iter().any(|w| w.load(Ordering::Relaxed) != 0)
    }

    /// Sets every block set in `other` (which must not be larger).
    pub fn or_from(&self, other: &Bitmap) {
        for (w, o) in self.words().iter().zip(other.words()) {
            let v = o.load(Ordering::Acquire);
            if v != 0 {
                w.fetch_or(v, Ordering::AcqRel);
            }
        }
    }

    /// The role stamp: the cut epoch at which this map last became the active one.
    pub fn stamp(&self) -> u64 {
        let mut a = [0u8; 8];
        a.copy_from_slice(&self.map[24..32]);
        u64::from_le_bytes(a)
    }

    pub fn set_stamp(&mut self, stamp: u64) {
        self.map[24..32].copy_from_slice(&stamp.to_le_bytes());
    }

    /// Clears everything (after the changes have been shipped).
    pub fn clear(&self) {
        for w in self.words() {
            if w.load(Ordering::Relaxed) != 0 {
                w.store(0, Ordering::Release);
            }
        }
    }

    /// Dirty block runs `[first, end)`.
    pub fn ranges(&self) -> Vec<(u64, u64)> {
        let words: Vec<u64> = self
            .words()
            .iter()
            .map(|w| w.load(Ordering::Acquire))
            .collect();
        runs(&words)
    }

    /// Writes the bits to disk (msync).
    pub fn flush(&self) -> Result<()> {
        self.map.flush().at(&self.path)
    }
}

/// Reads a bitmap file without mapping it (for `drfs changes` in another process).
pub fn read_ranges(path: &Path, block_size: u64) -> Result<Vec<(u64, u64)>> {
    let mut f = File::open(path).at(path)?;
    let mut buf = Vec::new();
    f.read_to_end(&mut buf).at(path)?;
    check_header(path, &buf, block_size)?;
    let words: Vec<u64> = buf[HEADER..]
        .chunks_exact(8)
        .map(|c| u64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]))
        .collect();
    Ok(runs(&words))
}

fn existing_blocks(len: u64) -> u64 {
    len.saturating_sub(HEADER as u64) * 8
}

fn round_up(blocks: u64) -> u64 {
    blocks.max(1).div_ceil(GROW_BLOCKS) * GROW_BLOCKS
}

fn mask_bits(lo: u64, hi: u64) -> u64 {
    let upper = if hi == 63 {
        u64::MAX
    } else {
        (1u64 << (hi + 1)) - 1
    };
    upper & !((1u64 << lo) - 1)
}

/// Runs of set bits as half-open block ranges.
pub fn runs(words: &[u64]) -> Vec<(u64, u64)> {
    let mut out: Vec<(u64, u64)> = Vec::new();
    for (i, &w) in words.iter().enumerate() {
        if w == 0 {
            continue;
        }
        let base = i as u64 * 64;
        let mut bits = w;
        while bits != 0 {
            let start = u64::from(bits.trailing_zeros());
            let len = u64::from((bits >> start).trailing_ones());
            let (a, b) = (base + start, base + start + len);
            match out.last_mut() {
                Some(last) if last.1 == a => last.1 = b,
                _ => out.push((a, b)),
            }
            bits = if start + len >= 64 {
                0
            } else {
                bits & !mask_bits(0, start + len - 1)
            };
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn set_and_runs() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("a.bm");
        let mut bm = Bitmap::open(&p, 65536, 7, 10).unwrap();
        bm.set(3, 3);
        bm.set(60, 130);
        bm.set(131, 131);
        assert_eq!(bm.ranges(), vec![(3, 4), (60, 132)]);
        bm.grow(100_000).unwrap();
        bm.set(99_999, 99_999);
        assert_eq!(bm.ranges().last(), Some(&(99_999, 100_000)));
        drop(bm);
        let r = read_ranges(&p, 65536).unwrap();
        assert_eq!(r, vec![(3, 4), (60, 132), (99_999, 100_000)]);
        assert!(read_ranges(&p, 4096).is_err());
    }

    #[test]
    fn runs_cross_words() {
        assert_eq!(runs(&[u64::MAX, 1]), vec![(0, 65)]);
        assert_eq!(runs(&[1 << 63, 0, 1]), vec![(63, 64), (128, 129)]);
        assert_eq!(runs(&[0b1011]), vec![(0, 2), (3, 4)]);
    }
}
