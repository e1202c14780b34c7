//! Reading recovery points: restore.

pub mod restore;
