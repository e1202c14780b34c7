//! `drfs status`: the state and health of a primary store or of a replica, after
//! Hyper-V Replica's model.
//!
//! Primary health:
//! - **Critical**: replication stopped on an unrecoverable error (diverged replica, a
//!   replica of another store, permission denied, corrupt state), or the newest point is
//!   older than max(1 hour, 12 × interval).
//! - **Warning**: the last cycle failed; more than 20 % of the last hour's cycles failed;
//!   the newest point is older than 3 × interval; no point yet; initial replication or a
//!   resync is pending for some file. With `--interval manual` the lag rules use the
//!   expected cadence (`--expect-every`); without one there is no lag rule. While cycles
//!   are paused, a point older than 3 × interval is a Warning, never Critical.
//! - **Normal**: otherwise (and a store that is not protected).
//!
//! Replica health: Warning while it has no point yet or an apply was interrupted (it
//! finishes at the next receive); Normal otherwise. The primary judges the RPO.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::model::lineage::Why;

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
    /// primary, promoted (by a failover), or locked by a planned failover.
    pub role: String,
    /// The failover history: the store's epochs, oldest first.
    #[serde(default)]
    pub lineage: Vec<crate::model::lineage::Epoch>,
    pub mounted: bool,
    pub protected: bool,
    pub replica: Option<String>,
    pub interval: Option<String>,
    /// With a manual interval: the cadence `drfs ship` is expected to keep.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expect_every: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keep: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group: Option<String>,
    /// Cycles are paused (`drfs pause`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub paused: Option<crate::state::Pause>,
    /// The daemon's process, while the store is mounted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub daemon_pid: Option<i32>,
    pub state: String,
    pub health: Health,
    pub reasons: Vec<String>,
    pub last_point: Option<String>,
    pub last_point_time: Option<String>,
    pub rpo_lag_s: Option<f64>,
    pub pending_bytes: u64,
    /// The bandwidth cap in force now (bytes per second), if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bwlimit_bps: Option<u64>,
    /// How long the pending bytes take at that cap, in seconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub eta_at_cap_s: Option<f64>,
    pub last_cycle: Option<LastCycle>,
    pub last_error: Option<String>,
    pub failed_last_hour: u32,
    pub cycles_last_hour: u32,
    /// The newest point's cut, in nanoseconds since the epoch.
    #[serde(default)]
    pub last_point_time_ns: Option<i64>,
    /// When the last successful cycle started (ns since the epoch).
    #[serde(default)]
    pub last_success_time_ns: Option<i64>,
    /// Failed cycles in a row.
    #[serde(default)]
    pub consecutive_failures: u32,
    /// Every cycle so far, added up.
    #[serde(default)]
    pub totals: crate::primary::cycle::Totals,
    /// The cut time of the newest application-consistent point (ns since the epoch).
    #[serde(default)]
    pub last_app_consistent_time_ns: Option<i64>,
    /// Pre- and post-cut hooks are set.
    #[serde(default)]
    pub hooks: bool,
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
    let cadence = rep.as_ref().and_then(|r| r.cadence());
    let paused = rep.as_ref().and_then(|r| r.paused_at(now)).cloned();
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
    let cap = rep
        .as_ref()
        .and_then(|r| r.bwlimit.as_ref())
        .and_then(|b| b.rate_at(crate::transport::limit::local_minute()));
    let pending_total: u64 = pending.iter().map(|p| p.2).sum();
    let mut reasons = Vec::new();
    let mut health = Health::Normal;
    let mut raise = |h: Health, why: String| {
        health = health.max(h);
        reasons.push(why);
    };
    if let (Some(p), None) = (&cfg.promoted, &rep) {
        raise(
            Health::Warning,
            format!(
                "failed over at {} to point {}; nothing replicates it: `drfs reprotect {} --to OLD_PRIMARY` or `drfs protect`",
                p.time,
                p.point,
                sd.store().display()
            ),
        );
    }
    if rep.is_some() {
        if let Some(c) = &st.critical {
            raise(Health::Critical, format!("replication stopped: {c}"));
        }
        // The lag rules need a cadence: an interval, or a manual schedule's expected one.
        if let Some(iv) = cadence {
            let crit_lag = Duration::from_secs(3600).max(iv * 12).as_secs_f64();
            let warn_lag = (iv * 3).as_secs_f64();
            let old = |l: f64| format!("newest point is {} old", age(l));
            match (lag, &paused) {
                (Some(l), Some(p)) if l > warn_lag => raise(
                    Health::Warning,
                    format!("{}; cycles are paused since {}", old(l), p.since),
                ),
                (Some(l), None) if l > crit_lag => raise(Health::Critical, old(l)),
                (Some(l), None) if l > warn_lag => raise(Health::Warning, old(l)),
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
        if let Some(h) = &st.hook_failure {
            raise(
                Health::Warning,
                format!("the last application-consistent cut gave a crash point: {h}"),
            );
        }
        // A cycle longer than its interval: cycles pile up, the RPO grows.
        if let (Some(iv), Some(l)) = (cadence, st.last.as_ref().filter(|l| l.ok)) {
            if Duration::from_millis(l.duration_ms) > iv {
                let at = cap.map_or(String::new(), |r| {
                    format!(" at {}/s", crate::model::fmt::human(r))
                });
                raise(
                    Health::Warning,
                    format!(
                        "cycle took {:.0} s{at}; interval {} s",
                        l.duration_ms as f64 / 1000.0,
                        iv.as_secs()
                    ),
                );
            }
        }
        if resyncing > 0 {
            raise(
                Health::Warning,
                format!("{} a full resync", plural_wait(resyncing)),
            );
        }
    }
    let state = state(rep.as_ref(), &st, mounted, paused.as_ref(), resyncing);
    let mut pending = pending;
    pending.sort_by(|a, b| a.1.cmp(&b.1));
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
        role: match (&cfg.promoted, &cfg.locked) {
            (_, Some(_)) => "primary (locked by a planned failover)".into(),
            (Some(p), None) if !p.committed => "promoted (failover not committed)".into(),
            (Some(_), None) => "promoted".into(),
            (None, None) => "primary".into(),
        },
        lineage: cfg.lineage.clone(),
        mounted,
        protected: rep.is_some(),
        replica: rep.as_ref().map(|r| r.target.to_string()),
        interval: rep.as_ref().map(|r| r.interval.to_string()),
        expect_every: rep
            .as_ref()
            .and_then(|r| r.expect_every.map(|e| e.to_string())),
        keep: rep.as_ref().map(|r| r.keep.clone()),
        group: rep.as_ref().map(|r| r.group.to_string()),
        paused,
        daemon_pid: live.map(|_| std::process::id() as i32),
        state,
        health,
        reasons,
        last_point: st.point.clone(),
        last_point_time: st
            .point_time_ns
            .map(|t| crate::model::fmt::rfc3339_ns(i128::from(t))),
        rpo_lag_s: lag,
        pending_bytes: pending_total,
        bwlimit_bps: cap,
        eta_at_cap_s: cap.map(|r| pending_total as f64 / r as f64),
        last_error: st.last.as_ref().and_then(|l| l.error.clone()),
        last_cycle: st.last.clone(),
        failed_last_hour: failed,
        cycles_last_hour: recent.len() as u32,
        last_point_time_ns: st.point_time_ns,
        last_success_time_ns: st.last_ok_ns,
        consecutive_failures: st.failures,
        totals: st.totals,
        last_app_consistent_time_ns: st.last_app_ns,
        hooks: rep.as_ref().is_some_and(|r| r.hooks.is_some()),
        last_recovery: track::recovery::Recovery::load(&sd.path("recovery.json")),
        files,
    })
}

#[derive(Debug, Serialize)]
pub struct ReplicaStatus {
    pub path: String,
    /// replica, or demoted (a primary that became this replica by a failover).
    pub role: &'static str,
    /// The failover history: the replica's epochs, oldest first.
    pub lineage: Vec<crate::model::lineage::Epoch>,
    /// Extended replication: where it ships onward, and the point that replica holds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub onward: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub onward_point: Option<String>,
    pub source: Option<String>,
    pub keep: String,
    pub health: Health,
    pub reasons: Vec<String>,
    pub points: usize,
    pub latest: Option<PointInfo>,
    pub latest_age_s: Option<f64>,
    pub oldest: Option<PointInfo>,
    /// Bytes the undo records of all points take on disk.
    pub undo_bytes: u64,
    /// When the last `drfs verify` finished, and how many bad blocks it found.
    pub verified: Option<String>,
    pub verify_bad_blocks: Option<u64>,
    /// The running test failover, if any.
    pub test_failover: Option<crate::mounts::test_failover::Running>,
}

/// "1 file waits for", "3 files wait for".
fn plural_wait(n: usize) -> String {
    if n == 1 {
        "1 file waits for".into()
    } else {
        format!("{n} files wait for")
    }
}

/// An age in the unit that reads best: `42 s`, `17 min`, `3.5 h`, `2.0 d`.
pub fn age(s: f64) -> String {
    if s < 120.0 {
        format!("{s:.0} s")
    } else if s < 7200.0 {
        format!("{:.0} min", s / 60.0)
    } else if s < 172_800.0 {
        format!("{:.1} h", s / 3600.0)
    } else {
        format!("{:.1} d", s / 86400.0)
    }
}

/// What the store is doing, in words.
fn state(
    rep: Option<&crate::state::Replication>,
    st: &CycleState,
    mounted: bool,
    paused: Option<&crate::state::Pause>,
    resyncing: usize,
) -> String {
    let Some(rep) = rep else {
        return "not protected".into();
    };
    if st.critical.is_some() {
        return "stopped (an operator must act: see the reasons)".into();
    }
    if let Some(p) = paused {
        let until = p
            .until
            .as_deref()
            .map_or("drfs resume".to_string(), |u| u.to_string());
        return format!(
            "paused since {} (until {until}); changes are tracked",
            p.since
        );
    }
    let manual = rep.interval == crate::model::Interval::Manual;
    if !mounted && !manual {
        return "not mounted: nothing ships until it is mounted, or drfs ship runs (cron)".into();
    }
    let doing = if st.point.is_none() {
        "initial replication"
    } else if resyncing > 0 {
        "resync pending"
    } else {
        "replicating"
    };
    if manual {
        format!("{doing}, when drfs ship runs")
    } else {
        doing.into()
    }
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
    let verified = crate::replica::posix::verify::last(r).filter(|v| v.finished.is_some());
    if let Some(v) = verified.as_ref().filter(|v| !v.bad.is_empty()) {
        reasons.push(format!(
            "drfs verify (finished {}) found {} that fail their BLAKE3 (drfs verify --json lists them)",
            v.finished.as_deref().unwrap_or("?"),
            crate::model::fmt::plural(v.bad.len() as u64, "block")
        ));
    }
    Ok(ReplicaStatus {
        path: r.root.display().to_string(),
        role: if r.cfg.lineage.iter().any(|e| e.why == Why::Demoted) {
            "demoted"
        } else {
            "replica"
        },
        lineage: r.cfg.lineage.clone(),
        onward: r.cfg.replication.as_ref().map(|x| x.target.to_string()),
        onward_point: crate::replica::posix::relay::pinned(r),
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
        undo_bytes: r.undo_bytes()?,
        verified: verified.as_ref().and_then(|v| v.finished.clone()),
        verify_bad_blocks: verified.as_ref().map(|v| v.bad.len() as u64),
        test_failover: crate::mounts::test_failover::running(r),
    })
}
