//! The replica's block hash index: for every file of the latest point, the BLAKE3 of each
//! block as the primary sent it, so any point can be verified end to end when it is read
//! back (`view` checks every block it serves: browse, test failover, restore). Undo
//! records keep the entries of the blocks they save, so every point has its hashes too.
//!
//! Format v1: `REPLICA/.drfs/hashes/<file id>` (and `<file id>.hash` in an undo record):
//! 32 bytes per block at offset `block * 32`; an all-zero entry (a hole) means a zero
//! block. A file is `ceil(size / block size) * 32` bytes long.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use crate::error::{At, Result};
use crate::replica::posix::pieces::{self, Pieces};
use crate::sys::read_full;

pub const ENTRY: u64 = 32;
/// The entry that stands for a zero block.
pub const ZERO: [u8; 32] = [0; 32];

pub fn path(dir: &Path, id: crate::model::FileId) -> PathBuf {
    dir.join(id.to_string())
}

/// An open hash file.
pub struct Hashes {
    f: File,
    p: PathBuf,
}

impl Hashes {
    pub fn open(p: &Path) -> Result<Hashes> {
        let f = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(p)
            .at(p)?;
        Ok(Hashes {
            f,
            p: p.to_path_buf(),
        })
    }

    pub fn open_ro(p: &Path) -> Result<Hashes> {
        Ok(Hashes {
            f: File::open(p).at(p)?,
            p: p.to_path_buf(),
        })
    }

    pub fn set(&self, b: u64, h: &[u8; 32]) -> Result<()> {
        if *h == ZERO {
            return self.zero(b, b + 1);
        }
        self.f.write_all_at(h, b * ENTRY).at(&self.p)
    }

    /// Blocks `a..b` are zero blocks.
    pub fn zero(&self, a: u64, b: u64) -> Result<()> {
        let len = self.f.metadata().at(&self.p)?.len();
        let (x, y) = (a * ENTRY, (b * ENTRY).min(len));
        if x < y {
            crate::sys::zero_range(&self.f, x, y - x).at(&self.p)?;
        }
        Ok(())
    }

    pub fn get(&self, b: u64) -> Result<[u8; 32]> {
        let mut h = [0u8; 32];
        let n = read_full(&self.f, &mut h, b * ENTRY).at(&self.p)?;
        h[n..].fill(0);
        Ok(h)
    }

    /// Reads the entries of blocks `b..` into `buf` (a multiple of 32 bytes; zeros past
    /// the end of the index).
    pub fn read_entries(&self, b: u64, buf: &mut [u8]) -> Result<()> {
        let n = read_full(&self.f, buf, b * ENTRY).at(&self.p)?;
        buf[n..].fill(0);
        Ok(())
    }

    /// How many blocks the index covers.
    pub fn blocks(&self) -> Result<u64> {
        Ok(self.f.metadata().at(&self.p)?.len() / ENTRY)
    }

    /// Sizes the index for a file of `blocks` blocks.
    pub fn set_blocks(&self, blocks: u64) -> Result<()> {
        self.f.set_len(blocks * ENTRY).at(&self.p)
    }

    pub fn sync(&self) -> Result<()> {
        self.f.sync_all().at(&self.p)
    }

    /// Copies entries of `runs` (blocks) from `self` into `dst`.
    pub fn copy_to(&self, dst: &Hashes, runs: &[[u64; 2]]) -> Result<()> {
        for r in runs {
            for b in r[0]..r[1] {
                let h = self.get(b)?;
                if h != ZERO {
                    dst.f.write_all_at(&h, b * ENTRY).at(&dst.p)?;
                }
            }
        }
        Ok(())
    }
}

/// The entry of a block's bytes.
pub fn of(data: &[u8]) -> [u8; 32] {
    if crate::sys::is_zero(data) {
        ZERO
    } else {
        *blake3::hash(data).as_bytes()
    }
}

/// Builds the index of `file` (for a file that came to the replica without one).
pub fn compute(file: &File, size: u64, bs: u64, dst: &Path) -> Result<()> {
    let tmp = dst.with_extension("tmp");
    let h = Hashes::open(&tmp)?;
    h.f.set_len(0).at(&tmp)?;
    let blocks = size.div_ceil(bs);
    h.set_blocks(blocks)?;
    let pieces = if pieces::kept(bs) {
        let p = Pieces::open(&tmp, bs)?;
        p.set_blocks(0)?;
        p.set_blocks(blocks)?;
        Some(p)
    } else {
        None
    };
    let mut holes = crate::sys::Holes::new(file);
    let mut buf = vec![0u8; bs as usize];
    for b in 0..blocks {
        let n = (size - b * bs).min(bs) as usize;
        if holes.hole(b * bs, n as u64) {
            continue;
        }
        let got = read_full(file, &mut buf[..n], b * bs).at(dst)?;
        buf[got..n].fill(0);
        h.set(b, &of(&buf[..n]))?;
        if let Some(p) = &pieces {
            p.set(b, &buf[..n])?;
        }
    }
    h.sync()?;
    if let Some(p) = &pieces {
        p.sync()?;
        let to = pieces::path(dst);
        std::fs::rename(pieces::path(&tmp), &to).at(&to)?;
    }
    std::fs::rename(&tmp, dst).at(dst)
}
