//! What the command line prints: status, changes and points as tables for people, a
//! cycle's result as one line. JSON output is the library's own types, serialised.

use crate::daemon::control::ShipReply;
use crate::model::PointInfo;
use crate::model::fmt::human;
use crate::obs::changes::Changes;
use crate::obs::status::{ReplicaStatus, StoreStatus};

/// Lines of at most `width` characters, the first after `head`, the rest indented under it.
fn wrapped(head: &str, text: &str, width: usize) -> String {
    let indent = " ".repeat(head.len());
    let mut out = String::new();
    let mut line = head.to_string();
    for word in text.split(' ') {
        if line.len() > head.len() && line.len() + 1 + word.len() > width {
            out += line.trim_end();
            out.push('\n');
            line = indent.clone();
        } else if line.len() > head.len() {
            line.push(' ');
        }
        line += word;
    }
    out += line.trim_end();
    out.push('\n');
    out
}

/// How often a store replicates, from its status.
fn cadence(s: &StoreStatus) -> String {
    match (s.interval.as_deref(), s.expect_every.as_deref()) {
        (Some("manual"), Some(e)) => format!("manually (drfs ship, expected every {e})"),
        (Some("manual"), None) => "manually (drfs ship; no expected cadence)".into(),
        (Some(i), _) => format!("every {i}"),
        (None, _) => "?".into(),
    }
}

pub fn store(s: &StoreStatus) -> String {
    let mut o = format!("store     {}\n", s.path);
    o += &format!("role      {}\n", s.role);
    o += &format!("health    {:?}\n", s.health);
    for r in &s.reasons {
        o += &wrapped("  - ", r, 88);
    }
    let daemon = match s.daemon_pid {
        Some(pid) => format!(" (mounted, daemon pid {pid})"),
        None if s.mounted => " (mounted)".into(),
        None => String::new(),
    };
    o += &wrapped("state     ", &format!("{}{daemon}", s.state), 88);
    if let Some(r) = &s.replica {
        o += &format!("replica   {r}, {}\n", cadence(s));
        o += &format!(
            "keep      {} (group {})\n",
            s.keep.as_deref().unwrap_or("?"),
            s.group.as_deref().unwrap_or("?")
        );
    }
    if let Some(p) = &s.last_point {
        o += &format!(
            "point     {} at {} ({} ago)\n",
            p,
            s.last_point_time.as_deref().unwrap_or("?"),
            crate::obs::status::age(s.rpo_lag_s.unwrap_or(0.0))
        );
    }
    o += &format!("pending   {}", human(s.pending_bytes));
    if let (Some(r), Some(eta)) = (s.bwlimit_bps, s.eta_at_cap_s) {
        o += &format!(
            " (ETA {} at the cap of {}/s)",
            crate::obs::status::age(eta),
            human(r)
        );
    }
    o += "\n";
    if let Some(c) = &s.last_cycle {
        let line = format!(
            "{} at {}: {} ms, {}, cut pause {} us{}",
            if c.ok { "cycle" } else { "failed cycle" },
            c.time,
            c.duration_ms,
            crate::model::fmt::sent(c.bytes, c.wire_bytes),
            c.pause_us,
            // Said once: a reason above may already be this error.
            c.error
                .as_ref()
                .filter(|e| !s.reasons.iter().any(|r| r.contains(e.as_str())))
                .map(|e| format!(": {e}"))
                .unwrap_or_default()
        );
        o += &wrapped("last      ", &line, 88);
    }
    if let Some(r) = &s.last_recovery {
        o += &wrapped("crash     ", &format!("{} ({})", r.summary(), r.time), 88);
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
    o += &history(&s.lineage);
    o
}

pub fn replica(s: &ReplicaStatus) -> String {
    let mut o = format!("replica   {}\n", s.path);
    o += &format!("role      {}\n", s.role);
    o += &format!("health    {:?}\n", s.health);
    for r in &s.reasons {
        o += &wrapped("  - ", r, 88);
    }
    o += &format!("source    {}\n", s.source.as_deref().unwrap_or("?"));
    if let Some(t) = &s.onward {
        o += &format!(
            "onward    {t} (holds point {})\n",
            s.onward_point.as_deref().unwrap_or("none yet")
        );
    }
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
    o += &history(&s.lineage);
    o
}

/// `drfs assess`: one line of what was watched, then a row per interval.
pub fn assessment(a: &crate::ops::assess::Assessment) -> String {
    let secs = |s: u64| humantime::format_duration(std::time::Duration::from_secs(s)).to_string();
    let mut o = format!(
        "{}: watched {}; sample of {} blocks, {} read, {} on the wire ({}: {:.2} of the changed bytes)\n",
        a.store,
        secs(a.seconds),
        a.sample.blocks,
        human(a.sample.bytes),
        human(a.sample.wire_bytes),
        a.compress,
        a.wire_ratio
    );
    let cap = a.bwlimit_bps.map_or("(no --bwlimit)".to_string(), |c| {
        format!("at {}/s", human(c))
    });
    o += &format!(
        "{:<9} {:>7} {:>13} {:>13} {:>13} {:>12}  {}\n",
        "INTERVAL", "WINDOWS", "CHANGED MEAN", "CHANGED MAX", "WIRE MAX", "NEEDS", cap
    );
    for w in &a.windows {
        let count = if w.extrapolated {
            "-".to_string()
        } else {
            w.measured.to_string()
        };
        let at_cap = match (w.cycle_s_at_cap, w.rpo_s_at_cap) {
            (Some(c), Some(r)) => format!("cycle {c:.1} s, RPO {r:.0} s"),
            (Some(c), None) => format!("falls behind: a cycle takes {c:.0} s"),
            _ => String::new(),
        };
        let bound = if w.extrapolated { "<= " } else { "" };
        o += &format!(
            "{:<9} {:>7} {:>13} {:>13} {:>13} {:>12}  {}{}\n",
            secs(w.seconds),
            count,
            format!("{bound}{}", human(w.mean_bytes)),
            format!("{bound}{}", human(w.max_bytes)),
            format!("{bound}{}", human(w.wire_bytes_max)),
            format!("{}/s", human(w.need_bps)),
            at_cap,
            if w.extrapolated {
                "  (not measured: extrapolated from a shorter window, an upper bound)"
            } else {
                ""
            }
        );
    }
    o
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

/// The failover history, one line per epoch after the first.
fn history(epochs: &[crate::model::lineage::Epoch]) -> String {
    let mut o = String::new();
    for e in epochs.iter().skip(1) {
        let at = e
            .point
            .as_deref()
            .map_or(String::new(), |p| format!(" at point {p}"));
        let peer = e
            .peer
            .as_deref()
            .map_or(String::new(), |p| format!(" ({p})"));
        o += &format!("history   {} {}{at}{peer}\n", e.time, e.why.describe());
    }
    o
}

/// Points, newest first, as a table.
pub fn points(points: &[PointInfo]) -> String {
    let mut o = format!(
        "{:<10} {:<26} {:<12} {:>6} {:>12}  NOTE\n",
        "ID", "TIME (UTC)", "CONSISTENCY", "FILES", "CHANGED"
    );
    for p in points {
        let note = match (&p.restores, p.diverged) {
            (Some(r), _) => format!("failover: restores {r}"),
            (None, true) => "diverged".to_string(),
            _ => String::new(),
        };
        o += &format!(
            "{:<10} {:<26} {:<12} {:>6} {:>12}  {note}\n",
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
            let mut v = serde_json::json!({
                "id": p.id, "time": p.time, "consistency": p.consistency,
                "generation": p.generation, "files": p.files, "bytes_changed": p.bytes_changed,
                "diverged": p.diverged,
            });
            if let Some(r) = &p.restores {
                v["restores"] = serde_json::json!(r);
            }
            v
        })
        .collect()
}

/// A cycle's result: one line on stdout when it shipped, on stderr when it failed.
pub fn ship(r: &ShipReply) {
    if r.code == 0 {
        println!(
            "{}: {} in {} ms, cut pause {} us",
            r.message,
            crate::model::fmt::sent(r.bytes, r.wire_bytes),
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

/// What `drfs failover` did, in lines.
pub fn failed_over(f: &crate::ops::failover::FailedOver) -> String {
    let mut out = String::new();
    let s = f.store.display();
    if f.already {
        out += &format!(
            "{s}: already failed over to point {}; nothing to do\n",
            f.point
        );
        return out;
    }
    if let Some(old) = &f.demoted {
        out += &format!(
            "{s} is the primary now, at point {} (no data lost); {} is its replica and cycles flow back to it\n",
            f.point,
            old.display()
        );
        return out;
    }
    if f.committed {
        out += &format!("{s}: the failover to point {} is committed\n", f.point);
        return out;
    }
    match f.rolled {
        Some((blocks, bytes)) => {
            out += &format!(
                "{s}: rolled back in place to point {} ({} rewritten in {}; newer points stay until --commit)\n",
                f.point,
                crate::model::fmt::human(bytes),
                crate::model::fmt::plural(blocks, "block")
            )
        }
        None => out += &format!("{s}: at point {}, nothing to roll back\n", f.point),
    }
    if let Some(d) = &f.kept {
        out += &format!(
            "{s}: what its VMs wrote since it was mounted is kept as point {} (diverged; `drfs browse {s}` reads it)\n",
            d.id
        );
    }
    out += &format!(
        "{s} is a primary store now: `drfs mount {s} MOUNTPOINT` and start its VMs; `drfs failover {s} --point ID` chooses another point (what the VMs write is kept as a diverged point); `drfs failover {s} --commit` ends the choice\n"
    );
    out
}

/// The event history, one line per event: time, kind, file, old -> new, reason.
pub fn events(ev: &[crate::events::Event]) -> String {
    if ev.is_empty() {
        return "no events yet\n".into();
    }
    let mut out = String::new();
    for e in ev {
        let kind = serde_json::to_value(e.kind)
            .ok()
            .and_then(|v| v.as_str().map(str::to_string))
            .unwrap_or_default();
        let file = e
            .file
            .as_deref()
            .map_or(String::new(), |f| format!(" {f}:"));
        let old = e
            .old
            .as_deref()
            .map_or(String::new(), |o| format!("{o} -> "));
        out += &format!("{}  {kind:<8}{file} {old}{}  {}\n", e.time, e.new, e.reason);
    }
    out
}

/// A verify run: what it read, how fast, and each bad block.
pub fn verify(r: &crate::replica::posix::verify::Report) -> String {
    let rate = if r.run_seconds > 0.0 {
        format!(", {}/s", human((r.run_bytes as f64 / r.run_seconds) as u64))
    } else {
        String::new()
    };
    let mut out = format!(
        "verified {} blocks ({}{rate}{}): {}\n",
        r.blocks,
        human(r.bytes),
        if r.resumed { ", resumed" } else { "" },
        if r.bad.is_empty() {
            "every block matches its BLAKE3".to_string()
        } else {
            format!(
                "{} BAD",
                crate::model::fmt::plural(r.bad.len() as u64, "block")
            )
        }
    );
    for b in &r.bad {
        out += &format!(
            "BAD {} offset {} ({} bytes), {}: {}; points {}\n",
            b.file,
            b.offset,
            b.len,
            b.source,
            b.why,
            if b.points.is_empty() {
                "none".to_string()
            } else {
                b.points.join(", ")
            }
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_lines_wrap_under_their_heading() {
        let text = "replication stopped: replica: the replica is at generation 7 but this store last shipped 5: the copies have diverged";
        let out = wrapped("  - ", text, 40);
        assert!(out.lines().all(|l| l.len() <= 40), "{out}");
        assert!(out.lines().skip(1).all(|l| l.starts_with("    ")), "{out}");
        assert_eq!(
            out.split_whitespace().collect::<Vec<_>>().join(" "),
            format!("- {text}")
        );
    }
}
