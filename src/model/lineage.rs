//! The lineage of a store: the generation history that tells two copies of one store
//! apart (DRBD's generation identifiers). Every store and replica keeps, in `state.toml`,
//! the list of its epochs, oldest first: an epoch begins when a store is created, when a
//! replica is made or promoted, when its files are rolled back to an older point, and
//! when a primary is demoted to a replica. The newest epoch says which history a copy
//! follows now; `drfs status` shows them as the failover history.
//!
//! A promotion also leaves a `Promotion` record on the promoted store: which store it
//! replicated, from which point, when, and whether the choice of point was committed.

use serde::{Deserialize, Serialize};

/// Why an epoch began.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Why {
    /// The store was created (or first tracked).
    Created,
    /// A replica was made: it follows its source's lineage.
    Replica,
    /// A replica was promoted to a primary (failover).
    Promoted,
    /// Its files were rolled back to an older point.
    RolledBack,
    /// A primary became the replica of the store that replaced it.
    Demoted,
}

impl Why {
    pub fn describe(self) -> &'static str {
        match self {
            Why::Created => "created",
            Why::Replica => "became a replica",
            Why::Promoted => "promoted to primary",
            Why::RolledBack => "rolled back",
            Why::Demoted => "demoted to replica",
        }
    }
}

/// One epoch of a lineage.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Epoch {
    /// A random id, new for every epoch.
    pub id: String,
    pub why: Why,
    pub time: String,
    pub time_ns: i64,
    /// The store this directory was (on a promotion or demotion: the other side's id).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub peer: Option<String>,
    /// The point it began at, where one applies.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub point: Option<String>,
}

/// A replica promoted to a primary (`drfs failover`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Promotion {
    /// The store it was the replica of.
    pub from: String,
    pub time: String,
    pub time_ns: i64,
    /// The point it was promoted at (its files are that point's).
    pub point: String,
    /// The point that was latest when the failover began (newer points stay until commit).
    pub latest_before: String,
    /// A planned failover (the old primary shipped everything and was demoted).
    #[serde(default)]
    pub planned: bool,
    /// `--commit`: the point can no longer be changed.
    #[serde(default)]
    pub committed: bool,
}

impl Promotion {
    /// A planned failover of the store `store` made it (so that store may finish it).
    pub fn planned_by(&self, store: &str) -> bool {
        self.planned && self.from == store
    }
}

/// A lineage: the epochs of one directory, oldest first.
pub fn current(epochs: &[Epoch]) -> Option<&Epoch> {
    epochs.last()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn e(id: &str, why: Why) -> Epoch {
        Epoch {
            id: id.into(),
            why,
            time: String::new(),
            time_ns: 0,
            peer: None,
            point: None,
        }
    }

    #[test]
    fn the_current_epoch_is_the_last() {
        let b = vec![e("x", Why::Created), e("y", Why::Promoted)];
        assert_eq!(current(&b).map(|e| e.why), Some(Why::Promoted));
        assert_eq!(current(&[]), None);
        let t = toml::to_string(&b[1]).unwrap();
        assert!(t.contains("why = \"promoted\""), "{t}");
    }
}
