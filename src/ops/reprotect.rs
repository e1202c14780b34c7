//! `drfs reprotect STORE --to OLD`: after an unplanned failover, the old primary (back
//! from the disaster, diverged: it holds writes the replica never got) becomes the
//! replica of the store the failover promoted.
//!
//! 1. What OLD holds is kept as a point tagged `diverged` on OLD itself: its tracking
//!    takes a cut (so files keep their ids), every block is hashed into the replica's
//!    index (`replica::posix::adopt`), and OLD's `state.toml` makes it a replica of STORE.
//! 2. STORE is protected to OLD (its settings, by default OLD's old ones) and a first
//!    cycle compares every block by BLAKE3: only blocks that differ travel, and the apply
//!    keeps OLD's diverged blocks in the `diverged` point's undo record, browsable.
//!
//! Run again after a crash at any step, it completes: OLD already a replica of STORE
//! skips step 1. It refuses the wrong direction (STORE must be the promoted one) and any
//! OLD that is not the store STORE was promoted from.

use std::path::{Path, PathBuf};

use crate::daemon::control::ShipReply;
use crate::error::{Error, Result};
use crate::model::lineage::Why;
use crate::model::manifest::POINT_VERSION;
use crate::model::{Manifest, Origin, PointInfo, Target, new_id};
use crate::ops::protect::{self, Protect};
use crate::primary::cycle::CycleState;
use crate::primary::track::{Tracker, run};
use crate::replica::posix::Replica;
use crate::replica::posix::adopt::{self, Index};
use crate::state::{Config, Role, StateDir, epoch};

/// What `drfs reprotect` sets besides the target.
#[derive(Default)]
pub struct Reprotect<'a> {
    pub to: &'a str,
    pub interval: Option<&'a str>,
    pub keep: Option<&'a str>,
}

/// What a reprotect did.
pub struct Reprotected {
    pub store: PathBuf,
    pub old: PathBuf,
    /// The point that keeps what OLD held.
    pub diverged: PointInfo,
    /// The first cycle back.
    pub cycle: ShipReply,
}

fn canonical(p: &Path, what: &str) -> Result<PathBuf> {
    p.canonicalize()
        .map_err(|e| Error::Invalid(format!("{what} {}: {e}", p.display())))
}

pub fn reprotect(store: &Path, p: &Reprotect<'_>) -> Result<Reprotected> {
    let target: Target = p.to.parse().map_err(Error::Invalid)?;
    let Target::Local(old) = target else {
        return Err(Error::Invalid(format!(
            "reprotect onto {target} is not supported yet: run it where both are local"
        )));
    };
    let root = canonical(store, "store")?;
    let (sd, cfg) = StateDir::open(&root)?;
    let Some(prom) = cfg.promoted.clone() else {
        return Err(Error::Invalid(format!(
            "{} was not promoted by a failover: reprotect runs on the new primary, with --to the old one",
            root.display()
        )));
    };
    let old = canonical(&old, "old primary")?;
    if old == root {
        return Err(Error::Invalid("--to is the store itself".into()));
    }
    let osd = StateDir::new(&old);
    let ocfg = osd.config().map_err(|_| {
        Error::Invalid(format!(
            "{} is not a drfs store (no .drfs/state.toml): reprotect makes the old primary a replica; for a new, empty replica use `drfs protect {} --to DIR --rebind`",
            old.display(),
            root.display()
        ))
    })?;
    if let Some(m) = crate::fuse::mountinfo::of_store(&old).first() {
        return Err(Error::operator(format!(
            "{} is mounted at {}: stop its VMs and unmount it first",
            old.display(),
            m.mountpoint.display()
        )));
    }
    let former = ocfg.replication.clone();
    let diverged = match ocfg.role {
        Role::Replica if ocfg.source.as_deref() == Some(&cfg.store_id) => Replica::open(&old)?
            .points()?
            .into_iter()
            .rev()
            .find(|x| x.diverged)
            .ok_or_else(|| {
                Error::Invalid(format!(
                    "{} is already a replica of {}: `drfs ship {}`",
                    old.display(),
                    root.display(),
                    root.display()
                ))
            })?,
        Role::Replica => {
            return Err(Error::operator(format!(
                "{} is a replica of another store ({}), not the old primary of {}",
                old.display(),
                ocfg.source.as_deref().unwrap_or("?"),
                root.display()
            )));
        }
        Role::Primary if ocfg.store_id != prom.from => {
            return Err(Error::operator(format!(
                "{} is not the store {} was promoted from (it replicated {}; {} is {})",
                old.display(),
                root.display(),
                prom.from,
                old.display(),
                ocfg.store_id
            )));
        }
        Role::Primary => demote(&osd, &ocfg, &cfg, &root)?,
    };
    crate::sys::fault::hit("reprotect:demoted");
    let interval = former.as_ref().map(|r| r.interval.to_string());
    let keep = former.as_ref().map(|r| r.keep.clone());
    let group = former.as_ref().map(|r| r.group.to_string());
    protect::protect(
        &root,
        &Protect {
            to: Some(p.to),
            interval: p.interval.or(interval.as_deref()),
            keep: p.keep.or(keep.as_deref()),
            group: group.as_deref(),
            rebind: true,
            ..Default::default()
        },
    )?;
    crate::sys::fault::hit("reprotect:protected");
    let cycle = crate::ops::ship::ship(&root, true, None)?;
    if cycle.code == 0 {
        let line = format!(
            "reprotect: {} is this store's replica now; what it held is point {} (diverged)",
            old.display(),
            diverged.id
        );
        crate::ops::failover::log(&sd, "promoted", "promoted", &line);
        crate::ops::failover::log(&StateDir::new(&old), "primary", "demoted", &line);
    }
    Ok(Reprotected {
        store: root,
        old,
        diverged,
        cycle,
    })
}

/// Keeps what the old primary holds as a `diverged` point and makes it a replica of
/// `new` (at `root`).
fn demote(osd: &StateDir, ocfg: &Config, new: &Config, root: &Path) -> Result<PointInfo> {
    let generation = CycleState::load(osd)?.generation.unwrap_or(0) + 1;
    let m = {
        let _lock = run::lock(osd)?;
        let t = Tracker::start(osd.clone(), ocfg.clone(), Path::new("(drfs reprotect)"))?;
        let cut = t.cut(false, true, &mut |_, _| {})?;
        let m = Manifest {
            version: POINT_VERSION,
            generation,
            cut_id: new_id(),
            time: crate::model::fmt::rfc3339_ns(i128::from(cut.time_ns)),
            time_ns: cut.time_ns,
            consistency: crate::model::Consistency::Crash,
            block_size: ocfg.block_size,
            groups: cut.groups.clone(),
            entries: cut.entries.clone(),
            origin: Some(Origin::Diverged {
                store: ocfg.store_id.clone(),
            }),
        };
        t.end_cycle(&cut, false)?;
        t.close()?;
        m
    };
    let info = adopt::adopt(osd, &m, Index::Compute)?;
    crate::sys::fault::hit("reprotect:adopted");
    let mut c = osd.config()?;
    let keep = c.replication.as_ref().map(|x| x.keep.clone());
    c.role = Role::Replica;
    c.source = Some(new.store_id.clone());
    c.keep = keep.or(c.keep);
    c.replication = None;
    c.locked = None;
    c.promoted = None;
    c.lineage.push(epoch(
        Why::Demoted,
        Some(&root.display().to_string()),
        Some(&info.id),
    ));
    osd.write_config(&c)?;
    let cs = osd.path("cycle.json");
    if cs.exists() {
        let _ = std::fs::remove_file(&cs);
    }
    Ok(info)
}
