//! Test failover: a writable, throwaway clone of a recovery point, as a FUSE filesystem.
//! Nothing is copied to make it: the tree starts as the point's manifest, reads come from
//! the point (`view`, which checks every block against its BLAKE3: a block that fails
//! reads as EIO and is logged to `.drfs/test-failover.log`) until a block is written, and
//! writes go to sparse overlay files (4 KiB blocks; a partial block is read, changed and
//! written whole; so a write into part of a block that fails its check fails too) in the
//! replica's `.drfs/test-failover/`. The point and the replica never change; replication
//! goes on beside the clone. The clone lives only as long as its daemon: stopping it
//! discards it.

use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::fs::{File, OpenOptions};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use fuser::{
    Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation, INodeNo,
    KernelConfig, LockOwner, OpenFlags, RenameFlags, ReplyAttr, ReplyCreate, ReplyData,
    ReplyDirectory, ReplyEmpty, ReplyEntry, ReplyOpen, ReplyStatfs, ReplyWrite, Request, TimeOrNow,
    WriteFlags,
};
use parking_lot::{Mutex, RwLock};

use crate::fuse::serve::{DEFAULT_THREADS, Options, Starting};
use crate::model::Kind;
use crate::points::view::PointView;
use crate::replica::PointRead;

const TTL: Duration = Duration::from_secs(1);
const ROOT: u64 = 1;
/// The overlay's block: what a write copies up at most.
const OB: u64 = 4096;

/// A file's content: what is left of the point's, and what was written since.
struct Content {
    /// The point's file, if the clone started from one.
    base: Option<Arc<dyn PointRead>>,
    /// Bytes of the point's content still valid (a truncate below it cuts it off).
    base_len: u64,
    /// Overlay blocks written in the clone.
    written: Vec<u64>,
    overlay: Option<File>,
    overlay_path: PathBuf,
}

impl Content {
    fn is_written(&self, b: u64) -> bool {
        self.written
            .get((b / 64) as usize)
            .is_some_and(|w| w & (1 << (b % 64)) != 0)
    }

    fn mark(&mut self, b: u64) {
        let w = (b / 64) as usize;
        if self.written.len() <= w {
            self.written.resize(w + 1, 0);
        }
        self.written[w] |= 1 << (b % 64);
    }

    fn unmark_from(&mut self, b: u64) {
        for x in b..(self.written.len() as u64 * 64) {
            if let Some(w) = self.written.get_mut((x / 64) as usize) {
                *w &= !(1 << (x % 64));
            }
        }
    }

    fn overlay(&mut self) -> std::io::Result<&File> {
        if self.overlay.is_none() {
            let f = OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(true)
                .open(&self.overlay_path)?;
            self.overlay = Some(f);
        }
        self.overlay
            .as_ref()
            .ok_or_else(|| std::io::Error::other("overlay missing"))
    }

    /// Reads the unwritten bytes of overlay block `b` from the point (zeros past it).
    fn base_block(&self, b: u64, buf: &mut [u8]) -> std::io::Result<()> {
        buf.fill(0);
        self.read_base(buf, b * OB).map(|_| ())
    }

    /// Reads the point's content at `pos` (what is left of it); returns the bytes read.
    fn read_base(&self, chunk: &mut [u8], pos: u64) -> std::io::Result<usize> {
        match &self.base {
            Some(base) if pos < self.base_len => {
                let n = ((self.base_len - pos) as usize).min(chunk.len());
                base.read_at(&mut chunk[..n], pos)
            }
            _ => Ok(0),
        }
    }

    /// Reads spans of blocks that are all written (from the overlay) or all not (from the
    /// point): one read per span.
    fn read(&self, buf: &mut [u8], off: u64, size: u64) -> std::io::Result<usize> {
        let end = (off + buf.len() as u64).min(size);
        let mut pos = off;
        while pos < end {
            let written = self.is_written(pos / OB);
            let mut stop = ((pos / OB + 1) * OB).min(end);
            while stop < end && self.is_written(stop / OB) == written {
                stop = ((stop / OB + 1) * OB).min(end);
            }
            let chunk = &mut buf[(pos - off) as usize..(stop - off) as usize];
            let got = match (&self.overlay, written) {
                (Some(f), true) => crate::sys::read_full(f, chunk, pos)?,
                (None, true) => 0,
                (_, false) => self.read_base(chunk, pos)?,
            };
            chunk[got..].fill(0);
            pos = stop;
        }
        Ok(end.saturating_sub(off) as usize)
    }

    /// Whole blocks go to the overlay in one write; a partial block is completed from
    /// what it held first.
    fn write(&mut self, data: &[u8], off: u64) -> std::io::Result<()> {
        let end = off + data.len() as u64;
        let mut pos = off;
        let mut block = vec![0u8; OB as usize];
        while pos < end {
            let b = pos / OB;
            if pos % OB == 0 && end - pos >= OB {
                let stop = end / OB * OB;
                let whole = &data[(pos - off) as usize..(stop - off) as usize];
                self.overlay()?.write_all_at(whole, pos)?;
                (b..stop / OB).for_each(|x| self.mark(x));
                pos = stop;
                continue;
            }
            let stop = ((b + 1) * OB).min(end);
            let (a, z) = ((pos - b * OB) as usize, (stop - b * OB) as usize);
            if self.is_written(b) {
                let n = crate::sys::read_full(self.overlay()?, &mut block, b * OB)?;
                block[n..].fill(0);
            } else {
                self.base_block(b, &mut block)?;
            }
            block[a..z].copy_from_slice(&data[(pos - off) as usize..(stop - off) as usize]);
            self.overlay()?.write_all_at(&block, b * OB)?;
            self.mark(b);
            pos = stop;
        }
        Ok(())
    }

    /// The file becomes `new` bytes long (from `old`).
    fn truncate(&mut self, old: u64, new: u64) -> std::io::Result<()> {
        if new >= old {
            return Ok(());
        }
        self.base_len = self.base_len.min(new);
        let b = new / OB;
        if new % OB != 0 {
            // The block that keeps some bytes: clear its tail.
            let mut block = vec![0u8; OB as usize];
            self.read(&mut block, b * OB, old)?;
            block[(new % OB) as usize..].fill(0);
            self.overlay()?.write_all_at(&block, b * OB)?;
            self.mark(b);
            self.unmark_from(b + 1);
        } else {
            self.unmark_from(b);
        }
        Ok(())
    }
}

struct Node {
    kind: Kind,
    mode: u32,
    uid: u32,
    gid: u32,
    mtime: SystemTime,
    size: u64,
    target: Option<Vec<u8>>,
    parent: u64,
    children: BTreeMap<Vec<u8>, u64>,
    content: Option<Mutex<Content>>,
}

pub struct TestFailover {
    nodes: RwLock<BTreeMap<u64, Arc<RwLock<Node>>>>,
    next: AtomicU64,
    overlay_dir: PathBuf,
}

fn kind_of(k: Kind) -> FileType {
    match k {
        Kind::File => FileType::RegularFile,
        Kind::Dir => FileType::Directory,
        Kind::Symlink => FileType::Symlink,
        Kind::Fifo => FileType::NamedPipe,
        Kind::Socket => FileType::Socket,
        Kind::Char => FileType::CharDevice,
        Kind::Block => FileType::BlockDevice,
    }
}

fn time_of(ns: i64) -> SystemTime {
    UNIX_EPOCH + Duration::from_nanos(ns.max(0) as u64)
}

impl TestFailover {
    /// A clone of `view`, with its overlay files in `overlay_dir`.
    pub fn new(view: &PointView, overlay_dir: PathBuf) -> crate::error::Result<TestFailover> {
        let c = TestFailover {
            nodes: RwLock::new(BTreeMap::new()),
            next: AtomicU64::new(ROOT + 1),
            overlay_dir,
        };
        c.nodes.write().insert(
            ROOT,
            Arc::new(RwLock::new(Node {
                kind: Kind::Dir,
                mode: 0o755,
                uid: 0,
                gid: 0,
                mtime: time_of(view.info.time_ns),
                size: 0,
                target: None,
                parent: ROOT,
                children: BTreeMap::new(),
                content: None,
            })),
        );
        // Files with several names share one node (hard links).
        let mut by_id: BTreeMap<crate::model::FileId, u64> = BTreeMap::new();
        for e in &view.manifest.entries {
            let b = e.path.as_bytes();
            let (parent_path, name) = match b.iter().rposition(|&x| x == b'/') {
                Some(p) => (&b[..p], &b[p + 1..]),
                None => (&b[..0], b),
            };
            let parent = c.resolve(parent_path).unwrap_or(ROOT);
            let ino = match e.id.and_then(|id| by_id.get(&id).copied()) {
                Some(ino) => ino,
                None => {
                    let content = if e.kind == Kind::File {
                        Some(Mutex::new(Content {
                            base: Some(Arc::from(view.file(e)?)),
                            base_len: e.size,
                            written: Vec::new(),
                            overlay: None,
                            overlay_path: PathBuf::new(),
                        }))
                    } else {
                        None
                    };
                    let ino = c.add(Node {
                        kind: e.kind,
                        mode: e.mode,
                        uid: e.uid,
                        gid: e.gid,
                        mtime: time_of(e.mtime_ns),
                        size: e.size,
                        target: e.target.as_ref().map(|t| t.as_bytes().to_vec()),
                        parent,
                        children: BTreeMap::new(),
                        content,
                    });
                    if let Some(id) = e.id {
                        by_id.insert(id, ino);
                    }
                    ino
                }
            };
            if let Some(p) = c.get(parent) {
                p.write().children.insert(name.to_vec(), ino);
            }
        }
        Ok(c)
    }

    fn add(&self, mut n: Node) -> u64 {
        let ino = self.next.fetch_add(1, Ordering::Relaxed);
        if let Some(c) = &mut n.content {
            c.get_mut().overlay_path = self.overlay_dir.join(ino.to_string());
        }
        self.nodes.write().insert(ino, Arc::new(RwLock::new(n)));
        ino
    }

    fn get(&self, ino: u64) -> Option<Arc<RwLock<Node>>> {
        self.nodes.read().get(&ino).cloned()
    }

    fn node(&self, ino: INodeNo) -> Result<Arc<RwLock<Node>>, Errno> {
        self.get(ino.0).ok_or(Errno::ENOENT)
    }

    fn resolve(&self, path: &[u8]) -> Option<u64> {
        let mut cur = ROOT;
        for c in path.split(|&x| x == b'/').filter(|c| !c.is_empty()) {
            cur = *self.get(cur)?.read().children.get(c)?;
        }
        Some(cur)
    }

    fn attr(&self, ino: u64, n: &Node) -> FileAttr {
        let nlink = if n.kind == Kind::Dir { 2 } else { 1 };
        FileAttr {
            ino: INodeNo(ino),
            size: if n.kind == Kind::Symlink {
                n.target.as_ref().map_or(0, |t| t.len() as u64)
            } else {
                n.size
            },
            blocks: n.size.div_ceil(512),
            atime: n.mtime,
            mtime: n.mtime,
            ctime: n.mtime,
            crtime: n.mtime,
            kind: kind_of(n.kind),
            perm: (n.mode & 0o7777) as u16,
            nlink,
            uid: n.uid,
            gid: n.gid,
            rdev: 0,
            blksize: OB as u32,
            flags: 0,
        }
    }

    fn child(&self, parent: INodeNo, name: &OsStr) -> Result<u64, Errno> {
        let p = self.node(parent)?;
        let p = p.read();
        if p.kind != Kind::Dir {
            return Err(Errno::ENOTDIR);
        }
        p.children
            .get(name.as_bytes())
            .copied()
            .ok_or(Errno::ENOENT)
    }

    /// Creates `name` in `parent`.
    fn make(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        kind: Kind,
        mode: u32,
        target: Option<Vec<u8>>,
    ) -> Result<(u64, FileAttr), Errno> {
        let p = self.node(parent)?;
        if p.read().children.contains_key(name.as_bytes()) {
            return Err(Errno::EEXIST);
        }
        let content = (kind == Kind::File).then(|| {
            Mutex::new(Content {
                base: None,
                base_len: 0,
                written: Vec::new(),
                overlay: None,
                overlay_path: PathBuf::new(),
            })
        });
        let n = Node {
            kind,
            mode,
            uid: req.uid(),
            gid: req.gid(),
            mtime: SystemTime::now(),
            size: 0,
            target,
            parent: parent.0,
            children: BTreeMap::new(),
            content,
        };
        let ino = self.add(n);
        p.write().children.insert(name.as_bytes().to_vec(), ino);
        let node = self.get(ino).ok_or(Errno::EIO)?;
        let a = self.attr(ino, &node.read());
        Ok((ino, a))
    }

    fn remove(&self, parent: INodeNo, name: &OsStr, dir: bool) -> Result<(), Errno> {
        let ino = self.child(parent, name)?;
        let n = self.node(INodeNo(ino))?;
        {
            let n = n.read();
            match (dir, n.kind == Kind::Dir) {
                (true, false) => return Err(Errno::ENOTDIR),
                (false, true) => return Err(Errno::EISDIR),
                (true, true) if !n.children.is_empty() => return Err(Errno::ENOTEMPTY),
                _ => {}
            }
        }
        self.node(parent)?.write().children.remove(name.as_bytes());
        Ok(())
    }
}

impl Filesystem for TestFailover {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        crate::primary::passthrough::fs::read_capabilities(config);
        std::fs::create_dir_all(&self.overlay_dir)
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        let r = self.child(parent, name).and_then(|ino| {
            let n = self.node(INodeNo(ino))?;
            Ok(self.attr(ino, &n.read()))
        });
        match r {
            Ok(a) => reply.entry(&TTL, &a, Generation(0)),
            Err(e) => reply.error(e),
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        match self.node(ino) {
            Ok(n) => reply.attr(&TTL, &self.attr(ino.0, &n.read())),
            Err(e) => reply.error(e),
        }
    }

    fn setattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        _atime: Option<TimeOrNow>,
        mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        _fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        let n = match self.node(ino) {
            Ok(n) => n,
            Err(e) => return reply.error(e),
        };
        let mut n = n.write();
        if let Some(s) = size {
            if n.kind != Kind::File {
                return reply.error(Errno::EISDIR);
            }
            let old = n.size;
            if let Some(c) = &n.content {
                if let Err(e) = c.lock().truncate(old, s) {
                    return reply.error(Errno::from(e));
                }
            }
            n.size = s;
            n.mtime = SystemTime::now();
        }
        if let Some(m) = mode {
            n.mode = (n.mode & !0o7777) | (m & 0o7777);
        }
        if let Some(u) = uid {
            n.uid = u;
        }
        if let Some(g) = gid {
            n.gid = g;
        }
        match mtime {
            Some(TimeOrNow::SpecificTime(t)) => n.mtime = t,
            Some(TimeOrNow::Now) => n.mtime = SystemTime::now(),
            None => {}
        }
        reply.attr(&TTL, &self.attr(ino.0, &n));
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
        match self.node(ino).map(|n| n.read().target.clone()) {
            Ok(Some(t)) => reply.data(&t),
            Ok(None) => reply.error(Errno::EINVAL),
            Err(e) => reply.error(e),
        }
    }

    fn mkdir(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        _umask: u32,
        reply: ReplyEntry,
    ) {
        match self.make(req, parent, name, Kind::Dir, mode, None) {
            Ok((_, a)) => reply.entry(&TTL, &a, Generation(0)),
            Err(e) => reply.error(e),
        }
    }

    fn symlink(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        target: &std::path::Path,
        reply: ReplyEntry,
    ) {
        let t = target.as_os_str().as_bytes().to_vec();
        match self.make(req, parent, name, Kind::Symlink, 0o777, Some(t)) {
            Ok((_, a)) => reply.entry(&TTL, &a, Generation(0)),
            Err(e) => reply.error(e),
        }
    }

    fn unlink(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        match self.remove(parent, name, false) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn rmdir(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        match self.remove(parent, name, true) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn rename(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        newparent: INodeNo,
        newname: &OsStr,
        _flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        let r = (|| {
            let ino = self.child(parent, name)?;
            let np = self.node(newparent)?;
            if let Some(&old) = np.read().children.get(newname.as_bytes()) {
                let o = self.node(INodeNo(old))?;
                if o.read().kind == Kind::Dir && !o.read().children.is_empty() {
                    return Err(Errno::ENOTEMPTY);
                }
            }
            self.node(parent)?.write().children.remove(name.as_bytes());
            np.write().children.insert(newname.as_bytes().to_vec(), ino);
            if let Some(n) = self.get(ino) {
                n.write().parent = newparent.0;
            }
            Ok(())
        })();
        match r {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn open(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        match self.node(ino) {
            Ok(n) if n.read().kind == Kind::File => {
                reply.opened(FileHandle(ino.0), FopenFlags::FOPEN_DIRECT_IO)
            }
            Ok(_) => reply.error(Errno::EISDIR),
            Err(e) => reply.error(e),
        }
    }

    fn create(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        _umask: u32,
        _flags: i32,
        reply: ReplyCreate,
    ) {
        match self.make(req, parent, name, Kind::File, mode, None) {
            Ok((ino, a)) => reply.created(
                &TTL,
                &a,
                Generation(0),
                FileHandle(ino),
                FopenFlags::FOPEN_DIRECT_IO,
            ),
            Err(e) => reply.error(e),
        }
    }

    fn read(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock: Option<LockOwner>,
        reply: ReplyData,
    ) {
        let n = match self.node(ino) {
            Ok(n) => n,
            Err(e) => return reply.error(e),
        };
        let n = n.read();
        let Some(c) = &n.content else {
            return reply.error(Errno::EISDIR);
        };
        let mut buf = vec![0u8; size as usize];
        match c.lock().read(&mut buf, offset, n.size) {
            Ok(k) => reply.data(&buf[..k]),
            Err(e) => reply.error(Errno::from(e)),
        }
    }

    fn write(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        data: &[u8],
        _wf: WriteFlags,
        _flags: OpenFlags,
        _lock: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        let n = match self.node(ino) {
            Ok(n) => n,
            Err(e) => return reply.error(e),
        };
        let mut n = n.write();
        let r = match &n.content {
            Some(c) => c.lock().write(data, offset),
            None => return reply.error(Errno::EISDIR),
        };
        match r {
            Ok(()) => {
                n.size = n.size.max(offset + data.len() as u64);
                n.mtime = SystemTime::now();
                reply.written(data.len() as u32)
            }
            Err(e) => reply.error(Errno::from(e)),
        }
    }

    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _lock: LockOwner,
        reply: ReplyEmpty,
    ) {
        reply.ok();
    }

    fn fsync(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        let r = self.node(ino).map(|n| {
            let n = n.read();
            if let Some(c) = &n.content {
                if let Some(f) = &c.lock().overlay {
                    let _ = f.sync_data();
                }
            }
        });
        match r {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        reply: ReplyDirectory,
    ) {
        let n = match self.node(ino) {
            Ok(n) => n,
            Err(e) => return reply.error(e),
        };
        let (parent, children): (u64, Vec<(Vec<u8>, u64)>) = {
            let n = n.read();
            (
                n.parent,
                n.children.iter().map(|(k, v)| (k.clone(), *v)).collect(),
            )
        };
        let mut all = vec![
            (ino.0, FileType::Directory, b".".to_vec()),
            (parent, FileType::Directory, b"..".to_vec()),
        ];
        for (name, c) in children {
            if let Some(n) = self.get(c) {
                all.push((c, kind_of(n.read().kind), name));
            }
        }
        let all = all
            .into_iter()
            .map(|(id, kind, name)| (id, kind, std::ffi::OsString::from_vec(name)));
        crate::fuse::table::reply_entries(reply, offset, all);
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        let p = crate::sys::cpath(&self.overlay_dir).unwrap_or_default();
        let mut s: libc::statvfs = unsafe { std::mem::zeroed() };
        if unsafe { libc::statvfs(p.as_ptr(), &mut s) } != 0 {
            return reply.error(Errno::EIO);
        }
        reply.statfs(
            s.f_blocks,
            s.f_bfree,
            s.f_bavail,
            s.f_files,
            s.f_ffree,
            s.f_bsize as u32,
            255,
            s.f_frsize as u32,
        );
    }
}

/// The format version of `test-failover.json`.
pub const RUNNING_VERSION: u32 = 1;

/// A running test failover, as `REPLICA/.drfs/test-failover.json` records it.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
pub struct Running {
    pub version: u32,
    pub point: String,
    pub at: PathBuf,
    pub pid: i32,
    pub started: String,
}

fn running_path(r: &crate::replica::posix::Replica) -> PathBuf {
    r.sd.path("test-failover.json")
}

/// The test-failover daemon's log.
pub fn log_path(r: &crate::replica::posix::Replica) -> PathBuf {
    r.sd.path("test-failover.log")
}

fn overlay_dir(r: &crate::replica::posix::Replica) -> PathBuf {
    r.sd.path("test-failover")
}

/// The running test failover of replica `r`, if there is one.
pub fn running(r: &crate::replica::posix::Replica) -> Option<Running> {
    let s: Running = serde_json::from_slice(&std::fs::read(running_path(r)).ok()?).ok()?;
    (s.version == RUNNING_VERSION && crate::sys::pid_alive(s.pid)).then_some(s)
}

/// Takes the replica's test-failover lock (held by the clone's daemon for its life).
pub fn lock(r: &crate::replica::posix::Replica) -> crate::error::Result<File> {
    use crate::error::At;
    let p = r.sd.path("test-failover.lock");
    let f = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&p)
        .at(&p)?;
    if crate::sys::flock(&f, libc::LOCK_EX | libc::LOCK_NB).is_err() {
        let at = running(r)
            .map(|s| format!(" at {} (point {})", s.at.display(), s.point))
            .unwrap_or_default();
        return Err(crate::error::Error::Busy(format!(
            "a test failover of {} is already running{at}; stop it with `drfs test-failover {} --stop`",
            r.root.display(),
            r.root.display()
        )));
    }
    Ok(f)
}

/// Serves a test failover of `point` at `at` in this process until it is unmounted,
/// then discards the clone.
pub fn serve(
    replica: &std::path::Path,
    point: &str,
    at: &std::path::Path,
    allow_other: bool,
    ready: crate::fuse::daemon::Ready,
) -> crate::error::Result<()> {
    use crate::error::{At, Error};
    let mut start = Starting::new(ready);
    let r = Arc::new(start.check(crate::replica::posix::Replica::open_only(replica))?);
    start.log_to(&log_path(&r));
    let prepared = (|| {
        let lock = lock(&r)?;
        let view = PointView::open(r.clone(), point)?;
        let dir = overlay_dir(&r);
        if dir.exists() {
            std::fs::remove_dir_all(&dir).at(&dir)?;
        }
        std::fs::create_dir_all(&dir).at(&dir)?;
        let fs = TestFailover::new(&view, dir)?;
        let s = Running {
            version: RUNNING_VERSION,
            point: point.to_string(),
            at: at.to_path_buf(),
            pid: std::process::id() as i32,
            started: crate::model::fmt::rfc3339_now(),
        };
        let body = serde_json::to_vec_pretty(&s).map_err(Error::encode)?;
        let sp = running_path(&r);
        crate::sys::write_atomic(&sp, &body).at(&sp)?;
        Ok::<_, Error>((lock, fs))
    })()
    .map_err(|e| {
        Error::Invalid(format!(
            "test failover of point {point} at {}: {e}",
            at.display()
        ))
    });
    let (_lock, fs) = start.check(prepared)?;
    let opts = Options {
        fsname: format!(
            "{}{}",
            crate::fuse::mountinfo::TEST_FAILOVER_PREFIX,
            r.root.display()
        ),
        read_only: false,
        allow_other,
        threads: DEFAULT_THREADS,
        max_pages: crate::fuse::serve::DEFAULT_MAX_PAGES,
    };
    let served = start.mount(fs, at, replica, &opts)?;
    let result = served.serve(&format!(
        "test failover of point {point} at {}",
        at.display()
    ));
    // Throwaway: the clone's writes go with it.
    let _ = std::fs::remove_dir_all(overlay_dir(&r));
    let _ = std::fs::remove_file(running_path(&r));
    if result.is_ok() {
        tracing::info!(
            "test failover at {} stopped; its writes discarded",
            at.display()
        );
    }
    result
}

/// Stops the running test failover of `r` and discards it.
pub fn stop(r: &crate::replica::posix::Replica) -> crate::error::Result<Running> {
    let Some(s) = running(r) else {
        return Err(crate::error::Error::Invalid(format!(
            "no test failover of {} is running",
            r.root.display()
        )));
    };
    crate::fuse::daemon::detach(&s.at)?;
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while crate::sys::pid_alive(s.pid) {
        if std::time::Instant::now() > deadline {
            return Err(crate::error::Error::Busy(format!(
                "the test failover at {} still has open files; it ends when they are closed",
                s.at.display()
            )));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(s)
}
