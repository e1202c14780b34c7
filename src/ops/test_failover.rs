//! `drfs test-failover`: starts a writable clone of a point in a background daemon (after
//! checking everything it needs, so nothing is made for a start that cannot work), or
//! stops the running one and discards it.

use std::path::{Path, PathBuf};

use crate::error::{At, Error, Result};
use crate::fuse::daemon;
use crate::mounts::test_failover::{self as tf, Running};
use crate::ops::{not_inside, outside};
use crate::replica::posix::Replica;

/// Stops the running test failover of `replica` and discards its writes.
pub fn stop(replica: &Path) -> Result<Running> {
    tf::stop(&Replica::open_only(replica)?)
}

/// Starts a test failover of `point` at `at`; returns the mountpoint once it serves.
pub fn start(
    replica: &Path,
    point: &str,
    at: &Path,
    allow_other: bool,
    foreground: bool,
) -> Result<PathBuf> {
    let r = Replica::open_only(replica)?;
    if foreground {
        let at = daemon::absolute(at)?;
        tf::serve(&r.root, point, &at, allow_other, daemon::Ready::from_env())?;
        return Ok(at);
    }
    // Check everything before making anything.
    crate::points::view::PointView::open(std::sync::Arc::new(Replica::open_only(&r.root)?), point)?;
    // Before anything is created there (`outside` checks again once it exists).
    not_inside(&r, &daemon::resolved(at)?, "--at")?;
    if let Some(s) = tf::running(&r) {
        return Err(Error::Busy(format!(
            "a test failover of {} is already running at {} (point {}); stop it with `drfs test-failover {} --stop`",
            r.root.display(),
            s.at.display(),
            s.point,
            r.root.display()
        )));
    }
    drop(tf::lock(&r)?);
    if !at.exists() {
        std::fs::create_dir_all(at).at(at)?;
    }
    let at = outside(&r, at, "--at")?;
    let mut args: Vec<std::ffi::OsString> = vec![
        "test-failover".into(),
        "--foreground".into(),
        r.root.clone().into(),
        "--point".into(),
        point.into(),
        "--at".into(),
        at.clone().into(),
    ];
    if allow_other {
        args.push("--allow-other".into());
    }
    daemon::spawn(&args, &tf::log_path(&r))?;
    Ok(at)
}
