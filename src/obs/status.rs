//! `drfs status`: the state and health of a primary store or of a replica, after
//! Hyper-V Replica's model.
//!
//! Primary health:
//! - **Critical**: replication stopped on an unrecoverable error (diverged replica, a
//!   replica of another store, permission denied, corrupt state), or the newest point is
//!   older than max(1 hour, 12 × interval).
//! - **Warning**: the last cycle failed; more than 20 % of the last hour's cycles failed;
//!   the newest point is older than 3 × interval; no point yet; initial replication or a
//!   resync is pending for some file. (With `--interval manual` there is no lag rule.)
//! - **Normal**: otherwise (and a store that is not protected).
//!
//! Replica health: Warning while it has no point yet or an apply was interrupted (it
//! finishes at the next receive); Normal otherwise. The primary judges the RPO.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::error::Result;
use crate::model::FileId;
use crate::model::PointInfo;
use crate::primary::cycle::{CycleState, LastCycle};
use crate::primary::track::{self, Tracker};
use crate::replica::posix::Replica;
use crate::state::StateDir;
use crate::sys;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Health {
    Normal,
    Warning,
    Critical,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct FileStatus {
    pub path: String,
    pub id: FileId,
    pub health: Health,
    pub pending_bytes: u64,
    pub needs_resync: bool,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct StoreStatus {
    pub path: String,
    pub role: String,
    pub mounted: bool,
    pub protected: bool,
    pub replica: Option<String>,
    pub interval: Option<String>,
    pub state: String,
    pub health: Health,
    pub reasons: Vec<String>,
    pub last_point: Option<String>,
    pub last_point_time: Option<String>,
    pub rpo_lag_s: Option<f64>,
    pub pending_bytes: u64,
    pub last_cycle: Option<LastCycle>,
    pub last_error: Option<String>,
    pub failed_last_hour: u32,
    pub cycles_last_hour: u32,
    /// What the last crash cost, as the mount after it found it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_recovery: Option<track::recovery::Recovery>,
    pub files: Vec<FileStatus>,
}

/// A primary's status; `live` is the running daemon's tracker, if this is the daemon.
pub fn store(sd: &StateDir, live: Option<&Tracker>, mounted: bool) -> Result<StoreStatus> {
    let cfg = sd.config()?;
    let st = CycleState::load(sd)?;
    let pending: Vec<(FileId, String, u64, bool)> = match live {
        Some(t) => t
            .pending()?
            .into_iter()
            .map(|(id, p, b, r)| (id, p.to_string(), b, r))
            .collect(),
        None => {
            let table = track::load_table(sd)?;
            let mut v = Vec::new();
            for f in table.entries() {
                let runs = track::bitmap_ranges(sd, cfg.block_size, f.id)?;
                let bytes = runs.iter().map(|(a, b)| b - a).sum::<u64>() * cfg.block_size;
                let path = f.paths.first().map(|p| p.to_string()).unwrap_or_default();
                v.push((f.id, path, bytes, f.needs_resync));
            }
            v
        }
    };
    let now = sys::now_ns() as i64;
    let rep = cfg.replication.clone();
    let interval = rep.as_ref().and_then(|r| r.interval.every());
    let lag = st.point_time_ns.map(|t| (now - t) as f64 / 1e9);
    let hour_ago = now - 3_600_000_000_000;
    let recent: Vec<bool> = st
        .history
        .iter()
        .filter(|(t, _)| *t >= hour_ago)
        .map(|(_, ok)| *ok)
        .collect();
    let failed = recent.iter().filter(|ok| !**ok).count() as u32;
    let resyncing = pending.iter().filter(|p| p.3).count();
    let mut reasons = Vec::new();
    let mut health = Health::Normal;
    let mut raise = |h: Health, why: String| {
        health = health.max(h);
        reasons.push(why);
    };
    if rep.is_some() {
        if let Some(c) = &st.critical {
            raise(Health::Critical, format!("replication stopped: {c}"));
        }
        // The lag rules need an interval: a manual (cron) schedule has none.
        if let Some(iv) = interval {
            let crit_lag = Duration::from_secs(3600).max(iv * 12).as_secs_f64();
            let warn_lag = (iv * 3).as_secs_f64();
            match lag {
                Some(l) if l > crit_lag => {
                    raise(Health::Critical, format!("newest point is {l:.0} s old"))
                }
                Some(l) if l > warn_lag => {
                    raise(Health::Warning, format!("newest point is {l:.0} s old"))
                }
                _ => {}
            }
        }
        if lag.is_none() {
            raise(
                Health::Warning,
                "no recovery point yet (initial replication)".into(),
            );
        }
        if st.last.as_ref().is_some_and(|l| !l.ok) && st.critical.is_none() {
            raise(
                Health::Warning,
                format!("last cycle failed ({} in a row)", st.failures),
            );
        }
        if !recent.is_empty() && failed * 5 > recent.len() as u32 {
            raise(
                Health::Warning,
                format!(
                    "{failed} of {} cycles failed in the last hour",
                    recent.len()
                ),
            );
        }
        if resyncing > 0 {
            raise(
                Health::Warning,
                format!("{resyncing} file(s) wait for a full resync"),
            );
        }
    }
    let state = match (&rep, &st) {
        (None, _) => "not protected",
        (Some(_), s) if s.critical.is_some() => "stopped",
        (Some(_), s) if s.point.is_none() => "initial replication",
        _ if resyncing > 0 => "resync pending",
        _ => "replicating",
    };
    let files = pending
        .iter()
        .map(|(id, path, bytes, resync)| FileStatus {
            path: path.clone(),
            id: *id,
            health: if *resync {
                Health::Warning
            } else {
                Health::Normal
            },
            pending_bytes: *bytes,
            needs_resync: *resync,
        })
        .collect();
    Ok(StoreStatus {
        path: sd.store().display().to_string(),
        role: "primary".into(),
        mounted,
        protected: rep.is_some(),
        replica: rep.as_ref().map(|r| r.target.to_string()),
        interval: rep.as_ref().map(|r| r.interval.to_string()),
        state: state.into(),
        health,
        reasons,
        last_point: st.point.clone(),
        last_point_time: st
            .point_time_ns
            .map(|t| crate::model::fmt::rfc3339_ns(i128::from(t))),
        rpo_lag_s: lag,
        pending_bytes: pending.iter().map(|p| p.2).sum(),
        last_error: st.last.as_ref().and_then(|l| l.error.clone()),
        last_cycle: st.last.clone(),
        failed_last_hour: failed,
        cycles_last_hour: recent.len() as u32,
        last_recovery: track::recovery::Recovery::load(&sd.path("recovery.json")),
        files,
    })
}

#[derive(Debug, Serialize)]
pub struct ReplicaStatus {
    pub path: String,
    pub role: &'static str,
    pub source: Option<String>,
    pub keep: String,
    pub health: Health,
    pub reasons: Vec<String>,
    pub points: usize,
    pub latest: Option<PointInfo>,
    pub latest_age_s: Option<f64>,
    pub oldest: Option<PointInfo>,
    /// The running test failover, if any.
    pub test_failover: Option<crate::mounts::test_failover::Running>,
}

pub fn replica(r: &Replica) -> Result<ReplicaStatus> {
    let points = r.points()?;
    let latest = r.latest()?;
    let now = sys::now_ns() as i64;
    let mut reasons = Vec::new();
    if latest.is_none() {
        reasons.push("no recovery point yet".to_string());
    }
    if r.sd.path("journal.json").exists() {
        reasons.push("an apply was interrupted; the next receive finishes it".to_string());
    }
    Ok(ReplicaStatus {
        path: r.root.display().to_string(),
        role: "replica",
        source: r.cfg.source.clone(),
        keep: r
            .cfg
            .keep
            .clone()
            .unwrap_or_else(|| crate::model::retention::DEFAULT.into()),
        health: if reasons.is_empty() {
            Health::Normal
        } else {
            Health::Warning
        },
        reasons,
        points: points.len(),
        latest_age_s: latest.as_ref().map(|p| (now - p.time_ns) as f64 / 1e9),
        latest,
        oldest: points.first().cloned(),
        test_failover: crate::mounts::test_failover::running(r),
    })
}
