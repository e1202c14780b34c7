//! `drfs verify REPLICA [--point ID | --all]`: checks every block the chosen points read
//! against its BLAKE3 (`replica::posix::verify`), at the idle I/O priority and a bounded
//! rate, resuming an unfinished run. Each bad block is an event; the replica turns
//! Warning while the last run's findings stand (`drfs status`).

use std::path::Path;

use crate::error::{Error, Result};
use crate::events::{self, Event, Kind};
use crate::replica::posix::Replica;
use crate::replica::posix::verify::{self, BadBlock, Opts, Report, Scope};

pub struct Verify<'a> {
    pub point: Option<&'a str>,
    pub all: bool,
    /// Bytes per second at most.
    pub rate: Option<u64>,
    pub restart: bool,
}

pub fn verify(replica: &Path, v: &Verify) -> Result<Report> {
    let canon = replica
        .canonicalize()
        .map_err(|e| Error::Invalid(format!("{}: {e}", replica.display())))?;
    if !Replica::is_replica(&canon) {
        return Err(Error::Invalid(format!(
            "{} is not a drfs replica (no .drfs/state.toml with role = \"replica\")",
            canon.display()
        )));
    }
    let r = Replica::open_only(&canon)?;
    if let Err(e) = crate::sys::ioprio_idle() {
        tracing::warn!("cannot lower the I/O priority: {e}");
    }
    let scope = match (v.point, v.all) {
        (Some(p), _) => Scope::Point(p.to_string()),
        (None, true) => Scope::All,
        (None, false) => Scope::Latest,
    };
    let sd = r.sd.clone();
    let on_bad = |b: &BadBlock| {
        let why = format!(
            "block at offset {} ({} bytes) of the {} {}; points reading it: {}",
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
        events::record(&sd, Event::new(&sd, Kind::Verify, "bad", why).file(&b.file));
    };
    let rep = verify::verify(
        &r,
        &Opts {
            scope,
            rate: v.rate,
            restart: v.restart,
            on_bad: &on_bad,
        },
    )?;
    let (new, why) = if rep.bad.is_empty() {
        ("clean", format!("{} blocks checked", rep.blocks))
    } else {
        (
            "bad",
            format!(
                "{} of {} blocks fail their BLAKE3",
                rep.bad.len(),
                rep.blocks
            ),
        )
    };
    events::record(&sd, Event::new(&sd, Kind::Verify, new, why));
    let s = crate::obs::status::replica(&r)?;
    crate::obs::watch::health(&r.sd, s.health, &s.reasons);
    Ok(rep)
}
