//! What a promoted store's VMs wrote, kept as a `diverged` point when the operator changes
//! the failover's point after the store was mounted. While such a store is mounted and the
//! failover is not committed, its tracking keeps the latest point readable
//! (`primary::track::history`): the first write to a block of that point copies the
//! block into a side file, durably, before the write reaches the store, and a file
//! deleted from the point is kept whole by a hard link. A change of point turns those
//! into the latest point's undo record, brings the hash index to the files as they are,
//! and publishes the files as they are as a new point (`origin = diverged`); the
//! roll-back to the chosen point then starts from it, so nothing the VMs wrote is lost
//! and every newer point stays reachable.
//!
//! Layout (format 1), in `STATE/history/`: `point` (the id of the point the copies keep),
//! `<file id>.side` (sparse: the point's blocks at their own offsets, a zero block a
//! hole), `<file id>.whole` (a deleted file, as a hard link), and, while a change of point
//! is under way, `diverge.json` (this module's `Plan`). Every copy is checked against the
//! point's BLAKE3 before it is used: a block whose content at the point neither its copy
//! nor the file holds (the store changed behind drfs's back) stops the change of point,
//! with nothing changed.

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::{At, Error, Result};
use crate::model::runs::union;
use crate::model::{FileId, Kind, Manifest, PointInfo};
use crate::replica::posix::hashes::{self, Hashes, ZERO};
use crate::replica::posix::pieces::{self, Pieces};
use crate::replica::posix::undo::UndoWriter;
use crate::replica::posix::{Replica, publish_point};
use crate::state::StateDir;
use crate::sys::{self, read_full};

pub const DIR: &str = "history";
pub const VERSION: u32 = 1;

pub fn dir(sd: &StateDir) -> PathBuf {
    sd.path(DIR)
}

pub fn side_path(dir: &Path, id: FileId) -> PathBuf {
    dir.join(format!("{id}.side"))
}

pub fn whole_path(dir: &Path, id: FileId) -> PathBuf {
    dir.join(format!("{id}.whole"))
}

pub fn point_path(dir: &Path) -> PathBuf {
    dir.join("point")
}

pub fn plan_path(dir: &Path) -> PathBuf {
    dir.join("diverge.json")
}

/// The point the history of `dir` keeps, if it keeps one.
pub fn kept_point(dir: &Path) -> Result<Option<String>> {
    let p = point_path(dir);
    match fs::read_to_string(&p) {
        Ok(s) => Ok(Some(s.trim().to_string())),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e).at(&p),
    }
}

/// A change of point under way: the files as they are (`manifest`, a cut), the blocks the
/// tracking saw change since the promotion, and how far it got.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Plan {
    pub version: u32,
    /// The point the side files keep (the latest point when the change began).
    pub point: String,
    pub manifest: Manifest,
    /// Per file of the cut: the blocks changed since the promotion (all of a file
    /// tracking could not vouch for).
    pub changed: BTreeMap<FileId, Vec<[u64; 2]>>,
    /// The point's undo record is written; the hash index may already be the files'.
    #[serde(default)]
    pub undone: bool,
}

impl Plan {
    pub fn load(dir: &Path) -> Result<Option<Plan>> {
        let p = plan_path(dir);
        match fs::read(&p) {
            Ok(b) => {
                let plan: Plan =
                    serde_json::from_slice(&b).map_err(|e| Error::corrupt(&p, e.to_string()))?;
                if plan.version != VERSION {
                    return Err(Error::corrupt(&p, format!("version {}", plan.version)));
                }
                Ok(Some(plan))
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e).at(&p),
        }
    }

    pub fn save(&self, dir: &Path) -> Result<()> {
        let p = plan_path(dir);
        let b = serde_json::to_vec(self).map_err(Error::encode)?;
        sys::write_atomic(&p, &b).at(&p)?;
        sys::fsync_dir(dir).at(dir)
    }
}

/// Regular files of a manifest by id: (first path, size).
fn files(m: &Manifest) -> BTreeMap<FileId, (crate::model::RelPath, u64)> {
    let mut out = BTreeMap::new();
    for e in m.entries.iter().filter(|e| e.kind == Kind::File) {
        if let Some(id) = e.id {
            out.entry(id).or_insert_with(|| (e.path.clone(), e.size));
        }
    }
    out
}

/// Carries out `plan`: the kept point's undo record, the hash index, and the new point.
/// Run again after a crash at any step, it completes; once the point is published it
/// returns it. The plan stays until the caller's change of point is over (`finish`).
pub fn keep(r: &Replica, mut plan: Plan) -> Result<PointInfo> {
    let dir = dir(&r.sd);
    let id = crate::model::manifest::point_id(plan.manifest.generation);
    if let Some(p) = r.points()?.into_iter().find(|p| p.id == id) {
        return Ok(p);
    }
    if !plan.undone {
        if let Err(e) = write_undo(r, &plan) {
            // Nothing has changed (a published record of the point holds its content):
            // the store can be mounted or committed as it is.
            let _ = fs::remove_file(plan_path(&dir));
            return Err(e);
        }
        crate::sys::fault::hit("diverge:undone");
        plan.undone = true;
        plan.save(&dir)?;
    }
    let bytes = reindex(r, &plan)?;
    crate::sys::fault::hit("diverge:indexed");
    let n = files(&plan.manifest).len();
    let info = publish_point(&r.sd, &plan.manifest, n, bytes)?;
    crate::sys::fault::hit("diverge:published");
    Ok(info)
}

/// The change of point is over: the copies and the plan are done with.
pub fn finish(sd: &StateDir) -> Result<()> {
    let d = dir(sd);
    if d.exists() {
        fs::remove_dir_all(&d).at(&d)?;
    }
    Ok(())
}

/// One block's bytes at `off` (`n` of them; zeros past the end of `f`).
fn read_block(f: &File, buf: &mut Vec<u8>, off: u64, n: usize, at: &Path) -> Result<()> {
    buf.resize(n, 0);
    let got = read_full(f, buf, off).at(at)?;
    buf[got..].fill(0);
    Ok(())
}

/// A file's side file (an empty one where nothing was copied: every block a hole).
fn open_side(p: &Path) -> Result<File> {
    fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(p)
        .at(p)
}

fn lost(path: &crate::model::RelPath, b: u64, point: &str) -> Error {
    Error::operator(format!(
        "{path}: block {b} changed without its content at point {point} being kept (the store was changed behind drfs); the point cannot change: keep it, or `drfs failover --commit`"
    ))
}

/// The kept point's undo record: each changed block from its copy, a grown file's last
/// block from the file, a deleted file whole. The hash index is still the point's, so
/// the record takes its entries from it.
fn write_undo(r: &Replica, plan: &Plan) -> Result<()> {
    let bs = r.cfg.block_size;
    let dir = dir(&r.sd);
    let old = files(&r.manifest(&plan.point)?);
    let new = files(&plan.manifest);
    let mut w = UndoWriter::new(&r.undo_dir(&plan.point), bs)?;
    let mut buf = Vec::new();
    for (id, (path, size)) in &old {
        let hp = r.hash_file(*id);
        let index = match Hashes::open_ro(&hp) {
            Ok(h) => Some(h),
            Err(_) if *size == 0 => None,
            Err(e) => return Err(e),
        };
        let want = |b: u64| index.as_ref().map_or(Ok(ZERO), |h| h.get(b));
        let blocks = size.div_ceil(bs);
        let len = |b: u64| (size - b * bs).min(bs) as usize;
        let sp = side_path(&dir, *id);
        let side = open_side(&sp)?;
        let Some((now_at, new_size)) = new.get(id) else {
            whole(r, &mut w, *id, path, *size, &dir, &side, &want, &plan.point)?;
            continue;
        };
        // Where the file is now (the VMs may have renamed it).
        let fp = now_at.under(&r.root);
        let file = File::open(&fp).at(&fp)?;
        let mut runs = plan.changed.get(id).cloned().unwrap_or_default();
        if *new_size < *size {
            runs.push([new_size / bs, blocks]);
        }
        let (mut from_side, mut from_file) = (Vec::new(), Vec::new());
        for b in union(runs).into_iter().flat_map(|r| r[0]..r[1].min(blocks)) {
            let (n, h) = (len(b), want(b)?);
            read_block(&file, &mut buf, b * bs, n, &fp)?;
            // The index will hold the block as the file has it now: a block that grew
            // keeps its bytes but not its BLAKE3.
            let same_len = (new_size.saturating_sub(b * bs)).min(bs) as usize == n;
            if hashes::of(&buf) == h {
                if !same_len {
                    from_file.push([b, b + 1]);
                }
                continue;
            }
            read_block(&side, &mut buf, b * bs, n, &sp)?;
            if hashes::of(&buf) != h {
                return Err(lost(now_at, b, &plan.point));
            }
            from_side.push([b, b + 1]);
        }
        if let Some(b) = tail_grown(*size, *new_size, bs) {
            from_file.push([b, b + 1]);
        }
        let from_file = crate::model::runs::minus(&union(from_file), &union(from_side.clone()));
        w.save(*id, &side, &hp, from_side, *size)?;
        w.save(*id, &file, &hp, from_file, *size)?;
    }
    w.finish().map(drop)
}

/// The last, partial block of a file that grew: its bytes stay, its BLAKE3 changes.
fn tail_grown(old: u64, new: u64, bs: u64) -> Option<u64> {
    (new > old && old % bs != 0).then_some(old / bs)
}

/// A file deleted since the promotion: its hard link, with the blocks written through a
/// handle still open after the delete put back from their copies, goes whole into the
/// record, with the point's hash entries.
#[allow(clippy::too_many_arguments)]
fn whole(
    r: &Replica,
    w: &mut UndoWriter,
    id: FileId,
    path: &crate::model::RelPath,
    size: u64,
    dir: &Path,
    side: &File,
    want: &dyn Fn(u64) -> Result<[u8; 32]>,
    point: &str,
) -> Result<()> {
    let bs = r.cfg.block_size;
    let wp = whole_path(dir, id);
    let f = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&wp)
        .map_err(|_| lost(path, 0, point))?;
    let mut buf = Vec::new();
    for b in 0..size.div_ceil(bs) {
        let n = (size - b * bs).min(bs) as usize;
        let h = want(b)?;
        read_block(&f, &mut buf, b * bs, n, &wp)?;
        if hashes::of(&buf) == h {
            continue;
        }
        read_block(side, &mut buf, b * bs, n, &wp)?;
        if hashes::of(&buf) != h {
            return Err(lost(path, b, point));
        }
        f.write_all_at(&buf, b * bs).at(&wp)?;
    }
    f.set_len(size).at(&wp)?;
    f.sync_all().at(&wp)?;
    w.whole_from(id, &wp, &r.hash_file(id))
}

/// Brings the hash index to the files as they are: the changed blocks of kept files
/// hashed again, new files hashed whole, deleted files' entries gone. Returns the bytes
/// that changed.
fn reindex(r: &Replica, plan: &Plan) -> Result<u64> {
    let bs = r.cfg.block_size;
    let old = files(&r.manifest(&plan.point)?);
    let new = files(&plan.manifest);
    let mut bytes = 0;
    let mut buf = Vec::new();
    for (id, (path, size)) in &new {
        let fp = path.under(&r.root);
        let file = File::open(&fp).at(&fp)?;
        let hp = r.hash_file(*id);
        let Some((_, old_size)) = old.get(id) else {
            hashes::compute(&file, *size, bs, &hp)?;
            bytes += size;
            continue;
        };
        let blocks = size.div_ceil(bs);
        let mut runs = plan.changed.get(id).cloned().unwrap_or_default();
        runs.extend(tail_grown(*old_size, *size, bs).map(|b| [b, b + 1]));
        if size % bs != 0 && size < old_size {
            runs.push([size / bs, size / bs + 1]);
        }
        let h = Hashes::open(&hp)?;
        let p = if pieces::kept(bs) {
            Some(Pieces::open(&hp, bs)?)
        } else {
            None
        };
        h.set_blocks(blocks)?;
        if let Some(p) = &p {
            p.set_blocks(blocks)?;
        }
        for b in union(runs).into_iter().flat_map(|r| r[0]..r[1].min(blocks)) {
            let n = (size - b * bs).min(bs) as usize;
            read_block(&file, &mut buf, b * bs, n, &fp)?;
            h.set(b, &hashes::of(&buf))?;
            if let Some(p) = &p {
                p.set(b, &buf)?;
            }
            bytes += n as u64;
        }
        h.sync()?;
        if let Some(p) = &p {
            p.sync()?;
        }
    }
    for id in old.keys().filter(|id| !new.contains_key(id)) {
        let hp = r.hash_file(*id);
        for p in [pieces::path(&hp), hp] {
            match fs::remove_file(&p) {
                Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e).at(&p),
                _ => {}
            }
        }
    }
    let hdir = r.sd.path("hashes");
    sys::fsync_dir(&hdir).at(&hdir)?;
    Ok(bytes)
}
