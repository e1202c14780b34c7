//! The read-side FUSE filesystems over a replica: every point read-only (`browse`), and a
//! writable throwaway clone of one (`test_failover`).

pub mod browse;
pub mod test_failover;
