//! The inode table of the mount: every inode the kernel knows is an O_PATH descriptor on
//! the backing file, so renames and hard links need no path bookkeeping and an unlinked
//! open file stays reachable. The FUSE node id is the backing inode number (stable across
//! remounts) for the store's own filesystem; inodes of other filesystems mounted inside
//! the store get ids from a separate range.

use std::collections::HashMap;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};

use parking_lot::{Mutex, RwLock};

use crate::primary::track::FileTrack;

pub const ROOT: u64 = 1;
const ALT_BASE: u64 = 1 << 62;

pub struct Inode {
    pub nodeid: u64,
    pub fd: OwnedFd,
    pub mode: u32,
    pub dev: u64,
    pub ino: u64,
    nlookup: AtomicU64,
    track: OnceLock<Arc<FileTrack>>,
}

impl Inode {
    pub fn is_file(&self) -> bool {
        self.mode & libc::S_IFMT == libc::S_IFREG
    }

    pub fn is_symlink(&self) -> bool {
        self.mode & libc::S_IFMT == libc::S_IFLNK
    }

    pub fn birth(&self) -> u64 {
        crate::sys::btime_ns(self.fd.as_fd())
    }

    /// The tracking of this regular file, if it has been made.
    pub fn tracked(&self) -> Option<&Arc<FileTrack>> {
        self.track.get()
    }

    /// The tracking of this regular file, made on first use by `make`.
    pub fn track<E>(
        &self,
        make: impl FnOnce() -> Result<Arc<FileTrack>, E>,
    ) -> Result<Arc<FileTrack>, E> {
        if let Some(t) = self.track.get() {
            return Ok(t.clone());
        }
        let t = make()?;
        Ok(self.track.get_or_init(|| t).clone())
    }
}

pub struct Inodes {
    map: RwLock<HashMap<u64, Arc<Inode>>>,
    alt: Mutex<HashMap<(u64, u64), u64>>,
    next_alt: AtomicU64,
    root_dev: u64,
    root_ino: u64,
}

impl Inodes {
    pub fn new(root_fd: OwnedFd, st: &libc::stat) -> Inodes {
        let root = Arc::new(Inode {
            nodeid: ROOT,
            fd: root_fd,
            mode: st.st_mode,
            dev: st.st_dev,
            ino: st.st_ino,
            nlookup: AtomicU64::new(1),
            track: OnceLock::new(),
        });
        let mut map = HashMap::new();
        map.insert(ROOT, root);
        Inodes {
            map: RwLock::new(map),
            alt: Mutex::new(HashMap::new()),
            next_alt: AtomicU64::new(ALT_BASE),
            root_dev: st.st_dev,
            root_ino: st.st_ino,
        }
    }

    /// The node id the kernel sees for a backing (device, inode).
    pub fn nodeid(&self, dev: u64, ino: u64) -> u64 {
        if dev == self.root_dev && ino == self.root_ino {
            return ROOT;
        }
        if dev == self.root_dev && ino > ROOT && ino < ALT_BASE {
            return ino;
        }
        *self
            .alt
            .lock()
            .entry((dev, ino))
            .or_insert_with(|| self.next_alt.fetch_add(1, Ordering::Relaxed))
    }

    pub fn get(&self, nodeid: u64) -> Option<Arc<Inode>> {
        self.map.read().get(&nodeid).cloned()
    }

    /// Registers one kernel lookup of the inode behind `fd`.
    pub fn insert(&self, fd: OwnedFd, st: &libc::stat) -> Arc<Inode> {
        let nodeid = self.nodeid(st.st_dev, st.st_ino);
        if let Some(i) = self.map.read().get(&nodeid) {
            if i.ino == st.st_ino && i.dev == st.st_dev {
                i.nlookup.fetch_add(1, Ordering::AcqRel);
                return i.clone();
            }
        }
        let mut map = self.map.write();
        if let Some(i) = map.get(&nodeid) {
            if i.ino == st.st_ino && i.dev == st.st_dev {
                i.nlookup.fetch_add(1, Ordering::AcqRel);
                return i.clone();
            }
        }
        let inode = Arc::new(Inode {
            nodeid,
            fd,
            mode: st.st_mode,
            dev: st.st_dev,
            ino: st.st_ino,
            nlookup: AtomicU64::new(1),
            track: OnceLock::new(),
        });
        map.insert(nodeid, inode.clone());
        inode
    }

    /// The kernel dropped `n` lookups; the inode goes when none are left.
    pub fn forget(&self, nodeid: u64, n: u64) {
        if nodeid == ROOT {
            return;
        }
        let mut map = self.map.write();
        if let Some(i) = map.get(&nodeid) {
            let before = i
                .nlookup
                .fetch_sub(n.min(i.nlookup.load(Ordering::Acquire)), Ordering::AcqRel);
            if before <= n {
                map.remove(&nodeid);
            }
        }
    }
}
