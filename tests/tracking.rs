//! Tracking exactness: for writes at chosen offsets through every data path (unaligned
//! writes, writes across block boundaries, punch-hole, zero-range, fallocate, truncate down
//! and up, shared-mmap writes, copy_file_range) `drfs changes --json` reports exactly the
//! blocks whose content changed inside the file's size. By design a truncate down marks
//! every block between the new and the old size (that data is gone), and growth (truncate
//! up, fallocate past the end) marks nothing: the new size travels with the cut and the
//! grown range reads as zeros.

mod common;

use std::collections::BTreeSet;
use std::fs::{self, OpenOptions};
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;

use common::*;

struct Expect {
    bs: u64,
    blocks: BTreeSet<u64>,
}

impl Expect {
    fn mark(&mut self, off: u64, len: u64) {
        if len > 0 {
            self.blocks
                .extend(off / self.bs..=(off + len - 1) / self.bs);
        }
    }
}

fn fallocate(fd: i32, mode: i32, off: u64, len: u64) {
    let r = unsafe { libc::fallocate(fd, mode, off as i64, len as i64) };
    assert_eq!(
        r,
        0,
        "fallocate mode {mode}: {}",
        std::io::Error::last_os_error()
    );
}

fn exactness(bs: u64, flag: &str) {
    let f = Fixture::new("exact");
    f.mount(&["--block-size", flag]);
    let mut e = Expect {
        bs,
        blocks: BTreeSet::new(),
    };
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(f.m("t.img"))
        .unwrap();
    let fd = file.as_raw_fd();
    let w = |off: u64, len: usize| file.write_all_at(&vec![0xa5; len], off).unwrap();

    w(100, 1);
    e.mark(100, 1);
    w(bs - 6, 10); // across the first block boundary
    e.mark(bs - 6, 10);
    w(3 * bs, bs as usize); // exactly one block
    e.mark(3 * bs, bs);
    w(10 * bs + 1, 200_000); // unaligned, several blocks
    e.mark(10 * bs + 1, 200_000);
    w(80 * bs, 4096); // extends the file
    e.mark(80 * bs, 4096);
    fallocate(
        fd,
        libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
        20 * bs + 5,
        70_000,
    );
    e.mark(20 * bs + 5, 70_000);
    fallocate(
        fd,
        libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE,
        30 * bs,
        bs,
    );
    e.mark(30 * bs, bs);
    fallocate(fd, 0, 5 * bs, bs); // allocating inside the file changes no data
    {
        let mut map = unsafe { memmap2::MmapMut::map_mut(&file) }.unwrap();
        map[(40 * bs + 7) as usize..(40 * bs + 11) as usize].copy_from_slice(b"mmap");
        map.flush().unwrap();
        // The kernel writes back whole pages.
        e.mark(40 * bs, 4096);
    }
    {
        fs::write(f.m("src"), vec![7u8; 200_000]).unwrap();
        let src = fs::File::open(f.m("src")).unwrap();
        let (mut oi, mut oo) = (0i64, (50 * bs + 3) as i64);
        let n = unsafe { libc::copy_file_range(src.as_raw_fd(), &mut oi, fd, &mut oo, 102_400, 0) };
        assert_eq!(n, 102_400);
        e.mark(50 * bs + 3, 102_400);
    }
    let size = 80 * bs + 4096;
    file.set_len(70 * bs + 100).unwrap(); // down
    e.mark(70 * bs + 100, size - (70 * bs + 100));
    file.set_len(90 * bs).unwrap(); // up: only the size changes
    fallocate(fd, 0, 90 * bs, bs); // grows the file by a block: only the size changes
    fallocate(fd, libc::FALLOC_FL_KEEP_SIZE, 95 * bs, bs); // beyond EOF, size kept: no data
    drop(file);

    let got = f.dirty_blocks("t.img");
    let missing: Vec<_> = e.blocks.difference(&got).collect();
    let extra: Vec<_> = got.difference(&e.blocks).collect();
    assert!(
        missing.is_empty() && extra.is_empty(),
        "block size {bs}: missing {missing:?}, extra {extra:?}"
    );
    let entry = f.file_changes("t.img");
    assert_eq!(entry["needs_resync"], false);
    assert_eq!(entry["size"], 91 * bs);
    f.unmount();
    // What was tracked survives a clean unmount unchanged.
    assert_eq!(f.dirty_blocks("t.img"), got);
}

#[test]
#[cfg_attr(not(drfs_root), ignore = "mounts FUSE filesystems: run as root")]
fn changes_are_exact_at_64k_blocks() {
    exactness(65536, "64K");
}

#[test]
#[cfg_attr(not(drfs_root), ignore = "mounts FUSE filesystems: run as root")]
fn changes_are_exact_at_4k_blocks() {
    exactness(4096, "4K");
}

#[test]
#[cfg_attr(not(drfs_root), ignore = "mounts FUSE filesystems: run as root")]
fn namespace_and_metadata_changes_are_logged() {
    let f = Fixture::new("nslog");
    f.mount(&[]);
    fs::create_dir(f.m("vm1")).unwrap();
    fs::write(f.m("vm1/a.img"), b"a").unwrap();
    let id = f.file_changes("vm1/a.img")["id"].clone();
    fs::rename(f.m("vm1"), f.m("vm2")).unwrap();
    assert_eq!(
        f.file_changes("vm2/a.img")["id"],
        id,
        "the id survives a rename"
    );
    fs::hard_link(f.m("vm2/a.img"), f.m("vm2/link")).unwrap();
    std::os::unix::fs::symlink("a.img", f.m("vm2/sym")).unwrap();
    fs::set_permissions(
        f.m("vm2/a.img"),
        std::os::unix::fs::PermissionsExt::from_mode(0o640),
    )
    .unwrap();
    std::os::unix::fs::chown(f.m("vm2/a.img"), Some(1), None).unwrap();
    let t = std::time::UNIX_EPOCH + std::time::Duration::from_secs(1_700_000_000);
    fs::File::options()
        .write(true)
        .open(f.m("vm2/a.img"))
        .unwrap()
        .set_modified(t)
        .unwrap();
    let p = std::ffi::CString::new(f.m("vm2/a.img").into_os_string().into_encoded_bytes()).unwrap();
    let n = std::ffi::CString::new("user.k").unwrap();
    assert_eq!(
        unsafe { libc::setxattr(p.as_ptr(), n.as_ptr(), b"v".as_ptr().cast(), 1, 0) },
        0
    );
    assert_eq!(unsafe { libc::removexattr(p.as_ptr(), n.as_ptr()) }, 0);
    fs::remove_file(f.m("vm2/sym")).unwrap();
    fs::remove_file(f.m("vm2/link")).unwrap();
    fs::remove_file(f.m("vm2/a.img")).unwrap();
    fs::remove_dir(f.m("vm2")).unwrap();
    let c = f.changes();
    let ops: Vec<String> = c["log"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            let path = r
                .get("path")
                .or_else(|| r.get("to"))
                .and_then(|p| p.as_str())
                .unwrap_or("");
            format!("{} {path}", r["op"].as_str().unwrap())
        })
        .collect();
    let want = [
        "mount ",
        "mkdir vm1",
        "create vm1/a.img",
        "rename vm2",
        "link vm2/link",
        "symlink vm2/sym",
        "chmod vm2/a.img",
        "chown vm2/a.img",
        "utimens vm2/a.img",
        "setxattr vm2/a.img",
        "removexattr vm2/a.img",
        "unlink vm2/sym",
        "unlink vm2/link",
        "unlink vm2/a.img",
        "rmdir vm2",
    ];
    let got: Vec<&str> = ops
        .iter()
        .map(String::as_str)
        .filter(|o| !o.starts_with("utimens") || o.ends_with("a.img"))
        .collect();
    for w in want {
        assert!(got.contains(&w), "missing {w:?} in {got:#?}");
    }
    let order: Vec<usize> = want
        .iter()
        .map(|w| got.iter().position(|g| g == w).unwrap())
        .collect();
    assert!(
        order.windows(2).all(|p| p[0] < p[1]),
        "out of order: {got:#?}"
    );
    let seqs: Vec<u64> = c["log"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["seq"].as_u64().unwrap())
        .collect();
    assert!(
        seqs.windows(2).all(|s| s[1] == s[0] + 1),
        "seq numbers have gaps: {seqs:?}"
    );
    assert!(
        c["files"].as_array().unwrap().is_empty(),
        "deleted file still tracked"
    );
    f.unmount();
}

#[test]
#[cfg_attr(not(drfs_root), ignore = "mounts FUSE filesystems: run as root")]
fn a_store_changed_while_unmounted_is_flagged() {
    let f = Fixture::new("offline");
    fs::write(f.s("old.img"), vec![1u8; 100_000]).unwrap();
    f.mount(&[]);
    let first = f.file_changes("old.img");
    assert_eq!(
        first["needs_resync"], true,
        "present when tracking began: {first}"
    );
    fs::write(f.m("kept.img"), b"k").unwrap();
    fs::write(f.m("edited.img"), b"e").unwrap();
    fs::write(f.m("moved.img"), b"m").unwrap();
    fs::write(f.m("gone.img"), b"g").unwrap();
    f.unmount();
    for p in ["kept.img", "edited.img", "moved.img"] {
        assert_eq!(f.file_changes(p)["needs_resync"], false, "{p}");
    }
    std::thread::sleep(std::time::Duration::from_millis(20));
    fs::write(f.s("edited.img"), b"changed behind drfs's back").unwrap();
    fs::rename(f.s("moved.img"), f.s("moved2.img")).unwrap();
    fs::remove_file(f.s("gone.img")).unwrap();
    fs::write(f.s("new.img"), b"n").unwrap();
    f.mount(&[]);
    assert_eq!(f.file_changes("kept.img")["needs_resync"], false);
    assert_eq!(f.file_changes("edited.img")["needs_resync"], true);
    assert_eq!(f.file_changes("new.img")["needs_resync"], true);
    assert!(
        f.changes()["files"]
            .as_array()
            .unwrap()
            .iter()
            .all(|x| x["path"] != "gone.img")
    );
    let moved = f.file_changes("moved2.img");
    assert_eq!(
        moved["needs_resync"], true,
        "a rename changes ctime: flagged, never trusted"
    );
    let log = f.changes()["log"].to_string();
    for op in ["\"vanished\"", "\"moved\"", "\"found\"", "\"changed\""] {
        assert!(log.contains(op), "{op} not logged");
    }
    f.unmount();
}
