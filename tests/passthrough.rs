//! The mount passes every operation through to the store: namespace operations, data,
//! holes, xattrs, mmap, copy_file_range, O_DIRECT and permissions, with the store's errno.
//! Each test mounts its own store and checks the result on the store itself.

mod common;

use std::ffi::CString;
use std::fs::{self, File, OpenOptions};
use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::Path;

use common::*;

fn errno_of<T>(r: std::io::Result<T>) -> i32 {
    match r {
        Ok(_) => 0,
        Err(e) => e.raw_os_error().unwrap_or(-1),
    }
}

fn c(p: &Path) -> CString {
    CString::new(p.as_os_str().as_bytes()).unwrap()
}

#[test]
#[cfg_attr(not(drfs_root), ignore = "mounts FUSE filesystems: run as root")]
fn namespace_operations_reach_the_store() {
    let f = Fixture::new("ns");
    f.mount(&[]);
    fs::create_dir(f.m("vm1")).unwrap();
    fs::write(f.m("vm1/a.img"), b"hello").unwrap();
    assert_eq!(fs::read(f.s("vm1/a.img")).unwrap(), b"hello");
    fs::rename(f.m("vm1/a.img"), f.m("vm1/b.img")).unwrap();
    assert!(!f.s("vm1/a.img").exists() && f.s("vm1/b.img").exists());
    fs::hard_link(f.m("vm1/b.img"), f.m("b-link")).unwrap();
    let (m1, m2) = (
        fs::metadata(f.m("vm1/b.img")).unwrap(),
        fs::metadata(f.m("b-link")).unwrap(),
    );
    assert_eq!((m1.ino(), m1.nlink()), (m2.ino(), 2));
    std::os::unix::fs::symlink("vm1/b.img", f.m("sym")).unwrap();
    assert_eq!(fs::read_link(f.m("sym")).unwrap(), Path::new("vm1/b.img"));
    assert_eq!(fs::read(f.m("sym")).unwrap(), b"hello");
    fs::set_permissions(f.m("vm1/b.img"), fs::Permissions::from_mode(0o600)).unwrap();
    assert_eq!(
        fs::metadata(f.s("vm1/b.img")).unwrap().mode() & 0o7777,
        0o600
    );
    std::os::unix::fs::chown(f.m("vm1/b.img"), Some(65534), Some(65534)).unwrap();
    assert_eq!(fs::metadata(f.s("vm1/b.img")).unwrap().uid(), 65534);
    let t = std::time::UNIX_EPOCH + std::time::Duration::from_secs(1_000_000_000);
    File::options()
        .write(true)
        .open(f.m("vm1/b.img"))
        .unwrap()
        .set_modified(t)
        .unwrap();
    assert_eq!(
        fs::metadata(f.s("vm1/b.img")).unwrap().mtime(),
        1_000_000_000
    );
    File::options()
        .write(true)
        .open(f.m("vm1/b.img"))
        .unwrap()
        .set_len(3)
        .unwrap();
    assert_eq!(fs::read(f.s("vm1/b.img")).unwrap(), b"hel");
    fs::remove_file(f.m("b-link")).unwrap();
    fs::remove_file(f.m("sym")).unwrap();
    fs::remove_file(f.m("vm1/b.img")).unwrap();
    fs::remove_dir(f.m("vm1")).unwrap();
    let left: Vec<_> = fs::read_dir(&f.store)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(left, vec![std::ffi::OsString::from(".drfs")]);
    f.unmount();
}

#[test]
#[cfg_attr(not(drfs_root), ignore = "mounts FUSE filesystems: run as root")]
fn state_dir_is_invisible_and_untouchable() {
    let f = Fixture::new("hidden");
    f.mount(&[]);
    fs::write(f.m("x"), b"x").unwrap();
    let names: Vec<_> = fs::read_dir(&f.mnt)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names, vec![std::ffi::OsString::from("x")]);
    assert_eq!(errno_of(fs::metadata(f.m(".drfs"))), libc::ENOENT);
    assert_eq!(errno_of(fs::read(f.m(".drfs/state.toml"))), libc::ENOENT);
    assert_eq!(errno_of(fs::create_dir(f.m(".drfs"))), libc::EPERM);
    assert_eq!(errno_of(File::create(f.m(".drfs"))), libc::EPERM);
    assert_eq!(errno_of(fs::rename(f.m("x"), f.m(".drfs"))), libc::EPERM);
    assert_eq!(errno_of(fs::remove_dir(f.m(".drfs"))), libc::ENOENT);
    assert_eq!(
        errno_of(std::os::unix::fs::symlink("x", f.m(".drfs"))),
        libc::EPERM
    );
    // A subfolder may have its own `.drfs`: only the store root's is drfs's.
    fs::create_dir(f.m("sub")).unwrap();
    fs::create_dir(f.m("sub/.drfs")).unwrap();
    assert!(f.s("sub/.drfs").is_dir());
    assert!(f.s(".drfs/state.toml").is_file());
    f.unmount();
}

#[test]
#[cfg_attr(not(drfs_root), ignore = "mounts FUSE filesystems: run as root")]
fn errors_are_the_stores_errors() {
    let f = Fixture::new("errno");
    f.mount(&[]);
    fs::create_dir(f.m("d")).unwrap();
    fs::write(f.m("d/f"), b"1").unwrap();
    fs::write(f.m("g"), b"2").unwrap();
    assert_eq!(errno_of(File::open(f.m("nope"))), libc::ENOENT);
    assert_eq!(errno_of(fs::create_dir(f.m("d"))), libc::EEXIST);
    assert_eq!(errno_of(fs::remove_dir(f.m("d"))), libc::ENOTEMPTY);
    assert_eq!(errno_of(fs::remove_file(f.m("d"))), libc::EISDIR);
    assert_eq!(errno_of(fs::read_dir(f.m("g"))), libc::ENOTDIR);
    assert_eq!(
        errno_of(
            OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(f.m("g"))
        ),
        libc::EEXIST
    );
    let rename2 = |a: &str, b: &str, flags: u32| {
        let (a, b) = (c(&f.m(a)), c(&f.m(b)));
        let r = unsafe {
            libc::renameat2(
                libc::AT_FDCWD,
                a.as_ptr(),
                libc::AT_FDCWD,
                b.as_ptr(),
                flags,
            )
        };
        if r == 0 {
            0
        } else {
            std::io::Error::last_os_error().raw_os_error().unwrap()
        }
    };
    assert_eq!(rename2("g", "d/f", libc::RENAME_NOREPLACE), libc::EEXIST);
    assert_eq!(rename2("g", "d/f", libc::RENAME_EXCHANGE), 0);
    assert_eq!(fs::read(f.s("g")).unwrap(), b"1");
    assert_eq!(fs::read(f.s("d/f")).unwrap(), b"2");
    f.unmount();
}

fn seek(fd: i32, off: i64, whence: i32) -> i64 {
    unsafe { libc::lseek(fd, off, whence) }
}

#[test]
#[cfg_attr(not(drfs_root), ignore = "mounts FUSE filesystems: run as root")]
fn sparse_files_stay_sparse_and_holes_are_reported() {
    let f = Fixture::new("sparse");
    f.mount(&[]);
    let mib = 1u64 << 20;
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(f.m("s.img"))
        .unwrap();
    file.set_len(64 * mib).unwrap();
    file.write_all_at(&[7u8; 65536], 0).unwrap();
    file.write_all_at(&[9u8; 65536], 32 * mib).unwrap();
    let fd = file.as_raw_fd();
    assert_eq!(seek(fd, 0, libc::SEEK_HOLE), 65536);
    assert_eq!(seek(fd, 65536, libc::SEEK_DATA), (32 * mib) as i64);
    assert_eq!(
        seek(fd, 32 * mib as i64, libc::SEEK_HOLE),
        (32 * mib + 65536) as i64
    );
    let blocks = fs::metadata(f.s("s.img")).unwrap().blocks() * 512;
    assert!(
        blocks < 4 * mib,
        "store file not sparse: {blocks} bytes allocated"
    );
    // Punch a hole and zero a range: both reach the store.
    let r = unsafe {
        libc::fallocate(
            fd,
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            0,
            65536,
        )
    };
    assert_eq!(r, 0, "punch hole: {}", std::io::Error::last_os_error());
    assert_eq!(seek(fd, 0, libc::SEEK_DATA), (32 * mib) as i64);
    let r = unsafe { libc::fallocate(fd, libc::FALLOC_FL_ZERO_RANGE, (32 * mib) as i64, 4096) };
    assert_eq!(r, 0, "zero range: {}", std::io::Error::last_os_error());
    let mut b = vec![1u8; 8192];
    File::open(f.s("s.img"))
        .unwrap()
        .read_exact_at(&mut b, 32 * mib)
        .unwrap();
    assert!(b[..4096].iter().all(|&x| x == 0) && b[4096..].iter().all(|&x| x == 9));
    let r = unsafe { libc::fallocate(fd, 0, (64 * mib) as i64, mib as i64) };
    assert_eq!(r, 0);
    assert_eq!(fs::metadata(f.s("s.img")).unwrap().len(), 65 * mib);
    drop(file);
    f.unmount();
}

#[test]
#[cfg_attr(not(drfs_root), ignore = "mounts FUSE filesystems: run as root")]
fn xattrs_pass_through() {
    let f = Fixture::new("xattr");
    f.mount(&[]);
    fs::write(f.m("x"), b"x").unwrap();
    let (p, sp) = (c(&f.m("x")), c(&f.s("x")));
    let name = c(Path::new("user.drfs-test"));
    let r = unsafe { libc::setxattr(p.as_ptr(), name.as_ptr(), b"v1".as_ptr().cast(), 2, 0) };
    assert_eq!(r, 0, "setxattr: {}", std::io::Error::last_os_error());
    let mut buf = [0u8; 16];
    let n = unsafe { libc::getxattr(sp.as_ptr(), name.as_ptr(), buf.as_mut_ptr().cast(), 16) };
    assert_eq!(&buf[..n as usize], b"v1");
    let n = unsafe { libc::getxattr(p.as_ptr(), name.as_ptr(), std::ptr::null_mut(), 0) };
    assert_eq!(n, 2);
    let n = unsafe { libc::listxattr(p.as_ptr(), buf.as_mut_ptr().cast(), 16) };
    assert_eq!(&buf[..n as usize], b"user.drfs-test\0");
    let n = unsafe { libc::getxattr(p.as_ptr(), name.as_ptr(), buf.as_mut_ptr().cast(), 1) };
    assert_eq!(
        (n, std::io::Error::last_os_error().raw_os_error()),
        (-1, Some(libc::ERANGE))
    );
    let r = unsafe {
        libc::setxattr(
            p.as_ptr(),
            name.as_ptr(),
            b"v2".as_ptr().cast(),
            2,
            libc::XATTR_CREATE,
        )
    };
    assert_eq!(
        (r, std::io::Error::last_os_error().raw_os_error()),
        (-1, Some(libc::EEXIST))
    );
    assert_eq!(unsafe { libc::removexattr(p.as_ptr(), name.as_ptr()) }, 0);
    let n = unsafe { libc::getxattr(sp.as_ptr(), name.as_ptr(), buf.as_mut_ptr().cast(), 16) };
    assert_eq!(n, -1);
    f.unmount();
}

#[test]
#[cfg_attr(not(drfs_root), ignore = "mounts FUSE filesystems: run as root")]
fn shared_mmap_writes_reach_the_store() {
    let f = Fixture::new("mmap");
    f.mount(&[]);
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(f.m("m"))
        .unwrap();
    file.set_len(1 << 20).unwrap();
    let mut map = unsafe { memmap2::MmapMut::map_mut(&file) }.unwrap();
    map[12345..12350].copy_from_slice(b"mmap!");
    map.flush().unwrap();
    drop(map);
    drop(file);
    let data = fs::read(f.s("m")).unwrap();
    assert_eq!(&data[12345..12350], b"mmap!");
    f.unmount();
}

#[test]
#[cfg_attr(not(drfs_root), ignore = "mounts FUSE filesystems: run as root")]
fn copy_file_range_copies_on_the_store() {
    let f = Fixture::new("cfr");
    f.mount(&[]);
    let src: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
    fs::write(f.m("src"), &src).unwrap();
    let a = File::open(f.m("src")).unwrap();
    let b = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .open(f.m("dst"))
        .unwrap();
    let (mut oi, mut oo) = (1000i64, 5000i64);
    let n = unsafe {
        libc::copy_file_range(a.as_raw_fd(), &mut oi, b.as_raw_fd(), &mut oo, 200_000, 0)
    };
    assert_eq!(n, 200_000, "{}", std::io::Error::last_os_error());
    drop((a, b));
    let dst = fs::read(f.s("dst")).unwrap();
    assert_eq!(&dst[5000..205_000], &src[1000..201_000]);
    f.unmount();
}

/// The flags of the daemon's descriptors on the store file `path`.
fn daemon_fd_flags(mnt: &Path, path: &Path) -> Vec<u32> {
    let mut out = Vec::new();
    for pid in daemons_of(mnt) {
        let Ok(rd) = fs::read_dir(format!("/proc/{pid}/fd")) else {
            continue;
        };
        for e in rd.flatten() {
            if fs::read_link(e.path()).ok().as_deref() != Some(path) {
                continue;
            }
            let info = fs::read_to_string(format!(
                "/proc/{pid}/fdinfo/{}",
                e.file_name().to_string_lossy()
            ))
            .unwrap_or_default();
            if let Some(fl) = info.lines().find_map(|l| l.strip_prefix("flags:")) {
                out.push(u32::from_str_radix(fl.trim(), 8).unwrap_or(0));
            }
        }
    }
    out
}

#[test]
#[cfg_attr(not(drfs_root), ignore = "mounts FUSE filesystems: run as root")]
fn o_direct_is_direct_on_both_sides() {
    let f = Fixture::new("odirect");
    f.mount(&[]);
    fs::write(f.m("d.img"), vec![0u8; 1 << 20]).unwrap();
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_DIRECT)
        .open(f.m("d.img"))
        .unwrap();
    let flags = daemon_fd_flags(&f.mnt, &f.s("d.img"));
    assert!(
        flags.iter().any(|fl| fl & libc::O_DIRECT as u32 != 0),
        "no O_DIRECT descriptor on the store file: {flags:?}"
    );
    // Aligned I/O from an aligned buffer, as qemu does.
    let layout = std::alloc::Layout::from_size_align(65536, 4096).unwrap();
    let buf = unsafe { std::slice::from_raw_parts_mut(std::alloc::alloc(layout), 65536) };
    buf.fill(0x5a);
    file.write_all_at(buf, 131072).unwrap();
    buf.fill(0);
    file.read_exact_at(buf, 131072).unwrap();
    assert!(buf.iter().all(|&b| b == 0x5a));
    // 512-byte I/O also works (the mount falls back where the store needs more).
    file.write_all_at(&buf[..512], 512).unwrap();
    let store = fs::read(f.s("d.img")).unwrap();
    assert!(store[131072..196608].iter().all(|&b| b == 0x5a));
    assert!(store[512..1024].iter().all(|&b| b == 0x5a));
    unsafe { std::alloc::dealloc(buf.as_mut_ptr(), layout) };
    drop(file);
    f.unmount();
}

#[test]
#[cfg_attr(not(drfs_root), ignore = "mounts FUSE filesystems: run as root")]
fn statfs_is_the_stores() {
    let f = Fixture::new("statfs");
    f.mount(&[]);
    let st = |p: &Path| {
        let mut s: libc::statvfs = unsafe { std::mem::zeroed() };
        assert_eq!(unsafe { libc::statvfs(c(p).as_ptr(), &mut s) }, 0);
        s
    };
    let (a, b) = (st(&f.mnt), st(&f.store));
    assert_eq!(
        (a.f_blocks, a.f_bsize, a.f_files),
        (b.f_blocks, b.f_bsize, b.f_files)
    );
    f.unmount();
}

/// Runs `script` as user nobody (uid 65534) with bash.
fn as_nobody(script: &str) -> std::process::Output {
    use std::os::unix::process::CommandExt;
    std::process::Command::new("bash")
        .arg("-c")
        .arg(script)
        .uid(65534)
        .gid(65534)
        .output()
        .unwrap()
}

#[test]
#[cfg_attr(not(drfs_root), ignore = "mounts FUSE filesystems: run as root")]
fn other_users_get_the_stores_permission_rules() {
    let f = Fixture::new("perm");
    fs::set_permissions(&f.root, fs::Permissions::from_mode(0o755)).unwrap();
    f.mount(&["--allow-other"]);
    fs::set_permissions(&f.mnt, fs::Permissions::from_mode(0o755)).unwrap();
    fs::create_dir(f.m("private")).unwrap();
    fs::create_dir(f.m("shared")).unwrap();
    fs::set_permissions(f.m("shared"), fs::Permissions::from_mode(0o1777)).unwrap();
    fs::write(f.m("shared/roots"), b"r").unwrap();
    let m = f.mnt.display();
    let out = as_nobody(&format!("touch {m}/private/x"));
    assert!(!out.status.success(), "nobody wrote into a 0755 root dir");
    let out = as_nobody(&format!("touch {m}/shared/mine && rm {m}/shared/roots"));
    assert!(
        !out.status.success(),
        "sticky dir let nobody delete root's file"
    );
    assert!(f.s("shared/mine").exists());
    assert_eq!(fs::metadata(f.s("shared/mine")).unwrap().uid(), 65534);
    assert!(f.s("shared/roots").exists());
    f.unmount();
}

#[test]
#[cfg_attr(not(drfs_root), ignore = "mounts FUSE filesystems: run as root")]
fn reads_and_writes_round_trip_at_odd_offsets() {
    let f = Fixture::new("rw");
    f.mount(&[]);
    let mut file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(f.m("f"))
        .unwrap();
    let data: Vec<u8> = (0..3_000_000u32).map(|i| (i * 7 % 256) as u8).collect();
    file.write_all(&data).unwrap();
    file.write_all_at(b"odd", 1_234_567).unwrap();
    let mut back = Vec::new();
    File::open(f.m("f"))
        .unwrap()
        .read_to_end(&mut back)
        .unwrap();
    let mut want = data.clone();
    want[1_234_567..1_234_570].copy_from_slice(b"odd");
    assert!(back == want, "read back differs");
    assert!(fs::read(f.s("f")).unwrap() == want);
    drop(file);
    f.unmount();
}
