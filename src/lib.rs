//! drfs: disaster-recovery replication for virtual-machine disks, as a filesystem.
//!
//! The layers, bottom to top; a module may import only from its own layer and the ones
//! below it (tests/layers.rs checks every `use crate::` line):
//!
//! | layer | modules | what it is |
//! |---|---|---|
//! | 0 | `error`, `model` | the vocabulary: errors, ids, paths, runs, manifests, settings, targets; no I/O |
//! | 1 | `sys` | Linux calls std lacks, fault injection |
//! | 2 | `state` | the `.drfs` directory of a store or a replica: layout, `state.toml`, locks |
//! | 2 | `events` | the event history of a store or a replica: one JSON line per change of state |
//! | 2 | `wire` | the stream protocol: frames, messages, blocks, hash lists |
//! | 2 | `fuse` | the FUSE toolkit the three filesystems share, and daemon start-up |
//! | 3 | `transport` | reaching a target's receiver: a byte stream to `drfs receive` |
//! | 4 | `ship` | sending a cycle over a stream, from any `Source` |
//! | 4 | `replica` | receiving and keeping points: the `ReplicaStore` and `PointStore` seams, the POSIX replica |
//! | 5 | `points` | reading points through a `PointStore`: views, restore |
//! | 6 | `primary` | the protected store: run markers, tracking, the passthrough, cycles |
//! | 7 | `mounts` | the read-side FUSE filesystems: browse and test failover |
//! | 8 | `obs` | what an operator reads: status, the changes report |
//! | 9 | `daemon` | the store daemon: tracker, schedule, control socket |
//! | 10 | `ops` | what the CLI calls: mount, protect, ship, receive, browse, test failover |
//! | 11 | `cli` | arguments, dispatch, rendering, exit codes |

pub mod error;
pub mod model;

pub mod sys;

pub mod events;
pub mod fuse;
pub mod state;
pub mod wire;

pub mod transport;

pub mod replica;
pub mod ship;

pub mod points;

pub mod primary;

pub mod mounts;

pub mod obs;

pub mod daemon;

pub mod ops;

pub mod cli;

#[global_allocator]
static ALLOC: fuse::bufalloc::FuseBufAlloc = fuse::bufalloc::FuseBufAlloc;
