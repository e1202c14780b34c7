//! Thin, safe wrappers over the Linux system calls drfs needs and std does not offer:
//! `*at` calls relative to O_PATH descriptors, statx birth times, fallocate, lseek with
//! SEEK_DATA/SEEK_HOLE, copy_file_range, xattrs, the boot id, the I/O priority. Every wrapper returns
//! `io::Result` and never panics on input from outside the process.

pub mod aligned;
pub mod fault;

use std::ffi::{CStr, CString, OsStr};
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

/// Turns a `-1` return into the thread's `errno`.
pub fn cvt(ret: libc::c_int) -> io::Result<libc::c_int> {
    if ret == -1 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

fn cvt64(ret: i64) -> io::Result<i64> {
    if ret == -1 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

/// A C string from a file name; names with an interior NUL are invalid.
pub fn cstr(name: &OsStr) -> io::Result<CString> {
    CString::new(name.as_bytes()).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))
}

/// A C string from a path.
pub fn cpath(path: &Path) -> io::Result<CString> {
    cstr(path.as_os_str())
}

/// `/proc/self/fd/N`: reopens or addresses the inode behind an O_PATH descriptor.
pub fn proc_fd(fd: RawFd) -> CString {
    CString::new(format!("/proc/self/fd/{fd}")).unwrap_or_default()
}

const EMPTY: &CStr = c"";

pub fn openat(dir: BorrowedFd<'_>, name: &CStr, flags: i32, mode: u32) -> io::Result<OwnedFd> {
    let fd = cvt(unsafe {
        libc::openat(
            dir.as_raw_fd(),
            name.as_ptr(),
            flags | libc::O_CLOEXEC,
            mode,
        )
    })?;
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Opens a path as an O_PATH descriptor without following a final symlink.
pub fn open_path(path: &Path) -> io::Result<OwnedFd> {
    let p = cpath(path)?;
    let fd = cvt(unsafe {
        libc::open(
            p.as_ptr(),
            libc::O_PATH | libc::O_NOFOLLOW | libc::O_CLOEXEC,
        )
    })?;
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Reopens the inode behind an O_PATH descriptor with real access flags.
pub fn reopen(fd: BorrowedFd<'_>, flags: i32) -> io::Result<File> {
    let p = proc_fd(fd.as_raw_fd());
    let fd = cvt(unsafe { libc::open(p.as_ptr(), flags | libc::O_CLOEXEC) })?;
    Ok(unsafe { File::from_raw_fd(fd) })
}

pub fn fstat(fd: BorrowedFd<'_>) -> io::Result<libc::stat> {
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    cvt(unsafe {
        libc::fstatat(
            fd.as_raw_fd(),
            EMPTY.as_ptr(),
            &mut st,
            libc::AT_EMPTY_PATH | libc::AT_SYMLINK_NOFOLLOW,
        )
    })?;
    Ok(st)
}

pub fn lstat(path: &Path) -> io::Result<libc::stat> {
    let p = cpath(path)?;
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    cvt(unsafe { libc::lstat(p.as_ptr(), &mut st) })?;
    Ok(st)
}

/// Birth time in nanoseconds since the epoch, or 0 where the filesystem has none.
pub fn btime_ns(fd: BorrowedFd<'_>) -> u64 {
    let mut stx: libc::statx = unsafe { std::mem::zeroed() };
    let r = unsafe {
        libc::statx(
            fd.as_raw_fd(),
            EMPTY.as_ptr(),
            libc::AT_EMPTY_PATH | libc::AT_SYMLINK_NOFOLLOW,
            libc::STATX_BTIME,
            &mut stx,
        )
    };
    if r != 0 || stx.stx_mask & libc::STATX_BTIME == 0 {
        return 0;
    }
    let s = stx.stx_btime.tv_sec.max(0) as u64;
    s * 1_000_000_000 + u64::from(stx.stx_btime.tv_nsec)
}

/// The alignment O_DIRECT needs on this file: (memory, offset/length), from statx DIOALIGN.
pub fn dio_align(fd: BorrowedFd<'_>) -> Option<(usize, usize)> {
    let mut stx: libc::statx = unsafe { std::mem::zeroed() };
    let r = unsafe {
        libc::statx(
            fd.as_raw_fd(),
            EMPTY.as_ptr(),
            libc::AT_EMPTY_PATH,
            libc::STATX_DIOALIGN,
            &mut stx,
        )
    };
    if r != 0 || stx.stx_mask & libc::STATX_DIOALIGN == 0 || stx.stx_dio_offset_align == 0 {
        return None;
    }
    Some((
        stx.stx_dio_mem_align as usize,
        stx.stx_dio_offset_align as usize,
    ))
}

pub fn ctime_ns(st: &libc::stat) -> i128 {
    i128::from(st.st_ctime) * 1_000_000_000 + i128::from(st.st_ctime_nsec)
}

pub fn mtime_ns(st: &libc::stat) -> i128 {
    i128::from(st.st_mtime) * 1_000_000_000 + i128::from(st.st_mtime_nsec)
}

pub fn fallocate(fd: RawFd, mode: i32, offset: u64, len: u64) -> io::Result<()> {
    cvt(unsafe { libc::fallocate(fd, mode, offset as i64, len as i64) }).map(drop)
}

pub fn lseek(fd: RawFd, offset: i64, whence: i32) -> io::Result<i64> {
    cvt64(unsafe { libc::lseek(fd, offset, whence) })
}

pub fn copy_file_range(
    fd_in: RawFd,
    off_in: u64,
    fd_out: RawFd,
    off_out: u64,
    len: usize,
) -> io::Result<usize> {
    let mut oi = off_in as i64;
    let mut oo = off_out as i64;
    let n = unsafe { libc::copy_file_range(fd_in, &mut oi, fd_out, &mut oo, len, 0) };
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

pub fn readlinkat(fd: BorrowedFd<'_>) -> io::Result<Vec<u8>> {
    let mut buf = vec![0u8; libc::PATH_MAX as usize + 1];
    let n = unsafe {
        libc::readlinkat(
            fd.as_raw_fd(),
            EMPTY.as_ptr(),
            buf.as_mut_ptr().cast(),
            buf.len(),
        )
    };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    buf.truncate(n as usize);
    Ok(buf)
}

/// Runs an xattr call that fills a buffer; `size == 0` asks for the needed size.
fn xattr_buf(size: u32, f: impl FnOnce(*mut libc::c_void, usize) -> isize) -> io::Result<Vec<u8>> {
    let mut buf = vec![0u8; size as usize];
    let ptr = if size == 0 {
        std::ptr::null_mut()
    } else {
        buf.as_mut_ptr().cast()
    };
    let n = f(ptr, buf.len());
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    if size == 0 {
        return Ok(vec![0u8; n as usize]);
    }
    buf.truncate(n as usize);
    Ok(buf)
}

pub fn getxattr(path: &CStr, name: &CStr, size: u32) -> io::Result<Vec<u8>> {
    xattr_buf(size, |p, l| unsafe {
        libc::getxattr(path.as_ptr(), name.as_ptr(), p, l)
    })
}

pub fn listxattr(path: &CStr, size: u32) -> io::Result<Vec<u8>> {
    xattr_buf(size, |p, l| unsafe {
        libc::listxattr(path.as_ptr(), p.cast(), l)
    })
}

pub fn setxattr(path: &CStr, name: &CStr, value: &[u8], flags: i32) -> io::Result<()> {
    cvt(unsafe {
        libc::setxattr(
            path.as_ptr(),
            name.as_ptr(),
            value.as_ptr().cast(),
            value.len(),
            flags,
        )
    })
    .map(drop)
}

pub fn removexattr(path: &CStr, name: &CStr) -> io::Result<()> {
    cvt(unsafe { libc::removexattr(path.as_ptr(), name.as_ptr()) }).map(drop)
}

/// This boot's id: a crash of the host between two mounts changes it.
pub fn boot_id() -> String {
    std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

/// When this boot began, on the realtime clock as it reads now (realtime minus the time
/// since boot, suspend included), in ns since the epoch.
pub fn boot_ns() -> i128 {
    if let Some(t) = crate::sys::fault::boot_ns() {
        return t;
    }
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    unsafe { libc::clock_gettime(libc::CLOCK_BOOTTIME, &mut ts) };
    now_ns() - (i128::from(ts.tv_sec) * 1_000_000_000 + i128::from(ts.tv_nsec))
}

/// Wall-clock time in nanoseconds since the epoch.
pub fn now_ns() -> i128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as i128)
        .unwrap_or(0)
}

/// Puts this process in the idle I/O scheduling class (ioprio_set(2)): its disk reads
/// wait while anything else wants the disk.
pub fn ioprio_idle() -> io::Result<()> {
    const IOPRIO_WHO_PROCESS: libc::c_long = 1;
    const IOPRIO_CLASS_IDLE: libc::c_long = 3;
    const IOPRIO_CLASS_SHIFT: libc::c_long = 13;
    let r = unsafe {
        libc::syscall(
            libc::SYS_ioprio_set,
            IOPRIO_WHO_PROCESS,
            0 as libc::c_long,
            IOPRIO_CLASS_IDLE << IOPRIO_CLASS_SHIFT,
        )
    };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// flock(2) on an open file.
pub fn flock(f: &std::fs::File, op: i32) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    cvt(unsafe { libc::flock(f.as_raw_fd(), op) }).map(|_| ())
}

/// Whether a process with this pid exists.
pub fn pid_alive(pid: i32) -> bool {
    pid > 0 && unsafe { libc::kill(pid, 0) } == 0
}

/// fsync of a directory, so a rename or create inside it is durable.
pub fn fsync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// Writes `data` to `path` atomically: temp file, fsync, rename, fsync of the directory.
pub fn write_atomic(path: &Path, data: &[u8]) -> io::Result<()> {
    use std::io::Write;
    let dir = path.parent().unwrap_or(Path::new("."));
    let mut tmp_name = path.file_name().unwrap_or_default().to_os_string();
    tmp_name.push(".tmp");
    let tmp = dir.join(tmp_name);
    let mut f = File::create(&tmp)?;
    f.write_all(data)?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)?;
    fsync_dir(dir)
}

/// Opens `path` to read and write, creating it if it is not there (never truncating).
pub fn open_rw(path: &Path) -> io::Result<File> {
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(path)
}

/// Whether every byte of `buf` is zero: 16 bytes a step (a block of 64 KiB in a few
/// microseconds, where a byte a step takes tens).
pub fn is_zero(buf: &[u8]) -> bool {
    let mut words = buf.chunks_exact(16);
    words.all(|w| {
        w.try_into()
            .is_ok_and(|w: [u8; 16]| u128::from_ne_bytes(w) == 0)
    }) && words.remainder().iter().all(|&x| x == 0)
}

/// Reads up to `buf.len()` bytes at `off`; fewer only at end of file.
pub fn read_full(f: &File, buf: &mut [u8], off: u64) -> io::Result<usize> {
    use std::os::unix::fs::FileExt;
    let mut done = 0;
    while done < buf.len() {
        match f.read_at(&mut buf[done..], off + done as u64) {
            Ok(0) => break,
            Ok(n) => done += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(done)
}

/// Knows where the holes of a file are (SEEK_DATA / SEEK_HOLE), lazily.
pub struct Holes<'a> {
    f: &'a File,
    /// `[data_start, data_end)`: the data region at or after the last query.
    data: (u64, u64),
}

impl<'a> Holes<'a> {
    pub fn new(f: &'a File) -> Self {
        Holes { f, data: (0, 0) }
    }

    /// Whether `[off, off+len)` is entirely a hole.
    pub fn hole(&mut self, off: u64, len: u64) -> bool {
        if off >= self.data.1 {
            let fd = std::os::fd::AsRawFd::as_raw_fd(self.f);
            match lseek(fd, off as i64, libc::SEEK_DATA) {
                Ok(d) => {
                    let end = lseek(fd, d, libc::SEEK_HOLE).unwrap_or(i64::MAX);
                    self.data = (d as u64, end as u64);
                }
                // ENXIO: no data at or after `off`.
                Err(_) => self.data = (u64::MAX, u64::MAX),
            }
        }
        off + len <= self.data.0
    }
}

/// Makes `[off, off+len)` of `f` read as zeros: a hole where the range is at least a
/// page, else zeros written (punching part of a block frees nothing and costs a
/// journal transaction: a few hundred microseconds, where the write costs one).
pub fn zero_range(f: &std::fs::File, off: u64, len: u64) -> io::Result<()> {
    use std::os::unix::fs::FileExt;
    if len >= 4096 {
        return punch_hole(f, off, len);
    }
    f.write_all_at(&[0u8; 4096][..len as usize], off)
}

/// Punches a hole over `[off, off+len)` of `f`, keeping its size.
pub fn punch_hole(f: &std::fs::File, off: u64, len: u64) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    fallocate(
        f.as_raw_fd(),
        libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
        off,
        len,
    )
}
