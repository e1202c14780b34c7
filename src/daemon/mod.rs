//! `drfs mount` and `drfs unmount`: checking the arguments, replacing a stale mount,
//! starting the daemon in the background and waiting until it serves, running it in the
//! foreground (for systemd), and stopping it cleanly.
//!
//! The daemon is this same binary re-executed with `--foreground`; it tells the waiting
//! parent "OK" or the error over an inherited pipe (`DRFS_READY_FD`), and systemd over
//! `NOTIFY_SOCKET`. It stops when the filesystem is unmounted (by `drfs unmount`,
//! `fusermount3 -u`, `umount`, or a SIGTERM/SIGINT it turns into a lazy unmount); it then
//! flushes the bitmaps, saves the file table and records a clean stop.

pub mod control;

use std::ffi::OsString;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use crate::error::{At, Error, Result};
use crate::fuse::daemon::{self, Ready};
use crate::primary::cycle::schedule::Scheduler;
use crate::primary::track::Tracker;
use crate::state::{self, StateDir};
use crate::sys;

/// Threads serving FUSE requests: enough for a queue depth of 16 to reach the disk.
pub const DEFAULT_THREADS: usize = 16;

#[derive(Debug, Clone)]
pub struct MountOpts {
    pub store: PathBuf,
    pub mountpoint: PathBuf,
    pub block_size: Option<u64>,
    pub threads: usize,
    pub allow_other: bool,
    pub foreground: bool,
    pub track: bool,
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
    let mnt = daemon::mountpoint(&opts.mountpoint)?;
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
        drop(StateDir::new(&store).lock()?);
    }
    if opts.foreground {
        return serve(opts, &store, &mnt, Ready::from_env());
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
    daemon::spawn(&args, &log_path(&StateDir::new(&store)))
}

fn serve(opts: &MountOpts, store: &Path, mnt: &Path, mut ready: Ready) -> Result<()> {
    match start(opts, store, mnt) {
        Ok(running) => {
            ready.say("OK");
            running.run()
        }
        Err(e) => {
            ready.say(&format!("ERR {e}"));
            Err(e)
        }
    }
}

struct Running {
    session: crate::fuse::attach::Attached<crate::primary::passthrough::fs::DrFs>,
    tracker: Option<Arc<Tracker>>,
    sched: Option<Arc<Scheduler>>,
    socket: Option<PathBuf>,
    stop: Arc<AtomicBool>,
    _lock: Option<File>,
}

fn start(opts: &MountOpts, store: &Path, mnt: &Path) -> Result<Running> {
    unsafe { libc::umask(0) };
    let signals = daemon::block_signals();
    let sd = StateDir::new(store);
    let (tracker, lock) = if opts.track {
        let (sd, cfg) = StateDir::open_or_init(store, opts.block_size)?;
        let lock = sd.lock()?;
        daemon::log_to(&log_path(&sd));
        (Some(Arc::new(Tracker::start(sd, cfg, mnt)?)), Some(lock))
    } else {
        let lock = if sd.exists() { Some(sd.lock()?) } else { None };
        (None, lock)
    };
    let stop = Arc::new(AtomicBool::new(false));
    if tracker.is_some() {
        heartbeat(&sd, stop.clone())?;
    }
    let drfs = crate::primary::passthrough::fs::DrFs::new(
        store.to_path_buf(),
        tracker.clone(),
        crate::primary::passthrough::fs::Options {
            impersonate: unsafe { libc::geteuid() } == 0,
        },
    )
    .at(store)?;
    let mut cfg = fuser::Config::default();
    cfg.mount_options = vec![
        fuser::MountOption::FSName(format!(
            "{}{}",
            crate::fuse::mountinfo::SOURCE_PREFIX,
            store.display()
        )),
        fuser::MountOption::Subtype("drfs".into()),
        fuser::MountOption::DefaultPermissions,
    ];
    if opts.allow_other {
        cfg.acl = fuser::SessionACL::All;
    }
    cfg.n_threads = Some(opts.threads.max(1));
    let session = crate::fuse::attach::attach(drfs, mnt, &cfg)
        .map_err(|e| Error::Invalid(format!("mounting at {}: {e}", mnt.display())))?;
    tune_readahead(mnt, store);
    daemon::watch_signals(signals, mnt.to_path_buf());
    let (sched, socket) = match &tracker {
        Some(t) => {
            let sched = Scheduler::start(t.clone());
            let path = control::socket_path(&t.config().store_id);
            let (t2, sd2) = (t.clone(), sd.clone());
            let status = Arc::new(move || {
                crate::obs::status::store(&sd2, Some(&t2), true)
                    .map(|s| serde_json::to_value(s).unwrap_or_default())
                    .unwrap_or_else(|e| serde_json::json!({"error": e.to_string()}))
            });
            if let Err(e) = control::serve(path.clone(), sched.clone(), status) {
                tracing::error!("control socket: {e}");
            }
            (Some(sched), Some(path))
        }
        None => (None, None),
    };
    Ok(Running {
        session,
        tracker,
        sched,
        socket,
        stop,
        _lock: lock,
    })
}

impl Running {
    fn run(self) -> Result<()> {
        let r = self.session.run();
        self.stop.store(true, Ordering::Release);
        if let Err(e) = &r {
            tracing::warn!("session ended: {e}");
        }
        if let Some(s) = &self.sched {
            s.stop();
        }
        if let Some(p) = &self.socket {
            let _ = std::fs::remove_file(p);
        }
        if let Some(t) = &self.tracker {
            t.close()?;
            tracing::info!("unmounted cleanly");
        }
        Ok(())
    }
}

/// The store daemon's log.
fn log_path(sd: &StateDir) -> PathBuf {
    sd.path("daemon.log")
}

fn heartbeat(sd: &StateDir, stop: Arc<AtomicBool>) -> Result<()> {
    let f = sd.open_heartbeat()?;
    state::beat(&f);
    std::thread::Builder::new()
        .name("heartbeat".into())
        .spawn(move || {
            while !stop.load(Ordering::Acquire) {
                state::beat(&f);
                std::thread::sleep(state::HEARTBEAT);
            }
        })
        .at(Path::new("heartbeat thread"))?;
    Ok(())
}

/// Gives the mount the readahead of the disk under `backing` (1 to 16 MiB), so buffered
/// sequential reads through it keep as many requests in flight as reads of that disk
/// (FUSE's own default of 128 KiB halves them).
pub fn tune_readahead(mnt: &Path, backing: &Path) {
    let kb = disk_readahead_kb(backing)
        .unwrap_or(1024)
        .clamp(1024, 16384);
    if let Some(e) = crate::fuse::mountinfo::at(mnt) {
        let p = format!("/sys/class/bdi/{}/read_ahead_kb", e.dev);
        if let Err(err) = std::fs::write(&p, kb.to_string()) {
            tracing::info!("readahead not raised ({p}): {err}");
        }
    }
}

/// The readahead of the device `p` lives on: its own bdi, or a partition's disk.
fn disk_readahead_kb(p: &Path) -> Option<u64> {
    use std::os::unix::fs::MetadataExt;
    let dev = std::fs::metadata(p).ok()?.dev();
    let d = format!("{}:{}", libc::major(dev), libc::minor(dev));
    [
        format!("/sys/class/bdi/{d}/read_ahead_kb"),
        format!("/sys/dev/block/{d}/../queue/read_ahead_kb"),
    ]
    .iter()
    .find_map(|f| std::fs::read_to_string(f).ok()?.trim().parse().ok())
}

/// `drfs unmount`: unmounts and waits for the daemon to record a clean stop.
pub fn unmount(mountpoint: &Path, lazy: bool) -> Result<()> {
    let mnt = daemon::absolute(mountpoint)
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
        daemon::detach(&mnt)?;
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
    let pid = sd.run_info().map(|r| r.pid).filter(|&p| sys::pid_alive(p));
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
    if sd.exists() && !sd.is_clean() {
        return Err(Error::Invalid(format!(
            "the drfs daemon exited without a clean stop; see {}",
            log_path(sd).display()
        )));
    }
    Ok(())
}
