//! Undo records: what makes older points reachable. The undo record of point P holds, for
//! every block the next applied cycle changed, its content at P (and, for a file that
//! cycle deleted, the whole file). The latest files plus the undo records of P, P+1, ...
//! give point P. Dropping the oldest point deletes its record; dropping an intermediate
//! point merges its record into the previous point's (the older content wins), never
//! touching the latest files.
//!
//! Format v1, in `points/<id>/undo/`: `index.json`
//! `{"version": 1, "files": {"<file id>": {"whole": bool, "blocks": [[first, end], ...]}}}`
//! and one `<file id>.data` per file: a sparse file holding the saved blocks at their own
//! offsets (a zero block is a hole), or the whole deleted file.

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::{At, Error, Result};
use crate::model::FileId;
use crate::model::runs::{covers, minus, union};
use crate::replica::posix::hashes::Hashes;
use crate::replica::posix::pieces;
use crate::sys::{self, read_full};

pub const VERSION: u32 = 1;

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct UndoFile {
    pub whole: bool,
    pub blocks: Vec<[u64; 2]>,
}

impl UndoFile {
    pub fn has(&self, b: u64) -> bool {
        self.whole || covers(&self.blocks, b)
    }
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct UndoIndex {
    pub version: u32,
    pub files: BTreeMap<FileId, UndoFile>,
}

pub fn data_path(dir: &Path, id: FileId) -> PathBuf {
    dir.join(format!("{id}.data"))
}

/// The block hashes that go with `data_path` (see `hashes`).
pub fn hash_path(dir: &Path, id: FileId) -> PathBuf {
    dir.join(format!("{id}.hash"))
}

/// Copies the hash entries of `runs`, and their piece records, from the index `src` (if
/// it exists) to `dst`.
fn copy_hashes(src: &Path, dst: &Path, runs: &[[u64; 2]], bs: u64) -> Result<()> {
    if !src.exists() || runs.is_empty() {
        return Ok(());
    }
    let from = Hashes::open_ro(src)?;
    let to = Hashes::open(dst)?;
    from.copy_to(&to, runs)?;
    to.sync()?;
    if let Some(from) = pieces::Pieces::open_ro(src, bs) {
        let to = pieces::Pieces::open(dst, bs)?;
        from.copy_to(&to, runs)?;
        to.sync()?;
    }
    Ok(())
}

impl UndoIndex {
    pub fn load(dir: &Path) -> Result<UndoIndex> {
        let p = dir.join("index.json");
        match fs::read(&p) {
            Ok(b) => {
                let i: UndoIndex =
                    serde_json::from_slice(&b).map_err(|e| Error::corrupt(&p, e.to_string()))?;
                if i.version != VERSION {
                    return Err(Error::corrupt(&p, format!("version {}", i.version)));
                }
                Ok(i)
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(UndoIndex {
                version: VERSION,
                files: BTreeMap::new(),
            }),
            Err(e) => Err(e).at(&p),
        }
    }

    pub fn save(&self, dir: &Path) -> Result<()> {
        let p = dir.join("index.json");
        let b = serde_json::to_vec(self).map_err(Error::encode)?;
        sys::write_atomic(&p, &b).at(&p)
    }
}

/// Copies bytes `[a*bs, b*bs) ∩ [0, limit)` of `src` to the same offsets of `dst`,
/// leaving zero blocks as holes.
pub fn copy_blocks(
    src: &File,
    dst: &File,
    runs: &[[u64; 2]],
    bs: u64,
    limit: u64,
) -> io::Result<u64> {
    let mut buf = vec![0u8; bs as usize];
    let mut copied = 0;
    for r in runs {
        for b in r[0]..r[1] {
            let off = b * bs;
            if off >= limit {
                break;
            }
            let n = ((limit - off).min(bs)) as usize;
            let got = read_full(src, &mut buf[..n], off)?;
            buf[got..n].fill(0);
            if buf[..n].iter().any(|&x| x != 0) {
                dst.write_all_at(&buf[..n], off)?;
            }
            copied += n as u64;
        }
    }
    Ok(copied)
}

/// Builds an undo record in a temporary directory, then publishes it atomically.
pub struct UndoWriter {
    tmp: PathBuf,
    dir: PathBuf,
    index: UndoIndex,
    bs: u64,
}

impl UndoWriter {
    pub fn new(dir: &Path, bs: u64) -> Result<UndoWriter> {
        let tmp = dir.with_extension("tmp");
        if tmp.exists() {
            fs::remove_dir_all(&tmp).at(&tmp)?;
        }
        fs::create_dir_all(&tmp).at(&tmp)?;
        Ok(UndoWriter {
            tmp,
            dir: dir.to_path_buf(),
            index: UndoIndex {
                version: VERSION,
                files: BTreeMap::new(),
            },
            bs,
        })
    }

    /// Saves the current content of `runs` (blocks) of file `id` from `src`, with their
    /// hash entries from the hash file `hashes`.
    pub fn save(
        &mut self,
        id: FileId,
        src: &File,
        hashes: &Path,
        runs: Vec<[u64; 2]>,
        size: u64,
    ) -> Result<u64> {
        let runs = union(runs);
        if runs.is_empty() {
            return Ok(0);
        }
        let p = data_path(&self.tmp, id);
        let dst = fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&p)
            .at(&p)?;
        let n = copy_blocks(src, &dst, &runs, self.bs, size).at(&p)?;
        dst.sync_all().at(&p)?;
        copy_hashes(hashes, &hash_path(&self.tmp, id), &runs, self.bs)?;
        let e = self.index.files.entry(id).or_default();
        e.blocks = union(e.blocks.iter().copied().chain(runs).collect());
        Ok(n)
    }

    /// File `id` is deleted by the cycle: the apply moves the whole file in.
    pub fn whole(&mut self, id: FileId) {
        self.index.files.insert(
            id,
            UndoFile {
                whole: true,
                blocks: Vec::new(),
            },
        );
    }

    /// File `id` is kept whole from `data` (hard-linked in), with the hash entries (and
    /// piece records) of the index file `hashes`.
    pub fn whole_from(&mut self, id: FileId, data: &Path, hashes: &Path) -> Result<()> {
        let dst = data_path(&self.tmp, id);
        if dst.exists() {
            fs::remove_file(&dst).at(&dst)?;
        }
        fs::hard_link(data, &dst).at(&dst)?;
        let hd = hash_path(&self.tmp, id);
        for (s, d) in [
            (hashes.to_path_buf(), hd.clone()),
            (pieces::path(hashes), pieces::path(&hd)),
        ] {
            if s.exists() {
                fs::copy(&s, &d).at(&d)?;
            }
        }
        self.whole(id);
        Ok(())
    }

    pub fn finish(self) -> Result<UndoIndex> {
        self.index.save(&self.tmp)?;
        sys::fsync_dir(&self.tmp).at(&self.tmp)?;
        if self.dir.exists() {
            fs::remove_dir_all(&self.dir).at(&self.dir)?;
        }
        fs::rename(&self.tmp, &self.dir).at(&self.dir)?;
        if let Some(parent) = self.dir.parent() {
            sys::fsync_dir(parent).at(parent)?;
        }
        Ok(self.index)
    }
}

/// Merges the undo record in `newer` into `older` (the older content wins), so `older`'s
/// point stays reachable once `newer`'s is deleted. Crash-safe: `newer` is only read (data
/// files are hard-linked, not moved) and `older`'s index is replaced atomically at the end.
pub fn merge(older: &Path, newer: &Path, bs: u64) -> Result<()> {
    let mut oi = UndoIndex::load(older)?;
    let ni = UndoIndex::load(newer)?;
    fs::create_dir_all(older).at(older)?;
    for (id, nf) in &ni.files {
        let (op, np) = (data_path(older, *id), data_path(newer, *id));
        match oi.files.get(id).cloned() {
            Some(of) if of.whole => {}
            None => {
                let (oh, nh) = (hash_path(older, *id), hash_path(newer, *id));
                for (o, n) in [
                    (op.clone(), np.clone()),
                    (pieces::path(&oh), pieces::path(&nh)),
                    (oh, nh),
                ] {
                    if n.exists() {
                        let _ = fs::remove_file(&o);
                        fs::hard_link(&n, &o).at(&o)?;
                    }
                }
                oi.files.insert(*id, nf.clone());
            }
            Some(of) => {
                let src = File::open(&np).at(&np)?;
                let dst = fs::OpenOptions::new()
                    .create(true)
                    .truncate(false)
                    .write(true)
                    .open(&op)
                    .at(&op)?;
                let (extra, size, merged) = if nf.whole {
                    let size = src.metadata().at(&np)?.len();
                    let extra = minus(&[[0, size.div_ceil(bs)]], &of.blocks);
                    (
                        extra,
                        size,
                        UndoFile {
                            whole: true,
                            blocks: Vec::new(),
                        },
                    )
                } else {
                    let extra = minus(&nf.blocks, &of.blocks);
                    let blocks = union(of.blocks.iter().chain(&nf.blocks).copied().collect());
                    (
                        extra,
                        u64::MAX,
                        UndoFile {
                            whole: false,
                            blocks,
                        },
                    )
                };
                copy_blocks(&src, &dst, &extra, bs, size).at(&op)?;
                copy_hashes(&hash_path(newer, *id), &hash_path(older, *id), &extra, bs)?;
                dst.sync_all().at(&op)?;
                oi.files.insert(*id, merged);
            }
        }
    }
    oi.save(older)
}

/// Where a point's block comes from: an undo record's data file, or the latest file.
pub fn block_source(undos: &[(PathBuf, UndoIndex)], id: FileId, b: u64) -> Option<PathBuf> {
    undos
        .iter()
        .find(|(_, i)| i.files.get(&id).is_some_and(|f| f.has(b)))
        .map(|(dir, _)| data_path(dir, id))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn merge_keeps_the_older_content() {
        let dir = tempfile::tempdir().unwrap();
        let bs = 4096u64;
        let (older, newer) = (dir.path().join("old"), dir.path().join("new"));
        let src_a = dir.path().join("a");
        fs::write(&src_a, vec![1u8; 4 * 4096]).unwrap();
        let nohash = dir.path().join("none");
        let mut w = UndoWriter::new(&older, bs).unwrap();
        w.save(
            FileId(1),
            &File::open(&src_a).unwrap(),
            &nohash,
            vec![[0, 2]],
            4 * 4096,
        )
        .unwrap();
        w.finish().unwrap();
        fs::write(&src_a, vec![2u8; 4 * 4096]).unwrap();
        let mut w = UndoWriter::new(&newer, bs).unwrap();
        w.save(
            FileId(1),
            &File::open(&src_a).unwrap(),
            &nohash,
            vec![[1, 3]],
            4 * 4096,
        )
        .unwrap();
        w.save(
            FileId(2),
            &File::open(&src_a).unwrap(),
            &nohash,
            vec![[0, 1]],
            4 * 4096,
        )
        .unwrap();
        w.finish().unwrap();
        merge(&older, &newer, bs).unwrap();
        let i = UndoIndex::load(&older).unwrap();
        assert_eq!(i.files[&FileId(1)].blocks, vec![[0, 3]]);
        assert_eq!(i.files[&FileId(2)].blocks, vec![[0, 1]]);
        let d = fs::read(data_path(&older, FileId(1))).unwrap();
        assert!(
            d[..2 * 4096].iter().all(|&x| x == 1),
            "older content must win"
        );
        assert!(d[2 * 4096..3 * 4096].iter().all(|&x| x == 2));
        // The newer record is untouched until it is deleted.
        assert_eq!(UndoIndex::load(&newer).unwrap().files.len(), 2);
    }
}
