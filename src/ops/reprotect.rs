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
//! OLD may be on another host (`ssh://`): step 1 is then done by its `drfs receive`, on
//! a hello with `reprotect` (`demote_here`), and only hashes and differing blocks travel.
//!
//! Run again after a crash at any step, it completes: OLD already a replica of STORE
//! skips step 1. It refuses the wrong direction (STORE must be the promoted one) and any
//! OLD that is not the store STORE was promoted from.

use std::path::{Path, PathBuf};

use crate::daemon::control::ShipReply;
use crate::error::{Error, Result};
use crate::model::lineage::Why;
use crate::model::manifest::POINT_VERSION;
use crate::model::{Manifest, Origin, PointInfo, Target};
use crate::ops::protect::{self, Protect};
use crate::primary::cycle::CycleState;
use crate::primary::track::{Tracker, run};
use crate::replica::posix::Replica;
use crate::replica::posix::adopt::{self, Index};
use crate::ship::session::{self, Hello};
use crate::state::{Config, Replication, Role, StateDir, epoch};
use crate::transport;

/// What `drfs reprotect` sets besides the target.
#[derive(Default)]
pub struct Reprotect<'a> {
    pub to: &'a str,
    pub interval: Option<&'a str>,
    pub keep: Option<&'a str>,
    /// The ssh client command for an ssh:// old primary (kept in the settings).
    pub ssh_command: Option<&'a str>,
}

/// What a reprotect did.
pub struct Reprotected {
    pub store: PathBuf,
    /// The old primary: a directory, or an ssh:// URL.
    pub old: String,
    /// The id of the point that keeps what OLD held.
    pub diverged: String,
    /// The first cycle back.
    pub cycle: ShipReply,
}

fn canonical(p: &Path, what: &str) -> Result<PathBuf> {
    p.canonicalize()
        .map_err(|e| Error::Invalid(format!("{what} {}: {e}", p.display())))
}

pub fn reprotect(store: &Path, p: &Reprotect<'_>) -> Result<Reprotected> {
    let target: Target = p.to.parse().map_err(Error::Invalid)?;
    let root = canonical(store, "store")?;
    let (sd, cfg) = StateDir::open(&root)?;
    let Some(prom) = cfg.promoted.clone() else {
        return Err(Error::Invalid(format!(
            "{} was not promoted by a failover: reprotect runs on the new primary, with --to the old one",
            root.display()
        )));
    };
    let (old, diverged, former) = match &target {
        Target::Local(old) => {
            let old = canonical(old, "old primary")?;
            if old == root {
                return Err(Error::Invalid("--to is the store itself".into()));
            }
            let peer = root.display().to_string();
            let (d, former) = demoted(&old, &prom.from, &cfg.store_id, &peer)?;
            (old.display().to_string(), d.id, former)
        }
        Target::Ssh { .. } => {
            let d = remote(&target, p, &cfg, &prom.from)?;
            (target.to_string(), d, None)
        }
        Target::S3 { .. } => {
            return Err(Error::Invalid(target.local().err().unwrap_or_default()));
        }
    };
    crate::sys::fault::hit("reprotect:demoted");
    let interval = former.as_ref().map(|r| r.interval.to_string());
    // Over a link the old settings stay there: the retention this store kept as the
    // replica, and protect's default interval.
    let keep = former.as_ref().map(|r| r.keep.clone()).or(cfg.keep.clone());
    let group = former.as_ref().map(|r| r.group.to_string());
    protect::protect(
        &root,
        &Protect {
            to: Some(p.to),
            interval: p.interval.or(interval.as_deref()),
            keep: p.keep.or(keep.as_deref()),
            group: group.as_deref(),
            rebind: true,
            ssh_command: p.ssh_command,
            ..Default::default()
        },
    )?;
    crate::sys::fault::hit("reprotect:protected");
    let cycle = crate::ops::ship::ship(&root, true, None)?;
    if cycle.code == 0 {
        let line = format!(
            "reprotect: {old} is this store's replica now; what it held is point {diverged} (diverged)"
        );
        crate::ops::failover::log(&sd, "promoted", "promoted", &line);
        if let Target::Local(o) = &target {
            crate::ops::failover::log(&StateDir::new(o), "primary", "demoted", &line);
        }
    }
    Ok(Reprotected {
        store: root,
        old,
        diverged,
        cycle,
    })
}

/// The old primary on another host made this store's replica by its `drfs receive`
/// (`demote_here`): the id of the point that keeps what it held.
fn remote(target: &Target, p: &Reprotect<'_>, cfg: &Config, old_id: &str) -> Result<String> {
    let o = transport::Options {
        ssh_command: p.ssh_command.filter(|c| !c.is_empty()).map(str::to_string),
        compress: transport::default_compress(target),
        bwlimit: None,
    };
    let hello = Hello {
        store_id: &cfg.store_id,
        block_size: cfg.block_size,
        keep: cfg.keep.as_deref().unwrap_or_default(),
        seed: false,
    };
    let w = session::reprotect(target, &o, &hello, old_id)?;
    w.latest.map(|p| p.id).ok_or_else(|| {
        Error::Invalid(format!(
            "{target} was made this store's replica but holds no point"
        ))
    })
}

/// The receiver's half of a reprotect over a link (`drfs receive`, with the receive
/// lock held): the primary at `root`, which must be the store `old_id`, becomes the
/// replica of the store `new_id`, what it holds kept as a `diverged` point. Done again
/// once it is that replica, it does nothing.
pub fn demote_here(root: &Path, old_id: &str, new_id: &str) -> Result<()> {
    let was_primary = StateDir::new(root)
        .config()
        .is_ok_and(|c| c.role == Role::Primary);
    let (d, _) = demoted(root, old_id, new_id, &format!("store {new_id}"))?;
    if was_primary {
        let line = format!(
            "reprotect: this store is the replica of store {new_id} now; what it held is point {} (diverged)",
            d.id
        );
        crate::ops::failover::log(&StateDir::new(root), "primary", "demoted", &line);
    }
    Ok(())
}

/// The old primary at `old` (the store `old_id`) made a replica of `new_id` (at `peer`),
/// or found already made one: the point that keeps what it held, and the replication
/// settings it had.
fn demoted(
    old: &Path,
    old_id: &str,
    new_id: &str,
    peer: &str,
) -> Result<(PointInfo, Option<Replication>)> {
    let osd = StateDir::new(old);
    let ocfg = osd.config().map_err(|_| {
        Error::Invalid(format!(
            "{} is not a drfs store (no .drfs/state.toml): reprotect makes the old primary a replica; for a new, empty replica use `drfs protect STORE --to DIR --rebind`",
            old.display(),
        ))
    })?;
    if let Some(m) = crate::fuse::mountinfo::of_store(old).first() {
        return Err(Error::operator(format!(
            "{} is mounted at {}: stop its VMs and unmount it first",
            old.display(),
            m.mountpoint.display()
        )));
    }
    let former = ocfg.replication.clone();
    let diverged = match ocfg.role {
        Role::Replica if ocfg.source.as_deref() == Some(new_id) => Replica::open(old)?
            .points()?
            .into_iter()
            .rev()
            .find(|x| x.diverged)
            .ok_or_else(|| {
                Error::Invalid(format!(
                    "{} is already a replica of {peer}: `drfs ship` there",
                    old.display(),
                ))
            })?,
        Role::Replica => {
            return Err(Error::operator(format!(
                "{} is a replica of another store ({}), not the old primary of {peer}",
                old.display(),
                ocfg.source.as_deref().unwrap_or("?"),
            )));
        }
        Role::Primary if ocfg.store_id != old_id => {
            return Err(Error::operator(format!(
                "{} is not the store {peer} was promoted from (it replicated {old_id}; {} is {})",
                old.display(),
                old.display(),
                ocfg.store_id
            )));
        }
        Role::Primary => demote(&osd, &ocfg, new_id, peer)?,
    };
    Ok((diverged, former))
}

/// Keeps what the old primary holds as a `diverged` point and makes it a replica of
/// the store `new_id` (at `peer`).
fn demote(osd: &StateDir, ocfg: &Config, new_id: &str, peer: &str) -> Result<PointInfo> {
    let generation = CycleState::load(osd)?.generation.unwrap_or(0) + 1;
    let m = {
        let _lock = run::lock(osd)?;
        let t = Tracker::start(osd.clone(), ocfg.clone(), Path::new("(drfs reprotect)"))?;
        let cut = t.cut(false, true, &mut |_, _| {})?;
        let m = Manifest {
            version: POINT_VERSION,
            generation,
            cut_id: crate::model::new_id(),
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
    c.source = Some(new_id.to_string());
    c.keep = keep.or(c.keep);
    c.replication = None;
    c.locked = None;
    c.promoted = None;
    c.lineage
        .push(epoch(Why::Demoted, Some(peer), Some(&info.id)));
    osd.write_config(&c)?;
    let cs = osd.path("cycle.json");
    if cs.exists() {
        let _ = std::fs::remove_file(&cs);
    }
    Ok(info)
}
