//! `drfs status PATH`: the status of a replica, or of a store (from its daemon when it is
//! mounted: it knows the live figures; from the state directory otherwise).

use std::path::Path;

use crate::daemon::control::{self, Request};
use crate::error::{Error, Result};
use crate::obs::status::{self, ReplicaStatus};
use crate::replica::posix::Replica;
use crate::state::StateDir;

pub enum Status {
    /// A store's status as JSON (the daemon's answer, or the same built here).
    Store(serde_json::Value),
    Replica(Box<ReplicaStatus>),
}

pub fn of(path: &Path) -> Result<Status> {
    let canon = path
        .canonicalize()
        .map_err(|e| Error::Invalid(format!("{}: {e}", path.display())))?;
    if Replica::is_replica(&canon) {
        let r = Replica::open_only(&canon)?;
        return Ok(Status::Replica(Box::new(status::replica(&r)?)));
    }
    let (sd, cfg) = StateDir::open(&canon)?;
    let v = match control::call(&cfg.store_id, &Request::Status)? {
        Some(v) => v,
        None => serde_json::to_value(status::store(&sd, None, false)?).map_err(Error::encode)?,
    };
    Ok(Status::Store(v))
}
