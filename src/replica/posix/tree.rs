//! Confined access to the replica's tree. Every path from a stream is hostile: it is
//! validated (relative, no empty, `.` or `..` component, no NUL, bounded lengths, not under
//! `.drfs`), then resolved one component at a time with `O_NOFOLLOW`, so no path can
//! leave the replica root, not even through a symlink planted in the tree.

use std::ffi::{CStr, CString, OsStr};
use std::fs::File;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use crate::model::relpath::RelPath;
use crate::state::STATE_DIR;
use crate::sys;

pub const MAX_PATH: usize = 4096;
pub const MAX_NAME: usize = 255;

/// Why a path from a stream is refused.
pub fn validate(p: &RelPath) -> Result<(), String> {
    let b = p.as_bytes();
    if b.is_empty() || b.len() > MAX_PATH {
        return Err(format!("path of {} bytes", b.len()));
    }
    if b[0] == b'/' {
        return Err(format!("absolute path {p}"));
    }
    if b.contains(&0) {
        return Err("path with a NUL byte".into());
    }
    for (i, c) in b.split(|&x| x == b'/').enumerate() {
        if c.is_empty() || c == b"." || c == b".." || c.len() > MAX_NAME {
            return Err(format!("path {p} has a bad component"));
        }
        if i == 0 && c == STATE_DIR.as_bytes() {
            return Err(format!("path {p} is inside drfs's state"));
        }
    }
    Ok(())
}

/// The replica's tree, addressed only through confined lookups.
pub struct Tree {
    root: OwnedFd,
    pub path: PathBuf,
}

fn cname(c: &[u8]) -> io::Result<CString> {
    sys::cstr(OsStr::from_bytes(c))
}

fn open_dir_at(dir: BorrowedFd<'_>, name: &CStr) -> io::Result<OwnedFd> {
    sys::openat(
        dir,
        name,
        libc::O_PATH | libc::O_DIRECTORY | libc::O_NOFOLLOW,
        0,
    )
}

impl Tree {
    pub fn open(path: &Path) -> io::Result<Tree> {
        let c = sys::cpath(path)?;
        let fd = sys::cvt(unsafe {
            libc::open(
                c.as_ptr(),
                libc::O_PATH | libc::O_DIRECTORY | libc::O_CLOEXEC,
            )
        })?;
        Ok(Tree {
            root: unsafe { OwnedFd::from_raw_fd(fd) },
            path: path.to_path_buf(),
        })
    }

    pub fn root(&self) -> BorrowedFd<'_> {
        self.root.as_fd()
    }

    /// The parent directory of `p` (optionally creating missing directories) and the name.
    pub fn parent(&self, p: &RelPath, create: bool) -> io::Result<(OwnedFd, CString)> {
        validate(p).map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
        let comps: Vec<&[u8]> = p.as_bytes().split(|&x| x == b'/').collect();
        let (last, dirs) = comps
            .split_last()
            .ok_or_else(|| io::Error::from_raw_os_error(libc::EINVAL))?;
        let mut dir = self.root.try_clone()?;
        for c in dirs {
            let name = cname(c)?;
            dir = match open_dir_at(dir.as_fd(), &name) {
                Ok(d) => d,
                Err(e) if create && e.raw_os_error() == Some(libc::ENOENT) => {
                    let r = unsafe { libc::mkdirat(dir.as_raw_fd(), name.as_ptr(), 0o755) };
                    if r != 0 && io::Error::last_os_error().raw_os_error() != Some(libc::EEXIST) {
                        return Err(io::Error::last_os_error());
                    }
                    open_dir_at(dir.as_fd(), &name)?
                }
                Err(e) => return Err(e),
            };
        }
        Ok((dir, cname(last)?))
    }

    pub fn lstat(&self, p: &RelPath) -> io::Result<libc::stat> {
        let (dir, name) = self.parent(p, false)?;
        let mut st: libc::stat = unsafe { std::mem::zeroed() };
        sys::cvt(unsafe {
            libc::fstatat(
                dir.as_raw_fd(),
                name.as_ptr(),
                &mut st,
                libc::AT_SYMLINK_NOFOLLOW,
            )
        })?;
        Ok(st)
    }

    pub fn exists(&self, p: &RelPath) -> bool {
        self.lstat(p).is_ok()
    }

    /// Opens a regular file (never through a symlink).
    pub fn open_file(&self, p: &RelPath, flags: i32, mode: u32) -> io::Result<File> {
        let (dir, name) = self.parent(p, flags & libc::O_CREAT != 0)?;
        let fd = sys::openat(dir.as_fd(), &name, flags | libc::O_NOFOLLOW, mode)?;
        let f = File::from(fd);
        if !f.metadata()?.is_file() {
            return Err(io::Error::from_raw_os_error(libc::EISDIR));
        }
        Ok(f)
    }

    pub fn mkdir_all(&self, p: &RelPath) -> io::Result<()> {
        let (dir, name) = self.parent(p, true)?;
        let r = unsafe { libc::mkdirat(dir.as_raw_fd(), name.as_ptr(), 0o755) };
        if r != 0 && io::Error::last_os_error().raw_os_error() != Some(libc::EEXIST) {
            return Err(io::Error::last_os_error());
        }
        open_dir_at(dir.as_fd(), &name).map(drop)
    }

    /// Renames `from` (in this tree) to `to_dir/to_name`.
    pub fn rename_to(
        &self,
        from: &RelPath,
        to_dir: BorrowedFd<'_>,
        to_name: &CStr,
    ) -> io::Result<()> {
        let (dir, name) = self.parent(from, false)?;
        sys::cvt(unsafe {
            libc::renameat(
                dir.as_raw_fd(),
                name.as_ptr(),
                to_dir.as_raw_fd(),
                to_name.as_ptr(),
            )
        })
        .map(drop)
    }

    /// Renames `from_dir/from_name` to `to` (in this tree), creating `to`'s directories.
    pub fn rename_from(
        &self,
        from_dir: BorrowedFd<'_>,
        from_name: &CStr,
        to: &RelPath,
    ) -> io::Result<()> {
        let (dir, name) = self.parent(to, true)?;
        sys::cvt(unsafe {
            libc::renameat(
                from_dir.as_raw_fd(),
                from_name.as_ptr(),
                dir.as_raw_fd(),
                name.as_ptr(),
            )
        })
        .map(drop)
    }

    pub fn unlink(&self, p: &RelPath, flags: i32) -> io::Result<()> {
        let (dir, name) = self.parent(p, false)?;
        sys::cvt(unsafe { libc::unlinkat(dir.as_raw_fd(), name.as_ptr(), flags) }).map(drop)
    }

    pub fn symlink(&self, target: &RelPath, p: &RelPath) -> io::Result<()> {
        let (dir, name) = self.parent(p, true)?;
        let t = sys::cstr(OsStr::from_bytes(target.as_bytes()))?;
        sys::cvt(unsafe { libc::symlinkat(t.as_ptr(), dir.as_raw_fd(), name.as_ptr()) }).map(drop)
    }

    pub fn readlink(&self, p: &RelPath) -> io::Result<Vec<u8>> {
        let (dir, name) = self.parent(p, false)?;
        let fd = sys::openat(dir.as_fd(), &name, libc::O_PATH | libc::O_NOFOLLOW, 0)?;
        sys::readlinkat(fd.as_fd())
    }

    pub fn mknod(&self, p: &RelPath, mode: u32, rdev: u64) -> io::Result<()> {
        let (dir, name) = self.parent(p, true)?;
        sys::cvt(unsafe { libc::mknodat(dir.as_raw_fd(), name.as_ptr(), mode, rdev) }).map(drop)
    }

    /// Sets owner, mode and mtime without following a symlink at `p`.
    pub fn set_meta(
        &self,
        p: &RelPath,
        mode: u32,
        uid: u32,
        gid: u32,
        mtime_ns: i64,
        symlink: bool,
    ) -> io::Result<()> {
        let (dir, name) = self.parent(p, false)?;
        let (d, n) = (dir.as_raw_fd(), name.as_ptr());
        sys::cvt(unsafe { libc::fchownat(d, n, uid, gid, libc::AT_SYMLINK_NOFOLLOW) })?;
        if !symlink {
            sys::cvt(unsafe { libc::fchmodat(d, n, mode & 0o7777, 0) })?;
        }
        let t = libc::timespec {
            tv_sec: mtime_ns.div_euclid(1_000_000_000),
            tv_nsec: mtime_ns.rem_euclid(1_000_000_000),
        };
        let ts = [
            libc::timespec {
                tv_sec: 0,
                tv_nsec: libc::UTIME_OMIT,
            },
            t,
        ];
        sys::cvt(unsafe { libc::utimensat(d, n, ts.as_ptr(), libc::AT_SYMLINK_NOFOLLOW) }).map(drop)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &[u8]) -> RelPath {
        RelPath::from_bytes(s)
    }

    #[test]
    fn hostile_paths_are_refused() {
        for bad in [
            &b""[..],
            b"/etc/passwd",
            b"../x",
            b"a/../../x",
            b"a//b",
            b"./a",
            b"a/.",
            b".drfs/state.toml",
            b"a\0b",
        ] {
            assert!(
                validate(&p(bad)).is_err(),
                "{:?} accepted",
                String::from_utf8_lossy(bad)
            );
        }
        assert!(validate(&p(&[b'a'; 256])).is_err());
        for good in [&b"a"[..], b"vm1/disk.img", b"a/.drfs", b"..a", b"a..b/c"] {
            assert!(
                validate(&p(good)).is_ok(),
                "{:?} refused",
                String::from_utf8_lossy(good)
            );
        }
    }

    #[test]
    fn symlinks_in_the_tree_do_not_lead_out() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("replica");
        std::fs::create_dir(&root).unwrap();
        let outside = dir.path().join("outside");
        std::fs::create_dir(&outside).unwrap();
        std::os::unix::fs::symlink(&outside, root.join("link")).unwrap();
        let t = Tree::open(&root).unwrap();
        assert!(
            t.open_file(&p(b"link/x"), libc::O_CREAT | libc::O_WRONLY, 0o644)
                .is_err()
        );
        assert!(t.mkdir_all(&p(b"link/sub")).is_err());
        assert!(t.open_file(&p(b"link"), libc::O_WRONLY, 0).is_err());
        assert!(
            std::fs::read_dir(&outside).unwrap().next().is_none(),
            "something escaped"
        );
        t.open_file(&p(b"in/side"), libc::O_CREAT | libc::O_WRONLY, 0o644)
            .unwrap();
        assert!(root.join("in/side").is_file());
    }
}
