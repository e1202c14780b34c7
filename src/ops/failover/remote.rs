//! A planned failover to a replica on another host, over the stream protocol. The
//! sender's half (`planned`): lock the store, ship a final cycle, open a planned session
//! (`ship::session::planned_session`), have the replica promoted at the point just
//! shipped, end the store's mount, and demote it with the promoted point's manifest and
//! hash index fetched over the same session (hashes travel, not data). The receiver's
//! half (`promote_planned`) runs in `drfs receive` with the receive lock held. For the
//! replication back only settings travel (`wire::Reverse`): the new primary's ssh
//! command and hooks are set there with `drfs protect`.
//!
//! Crash safety as for a local one: the replica's switch is one `state.toml` write on
//! its host, the store's another here, in the order lock, promote, demote. Run again on
//! the locked store, the command asks first, finds the replica promoted by this store
//! (the planned session's welcome says at which point) and completes. The store is unlocked again only on a failure
//! before the promotion was asked for.

use std::path::{Path, PathBuf};

use super::{
    FailedOver, all_shipped, demote, final_cycle, lock, lock_mounted, log_demoted, log_promoted,
    mounted_at, promote, retire, reverse, unlock,
};
use crate::error::{Error, Result};
use crate::model::retention::Policy;
use crate::model::{Manifest, PointRef, Target};
use crate::primary::cycle::CycleState;
use crate::replica::posix::Replica;
use crate::replica::posix::adopt::Index;
use crate::ship::session::{self, Hello};
use crate::state::{Config, Replication, StateDir};
use crate::transport;
use crate::wire::Reverse;

/// `drfs failover STORE --planned --reverse-to BACK` for a store whose replica is on
/// another host.
pub(super) fn planned(
    root: &Path,
    sd: &StateDir,
    cfg: &Config,
    rep: &Replication,
    back: Option<&str>,
) -> Result<FailedOver> {
    let back = back_target(&rep.target, back)?;
    let at = rep.target.to_string();
    // The promotion comes after the lock, which stays until the demotion: a store this
    // command had not locked yet cannot have had its replica promoted by it, so only a
    // run that finds it locked asks first (one ssh session fewer on the usual path).
    let resumed = cfg.locked.is_some();
    match mounted_at(root) {
        Some(mnt) => lock_mounted(&cfg.store_id, &at, &mnt)?,
        None => lock(sd, &at)?,
    }
    crate::sys::fault::hit("planned:locked");
    let o = transport::Options::of(rep);
    let hello = Hello {
        store_id: &cfg.store_id,
        block_size: cfg.block_size,
        keep: &rep.keep,
        seed: false,
    };
    let open = || session::planned_session(&rep.target, &o, &hello);
    let mut earlier = None;
    if resumed {
        let (link, w) = open().map_err(|e| unlocked(sd, e))?;
        match w.promoted {
            Some(p) => earlier = Some((link, w.replica_id, p)),
            None => session::bye(link),
        }
    }
    let (mut link, new_id, point) = match earlier {
        Some(x) => x,
        None => {
            final_cycle(sd, root)?;
            crate::sys::fault::hit("planned:shipped");
            all_shipped(sd)?;
            let shipped = CycleState::load(sd)?.point;
            let (link, w) = open().map_err(|e| unlocked(sd, e))?;
            let latest = w.latest.map(|p| p.id);
            match (w.promoted, shipped) {
                (Some(p), _) => (link, w.replica_id, p),
                (None, Some(p)) if latest.as_ref() == Some(&p) => (link, w.replica_id, p),
                (None, shipped) => {
                    session::bye(link);
                    return Err(unlocked(
                        sd,
                        Error::operator(format!(
                            "the replica's latest point ({}) is not the one this store last shipped ({}); nothing was failed over",
                            latest.unwrap_or_else(|| "none".into()),
                            shipped.unwrap_or_else(|| "none".into())
                        )),
                    ));
                }
            }
        }
    };
    let reverse = Reverse {
        target: back.to_string(),
        replica_id: cfg.store_id.clone(),
        interval: rep.interval,
        keep: rep.keep.clone(),
        group: rep.group,
        expect_every: rep.expect_every,
        compress: rep.compress,
        bwlimit: rep.bwlimit.clone(),
    };
    let m = match session::promote(&mut link, &point, reverse) {
        Ok((_, m)) => m,
        Err(e) => return Err(link.fail(e)),
    };
    crate::sys::fault::hit("planned:promoted");
    if let Some(mnt) = mounted_at(root) {
        retire(root, &at, &mnt)?;
        crate::sys::fault::hit("planned:unmounted");
    }
    let mut fetch = |id, blocks| session::index(&mut link, id, blocks);
    let info = match demote(sd, &new_id, &at, &m, Index::Fetch(&mut fetch)) {
        Ok(info) => info,
        Err(e) => return Err(link.fail(e)),
    };
    session::bye(link);
    log_demoted(sd, &at, &info.id);
    Ok(FailedOver {
        store: PathBuf::from(&at),
        point: info.id.clone(),
        latest: info,
        rolled: None,
        kept: None,
        demoted: Some(root.to_path_buf()),
        committed: true,
        already: false,
    })
}

/// Where the replica's host reaches this store: an ssh:// URL the operator names.
fn back_target(to: &Target, back: Option<&str>) -> Result<Target> {
    let Some(back) = back else {
        return Err(Error::Invalid(format!(
            "a planned failover to {to} needs --reverse-to ssh://[user@]host[:port]/path: how that host reaches this store, for the replication back (nothing was changed)"
        )));
    };
    match back.parse::<Target>().map_err(Error::Invalid)? {
        t @ Target::Ssh { .. } => Ok(t),
        _ => Err(Error::Invalid(format!(
            "--reverse-to {back}: give the ssh:// URL by which the replica's host reaches this store"
        ))),
    }
}

/// `e`, after unlocking the store (nothing was failed over).
fn unlocked(sd: &StateDir, e: Error) -> Error {
    match unlock(sd) {
        Ok(()) => e,
        Err(u) => Error::Invalid(format!("{e}; and unlocking the store failed: {u}")),
    }
}

/// The receiver's half, for a planned session of the store `from` (with the receive lock
/// held): the replica at `root`, whose latest point must be `point`, becomes the primary
/// and replicates back as `rev` says. Done again after it promoted the replica, it
/// rewrites only the replication back. Returns the point and its manifest.
pub fn promote_planned(
    root: &Path,
    from: &str,
    point: &str,
    rev: &Reverse,
) -> Result<(PointRef, Manifest)> {
    Policy::parse(&rev.keep).map_err(Error::operator)?;
    let target = match rev.target.parse::<Target>() {
        Ok(t @ Target::Ssh { .. }) => t,
        _ => {
            return Err(Error::operator(format!(
                "replication back to {} over the stream must be an ssh:// target",
                rev.target
            )));
        }
    };
    let back = Replication {
        target,
        interval: rev.interval,
        keep: rev.keep.clone(),
        group: rev.group,
        replica_id: rev.replica_id.clone(),
        expect_every: rev.expect_every,
        paused: None,
        hooks: None,
        ssh_command: None,
        compress: rev.compress,
        bwlimit: rev.bwlimit.clone(),
    };
    let r = Replica::open_only(root)?;
    let latest = r
        .latest()?
        .ok_or_else(|| Error::operator(format!("{} has no point", root.display())))?;
    if latest.id != point {
        return Err(Error::operator(format!(
            "{}'s latest point is {}, not {point}, the one its primary last shipped; nothing was failed over",
            root.display(),
            latest.id
        )));
    }
    let fresh = match &r.cfg.promoted {
        None => {
            promote(&r, &latest, &latest, &latest.id, true)?;
            true
        }
        Some(p) if p.planned_by(from) && p.point == point => false,
        Some(_) => {
            r.refuse_if_promoted()?;
            false
        }
    };
    crate::sys::fault::hit("planned:promoted-there");
    let r = Replica::open_only(root)?;
    reverse(&r, back, &latest)?;
    if fresh {
        log_promoted(&r.sd, &rev.target, &latest.id);
    }
    Ok((latest.to_ref(), r.manifest(&latest.id)?))
}
