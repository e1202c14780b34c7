//! Sending a cycle to a replica, from any source. What a cycle sends comes through
//! `Source`: a tree as of one cut, file by file, each with the blocks that changed since
//! the replica's latest point, or marked `whole` when nothing vouches for what changed (an
//! initial replication, a resync): then every block is compared with the replica's by
//! BLAKE3 and only the differing ones travel. Today's source is the tracker's cut
//! (`primary::cycle::source`); a relay (a replica shipping onward) and a failback (a
//! promoted store shipping back) will be others.
//!
//! `sender` ships one source's blocks over a stream; `session` is the protocol around it
//! (hello, begin, commit) that every source shares.

pub mod sender;
pub mod session;

use crate::error::{Class, Error, Result};
use crate::model::{FileId, RelPath};
use crate::wire::WireError;

/// What a cycle sends: the files of a tree as of one cut.
pub trait Source {
    /// The files whose data travels, in the order they are sent.
    fn files(&self) -> Vec<&dyn SourceFile>;
}

/// One file of a source, as of its cut.
pub trait SourceFile {
    fn id(&self) -> FileId;
    /// Its path in the cut (where the replica may already hold a copy to compare with).
    fn path(&self) -> &RelPath;
    /// Its size at the cut.
    fn size(&self) -> u64;
    /// Nothing vouches for what changed: compare every block with the replica's.
    fn whole(&self) -> bool;
    /// The runs `[first, end)` of blocks that changed (for a file that is not `whole`).
    fn changed(&self) -> Vec<(u64, u64)>;
    /// For a changed block, the bit mask of the only 4 KiB pieces that changed in it
    /// (bit `i`: bytes `i*4096..`), when the source knows that for certain; `None`: the
    /// block is sent whole.
    fn pieces(&self, _b: u64) -> Option<u64> {
        None
    }
    /// A reader of its blocks as of the cut.
    fn blocks(&self) -> Box<dyn Blocks + '_>;
}

/// A file's blocks as of the cut. Each block is read at most once per cycle (a cut may
/// stop protecting a block from later writes once it has been read).
pub trait Blocks {
    /// Whether block `b` reads as zeros without reading it (a hole nothing wrote since).
    fn surely_zero(&mut self, b: u64) -> bool;
    /// Reads block `b` into `buf` (sized to the block's length); whether it is all zeros.
    fn read(&mut self, b: u64, buf: &mut Vec<u8>) -> Result<bool>;
}

/// The stream broke or made no sense.
pub fn wire_err(e: WireError) -> Error {
    match &e {
        WireError::Io(io) if io.kind() == std::io::ErrorKind::BrokenPipe => {
            Error::Hangup(format!("replica connection: {e}"))
        }
        _ => Error::Link(format!("replica connection: {e}")),
    }
}

/// A receiver's refusal.
pub fn refused(message: String, recoverable: bool) -> Error {
    Error::Refused {
        message: format!("replica: {message}"),
        class: Class::from_recoverable(recoverable),
    }
}
