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
