//! The replica side: a replica store keeps a protected store's recovery points. Two seams
//! say what any store must do, whatever it keeps its points on:
//! - `PointStore`: the read side (which points there are, their manifests, their files'
//!   bytes, every block checked against its BLAKE3), for `points`, browse, test failover
//!   and restore;
//! - `ReplicaStore`: the receive side (`receive`): who it is, its latest point, staging a
//!   cycle's blocks, answering hash requests, committing a cycle as a point.
//!
//! Today's store is a POSIX directory whose files are the latest point (`posix`); an
//! object store will be another.

pub mod posix;
pub mod receive;

use std::io;
use std::path::Path;

use crate::error::Result;
use crate::model::{Entry, FileId, Manifest, PointInfo, RelPath};
use crate::wire::{Block, BlockHash, Partial};

/// Why a block fails its check.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Bad {
    /// Its source keeps no hash index.
    Unhashed,
    /// Its bytes do not hash to the entry kept for it.
    Mismatch,
}

impl Bad {
    pub fn why(self) -> &'static str {
        match self {
            Bad::Unhashed => "has no BLAKE3 kept",
            Bad::Mismatch => "does not match its BLAKE3",
        }
    }
}

/// One file of a point, for reading. No read returns a block that fails its BLAKE3.
pub trait PointRead: Send + Sync {
    /// Its size in the point.
    fn size(&self) -> u64;
    /// Reads at `off` into `buf` (short only at the end); EIO for a block that fails its
    /// BLAKE3.
    fn read_at(&self, buf: &mut [u8], off: u64) -> io::Result<usize>;
    /// Reads block `b` into `buf` (its length) and says what is wrong with it, if
    /// anything (for restore, which reports for itself).
    fn read_checked(&self, buf: &mut [u8], b: u64) -> io::Result<(usize, Option<Bad>)>;
    /// The first block in `a..z` whose hash entry is not a zero block's (or that has none):
    /// for checking that a hole of the point was a hole or zeros on the primary.
    fn first_nonzero_entry(&self, a: u64, z: u64) -> io::Result<Option<u64>>;
    /// SEEK_DATA (`data`) / SEEK_HOLE from `off`; None past the end.
    fn seek(&self, off: u64, data: bool) -> io::Result<Option<u64>>;
}

/// A replica's points, as readers see them.
pub trait PointStore: Send + Sync {
    /// Where the store is, for messages and logs.
    fn location(&self) -> &Path;
    fn block_size(&self) -> u64;
    /// Every complete point, oldest first.
    fn points(&self) -> Result<Vec<PointInfo>>;
    /// The newest point.
    fn latest(&self) -> Result<Option<PointInfo>>;
    fn manifest(&self, id: &str) -> Result<Manifest>;
    /// Opens file `e` of point `p` (pinned against retention while open). `direct`: the
    /// reader caches what it reads itself, so the store need not (O_DIRECT).
    fn open(&self, p: &PointInfo, e: &Entry, direct: bool) -> Result<Box<dyn PointRead>>;
    /// About how many bytes file `e` of point `p` takes up (an estimate, for `du`).
    fn allocated(&self, p: &PointInfo, e: &Entry) -> Result<u64>;
}

/// What the sender's hello asks of the replica it binds to.
pub struct Binding<'a> {
    pub store_id: &'a str,
    pub block_size: u64,
    /// `drfs protect`: make the replica this store's if it is not yet.
    pub init: bool,
    /// The retention policy.
    pub keep: &'a str,
    /// A directory that holds files may become the replica (its files a seed copy).
    pub seed: bool,
    /// A planned failover: a replica this store's planned failover promoted binds too.
    pub planned: bool,
    /// A reprotect: the directory is the primary with this id, which a failover of this
    /// store replaced; it is made this store's replica first.
    pub reprotect: Option<&'a str>,
}

/// What a receive session writes to: one replica, bound to one store.
pub trait ReplicaStore {
    /// Where the replica is, for messages.
    fn location(&self) -> &Path;
    /// The replica's own id.
    fn id(&self) -> &str;
    /// The store it replicates.
    fn source(&self) -> Option<&str>;
    /// The point a planned failover of its source promoted it at (it takes no cycle).
    fn promoted(&self) -> Option<&str>;
    fn block_size(&self) -> u64;
    fn latest(&self) -> Result<Option<PointInfo>>;
    /// Starts staging cycle `generation`, which builds on `base` (resuming what an
    /// interrupted attempt at it staged).
    fn begin(&mut self, generation: u64, base: Option<u64>) -> Result<()>;
    /// Stages one block (checked against its BLAKE3 and its bounds).
    fn stage(&mut self, b: &Block) -> Result<()>;
    /// Stages the block a partial block makes with the latest point's (checked against
    /// its BLAKE3 and its bounds).
    fn stage_partial(&mut self, p: &Partial) -> Result<()>;
    /// The hashes of blocks `first..first+count` of file `id` (at `path` in the cut): as
    /// staged, else as in the latest point (before a first point: a file at `path`, to
    /// seed from).
    fn hashes(
        &mut self,
        id: FileId,
        path: &RelPath,
        first: u64,
        count: u64,
    ) -> Result<Vec<BlockHash>>;
    /// The BLAKE3 entries its hash index keeps for blocks `first..first+count` of file
    /// `id` of the latest point (what the primary sent, not a fresh read of the files).
    fn index(&mut self, id: FileId, first: u64, count: u64) -> Result<Vec<BlockHash>>;
    /// The staged cycle becomes a point described by `m` (atomically), then retention runs.
    fn commit(&mut self, m: Manifest) -> Result<PointInfo>;
}
