//! The status page (`GET /` on the metrics listener): one read-only HTML page, no
//! JavaScript, no external assets (it must work offline in a locked-down DC), refreshing
//! itself every 10 s. For the store and its local replica: health with the reasons, role,
//! state, newest point, the RPO lag over the last 24 h as an inline SVG chart (from the
//! points' cut times: the lag grows until each new point), the recent events, and the
//! points timeline. Nothing on it can change anything.

use std::fmt::Write;

use crate::events::Event;
use crate::model::PointInfo;
use crate::obs::status::{ReplicaStatus, StoreStatus};

const DAY_NS: i64 = 86_400_000_000_000;

/// Text safe inside HTML.
fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// What the page shows.
pub struct Page<'a> {
    pub store: &'a StoreStatus,
    pub replica: Option<&'a ReplicaStatus>,
    /// The replica's points, oldest first (empty if it is not local).
    pub points: &'a [PointInfo],
    pub events: &'a [Event],
    pub now_ns: i64,
}

/// The page of store `sd` with status `s` (and its replica, if local).
pub fn of_store(sd: &crate::state::StateDir, s: &StoreStatus) -> String {
    let rep = crate::obs::metrics::local(sd);
    let rs = rep
        .as_ref()
        .and_then(|r| crate::obs::status::replica(r).ok());
    let points = rep
        .as_ref()
        .and_then(|r| r.points().ok())
        .unwrap_or_default();
    let mut events = crate::events::read(sd, None).unwrap_or_default();
    if let Some(r) = &rep {
        events.extend(crate::events::read(&r.sd, None).unwrap_or_default());
        events.sort_by_key(|e| e.time_ns);
    }
    render(&Page {
        store: s,
        replica: rs.as_ref(),
        points: &points,
        events: &events,
        now_ns: crate::sys::now_ns() as i64,
    })
}

pub fn render(p: &Page) -> String {
    let s = p.store;
    let mut o = String::new();
    let _ = write!(
        o,
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\
<meta http-equiv=\"refresh\" content=\"10\">\
<title>drfs: {path}</title><style>{CSS}</style></head><body>\n\
<h1>drfs <span id=\"store\">{path}</span></h1>\n",
        path = esc(&s.path)
    );
    let health = serde_json::to_value(s.health)
        .ok()
        .and_then(|v| v.as_str().map(str::to_string))
        .unwrap_or_default();
    let _ = write!(
        o,
        "<table class=\"kv\">\
<tr><th>health</th><td id=\"health\" class=\"{health}\">{health}</td></tr>\
<tr><th>role</th><td id=\"role\">{role}</td></tr>\
<tr><th>state</th><td>{state}</td></tr>\
<tr><th>replica</th><td>{replica}</td></tr>\
<tr><th>newest point</th><td id=\"newest-point\">{point}</td></tr>\
<tr><th>RPO lag</th><td id=\"rpo-lag\">{lag}</td></tr>\
<tr><th>pending</th><td>{pending}</td></tr>\
<tr><th>cycles</th><td>{cycles} ({failed} failed)</td></tr></table>",
        role = esc(&s.role),
        state = esc(&s.state),
        replica = esc(s.replica.as_deref().unwrap_or("none")),
        point = esc(&match (&s.last_point, &s.last_point_time) {
            (Some(id), Some(t)) => format!("{id} at {t}"),
            _ => "none yet".into(),
        }),
        lag = s.rpo_lag_s.map_or("-".into(), crate::obs::status::age),
        pending = crate::model::fmt::human(s.pending_bytes),
        cycles = s.totals.cycles,
        failed = s.totals.failed,
    );
    o.push('\n');
    if !s.reasons.is_empty() {
        o += "<ul id=\"reasons\">";
        for r in &s.reasons {
            let _ = write!(o, "<li>{}</li>", esc(r));
        }
        o += "</ul>\n";
    }
    if let Some(r) = p.replica {
        replica(&mut o, r);
    }
    o += "<h2>RPO lag, last 24 h</h2>\n";
    o += &chart(p.points, p.now_ns);
    events(&mut o, p.events, &s.path);
    points(&mut o, p.points);
    o += "</body></html>\n";
    o
}

const CSS: &str = "body{font:14px sans-serif;margin:1.5em;color:#222}\
table{border-collapse:collapse}td,th{padding:2px 10px;text-align:left;border-bottom:1px solid #ddd}\
.normal{background:#cfc}.warning{background:#fe9}.critical{background:#f99}\
svg{border:1px solid #ccc;background:#fafafa}";

fn replica(o: &mut String, r: &ReplicaStatus) {
    let health = serde_json::to_value(r.health)
        .ok()
        .and_then(|v| v.as_str().map(str::to_string))
        .unwrap_or_default();
    let _ = write!(
        o,
        "<h2>Replica <span id=\"replica\">{}</span></h2><table class=\"kv\">\
<tr><th>health</th><td id=\"replica-health\" class=\"{health}\">{health}</td></tr>\
<tr><th>role</th><td>{}</td></tr><tr><th>points</th><td id=\"replica-points\">{}</td></tr>\
<tr><th>undo records</th><td>{}</td></tr><tr><th>last verify</th><td>{}</td></tr></table>",
        esc(&r.path),
        r.role,
        r.points,
        crate::model::fmt::human(r.undo_bytes),
        esc(&match (&r.verified, r.verify_bad_blocks) {
            (Some(t), Some(n)) => format!("{t}: {n} bad blocks"),
            _ => "never".into(),
        })
    );
    o.push('\n');
    for why in &r.reasons {
        let _ = write!(o, "<p>{}</p>", esc(why));
    }
}

/// The lag over the last 24 h: it grows with time and drops to zero at each point's cut.
fn chart(points: &[PointInfo], now: i64) -> String {
    let (w, h) = (720.0, 120.0);
    let from = now - DAY_NS;
    let mut pts: Vec<(i64, f64)> = Vec::new();
    let mut last: Option<i64> = points
        .iter()
        .rev()
        .find(|p| p.time_ns < from)
        .map(|p| p.time_ns);
    let push = |t: i64, last: Option<i64>, pts: &mut Vec<(i64, f64)>| {
        if let Some(l) = last {
            pts.push((t, (t - l) as f64 / 1e9));
        }
    };
    push(from, last, &mut pts);
    for p in points.iter().filter(|p| p.time_ns >= from) {
        push(p.time_ns, last, &mut pts);
        pts.push((p.time_ns, 0.0));
        last = Some(p.time_ns);
    }
    push(now, last, &mut pts);
    let max = pts.iter().map(|p| p.1).fold(1.0, f64::max);
    let line: Vec<String> = pts
        .iter()
        .map(|(t, lag)| {
            let x = (t - from) as f64 / DAY_NS as f64 * w;
            let y = h - lag / max * (h - 10.0);
            format!("{x:.1},{y:.1}")
        })
        .collect();
    format!(
        "<svg id=\"rpo-chart\" width=\"{w}\" height=\"{h}\" viewBox=\"0 0 {w} {h}\" role=\"img\">\
<title>RPO lag, peak {}</title><polyline fill=\"none\" stroke=\"#36c\" stroke-width=\"1.5\" points=\"{}\"/>\
<text x=\"4\" y=\"12\" font-size=\"11\">{}</text></svg>\n",
        crate::obs::status::age(max),
        line.join(" "),
        esc(&format!("peak {}", crate::obs::status::age(max)))
    )
}

/// The newest events of the store and its replica (`of` says which).
fn events(o: &mut String, ev: &[Event], store: &str) {
    o.push_str("<h2>Recent events</h2>\n<table id=\"events\"><tr><th>time</th><th>of</th><th>kind</th><th>file</th><th>change</th><th>reason</th></tr>");
    for e in ev.iter().rev().take(30) {
        let kind = serde_json::to_value(e.kind)
            .ok()
            .and_then(|v| v.as_str().map(str::to_string))
            .unwrap_or_default();
        let _ = write!(
            o,
            "<tr><td>{}</td><td>{}</td><td>{kind}</td><td>{}</td><td>{}{}</td><td>{}</td></tr>",
            esc(&e.time),
            if e.store == store { "store" } else { "replica" },
            esc(e.file.as_deref().unwrap_or("")),
            esc(&e
                .old
                .as_deref()
                .map_or(String::new(), |x| format!("{x} → "))),
            esc(&e.new),
            esc(&e.reason)
        );
    }
    o.push_str("</table>\n");
}

fn points(o: &mut String, pts: &[PointInfo]) {
    o.push_str("<h2>Points</h2>\n<table id=\"points\"><tr><th>id</th><th>time</th><th>consistency</th><th>changed</th></tr>");
    for p in pts.iter().rev() {
        let c = serde_json::to_value(p.consistency)
            .ok()
            .and_then(|v| v.as_str().map(str::to_string))
            .unwrap_or_default();
        let _ = write!(
            o,
            "<tr><td>{}</td><td>{}</td><td>{c}</td><td>{}</td></tr>",
            esc(&p.id),
            esc(&p.time),
            crate::model::fmt::human(p.bytes_changed)
        );
    }
    o.push_str("</table>\n");
}
