//! Sending a cycle: what a cycle sends comes from a `Source` (today the tracker's cut); the
//! sender ships its changed blocks, or compares whole files by BLAKE3 with the replica's.

pub mod sender;
