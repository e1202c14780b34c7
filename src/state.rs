//! The state directory `.drfs/` of a store or a replica: where it is, what is in it, and
//! its versioned config file `state.toml` (the role, the ids, the block size, and a
//! primary's replication settings). What a run of the store's tracking leaves there is
//! `primary::track::run`'s; a replica's history is `replica::posix`'s.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::{At, Error, Result};
use crate::model::fmt::rfc3339_now;
use crate::model::lineage::{Epoch, Promotion, Why};
use crate::model::new_id;
use crate::model::{Group, Interval, Target};
use crate::sys;

pub const STATE_DIR: &str = ".drfs";
pub const FORMAT: u32 = 1;
pub const DEFAULT_BLOCK: u64 = 64 * 1024;
/// Activity-log extent: the unit whose dirtiness survives a host crash.
pub const DEFAULT_AL_EXTENT: u64 = 64 * 1024 * 1024;
/// Activity-log slots: how many extents may be hot between two checkpoints.
pub const DEFAULT_AL_SLOTS: u32 = 2048;
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
    /// On a promoted replica: the failover that made it a primary.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub promoted: Option<Promotion>,
    /// On a primary being failed over (`drfs failover --planned`): it is locked against
    /// writes and `drfs mount` refuses it, until the failover completes (then it is a
    /// replica) or is run again.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub locked: Option<Locked>,
    /// The generation history, oldest first (`model::lineage`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub lineage: Vec<Epoch>,
}

/// `[locked]`: a planned failover to `replica` began at `time`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Locked {
    pub replica: String,
    pub time: String,
}

/// `[replication]` in a primary's `state.toml`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Replication {
    /// The replica: a local directory or `ssh://[user@]host[:port]/path`.
    pub target: Target,
    /// Time between cycles, e.g. `30s`, `5m`, or `manual`.
    pub interval: Interval,
    /// Retention policy, applied by the replica.
    pub keep: String,
    /// Consistency groups: `store` (one) or `dir` (one per top-level folder).
    pub group: Group,
    /// The replica's own id, learned when it was bound to this store.
    pub replica_id: String,
    /// With a manual interval: how often `drfs ship` is expected to run, for the lag
    /// alarms (none: no alarm can tell that cron stopped).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expect_every: Option<Interval>,
    /// For an ssh:// replica: the ssh client command (`--ssh-command`), none for `ssh`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ssh_command: Option<String>,
    /// How the stream is compressed (`--compress`); none: the target's default (zstd
    /// over ssh, none locally).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub compress: Option<crate::model::settings::Compress>,
    /// The cap on bytes per second on the wire (`--bwlimit`), none: uncapped.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bwlimit: Option<crate::model::settings::BwLimit>,
    /// Cycles are paused (`drfs pause`): changes are tracked, nothing ships.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub paused: Option<Pause>,
    /// Pre- and post-cut hooks: application-consistent points.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hooks: Option<Hooks>,
}

/// `[replication.hooks]`: commands run around each consistency group's cut.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Hooks {
    /// Run in order before the cut (e.g. a freeze).
    #[serde(default)]
    pub pre: Vec<String>,
    /// Run in reverse order right after the cut (e.g. the thaw).
    #[serde(default)]
    pub post: Vec<String>,
    /// How often a cycle is application-consistent (none: every cycle).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub every: Option<Interval>,
    /// A hook running longer is killed (seconds).
    pub timeout_s: u64,
}

/// The hook timeout when none is given.
pub const DEFAULT_HOOK_TIMEOUT_S: u64 = 30;

/// `[replication.paused]`: since when, and until when (none: until `drfs resume`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Pause {
    pub since: String,
    pub since_ns: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub until: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub until_ns: Option<i64>,
}

impl Replication {
    /// The pause in force at `now_ns`, if any (one whose end has passed is over).
    pub fn paused_at(&self, now_ns: i64) -> Option<&Pause> {
        self.paused
            .as_ref()
            .filter(|p| p.until_ns.is_none_or(|u| now_ns < u))
    }

    /// The time between cycles the lag alarms go by: the interval, or the cadence a
    /// manual (cron) schedule is expected to keep.
    pub fn cadence(&self) -> Option<std::time::Duration> {
        self.interval
            .every()
            .or_else(|| self.expect_every.and_then(|e| e.every()))
    }
}

/// A new epoch of a lineage, beginning now.
pub fn epoch(why: Why, peer: Option<&str>, point: Option<&str>) -> Epoch {
    Epoch {
        id: new_id(),
        why,
        time: rfc3339_now(),
        time_ns: sys::now_ns() as i64,
        peer: peer.map(str::to_string),
        point: point.map(str::to_string),
    }
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
            promoted: None,
            locked: None,
            lineage: vec![epoch(Why::Replica, Some(source), None)],
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
            if let Some(l) = &cfg.locked {
                return Err(Error::Invalid(format!(
                    "{} is locked by a planned failover to {} (begun {}); run `drfs failover {} --planned` again to finish it",
                    store.display(),
                    l.replica,
                    l.time,
                    store.display()
                )));
            }
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
            promoted: None,
            locked: None,
            lineage: vec![epoch(Why::Created, None, None)],
        };
        sd.make_primary_dirs()?;
        sd.write_config(&cfg)?;
        Ok((sd, cfg))
    }

    /// The directories a primary's tracking keeps its state in.
    pub fn make_primary_dirs(&self) -> Result<()> {
        for d in ["", "bitmaps", "log"] {
            let p = self.dir.join(d);
            fs::create_dir_all(&p).at(&p)?;
            // Only root's business: the daemon runs with umask 0.
            fs::set_permissions(&p, fs::Permissions::from_mode(0o700)).at(&p)?;
        }
        Ok(())
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

    /// Records (or clears) a planned failover's lock of this primary to `replica`;
    /// an existing lock keeps its time.
    pub fn set_locked(&self, replica: Option<&str>) -> Result<()> {
        let mut cfg = self.config()?;
        let want = match (replica, cfg.locked.take()) {
            (None, _) => None,
            (Some(r), Some(l)) if l.replica == r => Some(l),
            (Some(r), _) => Some(Locked {
                replica: r.to_string(),
                time: crate::model::fmt::rfc3339_now(),
            }),
        };
        cfg.locked = want;
        self.write_config(&cfg)
    }

    pub fn write_config(&self, cfg: &Config) -> Result<()> {
        let p = self.path("state.toml");
        let body = toml::to_string(cfg).map_err(Error::encode)?;
        let text = format!("# drfs store state; format {FORMAT}. Edit only with drfs.\n{body}");
        sys::write_atomic(&p, text.as_bytes()).at(&p)
    }
}
