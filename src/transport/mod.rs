//! Reaching a replica's receiver: a byte stream to `drfs receive` for a target.

pub mod local;
