//! The protected store: how a run of the daemon begins and ends (`run`), change tracking
//! (`track`), the tracked passthrough filesystem (`passthrough`), and replication cycles
//! (`cycle`).

pub mod cycle;
pub mod passthrough;
pub mod track;
