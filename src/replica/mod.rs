//! The replica side: receiving cycles (`receive`) into a replica store and keeping its
//! points; today's store is a POSIX directory (`posix`).

pub mod posix;
pub mod receive;
