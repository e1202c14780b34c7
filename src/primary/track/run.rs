//! A run of the store's tracking (a mount's daemon, or an unmounted `drfs ship`): the
//! exclusive lock it holds, what it records about itself (`run.json`: pid, boot id, run
//! id, when it began to watch), its heartbeat, and the clean-stop marker. The next run
//! reads them to learn how this one ended (`last_stop`): cleanly, killed, or in a host
//! crash, and so how far to trust what the bitmaps say (`reconcile`).

use std::fs::{self, File, OpenOptions};
use std::io::Read;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::{At, Error, Result};
use crate::model::fmt::rfc3339_now;
use crate::model::new_id;
use crate::state::StateDir;
use crate::sys;

/// Margin for the kernel's coarse timestamps when comparing ctimes with our clock.
const CLOCK_MARGIN_NS: i128 = 50_000_000;
/// How often the daemon writes its heartbeat.
pub const HEARTBEAT: std::time::Duration = std::time::Duration::from_millis(10);

/// How the previous run of this store (a mount, or an unmounted `drfs ship`) ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LastStop {
    /// No mount has tracked this store yet.
    Fresh,
    /// Clean unmount: a file whose ctime is at or after `since_ns` changed while unmounted.
    Clean { since_ns: i128 },
    /// The daemon died and the machine kept running: its bitmaps and stamps are whole.
    Killed(Died),
    /// The machine restarted under a running daemon (the boot id changed): bitmaps may
    /// have lost bits, which the activity log covers. A file whose ctime is at or after
    /// `boot_ns` changed after the restart.
    HostCrash { boot_ns: i128 },
}

/// What a daemon that died left to judge its files by.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Died {
    /// Its run, if it stamped its operations (`track::stamps`); older daemons did not.
    pub run: Option<u64>,
    /// When its run began to watch the store: a ctime at or before it was seen then.
    pub watch_ns: Option<i128>,
    /// Its last heartbeat: it was alive then (0 if none was written).
    pub alive_ns: i128,
}

impl Died {
    /// The store-wide rule for daemons that left no stamps: any file changed at or after
    /// the last heartbeat (less the margin for coarse timestamps) is suspect.
    pub fn since_ns(&self) -> i128 {
        self.alive_ns - CLOCK_MARGIN_NS
    }
}

/// A run about to start: its id (in `run.json` and the stamps) and when it began to
/// watch the store.
#[derive(Debug, Clone, Copy)]
pub struct RunStart {
    pub id: u64,
    pub watch_ns: i128,
}

impl RunStart {
    pub fn now() -> RunStart {
        let id = u64::from_str_radix(&new_id(), 16).unwrap_or(1).max(1);
        RunStart {
            id,
            watch_ns: sys::now_ns(),
        }
    }
}

#[derive(Debug, Serialize, Deserialize)]
struct CleanMarker {
    since_ns: i128,
    time: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RunInfo {
    pub pid: i32,
    pub boot_id: String,
    pub mountpoint: PathBuf,
    pub started: String,
    /// The run's id (absent in runs of drfs before stamps).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub run: Option<u64>,
    /// When the run began to watch the store, ns since the epoch.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub watch_ns: Option<i128>,
}

/// Takes the exclusive daemon lock; fails if another daemon tracks this store.
pub fn lock(sd: &StateDir) -> Result<File> {
    let p = sd.path("lock");
    let f = OpenOptions::new()
        .create(true)
        .truncate(false)
        .read(true)
        .write(true)
        .open(&p)
        .at(&p)?;
    if sys::flock(&f, libc::LOCK_EX | libc::LOCK_NB).is_err() {
        let who = info(sd)
            .map(|r| format!(" (daemon pid {} at {})", r.pid, r.mountpoint.display()))
            .unwrap_or_default();
        return Err(Error::Busy(format!(
            "store {} is already mounted{who}",
            sd.store().display()
        )));
    }
    Ok(f)
}

/// Records that run `run` tracks the store now (after its reconcile: until then the
/// previous run's markers still say how to judge the store).
pub fn begin(sd: &StateDir, mountpoint: &Path, run: &RunStart) -> Result<()> {
    let info = RunInfo {
        pid: std::process::id() as i32,
        boot_id: sys::boot_id(),
        mountpoint: mountpoint.to_path_buf(),
        started: rfc3339_now(),
        run: Some(run.id),
        watch_ns: Some(run.watch_ns),
    };
    let p = sd.path("run.json");
    let body = serde_json::to_vec_pretty(&info).map_err(Error::encode)?;
    sys::write_atomic(&p, &body).at(&p)?;
    let clean = sd.path("clean.json");
    match fs::remove_file(&clean) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e).at(&clean),
        _ => {}
    }
    let dir = sd.path("");
    sys::fsync_dir(&dir).at(&dir)
}

/// How the previous run ended.
pub fn last_stop(sd: &StateDir) -> Result<LastStop> {
    let clean = sd.path("clean.json");
    if let Ok(text) = fs::read_to_string(&clean) {
        let m: CleanMarker =
            serde_json::from_str(&text).map_err(|e| Error::corrupt(&clean, e.to_string()))?;
        return Ok(LastStop::Clean {
            since_ns: m.since_ns,
        });
    }
    let Some(info) = info(sd) else {
        return Ok(LastStop::Fresh);
    };
    if info.boot_id.is_empty() || info.boot_id != sys::boot_id() {
        return Ok(LastStop::HostCrash {
            boot_ns: sys::boot_ns(),
        });
    }
    Ok(LastStop::Killed(Died {
        run: info.run,
        watch_ns: info.watch_ns,
        alive_ns: heartbeat_ns(sd).unwrap_or(0),
    }))
}

pub fn info(sd: &StateDir) -> Option<RunInfo> {
    let text = fs::read_to_string(sd.path("run.json")).ok()?;
    serde_json::from_str(&text).ok()
}

/// Records a clean stop; call only once nothing can change the store through the mount.
pub fn mark_clean(sd: &StateDir) -> Result<()> {
    // Any change through the mount happened before now, and its ctime is at most the
    // time it happened (the kernel's clock lags, never leads): once the margin and a
    // little have passed, `since_ns` below is after every such ctime, and a change from
    // here on gets a ctime at or after it (it lags by less than the margin).
    std::thread::sleep(std::time::Duration::from_nanos(
        (CLOCK_MARGIN_NS + 5_000_000) as u64,
    ));
    let m = CleanMarker {
        since_ns: sys::now_ns() - CLOCK_MARGIN_NS,
        time: rfc3339_now(),
    };
    let p = sd.path("clean.json");
    let body = serde_json::to_vec(&m).map_err(Error::encode)?;
    sys::write_atomic(&p, &body).at(&p)
}

pub fn is_clean(sd: &StateDir) -> bool {
    sd.path("clean.json").exists()
}

/// The heartbeat file the daemon rewrites every `HEARTBEAT` while it runs.
pub fn open_heartbeat(sd: &StateDir) -> Result<File> {
    let p = sd.path("heartbeat");
    OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .read(true)
        .open(&p)
        .at(&p)
}

fn heartbeat_ns(sd: &StateDir) -> Option<i128> {
    let mut f = File::open(sd.path("heartbeat")).ok()?;
    let mut b = [0u8; 16];
    f.read_exact(&mut b).ok()?;
    Some(i128::from_le_bytes(b))
}

pub fn beat(f: &File) {
    let _ = f.write_all_at(&sys::now_ns().to_le_bytes(), 0);
}
