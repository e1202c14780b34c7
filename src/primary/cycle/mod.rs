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

pub mod hooks;
pub mod schedule;
pub mod source;

use std::sync::Arc;
use std::time::Instant;

use serde::{Deserialize, Serialize};

use crate::error::{At, Class, Error, Result};
use crate::events::{self, Event, Kind};
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
    /// Blocks sent as their changed 4 KiB pieces (0 in records from before them).
    #[serde(default)]
    pub partial_blocks: u64,
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
    /// Counts since the store was first protected (absent before issue 17: from zero).
    #[serde(default)]
    pub totals: Totals,
    /// When the last successful cycle started.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_ok_ns: Option<i64>,
    /// The cut time of the newest application-consistent point.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_app_ns: Option<i64>,
    /// Why the last application-consistent attempt gave a crash point (cleared by the
    /// next one that works).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hook_failure: Option<String>,
}

/// What every cycle so far added up to (the counters Prometheus scrapes).
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct Totals {
    pub cycles: u64,
    pub failed: u64,
    /// Bytes on the wire.
    pub bytes: u64,
    /// Bytes of block data, before compression.
    pub data_bytes: u64,
    /// Pre- and post-cut hooks that failed or timed out.
    #[serde(default)]
    pub hook_failures: u64,
    /// Blocks sent as their changed 4 KiB pieces.
    #[serde(default)]
    pub partial_blocks: u64,
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
        self.totals.cycles += 1;
        self.totals.bytes += last.bytes;
        self.totals.data_bytes += last.data_bytes;
        self.totals.partial_blocks += last.partial_blocks;
        if last.ok {
            self.last_ok_ns = Some(last.time_ns);
            self.failures = 0;
            self.critical = None;
        } else {
            self.failures += 1;
            self.totals.failed += 1;
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
    let prev = st.last.clone();
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
        partial_blocks: outcome.stats.partial_blocks,
        pause_us: outcome.pause_us,
        point: outcome.point.clone(),
        error: (!outcome.ok).then(|| outcome.message.clone()),
        recoverable: outcome.class.is_transient(),
    });
    if let Err(e) = st.save(&sd) {
        tracing::error!("saving cycle state: {e}");
    }
    record_change(&sd, prev.as_ref(), &outcome, st.failures);
    outcome
}

/// An event when a cycle fails after a success (or for another reason than the last
/// failure), stops replication, or succeeds after failures.
fn record_change(sd: &StateDir, prev: Option<&LastCycle>, o: &Outcome, failures: u32) {
    let was = prev.map(|p| if p.ok { "ok" } else { "failed" });
    if o.ok {
        if was == Some("failed") {
            let e = Event::new(
                sd,
                Kind::Cycle,
                "ok",
                format!("{} after failed attempts", o.message),
            );
            events::record(sd, e.old("failed"));
        }
        return;
    }
    let new = if o.class.is_transient() {
        "failed"
    } else {
        "stopped"
    };
    let same = prev.is_some_and(|p| !p.ok && p.error.as_deref() == Some(o.message.as_str()));
    if !same {
        let mut e = Event::new(
            sd,
            Kind::Cycle,
            new,
            format!("{} ({failures} in a row)", o.message),
        );
        if let Some(w) = was {
            e = e.old(w);
        }
        events::record(sd, e);
    }
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

/// Whether this cycle runs the hooks: they are set, and an application-consistent point
/// is due (none yet, the last older than `every`, or the last attempt failed). An
/// explicit consistency (the control socket's) runs none.
fn app_due(rep: &Replication, st: &CycleState, asked: Option<Consistency>) -> bool {
    let Some(h) = &rep.hooks else { return false };
    if asked.is_some() || (h.pre.is_empty() && h.post.is_empty()) {
        return false;
    }
    let Some(every) = h.every.and_then(|e| e.every()) else {
        return true;
    };
    let now = sys::now_ns() as i64;
    st.hook_failure.is_some()
        || st
            .last_app_ns
            .is_none_or(|t| now - t >= every.as_nanos() as i64)
}

/// The cut, with each group's pre hooks before its instant and post hooks right after
/// (when `app`); what failed.
fn cut_around(
    tracker: &Tracker,
    rep: &Replication,
    resync: bool,
    app: bool,
) -> Result<(crate::primary::track::cut::Cut, Vec<String>)> {
    let none = crate::state::Hooks {
        pre: Vec::new(),
        post: Vec::new(),
        every: None,
        timeout_s: crate::state::DEFAULT_HOOK_TIMEOUT_S,
    };
    let h = rep.hooks.as_ref().filter(|_| app).unwrap_or(&none);
    let hk = hooks::Hooks {
        pre: &h.pre,
        post: &h.post,
        timeout: std::time::Duration::from_secs(h.timeout_s),
        store: tracker.state().store(),
    };
    let mut failures = Vec::new();
    let mut cur = hooks::Around::default();
    let cut = tracker.cut(rep.group == Group::Dir, resync, &mut |group, before| {
        if !app {
            return;
        }
        if before {
            cur = hooks::Around::default();
            hk.pre(group, &mut cur);
        } else {
            hk.post(group, &mut cur);
            failures.append(&mut cur.failures);
        }
    })?;
    Ok((cut, failures))
}

/// Records how an application-consistent attempt went: each failure an event, the
/// Warning set or cleared.
fn hooks_done(sd: &StateDir, st: &mut CycleState, failures: &[String]) {
    if failures.is_empty() {
        st.hook_failure = None;
        return;
    }
    for f in failures {
        let e = Event::new(
            sd,
            Kind::Hook,
            "failed",
            format!("{f}; the point is crash-consistent"),
        );
        events::record(sd, e);
    }
    st.totals.hook_failures += failures.len() as u64;
    st.hook_failure = Some(failures.join("; "));
}

/// Events for the resyncs point `id` completed: the whole store's, or each flagged file's.
fn resynced(sd: &StateDir, cut: &crate::primary::track::cut::Cut, whole: bool, id: &str) {
    let done = |e: Event| events::record(sd, e.old("started"));
    if whole {
        done(Event::new(sd, Kind::Resync, "done", format!("point {id}")));
        return;
    }
    for f in cut.files.iter().filter(|f| f.resync) {
        done(Event::new(sd, Kind::Resync, "done", format!("point {id}")).file(f.path.to_string()));
    }
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
    let why = if theirs.is_none() {
        "initial replication: every file is compared by BLAKE3"
    } else {
        "drfs ship --resync: every file is compared by BLAKE3"
    };
    if resync && st.failures == 0 {
        events::record(
            tracker.state(),
            Event::new(tracker.state(), Kind::Resync, "started", why),
        );
    }
    let app = app_due(rep, st, opts.consistency);
    let (cut, failures) = cut_around(tracker, rep, resync, app)?;
    let consistency = match opts.consistency {
        Some(c) => c,
        None if app && failures.is_empty() => Consistency::Application,
        None => Consistency::Crash,
    };
    if app {
        hooks_done(tracker.state(), st, &failures);
    }
    let pause_us = cut.pause.as_micros() as u64;
    let manifest = Manifest {
        version: crate::model::manifest::POINT_VERSION,
        generation,
        cut_id: cut_id.clone(),
        time: crate::model::fmt::rfc3339_ns(i128::from(cut.time_ns)),
        time_ns: cut.time_ns,
        consistency,
        block_size: cfg.block_size,
        groups: cut.groups.clone(),
        entries: cut.entries.clone(),
        origin: None,
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
    resynced(tracker.state(), &cut, resync, &point.id);
    st.generation = Some(generation);
    st.point = Some(point.id.clone());
    st.point_time_ns = Some(cut.time_ns);
    if consistency == Consistency::Application {
        st.last_app_ns = Some(cut.time_ns);
    }
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
