//! What the command line calls: each command that does more than one library call is a
//! function here, returning what happened (the CLI prints it). `mount` (and `unmount`),
//! `protect`, `ship`, `receive`, `status`, `browse`, `test_failover`.

pub mod browse;
pub mod mount;
pub mod protect;
pub mod receive;
pub mod ship;
pub mod status;
pub mod test_failover;

use std::path::{Path, PathBuf};

use crate::error::{Error, Result};
use crate::replica::posix::Replica;

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
