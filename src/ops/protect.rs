//! `drfs protect`: checks the settings, binds the replica to the store (an empty directory
//! becomes its replica; an existing one must already be this store's), and records where
//! and how the store replicates in its `state.toml`. Rebinding to another replica forgets
//! the old one's cycle state.

use std::path::Path;

use crate::error::{At, Error, Result};
use crate::model::retention::Policy;
use crate::model::{Group, Interval, Target};
use crate::ship::session::{self, Hello};
use crate::state::{Replication, StateDir};

/// The settings `drfs protect` records.
pub struct Protect<'a> {
    pub store: &'a Path,
    pub to: &'a str,
    pub interval: &'a str,
    pub keep: &'a str,
    pub group: &'a str,
}

/// Protects the store; returns the settings now in force.
pub fn protect(p: &Protect<'_>) -> Result<Replication> {
    let interval: Interval = p.interval.parse().map_err(Error::Invalid)?;
    Policy::parse(p.keep).map_err(Error::Invalid)?;
    let group: Group = p.group.parse().map_err(Error::Invalid)?;
    let target: Target = p.to.parse().map_err(Error::Invalid)?;
    let store = p
        .store
        .canonicalize()
        .map_err(|e| Error::Invalid(format!("store {}: {e}", p.store.display())))?;
    if !store.is_dir() {
        return Err(Error::Invalid(format!(
            "store {} is not a directory",
            store.display()
        )));
    }
    let dir = target.local().map_err(Error::Invalid)?;
    let replica = dir
        .canonicalize()
        .map_err(|e| Error::Invalid(format!("replica {}: {e}", dir.display())))?;
    if !replica.is_dir() {
        return Err(Error::Invalid(format!(
            "replica {} is not a directory",
            replica.display()
        )));
    }
    if replica.starts_with(&store) || store.starts_with(&replica) {
        return Err(Error::Invalid(format!(
            "store {} and replica {} must not contain each other",
            store.display(),
            replica.display()
        )));
    }
    let target = Target::Local(replica);
    let (sd, mut cfg) = StateDir::open_or_init(&store, None)?;
    let hello = Hello {
        store_id: &cfg.store_id,
        block_size: cfg.block_size,
        keep: p.keep,
    };
    let replica_id = session::bind(&target, &hello)?;
    let rep = Replication {
        target,
        interval,
        keep: p.keep.to_string(),
        group,
        replica_id: replica_id.clone(),
    };
    if cfg
        .replication
        .as_ref()
        .is_none_or(|r| r.replica_id != replica_id)
    {
        let p = sd.path("cycle.json");
        if p.exists() {
            std::fs::remove_file(&p).at(&p)?;
        }
    }
    cfg.replication = Some(rep.clone());
    sd.write_config(&cfg)?;
    Ok(rep)
}
