//! drfs: disaster-recovery replication for virtual-machine disks, as a filesystem.
//! Data flows one way: the tracked mount (`mount`, `track`) records what changes; later
//! stages ship it to a replica and show its recovery points. See ARCHITECTURE.md.

pub mod browse;
pub mod changes;
pub mod cli;
pub mod clone;
pub mod commands;
pub mod control;
pub mod cycle;
pub mod daemon;
pub mod error;
pub mod fault;
pub mod mount;
pub mod relpath;
pub mod replica;
pub mod restore;
pub mod runs;
pub mod state;
pub mod status;
pub mod sys;
pub mod track;
pub mod view;
pub mod wire;

#[global_allocator]
static ALLOC: mount::bufalloc::FuseBufAlloc = mount::bufalloc::FuseBufAlloc;
