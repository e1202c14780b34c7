//! Rolling a replica's latest files back, in place, to an older point (a failover to
//! that point). The roll-back is an apply like any cycle's: the blocks that differ
//! between the point and the latest files are exactly those the undo records from the
//! point on hold, so those are staged by reference to the record holding each (not
//! copied: the apply reads them from there, after checking every one against its
//! BLAKE3), and applied with the point's manifest as a new point of a new generation.
//! The few a record does not hold (a block the latest file still has, past a size
//! change) are read from the point, checked, and staged as data. The apply writes the
//! undo record of the point it replaces first, so every newer point stays readable, and it is journaled, so a crash leaves the replica at the
//! old latest point or the new one. The cost is the blocks between the two points, not
//! the disks' size.

use std::collections::{BTreeMap, BTreeSet};

use crate::error::{Error, Result};
use crate::model::manifest::POINT_VERSION;
use crate::model::{Entry, FileId, Kind, Manifest, Origin, PointInfo, new_id};
use crate::replica::posix::incoming::Incoming;
use crate::replica::posix::read::{PointFile, Saved};
use crate::replica::posix::undo::UndoIndex;
use crate::replica::posix::{Replica, apply};
use crate::wire::Block;

/// What a roll-back did.
#[derive(Debug, Clone)]
pub struct Rolled {
    /// The new latest point (its content is `to`'s).
    pub point: PointInfo,
    /// Blocks and bytes written into the latest files.
    pub blocks: u64,
    pub bytes: u64,
}

/// Rolls the latest files back to point `to` (not the latest), as a new point.
pub fn roll_back(r: &Replica, to: &PointInfo) -> Result<Rolled> {
    let latest = r
        .latest()?
        .ok_or_else(|| Error::Invalid(format!("{} has no point yet", r.root.display())))?;
    let want = r.manifest(&to.id)?;
    let now = r.manifest(&latest.id)?;
    let blocks = differing(r, to, &latest, &want, &now)?;
    let generation = latest.generation + 1;
    let bs = r.cfg.block_size;
    let mut inc = Incoming::begin(
        &r.sd.path("incoming"),
        generation,
        Some(latest.generation),
        bs,
    )?;
    let mut staged = (0u64, 0u64);
    let mut buf = vec![0u8; bs as usize];
    for e in want.entries.iter().filter(|e| e.kind == Kind::File) {
        let Some(runs) = e.id.and_then(|id| blocks.get(&id)) else {
            continue;
        };
        let f = PointFile::open(r, to, e, false)?;
        for b in runs.iter().flat_map(|r| r[0]..r[1]) {
            let n = match saved(&mut inc, &f, e, b, bs)? {
                Some(n) => n,
                None => stage(&mut inc, &f, e, b, bs, &mut buf)?,
            };
            staged = (staged.0 + 1, staged.1 + n);
        }
    }
    let m = Manifest {
        version: POINT_VERSION,
        generation,
        cut_id: new_id(),
        time: crate::model::fmt::rfc3339_now(),
        time_ns: crate::sys::now_ns() as i64,
        consistency: want.consistency,
        block_size: bs,
        groups: want.groups.clone(),
        entries: want.entries.clone(),
        origin: Some(Origin::Restores {
            point: to.id.clone(),
        }),
    };
    let point = apply::commit(r, &mut inc, m)?;
    Ok(Rolled {
        point,
        blocks: staged.0,
        bytes: staged.1,
    })
}

/// Between points `lo` and `hi` (older, newer), per file of `want` (the manifest of one
/// of them), the blocks in which it differs from the same file in `now` (the other's):
/// those the undo records of `lo` and every later point before `hi` hold, within its
/// size; all of a file `now` does not have; and the blocks past the other's end where the
/// size differs. Those records hold exactly the blocks that changed between the two.
pub fn differing(
    r: &Replica,
    lo: &PointInfo,
    hi: &PointInfo,
    want: &Manifest,
    now: &Manifest,
) -> Result<BTreeMap<FileId, Vec<[u64; 2]>>> {
    let bs = r.cfg.block_size;
    let mut held: BTreeMap<FileId, BTreeSet<u64>> = BTreeMap::new();
    let mut whole: BTreeSet<FileId> = BTreeSet::new();
    let later = r
        .points()?
        .into_iter()
        .filter(|p| p.generation >= lo.generation && p.generation < hi.generation);
    for p in later {
        let idx = UndoIndex::load(&r.undo_dir(&p.id))?;
        for (id, f) in idx.files {
            if f.whole {
                whole.insert(id);
            } else {
                let set = held.entry(id).or_default();
                for run in &f.blocks {
                    set.extend(run[0]..run[1]);
                }
            }
        }
    }
    let sizes: BTreeMap<FileId, u64> = now
        .entries
        .iter()
        .filter_map(|e| e.id.map(|id| (id, e.size)))
        .collect();
    let mut out = BTreeMap::new();
    for e in want.entries.iter().filter(|e| e.kind == Kind::File) {
        let Some(id) = e.id else { continue };
        let n = e.size.div_ceil(bs);
        let mut set: BTreeSet<u64> = match sizes.get(&id) {
            None => (0..n).collect(),
            Some(_) if whole.contains(&id) => (0..n).collect(),
            Some(&old) => {
                let mut s: BTreeSet<u64> = held
                    .get(&id)
                    .map(|s| s.range(..n).copied().collect())
                    .unwrap_or_default();
                if old != e.size && n > 0 {
                    // The blocks past the old end, and the new last block.
                    s.extend((old / bs).min(n - 1)..n);
                }
                s
            }
        };
        set.retain(|&b| b < n);
        let mut runs = Vec::new();
        for b in set {
            push_run(&mut runs, b);
        }
        if !runs.is_empty() {
            out.insert(id, runs);
        }
    }
    Ok(out)
}

/// Stages block `b` of the point's file `e` by reference to the undo record holding it
/// (a zero block there as zeros), if one does; its length.
fn saved(inc: &mut Incoming, f: &PointFile, e: &Entry, b: u64, bs: u64) -> Result<Option<u64>> {
    let Some(found) = f.saved_in(b).map_err(io_at(e))? else {
        return Ok(None);
    };
    let off = b * bs;
    let len = (e.size - off).min(bs) as u32;
    let block = |zero, hash| Block {
        id: e.id.unwrap_or(FileId(0)),
        offset: off,
        len,
        zero,
        hash,
        data: Vec::new(),
    };
    match found {
        Saved::Zero => inc.put_checked(&block(true, crate::wire::zero_hash(len as usize)), 0)?,
        Saved::Data { record, hash } => inc.put_saved(&block(false, hash), &record)?,
    }
    Ok(Some(u64::from(len)))
}

/// An I/O error reading file `e` of the point.
fn io_at(e: &Entry) -> impl Fn(std::io::Error) -> Error + '_ {
    |source| Error::Io {
        path: e.path.under(std::path::Path::new("/")),
        source,
    }
}

/// Reads block `b` of the point's file `e` (checked) and stages it; its length.
fn stage(
    inc: &mut Incoming,
    f: &PointFile,
    e: &Entry,
    b: u64,
    bs: u64,
    buf: &mut [u8],
) -> Result<u64> {
    let off = b * bs;
    let len = (e.size - off).min(bs) as usize;
    let (got, bad) = f.read_checked(&mut buf[..len], b).map_err(io_at(e))?;
    if let Some(bad) = bad {
        return Err(Error::operator(format!(
            "{}: the block at byte {off} of the point {}; nothing was changed",
            e.path,
            bad.why()
        )));
    }
    buf[got..len].fill(0);
    let data = &buf[..len];
    let zero = crate::sys::is_zero(data);
    // Checked against the point's entry by the read: staged without checking it again.
    inc.put_checked(
        &Block {
            id: e.id.unwrap_or(FileId(0)),
            offset: off,
            len: len as u32,
            zero,
            hash: if zero {
                crate::wire::zero_hash(len)
            } else {
                *blake3::hash(data).as_bytes()
            },
            data: if zero { Vec::new() } else { data.to_vec() },
        },
        0,
    )?;
    Ok(len as u64)
}

/// Adds block `b` (ascending) to `runs`.
fn push_run(runs: &mut Vec<[u64; 2]>, b: u64) {
    match runs.last_mut() {
        Some(r) if r[1] == b => r[1] = b + 1,
        _ => runs.push([b, b + 1]),
    }
}
