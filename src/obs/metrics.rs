//! Prometheus metrics: a store's and a replica's status in the text exposition format
//! (version 0.0.4), as `GET /metrics` serves it and `drfs metrics` prints it. Built from
//! the same `StoreStatus` / `ReplicaStatus` as `drfs status --json`, so the two agree.
//! Names follow Prometheus's conventions: prefix `drfs_`, base units (`_seconds`,
//! `_bytes`), counters end in `_total`, times as Unix timestamps (`_timestamp_seconds`,
//! so an alert computes `time() - x`); labels `store` or `replica` (the path), and `file`
//! on the per-file series. A series whose value is not known yet (no point) is left out.

use std::fmt::Write;

use crate::model::Target;
use crate::obs::status::{FileStatus, Health, ReplicaStatus, StoreStatus};
use crate::replica::posix::Replica;
use crate::state::StateDir;

/// The content type of the text format.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Text being written, one metric family at a time.
#[derive(Default)]
pub struct Text {
    out: String,
}

impl Text {
    pub fn finish(self) -> String {
        self.out
    }

    /// A family's `# HELP` and `# TYPE` lines.
    fn family(&mut self, name: &str, kind: &str, help: &str) {
        let _ = writeln!(self.out, "# HELP {name} {help}");
        let _ = writeln!(self.out, "# TYPE {name} {kind}");
    }

    fn sample(&mut self, name: &str, labels: &[(&str, &str)], v: f64) {
        self.out.push_str(name);
        if !labels.is_empty() {
            self.out.push('{');
            for (i, (k, val)) in labels.iter().enumerate() {
                if i > 0 {
                    self.out.push(',');
                }
                let _ = write!(self.out, "{k}=\"{}\"", escape(val));
            }
            self.out.push('}');
        }
        let _ = writeln!(self.out, " {}", number(v));
    }

    /// One family with one sample.
    fn one(&mut self, name: &str, kind: &str, help: &str, labels: &[(&str, &str)], v: f64) {
        self.family(name, kind, help);
        self.sample(name, labels, v);
    }
}

fn escape(s: &str) -> String {
    s.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

fn number(v: f64) -> String {
    if v.fract() == 0.0 && v.abs() < 1e15 {
        format!("{}", v as i64)
    } else {
        format!("{v}")
    }
}

fn health_value(h: Health) -> f64 {
    match h {
        Health::Normal => 0.0,
        Health::Warning => 1.0,
        Health::Critical => 2.0,
    }
}

fn secs(ns: i64) -> f64 {
    ns as f64 / 1e9
}

/// Health as a number and as a labelled state (one series per state, 1 for the current).
fn health(t: &mut Text, prefix: &str, label: &[(&str, &str)], h: Health) {
    t.one(
        &format!("{prefix}health"),
        "gauge",
        "Health: 0 normal, 1 warning, 2 critical.",
        label,
        health_value(h),
    );
    let name = format!("{prefix}health_state");
    t.family(
        &name,
        "gauge",
        "1 for the current health state, 0 for the others.",
    );
    for (s, v) in [
        ("normal", Health::Normal),
        ("warning", Health::Warning),
        ("critical", Health::Critical),
    ] {
        let mut l = label.to_vec();
        l.push(("state", s));
        t.sample(&name, &l, if v == h { 1.0 } else { 0.0 });
    }
}

/// A primary store's metrics.
pub fn store(t: &mut Text, s: &StoreStatus) {
    let l = [("store", s.path.as_str())];
    let l = &l[..];
    health(t, "drfs_", l, s.health);
    let flag = |b: bool| if b { 1.0 } else { 0.0 };
    t.one(
        "drfs_protected",
        "gauge",
        "1 if the store replicates.",
        l,
        flag(s.protected),
    );
    t.one(
        "drfs_mounted",
        "gauge",
        "1 if the store is mounted (its daemon answers).",
        l,
        flag(s.mounted),
    );
    t.one(
        "drfs_paused",
        "gauge",
        "1 while cycles are paused.",
        l,
        flag(s.paused.is_some()),
    );
    if let Some(ns) = s.last_point_time_ns {
        t.one(
            "drfs_last_point_timestamp_seconds",
            "gauge",
            "Cut time of the newest recovery point (RPO lag = time() - this).",
            l,
            secs(ns),
        );
    }
    if let Some(lag) = s.rpo_lag_s {
        t.one(
            "drfs_rpo_lag_seconds",
            "gauge",
            "Age of the newest recovery point when scraped.",
            l,
            lag,
        );
    }
    t.one(
        "drfs_pending_bytes",
        "gauge",
        "Changed bytes not shipped yet.",
        l,
        s.pending_bytes as f64,
    );
    let resync = s.files.iter().filter(|f| f.needs_resync).count();
    t.one(
        "drfs_resync_pending_files",
        "gauge",
        "Files waiting for a full resync (compared block by block by BLAKE3).",
        l,
        resync as f64,
    );
    files(t, s);
    let tot = &s.totals;
    t.one(
        "drfs_cycles_total",
        "counter",
        "Replication cycles attempted.",
        l,
        tot.cycles as f64,
    );
    t.one(
        "drfs_cycle_failures_total",
        "counter",
        "Replication cycles that failed.",
        l,
        tot.failed as f64,
    );
    t.one(
        "drfs_consecutive_failures",
        "gauge",
        "Cycles failed in a row (0 after a success).",
        l,
        f64::from(s.consecutive_failures),
    );
    t.one(
        "drfs_sent_bytes_total",
        "counter",
        "Bytes sent on the wire by cycles.",
        l,
        tot.bytes as f64,
    );
    t.one(
        "drfs_sent_data_bytes_total",
        "counter",
        "Bytes of block data shipped, before compression.",
        l,
        tot.data_bytes as f64,
    );
    if let Some(c) = &s.last_cycle {
        t.one(
            "drfs_last_cycle_timestamp_seconds",
            "gauge",
            "Start of the last cycle, successful or not.",
            l,
            secs(c.time_ns),
        );
        t.one(
            "drfs_last_cycle_success",
            "gauge",
            "1 if the last cycle succeeded.",
            l,
            flag(c.ok),
        );
        t.one(
            "drfs_last_cycle_duration_seconds",
            "gauge",
            "How long the last cycle took.",
            l,
            c.duration_ms as f64 / 1e3,
        );
        t.one(
            "drfs_last_cycle_pause_seconds",
            "gauge",
            "How long the last cut held writers off.",
            l,
            c.pause_us as f64 / 1e6,
        );
        t.one(
            "drfs_last_cycle_sent_bytes",
            "gauge",
            "Bytes the last cycle sent on the wire.",
            l,
            c.bytes as f64,
        );
    }
    t.one(
        "drfs_hook_failures_total",
        "counter",
        "Pre- and post-cut hooks that failed or timed out.",
        l,
        tot.hook_failures as f64,
    );
    if let Some(ns) = s.last_app_consistent_time_ns {
        t.one(
            "drfs_last_app_consistent_timestamp_seconds",
            "gauge",
            "Cut time of the newest application-consistent point.",
            l,
            secs(ns),
        );
    }
    if let Some(ns) = s.last_success_time_ns {
        t.one(
            "drfs_last_success_timestamp_seconds",
            "gauge",
            "Start of the last successful cycle.",
            l,
            secs(ns),
        );
    }
}

fn files(t: &mut Text, s: &StoreStatus) {
    let each = |t: &mut Text, name: &str, v: &dyn Fn(&FileStatus) -> f64| {
        for f in &s.files {
            t.sample(
                name,
                &[("store", s.path.as_str()), ("file", f.path.as_str())],
                v(f),
            );
        }
    };
    t.family(
        "drfs_file_pending_bytes",
        "gauge",
        "Changed bytes of one file not shipped yet.",
    );
    each(t, "drfs_file_pending_bytes", &|f| f.pending_bytes as f64);
    t.family(
        "drfs_file_needs_resync",
        "gauge",
        "1 while the file waits for a full resync.",
    );
    each(t, "drfs_file_needs_resync", &|f| {
        if f.needs_resync { 1.0 } else { 0.0 }
    });
}

/// A replica's metrics.
pub fn replica(t: &mut Text, r: &ReplicaStatus) {
    let l = [("replica", r.path.as_str())];
    let l = &l[..];
    health(t, "drfs_replica_", l, r.health);
    t.one(
        "drfs_replica_points",
        "gauge",
        "Recovery points retained.",
        l,
        r.points as f64,
    );
    t.one(
        "drfs_replica_undo_bytes",
        "gauge",
        "Bytes the points' undo records take on the replica's disk.",
        l,
        r.undo_bytes as f64,
    );
    if let Some(p) = &r.latest {
        t.one(
            "drfs_replica_latest_point_timestamp_seconds",
            "gauge",
            "Cut time of the replica's newest point.",
            l,
            secs(p.time_ns),
        );
    }
    if let Some(n) = r.verify_bad_blocks {
        t.one(
            "drfs_replica_verify_bad_blocks",
            "gauge",
            "Blocks the last finished drfs verify found failing their BLAKE3.",
            l,
            n as f64,
        );
    }
    if let Some(p) = &r.oldest {
        t.one(
            "drfs_replica_oldest_point_timestamp_seconds",
            "gauge",
            "Cut time of the replica's oldest point.",
            l,
            secs(p.time_ns),
        );
    }
}

/// A store's metrics, and its replica's when the replica is a directory on this host.
pub fn of_store(sd: &StateDir, s: &StoreStatus) -> String {
    let mut t = Text::default();
    store(&mut t, s);
    if let Some(r) = local_replica(sd) {
        replica(&mut t, &r);
    }
    t.finish()
}

/// A replica's metrics.
pub fn of_replica(r: &ReplicaStatus) -> String {
    let mut t = Text::default();
    replica(&mut t, r);
    t.finish()
}

/// The status of the store's replica, if it is a local directory that answers.
fn local_replica(sd: &StateDir) -> Option<ReplicaStatus> {
    crate::obs::status::replica(&local(sd)?).ok()
}

/// The store's replica, if it is a local directory that is a replica.
pub fn local(sd: &StateDir) -> Option<Replica> {
    let rep = sd.config().ok()?.replication?;
    let Target::Local(p) = rep.target else {
        return None;
    };
    if !Replica::is_replica(&p) {
        return None;
    }
    Replica::open_only(&p).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_are_escaped_and_integers_print_plain() {
        let mut t = Text::default();
        t.one("drfs_x", "gauge", "X.", &[("store", "a\"b\\c\nd")], 3.0);
        t.sample("drfs_x", &[], 0.25);
        let s = t.finish();
        assert!(s.contains("drfs_x{store=\"a\\\"b\\\\c\\nd\"} 3\n"), "{s}");
        assert!(s.contains("drfs_x 0.25\n"), "{s}");
        assert!(
            s.starts_with("# HELP drfs_x X.\n# TYPE drfs_x gauge\n"),
            "{s}"
        );
    }
}
