//! `drfs browse`: mounts every point of a replica read-only, in a background daemon (or in
//! this process with `--foreground`).

use std::path::Path;

use crate::error::Result;
use crate::fuse::daemon;
use crate::mounts::browse;
use crate::ops::outside;
use crate::replica::posix::Replica;

/// Starts browsing `replica` at `mountpoint`; returns once the mount serves.
pub fn browse(
    replica: &Path,
    mountpoint: &Path,
    allow_other: bool,
    foreground: bool,
) -> Result<()> {
    let r = Replica::open_only(replica)?;
    if foreground {
        let mnt = daemon::absolute(mountpoint)?;
        return browse::serve(&r.root, &mnt, allow_other, daemon::Ready::from_env());
    }
    let mnt = outside(&r, mountpoint, "mountpoint")?;
    let mut args: Vec<std::ffi::OsString> = vec![
        "browse".into(),
        "--foreground".into(),
        r.root.clone().into(),
        mnt.into(),
    ];
    if allow_other {
        args.push("--allow-other".into());
    }
    daemon::spawn(&args, &browse::log_path(&r))
}
