//! `drfs mount` and `drfs unmount`: checking the arguments, replacing a stale mount,
//! starting the daemon in the background and waiting until it serves, running it in the
//! foreground (for systemd), and stopping it cleanly.
//!
//! The daemon is this same binary re-executed with `--foreground`; it tells the waiting
//! parent "OK" or the error over an inherited pipe (`DRFS_READY_FD`), and systemd over
//! `NOTIFY_SOCKET`. It stops when the filesystem is unmounted (by `drfs unmount`,
//! `fusermount3 -u`, `umount`, or a SIGTERM/SIGINT it turns into a lazy unmount); it then
//! flushes the bitmaps, saves the file table and records a clean stop.

pub mod bufalloc;
pub mod creds;
pub mod fs;
pub mod handle;
pub mod inode;
pub mod mountinfo;

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{FromRawFd, RawFd};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use crate::control;
use crate::cycle::schedule::Scheduler;
use crate::error::{At, Error, Result};
use crate::state::{self, StateDir};
use crate::sys;
use crate::track::Tracker;

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

/// An absolute path without resolving its last component (which may be a dead mount).
fn absolute(p: &Path) -> Result<PathBuf> {
    let abs = std::path::absolute(p).at(p)?;
    let (Some(parent), Some(name)) = (abs.parent(), abs.file_name()) else {
        return Ok(abs);
    };
    Ok(parent.canonicalize().at(parent)?.join(name))
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
    let mnt = absolute(&opts.mountpoint).map_err(|_| {
        Error::Invalid(format!(
            "mountpoint {}: no such directory",
            opts.mountpoint.display()
        ))
    })?;
    if let Some(e) = mountinfo::at(&mnt).filter(mountinfo::is_drfs) {
        match std::fs::metadata(&mnt) {
            Err(err) if err.raw_os_error() == Some(libc::ENOTCONN) => {
                detach(&mnt)?;
                eprintln!(
                    "drfs: replaced a stale mount at {} (its daemon had died)",
                    mnt.display()
                );
            }
            _ => {
                return Err(Error::Busy(format!(
                    "{} is already a drfs mount of {}",
                    mnt.display(),
                    e.store().unwrap_or_default().display()
                )));
            }
        }
    }
    let md = std::fs::metadata(&mnt)
        .map_err(|e| Error::Invalid(format!("mountpoint {}: {e}", mnt.display())))?;
    if !md.is_dir() {
        return Err(Error::Invalid(format!(
            "mountpoint {} is not a directory",
            mnt.display()
        )));
    }
    if std::fs::read_dir(&mnt).at(&mnt)?.next().is_some() {
        return Err(Error::Invalid(format!(
            "mountpoint {} is not empty",
            mnt.display()
        )));
    }
    if mnt.starts_with(&store) || store.starts_with(&mnt) {
        return Err(Error::Invalid(format!(
            "mountpoint {} and store {} must not contain each other",
            mnt.display(),
            store.display()
        )));
    }
    if let Some(other) = mountinfo::of_store(&store).first() {
        return Err(Error::Busy(format!(
            "store {} is already mounted at {}",
            store.display(),
            other.mountpoint.display()
        )));
    }
    Ok((store, mnt))
}

fn detach(mnt: &Path) -> Result<()> {
    let c = sys::cpath(mnt).at(mnt)?;
    if unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) } == 0 {
        return Ok(());
    }
    let st = std::process::Command::new("fusermount3")
        .args(["-u", "-z", "-q"])
        .arg(mnt)
        .status();
    match st {
        Ok(s) if s.success() => Ok(()),
        _ => Err(Error::Busy(format!(
            "cannot detach the stale mount at {}",
            mnt.display()
        ))),
    }
}

/// `drfs mount`: in the foreground, serve until unmounted; otherwise start the daemon and
/// return once it serves.
pub fn mount(opts: &MountOpts) -> Result<()> {
    let (store, mnt) = prepare(opts)?;
    if opts.track && StateDir::new(&store).exists() {
        drop(StateDir::new(&store).lock()?);
    }
    if opts.foreground {
        let ready = std::env::var("DRFS_READY_FD")
            .ok()
            .and_then(|v| v.parse::<RawFd>().ok())
            .map(|fd| unsafe { File::from_raw_fd(fd) });
        unsafe { std::env::remove_var("DRFS_READY_FD") };
        return serve(opts, &store, &mnt, ready);
    }
    spawn_daemon(opts, &store, &mnt)
}

fn spawn_daemon(opts: &MountOpts, store: &Path, mnt: &Path) -> Result<()> {
    let mut fds = [0; 2];
    sys::cvt(unsafe { libc::pipe2(fds.as_mut_ptr(), 0) }).at(Path::new("pipe"))?;
    unsafe { libc::fcntl(fds[0], libc::F_SETFD, libc::FD_CLOEXEC) };
    let mut read_end = unsafe { File::from_raw_fd(fds[0]) };
    let write_end = unsafe { File::from_raw_fd(fds[1]) };
    let exe = std::env::current_exe().at(Path::new("/proc/self/exe"))?;
    let mut cmd = std::process::Command::new(exe);
    cmd.arg("mount").arg("--foreground").arg(store).arg(mnt);
    if let Some(bs) = opts.block_size {
        cmd.arg("--block-size").arg(bs.to_string());
    }
    cmd.arg("--threads").arg(opts.threads.to_string());
    if opts.allow_other {
        cmd.arg("--allow-other");
    }
    if !opts.track {
        cmd.arg("--no-track");
    }
    cmd.env("DRFS_READY_FD", fds[1].to_string())
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null());
    unsafe {
        use std::os::unix::process::CommandExt;
        cmd.pre_exec(|| {
            libc::setsid();
            Ok(())
        });
    }
    let mut child = cmd.spawn().at(Path::new("drfs daemon"))?;
    drop(write_end);
    let mut msg = String::new();
    let _ = read_end.read_to_string(&mut msg);
    let msg = msg.trim();
    if msg == "OK" {
        // The daemon lives on; it is not our child to wait for.
        std::mem::forget(child);
        return Ok(());
    }
    let _ = child.wait();
    if let Some(err) = msg.strip_prefix("ERR ") {
        return Err(Error::Invalid(err.to_string()));
    }
    Err(Error::Invalid(format!(
        "the drfs daemon exited before the mount was ready; see {}",
        StateDir::new(store).path("daemon.log").display()
    )))
}

/// Tells whoever waits that the mount serves (or why it does not).
struct Ready(Option<File>);

impl Ready {
    fn say(&mut self, msg: &str) {
        if let Some(mut f) = self.0.take() {
            let _ = writeln!(f, "{msg}");
        }
        if msg == "OK" {
            notify_systemd();
        }
    }
}

fn notify_systemd() {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    let sock = match std::os::unix::net::UnixDatagram::unbound() {
        Ok(s) => s,
        Err(_) => return,
    };
    let b = path.as_encoded_bytes();
    let r = if let Some(abs) = b.strip_prefix(b"@") {
        use std::os::linux::net::SocketAddrExt;
        std::os::unix::net::SocketAddr::from_abstract_name(abs)
            .and_then(|a| sock.send_to_addr(b"READY=1", &a))
    } else {
        sock.send_to(b"READY=1", Path::new(&path))
    };
    if let Err(e) = r {
        tracing::warn!("sd_notify: {e}");
    }
}

fn serve(opts: &MountOpts, store: &Path, mnt: &Path, ready: Option<File>) -> Result<()> {
    let mut ready = Ready(ready);
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
    session: fuser::Session<fs::DrFs>,
    tracker: Option<Arc<Tracker>>,
    sched: Option<Arc<Scheduler>>,
    socket: Option<PathBuf>,
    stop: Arc<AtomicBool>,
    _lock: Option<File>,
}

fn start(opts: &MountOpts, store: &Path, mnt: &Path) -> Result<Running> {
    unsafe { libc::umask(0) };
    let signals = block_signals();
    let sd = StateDir::new(store);
    let (tracker, lock) = if opts.track {
        let (sd, cfg) = StateDir::open_or_init(store, opts.block_size)?;
        let lock = sd.lock()?;
        init_logging(&sd);
        let last = sd.begin_run(mnt)?;
        tracing::info!(
            "mounting {} at {} (previous stop: {last:?})",
            store.display(),
            mnt.display()
        );
        (
            Some(Arc::new(Tracker::open(sd, cfg, mnt, last)?)),
            Some(lock),
        )
    } else {
        let lock = if sd.exists() { Some(sd.lock()?) } else { None };
        (None, lock)
    };
    let stop = Arc::new(AtomicBool::new(false));
    if tracker.is_some() {
        heartbeat(&sd, stop.clone())?;
    }
    let drfs = fs::DrFs::new(
        store.to_path_buf(),
        tracker.clone(),
        fs::Options {
            impersonate: unsafe { libc::geteuid() } == 0,
        },
    )
    .at(store)?;
    let mut cfg = fuser::Config::default();
    cfg.mount_options = vec![
        fuser::MountOption::FSName(format!("{}{}", mountinfo::SOURCE_PREFIX, store.display())),
        fuser::MountOption::Subtype("drfs".into()),
        fuser::MountOption::DefaultPermissions,
    ];
    if opts.allow_other {
        cfg.acl = fuser::SessionACL::All;
    }
    cfg.n_threads = Some(opts.threads.max(1));
    let session = fuser::Session::new(drfs, mnt, &cfg)
        .map_err(|e| Error::Invalid(format!("mounting at {}: {e}", mnt.display())))?;
    tune_readahead(mnt);
    watch_signals(signals, mnt.to_path_buf());
    let (sched, socket) = match &tracker {
        Some(t) => {
            let sched = Scheduler::start(t.clone());
            let path = control::socket_path(&t.config().store_id);
            let (t2, sd2) = (t.clone(), sd.clone());
            let status = Arc::new(move || {
                crate::status::store(&sd2, Some(&t2), true)
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

fn init_logging(sd: &StateDir) {
    let p = sd.path("daemon.log");
    let Ok(file) = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&p)
    else {
        return;
    };
    let _ = tracing_subscriber::fmt()
        .with_writer(Arc::new(file))
        .with_ansi(false)
        .with_max_level(tracing::Level::INFO)
        .try_init();
    std::panic::set_hook(Box::new(|info| {
        tracing::error!("panic: {info}");
    }));
}

fn heartbeat(sd: &StateDir, stop: Arc<AtomicBool>) -> Result<()> {
    let f = sd.open_heartbeat()?;
    state::beat(&f);
    std::thread::Builder::new()
        .name("heartbeat".into())
        .spawn(move || {
            while !stop.load(Ordering::Acquire) {
                state::beat(&f);
                std::thread::sleep(Duration::from_millis(100));
            }
        })
        .at(Path::new("heartbeat thread"))?;
    Ok(())
}

/// Raises the mount's readahead to 1 MiB (the kernel's 128 KiB default halves buffered
/// sequential reads through FUSE).
fn tune_readahead(mnt: &Path) {
    if let Some(e) = mountinfo::at(mnt) {
        let p = format!("/sys/class/bdi/{}/read_ahead_kb", e.dev);
        if let Err(err) = std::fs::write(&p, "1024") {
            tracing::info!("readahead not raised ({p}): {err}");
        }
    }
}

fn block_signals() -> libc::sigset_t {
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for s in [libc::SIGTERM, libc::SIGINT, libc::SIGHUP] {
            libc::sigaddset(&mut set, s);
        }
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        set
    }
}

/// On SIGTERM, SIGINT or SIGHUP: detach the mount; the daemon stops when the last open
/// file of it is closed.
fn watch_signals(set: libc::sigset_t, mnt: PathBuf) {
    let _ = std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            loop {
                let mut sig = 0;
                if unsafe { libc::sigwait(&set, &mut sig) } != 0 {
                    return;
                }
                tracing::info!("signal {sig}: unmounting {}", mnt.display());
                if let Err(e) = detach(&mnt) {
                    tracing::error!("{e}");
                }
            }
        });
}

/// `drfs unmount`: unmounts and waits for the daemon to record a clean stop.
pub fn unmount(mountpoint: &Path, lazy: bool) -> Result<()> {
    let mnt = absolute(mountpoint)
        .map_err(|_| Error::Invalid(format!("{}: no such directory", mountpoint.display())))?;
    let Some(entry) = mountinfo::at(&mnt) else {
        return Err(Error::Invalid(format!("{} is not mounted", mnt.display())));
    };
    let Some(store) = entry.store().filter(|_| mountinfo::is_drfs(&entry)) else {
        return Err(Error::Invalid(format!(
            "{} is not a drfs mount",
            mnt.display()
        )));
    };
    let sd = StateDir::new(&store);
    let pid = sd.run_info().map(|r| r.pid).filter(|&p| sys::pid_alive(p));
    let stale =
        matches!(std::fs::metadata(&mnt), Err(e) if e.raw_os_error() == Some(libc::ENOTCONN));
    if stale {
        detach(&mnt)?;
        return Err(Error::Invalid(format!(
            "{} was a stale mount (its daemon had died); detached it. The next `drfs mount` reconciles the store",
            mnt.display()
        )));
    }
    let c = sys::cpath(&mnt).at(&mnt)?;
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
            Some(libc::EPERM) => fusermount_u(&mnt, lazy)?,
            _ => return Err(e).at(&mnt),
        }
    }
    if lazy {
        return Ok(());
    }
    if let Some(pid) = pid {
        wait_exit(pid, &sd)?;
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
            sd.path("daemon.log").display()
        )));
    }
    Ok(())
}
