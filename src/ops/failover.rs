//! `drfs failover`: the replica becomes the primary.
//!
//! - **Unplanned** (`drfs failover REPLICA [--point ID]`, where the replica is, the
//!   primary gone): the latest files are rolled back in place to the chosen point (none
//!   to roll back for the newest) through the undo records (`replica::posix::rollback`),
//!   the tracking is seeded so the files keep their ids and nothing is dirty
//!   (`primary::track::seed`), and `state.toml` makes it a primary with a `promoted`
//!   record and a new epoch. Until `--commit` it may be run again with another point;
//!   if the promoted store was mounted meanwhile, what its VMs wrote becomes a
//!   `diverged` point first (`replica::posix::diverge`, from the copies its mounts kept:
//!   `primary::track::history`).
//! - **Planned** (`drfs failover STORE --planned`, on the healthy primary): the store
//!   is locked (a mounted one turns read-only through its daemon, refused while files
//!   are open for writing; `drfs mount` refuses a locked store), a final cycle ships,
//!   the replica's latest point is checked to be the store's state, the replica is
//!   promoted with replication back to the old primary, the old primary's mount ends,
//!   and it becomes its replica with the same point (`replica::posix::adopt`): the next
//!   cycle ships only new writes.
//!
//! Crash safety: each step is idempotent and the switch of each side is one atomic
//! `state.toml` write, in the order lock old, promote new, demote old; running the same
//! command again after a crash at any step completes it. A locked primary is never
//! mounted writable, and a promoted replica refuses every cycle (`Replica::refuse_if_promoted`):
//! there are never two primaries that both accept cycles.

pub mod remote;

use std::fs::File;
use std::path::{Path, PathBuf};

use crate::daemon::control;
use crate::error::{At, Error, Result};
use crate::model::fmt::rfc3339_now;
use crate::model::lineage::{Promotion, Why};
use crate::model::{Manifest, PointInfo, Target};
use crate::primary::cycle::CycleState;
use crate::primary::track::{self, seed};
use crate::replica::posix::Replica;
use crate::replica::posix::adopt::{self, Index};
use crate::replica::posix::{diverge, rollback};
use crate::state::{Replication, Role, StateDir, epoch};
use crate::sys;

/// What a failover did.
#[derive(Debug, Clone)]
pub struct FailedOver {
    /// The store that is the primary now.
    pub store: PathBuf,
    /// The point its files are.
    pub point: String,
    /// The latest point of its history (for a roll-back, the new point holding the
    /// chosen point's content).
    pub latest: PointInfo,
    /// Blocks and bytes rewritten by a roll-back (none: nothing to roll back).
    pub rolled: Option<(u64, u64)>,
    /// What the VMs wrote since the store was mounted, kept as a point before the change.
    pub kept: Option<PointInfo>,
    /// A planned failover: the old primary, now its replica.
    pub demoted: Option<PathBuf>,
    pub committed: bool,
    /// The command had already completed: nothing was done.
    pub already: bool,
}

fn canonical(p: &Path, what: &str) -> Result<PathBuf> {
    p.canonicalize()
        .map_err(|e| Error::Invalid(format!("{what} {}: {e}", p.display())))
}

/// The lock `drfs receive` takes on a replica: no cycle applies meanwhile.
fn receive_lock(root: &Path) -> Result<File> {
    let dir = File::open(root).at(root)?;
    sys::flock(&dir, libc::LOCK_EX).at(root)?;
    Ok(dir)
}

/// Refuses while a drfs filesystem of `root` is mounted.
fn not_mounted(root: &Path, what: &str) -> Result<()> {
    if let Some(m) = crate::fuse::mountinfo::of_store(root).first() {
        return Err(Error::operator(format!(
            "{} is mounted at {}: {what}",
            root.display(),
            m.mountpoint.display()
        )));
    }
    Ok(())
}

/// Refuses while a test failover of the replica runs.
fn no_test_failover(r: &Replica) -> Result<()> {
    if let Some(t) = crate::mounts::test_failover::running(r) {
        return Err(Error::operator(format!(
            "a test failover of {} is running at {}; stop it first (`drfs test-failover --stop {}`)",
            r.root.display(),
            t.at.display(),
            r.root.display()
        )));
    }
    Ok(())
}

/// The point `want` names (a roll-back's point stands for the one it restores), or the
/// newest cut: the latest point before any failover.
fn chosen(r: &Replica, want: Option<&str>) -> Result<PointInfo> {
    let points = r.points()?;
    let by_id = |id: &str| points.iter().find(|p| p.id == id).cloned();
    let id = match want {
        Some(w) => w.to_string(),
        None => match &r.cfg.promoted {
            Some(p) => p.latest_before.clone(),
            None => r
                .latest()?
                .map(|p| p.id)
                .ok_or_else(|| Error::Invalid(format!("{} has no point yet", r.root.display())))?,
        },
    };
    let p = by_id(&id).ok_or_else(|| {
        Error::Invalid(format!(
            "no point {id} on {}; `drfs points {}` lists them",
            r.root.display(),
            r.root.display()
        ))
    })?;
    match &p.restores {
        Some(orig) => by_id(orig).ok_or_else(|| {
            Error::Invalid(format!(
                "point {id} restores point {orig}, which is no longer on {}",
                r.root.display()
            ))
        }),
        None => Ok(p),
    }
}

/// `drfs failover REPLICA [--point ID]`.
pub fn unplanned(root: &Path, point: Option<&str>) -> Result<FailedOver> {
    let root = canonical(root, "replica")?;
    let _lock = receive_lock(&root)?;
    let r = Replica::open(&root)?;
    if let Some(p) = &r.cfg.promoted {
        if p.committed {
            return Err(Error::operator(format!(
                "the failover of {} to point {} was committed; the point can no longer be changed",
                root.display(),
                p.point
            )));
        }
    }
    not_mounted(&root, "unmount it before changing its point")?;
    no_test_failover(&r)?;
    let target = chosen(&r, point)?;
    let mut latest = r
        .latest()?
        .ok_or_else(|| Error::Invalid(format!("{} has no point yet", root.display())))?;
    // Mounted since the promotion (or a change of point that kept its writes began):
    // what its VMs wrote becomes a point first.
    let written = r.cfg.promoted.is_some()
        && (track::run::info(&r.sd).is_some()
            || diverge::Plan::load(&diverge::dir(&r.sd))?.is_some());
    let kept = if written {
        let d = keep_diverged(&r, &latest)?;
        latest = r
            .latest()?
            .ok_or_else(|| Error::Invalid(format!("{} has no point", root.display())))?;
        Some(d)
    } else {
        None
    };
    let at_target = latest.id == target.id || latest.restores.as_deref() == Some(&target.id);
    if at_target
        && r.cfg
            .promoted
            .as_ref()
            .is_some_and(|p| p.point == target.id)
    {
        diverge::finish(&r.sd)?;
        return Ok(FailedOver {
            store: root.clone(),
            point: target.id,
            latest,
            rolled: None,
            kept: None,
            demoted: None,
            committed: false,
            already: true,
        });
    }
    let before = latest_before(&r, &latest);
    let (latest, rolled) = if at_target {
        (latest, None)
    } else {
        let done = rollback::roll_back(&r, &target)?;
        crate::sys::fault::hit("failover:rolled-back");
        (done.point, Some((done.blocks, done.bytes)))
    };
    promote(&r, &target, &latest, &before, false)?;
    diverge::finish(&r.sd)?;
    let line = match rolled {
        Some((_, bytes)) => format!(
            "failover: promoted to a primary at point {} (rolled back in place from point {}: {} rewritten)",
            target.id,
            before,
            crate::model::fmt::human(bytes)
        ),
        None => format!("failover: promoted to a primary at point {}", target.id),
    };
    let line = match &kept {
        Some(d) => format!(
            "{line}; what its VMs wrote is kept as point {} (diverged)",
            d.id
        ),
        None => line,
    };
    let old = if r.cfg.promoted.is_some() {
        "promoted"
    } else {
        "replica"
    };
    log(&r.sd, old, "promoted", &line);
    Ok(FailedOver {
        store: root,
        point: target.id,
        latest,
        rolled,
        kept,
        demoted: None,
        committed: false,
        already: false,
    })
}

/// What the VMs of a promoted store wrote since it was mounted becomes a point of its own
/// (`diverged`), from the copies its mounts kept of the latest point (`latest`), before
/// the point changes. Completes a change an earlier run began.
fn keep_diverged(r: &Replica, latest: &PointInfo) -> Result<PointInfo> {
    let dir = diverge::dir(&r.sd);
    let plan = match diverge::Plan::load(&dir)? {
        Some(p) => p,
        None => {
            if diverge::kept_point(&dir)?.as_deref() != Some(&latest.id) {
                return Err(Error::operator(format!(
                    "{} was mounted since its failover without keeping point {} (by a drfs that did not keep it, or the store was changed while unmounted): a change of point would lose what its VMs wrote; keep it, or `drfs failover {} --commit`",
                    r.root.display(),
                    latest.id,
                    r.root.display()
                )));
            }
            let shipped = CycleState::load(&r.sd)?.point;
            if shipped.as_ref().is_some_and(|p| *p != latest.id) {
                return Err(Error::operator(format!(
                    "{} has shipped cycles since its failover (its replica holds point {}): its point can no longer change; `drfs failover {} --commit`",
                    r.root.display(),
                    shipped.unwrap_or_default(),
                    r.root.display()
                )));
            }
            let plan = cut_as_is(r, latest)?;
            plan.save(&dir)?;
            plan
        }
    };
    crate::sys::fault::hit("diverge:planned");
    diverge::keep(r, plan)
}

/// A cut of the promoted store's files as they are, and the blocks its tracking saw
/// change since the promotion.
fn cut_as_is(r: &Replica, latest: &PointInfo) -> Result<diverge::Plan> {
    let cfg = r.sd.config()?;
    let _lock = track::run::lock(&r.sd)?;
    let t = track::Tracker::start(r.sd.clone(), cfg.clone(), Path::new("(drfs failover)"))?;
    let cut = t.cut(false, false, &mut |_, _| {})?;
    let changed = cut
        .files
        .iter()
        .map(|f| {
            let runs = if f.resync {
                vec![[0, u64::MAX]]
            } else {
                f.ft.frozen_ranges()
                    .into_iter()
                    .map(|(a, b)| [a, b])
                    .collect()
            };
            (f.id, runs)
        })
        .collect();
    let manifest = crate::model::Manifest {
        version: crate::model::manifest::POINT_VERSION,
        generation: latest.generation + 1,
        cut_id: crate::model::new_id(),
        time: crate::model::fmt::rfc3339_ns(i128::from(cut.time_ns)),
        time_ns: cut.time_ns,
        consistency: crate::model::Consistency::Crash,
        block_size: cfg.block_size,
        groups: cut.groups.clone(),
        entries: cut.entries.clone(),
        origin: Some(crate::model::Origin::Diverged {
            store: cfg.store_id.clone(),
        }),
    };
    t.end_cycle(&cut, false)?;
    t.close()?;
    Ok(diverge::Plan {
        version: diverge::VERSION,
        point: latest.id.clone(),
        manifest,
        changed,
        undone: false,
    })
}

/// The newest cut before any failover (`latest`, the first time).
fn latest_before(r: &Replica, latest: &PointInfo) -> String {
    r.cfg
        .promoted
        .as_ref()
        .map_or_else(|| latest.id.clone(), |p| p.latest_before.clone())
}

/// Makes the replica `r` (its files at point `at`, its latest point `latest`) a primary;
/// `before` was its latest point when the first failover began.
fn promote(
    r: &Replica,
    at: &PointInfo,
    latest: &PointInfo,
    before: &str,
    planned: bool,
) -> Result<()> {
    let m = r.manifest(&latest.id)?;
    seed::seed(&r.sd, &adopt::files_of(&m))?;
    crate::sys::fault::hit("failover:seeded");
    let mut cfg = r.sd.config()?;
    let why = if cfg.promoted.is_some() {
        Why::RolledBack
    } else {
        Why::Promoted
    };
    let from = cfg.source.clone().unwrap_or_default();
    cfg.lineage.push(epoch(why, Some(&from), Some(&at.id)));
    cfg.promoted = Some(Promotion {
        from,
        time: rfc3339_now(),
        time_ns: sys::now_ns() as i64,
        point: at.id.clone(),
        latest_before: before.to_string(),
        planned,
        committed: planned,
    });
    cfg.role = Role::Primary;
    continue_onward(r, latest)?;
    r.sd.write_config(&cfg)?;
    // Readers of its points (browse, test failover) look its latest files up again, as
    // live ones: a mount may write them from now on.
    r.set_applying(true)?;
    r.set_applying(false)
}

/// A replica that shipped onward (A → B → C) and is promoted at the point C holds goes
/// on replicating to C as a primary: its cycles build on that point.
fn continue_onward(r: &Replica, latest: &PointInfo) -> Result<()> {
    let relay = crate::replica::posix::relay::RelayState::load(r)?;
    if let Some(held) = relay.point.as_deref().filter(|p| *p != latest.id) {
        tracing::warn!(
            "the onward replica holds point {held}, not {}: its next cycle needs `drfs ship --resync`",
            latest.id
        );
        return Ok(());
    }
    let (Some(id), Some(generation)) = (relay.replica_id, relay.generation) else {
        return Ok(());
    };
    CycleState {
        version: crate::primary::cycle::STATE_VERSION,
        replica_id: Some(id),
        generation: Some(generation),
        point: Some(latest.id.clone()),
        point_time_ns: Some(latest.time_ns),
        ..Default::default()
    }
    .save(&r.sd)
}

/// `drfs failover STORE --commit`: the point can no longer be changed.
pub fn commit(store: &Path) -> Result<FailedOver> {
    let root = canonical(store, "store")?;
    let _lock = receive_lock(&root)?;
    let r = Replica::open(&root)?;
    let Some(p) = r.cfg.promoted.clone() else {
        return Err(Error::Invalid(format!(
            "{} is a replica that was not failed over: nothing to commit (`drfs failover {}` first)",
            root.display(),
            root.display()
        )));
    };
    let latest = r
        .latest()?
        .ok_or_else(|| Error::Invalid(format!("{} has no point", root.display())))?;
    if p.committed {
        return Ok(FailedOver {
            store: root,
            point: p.point,
            latest,
            rolled: None,
            kept: None,
            demoted: None,
            committed: true,
            already: true,
        });
    }
    let hist = diverge::dir(&r.sd);
    if diverge::Plan::load(&hist)?.is_some() {
        return Err(Error::operator(format!(
            "a change of {}'s point was interrupted: run `drfs failover {} --point ID` again to finish it before committing",
            root.display(),
            root.display()
        )));
    }
    let mut cfg = r.cfg.clone();
    if let Some(q) = cfg.promoted.as_mut() {
        q.committed = true;
    }
    r.sd.write_config(&cfg)?;
    // The copies that kept the point readable are done with; a running mount keeps
    // using its own until it ends (the next mount removes them).
    if mounted_at(&root).is_none() && hist.exists() {
        std::fs::remove_dir_all(&hist).at(&hist)?;
    }
    log(
        &r.sd,
        "promoted",
        "promoted (committed)",
        &format!("failover: committed at point {}", p.point),
    );
    Ok(FailedOver {
        store: root,
        point: p.point,
        latest,
        rolled: None,
        kept: None,
        demoted: None,
        committed: true,
        already: false,
    })
}

/// One line in the daemon log (`DIR/.drfs/daemon.log`) and an event in the history:
/// the role went from `old` to `new`.
pub(crate) fn log(sd: &StateDir, old: &str, new: &str, line: &str) {
    if let Ok(cfg) = sd.config() {
        let _ = crate::ops::note(sd, &cfg.store_id, line);
    }
    crate::events::record(
        sd,
        crate::events::Event::new(sd, crate::events::Kind::Failover, new, line).old(old),
    );
}

/// The planned failover's line on the new primary: promoted, from `from` at `point`.
fn log_promoted(sd: &StateDir, from: &str, point: &str) {
    let line = format!(
        "failover: planned failover from {from} at point {point}; it is now this store's replica"
    );
    log(sd, "replica", "promoted", &line);
}

/// The planned failover's line on the old primary: demoted, the replica of `to`.
fn log_demoted(sd: &StateDir, to: &str, point: &str) {
    let line = format!(
        "failover: planned failover to {to} at point {point}; this store is its replica now"
    );
    log(sd, "primary", "demoted", &line);
}

/// `drfs failover STORE --planned [--reverse-to URL]`: `back` is how a replica on
/// another host reaches this store (needed for it, refused for a local one).
pub fn planned(store: &Path, back: Option<&str>) -> Result<FailedOver> {
    let root = canonical(store, "store")?;
    let (sd, cfg) = StateDir::open(&root)?;
    if cfg.role == Role::Replica {
        return already_demoted(&root, &cfg);
    }
    let rep = cfg.replication.clone().ok_or_else(|| {
        Error::operator(format!(
            "{} is not protected: a planned failover needs a replica (`drfs protect`)",
            root.display()
        ))
    })?;
    let replica = match (&rep.target, back) {
        (Target::Local(replica), None) => canonical(replica, "replica")?,
        (Target::Local(_), Some(_)) => {
            return Err(Error::Invalid(format!(
                "--reverse-to is for a replica on another host; {} is a local directory, and replicates back to {} itself",
                rep.target,
                root.display()
            )));
        }
        (Target::Ssh { .. }, back) => return remote::planned(&root, &sd, &cfg, &rep, back),
        (Target::S3 { .. }, _) => {
            return Err(Error::Invalid(rep.target.local().err().unwrap_or_default()));
        }
    };
    let at = replica.display().to_string();
    match mounted_at(&root) {
        Some(mnt) => lock_mounted(&cfg.store_id, &at, &mnt)?,
        None => lock(&sd, &at)?,
    }
    crate::sys::fault::hit("planned:locked");
    let promoted_from_us = Replica::open_only(&replica)
        .ok()
        .and_then(|r| r.cfg.promoted.clone())
        .is_some_and(|p| p.planned_by(&cfg.store_id));
    if !promoted_from_us {
        final_cycle(&sd, &root)?;
        crate::sys::fault::hit("planned:shipped");
        let r = Replica::open(&replica)?;
        check_equal(&sd, &r)?;
        let latest = r
            .latest()?
            .ok_or_else(|| Error::Invalid(format!("{} has no point", replica.display())))?;
        {
            let _lock = receive_lock(&replica)?;
            promote(&r, &latest, &latest, &latest.id, true)?;
        }
        crate::sys::fault::hit("planned:promoted");
    }
    let r = Replica::open(&replica)?;
    let latest = r
        .latest()?
        .ok_or_else(|| Error::Invalid(format!("{} has no point", replica.display())))?;
    let old_id = cfg.store_id.clone();
    reverse(
        &r,
        back_of(&rep, Target::Local(root.clone()), old_id),
        &latest,
    )?;
    crate::sys::fault::hit("planned:reversed");
    if let Some(mnt) = mounted_at(&root) {
        retire(&root, &at, &mnt)?;
        crate::sys::fault::hit("planned:unmounted");
    }
    let m = r.manifest(&latest.id)?;
    demote(&sd, &r.cfg.store_id, &at, &m, Index::CopyFrom(&r))?;
    log_promoted(&r.sd, &root.display().to_string(), &latest.id);
    log_demoted(&sd, &at, &latest.id);
    Ok(FailedOver {
        store: replica,
        point: latest.id.clone(),
        latest,
        rolled: None,
        kept: None,
        demoted: Some(root),
        committed: true,
        already: false,
    })
}

/// A store already demoted by a planned failover: the command completed before.
fn already_demoted(root: &Path, cfg: &crate::state::Config) -> Result<FailedOver> {
    let demoted = cfg
        .lineage
        .last()
        .filter(|e| e.why == Why::Demoted)
        .ok_or_else(|| {
            Error::Invalid(format!(
                "{} is a replica: run a planned failover on its primary",
                root.display()
            ))
        })?;
    let r = Replica::open_only(root)?;
    let latest = r
        .latest()?
        .ok_or_else(|| Error::Invalid(format!("{} has no point", root.display())))?;
    Ok(FailedOver {
        store: PathBuf::from(demoted.peer.clone().unwrap_or_default()),
        point: latest.id.clone(),
        latest,
        rolled: None,
        kept: None,
        demoted: Some(root.to_path_buf()),
        committed: true,
        already: true,
    })
}

/// Locks the store against mounts for the failover to `replica`.
fn lock(sd: &StateDir, replica: &str) -> Result<()> {
    sd.set_locked(Some(replica))
}

/// Unlocks the store, and its daemon if it is mounted.
fn unlock(sd: &StateDir) -> Result<()> {
    if let Ok(cfg) = sd.config() {
        // No daemon answers when it is not mounted.
        let _ = control::call(&cfg.store_id, &control::Request::Unlock);
    }
    sd.set_locked(None)
}

/// Where the store's tracked mount is, if it is mounted.
fn mounted_at(root: &Path) -> Option<PathBuf> {
    crate::fuse::mountinfo::of_store(root)
        .first()
        .map(|m| m.mountpoint.clone())
}

/// Turns the mounted store read-only through its daemon, which records the lock; refused
/// while files are open for writing through the mount (nothing changes then).
fn lock_mounted(store_id: &str, replica: &str, mnt: &Path) -> Result<()> {
    let req = control::Request::Lock {
        replica: replica.to_string(),
    };
    let Some(v) = control::call(store_id, &req)? else {
        return Err(Error::Busy(format!(
            "the store is mounted at {} but its daemon does not answer; unmount it (`drfs unmount`) and run the command again",
            mnt.display()
        )));
    };
    let reply: control::LockReply = serde_json::from_value(v)
        .map_err(|e| Error::Invalid(format!("the daemon's answer: {e}")))?;
    if !reply.open_writers.is_empty() {
        return Err(Error::operator(format!(
            "files are open for writing through the mount at {}: {}; stop the VMs using them and run the command again (nothing was changed)",
            mnt.display(),
            reply.open_writers.join(", ")
        )));
    }
    match (reply.locked, reply.error) {
        (true, _) => Ok(()),
        (false, e) => Err(Error::Invalid(format!(
            "the daemon did not lock the store: {}",
            e.unwrap_or_else(|| "no reason given".into())
        ))),
    }
}

/// The replica is the primary now: the old primary's read-only mount ends (its daemon
/// records a clean stop) before the store becomes the replica.
fn retire(root: &Path, replica: &str, mnt: &Path) -> Result<()> {
    crate::ops::mount::unmount(mnt, false).map_err(|e| match e {
        Error::Busy(why) => Error::Busy(format!(
            "{replica} is the primary now, but the old primary's read-only mount at {} cannot end yet ({why}); close what is open there and run `drfs failover {} --planned` again to finish",
            mnt.display(),
            root.display()
        )),
        e => e,
    })
}

/// Ships what is left; a failure unlocks the store again (nothing changed anywhere).
fn final_cycle(sd: &StateDir, root: &Path) -> Result<()> {
    let reply = crate::ops::ship::ship(root, false, None)?;
    if reply.code != 0 {
        unlock(sd)?;
        return Err(Error::Refused {
            message: format!(
                "the final cycle failed, so nothing was failed over (the store is unlocked): {}",
                reply.message
            ),
            class: crate::error::Class::from_exit_code(Some(reply.code)),
        });
    }
    Ok(())
}

/// Zero data loss: nothing is left unshipped, and the replica's latest point is the
/// point this store last shipped.
fn check_equal(sd: &StateDir, r: &Replica) -> Result<()> {
    let st = CycleState::load(sd)?;
    let latest = r.latest()?;
    if latest.as_ref().map(|p| &p.id) != st.point.as_ref() {
        return Err(Error::operator(format!(
            "the replica's latest point ({}) is not the one this store last shipped ({}); nothing was failed over",
            latest.map_or("none".into(), |p| p.id),
            st.point.unwrap_or_else(|| "none".into())
        )));
    }
    all_shipped(sd)
}

/// Nothing of the store is left unshipped (a failure unlocks it).
fn all_shipped(sd: &StateDir) -> Result<()> {
    let cfg = sd.config()?;
    let table = track::load_table(sd)?;
    for f in table.entries() {
        let dirty = track::bitmap_ranges(sd, cfg.block_size, f.id)?;
        if !dirty.is_empty() || f.needs_resync {
            let path = f.paths.first().map_or(String::new(), |p| p.to_string());
            unlock(sd)?;
            return Err(Error::operator(format!(
                "{path} still has changes the final cycle did not ship; nothing was failed over"
            )));
        }
    }
    Ok(())
}

/// The replication back to the old primary (`old`, id `old_id`): the old settings.
fn back_of(rep: &Replication, old: Target, old_id: String) -> Replication {
    Replication {
        target: old,
        interval: rep.interval,
        keep: rep.keep.clone(),
        group: rep.group,
        replica_id: old_id,
        expect_every: rep.expect_every,
        paused: None,
        // The same VMs run there: the same freeze and thaw.
        hooks: rep.hooks.clone(),
        ssh_command: rep.ssh_command.clone(),
        compress: rep.compress,
        bwlimit: rep.bwlimit.clone(),
    }
}

/// The promoted replica replicates back to the old primary as `back` says, from the
/// point they share.
fn reverse(r: &Replica, back: Replication, latest: &PointInfo) -> Result<()> {
    let old_id = back.replica_id.clone();
    let mut cfg = r.sd.config()?;
    cfg.replication = Some(back);
    let st = CycleState {
        version: crate::primary::cycle::STATE_VERSION,
        replica_id: Some(old_id),
        generation: Some(latest.generation),
        point: Some(latest.id.clone()),
        point_time_ns: Some(latest.time_ns),
        ..Default::default()
    };
    st.save(&r.sd)?;
    r.sd.write_config(&cfg)
}

/// The old primary becomes the replica of the store `new_id` (at `peer`), at its point
/// `m`, whose hash index `index` gives.
fn demote(
    sd: &StateDir,
    new_id: &str,
    peer: &str,
    m: &Manifest,
    index: Index<'_>,
) -> Result<PointInfo> {
    let info = adopt::adopt(sd, m, index)?;
    crate::sys::fault::hit("planned:adopted");
    let mut cfg = sd.config()?;
    let keep = cfg.replication.as_ref().map(|x| x.keep.clone());
    let cs = sd.path("cycle.json");
    if cs.exists() {
        std::fs::remove_file(&cs).at(&cs)?;
    }
    cfg.role = Role::Replica;
    cfg.source = Some(new_id.to_string());
    cfg.keep = keep.or(cfg.keep);
    cfg.replication = None;
    cfg.locked = None;
    cfg.promoted = None;
    cfg.lineage
        .push(epoch(Why::Demoted, Some(peer), Some(&info.id)));
    sd.write_config(&cfg)?;
    Ok(info)
}
