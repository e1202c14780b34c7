//! `drfs ship`: one cycle now. Through the mounted daemon (over its control socket) when
//! the store is mounted; otherwise this process opens the store's tracking itself (taking
//! the daemon's lock, so a mount waits), runs the cycle and stops cleanly. One unmounted
//! ship at a time per store (`ship.lock`).

use std::path::Path;
use std::sync::Arc;

use crate::daemon::control::{self, Request, ShipReply};
use crate::error::{At, Error, Result};
use crate::model::progress::Progress;
use crate::primary::cycle::{self, CycleOpts};
use crate::primary::track::{Tracker, run};
use crate::state::StateDir;

/// Runs one cycle of `store`; what it did (a failed cycle is a reply with its code, not an
/// error: an error here means the cycle could not even be tried).
pub fn ship(store: &Path, resync: bool, progress: Option<Arc<dyn Progress>>) -> Result<ShipReply> {
    let canon = store
        .canonicalize()
        .map_err(|e| Error::Invalid(format!("store {}: {e}", store.display())))?;
    let (sd, cfg) = StateDir::open(&canon)?;
    if cfg.role == crate::state::Role::Replica {
        return relay(&canon, resync);
    }
    if cfg.replication.is_none() {
        return Err(Error::operator(format!(
            "{} is not protected: run `drfs protect {} --to REPLICA` first",
            sd.store().display(),
            sd.store().display()
        )));
    }
    let req = Request::Ship {
        resync,
        consistency: None,
    };
    if let Some(v) = control::call(&cfg.store_id, &req)? {
        return serde_json::from_value(v)
            .map_err(|e| Error::Link(format!("the daemon's answer: {e}")));
    }
    // Not mounted: ship directly, one `drfs ship` at a time.
    let lock_path = sd.path("ship.lock");
    let lock = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)
        .at(&lock_path)?;
    crate::sys::flock(&lock, libc::LOCK_EX).at(&lock_path)?;
    let _store_lock = run::lock(&sd)?;
    let tracker = Tracker::start(sd.clone(), cfg, Path::new("(drfs ship)"))?;
    let o = cycle::run(
        &tracker,
        CycleOpts {
            resync,
            progress,
            consistency: None,
        },
    );
    match crate::obs::status::store(&sd, Some(&tracker), false) {
        Ok(s) => crate::obs::watch::health(&sd, s.health, &s.reasons),
        Err(e) => tracing::warn!("health: {e}"),
    }
    tracker.close()?;
    Ok(ShipReply::from(&o))
}

/// An onward cycle of a replica (extended replication), as a ship's reply.
fn relay(root: &Path, resync: bool) -> Result<ShipReply> {
    let r = crate::replica::posix::Replica::open(root)?;
    match crate::replica::posix::relay::ship(&r, resync) {
        Ok(x) => Ok(ShipReply {
            code: 0,
            message: match &x.point {
                Some(p) => format!("point {p} sent onward"),
                None => "the onward replica already has the latest point".into(),
            },
            point: x.point,
            bytes: x.bytes,
            wire_bytes: x.bytes,
            pause_us: 0,
            duration_ms: x.duration_ms,
        }),
        Err(e @ (Error::Invalid(_) | Error::Corrupt { .. })) => Err(e),
        Err(e) => Ok(ShipReply {
            code: e.class().exit_code(),
            message: e.to_string(),
            point: None,
            bytes: 0,
            wire_bytes: 0,
            pause_us: 0,
            duration_ms: 0,
        }),
    }
}
