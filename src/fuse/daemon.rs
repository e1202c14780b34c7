//! Running a FUSE daemon in the background: shared by `drfs mount`, `drfs browse` and
//! `drfs test-failover`. The daemon is this same binary re-executed with `--foreground`;
//! it tells the waiting parent "OK" or the error over an inherited pipe (`DRFS_READY_FD`),
//! and systemd over `NOTIFY_SOCKET`. SIGTERM, SIGINT and SIGHUP turn into a lazy unmount,
//! after which the daemon stops once the last open file is closed. Each daemon logs to a
//! file rotated by size. This module also checks mountpoints and detaches stale drfs
//! mounts.

use std::ffi::OsString;
use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{FromRawFd, RawFd};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use file_rotate::compression::Compression;
use file_rotate::suffix::AppendCount;
use file_rotate::{ContentLimit, FileRotate};

use crate::error::{At, Error, Result};
use crate::fuse::mountinfo;
use crate::sys;

/// Starts `drfs ARGS` (which include `--foreground`) in the background and waits until it
/// serves; on failure, its message (or where its log is).
pub fn spawn(args: &[OsString], log: &Path) -> Result<()> {
    let mut fds = [0; 2];
    sys::cvt(unsafe { libc::pipe2(fds.as_mut_ptr(), 0) }).at(Path::new("pipe"))?;
    unsafe { libc::fcntl(fds[0], libc::F_SETFD, libc::FD_CLOEXEC) };
    let mut read_end = unsafe { File::from_raw_fd(fds[0]) };
    let write_end = unsafe { File::from_raw_fd(fds[1]) };
    let mut cmd = std::process::Command::new("/proc/self/exe");
    // Named drfs in `ps` (its comm is set at start, `cli::main`).
    std::os::unix::process::CommandExt::arg0(&mut cmd, "drfs");
    cmd.args(args)
        .env("DRFS_READY_FD", fds[1].to_string())
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
        "the drfs daemon exited before it was ready; see {}",
        log.display()
    )))
}

/// Tells whoever waits that the daemon serves (or why it does not).
pub struct Ready(Option<File>);

impl Ready {
    /// The pipe `spawn` handed down, if this process was started by it.
    pub fn from_env() -> Ready {
        let f = std::env::var("DRFS_READY_FD")
            .ok()
            .and_then(|v| v.parse::<RawFd>().ok())
            .map(|fd| unsafe { File::from_raw_fd(fd) });
        unsafe { std::env::remove_var("DRFS_READY_FD") };
        Ready(f)
    }

    pub fn say(&mut self, msg: &str) {
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
    let Ok(sock) = std::os::unix::net::UnixDatagram::unbound() else {
        return;
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

/// A log file grows to this size, then becomes `<name>.1` (the older ones `.2`, `.3`).
const LOG_BYTES: usize = 16 << 20;
/// Rotated files kept beside the live one: a log takes at most ~4 × LOG_BYTES.
const LOG_KEEP: usize = 3;

/// The log file at `path`, rotated by size; None where it cannot be written (a replica on
/// read-only storage).
fn log_file(path: &Path, bytes: usize, keep: usize) -> Option<Mutex<FileRotate<AppendCount>>> {
    // Opened here first: FileRotate does not say when it cannot write.
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .ok()?;
    Some(Mutex::new(FileRotate::new(
        path,
        AppendCount::new(keep),
        ContentLimit::BytesSurpassed(bytes),
        Compression::None,
        None,
    )))
}

/// Sends this daemon's log (INFO and up, and panics) to `path`, rotated by size. Where
/// that file cannot be opened the daemon stays silent.
pub fn log_to(path: &Path) {
    let Some(file) = log_file(path, LOG_BYTES, LOG_KEEP) else {
        return;
    };
    let _ = tracing_subscriber::fmt()
        .with_writer(file)
        .with_ansi(false)
        .with_max_level(tracing::Level::INFO)
        .try_init();
    std::panic::set_hook(Box::new(|info| {
        tracing::error!("panic: {info}");
    }));
}

/// Blocks the stop signals in this thread (and the threads it starts from now on).
pub fn block_signals() -> libc::sigset_t {
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
pub fn watch_signals(set: libc::sigset_t, mnt: PathBuf) {
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

/// Lazily unmounts `mnt`.
pub fn detach(mnt: &Path) -> Result<()> {
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
            "cannot detach the mount at {}",
            mnt.display()
        ))),
    }
}

/// An absolute path without resolving its last component (which may be a dead mount).
pub fn absolute(p: &Path) -> Result<PathBuf> {
    let abs = std::path::absolute(p).at(p)?;
    let (Some(parent), Some(name)) = (abs.parent(), abs.file_name()) else {
        return Ok(abs);
    };
    Ok(parent.canonicalize().at(parent)?.join(name))
}

/// `p` made absolute with its longest existing ancestor resolved (symlinks and all), for
/// paths that may not exist yet.
pub fn resolved(p: &Path) -> Result<PathBuf> {
    let abs = std::path::absolute(p).at(p)?;
    let mut base = abs.as_path();
    let mut rest = Vec::new();
    while std::fs::symlink_metadata(base).is_err() {
        match (base.parent(), base.file_name()) {
            (Some(parent), Some(name)) => {
                rest.push(name);
                base = parent;
            }
            _ => break,
        }
    }
    let mut out = base.canonicalize().at(base)?;
    out.extend(rest.iter().rev());
    Ok(out)
}

/// Checks a mountpoint (an empty directory) and detaches a stale drfs mount left there
/// by a daemon that died; returns its absolute path.
pub fn mountpoint(p: &Path) -> Result<PathBuf> {
    let mnt = absolute(p)
        .map_err(|_| Error::Invalid(format!("mountpoint {}: no such directory", p.display())))?;
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
                    "{} is already a drfs mount ({})",
                    mnt.display(),
                    e.source
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
    Ok(mnt)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_log_rotates_by_size_keeps_whole_lines_and_a_bounded_count() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("daemon.log");
        let log = log_file(&p, 100, 2).unwrap();
        for i in 0..40 {
            let line = format!("line {i:02} {}\n", "x".repeat(20));
            log.lock().unwrap().write_all(line.as_bytes()).unwrap();
        }
        let mut names: Vec<String> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        assert_eq!(names, ["daemon.log", "daemon.log.1", "daemon.log.2"]);
        let newest = std::fs::read_to_string(&p).unwrap();
        assert!(newest.ends_with(&format!("line 39 {}\n", "x".repeat(20))));
        for n in &names {
            let text = std::fs::read_to_string(dir.path().join(n)).unwrap();
            assert!(text.len() <= 100 + 30, "{n}: {} bytes", text.len());
            assert!(text.lines().all(|l| l.len() == 28), "{n} has a cut line");
        }
    }

    #[test]
    fn an_unwritable_log_is_none() {
        assert!(log_file(Path::new("/proc/drfs-no-such/daemon.log"), 100, 2).is_none());
    }
}
