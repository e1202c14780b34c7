//! `drfs events STORE|REPLICA [--since T]`: the event history of a store or a replica,
//! oldest first. T is an RFC 3339 time (`2026-12-02T03:00:00Z`, or without the zone in
//! UTC) or an age (`1h`: from an hour ago).

use std::path::Path;

use crate::error::{Error, Result};
use crate::events::{self, Event};
use crate::replica::posix::Replica;
use crate::state::StateDir;

/// The state directory of the store or replica at `path`.
pub fn state_dir(path: &Path) -> Result<StateDir> {
    let canon = path
        .canonicalize()
        .map_err(|e| Error::Invalid(format!("{}: {e}", path.display())))?;
    if Replica::is_replica(&canon) {
        return Ok(Replica::open_only(&canon)?.sd);
    }
    Ok(StateDir::open(&canon)?.0)
}

/// `--since`'s value as nanoseconds since the epoch.
pub fn since(t: &str) -> Result<i64> {
    if let Ok(d) = humantime::parse_duration(t) {
        return Ok(crate::sys::now_ns() as i64 - d.as_nanos() as i64);
    }
    let at = humantime::parse_rfc3339_weak(t).map_err(|_| {
        Error::Invalid(format!(
            "--since {t:?}: give an RFC 3339 time (2026-12-02T03:00:00Z) or an age (1h, 30m)"
        ))
    })?;
    let d = at
        .duration_since(std::time::UNIX_EPOCH)
        .map_err(|_| Error::Invalid(format!("--since {t:?}: before 1970")))?;
    Ok(d.as_nanos() as i64)
}

pub fn events(path: &Path, since_t: Option<&str>) -> Result<Vec<Event>> {
    let sd = state_dir(path)?;
    let since_ns = since_t.map(since).transpose()?;
    events::read(&sd, since_ns)
}
