//! Making a directory that holds a store's files into a replica whose latest point is
//! those files, in place: the old primary after a failover. A planned failover demotes
//! it with the hash index of the replica it just equalled (the files are the same, so
//! the index is copied, not computed); a reprotect after an unplanned failover keeps
//! what it held as a point tagged `diverged` and computes its index (every block read
//! once), so the next cycle compares block hashes and sends only the blocks that differ,
//! and the apply keeps the diverged blocks in that point's undo record.
//!
//! Nothing is a replica until the caller writes the replica's `state.toml`: what this
//! writes first (the point, the index) is inert in a primary's state directory, so a
//! crash before that leaves the primary as it was.

use std::fs;

use crate::error::{At, Error, Result};
use crate::model::manifest::point_id;
use crate::model::{FileId, Kind, Manifest, PointInfo, RelPath};
use crate::replica::posix::{Replica, hashes, pieces, publish_point};
use crate::state::StateDir;
use crate::sys;
use crate::wire::BlockHash;

/// Where the latest files' hash index comes from.
pub enum Index<'a> {
    /// A replica whose latest files are byte for byte these.
    CopyFrom(&'a Replica),
    /// Read every block of the files.
    Compute,
    /// Asked of a replica on another host whose latest files are byte for byte these:
    /// the BLAKE3 entries of a file's blocks `0..n` (a planned failover over a link).
    Fetch(&'a mut dyn FnMut(FileId, u64) -> Result<Vec<BlockHash>>),
}

/// Writes, in `sd`'s state directory, point `m` (the files as they are) as the latest
/// point, and the hash index of its files.
pub fn adopt(sd: &StateDir, m: &Manifest, mut index: Index<'_>) -> Result<PointInfo> {
    let hdir = sd.path("hashes");
    if hdir.exists() {
        fs::remove_dir_all(&hdir).at(&hdir)?;
    }
    fs::create_dir_all(&hdir).at(&hdir)?;
    for e in m.entries.iter().filter(|e| e.kind == Kind::File) {
        let Some(id) = e.id else { continue };
        let dst = hashes::path(&hdir, id);
        match &mut index {
            Index::CopyFrom(r) => {
                let src = r.hash_file(id);
                if !src.exists() {
                    continue;
                }
                fs::copy(&src, &dst).at(&dst)?;
                let (cs, cd) = (pieces::path(&src), pieces::path(&dst));
                if cs.exists() {
                    fs::copy(&cs, &cd).at(&cd)?;
                }
            }
            Index::Compute => {
                let abs = e.path.under(sd.store());
                let f = fs::File::open(&abs).at(&abs)?;
                hashes::compute(&f, e.size, m.block_size, &dst)?;
            }
            Index::Fetch(fetch) => {
                let blocks = e.size.div_ceil(m.block_size);
                write_index(&dst, &fetch(id, blocks)?, &e.path)?;
            }
        }
    }
    for d in ["incoming", "hold"] {
        let p = sd.path(d);
        if p.exists() {
            fs::remove_dir_all(&p).at(&p)?;
        }
    }
    let dir = sd.path(&format!("points/{}", point_id(m.generation)));
    if dir.exists() {
        fs::remove_dir_all(&dir).at(&dir)?;
    }
    let files = m.entries.iter().filter(|e| e.kind == Kind::File).count();
    let info = publish_point(sd, m, files, 0)?;
    sys::fsync_dir(&sd.path("")).at(&sd.path(""))?;
    Ok(info)
}

/// Writes a hash index from the entries of a file's blocks, in order.
fn write_index(dst: &std::path::Path, entries: &[BlockHash], path: &RelPath) -> Result<()> {
    let h = hashes::Hashes::open(dst)?;
    h.set_blocks(entries.len() as u64)?;
    for (b, e) in entries.iter().enumerate() {
        match e {
            BlockHash::Data(x) => h.set(b as u64, x)?,
            BlockHash::Zero => {}
            BlockHash::Absent => {
                return Err(Error::operator(format!(
                    "the replica keeps no BLAKE3 of block {b} of {path}: its index is short of its manifest"
                )));
            }
        }
    }
    h.sync()
}

/// A manifest's file entries grouped by id: (id, its paths).
pub fn files_of(m: &Manifest) -> Vec<(FileId, Vec<RelPath>)> {
    let mut by: std::collections::BTreeMap<_, Vec<_>> = Default::default();
    for e in m.entries.iter().filter(|e| e.kind == Kind::File) {
        if let Some(id) = e.id {
            by.entry(id).or_default().push(e.path.clone());
        }
    }
    by.into_iter().collect()
}
