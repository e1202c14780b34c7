//! `drfs mount` and `drfs unmount`: checking the arguments, replacing a stale mount,
//! starting the store daemon in the background and waiting until it serves (or running
//! it in the foreground, for systemd), and unmounting it and waiting for its clean stop.
//!
//! The daemon is this same binary re-executed with `--foreground` (`fuse::daemon::spawn`);
//! it stops when the filesystem is unmounted (by `drfs unmount`, `fusermount3 -u`,
//! `umount`, or a SIGTERM/SIGINT it turns into a lazy unmount), then flushes the bitmaps,
//! saves the file table and records a clean stop.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use crate::daemon::{self, DaemonOpts, log_path};
use crate::error::{At, Error, Result};
use crate::fuse::daemon::{self as process, Ready};
use crate::primary::passthrough::fs::StoreIo;
use crate::primary::track::run;
use crate::state::StateDir;
use crate::sys;

#[derive(Debug, Clone)]
pub struct MountOpts {
    pub store: PathBuf,
    pub mountpoint: PathBuf,
    pub block_size: Option<u64>,
    pub threads: usize,
    pub allow_other: bool,
    pub foreground: bool,
    pub track: bool,
    /// Serve Prometheus metrics (`GET /metrics`) at this address.
    pub metrics_listen: Option<String>,
    pub store_io: StoreIo,
    pub max_pages: u32,
}

/// Checks the arguments and detaches a stale mount; returns canonical (store, mountpoint).
fn prepare(opts: &MountOpts) -> Result<(PathBuf, PathBuf)> {
    let store = opts
        .store
        .canonicalize()
        .map_err(|e| Error::Invalid(format!("store {}: {e}", opts.store.display())))?;
    if !store.is_dir() {
        return Err(Error::Invalid(format!(
            "store {} is not a directory",
            store.display()
        )));
    }
    let mnt = process::mountpoint(&opts.mountpoint)?;
    if mnt.starts_with(&store) || store.starts_with(&mnt) {
        return Err(Error::Invalid(format!(
            "mountpoint {} and store {} must not contain each other",
            mnt.display(),
            store.display()
        )));
    }
    if let Some(other) = crate::fuse::mountinfo::of_store(&store).first() {
        return Err(Error::Busy(format!(
            "store {} is already mounted at {}",
            store.display(),
            other.mountpoint.display()
        )));
    }
    Ok((store, mnt))
}

/// `drfs mount`: in the foreground, serve until unmounted; otherwise start the daemon and
/// return once it serves.
pub fn mount(opts: &MountOpts) -> Result<()> {
    let (store, mnt) = prepare(opts)?;
    if opts.track && StateDir::new(&store).exists() {
        drop(run::lock(&StateDir::new(&store))?);
    }
    if opts.foreground {
        let d = DaemonOpts {
            block_size: opts.block_size,
            threads: opts.threads,
            allow_other: opts.allow_other,
            track: opts.track,
            status: Arc::new(|sd, t| {
                crate::obs::status::store(sd, Some(t), true)
                    .map(|s| serde_json::to_value(s).unwrap_or_default())
                    .unwrap_or_else(|e| serde_json::json!({"error": e.to_string()}))
            }),
            metrics_listen: opts.metrics_listen.clone(),
            store_io: opts.store_io,
            max_pages: opts.max_pages,
        };
        return daemon::serve(&d, &store, &mnt, Ready::from_env());
    }
    let mut args: Vec<OsString> = vec![
        "mount".into(),
        "--foreground".into(),
        store.clone().into(),
        mnt.into(),
    ];
    if let Some(bs) = opts.block_size {
        args.extend(["--block-size".into(), bs.to_string().into()]);
    }
    args.extend(["--threads".into(), opts.threads.to_string().into()]);
    if opts.allow_other {
        args.push("--allow-other".into());
    }
    if !opts.track {
        args.push("--no-track".into());
    }
    if let Some(a) = &opts.metrics_listen {
        args.extend(["--metrics-listen".into(), a.into()]);
    }
    args.extend([
        "--store-io".into(),
        opts.store_io.to_string().into(),
        "--fuse-max-pages".into(),
        opts.max_pages.to_string().into(),
    ]);
    process::spawn(&args, &log_path(&StateDir::new(&store)))
}

/// `drfs unmount`: unmounts and waits for the daemon to record a clean stop.
pub fn unmount(mountpoint: &Path, lazy: bool) -> Result<()> {
    let mnt = process::absolute(mountpoint)
        .map_err(|_| Error::Invalid(format!("{}: no such directory", mountpoint.display())))?;
    let Some(entry) = crate::fuse::mountinfo::at(&mnt) else {
        return Err(Error::Invalid(format!("{} is not mounted", mnt.display())));
    };
    if !crate::fuse::mountinfo::is_drfs(&entry) {
        return Err(Error::Invalid(format!(
            "{} is not a drfs mount",
            mnt.display()
        )));
    }
    let stale =
        matches!(std::fs::metadata(&mnt), Err(e) if e.raw_os_error() == Some(libc::ENOTCONN));
    if stale {
        process::detach(&mnt)?;
        return Err(Error::Invalid(format!(
            "{} was a stale mount (its daemon had died); detached it. The next `drfs mount` reconciles the store",
            mnt.display()
        )));
    }
    let Some(store) = entry.store() else {
        // A browse or a test-failover clone: there is no store to wait for.
        return umount(&mnt, lazy);
    };
    let sd = StateDir::new(&store);
    let pid = run::info(&sd).map(|r| r.pid).filter(|&p| sys::pid_alive(p));
    umount(&mnt, lazy)?;
    if lazy {
        return Ok(());
    }
    if let Some(pid) = pid {
        wait_exit(pid, &sd)?;
    }
    Ok(())
}

/// Unmounts; refuses while files are open, unless lazy.
fn umount(mnt: &Path, lazy: bool) -> Result<()> {
    let c = sys::cpath(mnt).at(mnt)?;
    let flags = if lazy { libc::MNT_DETACH } else { 0 };
    if unsafe { libc::umount2(c.as_ptr(), flags) } != 0 {
        let e = std::io::Error::last_os_error();
        match e.raw_os_error() {
            Some(libc::EBUSY) => {
                return Err(Error::Busy(format!(
                    "{} is busy: files on it are open; close them, or use --lazy",
                    mnt.display()
                )));
            }
            Some(libc::EPERM) => fusermount_u(mnt, lazy)?,
            _ => return Err(e).at(mnt),
        }
    }
    Ok(())
}

fn fusermount_u(mnt: &Path, lazy: bool) -> Result<()> {
    let mut cmd = std::process::Command::new("fusermount3");
    cmd.arg("-u");
    if lazy {
        cmd.arg("-z");
    }
    match cmd.arg(mnt).status() {
        Ok(s) if s.success() => Ok(()),
        _ => Err(Error::Busy(format!(
            "fusermount3 -u {} failed",
            mnt.display()
        ))),
    }
}

fn wait_exit(pid: i32, sd: &StateDir) -> Result<()> {
    let deadline = std::time::Instant::now() + Duration::from_secs(300);
    while sys::pid_alive(pid) {
        if std::time::Instant::now() > deadline {
            return Err(Error::Busy(format!(
                "the drfs daemon (pid {pid}) has not exited after 300 s"
            )));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    if sd.exists() && !run::is_clean(sd) {
        return Err(Error::Invalid(format!(
            "the drfs daemon exited without a clean stop; see {}",
            log_path(sd).display()
        )));
    }
    Ok(())
}
