//! One start-up for every drfs filesystem daemon (the store's mount, browse, the
//! test-failover clone), written once: stop signals blocked before any thread starts, the
//! log opened, the FUSE session configured and attached, the mount's readahead set like
//! the disk under it, the waiting parent told "OK" (or why not) over the readiness pipe,
//! signals turned into a lazy unmount, and the end of the session logged.
//!
//! ```text
//! let mut s = Starting::new(ready);          // signals blocked
//! let r = s.check(open_what_it_serves())?;   // an error is said to the parent and logged
//! s.log_to(&log);
//! let served = s.mount(fs, &mountpoint, &backing, &options)?;
//! served.serve("browsing ...")               // OK, then serve until unmounted
//! ```

use std::path::{Path, PathBuf};

use fuser::Filesystem;

use crate::error::{Error, Result};
use crate::fuse::attach::{self, Attached};
use crate::fuse::daemon::{self, Ready};
use crate::fuse::mountinfo;

/// Threads serving FUSE requests: enough for a queue depth of 16 to reach the disk.
pub const DEFAULT_THREADS: usize = 16;
/// The FUSE request cap drfs mounts raise the kernel's to (4 MiB of 4 KiB pages).
pub const DEFAULT_MAX_PAGES: u32 = 1024;

/// How a filesystem is mounted.
pub struct Options {
    /// The source the mount table shows (a `mountinfo` prefix and a path).
    pub fsname: String,
    pub read_only: bool,
    /// Users other than the one mounting may use it (qemu as libvirt-qemu).
    pub allow_other: bool,
    pub threads: usize,
    /// `fs.fuse.max_pages_limit` to raise to before mounting (0: leave it).
    pub max_pages: u32,
}

/// A daemon on its way up: its stop signals are blocked and its parent waits.
pub struct Starting {
    signals: libc::sigset_t,
    ready: Ready,
}

impl Starting {
    /// Blocks the stop signals in this thread and every thread it starts from now on.
    pub fn new(ready: Ready) -> Starting {
        Starting {
            signals: daemon::block_signals(),
            ready,
        }
    }

    /// Passes `r` on; an error is logged and said to the waiting parent.
    pub fn check<T>(&mut self, r: Result<T>) -> Result<T> {
        r.map_err(|e| {
            tracing::error!("{e}");
            self.ready.say(&format!("ERR {e}"));
            e
        })
    }

    /// Sends the daemon's log to `path` (rotated).
    pub fn log_to(&self, path: &Path) {
        daemon::log_to(path);
    }

    /// Mounts `fs` at `at`, with the readahead of the disk `backing` lives on.
    pub fn mount<FS: Filesystem>(
        mut self,
        fs: FS,
        at: &Path,
        backing: &Path,
        o: &Options,
    ) -> Result<Serving<FS>> {
        raise_max_pages(o.max_pages);
        let mut cfg = fuser::Config::default();
        cfg.mount_options = vec![
            fuser::MountOption::FSName(o.fsname.clone()),
            fuser::MountOption::Subtype("drfs".into()),
            fuser::MountOption::DefaultPermissions,
        ];
        if o.read_only {
            cfg.mount_options.push(fuser::MountOption::RO);
        }
        if o.allow_other {
            cfg.acl = fuser::SessionACL::All;
        }
        cfg.n_threads = Some(o.threads.max(1));
        let session = attach::attach(fs, at, &cfg)
            .map_err(|e| Error::Invalid(format!("mounting at {}: {e}", at.display())));
        let session = self.check(session)?;
        tune_readahead(at, backing);
        Ok(Serving {
            session,
            at: at.to_path_buf(),
            signals: self.signals,
            ready: self.ready,
        })
    }
}

/// A mounted filesystem, about to serve.
pub struct Serving<FS: Filesystem> {
    session: Attached<FS>,
    at: PathBuf,
    signals: libc::sigset_t,
    ready: Ready,
}

impl<FS: Filesystem> Serving<FS> {
    /// Tells the parent it serves, logs `what`, and serves until unmounted (by
    /// `drfs unmount`, `umount`, or a stop signal, which detaches the mount).
    pub fn serve(mut self, what: &str) -> Result<()> {
        self.ready.say("OK");
        tracing::info!("{what}");
        daemon::watch_signals(self.signals, self.at.clone());
        let r = self
            .session
            .run()
            .map_err(|e| Error::Invalid(format!("the FUSE session at {}: {e}", self.at.display())));
        match &r {
            Ok(()) => tracing::info!("{} unmounted", self.at.display()),
            Err(e) => tracing::error!("{e}"),
        }
        r
    }
}

const MAX_PAGES_LIMIT: &str = "/proc/sys/fs/fuse/max_pages_limit";

/// Raises the kernel's cap on a FUSE request (`fs.fuse.max_pages_limit`, 256 pages by
/// default) to `pages` before mounting, so a client's 1 MiB buffer that does not start
/// on a page boundary (fio's, many others') arrives as one request, not a 1 MiB − 16 B
/// one and a 16 B one. 0, or a limit already as high: left as it is. A host-wide
/// setting: it only lets FUSE requests be larger, for every FUSE mount made after it.
fn raise_max_pages(pages: u32) {
    let Ok(text) = std::fs::read_to_string(MAX_PAGES_LIMIT) else {
        return;
    };
    let now: u32 = text.trim().parse().unwrap_or(u32::MAX);
    if pages == 0 || now >= pages {
        return;
    }
    match std::fs::write(MAX_PAGES_LIMIT, pages.to_string()) {
        Ok(()) => tracing::info!("raised fs.fuse.max_pages_limit from {now} to {pages}"),
        Err(e) => tracing::info!("fs.fuse.max_pages_limit stays {now}: {e}"),
    }
}

/// Gives the mount the readahead of the disk under `backing` (1 to 16 MiB), so buffered
/// sequential reads through it keep as many requests in flight as reads of that disk
/// (FUSE's own default of 128 KiB halves them).
pub fn tune_readahead(mnt: &Path, backing: &Path) {
    let kb = disk_readahead_kb(backing)
        .unwrap_or(1024)
        .clamp(1024, 16384);
    if let Some(e) = mountinfo::at(mnt) {
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
