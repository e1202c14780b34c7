//! The FUSE toolkit the three filesystems (the store's passthrough, browse, the test-failover
//! clone) share: mounting a session so its end unmounts only its own mount (`attach`),
//! page-aligned write payloads (`bufalloc`), the mount table (`mountinfo`), the tables of
//! open handles and the READDIR reply loop (`table`), running as a background daemon
//! (`daemon`), and one start-up for every drfs filesystem (`serve`).

pub mod attach;
pub mod bufalloc;
pub mod daemon;
pub mod mountinfo;
pub mod serve;
pub mod table;
