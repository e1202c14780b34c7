//! Health changes as events: `health` compares a store's or a replica's health now with
//! the last one this process saw (at first, the last `health` event in its history) and
//! records an event when it moved, with the reasons. The daemon calls it after every
//! cycle and every few seconds (a point growing old turns a store Warning between
//! cycles); `drfs ship`, `drfs receive` and `drfs verify` call it when they are done.

use std::collections::BTreeMap;
use std::path::PathBuf;

use parking_lot::Mutex;

use crate::events::{self, Event, Kind};
use crate::obs::status::Health;
use crate::state::StateDir;

static LAST: Mutex<BTreeMap<PathBuf, Option<Health>>> = Mutex::new(BTreeMap::new());

fn name(h: Health) -> &'static str {
    match h {
        Health::Normal => "normal",
        Health::Warning => "warning",
        Health::Critical => "critical",
    }
}

fn parse(s: &str) -> Option<Health> {
    [Health::Normal, Health::Warning, Health::Critical]
        .into_iter()
        .find(|h| name(*h) == s)
}

/// Records a `health` event for `sd` if `now` differs from the health last recorded.
pub fn health(sd: &StateDir, now: Health, reasons: &[String]) {
    let mut last = LAST.lock();
    let key = sd.path("");
    let before = *last.entry(key).or_insert_with(|| {
        events::last(sd, Kind::Health)
            .ok()
            .flatten()
            .and_then(|e| parse(&e.new))
    });
    if before == Some(now) {
        return;
    }
    let why = if reasons.is_empty() {
        "every check passes".to_string()
    } else {
        reasons.join("; ")
    };
    let mut e = Event::new(sd, Kind::Health, name(now), why);
    if let Some(b) = before {
        e = e.old(name(b));
    }
    events::record(sd, e);
    last.insert(sd.path(""), Some(now));
}
