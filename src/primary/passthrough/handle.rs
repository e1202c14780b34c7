//! Open files and directories of the mount. A client that opens with O_DIRECT gets a
//! backing descriptor opened with O_DIRECT too, so O_DIRECT bypasses the host page cache on
//! both sides; FUSE hands us payloads at odd addresses, so direct I/O goes through a
//! per-thread 4 KiB-aligned bounce buffer (`sys::aligned`). Requests whose offset or length
//! the store cannot do directly fall back to a buffered descriptor of the same file (the
//! kernel keeps the two coherent).

use std::ffi::OsString;
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::sync::Arc;

use parking_lot::Mutex;

use crate::fuse::table::Table;
use crate::primary::passthrough::inode::Inode;
use crate::primary::track::FileTrack;
use crate::sys::aligned::with_aligned;
use crate::sys::read_full;

pub struct Handle {
    pub inode: Arc<Inode>,
    /// The main descriptor: O_DIRECT when `align` is set.
    pub file: File,
    /// A buffered descriptor for I/O the direct one cannot do.
    pub buffered: Option<File>,
    /// O_DIRECT (memory, offset/length) alignment of the backing file, for direct handles.
    pub align: Option<(usize, u64)>,
    pub writable: bool,
    pub track: Option<Arc<FileTrack>>,
}

impl Handle {
    /// The descriptor for a request at `off` of `len` bytes, and whether it is direct.
    fn pick(&self, off: u64, len: usize) -> (&File, bool) {
        match (self.align, &self.buffered) {
            (Some((_, a)), _) if off % a == 0 && len as u64 % a == 0 => (&self.file, true),
            (Some(_), Some(b)) => (b, false),
            _ => (&self.file, false),
        }
    }

    /// A descriptor for calls that must not be direct (copy_file_range).
    pub fn plain(&self) -> &File {
        self.buffered.as_ref().unwrap_or(&self.file)
    }

    /// Reads up to `len` bytes at `off` and hands them to `reply`.
    pub fn read<R>(&self, off: u64, len: usize, reply: impl FnOnce(io::Result<&[u8]>) -> R) -> R {
        let (f, _) = self.pick(off, len);
        with_aligned(len, |buf| match read_full(f, buf, off) {
            Ok(n) => reply(Ok(&buf[..n])),
            Err(e) => reply(Err(e)),
        })
    }

    /// Writes all of `data` at `off`.
    pub fn write(&self, off: u64, data: &[u8]) -> io::Result<()> {
        let (f, direct) = self.pick(off, data.len());
        let mem_align = self.align.map_or(1, |(m, _)| m.max(1));
        if !direct || (data.as_ptr() as usize) % mem_align == 0 {
            return f.write_all_at(data, off);
        }
        with_aligned(data.len(), |buf| {
            buf.copy_from_slice(data);
            f.write_all_at(buf, off)
        })
    }
}

/// A directory being listed: its entries, read at open and again on rewind.
pub struct DirHandle {
    pub inode: Arc<Inode>,
    pub entries: Vec<DirEntry>,
}

pub struct DirEntry {
    pub ino: u64,
    pub kind: fuser::FileType,
    pub name: OsString,
}

pub type Dirs = Table<Mutex<DirHandle>>;
