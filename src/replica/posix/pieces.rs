//! Check values for the 4 KiB pieces of each block, so a read of 4 KiB is checked against
//! the block's BLAKE3 without reading the whole block. BLAKE3 hashes a block as a tree of
//! 1 KiB chunks; the chaining value of each aligned 4 KiB piece is a node of that tree, and
//! the block's hash follows from them (`root`). Kept beside each hash index: a reader
//! hashes the pieces it reads, compares them with the record, and checks that the record
//! gives the block's hash entry (which came from the primary). The record is an
//! accelerator, never the authority: a record that does not give the entry, or is
//! missing, sends the reader back to checking the whole block.
//!
//! Format v1: `<hash index path>.cv` (`hashes/<file id>.cv`, `undo/<file id>.hash.cv`):
//! for block `b`, `bs / 4096` chaining values of 32 bytes at `b * bs / 4096 * 32`; an
//! all-zero record is no record (a hole: a zero block, or one written before records were
//! kept). Only for block sizes above 4 KiB (at 4 KiB a piece is the block).

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use blake3::hazmat::{
    ChainingValue, HasherExt, Mode, left_subtree_len, merge_subtrees_non_root, merge_subtrees_root,
};

use crate::error::{At, Result};
use crate::sys::read_full;

/// A piece: what a 4 KiB read needs checked.
pub const PIECE: u64 = 4096;
const CV: u64 = 32;

/// The records of a hash index at `hashes`.
pub fn path(hashes: &Path) -> PathBuf {
    let mut s = hashes.as_os_str().to_owned();
    s.push(".cv");
    PathBuf::from(s)
}

/// Whether blocks of `bs` bytes have piece records.
pub fn kept(bs: u64) -> bool {
    bs > PIECE
}

/// The chaining value of piece `i` of a block (its bytes `piece`, at most 4 KiB).
pub fn piece(piece: &[u8], i: u64) -> ChainingValue {
    let mut h = blake3::Hasher::new();
    h.set_input_offset(i * PIECE);
    h.update(piece);
    h.finalize_non_root()
}

/// The chaining values of every piece of a block's bytes (more than one piece long).
pub fn of(block: &[u8]) -> Vec<ChainingValue> {
    block
        .chunks(PIECE as usize)
        .enumerate()
        .map(|(i, p)| piece(p, i as u64))
        .collect()
}

/// The subtree over `cvs`, whose bytes are `len` long, as a non-root chaining value.
fn subtree(cvs: &[ChainingValue], len: u64) -> ChainingValue {
    if cvs.len() == 1 {
        return cvs[0];
    }
    let left = left_subtree_len(len);
    let k = (left / PIECE) as usize;
    merge_subtrees_non_root(
        &subtree(&cvs[..k], left),
        &subtree(&cvs[k..], len - left),
        Mode::Hash,
    )
}

/// The BLAKE3 of a block `len` bytes long (more than one piece) from its pieces' values.
pub fn root(cvs: &[ChainingValue], len: u64) -> Option<[u8; 32]> {
    if len <= PIECE || cvs.len() as u64 != len.div_ceil(PIECE) {
        return None;
    }
    let left = left_subtree_len(len);
    let k = (left / PIECE) as usize;
    let h = merge_subtrees_root(
        &subtree(&cvs[..k], left),
        &subtree(&cvs[k..], len - left),
        Mode::Hash,
    );
    Some(*h.as_bytes())
}

/// An open records file.
pub struct Pieces {
    f: File,
    p: PathBuf,
    /// Bytes per block's record.
    rec: u64,
}

impl Pieces {
    pub fn open(hashes: &Path, bs: u64) -> Result<Pieces> {
        let p = path(hashes);
        let f = crate::sys::open_rw(&p).at(&p)?;
        Ok(Pieces {
            f,
            p,
            rec: bs / PIECE * CV,
        })
    }

    /// For reading; None where there are no records.
    pub fn open_ro(hashes: &Path, bs: u64) -> Option<Pieces> {
        if !kept(bs) {
            return None;
        }
        let p = path(hashes);
        Some(Pieces {
            f: File::open(&p).ok()?,
            p,
            rec: bs / PIECE * CV,
        })
    }

    /// Records the pieces of block `b`, whose bytes are `data` (none for a block of one
    /// piece or a zero block: `clear`).
    pub fn set(&self, b: u64, data: &[u8]) -> Result<()> {
        if data.len() as u64 <= PIECE || crate::sys::is_zero(data) {
            return self.clear(b, b + 1);
        }
        let cvs = of(data);
        let mut rec = vec![0u8; self.rec as usize];
        for (i, cv) in cvs.iter().enumerate() {
            rec[i * CV as usize..(i + 1) * CV as usize].copy_from_slice(cv);
        }
        self.f.write_all_at(&rec, b * self.rec).at(&self.p)
    }

    /// Blocks `a..z` have no records.
    pub fn clear(&self, a: u64, z: u64) -> Result<()> {
        let len = self.f.metadata().at(&self.p)?.len();
        let (x, y) = (a * self.rec, (z * self.rec).min(len));
        if x < y {
            crate::sys::zero_range(&self.f, x, y - x).at(&self.p)?;
        }
        Ok(())
    }

    /// The record of block `b`, `n` pieces long; None where there is none.
    pub fn get(&self, b: u64, n: u64) -> Result<Option<Vec<ChainingValue>>> {
        let mut rec = vec![0u8; (n * CV).min(self.rec) as usize];
        let got = read_full(&self.f, &mut rec, b * self.rec).at(&self.p)?;
        if got < rec.len() || rec.iter().all(|&x| x == 0) {
            return Ok(None);
        }
        Ok(Some(
            rec.chunks_exact(CV as usize)
                .map(|c| {
                    let mut cv = [0u8; 32];
                    cv.copy_from_slice(c);
                    cv
                })
                .collect(),
        ))
    }

    /// The values of pieces `first..first+n` of block `b`; None where there are none.
    pub fn range(&self, b: u64, first: u64, n: u64) -> Result<Option<Vec<ChainingValue>>> {
        let mut rec = vec![0u8; (n * CV) as usize];
        let got = read_full(&self.f, &mut rec, b * self.rec + first * CV).at(&self.p)?;
        if got < rec.len()
            || rec
                .chunks_exact(CV as usize)
                .any(|c| c.iter().all(|&x| x == 0))
        {
            return Ok(None);
        }
        Ok(Some(
            rec.chunks_exact(CV as usize)
                .map(|c| {
                    let mut cv = [0u8; 32];
                    cv.copy_from_slice(c);
                    cv
                })
                .collect(),
        ))
    }

    /// Sizes the records for a file of `blocks` blocks.
    pub fn set_blocks(&self, blocks: u64) -> Result<()> {
        self.f.set_len(blocks * self.rec).at(&self.p)
    }

    pub fn sync(&self) -> Result<()> {
        self.f.sync_all().at(&self.p)
    }

    /// Copies the record of block `b` to `dst`'s block `b`, if there is one: whether
    /// there was.
    pub fn copy_one(&self, dst: &Pieces, b: u64) -> Result<bool> {
        let mut rec = vec![0u8; self.rec as usize];
        let got = read_full(&self.f, &mut rec, b * self.rec).at(&self.p)?;
        if got < rec.len() || crate::sys::is_zero(&rec) {
            return Ok(false);
        }
        dst.f.write_all_at(&rec, b * dst.rec).at(&dst.p)?;
        Ok(true)
    }

    /// Copies the records of `runs` (blocks) to `dst`.
    pub fn copy_to(&self, dst: &Pieces, runs: &[[u64; 2]]) -> Result<()> {
        let mut rec = vec![0u8; self.rec as usize];
        for r in runs {
            for b in r[0]..r[1] {
                let got = read_full(&self.f, &mut rec, b * self.rec).at(&self.p)?;
                rec[got..].fill(0);
                if rec.iter().any(|&x| x != 0) {
                    dst.f.write_all_at(&rec, b * dst.rec).at(&dst.p)?;
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_pieces_give_the_blocks_blake3() {
        for len in [4097usize, 5000, 8192, 12288, 12289, 30000, 65536, 1 << 20] {
            let data: Vec<u8> = (0..len).map(|i| (i * 7 + len) as u8).collect();
            let cvs = of(&data);
            assert_eq!(
                root(&cvs, len as u64),
                Some(*blake3::hash(&data).as_bytes()),
                "{len} bytes"
            );
            let mut bad = cvs.clone();
            bad[cvs.len() / 2][0] ^= 1;
            assert_ne!(
                root(&bad, len as u64),
                Some(*blake3::hash(&data).as_bytes())
            );
        }
        assert_eq!(root(&of(&[1u8; 100]), 100), None, "one piece is the block");
    }

    #[test]
    fn records_round_trip_and_clear() {
        let dir = tempfile::tempdir().unwrap();
        let hp = dir.path().join("abc");
        let p = Pieces::open(&hp, 65536).unwrap();
        let data: Vec<u8> = (0..65536).map(|i| (i % 251) as u8).collect();
        p.set(3, &data).unwrap();
        let got = p.get(3, 16).unwrap().unwrap();
        assert_eq!(root(&got, 65536), Some(*blake3::hash(&data).as_bytes()));
        assert!(p.get(2, 16).unwrap().is_none());
        p.clear(3, 4).unwrap();
        assert!(p.get(3, 16).unwrap().is_none());
        assert!(path(&hp).ends_with("abc.cv"));
    }
}
