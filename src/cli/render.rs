//! What the command line prints: status, changes and points as tables for people, a
//! cycle's result as one line. JSON output is the library's own types, serialised.

use crate::daemon::control::ShipReply;
use crate::model::PointInfo;
use crate::model::fmt::human;
use crate::obs::changes::Changes;
use crate::obs::status::{ReplicaStatus, StoreStatus};

pub fn store(s: &StoreStatus) -> String {
    let mut o = format!("store     {}\n", s.path);
    o += &format!("health    {:?}{}\n", s.health, reasons(&s.reasons));
    o += &format!(
        "state     {}{}\n",
        s.state,
        if s.mounted { " (mounted)" } else { "" }
    );
    if let Some(r) = &s.replica {
        o += &format!(
            "replica   {} every {}\n",
            r,
            s.interval.as_deref().unwrap_or("?")
        );
    }
    if let Some(p) = &s.last_point {
        o += &format!(
            "point     {} at {} ({:.1} s ago)\n",
            p,
            s.last_point_time.as_deref().unwrap_or("?"),
            s.rpo_lag_s.unwrap_or(0.0)
        );
    }
    o += &format!("pending   {}\n", human(s.pending_bytes));
    if let Some(c) = &s.last_cycle {
        o += &format!(
            "last      {} at {}: {} ms, {} sent, cut pause {} us{}\n",
            if c.ok { "cycle" } else { "failed cycle" },
            c.time,
            c.duration_ms,
            human(c.bytes),
            c.pause_us,
            c.error
                .as_ref()
                .map(|e| format!(": {e}"))
                .unwrap_or_default()
        );
    }
    if let Some(r) = &s.last_recovery {
        o += &format!("crash     {} ({})\n", r.summary(), r.time);
    }
    o += &format!(
        "\n{:<40} {:<8} {:>12} {}\n",
        "FILE", "HEALTH", "PENDING", "RESYNC"
    );
    for f in &s.files {
        o += &format!(
            "{:<40} {:<8} {:>12} {}\n",
            f.path,
            format!("{:?}", f.health),
            human(f.pending_bytes),
            if f.needs_resync { "yes" } else { "no" }
        );
    }
    o
}

pub fn replica(s: &ReplicaStatus) -> String {
    let mut o = format!("replica   {}\n", s.path);
    o += &format!("health    {:?}{}\n", s.health, reasons(&s.reasons));
    o += &format!("source    {}\n", s.source.as_deref().unwrap_or("?"));
    o += &format!("keep      {}\n", s.keep);
    o += &format!("points    {}\n", s.points);
    if let Some(p) = &s.latest {
        o += &format!(
            "latest    {} at {} ({:.1} s ago)\n",
            p.id,
            p.time,
            s.latest_age_s.unwrap_or(0.0)
        );
    }
    if let Some(p) = &s.oldest {
        o += &format!("oldest    {} at {}\n", p.id, p.time);
    }
    if let Some(t) = &s.test_failover {
        o += &format!(
            "test      point {} at {} since {} (stop: drfs test-failover {} --stop)\n",
            t.point,
            t.at.display(),
            t.started,
            s.path
        );
    }
    o
}

fn reasons(r: &[String]) -> String {
    if r.is_empty() {
        String::new()
    } else {
        format!(": {}", r.join("; "))
    }
}

pub fn changes(c: &Changes) -> String {
    let mut out = format!("block size {}\n", human(c.block_size));
    out.push_str(&format!(
        "{:<40} {:<16} {:>10} {:>12} {}\n",
        "PATH", "ID", "SIZE", "DIRTY", "RESYNC"
    ));
    for f in &c.files {
        let blocks: u64 = f.dirty.iter().map(|r| r[1] - r[0]).sum();
        out.push_str(&format!(
            "{:<40} {:<16} {:>10} {:>12} {}\n",
            f.path.to_string(),
            f.id.to_string(),
            human(f.size),
            human(blocks * c.block_size),
            if f.needs_resync {
                f.resync_why.as_deref().unwrap_or("yes")
            } else {
                "no"
            }
        ));
    }
    out.push_str(&format!(
        "{} change-log records (--json lists them)\n",
        c.log.len()
    ));
    out
}

/// Renders a store status that came as JSON (from the daemon, which may be newer).
pub fn store_value(v: &serde_json::Value) -> String {
    match serde_json::from_value::<StoreStatus>(v.clone()) {
        Ok(s) => store(&s),
        Err(_) => format!("{v:#}\n"),
    }
}

/// Points, newest first, as a table.
pub fn points(points: &[PointInfo]) -> String {
    let mut o = format!(
        "{:<10} {:<26} {:<12} {:>6} {:>12}\n",
        "ID", "TIME (UTC)", "CONSISTENCY", "FILES", "CHANGED"
    );
    for p in points {
        o += &format!(
            "{:<10} {:<26} {:<12} {:>6} {:>12}\n",
            p.id,
            p.time,
            format!("{:?}", p.consistency).to_lowercase(),
            p.files,
            human(p.bytes_changed)
        );
    }
    o
}

/// Points, newest first, as `drfs points --json` prints them.
pub fn points_json(points: &[PointInfo]) -> serde_json::Value {
    points
        .iter()
        .map(|p| {
            serde_json::json!({
                "id": p.id, "time": p.time, "consistency": p.consistency,
                "generation": p.generation, "files": p.files, "bytes_changed": p.bytes_changed,
            })
        })
        .collect()
}

/// A cycle's result: one line on stdout when it shipped, on stderr when it failed.
pub fn ship(r: &ShipReply) {
    if r.code == 0 {
        println!(
            "{}: {} sent in {} ms, cut pause {} us",
            r.message,
            human(r.bytes),
            r.duration_ms,
            r.pause_us
        );
    } else {
        let kind = if r.code == 1 {
            "will retry"
        } else {
            "needs an operator"
        };
        eprintln!("drfs: cycle failed ({kind}): {}", r.message);
    }
}
