//! The FUSE filesystem: a passthrough of the store in which every change is tracked.
//! Namespace and attribute operations run as the caller (see `creds`) on O_PATH
//! descriptors; data operations run on the descriptors opened at `open`. Every operation
//! that changes file data goes through `Tracker::begin_write` before it touches the store,
//! and every namespace or metadata change is logged while the tracker's gate is held.
//! The store's `.drfs/` folder does not exist as far as the mount is concerned.

use std::ffi::{CStr, OsStr};
use std::io;
use std::os::fd::{AsFd, AsRawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{DirEntryExt, FileTypeExt};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use fuser::{
    CopyFileRangeFlags, Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation,
    INodeNo, InitFlags, KernelConfig, LockOwner, OpenFlags, RenameFlags, ReplyAttr, ReplyCreate,
    ReplyData, ReplyDirectory, ReplyEmpty, ReplyEntry, ReplyLseek, ReplyOpen, ReplyStatfs,
    ReplyWrite, ReplyXattr, Request, TimeOrNow, WriteFlags,
};
use parking_lot::Mutex;

use crate::error::Error;
use crate::fuse::table::Table;
use crate::model::FileId;
use crate::model::relpath::RelPath;
use crate::primary::passthrough::creds::AsCaller;
use crate::primary::passthrough::handle::{DirEntry, DirHandle, Dirs, Handle};
use crate::primary::passthrough::inode::{Inode, Inodes, ROOT};
use crate::primary::track::changelog::Op;
use crate::primary::track::{FileTrack, Guard, NsGuard, Tracker};
use crate::state::STATE_DIR;
use crate::sys;

const TTL: Duration = Duration::from_secs(1);
/// copy_file_range replies with a u32 count; copy at most this much per call.
const MAX_COPY: u64 = 1 << 30;

pub struct Options {
    pub impersonate: bool,
    pub store_io: StoreIo,
}

/// How buffered clients' reads and writes reach the store (`drfs mount --store-io`).
/// O_DIRECT clients always get O_DIRECT store descriptors.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum StoreIo {
    /// Through the host page cache (re-reads are cached; the default).
    #[default]
    Buffered,
    /// With O_DIRECT wherever the store allows it (`cache=none` for every client): no
    /// second copy in the page cache, re-reads go to the disk.
    Direct,
}

impl std::str::FromStr for StoreIo {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "buffered" => Ok(StoreIo::Buffered),
            "direct" => Ok(StoreIo::Direct),
            _ => Err(format!("{s:?}: say buffered or direct")),
        }
    }
}

impl std::fmt::Display for StoreIo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            StoreIo::Buffered => "buffered",
            StoreIo::Direct => "direct",
        })
    }
}

pub struct DrFs {
    root: PathBuf,
    inodes: Inodes,
    files: Arc<Table<Handle>>,
    dirs: Dirs,
    tracker: Option<Arc<Tracker>>,
    opts: Options,
}

type Res<T> = std::result::Result<T, Errno>;

fn errno(e: io::Error) -> Errno {
    Errno::from(e)
}

fn terr(e: Error) -> Errno {
    if e.errno() != Some(libc::EROFS) {
        tracing::error!("tracking: {e}");
    }
    Errno::from_i32(e.errno().unwrap_or(libc::EIO))
}

fn time(sec: i64, nsec: i64) -> SystemTime {
    if sec >= 0 {
        UNIX_EPOCH + Duration::new(sec as u64, nsec as u32)
    } else {
        UNIX_EPOCH - Duration::new(sec.unsigned_abs(), 0) + Duration::from_nanos(nsec as u64)
    }
}

fn kind_of(mode: u32) -> FileType {
    match mode & libc::S_IFMT {
        libc::S_IFDIR => FileType::Directory,
        libc::S_IFLNK => FileType::Symlink,
        libc::S_IFIFO => FileType::NamedPipe,
        libc::S_IFSOCK => FileType::Socket,
        libc::S_IFCHR => FileType::CharDevice,
        libc::S_IFBLK => FileType::BlockDevice,
        _ => FileType::RegularFile,
    }
}

/// The path of an inode in the store `root`.
fn path_in(root: &std::path::Path, inode: &Inode) -> RelPath {
    if inode.nodeid == ROOT {
        return RelPath::root();
    }
    let link =
        std::fs::read_link(format!("/proc/self/fd/{}", inode.fd.as_raw_fd())).unwrap_or_default();
    match link.strip_prefix(root) {
        Ok(p) => RelPath::from_bytes(p.as_os_str().as_bytes()),
        Err(_) => RelPath::from_bytes(link.as_os_str().as_bytes()),
    }
}

fn is_state(parent: INodeNo, name: &OsStr) -> bool {
    parent.0 == ROOT && name == STATE_DIR
}

fn timespec(t: Option<TimeOrNow>) -> libc::timespec {
    match t {
        None => libc::timespec {
            tv_sec: 0,
            tv_nsec: libc::UTIME_OMIT,
        },
        Some(TimeOrNow::Now) => libc::timespec {
            tv_sec: 0,
            tv_nsec: libc::UTIME_NOW,
        },
        Some(TimeOrNow::SpecificTime(t)) => {
            let (s, n) = match t.duration_since(UNIX_EPOCH) {
                Ok(d) => (d.as_secs() as i64, i64::from(d.subsec_nanos())),
                Err(e) => {
                    let d = e.duration();
                    let (mut s, mut n) = (-(d.as_secs() as i64), -i64::from(d.subsec_nanos()));
                    if n < 0 {
                        s -= 1;
                        n += 1_000_000_000;
                    }
                    (s, n)
                }
            };
            libc::timespec {
                tv_sec: s,
                tv_nsec: n,
            }
        }
    }
}

/// What every drfs filesystem asks of the kernel: O_DIRECT and AIO requests in parallel
/// (not one at a time), parallel lookups, and room for many requests in flight.
pub fn read_capabilities(config: &mut KernelConfig) {
    for cap in [InitFlags::FUSE_ASYNC_DIO, InitFlags::FUSE_PARALLEL_DIROPS] {
        if config.add_capabilities(cap).is_err() {
            tracing::info!("kernel lacks {cap:?}");
        }
    }
    let _ = config.set_max_background(256);
    let _ = config.set_congestion_threshold(192);
}

/// The bytes a fallocate changes inside the file's current size, if any. Growth needs no
/// mark: the new size travels with the cut, and a file extended on the replica reads zeros.
pub fn fallocate_range(mode: i32, offset: u64, len: u64, size: u64) -> Option<(u64, u64)> {
    let end = offset.saturating_add(len);
    let (a, b) = if mode & (libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_ZERO_RANGE) != 0 {
        (offset, end.min(size))
    } else if mode & libc::FALLOC_FL_COLLAPSE_RANGE != 0 {
        (offset, size)
    } else if mode & libc::FALLOC_FL_INSERT_RANGE != 0 {
        (offset, size.saturating_add(len))
    } else {
        (0, 0)
    };
    (b > a).then(|| (a, b - a))
}

impl DrFs {
    pub fn new(root: PathBuf, tracker: Option<Arc<Tracker>>, opts: Options) -> io::Result<DrFs> {
        let fd = sys::open_path(&root)?;
        let st = sys::fstat(fd.as_fd())?;
        Ok(DrFs {
            root,
            inodes: Inodes::new(fd, &st),
            files: Arc::default(),
            dirs: Dirs::default(),
            tracker,
            opts,
        })
    }

    /// The store-relative paths of the files open for writing through the mount, as a
    /// function the daemon's control socket can call (for a planned failover's lock).
    pub fn open_writers(&self) -> impl Fn() -> Vec<String> + Send + Sync + 'static {
        let (files, root) = (self.files.clone(), self.root.clone());
        move || {
            let mut paths: Vec<String> = files
                .values()
                .iter()
                .filter(|h| h.writable)
                .map(|h| path_in(&root, &h.inode).to_string())
                .collect();
            paths.sort();
            paths.dedup();
            paths
        }
    }

    fn caller(&self, req: &Request) -> AsCaller {
        AsCaller::new(req, self.opts.impersonate)
    }

    fn inode(&self, ino: INodeNo) -> Res<Arc<Inode>> {
        self.inodes.get(ino.0).ok_or(Errno::ESTALE)
    }

    fn attr(&self, st: &libc::stat) -> FileAttr {
        FileAttr {
            ino: INodeNo(self.inodes.nodeid(st.st_dev, st.st_ino)),
            size: st.st_size as u64,
            blocks: st.st_blocks as u64,
            atime: time(st.st_atime, st.st_atime_nsec),
            mtime: time(st.st_mtime, st.st_mtime_nsec),
            ctime: time(st.st_ctime, st.st_ctime_nsec),
            crtime: UNIX_EPOCH,
            kind: kind_of(st.st_mode),
            perm: (st.st_mode & 0o7777) as u16,
            nlink: st.st_nlink as u32,
            uid: st.st_uid,
            gid: st.st_gid,
            rdev: st.st_rdev as u32,
            blksize: st.st_blksize as u32,
            flags: 0,
        }
    }

    /// The store-relative path of an inode (for log records).
    fn rel(&self, inode: &Inode) -> RelPath {
        path_in(&self.root, inode)
    }

    fn rel_child(&self, parent: &Inode, name: &OsStr) -> RelPath {
        self.rel(parent).join(name)
    }

    /// Looks `name` up in `parent` and registers the kernel's reference to it.
    fn lookup_in(&self, parent: &Inode, name: &OsStr) -> Res<(Arc<Inode>, FileAttr)> {
        let c = sys::cstr(name).map_err(errno)?;
        let fd = sys::openat(parent.fd.as_fd(), &c, libc::O_PATH | libc::O_NOFOLLOW, 0)
            .map_err(errno)?;
        let st = sys::fstat(fd.as_fd()).map_err(errno)?;
        let attr = self.attr(&st);
        Ok((self.inodes.insert(fd, &st), attr))
    }

    /// Holds the tracker's gate for a namespace or metadata change that may change the
    /// ctime of the regular files `on` (stamped, see `track::stamps`).
    /// Refused (EROFS) while the store is locked for a planned failover.
    fn gate(&self, on: [Option<FileId>; 2]) -> Res<Option<NsGuard<'_>>> {
        self.tracker
            .as_deref()
            .map(|t| t.begin(on))
            .transpose()
            .map_err(terr)
    }

    /// Before `name` in directory `dir` is deleted or replaced: a promoted store's
    /// history keeps file `id` if that is its last link.
    fn keep_whole(&self, id: Option<FileId>, dir: &Inode, name: &std::ffi::CStr) -> Res<()> {
        match &self.tracker {
            Some(t) => t.keep_whole(id, dir.fd.as_fd(), name).map_err(terr),
            None => Ok(()),
        }
    }

    /// The tracked id of a regular file's inode.
    fn id_of(&self, inode: &Inode) -> Option<FileId> {
        if !inode.is_file() {
            return None;
        }
        if let Some(ft) = inode.tracked() {
            return Some(ft.id);
        }
        self.tracker.as_ref()?.id_of(inode.ino, inode.birth())
    }

    /// The tracked id of the regular file at `path`.
    fn id_at(&self, path: &RelPath) -> Option<FileId> {
        self.tracker.as_ref()?.id_at(path)
    }

    fn log(&self, op: Op) {
        if let Some(t) = &self.tracker {
            if let Err(e) = t.record(op) {
                tracing::error!("change log: {e}");
            }
        }
    }

    /// The tracking of a regular file, or None when tracking is off.
    fn track_of(&self, inode: &Inode) -> Res<Option<Arc<FileTrack>>> {
        let Some(t) = &self.tracker else {
            return Ok(None);
        };
        if !inode.is_file() {
            return Ok(None);
        }
        let open = || sys::reopen(inode.fd.as_fd(), libc::O_RDONLY);
        inode
            .track(|| t.file(inode.ino, inode.birth(), || self.rel(inode), &open))
            .map(Some)
            .map_err(terr)
    }

    /// Marks `[off, off+len)` as changing and holds the gate while the caller changes it.
    fn begin_write(&self, ft: Option<&FileTrack>, off: u64, len: u64) -> Res<Option<Guard<'_>>> {
        match (&self.tracker, ft) {
            (Some(t), Some(ft)) => t.begin_write(ft, off, len).map(Some).map_err(terr),
            (Some(t), None) => t.begin_write_none().map(Some).map_err(terr),
            _ => Ok(None),
        }
    }

    /// `begin_write` for a write of exactly `[off, off+len)`: its 4 KiB pieces are
    /// recorded, so a cycle ships only those of a partly written block.
    fn begin_write_pieces(
        &self,
        ft: Option<&FileTrack>,
        off: u64,
        len: u64,
    ) -> Res<Option<Guard<'_>>> {
        match (&self.tracker, ft) {
            (Some(t), Some(ft)) => t.begin_write_pieces(ft, off, len).map(Some).map_err(terr),
            _ => self.begin_write(ft, off, len),
        }
    }

    fn do_setattr(&self, req: &Request, ino: INodeNo, a: SetAttr) -> Res<FileAttr> {
        let inode = self.inode(ino)?;
        let _c = self.caller(req);
        let handle = a.fh.and_then(|fh| self.files.get(fh.0));
        if let Some(size) = a.size {
            self.truncate(&inode, handle.as_deref(), size)?;
        }
        let id = self.id_of(&inode);
        if a.uid.is_some() || a.gid.is_some() {
            let _g = self.gate([id, None])?;
            let r = unsafe {
                libc::fchownat(
                    inode.fd.as_raw_fd(),
                    c"".as_ptr(),
                    a.uid.unwrap_or(u32::MAX),
                    a.gid.unwrap_or(u32::MAX),
                    libc::AT_EMPTY_PATH | libc::AT_SYMLINK_NOFOLLOW,
                )
            };
            sys::cvt(r).map_err(errno)?;
            self.log(Op::Chown {
                path: self.rel(&inode),
                uid: a.uid,
                gid: a.gid,
            });
        }
        if let Some(mode) = a.mode {
            let _g = self.gate([id, None])?;
            let p = sys::proc_fd(inode.fd.as_raw_fd());
            sys::cvt(unsafe { libc::chmod(p.as_ptr(), mode & 0o7777) }).map_err(errno)?;
            self.log(Op::Chmod {
                path: self.rel(&inode),
                mode: mode & 0o7777,
            });
        }
        if a.atime.is_some() || a.mtime.is_some() {
            let _g = self.gate([id, None])?;
            self.utimens(&inode, [timespec(a.atime), timespec(a.mtime)])?;
            self.log(Op::Utimens {
                path: self.rel(&inode),
            });
        }
        let st = sys::fstat(inode.fd.as_fd()).map_err(errno)?;
        Ok(self.attr(&st))
    }

    fn utimens(&self, inode: &Inode, ts: [libc::timespec; 2]) -> Res<()> {
        let r = if inode.is_symlink() {
            let path = sys::cpath(&self.rel(inode).under(&self.root)).map_err(errno)?;
            unsafe {
                libc::utimensat(
                    libc::AT_FDCWD,
                    path.as_ptr(),
                    ts.as_ptr(),
                    libc::AT_SYMLINK_NOFOLLOW,
                )
            }
        } else {
            let p = sys::proc_fd(inode.fd.as_raw_fd());
            unsafe { libc::utimensat(libc::AT_FDCWD, p.as_ptr(), ts.as_ptr(), 0) }
        };
        sys::cvt(r).map(drop).map_err(errno)
    }

    fn truncate(&self, inode: &Inode, handle: Option<&Handle>, size: u64) -> Res<()> {
        let reopened;
        let file = match handle.filter(|h| h.writable) {
            Some(h) => h.plain(),
            None => {
                reopened = sys::reopen(inode.fd.as_fd(), libc::O_WRONLY).map_err(errno)?;
                &reopened
            }
        };
        let ft = self.track_of(inode)?;
        let old = file.metadata().map_err(errno)?.len();
        // Shrinking removes data (marked); growing only adds zeros (the size says it).
        let _g = self.begin_write(ft.as_deref(), size, old.saturating_sub(size))?;
        file.set_len(size).map_err(errno)?;
        if let Some(ft) = &ft {
            ft.set_size(size);
        }
        if old == size {
            return Ok(());
        }
        if let (Some(t), Some(ft)) = (&self.tracker, &ft) {
            self.log(Op::Truncate {
                id: ft.id,
                path: t.path_of(ft.id).unwrap_or_default(),
                from: old,
                to: size,
            });
        }
        Ok(())
    }

    /// Creates a node with `make`, then looks it up and logs it.
    fn make_node(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        make: impl FnOnce(&Inode, &CStr) -> io::Result<()>,
        op: impl FnOnce(RelPath) -> Op,
    ) -> Res<FileAttr> {
        if is_state(parent, name) {
            return Err(Errno::EPERM);
        }
        let p = self.inode(parent)?;
        let c = sys::cstr(name).map_err(errno)?;
        let _c = self.caller(req);
        let _g = self.gate([None, None])?;
        let began = sys::now_ns();
        make(&p, &c).map_err(errno)?;
        let (inode, attr) = self.lookup_in(&p, name)?;
        let path = self.rel_child(&p, name);
        if inode.is_file() {
            if let Some(t) = &self.tracker {
                let open = || sys::reopen(inode.fd.as_fd(), libc::O_RDONLY);
                let ft = t
                    .created(path, inode.ino, inode.birth(), attr.perm.into(), &open)
                    .map_err(terr)?;
                t.stamp_done(ft.id, began);
                inode.track(|| Ok::<_, Errno>(ft))?;
            }
        } else {
            self.log(op(path));
        }
        Ok(attr)
    }

    fn open_file(
        &self,
        inode: &Arc<Inode>,
        flags: i32,
        file: std::fs::File,
    ) -> Res<(u64, FopenFlags)> {
        let acc = flags & libc::O_ACCMODE;
        let writable = acc != libc::O_RDONLY;
        let track = if writable {
            self.track_of(inode)?
        } else {
            None
        };
        let direct = flags & libc::O_DIRECT != 0 || self.opts.store_io == StoreIo::Direct;
        let (file, buffered, align) = if direct {
            self.direct_pair(file, flags)
        } else {
            (file, None, None)
        };
        // Every write reaches the daemon synchronously, in the caller's own pages: no copy
        // through FUSE's page cache, parallel writers, and a cut sees writes in order.
        let fopen = FopenFlags::FOPEN_DIRECT_IO | FopenFlags::FOPEN_PARALLEL_DIRECT_WRITES;
        let fh = self.files.insert(Handle {
            inode: inode.clone(),
            file,
            buffered,
            align,
            writable,
            track,
        });
        Ok((fh, fopen))
    }

    /// For an O_DIRECT client: the O_DIRECT descriptor plus a buffered one, or just the
    /// buffered one where the store refuses O_DIRECT (tmpfs).
    fn direct_pair(
        &self,
        buffered: std::fs::File,
        flags: i32,
    ) -> (std::fs::File, Option<std::fs::File>, Option<(usize, u64)>) {
        let Some((mem_align, off_align)) = sys::dio_align(buffered.as_fd()) else {
            return (buffered, None, None);
        };
        let dflags = (flags & (libc::O_ACCMODE | libc::O_SYNC | libc::O_DSYNC)) | libc::O_DIRECT;
        match sys::reopen(buffered.as_fd(), dflags) {
            Ok(d) => (d, Some(buffered), Some((mem_align, off_align as u64))),
            Err(_) => (buffered, None, None),
        }
    }

    fn read_dir(&self, inode: &Inode) -> io::Result<Vec<DirEntry>> {
        let st = sys::fstat(inode.fd.as_fd())?;
        let mut out = vec![DirEntry {
            ino: inode.nodeid,
            kind: FileType::Directory,
            name: ".".into(),
        }];
        out.push(DirEntry {
            ino: if inode.nodeid == ROOT {
                ROOT
            } else {
                st.st_ino
            },
            kind: FileType::Directory,
            name: "..".into(),
        });
        let rd = std::fs::read_dir(format!("/proc/self/fd/{}", inode.fd.as_raw_fd()))?;
        for e in rd {
            let e = e?;
            let name = e.file_name();
            if inode.nodeid == ROOT && name == STATE_DIR {
                continue;
            }
            let ft = e.file_type()?;
            let mode = if ft.is_dir() {
                libc::S_IFDIR
            } else if ft.is_symlink() {
                libc::S_IFLNK
            } else if ft.is_fifo() {
                libc::S_IFIFO
            } else if ft.is_socket() {
                libc::S_IFSOCK
            } else if ft.is_char_device() {
                libc::S_IFCHR
            } else if ft.is_block_device() {
                libc::S_IFBLK
            } else {
                libc::S_IFREG
            };
            out.push(DirEntry {
                ino: self.inodes.nodeid(st.st_dev, e.ino()),
                kind: kind_of(mode),
                name,
            });
        }
        Ok(out)
    }
}

pub struct SetAttr {
    mode: Option<u32>,
    uid: Option<u32>,
    gid: Option<u32>,
    size: Option<u64>,
    atime: Option<TimeOrNow>,
    mtime: Option<TimeOrNow>,
    fh: Option<FileHandle>,
}

/// Replies with `r`, or the error.
macro_rules! reply_or {
    ($reply:expr, $r:expr, $ok:expr) => {
        match $r {
            Ok(v) => $ok(v),
            Err(e) => $reply.error(e),
        }
    };
}

fn xattr_reply(reply: ReplyXattr, size: u32, r: io::Result<Vec<u8>>) {
    match r {
        Ok(v) if size == 0 => reply.size(v.len() as u32),
        Ok(v) if v.len() > size as usize => reply.error(Errno::ERANGE),
        Ok(v) => reply.data(&v),
        Err(e) => reply.error(errno(e)),
    }
}

impl Filesystem for DrFs {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> io::Result<()> {
        read_capabilities(config);
        for cap in [
            InitFlags::FUSE_DIRECT_IO_ALLOW_MMAP,
            InitFlags::FUSE_AUTO_INVAL_DATA,
        ] {
            if config.add_capabilities(cap).is_err() {
                tracing::info!("kernel lacks {cap:?}");
            }
        }
        Ok(())
    }

    fn lookup(&self, req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        if is_state(parent, name) {
            return reply.error(Errno::ENOENT);
        }
        let r = self.inode(parent).and_then(|p| {
            let _c = self.caller(req);
            self.lookup_in(&p, name)
        });
        reply_or!(reply, r, |(_, a)| reply.entry(&TTL, &a, Generation(0)));
    }

    fn forget(&self, _req: &Request, ino: INodeNo, nlookup: u64) {
        self.inodes.forget(ino.0, nlookup);
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        let r = self
            .inode(ino)
            .and_then(|i| sys::fstat(i.fd.as_fd()).map_err(errno));
        reply_or!(reply, r, |st| reply.attr(&TTL, &self.attr(&st)));
    }

    fn setattr(
        &self,
        req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        atime: Option<TimeOrNow>,
        mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        let a = SetAttr {
            mode,
            uid,
            gid,
            size,
            atime,
            mtime,
            fh,
        };
        let r = self.do_setattr(req, ino, a);
        reply_or!(reply, r, |a| reply.attr(&TTL, &a));
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
        let r = self
            .inode(ino)
            .and_then(|i| sys::readlinkat(i.fd.as_fd()).map_err(errno));
        reply_or!(reply, r, |v: Vec<u8>| reply.data(&v));
    }

    fn mknod(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        _umask: u32,
        rdev: u32,
        reply: ReplyEntry,
    ) {
        let r = self.make_node(
            req,
            parent,
            name,
            |p, c| {
                let r =
                    unsafe { libc::mknodat(p.fd.as_raw_fd(), c.as_ptr(), mode, u64::from(rdev)) };
                sys::cvt(r).map(drop)
            },
            |path| Op::Mknod { path, mode, rdev },
        );
        reply_or!(reply, r, |a| reply.entry(&TTL, &a, Generation(0)));
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
        let r = self.make_node(
            req,
            parent,
            name,
            |p, c| sys::cvt(unsafe { libc::mkdirat(p.fd.as_raw_fd(), c.as_ptr(), mode) }).map(drop),
            |path| Op::Mkdir { path, mode },
        );
        reply_or!(reply, r, |a| reply.entry(&TTL, &a, Generation(0)));
    }

    fn symlink(
        &self,
        req: &Request,
        parent: INodeNo,
        link_name: &OsStr,
        target: &std::path::Path,
        reply: ReplyEntry,
    ) {
        let r = self.make_node(
            req,
            parent,
            link_name,
            |p, c| {
                let t = sys::cpath(target)?;
                sys::cvt(unsafe { libc::symlinkat(t.as_ptr(), p.fd.as_raw_fd(), c.as_ptr()) })
                    .map(drop)
            },
            |path| Op::Symlink {
                path,
                target: RelPath::from_bytes(target.as_os_str().as_bytes()),
            },
        );
        reply_or!(reply, r, |a| reply.entry(&TTL, &a, Generation(0)));
    }

    fn unlink(&self, req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        self.remove(req, parent, name, 0, reply);
    }

    fn rmdir(&self, req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        self.remove(req, parent, name, libc::AT_REMOVEDIR, reply);
    }

    fn rename(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        newparent: INodeNo,
        newname: &OsStr,
        flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        if is_state(parent, name) {
            return reply.error(Errno::ENOENT);
        }
        if is_state(newparent, newname) {
            return reply.error(Errno::EPERM);
        }
        let r = (|| {
            let p = self.inode(parent)?;
            let np = self.inode(newparent)?;
            let (a, b) = (
                sys::cstr(name).map_err(errno)?,
                sys::cstr(newname).map_err(errno)?,
            );
            let _c = self.caller(req);
            let (from, to) = (self.rel_child(&p, name), self.rel_child(&np, newname));
            // The moved file, and a file it replaces (whose other links remain).
            let replaced = self.id_at(&to);
            let _g = self.gate([self.id_at(&from), replaced])?;
            if !flags.contains(RenameFlags::RENAME_EXCHANGE) {
                self.keep_whole(replaced, &np, &b)?;
            }
            let r = unsafe {
                libc::renameat2(
                    p.fd.as_raw_fd(),
                    a.as_ptr(),
                    np.fd.as_raw_fd(),
                    b.as_ptr(),
                    flags.bits(),
                )
            };
            sys::cvt(r).map_err(errno)?;
            self.log(Op::Rename {
                from,
                to,
                exchange: flags.contains(RenameFlags::RENAME_EXCHANGE),
            });
            Ok(())
        })();
        reply_or!(reply, r, |()| reply.ok());
    }

    fn link(
        &self,
        req: &Request,
        ino: INodeNo,
        newparent: INodeNo,
        newname: &OsStr,
        reply: ReplyEntry,
    ) {
        if is_state(newparent, newname) {
            return reply.error(Errno::EPERM);
        }
        let r = (|| {
            let i = self.inode(ino)?;
            let np = self.inode(newparent)?;
            let c = sys::cstr(newname).map_err(errno)?;
            let _c = self.caller(req);
            let _g = self.gate([self.id_of(&i), None])?;
            let src = sys::proc_fd(i.fd.as_raw_fd());
            let r = unsafe {
                libc::linkat(
                    libc::AT_FDCWD,
                    src.as_ptr(),
                    np.fd.as_raw_fd(),
                    c.as_ptr(),
                    libc::AT_SYMLINK_FOLLOW,
                )
            };
            sys::cvt(r).map_err(errno)?;
            let (_, attr) = self.lookup_in(&np, newname)?;
            let ft = self.track_of(&i)?;
            self.log(Op::Link {
                id: ft.map(|f| f.id),
                path: self.rel_child(&np, newname),
            });
            Ok(attr)
        })();
        reply_or!(reply, r, |a| reply.entry(&TTL, &a, Generation(0)));
    }

    fn open(&self, req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        let r = (|| {
            let inode = self.inode(ino)?;
            let f = flags.0 & !(libc::O_CREAT | libc::O_EXCL | libc::O_NOCTTY | libc::O_TRUNC);
            let file = {
                let _c = self.caller(req);
                sys::reopen(inode.fd.as_fd(), f & !(libc::O_DIRECT | libc::O_APPEND))
                    .map_err(errno)?
            };
            // A planned failover's lock sees this handle, or refuses the open.
            let _g = match (&self.tracker, f & libc::O_ACCMODE != libc::O_RDONLY) {
                (Some(t), true) => Some(t.opening_for_write().map_err(terr)?),
                _ => None,
            };
            self.open_file(&inode, f, file)
        })();
        reply_or!(reply, r, |(fh, fl)| reply.opened(FileHandle(fh), fl));
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
        let Some(h) = self.files.get(fh.0) else {
            return reply.error(Errno::EBADF);
        };
        h.read(offset, size as usize, |r| match r {
            Ok(d) => reply.data(d),
            Err(e) => reply.error(errno(e)),
        });
    }

    fn write(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        data: &[u8],
        wf: WriteFlags,
        _flags: OpenFlags,
        _lock: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        let Some(h) = self.files.get(fh.0) else {
            return reply.error(Errno::EBADF);
        };
        let (track, len) = (h.track.as_deref(), data.len() as u64);
        // Page-cache writeback (mmap) ships whole blocks: only a caller's own write
        // records pieces.
        let g = if wf.contains(WriteFlags::FUSE_WRITE_CACHE) {
            self.begin_write(track, offset, len)
        } else {
            self.begin_write_pieces(track, offset, len)
        };
        let r = g.and_then(|_g| {
            h.write(offset, data).map_err(errno)?;
            if let Some(ft) = &h.track {
                ft.grew(offset + data.len() as u64);
            }
            Ok(())
        });
        reply_or!(reply, r, |()| reply.written(data.len() as u32));
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

    fn release(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        _lock: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        self.files.remove(fh.0);
        reply.ok();
    }

    fn fsync(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        datasync: bool,
        reply: ReplyEmpty,
    ) {
        let Some(h) = self.files.get(fh.0) else {
            return reply.error(Errno::EBADF);
        };
        let r = if datasync {
            h.file.sync_data()
        } else {
            h.file.sync_all()
        };
        reply_or!(reply, r.map_err(errno), |()| reply.ok());
    }

    fn opendir(&self, req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        let r = (|| {
            let inode = self.inode(ino)?;
            {
                let _c = self.caller(req);
                sys::reopen(inode.fd.as_fd(), libc::O_RDONLY | libc::O_DIRECTORY).map_err(errno)?;
            }
            let entries = self.read_dir(&inode).map_err(errno)?;
            Ok(self.dirs.insert(Mutex::new(DirHandle { inode, entries })))
        })();
        reply_or!(reply, r, |fh| reply
            .opened(FileHandle(fh), FopenFlags::empty()));
    }

    fn readdir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        reply: ReplyDirectory,
    ) {
        let Some(d) = self.dirs.get(fh.0) else {
            return reply.error(Errno::EBADF);
        };
        let mut d = d.lock();
        if offset == 0 {
            match self.read_dir(&d.inode) {
                Ok(e) => d.entries = e,
                Err(e) => return reply.error(errno(e)),
            }
        }
        let entries = d.entries.iter().map(|e| (e.ino, e.kind, &e.name));
        crate::fuse::table::reply_entries(reply, offset, entries);
    }

    fn releasedir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        reply: ReplyEmpty,
    ) {
        self.dirs.remove(fh.0);
        reply.ok();
    }

    fn fsyncdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        let r = self.inode(ino).and_then(|i| {
            sys::reopen(i.fd.as_fd(), libc::O_RDONLY | libc::O_DIRECTORY)
                .and_then(|f| f.sync_all())
                .map_err(errno)
        });
        reply_or!(reply, r, |()| reply.ok());
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        let Some(root) = self.inodes.get(ROOT) else {
            return reply.error(Errno::EIO);
        };
        let mut s: libc::statvfs = unsafe { std::mem::zeroed() };
        match sys::cvt(unsafe { libc::fstatvfs(root.fd.as_raw_fd(), &mut s) }) {
            Ok(_) => reply.statfs(
                s.f_blocks,
                s.f_bfree,
                s.f_bavail,
                s.f_files,
                s.f_ffree,
                s.f_bsize as u32,
                s.f_namemax as u32,
                s.f_frsize as u32,
            ),
            Err(e) => reply.error(errno(e)),
        }
    }

    fn setxattr(
        &self,
        req: &Request,
        ino: INodeNo,
        name: &OsStr,
        value: &[u8],
        flags: i32,
        _position: u32,
        reply: ReplyEmpty,
    ) {
        let r = self.xattr_path(ino).and_then(|(i, p)| {
            let n = sys::cstr(name).map_err(errno)?;
            let _c = self.caller(req);
            let _g = self.gate([self.id_of(&i), None])?;
            sys::setxattr(&p, &n, value, flags).map_err(errno)?;
            self.log(Op::Setxattr {
                path: self.rel(&i),
                name: name.to_string_lossy().into_owned(),
            });
            Ok(())
        });
        reply_or!(reply, r, |()| reply.ok());
    }

    fn getxattr(&self, req: &Request, ino: INodeNo, name: &OsStr, size: u32, reply: ReplyXattr) {
        let r = self.xattr_path(ino).and_then(|(_, p)| {
            let n = sys::cstr(name).map_err(errno)?;
            let _c = self.caller(req);
            Ok(sys::getxattr(&p, &n, size))
        });
        match r {
            Ok(v) => xattr_reply(reply, size, v),
            Err(e) => reply.error(e),
        }
    }

    fn listxattr(&self, req: &Request, ino: INodeNo, size: u32, reply: ReplyXattr) {
        let r = self.xattr_path(ino).map(|(_, p)| {
            let _c = self.caller(req);
            sys::listxattr(&p, size)
        });
        match r {
            Ok(v) => xattr_reply(reply, size, v),
            Err(e) => reply.error(e),
        }
    }

    fn removexattr(&self, req: &Request, ino: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let r = self.xattr_path(ino).and_then(|(i, p)| {
            let n = sys::cstr(name).map_err(errno)?;
            let _c = self.caller(req);
            let _g = self.gate([self.id_of(&i), None])?;
            sys::removexattr(&p, &n).map_err(errno)?;
            self.log(Op::Removexattr {
                path: self.rel(&i),
                name: name.to_string_lossy().into_owned(),
            });
            Ok(())
        });
        reply_or!(reply, r, |()| reply.ok());
    }

    fn access(&self, req: &Request, ino: INodeNo, mask: fuser::AccessFlags, reply: ReplyEmpty) {
        let r = self.inode(ino).and_then(|i| {
            let _c = self.caller(req);
            let p = sys::proc_fd(i.fd.as_raw_fd());
            let r = unsafe {
                libc::faccessat(libc::AT_FDCWD, p.as_ptr(), mask.bits(), libc::AT_EACCESS)
            };
            sys::cvt(r).map(drop).map_err(errno)
        });
        reply_or!(reply, r, |()| reply.ok());
    }

    fn create(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        _umask: u32,
        flags: i32,
        reply: ReplyCreate,
    ) {
        let r = self.do_create(req, parent, name, mode, flags);
        reply_or!(reply, r, |(a, fh, fl)| reply.created(
            &TTL,
            &a,
            Generation(0),
            FileHandle(fh),
            fl
        ));
    }

    fn fallocate(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        length: u64,
        mode: i32,
        reply: ReplyEmpty,
    ) {
        let Some(h) = self.files.get(fh.0) else {
            return reply.error(Errno::EBADF);
        };
        let r = (|| {
            let size = h.file.metadata().map_err(errno)?.len();
            let (off, len) = fallocate_range(mode, offset, length, size).unwrap_or((0, 0));
            let _g = self.begin_write(h.track.as_deref(), off, len)?;
            sys::fallocate(h.file.as_raw_fd(), mode, offset, length).map_err(errno)?;
            if let (Some(t), Some(ft)) = (&self.tracker, &h.track) {
                ft.set_size(h.file.metadata().map_err(errno)?.len());
                self.log(Op::Fallocate {
                    id: ft.id,
                    path: t.path_of(ft.id).unwrap_or_default(),
                    mode,
                    offset,
                    len: length,
                });
            }
            Ok(())
        })();
        reply_or!(reply, r, |()| reply.ok());
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
        let Some(h) = self.files.get(fh.0) else {
            return reply.error(Errno::EBADF);
        };
        let r = sys::lseek(h.file.as_raw_fd(), offset, whence).map_err(errno);
        reply_or!(reply, r, |o| reply.offset(o));
    }

    fn copy_file_range(
        &self,
        _req: &Request,
        _ino_in: INodeNo,
        fh_in: FileHandle,
        offset_in: u64,
        _ino_out: INodeNo,
        fh_out: FileHandle,
        offset_out: u64,
        len: u64,
        _flags: CopyFileRangeFlags,
        reply: ReplyWrite,
    ) {
        let (Some(hi), Some(ho)) = (self.files.get(fh_in.0), self.files.get(fh_out.0)) else {
            return reply.error(Errno::EBADF);
        };
        let len = len.min(MAX_COPY);
        let r = self
            .begin_write(ho.track.as_deref(), offset_out, len)
            .and_then(|_g| {
                sys::copy_file_range(
                    hi.plain().as_raw_fd(),
                    offset_in,
                    ho.plain().as_raw_fd(),
                    offset_out,
                    len as usize,
                )
                .map_err(errno)
            });
        if let (Ok(n), Some(ft)) = (&r, &ho.track) {
            ft.grew(offset_out + *n as u64);
        }
        reply_or!(reply, r, |n: usize| reply.written(n as u32));
    }
}

impl DrFs {
    fn remove(&self, req: &Request, parent: INodeNo, name: &OsStr, flags: i32, reply: ReplyEmpty) {
        if is_state(parent, name) {
            return reply.error(Errno::ENOENT);
        }
        let r = (|| {
            let p = self.inode(parent)?;
            let c = sys::cstr(name).map_err(errno)?;
            let _c = self.caller(req);
            let path = self.rel_child(&p, name);
            let dir = flags & libc::AT_REMOVEDIR != 0;
            // A file's other links remain: its ctime changes.
            let id = if dir { None } else { self.id_at(&path) };
            let _g = self.gate([id, None])?;
            self.keep_whole(id, &p, &c)?;
            sys::cvt(unsafe { libc::unlinkat(p.fd.as_raw_fd(), c.as_ptr(), flags) })
                .map_err(errno)?;
            self.log(if dir {
                Op::Rmdir { path }
            } else {
                Op::Unlink { id, path }
            });
            Ok(())
        })();
        reply_or!(reply, r, |()| reply.ok());
    }

    fn do_create(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        flags: i32,
    ) -> Res<(FileAttr, u64, FopenFlags)> {
        if is_state(parent, name) {
            return Err(Errno::EPERM);
        }
        let p = self.inode(parent)?;
        let c = sys::cstr(name).map_err(errno)?;
        let backing = flags & !(libc::O_DIRECT | libc::O_APPEND | libc::O_NOCTTY);
        let _g = self.gate([None, None])?;
        let began = sys::now_ns();
        let file = {
            let _c = self.caller(req);
            let fd = sys::openat(p.fd.as_fd(), &c, backing | libc::O_CREAT, mode).map_err(errno)?;
            std::fs::File::from(fd)
        };
        let path_fd = sys::reopen(file.as_fd(), libc::O_PATH).map_err(errno)?;
        let st = sys::fstat(path_fd.as_fd()).map_err(errno)?;
        let attr = self.attr(&st);
        let inode = self.inodes.insert(path_fd.into(), &st);
        if let Some(t) = &self.tracker {
            let open = || sys::reopen(inode.fd.as_fd(), libc::O_RDONLY);
            let ft = t
                .created(
                    self.rel_child(&p, name),
                    inode.ino,
                    inode.birth(),
                    st.st_mode & 0o7777,
                    &open,
                )
                .map_err(terr)?;
            t.stamp_done(ft.id, began);
            inode.track(|| Ok::<_, Errno>(ft))?;
        }
        let (fh, fl) = self.open_file(&inode, flags & !libc::O_CREAT, file)?;
        Ok((attr, fh, fl))
    }

    /// The path xattr calls use for an inode; symlinks have no race-free one.
    fn xattr_path(&self, ino: INodeNo) -> Res<(Arc<Inode>, std::ffi::CString)> {
        let i = self.inode(ino)?;
        if i.is_symlink() {
            return Err(Errno::from_i32(libc::EOPNOTSUPP));
        }
        let p = sys::proc_fd(i.fd.as_raw_fd());
        Ok((i, p))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fallocate_marks() {
        let k = libc::FALLOC_FL_KEEP_SIZE;
        assert_eq!(fallocate_range(0, 0, 100, 1000), None);
        assert_eq!(fallocate_range(0, 900, 200, 1000), None);
        assert_eq!(fallocate_range(k, 900, 200, 1000), None);
        assert_eq!(
            fallocate_range(libc::FALLOC_FL_PUNCH_HOLE | k, 900, 200, 1000),
            Some((900, 100))
        );
        assert_eq!(
            fallocate_range(libc::FALLOC_FL_ZERO_RANGE, 900, 200, 1000),
            Some((900, 100))
        );
        assert_eq!(
            fallocate_range(libc::FALLOC_FL_ZERO_RANGE | k, 900, 200, 1000),
            Some((900, 100))
        );
        assert_eq!(
            fallocate_range(libc::FALLOC_FL_COLLAPSE_RANGE, 4096, 4096, 16384),
            Some((4096, 12288))
        );
        assert_eq!(
            fallocate_range(libc::FALLOC_FL_INSERT_RANGE, 4096, 4096, 16384),
            Some((4096, 16384))
        );
    }
}
