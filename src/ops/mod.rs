//! What the command line calls: each command that does more than one library call is a
//! function here, returning what happened (the CLI prints it). `assess`, `mount` (and `unmount`),
//! `protect`, `ship`, `receive`, `status`, `events`, `metrics`, `browse`, `test_failover`, `verify`.

pub mod assess;
pub mod browse;
pub mod events;
pub mod failover;
pub mod metrics;
pub mod mount;
pub mod protect;
pub mod receive;
pub mod reprotect;
pub mod ship;
pub mod status;
pub mod test_failover;
pub mod verify;

use std::path::{Path, PathBuf};

use crate::error::{At, Error, Result};
use crate::replica::posix::Replica;
use crate::state::StateDir;

/// Checks that a mountpoint is usable and outside the replica.
fn outside(r: &Replica, p: &Path, what: &str) -> Result<PathBuf> {
    let mnt = crate::fuse::daemon::mountpoint(p)?;
    not_inside(r, &mnt, what)?;
    Ok(mnt)
}

/// Refuses an absolute path inside the replica.
fn not_inside(r: &Replica, abs: &Path, what: &str) -> Result<()> {
    if abs.starts_with(&r.root) {
        return Err(Error::Invalid(format!(
            "{what} {} is inside the replica {}",
            abs.display(),
            r.root.display()
        )));
    }
    Ok(())
}

/// Tells the store's daemon that its settings changed, with `line` for its log; with no
/// daemon running, the line goes straight into the log. Whether a daemon answered.
pub fn note(sd: &StateDir, store_id: &str, line: &str) -> Result<bool> {
    let req = crate::daemon::control::Request::Note {
        line: line.to_string(),
    };
    if crate::daemon::control::call(store_id, &req)?.is_some() {
        return Ok(true);
    }
    use std::io::Write;
    let p = crate::daemon::log_path(sd);
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&p)
        .at(&p)?;
    writeln!(f, "{} drfs: {line}", crate::model::fmt::rfc3339_now()).at(&p)?;
    Ok(false)
}
