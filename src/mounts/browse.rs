//! `drfs browse REPLICA MOUNTPOINT`: every recovery point as read-only files.
//!
//! ```text
//! MOUNTPOINT/latest                          -> points/<newest id>
//! MOUNTPOINT/points/<id>/<the store's tree as it was at that point>
//! MOUNTPOINT/by-time/<YYYY-MM-DD>/<HH:MM:SS>Z-<crash|application> -> ../../points/<id>
//! ```
//!
//! Listings, sizes, modes and mtimes come from the point's manifest; data is read on
//! demand from the latest files and undo records (`view`), every block checked against
//! its BLAKE3: a block that fails reads as EIO and is logged to `.drfs/browse.log`, the
//! others read on. Mounting copies nothing; new points appear as they are applied; a
//! point pruned while one of its files is open stays readable through that open file
//! until it is closed.

use std::collections::HashMap;
use std::ffi::OsStr;
use std::os::unix::ffi::OsStringExt;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use fuser::{
    Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation, INodeNo,
    KernelConfig, LockOwner, OpenFlags, ReplyAttr, ReplyData, ReplyDirectory, ReplyEntry,
    ReplyLseek, ReplyOpen, ReplyStatfs, Request,
};
use parking_lot::Mutex;

use crate::fuse::serve::{DEFAULT_THREADS, Options, Starting};
use crate::fuse::table::Table;
use crate::model::PointInfo;
use crate::model::relpath::RelPath;
use crate::model::{Entry, Kind};
use crate::points::view::PointView;
use crate::replica::posix::Replica;
use crate::replica::{PointRead, PointStore};

/// How long the kernel may cache names and attributes: a point never changes, but which
/// points exist (and so `latest`, `by-time`) changes with every apply and retention run.
const POINT_TTL: Duration = Duration::from_secs(3600);
const LIVE_TTL: Duration = Duration::ZERO;

fn ttl(n: &Node) -> &'static Duration {
    match n {
        Node::Entry(..) => &POINT_TTL,
        _ => &LIVE_TTL,
    }
}
const ROOT: u64 = 1;
/// How many points' manifests stay loaded (open files keep theirs regardless).
const VIEWS: usize = 64;

#[derive(Clone, PartialEq, Eq, Hash, Debug)]
enum Node {
    Root,
    Points,
    ByTime,
    Latest,
    Day(String),
    TimeLink(String),
    Point(String),
    Entry(String, usize),
}

#[derive(Default)]
struct Nodes {
    by_node: HashMap<Node, u64>,
    by_id: HashMap<u64, Node>,
}

pub struct Browse {
    store: Arc<dyn PointStore>,
    nodes: Mutex<Nodes>,
    views: Mutex<HashMap<String, Arc<PointView>>>,
    files: Table<Box<dyn PointRead>>,
    mounted_at: SystemTime,
}

fn time_of(ns: i64) -> SystemTime {
    UNIX_EPOCH + Duration::from_nanos(ns.max(0) as u64)
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

/// The `by-time` day and name of a point.
fn day_and_name(p: &PointInfo) -> (String, String) {
    let t = &p.time;
    let day = t.get(..10).unwrap_or("unknown").to_string();
    let hms = t.get(11..19).unwrap_or("00:00:00");
    let kind = match p.consistency {
        crate::model::Consistency::Crash => "crash",
        crate::model::Consistency::Application => "application",
    };
    (day, format!("{hms}Z-{kind}"))
}

impl Browse {
    pub fn new(store: Arc<dyn PointStore>) -> Browse {
        let mut nodes = Nodes::default();
        for (n, id) in [
            (Node::Root, ROOT),
            (Node::Points, 2),
            (Node::ByTime, 3),
            (Node::Latest, 4),
        ] {
            nodes.by_node.insert(n.clone(), id);
            nodes.by_id.insert(id, n);
        }
        Browse {
            store,
            nodes: Mutex::new(nodes),
            views: Mutex::new(HashMap::new()),
            files: Table::default(),
            mounted_at: SystemTime::now(),
        }
    }

    fn id_of(&self, n: Node) -> u64 {
        let mut nodes = self.nodes.lock();
        if let Some(&id) = nodes.by_node.get(&n) {
            return id;
        }
        let id = nodes.by_id.len() as u64 + 16;
        nodes.by_node.insert(n.clone(), id);
        nodes.by_id.insert(id, n);
        id
    }

    fn node(&self, ino: INodeNo) -> Result<Node, Errno> {
        self.nodes
            .lock()
            .by_id
            .get(&ino.0)
            .cloned()
            .ok_or(Errno::ENOENT)
    }

    fn points(&self) -> Vec<PointInfo> {
        self.store.points().unwrap_or_default()
    }

    fn view(&self, id: &str) -> Result<Arc<PointView>, Errno> {
        if let Some(v) = self.views.lock().get(id) {
            return Ok(v.clone());
        }
        let v = Arc::new(PointView::open(self.store.clone(), id).map_err(|_| Errno::ENOENT)?);
        let mut views = self.views.lock();
        if views.len() >= VIEWS {
            views.clear();
        }
        views.insert(id.to_string(), v.clone());
        Ok(v)
    }

    /// `by-time` names of one day: name -> point id (a repeated name gets the id appended).
    fn day(&self, day: &str) -> Vec<(String, String)> {
        let mut out: Vec<(String, String)> = Vec::new();
        for p in self.points() {
            let (d, name) = day_and_name(&p);
            if d != day {
                continue;
            }
            let name = if out.iter().any(|(n, _)| *n == name) {
                format!("{name}~{}", p.id)
            } else {
                name
            };
            out.push((name, p.id));
        }
        out
    }

    fn dir_attr(&self, ino: u64, mtime: SystemTime, perm: u16) -> FileAttr {
        FileAttr {
            ino: INodeNo(ino),
            size: 4096,
            blocks: 8,
            atime: mtime,
            mtime,
            ctime: mtime,
            crtime: mtime,
            kind: FileType::Directory,
            perm,
            nlink: 2,
            uid: 0,
            gid: 0,
            rdev: 0,
            blksize: 4096,
            flags: 0,
        }
    }

    fn link_attr(&self, ino: u64, target: &[u8], mtime: SystemTime) -> FileAttr {
        FileAttr {
            size: target.len() as u64,
            blocks: 0,
            kind: FileType::Symlink,
            perm: 0o777,
            nlink: 1,
            ..self.dir_attr(ino, mtime, 0o777)
        }
    }

    fn newest(&self) -> Option<PointInfo> {
        self.store.latest().ok().flatten()
    }

    fn attr(&self, ino: u64, n: &Node) -> Result<FileAttr, Errno> {
        let newest = self
            .newest()
            .map_or(self.mounted_at, |p| time_of(p.time_ns));
        Ok(match n {
            Node::Root | Node::Points | Node::ByTime | Node::Day(_) => {
                self.dir_attr(ino, newest, 0o555)
            }
            Node::Latest => {
                let p = self.newest().ok_or(Errno::ENOENT)?;
                self.link_attr(ino, format!("points/{}", p.id).as_bytes(), newest)
            }
            Node::TimeLink(id) => {
                self.link_attr(ino, format!("../../points/{id}").as_bytes(), newest)
            }
            Node::Point(id) => {
                let v = self.view(id)?;
                self.dir_attr(ino, time_of(v.info.time_ns), 0o755)
            }
            Node::Entry(id, i) => {
                let v = self.view(id)?;
                let e = v.manifest.entries.get(*i).ok_or(Errno::ENOENT)?;
                let mut a = entry_attr(ino, e, v.links(e));
                if e.kind == Kind::File {
                    a.blocks = v.allocated(e).div_ceil(512);
                }
                a
            }
        })
    }

    /// The child `name` of directory node `n`.
    fn child(&self, n: &Node, name: &OsStr) -> Result<Node, Errno> {
        let s = name.to_string_lossy();
        match n {
            Node::Root => match &*s {
                "points" => Ok(Node::Points),
                "by-time" => Ok(Node::ByTime),
                "latest" if self.newest().is_some() => Ok(Node::Latest),
                _ => Err(Errno::ENOENT),
            },
            Node::Points => self
                .points()
                .into_iter()
                .find(|p| p.id == s)
                .map(|p| Node::Point(p.id))
                .ok_or(Errno::ENOENT),
            Node::ByTime => self
                .points()
                .iter()
                .any(|p| day_and_name(p).0 == s)
                .then(|| Node::Day(s.to_string()))
                .ok_or(Errno::ENOENT),
            Node::Day(d) => self
                .day(d)
                .into_iter()
                .find(|(n, _)| *n == s)
                .map(|(_, id)| Node::TimeLink(id))
                .ok_or(Errno::ENOENT),
            Node::Point(id) => self.entry_child(id, &RelPath::root(), name),
            Node::Entry(id, i) => {
                let v = self.view(id)?;
                let e = v.manifest.entries.get(*i).ok_or(Errno::ENOENT)?;
                if e.kind != Kind::Dir {
                    return Err(Errno::ENOTDIR);
                }
                self.entry_child(id, &e.path.clone(), name)
            }
            _ => Err(Errno::ENOTDIR),
        }
    }

    fn entry_child(&self, id: &str, dir: &RelPath, name: &OsStr) -> Result<Node, Errno> {
        let v = self.view(id)?;
        let (i, _) = v.entry(&dir.join(name)).ok_or(Errno::ENOENT)?;
        Ok(Node::Entry(id.to_string(), i))
    }

    /// The entries of directory node `n`: (node, type, name).
    fn list(&self, n: &Node) -> Result<Vec<(Node, FileType, Vec<u8>)>, Errno> {
        let mut out = Vec::new();
        match n {
            Node::Root => {
                if self.newest().is_some() {
                    out.push((Node::Latest, FileType::Symlink, b"latest".to_vec()));
                }
                out.push((Node::Points, FileType::Directory, b"points".to_vec()));
                out.push((Node::ByTime, FileType::Directory, b"by-time".to_vec()));
            }
            Node::Points => {
                for p in self.points() {
                    out.push((
                        Node::Point(p.id.clone()),
                        FileType::Directory,
                        p.id.into_bytes(),
                    ));
                }
            }
            Node::ByTime => {
                let mut days: Vec<String> =
                    self.points().iter().map(|p| day_and_name(p).0).collect();
                days.dedup();
                for d in days {
                    out.push((Node::Day(d.clone()), FileType::Directory, d.into_bytes()));
                }
            }
            Node::Day(d) => {
                for (name, id) in self.day(d) {
                    out.push((Node::TimeLink(id), FileType::Symlink, name.into_bytes()));
                }
            }
            Node::Point(id) => out = self.entry_list(id, &RelPath::root())?,
            Node::Entry(id, i) => {
                let v = self.view(id)?;
                let e = v.manifest.entries.get(*i).ok_or(Errno::ENOENT)?;
                if e.kind != Kind::Dir {
                    return Err(Errno::ENOTDIR);
                }
                out = self.entry_list(id, &e.path.clone())?;
            }
            _ => return Err(Errno::ENOTDIR),
        }
        Ok(out)
    }

    fn entry_list(&self, id: &str, dir: &RelPath) -> Result<Vec<(Node, FileType, Vec<u8>)>, Errno> {
        let v = self.view(id)?;
        let prefix = if dir.is_root() {
            0
        } else {
            dir.as_bytes().len() + 1
        };
        Ok(v.children(dir)
            .into_iter()
            .map(|i| {
                let e = &v.manifest.entries[i];
                (
                    Node::Entry(id.to_string(), i),
                    kind_of(e.kind),
                    e.path.as_bytes()[prefix..].to_vec(),
                )
            })
            .collect())
    }

    fn readlink_of(&self, n: &Node) -> Result<Vec<u8>, Errno> {
        match n {
            Node::Latest => {
                Ok(format!("points/{}", self.newest().ok_or(Errno::ENOENT)?.id).into_bytes())
            }
            Node::TimeLink(id) => Ok(format!("../../points/{id}").into_bytes()),
            Node::Entry(id, i) => {
                let v = self.view(id)?;
                let e = v.manifest.entries.get(*i).ok_or(Errno::ENOENT)?;
                e.target
                    .as_ref()
                    .map(|t| t.as_bytes().to_vec())
                    .ok_or(Errno::EINVAL)
            }
            _ => Err(Errno::EINVAL),
        }
    }
}

fn entry_attr(ino: u64, e: &Entry, links: u32) -> FileAttr {
    let mtime = time_of(e.mtime_ns);
    let size = match e.kind {
        Kind::File => e.size,
        Kind::Symlink => e.target.as_ref().map_or(0, |t| t.as_bytes().len() as u64),
        _ => 4096,
    };
    FileAttr {
        ino: INodeNo(ino),
        size,
        blocks: size.div_ceil(512),
        atime: mtime,
        mtime,
        ctime: mtime,
        crtime: mtime,
        kind: kind_of(e.kind),
        perm: (e.mode & 0o7777) as u16,
        nlink: if e.kind == Kind::Dir { 2 } else { links },
        uid: e.uid,
        gid: e.gid,
        rdev: e.rdev.unwrap_or(0) as u32,
        blksize: 65536,
        flags: 0,
    }
}

impl Filesystem for Browse {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        crate::primary::passthrough::fs::read_capabilities(config);
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        let r = self
            .node(parent)
            .and_then(|p| self.child(&p, name))
            .and_then(|c| {
                let ino = self.id_of(c.clone());
                Ok((self.attr(ino, &c)?, ttl(&c)))
            });
        match r {
            Ok((a, t)) => reply.entry(t, &a, Generation(0)),
            Err(e) => reply.error(e),
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        match self
            .node(ino)
            .and_then(|n| Ok((self.attr(ino.0, &n)?, ttl(&n))))
        {
            Ok((a, t)) => reply.attr(t, &a),
            Err(e) => reply.error(e),
        }
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
        match self.node(ino).and_then(|n| self.readlink_of(&n)) {
            Ok(t) => reply.data(&t),
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
        let list = match self.node(ino).and_then(|n| self.list(&n)) {
            Ok(l) => l,
            Err(e) => return reply.error(e),
        };
        let mut all = vec![
            (ino.0, FileType::Directory, b".".to_vec()),
            (ROOT, FileType::Directory, b"..".to_vec()),
        ];
        all.extend(
            list.into_iter()
                .map(|(n, k, name)| (self.id_of(n), k, name)),
        );
        let all = all
            .into_iter()
            .map(|(id, kind, name)| (id, kind, std::ffi::OsString::from_vec(name)));
        crate::fuse::table::reply_entries(reply, offset, all);
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        if flags.0 & libc::O_ACCMODE != libc::O_RDONLY {
            return reply.error(Errno::EROFS);
        }
        let r = self.node(ino).and_then(|n| match n {
            Node::Entry(id, i) => {
                let v = self.view(&id)?;
                let e = v.manifest.entries.get(i).ok_or(Errno::ENOENT)?;
                if e.kind != Kind::File {
                    return Err(Errno::EINVAL);
                }
                // Every reader's aligned reads go to the replica O_DIRECT: a direct
                // reader's as on a plain file, a buffered reader's because this
                // mount's page cache already holds what it read (caching it again in
                // the replica's would double the memory), and the mount's readahead
                // keeps enough 1 MiB requests in flight (BENCHMARKS.md, issue 4).
                v.file_direct(e).map_err(|err| {
                    tracing::warn!("opening {} of point {id}: {err}", e.path);
                    Errno::EIO
                })
            }
            _ => Err(Errno::EISDIR),
        });
        match r {
            // A point never changes: the kernel may keep its pages across opens.
            Ok(pf) => reply.opened(
                FileHandle(self.files.insert(pf)),
                FopenFlags::FOPEN_KEEP_CACHE,
            ),
            Err(e) => reply.error(e),
        }
    }

    fn read(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock: Option<LockOwner>,
        reply: ReplyData,
    ) {
        let Some(f) = self.files.get(fh.0) else {
            return reply.error(Errno::EBADF);
        };
        // Page-aligned, so aligned reads reach the replica O_DIRECT.
        crate::sys::aligned::with_aligned(size as usize, |buf| match f.read_at(buf, offset) {
            Ok(n) => reply.data(&buf[..n]),
            Err(e) => reply.error(Errno::from(e)),
        })
    }

    fn release(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        _lock: Option<LockOwner>,
        _flush: bool,
        reply: fuser::ReplyEmpty,
    ) {
        self.files.remove(fh.0);
        reply.ok();
    }

    fn lseek(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: i64,
        whence: i32,
        reply: ReplyLseek,
    ) {
        let Some(f) = self.files.get(fh.0) else {
            return reply.error(Errno::EBADF);
        };
        let data = match whence {
            libc::SEEK_DATA => true,
            libc::SEEK_HOLE => false,
            _ => return reply.error(Errno::EINVAL),
        };
        match f.seek(offset.max(0) as u64, data) {
            Ok(Some(o)) => reply.offset(o as i64),
            Ok(None) => reply.error(Errno::ENXIO),
            Err(e) => reply.error(Errno::from(e)),
        }
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        let p = crate::sys::cpath(self.store.location()).unwrap_or_default();
        let mut s: libc::statvfs = unsafe { std::mem::zeroed() };
        if unsafe { libc::statvfs(p.as_ptr(), &mut s) } != 0 {
            return reply.error(Errno::EIO);
        }
        reply.statfs(
            s.f_blocks,
            0,
            0,
            s.f_files,
            0,
            s.f_bsize as u32,
            255,
            s.f_frsize as u32,
        );
    }
}

/// The browse daemons' log.
pub fn log_path(r: &Replica) -> std::path::PathBuf {
    r.sd.path("browse.log")
}

/// Serves `drfs browse` in this process until unmounted.
pub fn serve(
    replica: &std::path::Path,
    mnt: &std::path::Path,
    allow_other: bool,
    ready: crate::fuse::daemon::Ready,
) -> crate::error::Result<()> {
    let mut start = Starting::new(ready);
    let r = start.check(Replica::open_only(replica))?;
    start.log_to(&log_path(&r));
    let opts = Options {
        fsname: format!(
            "{}{}",
            crate::fuse::mountinfo::BROWSE_PREFIX,
            r.root.display()
        ),
        read_only: true,
        allow_other,
        threads: DEFAULT_THREADS,
        max_pages: crate::fuse::serve::DEFAULT_MAX_PAGES,
    };
    let served = start.mount(Browse::new(Arc::new(r)), mnt, replica, &opts)?;
    served.serve(&format!(
        "browsing {} at {}",
        replica.display(),
        mnt.display()
    ))
}
