//! The store's state directory `STORE/.drfs/`: its layout, the versioned config file
//! (`state.toml`), the exclusive daemon lock, and the markers that tell the next mount how
//! the previous one ended (clean unmount, daemon killed, or host crash).

use std::fs::{self, File, OpenOptions};
use std::io::Read;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::{At, Error, Result};
use crate::model::fmt::rfc3339_now;
use crate::model::new_id;
use crate::sys;

pub const STATE_DIR: &str = ".drfs";
pub const FORMAT: u32 = 1;
pub const DEFAULT_BLOCK: u64 = 64 * 1024;
/// Activity-log extent: the unit whose dirtiness survives a host crash.
pub const DEFAULT_AL_EXTENT: u64 = 64 * 1024 * 1024;
/// Activity-log slots: how many extents may be hot between two checkpoints.
pub const DEFAULT_AL_SLOTS: u32 = 2048;
/// Margin for the kernel's coarse timestamps when comparing ctimes with our clock.
const CLOCK_MARGIN_NS: i128 = 50_000_000;
/// How often the daemon writes its heartbeat.
pub const HEARTBEAT: std::time::Duration = std::time::Duration::from_millis(10);

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Primary,
    Replica,
}

/// `state.toml`: human-readable and versioned.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Config {
    pub format: u32,
    pub store_id: String,
    pub role: Role,
    pub created: String,
    pub block_size: u64,
    pub al_extent: u64,
    pub al_slots: u32,
    /// On a replica: the id of the store it replicates.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<String>,
    /// On a replica: its retention policy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keep: Option<String>,
    /// On a primary: where and how it replicates (`drfs protect`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replication: Option<Replication>,
}

/// `[replication]` in a primary's `state.toml`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Replication {
    /// The replica: a local directory.
    pub target: String,
    /// Time between cycles, e.g. `30s`, `5m`.
    pub interval: String,
    /// Retention policy, applied by the replica.
    pub keep: String,
    /// Consistency groups: `store` (one) or `dir` (one per top-level folder).
    pub group: String,
    /// The replica's own id, learned when it was bound to this store.
    pub replica_id: String,
}

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

#[derive(Debug, Clone)]
pub struct StateDir {
    store: PathBuf,
    dir: PathBuf,
}

impl StateDir {
    pub fn new(store: &Path) -> Self {
        StateDir {
            store: store.to_path_buf(),
            dir: store.join(STATE_DIR),
        }
    }

    pub fn store(&self) -> &Path {
        &self.store
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    pub fn exists(&self) -> bool {
        self.path("state.toml").is_file()
    }

    /// Creates a replica's state directory.
    pub fn init_replica(
        root: &Path,
        source: &str,
        block_size: u64,
        keep: &str,
    ) -> Result<(StateDir, Config)> {
        let sd = StateDir::new(root);
        let cfg = Config {
            format: FORMAT,
            store_id: new_id(),
            role: Role::Replica,
            created: rfc3339_now(),
            block_size,
            al_extent: DEFAULT_AL_EXTENT,
            al_slots: DEFAULT_AL_SLOTS,
            source: Some(source.to_string()),
            keep: Some(keep.to_string()),
            replication: None,
        };
        for d in ["", "points"] {
            let p = sd.dir.join(d);
            fs::create_dir_all(&p).at(&p)?;
            fs::set_permissions(&p, fs::Permissions::from_mode(0o700)).at(&p)?;
        }
        sd.write_config(&cfg)?;
        Ok((sd, cfg))
    }

    /// Creates the state directory on first use; checks the block size on later uses.
    pub fn open_or_init(store: &Path, block_size: Option<u64>) -> Result<(StateDir, Config)> {
        let sd = StateDir::new(store);
        if sd.exists() {
            let cfg = sd.config()?;
            if cfg.role == Role::Replica {
                return Err(Error::Invalid(format!(
                    "{} is a drfs replica, not a primary store (after a failover it is promoted first)",
                    store.display()
                )));
            }
            if let Some(bs) = block_size.filter(|&bs| bs != cfg.block_size) {
                return Err(Error::Invalid(format!(
                    "{} already tracks with --block-size {}; it cannot change to {} (remove {} to start tracking afresh)",
                    store.display(),
                    cfg.block_size,
                    bs,
                    sd.dir.display()
                )));
            }
            return Ok((sd, cfg));
        }
        let cfg = Config {
            format: FORMAT,
            store_id: new_id(),
            role: Role::Primary,
            created: rfc3339_now(),
            block_size: block_size.unwrap_or(DEFAULT_BLOCK),
            al_extent: DEFAULT_AL_EXTENT,
            al_slots: DEFAULT_AL_SLOTS,
            source: None,
            keep: None,
            replication: None,
        };
        for d in ["", "bitmaps", "log"] {
            let p = sd.dir.join(d);
            fs::create_dir_all(&p).at(&p)?;
            // Only root's business: the daemon runs with umask 0.
            fs::set_permissions(&p, fs::Permissions::from_mode(0o700)).at(&p)?;
        }
        sd.write_config(&cfg)?;
        Ok((sd, cfg))
    }

    /// Opens an existing state directory; a store never mounted is an error.
    pub fn open(store: &Path) -> Result<(StateDir, Config)> {
        let sd = StateDir::new(store);
        if !sd.exists() {
            return Err(Error::Invalid(format!(
                "{} is not a drfs store (no {}/state.toml); mount it with `drfs mount` first",
                store.display(),
                STATE_DIR
            )));
        }
        let cfg = sd.config()?;
        Ok((sd, cfg))
    }

    pub fn config(&self) -> Result<Config> {
        let p = self.path("state.toml");
        let text = fs::read_to_string(&p).at(&p)?;
        let cfg: Config = toml::from_str(&text).map_err(|e| Error::corrupt(&p, e.message()))?;
        if cfg.format != FORMAT {
            return Err(Error::corrupt(
                &p,
                format!("format {} (this drfs reads {FORMAT})", cfg.format),
            ));
        }
        if !cfg.block_size.is_power_of_two() || cfg.al_extent % cfg.block_size != 0 {
            return Err(Error::corrupt(&p, "block_size / al_extent invalid"));
        }
        Ok(cfg)
    }

    pub fn write_config(&self, cfg: &Config) -> Result<()> {
        let p = self.path("state.toml");
        let body = toml::to_string(cfg).map_err(|e| Error::Invalid(e.to_string()))?;
        let text = format!("# drfs store state; format {FORMAT}. Edit only with drfs.\n{body}");
        sys::write_atomic(&p, text.as_bytes()).at(&p)
    }

    /// Takes the exclusive daemon lock; fails if another daemon tracks this store.
    pub fn lock(&self) -> Result<File> {
        let p = self.path("lock");
        let f = OpenOptions::new()
            .create(true)
            .truncate(false)
            .read(true)
            .write(true)
            .open(&p)
            .at(&p)?;
        if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            let who = self
                .run_info()
                .map(|r| format!(" (daemon pid {} at {})", r.pid, r.mountpoint.display()))
                .unwrap_or_default();
            return Err(Error::Busy(format!(
                "store {} is already mounted{who}",
                self.store.display()
            )));
        }
        Ok(f)
    }

    /// Records that run `run` tracks the store now (after its reconcile: until then the
    /// previous run's markers still say how to judge the store).
    pub fn begin_run(&self, mountpoint: &Path, run: &RunStart) -> Result<()> {
        let info = RunInfo {
            pid: std::process::id() as i32,
            boot_id: sys::boot_id(),
            mountpoint: mountpoint.to_path_buf(),
            started: rfc3339_now(),
            run: Some(run.id),
            watch_ns: Some(run.watch_ns),
        };
        let p = self.path("run.json");
        let body = serde_json::to_vec_pretty(&info).map_err(|e| Error::Invalid(e.to_string()))?;
        sys::write_atomic(&p, &body).at(&p)?;
        let clean = self.path("clean.json");
        match fs::remove_file(&clean) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e).at(&clean),
            _ => {}
        }
        sys::fsync_dir(&self.dir).at(&self.dir)
    }

    /// How the previous run ended.
    pub fn last_stop(&self) -> Result<LastStop> {
        let clean = self.path("clean.json");
        if let Ok(text) = fs::read_to_string(&clean) {
            let m: CleanMarker =
                serde_json::from_str(&text).map_err(|e| Error::corrupt(&clean, e.to_string()))?;
            return Ok(LastStop::Clean {
                since_ns: m.since_ns,
            });
        }
        let Some(info) = self.run_info() else {
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
            alive_ns: self.heartbeat_ns().unwrap_or(0),
        }))
    }

    pub fn run_info(&self) -> Option<RunInfo> {
        let text = fs::read_to_string(self.path("run.json")).ok()?;
        serde_json::from_str(&text).ok()
    }

    /// Records a clean stop; call only once nothing can change the store through the mount.
    pub fn mark_clean(&self) -> Result<()> {
        // Any change through the mount happened before now; wait out coarse timestamps.
        std::thread::sleep(std::time::Duration::from_nanos(2 * CLOCK_MARGIN_NS as u64));
        let m = CleanMarker {
            since_ns: sys::now_ns() - CLOCK_MARGIN_NS,
            time: rfc3339_now(),
        };
        let p = self.path("clean.json");
        let body = serde_json::to_vec(&m).map_err(|e| Error::Invalid(e.to_string()))?;
        sys::write_atomic(&p, &body).at(&p)
    }

    pub fn is_clean(&self) -> bool {
        self.path("clean.json").exists()
    }

    /// The heartbeat file the daemon rewrites every `HEARTBEAT` while it runs.
    pub fn open_heartbeat(&self) -> Result<File> {
        let p = self.path("heartbeat");
        OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .read(true)
            .open(&p)
            .at(&p)
    }

    fn heartbeat_ns(&self) -> Option<i128> {
        let mut f = File::open(self.path("heartbeat")).ok()?;
        let mut b = [0u8; 16];
        f.read_exact(&mut b).ok()?;
        Some(i128::from_le_bytes(b))
    }
}

pub fn beat(f: &File) {
    let _ = f.write_all_at(&sys::now_ns().to_le_bytes(), 0);
}
