//! Replication cycles on the primary: cut, ship, commit. One cycle: connect to the
//! receiver, check the replica is this store's and at the generation we last shipped (a
//! replica at another one has diverged: refuse, unless resyncing), cut, send every file's
//! changed blocks (or, for files under resync, only the blocks whose hashes differ), commit
//! the manifest, and on success clear the shipped bits. A failed cycle clears nothing: its
//! blocks go with the next cut.
//!
//! `STATE/cycle.json` (format v1) keeps what the next cycle needs and `drfs status` shows:
//! the replica's generation we last shipped, the cycle in flight (to recognise, after a
//! crash, a cycle the replica committed), the last cycle's figures and error, a history of
//! recent attempts, and whether replication stopped on an unrecoverable error.

pub mod schedule;

use std::path::Path;
use std::time::Instant;

use serde::{Deserialize, Serialize};

use crate::error::{At, Error, Result};
use crate::model::{Consistency, Manifest};
use crate::primary::track::Tracker;
use crate::ship::sender::{Shipper, Stats, refused, wire_err};
use crate::state::{Replication, StateDir};
use crate::sys;
use crate::wire::Msg;

pub const STATE_VERSION: u32 = 1;
const HISTORY: usize = 500;

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct InFlight {
    pub generation: u64,
    pub cut_id: String,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct LastCycle {
    pub time: String,
    pub time_ns: i64,
    pub ok: bool,
    pub duration_ms: u64,
    pub bytes: u64,
    pub data_bytes: u64,
    pub pause_us: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub point: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(default)]
    pub recoverable: bool,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct CycleState {
    pub version: u32,
    pub replica_id: Option<String>,
    /// The replica's latest generation as of our last successful cycle.
    pub generation: Option<u64>,
    pub point: Option<String>,
    pub point_time_ns: Option<i64>,
    pub in_flight: Option<InFlight>,
    pub last: Option<LastCycle>,
    /// Recent attempts: (time ns, succeeded).
    pub history: Vec<(i64, bool)>,
    /// Failed attempts in a row.
    pub failures: u32,
    /// Set when replication stopped on an unrecoverable error.
    pub critical: Option<String>,
}

impl CycleState {
    pub fn load(sd: &StateDir) -> Result<CycleState> {
        let p = sd.path("cycle.json");
        match std::fs::read(&p) {
            Ok(b) => serde_json::from_slice(&b).map_err(|e| Error::corrupt(&p, e.to_string())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(CycleState {
                version: STATE_VERSION,
                ..Default::default()
            }),
            Err(e) => Err(e).at(&p),
        }
    }

    pub fn save(&self, sd: &StateDir) -> Result<()> {
        let p = sd.path("cycle.json");
        let b = serde_json::to_vec_pretty(self).map_err(|e| Error::Invalid(e.to_string()))?;
        sys::write_atomic(&p, &b).at(&p)
    }

    fn attempt(&mut self, last: LastCycle) {
        self.history.push((last.time_ns, last.ok));
        if self.history.len() > HISTORY {
            self.history.drain(..self.history.len() - HISTORY);
        }
        if last.ok {
            self.failures = 0;
            self.critical = None;
        } else {
            self.failures += 1;
            if !last.recoverable {
                self.critical = last.error.clone();
            }
        }
        self.last = Some(last);
    }
}

/// What a cycle did.
#[derive(Debug, Clone)]
pub struct Outcome {
    pub ok: bool,
    pub message: String,
    pub recoverable: bool,
    pub point: Option<String>,
    pub stats: Stats,
    pub bytes: u64,
    pub pause_us: u64,
    pub duration_ms: u64,
}

impl Outcome {
    /// `drfs ship`'s exit code: 0 shipped, 1 recoverable failure, 2 unrecoverable.
    pub fn code(&self) -> i32 {
        match (self.ok, self.recoverable) {
            (true, _) => 0,
            (false, true) => 1,
            (false, false) => 2,
        }
    }
}

/// Options of one cycle.
#[derive(Debug, Clone, Copy, Default)]
pub struct CycleOpts {
    /// Compare every file by hash and accept the replica's latest point as the base.
    pub resync: bool,
    /// Show a progress bar on stderr (when it is a terminal).
    pub progress: bool,
    pub consistency: Option<Consistency>,
}

/// Runs one cycle of `tracker`'s store to its replica and records the result.
pub fn run(tracker: &Tracker, opts: CycleOpts) -> Outcome {
    let sd = tracker.state().clone();
    let started = Instant::now();
    let time_ns = sys::now_ns() as i64;
    let mut st = match CycleState::load(&sd) {
        Ok(s) => s,
        Err(e) => return failed(e, started),
    };
    let result = cycle(tracker, &mut st, opts);
    let duration_ms = started.elapsed().as_millis() as u64;
    let outcome = match result {
        Ok(o) => Outcome { duration_ms, ..o },
        Err(e) => failed(e, started),
    };
    st.attempt(LastCycle {
        time: crate::model::fmt::rfc3339_ns(i128::from(time_ns)),
        time_ns,
        ok: outcome.ok,
        duration_ms,
        bytes: outcome.bytes,
        data_bytes: outcome.stats.data_bytes,
        pause_us: outcome.pause_us,
        point: outcome.point.clone(),
        error: (!outcome.ok).then(|| outcome.message.clone()),
        recoverable: outcome.recoverable,
    });
    if let Err(e) = st.save(&sd) {
        tracing::error!("saving cycle state: {e}");
    }
    outcome
}

fn failed(e: Error, started: Instant) -> Outcome {
    Outcome {
        ok: false,
        recoverable: e.recoverable(),
        message: e.to_string(),
        point: None,
        stats: Stats::default(),
        bytes: 0,
        pause_us: 0,
        duration_ms: started.elapsed().as_millis() as u64,
    }
}

/// The replication settings as they are now (`drfs protect` may change them while mounted).
fn replication(tracker: &Tracker) -> Result<Replication> {
    tracker
        .state()
        .config()?
        .replication
        .ok_or_else(|| Error::Refused {
            message: format!(
                "{} is not protected: run `drfs protect {} --to REPLICA` first",
                tracker.state().store().display(),
                tracker.state().store().display()
            ),
            recoverable: false,
        })
}

fn cycle(tracker: &Tracker, st: &mut CycleState, opts: CycleOpts) -> Result<Outcome> {
    let rep = replication(tracker)?;
    let cfg = tracker.config();
    let mut conn = crate::transport::local::connect(&rep.target)?;
    let r = handshake(tracker, st, &rep, &mut conn, opts);
    match r {
        Ok(o) => {
            let _ = conn.w.msg(&Msg::Bye);
            conn.finish();
            Ok(o)
        }
        Err(e) => {
            let (code, why) = conn.abort();
            tracing::warn!("cycle of {} failed: {e} ({why})", cfg.store_id);
            // A broken pipe says little: the receiver's own words say why it stopped.
            match (&e, why.is_empty()) {
                (Error::Invalid(m), false) if m.starts_with("replica connection") => {
                    Err(Error::Refused {
                        message: format!("replica: {why}"),
                        recoverable: code != Some(2),
                    })
                }
                _ => Err(e),
            }
        }
    }
}

fn handshake(
    tracker: &Tracker,
    st: &mut CycleState,
    rep: &Replication,
    conn: &mut crate::transport::local::Conn,
    opts: CycleOpts,
) -> Result<Outcome> {
    let cfg = tracker.config();
    conn.w
        .msg(&Msg::Hello {
            store_id: cfg.store_id.clone(),
            block_size: cfg.block_size,
            init: false,
            keep: rep.keep.clone(),
        })
        .map_err(wire_err)?;
    let (source, replica_id, latest) = match conn.r.msg().map_err(wire_err)? {
        Msg::Welcome {
            replica_id,
            source,
            latest,
        } => (source, replica_id, latest),
        Msg::Error {
            message,
            recoverable,
        } => return Err(refused(message, recoverable)),
        m => {
            return Err(Error::Invalid(format!(
                "unexpected answer from the replica: {m:?}"
            )));
        }
    };
    if source.as_deref() != Some(cfg.store_id.as_str()) || replica_id != rep.replica_id {
        return Err(refused(
            format!(
                "{} is not the replica this store was protected with",
                rep.target
            ),
            false,
        ));
    }
    // A cycle the replica committed just before we lost track of it (a crash).
    if let (Some(f), Some(l)) = (&st.in_flight, &latest) {
        if f.generation == l.generation && f.cut_id == l.cut_id {
            st.generation = Some(l.generation);
            st.point = Some(l.id.clone());
        }
    }
    st.in_flight = None;
    let theirs = latest.as_ref().map(|l| l.generation);
    if theirs != st.generation && !opts.resync {
        return Err(refused(
            format!(
                "the replica is at generation {} but this store last shipped {}: the copies have diverged; `drfs ship --resync` compares every block and starts again from the replica's latest point",
                theirs.map_or("none".into(), |g| g.to_string()),
                st.generation.map_or("none".into(), |g| g.to_string())
            ),
            false,
        ));
    }
    let generation = theirs.unwrap_or(0) + 1;
    let cut_id = crate::model::new_id();
    st.in_flight = Some(InFlight {
        generation,
        cut_id: cut_id.clone(),
    });
    st.save(tracker.state())?;
    // A replica without a point yet gets an initial replication: every file is compared
    // by hash, so nothing is assumed about it (and a copy placed there seeds it).
    let opts = CycleOpts {
        resync: opts.resync || theirs.is_none(),
        ..opts
    };
    let cut = tracker.cut(rep.group == "dir", opts.resync)?;
    let pause_us = cut.pause.as_micros() as u64;
    let r = send_cut(tracker, conn, &cut, generation, theirs, &cut_id, opts);
    tracker.end_cycle(&cut, r.is_ok())?;
    let (point, stats) = r?;
    st.generation = Some(generation);
    st.point = Some(point.clone());
    st.point_time_ns = Some(cut.time_ns);
    st.in_flight = None;
    Ok(Outcome {
        ok: true,
        message: format!("point {point} shipped"),
        recoverable: true,
        point: Some(point),
        stats,
        bytes: conn.w.bytes,
        pause_us,
        duration_ms: 0,
    })
}

fn send_cut(
    tracker: &Tracker,
    conn: &mut crate::transport::local::Conn,
    cut: &crate::primary::track::cut::Cut,
    generation: u64,
    base: Option<u64>,
    cut_id: &str,
    opts: CycleOpts,
) -> Result<(String, Stats)> {
    let bs = tracker.block_size();
    conn.w
        .msg(&Msg::Begin {
            generation,
            base,
            cut_id: cut_id.to_string(),
            resync: opts.resync,
        })
        .map_err(wire_err)?;
    let in_manifest: std::collections::HashSet<_> =
        cut.entries.iter().filter_map(|e| e.id).collect();
    let files: Vec<_> = cut
        .files
        .iter()
        .filter(|f| in_manifest.contains(&f.id))
        .collect();
    let progress = progress_bar(
        opts.progress,
        files
            .iter()
            .map(|f| Shipper::<Vec<u8>, &[u8]>::planned(f, bs))
            .sum(),
    );
    let mut sh = Shipper::new(&mut conn.w, &mut conn.r, bs, progress);
    for f in files {
        if f.resync {
            sh.resync(f)?;
        } else {
            sh.dirty(f)?;
        }
    }
    let stats = sh.stats;
    if let Some(p) = sh.progress.take() {
        p.finish_and_clear();
    }
    let manifest = Manifest {
        version: crate::model::manifest::POINT_VERSION,
        generation,
        cut_id: cut_id.to_string(),
        time: crate::model::fmt::rfc3339_ns(i128::from(cut.time_ns)),
        time_ns: cut.time_ns,
        consistency: opts.consistency.unwrap_or(Consistency::Crash),
        block_size: bs,
        groups: cut.groups.clone(),
        entries: cut.entries.clone(),
    };
    conn.w
        .msg(&Msg::Commit {
            manifest: Box::new(manifest),
        })
        .map_err(wire_err)?;
    match conn.r.msg().map_err(wire_err)? {
        Msg::Done { point, .. } => Ok((point.id, stats)),
        Msg::Error {
            message,
            recoverable,
        } => Err(refused(message, recoverable)),
        m => Err(Error::Invalid(format!(
            "unexpected answer to the commit: {m:?}"
        ))),
    }
}

fn progress_bar(wanted: bool, total: u64) -> Option<indicatif::ProgressBar> {
    use std::io::IsTerminal;
    if !wanted || !std::io::stderr().is_terminal() {
        return None;
    }
    let pb = indicatif::ProgressBar::new(total);
    if let Ok(style) = indicatif::ProgressStyle::with_template(
        "{spinner} shipping {bytes}/{total_bytes} [{wide_bar}] {binary_bytes_per_sec} eta {eta}",
    ) {
        pb.set_style(style);
    }
    Some(pb)
}

/// Binds `replica` (a directory) to the store of `tracker_cfg` (`drfs protect`).
/// Returns the replica's id.
pub fn bind(store_id: &str, block_size: u64, target: &Path, keep: &str) -> Result<String> {
    let target_s = target.display().to_string();
    let mut conn = crate::transport::local::connect(&target_s)?;
    conn.w
        .msg(&Msg::Hello {
            store_id: store_id.to_string(),
            block_size,
            init: true,
            keep: keep.to_string(),
        })
        .map_err(wire_err)?;
    let r = match conn.r.msg().map_err(wire_err)? {
        Msg::Welcome { replica_id, .. } => Ok(replica_id),
        Msg::Error {
            message,
            recoverable,
        } => Err(refused(message, recoverable)),
        m => Err(Error::Invalid(format!(
            "unexpected answer from the replica: {m:?}"
        ))),
    };
    match &r {
        Ok(_) => {
            let _ = conn.w.msg(&Msg::Bye);
            conn.finish();
        }
        Err(_) => {
            let _ = conn.abort();
        }
    }
    r
}

/// `drfs protect`: records where and how a store replicates, binding the replica to it.
pub fn protect(
    store: &Path,
    to: &Path,
    interval: &str,
    keep: &str,
    group: &str,
) -> Result<Replication> {
    schedule::check_interval(interval).map_err(Error::Invalid)?;
    crate::model::retention::Policy::parse(keep).map_err(Error::Invalid)?;
    if group != "store" && group != "dir" {
        return Err(Error::Invalid(format!(
            "--group must be store or dir, not {group:?}"
        )));
    }
    let store = store
        .canonicalize()
        .map_err(|e| Error::Invalid(format!("store {}: {e}", store.display())))?;
    if !store.is_dir() {
        return Err(Error::Invalid(format!(
            "store {} is not a directory",
            store.display()
        )));
    }
    let replica = to
        .canonicalize()
        .map_err(|e| Error::Invalid(format!("replica {}: {e}", to.display())))?;
    if !replica.is_dir() {
        return Err(Error::Invalid(format!(
            "replica {} is not a directory",
            replica.display()
        )));
    }
    if replica.starts_with(&store) || store.starts_with(&replica) {
        return Err(Error::Invalid(format!(
            "store {} and replica {} must not contain each other",
            store.display(),
            replica.display()
        )));
    }
    let (sd, mut cfg) = StateDir::open_or_init(&store, None)?;
    let replica_id = bind(&cfg.store_id, cfg.block_size, &replica, keep)?;
    let rep = Replication {
        target: replica.display().to_string(),
        interval: interval.to_string(),
        keep: keep.to_string(),
        group: group.to_string(),
        replica_id: replica_id.clone(),
    };
    if cfg
        .replication
        .as_ref()
        .is_none_or(|r| r.replica_id != replica_id)
    {
        let p = sd.path("cycle.json");
        if p.exists() {
            std::fs::remove_file(&p).at(&p)?;
        }
    }
    cfg.replication = Some(rep.clone());
    sd.write_config(&cfg)?;
    Ok(rep)
}
