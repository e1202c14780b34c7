//! Open files and directories of the mount, and the data path's I/O helpers. A client that
//! opens with O_DIRECT gets a backing descriptor opened with O_DIRECT too, so O_DIRECT
//! bypasses the host page cache on both sides; FUSE hands us payloads at odd addresses, so
//! direct I/O goes through a per-thread 4 KiB-aligned bounce buffer (`view` has a second
//! one for its whole-block checks). Requests whose offset or length the store cannot do
//! directly fall back to a buffered descriptor of the same file (the kernel keeps the two
//! coherent).

use std::alloc::{Layout, alloc_zeroed, dealloc};
use std::cell::RefCell;
use std::collections::HashMap;
use std::ffi::OsString;
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use parking_lot::{Mutex, RwLock};

use crate::primary::passthrough::inode::Inode;
use crate::primary::track::FileTrack;
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

/// A growable, page-aligned buffer.
struct Aligned {
    ptr: *mut u8,
    cap: usize,
}

const ALIGN: usize = 4096;

impl Aligned {
    fn get(&mut self, len: usize) -> &mut [u8] {
        if len > self.cap {
            self.release();
            let cap = len.next_multiple_of(ALIGN).max(ALIGN);
            let Ok(layout) = Layout::from_size_align(cap, ALIGN) else {
                return &mut [];
            };
            let ptr = unsafe { alloc_zeroed(layout) };
            if ptr.is_null() {
                std::alloc::handle_alloc_error(layout);
            }
            self.ptr = ptr;
            self.cap = cap;
        }
        if len == 0 {
            return &mut [];
        }
        unsafe { std::slice::from_raw_parts_mut(self.ptr, len) }
    }

    fn release(&mut self) {
        if !self.ptr.is_null() {
            if let Ok(layout) = Layout::from_size_align(self.cap, ALIGN) {
                unsafe { dealloc(self.ptr, layout) };
            }
            self.ptr = std::ptr::null_mut();
            self.cap = 0;
        }
    }
}

impl Drop for Aligned {
    fn drop(&mut self) {
        self.release();
    }
}

thread_local! {
    static BOUNCE: RefCell<Aligned> = const { RefCell::new(Aligned { ptr: std::ptr::null_mut(), cap: 0 }) };
    static SCRATCH: RefCell<Aligned> = const { RefCell::new(Aligned { ptr: std::ptr::null_mut(), cap: 0 }) };
}

/// Runs `f` on this thread's page-aligned buffer of `len` bytes (contents undefined).
pub fn with_aligned<R>(len: usize, f: impl FnOnce(&mut [u8]) -> R) -> R {
    BOUNCE.with(|b| f(b.borrow_mut().get(len)))
}

/// A second such buffer, for work done while the first holds a reply (`view` reads a
/// whole block into it to check its BLAKE3 when a read covers only part of the block).
pub fn with_scratch<R>(len: usize, f: impl FnOnce(&mut [u8]) -> R) -> R {
    SCRATCH.with(|b| f(b.borrow_mut().get(len)))
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

/// Fills a READDIR reply from a whole listing (`.` and `..` first), starting at entry
/// `offset`; each entry's offset is its position plus one.
pub fn reply_entries<N: AsRef<std::ffi::OsStr>>(
    mut reply: fuser::ReplyDirectory,
    offset: u64,
    entries: impl IntoIterator<Item = (u64, fuser::FileType, N)>,
) {
    for (i, (ino, kind, name)) in entries.into_iter().enumerate().skip(offset as usize) {
        if reply.add(fuser::INodeNo(ino), i as u64 + 1, kind, name) {
            break;
        }
    }
    reply.ok();
}

/// A table from the u64 handles the kernel holds to our open objects.
pub struct Table<T> {
    map: RwLock<HashMap<u64, Arc<T>>>,
    next: AtomicU64,
}

impl<T> Default for Table<T> {
    fn default() -> Self {
        Table {
            map: RwLock::new(HashMap::new()),
            next: AtomicU64::new(1),
        }
    }
}

impl<T> Table<T> {
    pub fn insert(&self, v: T) -> u64 {
        let fh = self.next.fetch_add(1, Ordering::Relaxed);
        self.map.write().insert(fh, Arc::new(v));
        fh
    }

    pub fn get(&self, fh: u64) -> Option<Arc<T>> {
        self.map.read().get(&fh).cloned()
    }

    pub fn remove(&self, fh: u64) -> Option<Arc<T>> {
        self.map.write().remove(&fh)
    }
}

pub type Dirs = Table<Mutex<DirHandle>>;
