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
pub mod source;

use std::sync::Arc;
use std::time::Instant;

use serde::{Deserialize, Serialize};

use crate::error::{At, Class, Error, Result};
use crate::model::progress::Progress;
use crate::model::{Consistency, Group, Manifest};
use crate::primary::track::Tracker;
use crate::ship::sender::Stats;
use crate::ship::session::{self, Cycle, Hello};
use crate::state::{Replication, StateDir};
use crate::sys;
use crate::transport::{self, Link};

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
    /// The bytes on the wire, after compression (0 in records from before it).
    #[serde(default)]
    pub wire_bytes: u64,
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
        let b = serde_json::to_vec_pretty(self).map_err(Error::encode)?;
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
    /// For a failure: whether a retry can help.
    pub class: Class,
    pub point: Option<String>,
    pub stats: Stats,
    pub bytes: u64,
    /// The bytes on the wire, after compression.
    pub wire_bytes: u64,
    pub pause_us: u64,
    pub duration_ms: u64,
}

impl Outcome {
    /// `drfs ship`'s exit code: 0 shipped, else by the failure's class.
    pub fn code(&self) -> i32 {
        if self.ok { 0 } else { self.class.exit_code() }
    }
}

/// Options of one cycle.
#[derive(Clone, Default)]
pub struct CycleOpts {
    /// Compare every file by hash and accept the replica's latest point as the base.
    pub resync: bool,
    /// Told how far shipping has got (the command line draws it on a terminal).
    pub progress: Option<Arc<dyn Progress>>,
    pub consistency: Option<Consistency>,
}

/// Runs one cycle of `tracker`'s store to its replica and records the result. While
/// cycles are paused nothing runs and nothing is recorded.
pub fn run(tracker: &Tracker, opts: CycleOpts) -> Outcome {
    let sd = tracker.state().clone();
    let started = Instant::now();
    let time_ns = sys::now_ns() as i64;
    if let Some(e) = paused(&sd, time_ns) {
        return failed(e, started);
    }
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
        wire_bytes: outcome.wire_bytes,
        data_bytes: outcome.stats.data_bytes,
        pause_us: outcome.pause_us,
        point: outcome.point.clone(),
        error: (!outcome.ok).then(|| outcome.message.clone()),
        recoverable: outcome.class.is_transient(),
    });
    if let Err(e) = st.save(&sd) {
        tracing::error!("saving cycle state: {e}");
    }
    outcome
}

fn failed(e: Error, started: Instant) -> Outcome {
    Outcome {
        ok: false,
        class: e.class(),
        message: e.to_string(),
        point: None,
        stats: Stats::default(),
        bytes: 0,
        wire_bytes: 0,
        pause_us: 0,
        duration_ms: started.elapsed().as_millis() as u64,
    }
}

/// Why no cycle may run now, if cycles are paused.
fn paused(sd: &StateDir, now_ns: i64) -> Option<Error> {
    let rep = sd.config().ok()?.replication?;
    let p = rep.paused_at(now_ns)?;
    let until = p
        .until
        .as_deref()
        .map_or(String::new(), |u| format!(" until {u}"));
    Some(Error::transient(format!(
        "replication of {} is paused since {}{until}; `drfs resume {}` resumes it",
        sd.store().display(),
        p.since,
        sd.store().display()
    )))
}

/// The replication settings as they are now (`drfs protect` may change them while mounted).
fn replication(tracker: &Tracker) -> Result<Replication> {
    tracker.state().config()?.replication.ok_or_else(|| {
        Error::operator(format!(
            "{} is not protected: run `drfs protect {} --to REPLICA` first",
            tracker.state().store().display(),
            tracker.state().store().display()
        ))
    })
}

fn cycle(tracker: &Tracker, st: &mut CycleState, opts: CycleOpts) -> Result<Outcome> {
    let rep = replication(tracker)?;
    let mut link = transport::connect(&rep.target, &transport::Options::of(&rep))?;
    match exchange(tracker, st, &rep, &mut link, opts) {
        Ok(o) => {
            session::bye(link);
            Ok(o)
        }
        Err(e) => {
            tracing::warn!("cycle of {} failed: {e}", tracker.config().store_id);
            Err(link.fail(e))
        }
    }
}

/// The replica's answer checked, the cut made and shipped, the cycle's state recorded.
fn exchange(
    tracker: &Tracker,
    st: &mut CycleState,
    rep: &Replication,
    link: &mut Link,
    opts: CycleOpts,
) -> Result<Outcome> {
    let cfg = tracker.config();
    let hello = Hello {
        store_id: &cfg.store_id,
        block_size: cfg.block_size,
        keep: &rep.keep,
        seed: false,
    };
    let w = session::hello(&mut link.w, &mut link.r, &hello, false)?;
    if w.source.as_deref() != Some(cfg.store_id.as_str()) || w.replica_id != rep.replica_id {
        return Err(crate::ship::refused(
            format!(
                "{} is not the replica this store was protected with",
                rep.target
            ),
            false,
        ));
    }
    // A cycle the replica committed just before we lost track of it (a crash).
    if let (Some(f), Some(l)) = (&st.in_flight, &w.latest) {
        if f.generation == l.generation && f.cut_id == l.cut_id {
            st.generation = Some(l.generation);
            st.point = Some(l.id.clone());
        }
    }
    let broke_off = st.in_flight.take().map(|f| f.generation);
    let theirs = w.latest.as_ref().map(|l| l.generation);
    if theirs != st.generation && !opts.resync {
        return Err(crate::ship::refused(
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
    let resync = opts.resync || theirs.is_none();
    let cut = tracker.cut(rep.group == Group::Dir, resync)?;
    let pause_us = cut.pause.as_micros() as u64;
    let manifest = Manifest {
        version: crate::model::manifest::POINT_VERSION,
        generation,
        cut_id: cut_id.clone(),
        time: crate::model::fmt::rfc3339_ns(i128::from(cut.time_ns)),
        time_ns: cut.time_ns,
        consistency: opts.consistency.unwrap_or(Consistency::Crash),
        block_size: cfg.block_size,
        groups: cut.groups.clone(),
        entries: cut.entries.clone(),
    };
    let c = Cycle {
        generation,
        base: theirs,
        cut_id: &cut_id,
        resync,
        // The receiver keeps what an attempt of the same generation staged.
        resume: broke_off == Some(generation),
    };
    let source = source::CutSource::new(&cut);
    let r = session::send(
        &mut link.w,
        &mut link.r,
        &c,
        &source,
        manifest,
        opts.progress,
    );
    tracker.end_cycle(&cut, r.is_ok())?;
    let (point, stats) = r?;
    st.generation = Some(generation);
    st.point = Some(point.id.clone());
    st.point_time_ns = Some(cut.time_ns);
    st.in_flight = None;
    Ok(Outcome {
        ok: true,
        message: format!("point {} shipped", point.id),
        class: Class::Transient,
        point: Some(point.id),
        stats,
        bytes: link.w.bytes,
        wire_bytes: {
            let _ = link.w.flush();
            link.wire_bytes()
        },
        pause_us,
        duration_ms: 0,
    })
}
