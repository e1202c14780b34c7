//! The replica store: a directory whose files, at their real paths, are always the latest
//! recovery point (a failover boots from them directly), plus `.drfs/` with the history.
//!
//! Layout (format v1, in `REPLICA/.drfs/`): `state.toml` (role `replica`, `source`, `keep`),
//! `latest` (the newest point's id), `points/<id>/` with `point.json` (summary),
//! `manifest.json` (the tree at the cut) and, for every point but the latest, `undo/` (see
//! `undo`), `incoming/` (the cycle being received), `journal.json` (an apply in progress)
//! and `hold/` (files in transit during an apply).

pub mod adopt;
pub mod apply;
pub mod diverge;
pub mod hashes;
pub mod incoming;
pub mod partial;
pub mod pieces;
pub mod read;
pub mod relay;
pub mod rollback;
pub mod saved;
pub mod source;
pub mod store;
pub mod tree;
pub mod undo;
pub mod verify;

use std::fs::File;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use crate::error::{At, Error, Result};
use crate::model::retention::{self, Policy};
use crate::model::{Manifest, PointInfo};
use crate::state::{Config, Role, StateDir};
use crate::sys;
use tree::Tree;

/// Writes point `m` of a replica in `sd` (`points/<id>/manifest.json` and `point.json`,
/// its summary: `files` files, `bytes` changed) and makes it the latest.
pub(crate) fn publish_point(
    sd: &StateDir,
    m: &Manifest,
    files: usize,
    bytes: u64,
) -> Result<PointInfo> {
    let id = crate::model::manifest::point_id(m.generation);
    let dir = sd.path(&format!("points/{id}"));
    std::fs::create_dir_all(&dir).at(&dir)?;
    let mp = dir.join("manifest.json");
    let body = serde_json::to_vec(m).map_err(Error::encode)?;
    sys::write_atomic(&mp, &body).at(&mp)?;
    let info = PointInfo {
        id: id.clone(),
        time: crate::model::fmt::rfc3339_ns(i128::from(m.time_ns)),
        consistency: m.consistency,
        generation: m.generation,
        files,
        bytes_changed: bytes,
        time_ns: m.time_ns,
        cut_id: m.cut_id.clone(),
        diverged: matches!(m.origin, Some(crate::model::Origin::Diverged { .. })),
        restores: match &m.origin {
            Some(crate::model::Origin::Restores { point }) => Some(point.clone()),
            _ => None,
        },
    };
    let ip = dir.join("point.json");
    let body = serde_json::to_vec_pretty(&info).map_err(Error::encode)?;
    sys::write_atomic(&ip, &body).at(&ip)?;
    set_latest(sd, &id)?;
    Ok(info)
}

fn set_latest(sd: &StateDir, id: &str) -> Result<()> {
    let p = sd.path("latest");
    sys::write_atomic(&p, id.as_bytes()).at(&p)
}

pub struct Replica {
    pub root: PathBuf,
    pub sd: StateDir,
    pub cfg: Config,
    pub tree: Tree,
}

/// The apply counter's file in the state directory.
const SEQ: &str = "apply.seq";

impl Replica {
    /// Opens an existing replica and finishes an apply a crash interrupted.
    pub fn open(root: &Path) -> Result<Replica> {
        let r = Replica::open_only(root)?;
        apply::recover(&r)?;
        Ok(r)
    }

    /// Opens without recovering (for readers that must not write). A directory that is
    /// not there is an I/O error (its disk may come back); one that is no replica is
    /// refused.
    pub fn open_only(root: &Path) -> Result<Replica> {
        let root = root.canonicalize().at(root)?;
        let sd = StateDir::new(&root);
        if !sd.exists() {
            return Err(Error::Invalid(format!(
                "{} is not a drfs replica (no .drfs/state.toml); `drfs protect STORE --to {}` makes one",
                root.display(),
                root.display()
            )));
        }
        let cfg = sd.config()?;
        // A promoted replica is a primary now, and its points are its history.
        if cfg.role != Role::Replica && cfg.promoted.is_none() {
            return Err(Error::Invalid(format!(
                "{} is a primary store, not a replica",
                root.display()
            )));
        }
        let tree = Tree::open(&root).at(&root)?;
        Ok(Replica {
            root,
            sd,
            cfg,
            tree,
        })
    }

    /// Makes `root` (an existing directory) a replica of store `source`.
    pub fn init(root: &Path, source: &str, block_size: u64, keep: &str) -> Result<Replica> {
        let canon = root
            .canonicalize()
            .map_err(|e| Error::Invalid(format!("replica {}: {e}", root.display())))?;
        if !canon.is_dir() {
            return Err(Error::Invalid(format!(
                "replica {} is not a directory",
                canon.display()
            )));
        }
        StateDir::init_replica(&canon, source, block_size, keep)?;
        Replica::open(&canon)
    }

    /// Refuses to take cycles once promoted (`drfs failover`): the store that sends them
    /// is no longer this one's primary (the split-brain guard).
    pub fn refuse_if_promoted(&self) -> Result<()> {
        let Some(p) = &self.cfg.promoted else {
            return Ok(());
        };
        Err(Error::operator(format!(
            "{} was promoted at {} (failover to point {}); this store is no longer its primary; see `drfs reprotect`",
            self.root.display(),
            p.time,
            p.point
        )))
    }

    pub fn is_replica(root: &Path) -> bool {
        StateDir::new(root)
            .config()
            .is_ok_and(|c| c.role == Role::Replica)
    }

    pub fn point_dir(&self, id: &str) -> PathBuf {
        self.sd.path(&format!("points/{id}"))
    }

    pub fn undo_dir(&self, id: &str) -> PathBuf {
        self.point_dir(id).join("undo")
    }

    /// The bytes all points' undo records take on disk (allocated blocks: saved data is
    /// sparse).
    pub fn undo_bytes(&self) -> Result<u64> {
        use std::os::unix::fs::MetadataExt;
        let mut n = 0;
        for p in self.points()? {
            let dir = self.undo_dir(&p.id);
            let Ok(rd) = std::fs::read_dir(&dir) else {
                continue;
            };
            for e in rd.flatten() {
                n += e.metadata().map_or(0, |m| m.blocks() * 512);
            }
        }
        Ok(n)
    }

    /// The block hashes of a file of the latest point.
    pub fn hash_file(&self, id: crate::model::FileId) -> PathBuf {
        hashes::path(&self.sd.path("hashes"), id)
    }

    pub fn policy(&self) -> Result<Policy> {
        let text = self.cfg.keep.as_deref().unwrap_or(retention::DEFAULT);
        Policy::parse(text).map_err(|e| Error::corrupt(&self.sd.path("state.toml"), e))
    }

    /// Every complete point, oldest first.
    pub fn points(&self) -> Result<Vec<PointInfo>> {
        let dir = self.sd.path("points");
        let mut out = Vec::new();
        let rd = match std::fs::read_dir(&dir) {
            Ok(rd) => rd,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(out),
            Err(e) => return Err(e).at(&dir),
        };
        for e in rd {
            let p = e.at(&dir)?.path().join("point.json");
            match std::fs::read(&p) {
                Ok(b) => out.push(
                    serde_json::from_slice(&b).map_err(|e| Error::corrupt(&p, e.to_string()))?,
                ),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(e).at(&p),
            }
        }
        out.sort_by_key(|p: &PointInfo| p.generation);
        Ok(out)
    }

    /// The newest point (the one the latest files are).
    pub fn latest(&self) -> Result<Option<PointInfo>> {
        let p = self.sd.path("latest");
        let id = match std::fs::read_to_string(&p) {
            Ok(s) => s.trim().to_string(),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e).at(&p),
        };
        let info = self.point_dir(&id).join("point.json");
        let b = std::fs::read(&info).at(&info)?;
        serde_json::from_slice(&b)
            .map(Some)
            .map_err(|e| Error::corrupt(&info, e.to_string()))
    }

    pub fn manifest(&self, id: &str) -> Result<Manifest> {
        let p = self.point_dir(id).join("manifest.json");
        let b = std::fs::read(&p).map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => {
                Error::Invalid(format!("no point {id} on {}", self.root.display()))
            }
            _ => Error::Io {
                path: p.clone(),
                source: e,
            },
        })?;
        serde_json::from_slice(&b).map_err(|e| Error::corrupt(&p, e.to_string()))
    }

    /// Applies the retention policy: drops points it does not keep. The oldest point goes
    /// with its undo record; an intermediate one has its record merged into the previous
    /// point's. The latest files are never touched. Returns the dropped ids.
    pub fn prune(&self, now_ns: i64) -> Result<Vec<String>> {
        // Readers take in undo records under the shared lock: no merge runs meanwhile.
        let _lock = self.prune_lock(libc::LOCK_EX)?;
        if self.sd.path("journal.json").exists() {
            // An unfinished apply may roll forward from these records (a roll-back's
            // saved blocks): nothing changes them until it is done.
            return Ok(Vec::new());
        }
        let points = self.points()?;
        let times: Vec<i64> = points.iter().map(|p| p.time_ns).collect();
        let mut keep = self.policy()?.keep(&times, now_ns);
        // The base of the onward replica's next cycle (extended replication).
        if let Some(base) = relay::pinned(self) {
            keep.extend(points.iter().position(|p| p.id == base));
        }
        let mut dropped = Vec::new();
        let mut older: Option<&PointInfo> = None;
        for (i, p) in points.iter().enumerate() {
            let kept = keep.contains(&i);
            let lock = if kept { None } else { self.unpinned(&p.id)? };
            let Some(_lock) = lock else {
                if !kept {
                    tracing::info!("keeping point {}: a reader has it open", p.id);
                }
                older = Some(p);
                continue;
            };
            if let Some(o) = older {
                undo::merge(
                    &self.undo_dir(&o.id),
                    &self.undo_dir(&p.id),
                    self.cfg.block_size,
                )?;
            }
            let dir = self.point_dir(&p.id);
            // Unpublish first: a point without point.json is not a point.
            let info = dir.join("point.json");
            std::fs::remove_file(&info).at(&info)?;
            std::fs::remove_dir_all(&dir).at(&dir)?;
            let keep = self.cfg.keep.as_deref().unwrap_or(retention::DEFAULT);
            let why = format!("point {} of {}: not kept by {keep}", p.id, p.time);
            let e = crate::events::Event::new(&self.sd, crate::events::Kind::Prune, "pruned", why);
            crate::events::record(&self.sd, e.old("kept"));
            dropped.push(p.id.clone());
        }
        Ok(dropped)
    }

    /// Marks the start (`on`) or the end of an apply in `.drfs/apply.seq`: a counter, odd
    /// while an apply is changing the latest files (see `view`).
    pub fn set_applying(&self, on: bool) -> Result<()> {
        let p = self.sd.path(SEQ);
        let f = crate::sys::open_rw(&p).at(&p)?;
        let mut b = [0u8; 8];
        let n = sys::read_full(&f, &mut b, 0).at(&p)?;
        let v = if n == 8 { u64::from_le_bytes(b) } else { 0 };
        if (v % 2 == 1) != on {
            std::os::unix::fs::FileExt::write_all_at(&f, &(v + 1).to_le_bytes(), 0).at(&p)?;
        }
        Ok(())
    }

    /// The apply counter, mapped read-only (created if missing and the replica is
    /// writable; None otherwise, and then nothing can apply either).
    pub fn map_seq(&self) -> Option<memmap2::Mmap> {
        let p = self.sd.path(SEQ);
        if !p.exists() {
            let _ = self.set_applying(false);
        }
        let f = File::open(&p).ok()?;
        if f.metadata().ok()?.len() < 8 {
            return None;
        }
        unsafe { memmap2::MmapOptions::new().len(8).map(&f) }.ok()
    }

    /// `.drfs/prune.lock`, flocked with `op`; None where it cannot be opened (a replica
    /// on a read-only filesystem, which no retention run can change either).
    pub fn prune_lock(&self, op: i32) -> Result<Option<File>> {
        let p = self.sd.path("prune.lock");
        let f = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&p)
            .or_else(|_| File::open(&p));
        let Ok(f) = f else {
            return Ok(None);
        };
        sys::flock(&f, op).at(&p)?;
        Ok(Some(f))
    }

    /// Pins point `id` for a reader: its record is not pruned while the returned file is
    /// open (a shared flock on its `point.json`).
    pub fn pin(&self, id: &str) -> Result<File> {
        let p = self.point_dir(id).join("point.json");
        let gone = || {
            Error::Invalid(format!(
                "point {id} is no longer on {}",
                self.root.display()
            ))
        };
        let f = File::open(&p).map_err(|_| gone())?;
        sys::flock(&f, libc::LOCK_SH).at(&p)?;
        // A retention run may have removed it between the open and the lock.
        let same = std::fs::metadata(&p)
            .ok()
            .zip(f.metadata().ok())
            .is_some_and(|(a, b)| a.ino() == b.ino() && a.dev() == b.dev());
        if !same {
            return Err(gone());
        }
        Ok(f)
    }

    /// The exclusive lock on point `id` that removing it needs; None while it is pinned.
    fn unpinned(&self, id: &str) -> Result<Option<File>> {
        let p = self.point_dir(id).join("point.json");
        let f = File::open(&p).at(&p)?;
        match sys::flock(&f, libc::LOCK_EX | libc::LOCK_NB) {
            Ok(()) => Ok(Some(f)),
            Err(e) if e.raw_os_error() == Some(libc::EWOULDBLOCK) => Ok(None),
            Err(e) => Err(e).at(&p),
        }
    }
}
