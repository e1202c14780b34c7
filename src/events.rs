//! The event history of a store or a replica: every change of state an operator may want
//! to look back on (health changes, cycles failing and recovering, resyncs started and
//! done, points pruned, hooks failing, verify findings, failovers) is one JSON line in
//! `.drfs/events.jsonl`, appended with one `write(2)` under an flock and rotated at 4 MiB
//! (`events.jsonl.1` … `.3`, the oldest deleted), after Hyper-V's and PBS's task
//! histories. Any layer above this one records through `record`; recording never fails
//! the work that caused the event (a failure to record is logged). `drfs events` reads
//! them back (`read`).

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::{At, Error, Result};
use crate::state::StateDir;
use crate::sys;

pub const VERSION: u32 = 1;
pub const FILE: &str = "events.jsonl";
/// A file this large is rotated before the next line.
pub const ROTATE_AT: u64 = 4 << 20;
/// Rotated files kept (`events.jsonl.1` newest).
pub const KEEP: u32 = 3;

/// What changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    /// The health of a store or a replica (normal, warning, critical).
    Health,
    /// A cycle failed, failed differently, or succeeded after failures.
    Cycle,
    /// A file (or the whole store) waits for a resync, or its resync shipped.
    Resync,
    /// A retention run dropped a point.
    Prune,
    /// A pre- or post-cut hook failed or timed out.
    Hook,
    /// Verify found a block that does not match its BLAKE3, or finished.
    Verify,
    /// A failover or a promotion (issue 14).
    Failover,
}

/// One line of the history.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Event {
    pub version: u32,
    pub time: String,
    pub time_ns: i64,
    /// The store's or the replica's path.
    pub store: String,
    pub kind: Kind,
    /// The store-relative path the event is about, if it is about one file.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub file: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub old: Option<String>,
    pub new: String,
    pub reason: String,
}

impl Event {
    /// An event of `kind` in `sd`'s store or replica, now.
    pub fn new(
        sd: &StateDir,
        kind: Kind,
        new: impl Into<String>,
        reason: impl Into<String>,
    ) -> Self {
        let now = sys::now_ns();
        Event {
            version: VERSION,
            time: crate::model::fmt::rfc3339_ns(now),
            time_ns: now as i64,
            store: sd.store().display().to_string(),
            kind,
            file: None,
            old: None,
            new: new.into(),
            reason: reason.into(),
        }
    }

    pub fn file(mut self, path: impl Into<String>) -> Self {
        self.file = Some(path.into());
        self
    }

    pub fn old(mut self, old: impl Into<String>) -> Self {
        self.old = Some(old.into());
        self
    }
}

fn path(sd: &StateDir) -> PathBuf {
    sd.path(FILE)
}

/// Appends `e` to `sd`'s history; a failure is logged, never returned.
pub fn record(sd: &StateDir, e: Event) {
    match append(sd, &e) {
        Ok(()) => tracing::info!(
            "event: {:?} {}{} -> {}: {}",
            e.kind,
            e.file
                .as_deref()
                .map_or(String::new(), |f| format!("{f}: ")),
            e.old.as_deref().unwrap_or("-"),
            e.new,
            e.reason
        ),
        Err(err) => tracing::warn!("recording an event in {}: {err}", path(sd).display()),
    }
}

fn open(p: &Path) -> std::io::Result<File> {
    OpenOptions::new().create(true).append(true).open(p)
}

fn append(sd: &StateDir, e: &Event) -> Result<()> {
    let p = path(sd);
    let mut line = serde_json::to_vec(e).map_err(Error::encode)?;
    line.push(b'\n');
    let mut f = locked(&p)?;
    if f.metadata().at(&p)?.len() >= ROTATE_AT {
        rotate(&p)?;
        f = locked(&p)?;
    }
    f.write_all(&line).at(&p)
}

/// The events file, flocked, and still the one at its path (a writer that waited for the
/// lock while another rotated it opens the new one).
fn locked(p: &Path) -> Result<File> {
    loop {
        let f = open(p).at(p)?;
        sys::flock(&f, libc::LOCK_EX).at(p)?;
        let now = std::fs::metadata(p).ok().map(|m| m.ino());
        if now == Some(f.metadata().at(p)?.ino()) {
            return Ok(f);
        }
    }
}

fn rotated(p: &Path, n: u32) -> PathBuf {
    let mut s = p.as_os_str().to_os_string();
    s.push(format!(".{n}"));
    PathBuf::from(s)
}

/// Shifts `.1`.. `.KEEP-1` up one (the oldest goes) and the current file to `.1`.
fn rotate(p: &Path) -> Result<()> {
    for n in (1..KEEP).rev() {
        let from = rotated(p, n);
        if from.exists() {
            let to = rotated(p, n + 1);
            std::fs::rename(&from, &to).at(&to)?;
        }
    }
    let to = rotated(p, 1);
    std::fs::rename(p, &to).at(&to)
}

/// Every event kept in `sd`'s history, oldest first, from `since_ns` on if given. A line
/// that is not an event (torn by a crash) is skipped.
pub fn read(sd: &StateDir, since_ns: Option<i64>) -> Result<Vec<Event>> {
    let p = path(sd);
    let mut files: Vec<PathBuf> = (1..=KEEP).rev().map(|n| rotated(&p, n)).collect();
    files.push(p);
    let mut out = Vec::new();
    for f in files {
        let text = match std::fs::read(&f) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(e).at(&f),
        };
        for line in text.split(|&b| b == b'\n').filter(|l| !l.is_empty()) {
            if let Ok(e) = serde_json::from_slice::<Event>(line) {
                if since_ns.is_none_or(|s| e.time_ns >= s) {
                    out.push(e);
                }
            }
        }
    }
    Ok(out)
}

/// The newest event of `kind` (about no one file), if any.
pub fn last(sd: &StateDir, kind: Kind) -> Result<Option<Event>> {
    Ok(read(sd, None)?
        .into_iter()
        .rev()
        .find(|e| e.kind == kind && e.file.is_none()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_append_in_order_and_survive_rotation() {
        let dir = tempfile::tempdir().unwrap();
        let sd = StateDir::new(dir.path());
        std::fs::create_dir_all(sd.path("")).unwrap();
        record(
            &sd,
            Event::new(&sd, Kind::Health, "warning", "first").old("normal"),
        );
        record(
            &sd,
            Event::new(&sd, Kind::Cycle, "failed", "second").file("a.img"),
        );
        let got = read(&sd, None).unwrap();
        assert_eq!(got.len(), 2);
        assert_eq!(got[0].reason, "first");
        assert_eq!(got[1].file.as_deref(), Some("a.img"));
        // Fill past the rotation size: the older lines move to .1 and still read first.
        let big = "x".repeat(1 << 16);
        for _ in 0..70 {
            record(&sd, Event::new(&sd, Kind::Verify, "ok", big.clone()));
        }
        record(&sd, Event::new(&sd, Kind::Health, "normal", "last"));
        assert!(rotated(&path(&sd), 1).exists());
        let got = read(&sd, None).unwrap();
        assert_eq!(got[0].reason, "first");
        assert_eq!(got.last().unwrap().reason, "last");
        assert_eq!(last(&sd, Kind::Health).unwrap().unwrap().reason, "last");
        let later = read(&sd, Some(got.last().unwrap().time_ns)).unwrap();
        assert_eq!(later.len(), 1);
    }
}
