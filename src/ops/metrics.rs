//! `drfs metrics STORE|REPLICA`: the Prometheus text the daemon's `/metrics` serves,
//! printed once (for node_exporter's textfile collector, from cron). A mounted store's
//! figures come from its daemon, as `drfs status` gets them.

use std::path::Path;

use crate::error::{Error, Result};
use crate::obs::metrics;
use crate::obs::status::StoreStatus;
use crate::ops::status::Status;
use crate::state::StateDir;

pub fn text(path: &Path) -> Result<String> {
    match crate::ops::status::of(path)? {
        Status::Replica(r) => Ok(metrics::of_replica(&r)),
        Status::Store(v) => {
            let s: StoreStatus = serde_json::from_value(v)
                .map_err(|e| Error::Link(format!("the daemon's status: {e}")))?;
            let sd = StateDir::new(Path::new(&s.path));
            Ok(metrics::of_store(&sd, &s))
        }
    }
}
