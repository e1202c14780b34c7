//! Recovery points as files: `drfs browse` shows every point byte-identical to a copy of
//! the primary taken at its cut (listings, owners, modes, mtimes, holes), item-level
//! restore from a guest ext4 image of a point (raw, and qcow2 through qemu-storage-daemon),
//! reads and a test failover while cycles keep applying, a point pruned while open, a
//! corrupt block in a latest file and in an undo record (EIO in exactly the points that
//! use it, through browse and a test failover, and logged), `drfs restore` (exact, sparse,
//! verified, progress on a terminal; files grown past a partial last block) and bad input.

mod common;

use std::fs;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use common::rep::*;
use common::*;

const M: u64 = 1 << 20;

fn qemu_io(fmt: &str, cmds: &[&str], img: &Path) {
    let mut c = Command::new(need("qemu-io"));
    c.args(["-f", fmt, "-t", "none"]);
    for x in cmds {
        c.args(["-c", x]);
    }
    ok(c.arg(img));
}

/// Writes `len` random bytes at `off` of `p` (through whatever is mounted there).
fn random_at(p: &Path, off: u64, len: u64) {
    sh(&format!(
        "dd if=/dev/urandom of={} bs=64k seek={} count={} conv=notrunc status=none",
        p.display(),
        off / 65536,
        len / 65536
    ));
}

/// The data extents of a file, by SEEK_DATA / SEEK_HOLE.
fn extents(p: &Path) -> Vec<(u64, u64)> {
    let f = fs::File::open(p).unwrap();
    let size = f.metadata().unwrap().len();
    let fd = f.as_raw_fd();
    let mut out = Vec::new();
    let mut off = 0i64;
    while (off as u64) < size {
        let d = unsafe { libc::lseek(fd, off, libc::SEEK_DATA) };
        if d < 0 {
            break;
        }
        let h = unsafe { libc::lseek(fd, d, libc::SEEK_HOLE) };
        assert!(h > d, "{}: SEEK_HOLE {h} after data at {d}", p.display());
        out.push((d as u64, h as u64));
        off = h;
    }
    out
}

/// Every entry under `dir` with what a point must keep: type, mode, owner, size, mtime
/// (seconds), symlink target.
fn meta(dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        for e in fs::read_dir(&d).unwrap() {
            let e = e.unwrap();
            if e.file_name() == ".drfs" {
                continue;
            }
            let p = e.path();
            let m = fs::symlink_metadata(&p).unwrap();
            let rel = p.strip_prefix(dir).unwrap().display().to_string();
            let target = fs::read_link(&p).map_or(String::new(), |t| t.display().to_string());
            let size = if m.is_dir() { 0 } else { m.len() };
            out.push(format!(
                "{rel} {:o} {}:{} {size} {} {target}",
                m.mode(),
                m.uid(),
                m.gid(),
                m.mtime()
            ));
            if m.is_dir() {
                todo.push(p);
            }
        }
    }
    out.sort();
    out
}

fn browse(r: &Rep, at: &Path) {
    ok(drfs().arg("browse").arg(&r.replica).arg(at));
    assert!(
        is_mounted(at),
        "drfs browse returned but nothing is mounted"
    );
}

/// A replica (keeping every point for an hour) with one point of a `size` disk.raw of
/// random data, browsed at `browse/`: (replica, the point, the browse mountpoint).
fn one_point_browsed(name: &str, size: u64) -> (Rep, String, PathBuf) {
    let r = Rep::new(name, "manual", "all:1h");
    random_at(&r.f.m("disk.raw"), 0, size);
    let p1 = r.ship();
    let br = r.f.mountpoint("browse");
    browse(&r, &br);
    (r, p1, br)
}

fn point_of_latest(br: &Path) -> String {
    fs::read_link(br.join("latest"))
        .unwrap()
        .display()
        .to_string()
}

#[test]
#[cfg_attr(not(drfs_root), ignore = "mounts FUSE filesystems: run as root")]
fn every_point_reads_as_the_primary_did_at_its_cut() {
    let r = Rep::new("browse", "manual", "all:1h,hourly:24h");
    let f = &r.f;
    // Round 1: a qcow2 disk, a sparse raw disk, small files, a symlink, an empty folder.
    fs::create_dir(f.m("vm1")).unwrap();
    fs::create_dir(f.m("vm1/empty")).unwrap();
    let qcow = f.m("vm1/disk.qcow2");
    ok(Command::new(need("qemu-img"))
        .args(["create", "-q", "-f", "qcow2"])
        .arg(&qcow)
        .arg("256M"));
    qemu_io(
        "qcow2",
        &["write -P 0x11 0 4M", "write -P 0x22 100M 1M"],
        &qcow,
    );
    let sparse = f.m("vm1/sparse.raw");
    fs::File::create(&sparse).unwrap().set_len(1 << 30).unwrap();
    for off in [64 * M, 512 * M, 1000 * M] {
        random_at(&sparse, off, M);
    }
    fs::write(f.m("vm1/notes.txt"), b"first notes\n").unwrap();
    fs::set_permissions(f.m("vm1/notes.txt"), fs::Permissions::from_mode(0o640)).unwrap();
    std::os::unix::fs::chown(f.m("vm1/notes.txt"), Some(1234), Some(5678)).unwrap();
    std::os::unix::fs::symlink("sparse.raw", f.m("vm1/current")).unwrap();
    random_at(&f.m("vm1/gone.raw"), 0, M);
    random_at(&f.m("vm1/shrink.raw"), 0, 4 * M);
    let p1 = r.ship();

    // Browse from here on: later points must appear while it is mounted.
    let br = f.mountpoint("browse");
    browse(&r, &br);
    assert_eq!(point_of_latest(&br), format!("points/{p1}"));

    // Round 2: punch a hole, new data, delete, rename, truncate, a new file, qcow2 writes.
    sh(&format!(
        "fallocate -p -o {} -l {} {}",
        64 * M,
        M,
        sparse.display()
    ));
    random_at(&sparse, 300 * M, M);
    fs::remove_file(f.m("vm1/gone.raw")).unwrap();
    fs::rename(f.m("vm1/notes.txt"), f.m("vm1/notes-renamed.txt")).unwrap();
    fs::OpenOptions::new()
        .write(true)
        .open(f.m("vm1/shrink.raw"))
        .unwrap()
        .set_len(1_500_000)
        .unwrap();
    random_at(&f.m("vm1/late.raw"), 0, 3 * M);
    qemu_io("qcow2", &["write -P 0x33 2M 4M"], &qcow);
    let p2 = r.ship();

    // Round 3: grow what was truncated, rewrite what was punched, folders come and go.
    random_at(&f.m("vm1/shrink.raw"), 6 * M, M);
    random_at(&sparse, 64 * M, 2 * M);
    fs::remove_dir(f.m("vm1/empty")).unwrap();
    fs::create_dir(f.m("vm2")).unwrap();
    fs::write(f.m("vm2/x.txt"), b"x").unwrap();
    let p3 = r.ship();

    // Every point: the same tree, the same metadata, the same bytes, the same holes.
    let listed: Vec<String> = fs::read_dir(br.join("points"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    for p in [&p1, &p2, &p3] {
        assert!(listed.contains(p), "point {p} not in {listed:?}");
        let (want, got) = (r.snaps.join(p), br.join("points").join(p));
        same_tree(&want, &got, &format!("browse point {p}"));
        assert_eq!(meta(&want), meta(&got), "metadata of point {p}");
        for rel in ["vm1/sparse.raw", "vm1/shrink.raw"] {
            assert_eq!(
                extents(&want.join(rel)),
                extents(&got.join(rel)),
                "holes of {rel} in point {p}"
            );
        }
        ok(Command::new(need("qemu-img"))
            .args(["compare", "-q", "-f", "qcow2", "-F", "qcow2"])
            .arg(want.join("vm1/disk.qcow2"))
            .arg(got.join("vm1/disk.qcow2")));
    }
    // The holes are what the primary had, point by point (1 MiB pieces of 1 GiB).
    let map = |p: &str| extents(&br.join("points").join(p).join("vm1/sparse.raw"));
    assert_eq!(
        map(&p1),
        vec![(64 * M, 65 * M), (512 * M, 513 * M), (1000 * M, 1001 * M)]
    );
    assert_eq!(
        map(&p2),
        vec![(300 * M, 301 * M), (512 * M, 513 * M), (1000 * M, 1001 * M)]
    );
    // latest and by-time name the newest point; by-time names every point.
    assert_eq!(point_of_latest(&br), format!("points/{p3}"));
    let mut by_time = Vec::new();
    for day in fs::read_dir(br.join("by-time")).unwrap() {
        for l in fs::read_dir(day.unwrap().path()).unwrap() {
            let t = fs::read_link(l.unwrap().path()).unwrap();
            by_time.push(t.file_name().unwrap().to_string_lossy().into_owned());
        }
    }
    by_time.sort();
    assert_eq!(by_time, vec![p1.clone(), p2.clone(), p3.clone()]);
    // The browse is read-only.
    let w = fs::OpenOptions::new()
        .write(true)
        .open(br.join("points").join(&p1).join("vm1/late.raw"));
    assert!(w.is_err(), "a point opened for writing");
    assert!(fs::write(br.join("points").join(&p3).join("new"), b"x").is_err());
}

/// Runs `f` with guest ext4 image `img` loop-mounted read-write at `at`, then unmounts.
fn in_guest(img: &Path, at: &Path, f: impl FnOnce(&Path)) {
    ok(Command::new("mount").arg("-o").arg("loop").arg(img).arg(at));
    f(at);
    ok(Command::new("umount").arg(at));
}

fn mount_ro(img: &Path, at: &Path) -> Output {
    Command::new("mount")
        .args(["-o", "ro,loop"])
        .arg(img)
        .arg(at)
        .output()
        .unwrap()
}

#[test]
#[cfg_attr(not(drfs_root), ignore = "mounts FUSE filesystems: run as root")]
fn single_files_come_back_from_a_guest_filesystem_of_a_point() {
    need("mkfs.ext4");
    let r = Rep::new("item", "manual", "all:1h,hourly:24h");
    let f = &r.f;
    let img = f.m("guest.img");
    make_ext4(&img, 64 * M, &[]);
    let guest = f.mountpoint("guest");
    let conf = |g: &Path| g.join("etc/app.conf");
    in_guest(&img, &guest, |g| {
        fs::create_dir(g.join("etc")).unwrap();
        fs::write(conf(g), b"version one\n").unwrap();
    });
    let p1 = r.ship();
    in_guest(&img, &guest, |g| {
        fs::write(conf(g), b"version two\n").unwrap()
    });
    let p2 = r.ship();
    in_guest(&img, &guest, |g| fs::remove_file(conf(g)).unwrap());
    let p3 = r.ship();
    // A crash-consistent point: the guest filesystem is mounted (dirty) at the cut.
    ok(Command::new("mount")
        .arg("-o")
        .arg("loop")
        .arg(&img)
        .arg(&guest));
    fs::write(guest.join("etc/late.conf"), b"written while mounted\n").unwrap();
    sh("sync");
    let p4 = r.ship();
    ok(Command::new("umount").arg(&guest));

    let br = f.mountpoint("browse");
    browse(&r, &br);
    let item = f.mountpoint("item");
    for (p, want) in [
        (&p1, Some("version one\n")),
        (&p2, Some("version two\n")),
        (&p3, None),
    ] {
        let out = mount_ro(&br.join("points").join(p).join("guest.img"), &item);
        assert!(
            out.status.success(),
            "ro,loop mount of point {p}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let got = fs::read_to_string(conf(&item)).ok();
        ok(Command::new("umount").arg(&item));
        assert_eq!(got.as_deref(), want, "app.conf in point {p}");
    }
    // A dirty guest filesystem mounts read-only without its journal (README's recipe)...
    let out = Command::new("mount")
        .args(["-o", "ro,loop,noload"])
        .arg(br.join("points").join(&p4).join("guest.img"))
        .arg(&item)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "ro,loop,noload mount of dirty point {p4}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!conf(&item).exists(), "app.conf was deleted before {p4}");
    ok(Command::new("umount").arg(&item));
    // ... and with its journal replayed in a test failover clone,
    // which takes the writes and leaves the point as it was.
    let tf = f.mountpoint("failover");
    ok(drfs()
        .arg("test-failover")
        .arg(&r.replica)
        .args(["--point", &p4, "--at"])
        .arg(&tf));
    in_guest(&tf.join("guest.img"), &item, |g| {
        assert_eq!(
            fs::read_to_string(g.join("etc/late.conf")).unwrap(),
            "written while mounted\n"
        );
    });
    ok(drfs().arg("test-failover").arg(&r.replica).arg("--stop"));
    assert!(!is_mounted(&tf));
    let diff = Command::new("cmp")
        .arg(br.join("points").join(&p4).join("guest.img"))
        .arg(r.snaps.join(&p4).join("guest.img"))
        .output()
        .unwrap();
    assert!(diff.status.success(), "the clone changed point {p4}");
}

/// A qcow2 image exported as a raw file by qemu-storage-daemon's FUSE export (what the
/// README's recipe uses where the kernel has no nbd). Stops the daemon when dropped.
struct Qsd {
    export: PathBuf,
    pid: i32,
}

impl Qsd {
    fn start(img: &Path, export: &Path, writable: bool) -> Qsd {
        fs::write(export, b"").unwrap();
        let pidfile = export.with_extension("pid");
        let ro = if writable { "off" } else { "on" };
        ok(Command::new(need("qemu-storage-daemon"))
            .arg("--blockdev")
            .arg(format!(
                "driver=file,node-name=f,filename={},read-only={ro}",
                img.display()
            ))
            .arg("--blockdev")
            .arg(format!("driver=qcow2,node-name=q,file=f,read-only={ro}"))
            .arg("--export")
            .arg(format!(
                "type=fuse,id=e,node-name=q,mountpoint={},writable={}",
                export.display(),
                if writable { "on" } else { "off" }
            ))
            .args(["--daemonize", "--pidfile"])
            .arg(&pidfile));
        let pid = fs::read_to_string(&pidfile)
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        assert!(is_mounted(export), "qemu-storage-daemon exported nothing");
        Qsd {
            export: export.to_path_buf(),
            pid,
        }
    }
}

impl Drop for Qsd {
    fn drop(&mut self) {
        let _ = Command::new("fusermount3")
            .args(["-u", "-z", "-q"])
            .arg(&self.export)
            .status();
        unsafe { libc::kill(self.pid, libc::SIGTERM) };
        if !wait_gone(self.pid, std::time::Duration::from_secs(10)) {
            unsafe { libc::kill(self.pid, libc::SIGKILL) };
            wait_gone(self.pid, std::time::Duration::from_secs(5));
        }
    }
}

#[test]
#[cfg_attr(not(drfs_root), ignore = "mounts FUSE filesystems: run as root")]
fn single_files_come_back_from_a_qcow2_guest_image_of_a_point() {
    need("mkfs.ext4");
    let r = Rep::new("qitem", "manual", "all:1h,hourly:24h");
    let f = &r.f;
    let raw = f.root.join("scratch.raw");
    make_ext4(&raw, 64 * M, &[]);
    let qcow = f.m("vm.qcow2");
    ok(Command::new(need("qemu-img"))
        .args(["convert", "-q", "-O", "qcow2"])
        .arg(&raw)
        .arg(&qcow));
    let guest = f.mountpoint("guest");
    let conf = |g: &Path| g.join("app.conf");
    // The "VM" writes its qcow2 through the primary mount.
    let as_vm = |change: &dyn Fn(&Path)| {
        let q = Qsd::start(&qcow, &f.root.join("rw.raw"), true);
        in_guest(&q.export, &guest, change);
    };
    as_vm(&|g| fs::write(conf(g), b"version one\n").unwrap());
    let p1 = r.ship();
    as_vm(&|g| fs::remove_file(conf(g)).unwrap());
    let p2 = r.ship();

    let br = f.mountpoint("browse");
    browse(&r, &br);
    let item = f.mountpoint("item");
    for (p, want) in [(&p1, Some("version one\n")), (&p2, None)] {
        let q = Qsd::start(
            &br.join("points").join(p).join("vm.qcow2"),
            &f.root.join("ro.raw"),
            false,
        );
        let out = mount_ro(&q.export, &item);
        assert!(
            out.status.success(),
            "ro,loop mount of the qcow2 of point {p}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let got = fs::read_to_string(conf(&item)).ok();
        ok(Command::new("umount").arg(&item));
        drop(q);
        assert_eq!(got.as_deref(), want, "app.conf in point {p}");
    }
    r.check_point(&p1);
}

/// Reads `p` with O_DIRECT (past the page cache, so every pass reaches the daemon) and
/// compares it with `want`.
fn direct_equals(p: &Path, want: &Path) -> bool {
    Command::new("bash")
        .arg("-c")
        .arg(format!(
            "set -o pipefail; dd if={} iflag=direct bs=1M status=none | cmp -s - {}",
            p.display(),
            want.display()
        ))
        .status()
        .unwrap()
        .success()
}

/// Reads all of `f` (opened O_DIRECT) with `threads` threads at once, 64 KiB at a time.
fn parallel_direct_read(f: &Arc<fs::File>, size: u64, threads: u64) -> Vec<u8> {
    const CHUNK: u64 = 64 << 10;
    let parts: Vec<_> = (0..threads)
        .map(|t| {
            let f = f.clone();
            std::thread::spawn(move || {
                let mut raw = vec![0u8; (CHUNK + 4096) as usize];
                let skip = raw.as_ptr().align_offset(4096);
                let buf = &mut raw[skip..skip + CHUNK as usize];
                let mut got = Vec::new();
                let mut off = t * CHUNK;
                while off < size {
                    std::os::unix::fs::FileExt::read_exact_at(&*f, buf, off).unwrap();
                    got.push((off, buf.to_vec()));
                    off += threads * CHUNK;
                }
                got
            })
        })
        .collect();
    let mut out = vec![0u8; size as usize];
    for p in parts {
        for (off, b) in p.join().unwrap() {
            out[off as usize..off as usize + b.len()].copy_from_slice(&b);
        }
    }
    out
}

#[test]
#[cfg_attr(not(drfs_root), ignore = "mounts FUSE filesystems: run as root")]
fn one_open_file_read_by_many_threads_stays_right_across_applies() {
    // Every cycle moves blocks of the open point out of the latest file; the first reads
    // after it run with a stale chain on several threads at once, and a thread that
    // brings the chain up to date must not bless another's stale read.
    let (r, p1, br) = one_point_browsed("threads", 16 * M);
    let disk = r.f.m("disk.raw");
    let want = fs::read(r.snaps.join(&p1).join("disk.raw")).unwrap();
    let f = Arc::new(
        std::os::unix::fs::OpenOptionsExt::custom_flags(
            fs::OpenOptions::new().read(true),
            libc::O_DIRECT,
        )
        .open(br.join("points").join(&p1).join("disk.raw"))
        .unwrap(),
    );
    for round in 0..12u64 {
        random_at(&disk, (round % 8) * 2 * M, 2 * M);
        r.ship();
        let got = parallel_direct_read(&f, want.len() as u64, 8);
        assert!(
            got == want,
            "point {p1} read wrong after cycle {}",
            round + 1
        );
    }
}

#[test]
#[cfg_attr(not(drfs_root), ignore = "mounts FUSE filesystems: run as root")]
fn reads_and_a_test_failover_stay_right_while_cycles_apply() {
    let r = Rep::new("busy", "manual", "all:1h,hourly:24h");
    let f = &r.f;
    let disk = f.m("disk.raw");
    random_at(&disk, 0, 64 * M);
    let qcow = f.m("vm.qcow2");
    ok(Command::new(need("qemu-img"))
        .args(["create", "-q", "-f", "qcow2"])
        .arg(&qcow)
        .arg("64M"));
    qemu_io("qcow2", &["write -P 0x44 0 8M"], &qcow);
    let p1 = r.ship();
    let br = f.mountpoint("browse");
    browse(&r, &br);
    let tf = f.mountpoint("failover");
    ok(drfs()
        .arg("test-failover")
        .arg(&r.replica)
        .args(["--point", &p1, "--at"])
        .arg(&tf));
    let st: serde_json::Value =
        serde_json::from_slice(&ok(drfs().arg("status").arg(&r.replica).arg("--json")).stdout)
            .unwrap();
    assert_eq!(st["test_failover"]["point"], p1.as_str(), "{st:#}");

    let stop = Arc::new(AtomicBool::new(false));
    let passes = Arc::new(AtomicUsize::new(0));
    let reader = {
        let (stop, passes) = (stop.clone(), passes.clone());
        let (got, want) = (
            br.join("points").join(&p1).join("disk.raw"),
            r.snaps.join(&p1).join("disk.raw"),
        );
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                if !direct_equals(&got, &want) {
                    return Err(format!(
                        "pass {}: point read wrong",
                        passes.load(Ordering::Relaxed)
                    ));
                }
                passes.fetch_add(1, Ordering::Relaxed);
            }
            Ok(())
        })
    };
    let writer = {
        let (stop, img, qimg) = (stop.clone(), tf.join("disk.raw"), tf.join("vm.qcow2"));
        std::thread::spawn(move || {
            let mut i = 0u64;
            while !stop.load(Ordering::Relaxed) && i < 32 {
                qemu_io(
                    "raw",
                    &[&format!("write -P 0x5a {} 1M", (i % 32) * 2 * M)],
                    &img,
                );
                qemu_io(
                    "qcow2",
                    &[&format!("write -P 0x66 {} 1M", 16 * M + i * M)],
                    &qimg,
                );
                i += 1;
            }
            i
        })
    };
    let mut points = vec![p1.clone()];
    for round in 0..6u64 {
        for k in 0..8 {
            random_at(&disk, ((round * 13 + k * 7) % 64) * M, M);
        }
        qemu_io(
            "qcow2",
            &[&format!("write -P 0x{:02x} {}M 1M", 0x70 + round, round)],
            &qcow,
        );
        let p = r.ship();
        assert!(
            br.join("points").join(&p).exists(),
            "new point {p} did not appear in the browse"
        );
        assert!(direct_equals(
            &br.join("points").join(&p).join("disk.raw"),
            &r.snaps.join(&p).join("disk.raw")
        ));
        points.push(p);
    }
    stop.store(true, Ordering::Relaxed);
    reader.join().unwrap().unwrap();
    let writes = writer.join().unwrap();
    assert!(
        passes.load(Ordering::Relaxed) > 0,
        "the reader never finished a pass"
    );

    // The clone: the point plus exactly its own writes; qemu still reads its qcow2.
    let mut want = fs::read(r.snaps.join(&p1).join("disk.raw")).unwrap();
    for i in 0..writes.min(32) {
        let o = ((i % 32) * 2 * M) as usize;
        want[o..o + M as usize].fill(0x5a);
    }
    assert!(
        fs::read(tf.join("disk.raw")).unwrap() == want,
        "clone disk.raw is wrong"
    );
    ok(Command::new(need("qemu-img"))
        .arg("check")
        .arg(tf.join("vm.qcow2")));
    qemu_io("qcow2", &["read -P 0x44 0 8M"], &tf.join("vm.qcow2"));
    if writes > 0 {
        qemu_io("qcow2", &["read -P 0x66 16M 1M"], &tf.join("vm.qcow2"));
    }
    // The replica: its latest files and every point are exact.
    r.check_latest();
    for p in &points {
        r.check_point(p);
    }
    // Stopping discards the clone and nothing else.
    ok(drfs().arg("test-failover").arg(&r.replica).arg("--stop"));
    assert!(!is_mounted(&tf));
    assert!(!r.replica.join(".drfs/test-failover").exists());
    assert!(!r.replica.join(".drfs/test-failover.json").exists());
    r.check_latest();
}

fn point_ids(r: &Rep) -> Vec<String> {
    r.points()
        .iter()
        .map(|p| p["id"].as_str().unwrap().to_string())
        .collect()
}

/// Retention keeps a point while a file of it is open (later points are dropped and
/// merged into its record meanwhile, and its reads stay exact), and drops it at the first
/// run after the file is closed.
#[test]
#[cfg_attr(not(drfs_root), ignore = "mounts FUSE filesystems: run as root")]
fn a_point_with_an_open_file_outlives_retention_until_closed() {
    let r = Rep::new("pinned", "manual", "last:2");
    let f = &r.f;
    let disk = f.m("disk.raw");
    random_at(&disk, 0, 16 * M);
    let p1 = r.ship();
    let br = f.mountpoint("browse");
    browse(&r, &br);
    let path = br.join("points").join(&p1).join("disk.raw");
    let want = fs::read(r.snaps.join(&p1).join("disk.raw")).unwrap();
    // Opened while p1 is the latest point: every block still comes from the latest file.
    let open = fs::File::open(&path).unwrap();
    let mut later = Vec::new();
    for round in 0..4u64 {
        random_at(&disk, (round % 4) * 4 * M, 6 * M);
        later.push(r.ship());
        if round == 1 {
            let mut got = vec![0u8; want.len()];
            std::os::unix::fs::FileExt::read_exact_at(&open, &mut got, 0).unwrap();
            assert!(got == want, "point {p1} read wrong after two cycles");
        }
    }
    let ids = point_ids(&r);
    assert!(
        ids.contains(&p1),
        "point {p1} was pruned while open: {ids:?}"
    );
    assert_eq!(
        ids.len(),
        3,
        "retention kept more than the pinned point: {ids:?}"
    );
    let mut got = vec![0u8; want.len()];
    std::os::unix::fs::FileExt::read_exact_at(&open, &mut got, 0).unwrap();
    assert!(
        got == want,
        "point {p1} read wrong after retention merged into it"
    );
    // Its record was merged correctly: a fresh reader agrees.
    r.check_point(&p1);
    drop(open);
    random_at(&disk, 0, M);
    r.ship();
    let ids = point_ids(&r);
    assert!(
        !ids.contains(&p1),
        "point {p1} outlived its reader: {ids:?}"
    );
    assert!(!br.join("points").join(&p1).exists());
}

#[test]
#[cfg_attr(not(drfs_root), ignore = "mounts FUSE filesystems: run as root")]
fn a_daemon_that_ends_late_leaves_a_newer_mount_at_its_path_alone() {
    // fuser 0.18 unmounts by path when a session ends (see `mount::attach`): a browse
    // unmounted lazily, whose last open file closes after a new browse was mounted at the
    // same path, must not take the new one down with it.
    let (r, _, br) = one_point_browsed("remount", M);
    let old = daemons_of(&br);
    let open = fs::File::open(br.join("latest").join("disk.raw")).unwrap();
    ok(drfs().arg("unmount").arg("--lazy").arg(&br));
    browse(&r, &br);
    drop(open);
    for pid in old {
        let gone = wait_gone(pid, std::time::Duration::from_secs(10));
        assert!(
            gone,
            "the lazily unmounted browse daemon {pid} did not exit"
        );
    }
    assert!(
        is_mounted(&br),
        "the old daemon's end unmounted the new browse"
    );
    assert!(br.join("latest").join("disk.raw").is_file());
}

#[test]
#[cfg_attr(not(drfs_root), ignore = "mounts FUSE filesystems: run as root")]
fn browse_and_test_failover_daemons_log_to_the_replica() {
    let (r, p1, br) = one_point_browsed("logs", M);
    let pids = daemons_of(&br);
    ok(drfs().arg("unmount").arg(&br));
    for pid in pids {
        let gone = wait_gone(pid, std::time::Duration::from_secs(10));
        assert!(gone, "the browse daemon {pid} did not exit");
    }
    let (rep, br) = (
        fs::canonicalize(&r.replica).unwrap(),
        fs::canonicalize(&br).unwrap(),
    );
    let log = fs::read_to_string(rep.join(".drfs/browse.log")).unwrap();
    for line in [
        format!("browsing {} at {}", rep.display(), br.display()),
        format!("{} unmounted", br.display()),
    ] {
        assert!(log.contains(&line), "browse.log lacks {line:?}:\n{log}");
    }

    let tf = r.f.mountpoint("failover");
    ok(drfs()
        .arg("test-failover")
        .arg(&r.replica)
        .args(["--point", &p1, "--at"])
        .arg(&tf));
    ok(drfs().arg("test-failover").arg(&r.replica).arg("--stop"));
    let tf = fs::canonicalize(&tf).unwrap();
    let log = fs::read_to_string(rep.join(".drfs/test-failover.log")).unwrap();
    for line in [
        format!("test failover of point {p1} at {}", tf.display()),
        format!(
            "test failover at {} stopped; its writes discarded",
            tf.display()
        ),
    ] {
        assert!(
            log.contains(&line),
            "test-failover.log lacks {line:?}:\n{log}"
        );
    }
}

/// `read_ahead_kb` of device `dev`: its bdi, or a partition's disk.
fn readahead_kb(dev: u64) -> Option<u64> {
    let d = format!("{}:{}", libc::major(dev), libc::minor(dev));
    [
        format!("/sys/class/bdi/{d}/read_ahead_kb"),
        format!("/sys/dev/block/{d}/../queue/read_ahead_kb"),
    ]
    .iter()
    .find_map(|f| fs::read_to_string(f).ok()?.trim().parse().ok())
}

#[test]
#[cfg_attr(not(drfs_root), ignore = "mounts FUSE filesystems: run as root")]
fn browse_reads_ahead_like_the_replica_disk() {
    let (r, _, br) = one_point_browsed("readahead", M);
    let disk = fs::metadata(&r.replica).unwrap().dev();
    let mnt = fs::metadata(&br).unwrap().dev();
    let got = readahead_kb(mnt).expect("the browse mount has a bdi");
    let want = readahead_kb(disk).unwrap_or(1024).clamp(1024, 16384);
    assert_eq!(
        got, want,
        "browse readahead (KiB) against the replica disk's"
    );
}

/// Bytes of `p` in the page cache.
fn cached_bytes(p: &Path) -> u64 {
    let out = ok(Command::new(need("fincore"))
        .args(["--bytes", "--noheadings", "--output", "RES"])
        .arg(p));
    String::from_utf8_lossy(&out.stdout).trim().parse().unwrap()
}

#[test]
#[cfg_attr(not(drfs_root), ignore = "mounts FUSE filesystems: run as root")]
fn a_buffered_read_of_a_point_is_cached_once() {
    // Point 1 then half the disk overwritten (point 2): point 1 reads from its undo
    // record and from the latest file.
    let (r, p1, br) = one_point_browsed("cached-once", 32 * M);
    let want = fs::read(r.f.m("disk.raw")).unwrap();
    random_at(&r.f.m("disk.raw"), 8 * M, 16 * M);
    r.ship();
    let undo = r.replica.join(".drfs/points").join(&p1).join("undo");
    let mut sources = vec![r.replica.join("disk.raw")];
    for e in fs::read_dir(&undo).unwrap() {
        let p = e.unwrap().path();
        if p.extension().is_some_and(|x| x == "data") {
            sources.push(p);
        }
    }
    assert_eq!(sources.len(), 2, "one undo data file in {}", undo.display());
    for s in &sources {
        ok(Command::new("dd").arg(format!("if={}", s.display())).args([
            "iflag=nocache",
            "count=0",
            "status=none",
        ]));
        assert_eq!(cached_bytes(s), 0, "{} left the cache", s.display());
    }
    let got = fs::read(br.join("points").join(&p1).join("disk.raw")).unwrap();
    assert!(got == want, "point 1 reads as the primary was at its cut");
    for s in &sources {
        assert_eq!(
            cached_bytes(s),
            0,
            "reading the point through browse cached {} a second time",
            s.display()
        );
    }
}

/// The replica's block size in these tests (drfs's default).
const BS: u64 = 65536;

/// Reads `p` one block (`BS`) per pread, in one open (O_DIRECT if `direct`), `again`
/// times over: per block, its bytes or the errno of the last pass. The kernel may split a
/// read into several requests, and a bad block's pieces before the bad one check out:
/// then the read is short, with those bytes, and a read of the rest fails, as `read(2)`
/// reports an error only when nothing was read.
fn read_blocks(p: &Path, direct: bool, again: usize) -> Vec<Result<Vec<u8>, i32>> {
    use std::os::unix::fs::FileExt;
    let mut o = fs::OpenOptions::new();
    o.read(true);
    if direct {
        std::os::unix::fs::OpenOptionsExt::custom_flags(&mut o, libc::O_DIRECT);
    }
    let f = o.open(p).unwrap();
    let size = f.metadata().unwrap().len();
    let mut raw = vec![0u8; 2 * BS as usize];
    let skip = raw.as_ptr().align_offset(4096);
    let buf = &mut raw[skip..skip + BS as usize];
    let mut out = Vec::new();
    for _ in 0..again {
        out = (0..size.div_ceil(BS))
            .map(|b| {
                let n = (size - b * BS).min(BS) as usize;
                // O_DIRECT wants an aligned length: ask for a whole block, get what is left.
                let len = if direct { BS as usize } else { n };
                match f.read_at(&mut buf[..len], b * BS) {
                    Ok(got) if got == n => Ok(buf[..n].to_vec()),
                    Ok(got) if got > 0 && got % 4096 == 0 => {
                        let rest = &mut buf[got..len];
                        match f.read_at(rest, b * BS + got as u64) {
                            Err(e) => Err(e.raw_os_error().unwrap_or(0)),
                            Ok(more) => panic!(
                                "{}: block {b}: {got} bytes, then {more}, not {n}",
                                p.display()
                            ),
                        }
                    }
                    Ok(got) => panic!("{}: block {b}: {got} bytes, not {n}", p.display()),
                    Err(e) => Err(e.raw_os_error().unwrap_or(0)),
                }
            })
            .collect();
    }
    out
}

/// Asserts that `got` (`read_blocks` of `what`) is `want` block by block, except that the
/// blocks in `bad` fail with EIO.
fn blocks_are(got: &[Result<Vec<u8>, i32>], want: &[u8], bad: &[u64], what: &str) {
    assert_eq!(got.len() as u64, (want.len() as u64).div_ceil(BS), "{what}");
    for (b, r) in got.iter().enumerate() {
        let b = b as u64;
        let w = &want[(b * BS) as usize..((b + 1) * BS).min(want.len() as u64) as usize];
        match r {
            Err(e) if bad.contains(&b) => assert_eq!(*e, libc::EIO, "{what}: block {b}"),
            Ok(_) if bad.contains(&b) => panic!("{what}: corrupt block {b} was served"),
            Err(e) => panic!("{what}: block {b} failed (errno {e})"),
            Ok(d) => assert!(d == w, "{what}: block {b} reads wrong"),
        }
    }
}

/// Reads 4 KiB at each of the first three 4 KiB pieces of every whole block of `p`
/// (O_DIRECT, one open): per block and piece, the bytes or the errno. Reads that cover
/// part of a block not checked yet: checked by the piece records.
fn read_inside(p: &Path) -> Vec<Vec<Result<Vec<u8>, i32>>> {
    use std::os::unix::fs::FileExt;
    let f = std::os::unix::fs::OpenOptionsExt::custom_flags(
        fs::OpenOptions::new().read(true),
        libc::O_DIRECT,
    )
    .open(p)
    .unwrap();
    let mut raw = vec![0u8; 8192];
    let skip = raw.as_ptr().align_offset(4096);
    let buf = &mut raw[skip..skip + 4096];
    let whole = f.metadata().unwrap().len() / BS;
    (0..whole)
        .map(|b| {
            (0..3)
                .map(|k| match f.read_at(buf, b * BS + k * 4096) {
                    Ok(4096) => Ok(buf.to_vec()),
                    Ok(n) => panic!("{}: 4 KiB in block {b}: {n} bytes", p.display()),
                    Err(e) => Err(e.raw_os_error().unwrap_or(0)),
                })
                .collect()
        })
        .collect()
}

/// Asserts that the pieces `read_inside` got are `want`'s, except that the pieces in
/// `bad` (block, piece) fail with EIO: a corrupt block's other pieces read, checked.
fn inside_is(got: &[Vec<Result<Vec<u8>, i32>>], want: &[u8], bad: &[(u64, u64)], what: &str) {
    for (b, pieces) in got.iter().enumerate() {
        for (k, r) in pieces.iter().enumerate() {
            let (b, k) = (b as u64, k as u64);
            let o = (b * BS + k * 4096) as usize;
            match r {
                Err(e) if bad.contains(&(b, k)) => assert_eq!(*e, libc::EIO, "{what}: {b}/{k}"),
                Ok(_) if bad.contains(&(b, k)) => {
                    panic!("{what}: the corrupt piece {k} of block {b} was served")
                }
                Err(e) => panic!("{what}: piece {k} of block {b} failed (errno {e})"),
                Ok(d) => assert!(
                    d[..] == want[o..o + 4096],
                    "{what}: piece {k} of block {b} reads wrong"
                ),
            }
        }
    }
}

/// Reads every block of disk.raw in every point of `points` through a browse at `br`
/// and through a test failover of each point at `tf`, and checks it against the
/// primary's copy; `bad` lists the (point, block, piece) whose reads must fail with EIO
/// (a whole-block read of the block, a 4 KiB read of the piece). Browse reads three
/// 4 KiB pieces of each block (one open), then each block whole (O_DIRECT, twice in one
/// open; then buffered); the clone the pieces, then each block whole (one open file for
/// all), then overwrites each bad block: a part of its bad piece fails (the rest of the
/// piece would come from the point), the whole block can be written and read. The
/// points' other file reads whole.
fn every_block_of_every_point(
    r: &Rep,
    br: &Path,
    tf: &Path,
    points: &[String],
    bad: &[(&str, u64, u64)],
) {
    let bad_in = |p: &str| -> Vec<u64> { bad.iter().filter(|x| x.0 == p).map(|x| x.1).collect() };
    let pieces_in = |p: &str| -> Vec<(u64, u64)> {
        bad.iter()
            .filter(|x| x.0 == p)
            .map(|x| (x.1, x.2))
            .collect()
    };
    browse(r, br);
    for p in points {
        let want = fs::read(r.snaps.join(p).join("disk.raw")).unwrap();
        let at = br.join("points").join(p);
        let what = format!("browse point {p}");
        inside_is(
            &read_inside(&at.join("disk.raw")),
            &want,
            &pieces_in(p),
            &what,
        );
        for direct in [true, false] {
            let got = read_blocks(&at.join("disk.raw"), direct, if direct { 2 } else { 1 });
            let what = format!("{what} (direct {direct})");
            blocks_are(&got, &want, &bad_in(p), &what);
        }
        let other = fs::read(r.snaps.join(p).join("other.raw")).unwrap();
        assert!(
            fs::read(at.join("other.raw")).unwrap() == other,
            "browse point {p} other.raw"
        );
    }
    ok(drfs().arg("unmount").arg(br));
    for p in points {
        ok(drfs()
            .arg("test-failover")
            .arg(&r.replica)
            .args(["--point", p, "--at"])
            .arg(tf));
        let want = fs::read(r.snaps.join(p).join("disk.raw")).unwrap();
        let (img, what) = (tf.join("disk.raw"), format!("test failover of point {p}"));
        inside_is(&read_inside(&img), &want, &pieces_in(p), &what);
        blocks_are(&read_blocks(&img, false, 1), &want, &bad_in(p), &what);
        let other = fs::read(r.snaps.join(p).join("other.raw")).unwrap();
        assert!(
            fs::read(tf.join("other.raw")).unwrap() == other,
            "{what}: other.raw"
        );
        let w = fs::OpenOptions::new().write(true).open(&img).unwrap();
        for (b, k) in pieces_in(p) {
            use std::os::unix::fs::FileExt;
            // Writing part of the bad piece reads the rest of it from the point: refused.
            let e = w
                .write_all_at(b"part", b * BS + k * 4096 + 100)
                .unwrap_err();
            assert_eq!(
                e.raw_os_error(),
                Some(libc::EIO),
                "{what}: part of block {b}"
            );
            w.write_all_at(&vec![0x5a; BS as usize], b * BS).unwrap();
            let mut back = vec![0u8; BS as usize];
            w.sync_all().unwrap();
            fs::File::open(&img)
                .unwrap()
                .read_exact_at(&mut back, b * BS)
                .unwrap();
            assert!(
                back.iter().all(|&x| x == 0x5a),
                "{what}: block {b} rewritten"
            );
        }
        drop(w);
        ok(drfs().arg("test-failover").arg(&r.replica).arg("--stop"));
    }
}

/// The part of `log` written since it was `from` bytes long.
fn log_since(log: &Path, from: usize) -> String {
    let all = fs::read_to_string(log).unwrap_or_default();
    all.get(from..).unwrap_or_default().to_string()
}

#[test]
#[cfg_attr(not(drfs_root), ignore = "mounts FUSE filesystems: run as root")]
fn a_corrupt_block_fails_with_eio_in_exactly_the_points_that_use_it() {
    let r = Rep::new("corrupt", "manual", "all:1h");
    let f = &r.f;
    // 17 blocks (the last one short) and a second file that stays clean.
    let disk = f.m("disk.raw");
    let mut data = vec![0u8; (16 * BS + 1000) as usize];
    fs::File::open("/dev/urandom")
        .and_then(|mut u| std::io::Read::read_exact(&mut u, &mut data))
        .unwrap();
    fs::write(&disk, &data).unwrap();
    random_at(&f.m("other.raw"), 0, 4 * BS);
    let p1 = r.ship();
    random_at(&disk, 4 * BS, 2 * BS);
    let p2 = r.ship();
    random_at(&disk, 10 * BS, BS);
    let p3 = r.ship();
    // Block 4: p1 reads it from its undo record, p2 and p3 from the latest file. Block 10:
    // p1 and p2 read it from p2's undo record (p1's has no block 10), p3 from the latest.
    let points = [p1.clone(), p2.clone(), p3.clone()];
    let (br, tf) = (f.mountpoint("browse"), f.mountpoint("failover"));
    every_block_of_every_point(&r, &br, &tf, &points, &[]);

    let rep = fs::canonicalize(&r.replica).unwrap();
    let (blog, tlog) = (
        rep.join(".drfs/browse.log"),
        rep.join(".drfs/test-failover.log"),
    );
    let (b0, t0) = (log_since(&blog, 0).len(), log_since(&tlog, 0).len());
    for log in [log_since(&blog, 0), log_since(&tlog, 0)] {
        assert!(
            !log.contains("EIO"),
            "a clean replica logged a bad block:\n{log}"
        );
    }
    let id = f.file_changes("disk.raw")["id"]
        .as_str()
        .unwrap()
        .to_string();
    let undo = rep
        .join(".drfs/points")
        .join(&p2)
        .join("undo")
        .join(format!("{id}.data"));
    flip(&rep.join("disk.raw"), 4 * BS + 123);
    flip(&undo, 10 * BS + 4567);
    // Block 4's flipped byte is in its first 4 KiB piece, block 10's in its second.
    let bad = [(&*p2, 4, 0), (&*p3, 4, 0), (&*p1, 10, 1), (&*p2, 10, 1)];
    every_block_of_every_point(&r, &br, &tf, &points, &bad);

    // Each bad block is logged with its point, file, offset and source, once per open
    // file that read it (browse: three opens; a clone: one open file for its life).
    let latest = format!(
        "read from the latest file {}",
        rep.join("disk.raw").display()
    );
    let record = format!(
        "read from the undo record of point {p2}, {}",
        undo.display()
    );
    for (log, opens) in [(log_since(&blog, b0), 3), (log_since(&tlog, t0), 1)] {
        for p in &points {
            for b in [4, 10] {
                let line = format!("point {p}, disk.raw: the block at byte {} ", b * BS);
                let lines: Vec<&str> = log.lines().filter(|l| l.contains(&line)).collect();
                if !bad.iter().any(|x| x.0 == p && x.1 == b) {
                    assert!(lines.is_empty(), "{line:?} logged, though clean:\n{log}");
                    continue;
                }
                assert_eq!(lines.len(), opens, "{line:?} in:\n{log}");
                let from = if b == 4 { &latest } else { &record };
                for l in lines {
                    assert!(
                        l.contains("ERROR")
                            && l.contains("does not match its BLAKE3")
                            && l.contains(from.as_str()),
                        "{l}"
                    );
                }
            }
        }
    }

    // A resync compares the latest files with the primary by the BLAKE3 of their bytes,
    // so it sends the corrupt block again: the new point reads clean. The points before
    // it that read the block from the latest file still fail: the new undo record keeps
    // the block as the replica held it, with the entry the primary sent.
    ok(drfs().arg("ship").arg(&f.store).arg("--resync"));
    let p4 = r.latest();
    r.snapshot(&p4);
    r.check_latest();
    let points = [p1.clone(), p2.clone(), p3.clone(), p4];
    every_block_of_every_point(&r, &br, &tf, &points, &bad);
}

/// Grows `p` to `size` bytes without writing (truncate up).
fn grow(p: &Path, size: u64) {
    fs::OpenOptions::new()
        .write(true)
        .open(p)
        .unwrap()
        .set_len(size)
        .unwrap();
}

#[test]
#[cfg_attr(not(drfs_root), ignore = "mounts FUSE filesystems: run as root")]
fn files_that_grow_past_a_partial_last_block_restore_verified() {
    // The primary sends nothing for the old last block of a growing file, but the block
    // grows by zeros and its BLAKE3 with it: the replica must bring its entry along (and
    // keep the old one for the points before), or a clean replica fails its own check.
    let r = Rep::new("grow", "manual", "all:1h");
    let f = &r.f;
    let (a, b, c) = (f.m("a.raw"), f.m("b.raw"), f.m("c.raw"));
    fs::write(&a, vec![7u8; 100_000]).unwrap();
    fs::write(&b, vec![8u8; 100_000]).unwrap();
    fs::write(&c, vec![9u8; 1000]).unwrap();
    let p1 = r.ship();
    grow(&a, 300_000);
    let w = fs::OpenOptions::new().write(true).open(&b).unwrap();
    std::os::unix::fs::FileExt::write_all_at(&w, b"gap", M).unwrap();
    grow(&c, 2000);
    let p2 = r.ship();
    // The grown block changes: the next point's undo record saves it with its new entry.
    let w = fs::OpenOptions::new().write(true).open(&a).unwrap();
    std::os::unix::fs::FileExt::write_all_at(&w, b"later", 99_000).unwrap();
    grow(&c, 70_000);
    let p3 = r.ship();
    for p in [&p1, &p2, &p3] {
        r.check_point(p);
    }
}

fn du_kib(p: &Path) -> u64 {
    fs::metadata(p).unwrap().blocks() / 2
}

#[test]
#[cfg_attr(not(drfs_root), ignore = "mounts FUSE filesystems: run as root")]
fn restore_is_exact_sparse_verified_and_shows_progress() {
    let r = Rep::new("restore", "manual", "all:1h,hourly:24h");
    let f = &r.f;
    let sparse = f.m("vm/sparse.raw");
    fs::create_dir(f.m("vm")).unwrap();
    fs::File::create(&sparse).unwrap().set_len(2 << 30).unwrap();
    for off in [0, 700 * M, 2047 * M] {
        random_at(&sparse, off, M);
    }
    random_at(&f.m("vm/small.raw"), 0, 2 * M);
    fs::write(f.m("vm/vm.xml"), b"<domain/>").unwrap();
    let p1 = r.ship();
    random_at(&sparse, 0, 4 * M);
    fs::remove_file(f.m("vm/small.raw")).unwrap();
    let p2 = r.ship();

    // Whole points: equal to the copies, and as sparse as the originals.
    for p in [&p1, &p2] {
        let got = r.restore(p);
        same_tree(&r.snaps.join(p), &got, &format!("restored point {p}"));
        let (a, b) = (
            du_kib(&r.snaps.join(p).join("vm/sparse.raw")),
            du_kib(&got.join("vm/sparse.raw")),
        );
        assert!(
            b <= a,
            "restored sparse.raw of point {p} takes {b} KiB, the original {a} KiB"
        );
        assert!(
            b >= 3 * 1024,
            "restored sparse.raw is missing data: {b} KiB"
        );
    }
    // One file of an older point, to a new name.
    let one = f.root.join("one.raw");
    ok(drfs()
        .arg("restore")
        .arg(&r.replica)
        .args(["--point", &p1, "--path", "vm/small.raw", "--to"])
        .arg(&one));
    assert!(fs::read(&one).unwrap() == fs::read(r.snaps.join(&p1).join("vm/small.raw")).unwrap());
    // Existing files are kept unless --force.
    let again = drfs()
        .arg("restore")
        .arg(&r.replica)
        .args(["--point", &p2, "--path", "vm/small.raw", "--to"])
        .arg(&one)
        .output()
        .unwrap();
    assert!(!again.status.success());
    let xml = f.root.join("vm.xml");
    fs::write(&xml, b"mine").unwrap();
    let refused = drfs()
        .arg("restore")
        .arg(&r.replica)
        .args(["--point", &p2, "--path", "vm/vm.xml", "--to"])
        .arg(&xml)
        .output()
        .unwrap();
    assert!(!refused.status.success());
    assert_eq!(fs::read(&xml).unwrap(), b"mine");
    ok(drfs()
        .arg("restore")
        .arg(&r.replica)
        .args(["--point", &p2, "--path", "vm/vm.xml", "--force", "--to"])
        .arg(&xml));
    assert_eq!(fs::read(&xml).unwrap(), b"<domain/>");

    // A progress bar on a terminal (script gives the command one), none without.
    let tty = f.root.join("tty");
    let out = ok(Command::new(need("script"))
        .args(["-qec"])
        .arg(format!(
            "{} restore {} --point {p1} --to {}",
            BIN,
            r.replica.display(),
            tty.display()
        ))
        .arg("/dev/null"));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("restoring"),
        "no progress on a terminal: {text:?}"
    );
    same_tree(&r.snaps.join(&p1), &tty, "restored on a terminal");
    let plain = f.root.join("plain");
    let out = ok(drfs()
        .arg("restore")
        .arg(&r.replica)
        .args(["--point", &p1, "--to"])
        .arg(&plain));
    assert!(
        out.stderr.is_empty(),
        "progress without a terminal: {:?}",
        out.stderr
    );

    // A flipped byte in the replica is caught; nothing half-written is left.
    let victim = r.replica.join("vm/sparse.raw");
    let file = fs::OpenOptions::new().write(true).open(&victim).unwrap();
    std::os::unix::fs::FileExt::write_all_at(&file, b"X", 700 * M + 12345).unwrap();
    file.sync_all().unwrap();
    let bad = f.root.join("bad");
    let out = drfs()
        .arg("restore")
        .arg(&r.replica)
        .args(["--point", &p2, "--to"])
        .arg(&bad)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "a corrupt block restored: {err}");
    assert!(
        err.contains("BLAKE3") && err.trim_end().lines().count() == 1,
        "{err:?}"
    );
    assert!(!bad.exists(), "a failed restore left {}", bad.display());
}

/// Everything under `dir` (names and sizes), to show a refused command changed nothing.
fn tree(dir: &Path) -> Vec<(PathBuf, u64)> {
    let mut out = Vec::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        for e in fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            let m = fs::symlink_metadata(&p).unwrap();
            if m.is_dir() {
                todo.push(p.clone());
            }
            out.push((p, if m.is_dir() { 0 } else { m.len() }));
        }
    }
    out.sort();
    out
}

#[test]
#[cfg_attr(not(drfs_root), ignore = "mounts FUSE filesystems: run as root")]
fn bad_input_to_browse_restore_and_test_failover() {
    let r = Rep::new("badview", "manual", "all:1h,hourly:24h");
    let f = &r.f;
    random_at(&f.m("disk.raw"), 0, M);
    let p1 = r.ship();
    let rep = r.replica.as_os_str();
    let before = tree(&r.replica);
    let not_replica = f.root.join("plain");
    fs::create_dir(&not_replica).unwrap();
    let dest = f.root.join("dest");
    let (np, d) = (not_replica.as_os_str(), dest.as_os_str());
    let mp = f.mountpoint("mp");

    // Unknown point.
    fails(
        run(&[os("restore"), rep, os("--point"), os("nope"), os("--to"), d]),
        "no point nope",
    );
    fails(
        run(&[
            os("test-failover"),
            rep,
            os("--point"),
            os("nope"),
            os("--at"),
            d,
        ]),
        "no point nope",
    );
    assert!(!dest.exists(), "a refused command made {}", dest.display());
    // Not a replica.
    for args in [
        vec![os("browse"), np, mp.as_os_str()],
        vec![os("restore"), np, os("--point"), os(&p1), os("--to"), d],
        vec![
            os("test-failover"),
            np,
            os("--point"),
            os(&p1),
            os("--at"),
            d,
        ],
        vec![os("points"), np],
    ] {
        fails(run(&args), "not a drfs replica");
    }
    fails(
        run(&[
            os("browse"),
            f.root.join("missing").as_os_str(),
            mp.as_os_str(),
        ]),
        "missing",
    );
    // Destinations inside the replica.
    let inside = r.replica.join("restored");
    fails(
        run(&[
            os("restore"),
            rep,
            os("--point"),
            os(&p1),
            os("--to"),
            inside.as_os_str(),
        ]),
        "inside the replica",
    );
    fails(
        run(&[
            os("test-failover"),
            rep,
            os("--point"),
            os(&p1),
            os("--at"),
            inside.as_os_str(),
        ]),
        "inside the replica",
    );
    fs::create_dir(r.replica.join("mnt-inside")).unwrap();
    fails(
        run(&[os("browse"), rep, r.replica.join("mnt-inside").as_os_str()]),
        "inside the replica",
    );
    fs::remove_dir(r.replica.join("mnt-inside")).unwrap();
    fails(
        run(&[os("test-failover"), rep, os("--stop")]),
        "no test failover",
    );
    assert_eq!(
        before,
        tree(&r.replica),
        "a refused command changed the replica"
    );
    assert!(!dest.exists());

    // One test failover at a time.
    let tf = f.mountpoint("failover");
    ok(drfs()
        .arg("test-failover")
        .arg(&r.replica)
        .args(["--point", &p1, "--at"])
        .arg(&tf));
    let second = f.root.join("second");
    fails(
        run(&[
            os("test-failover"),
            rep,
            os("--point"),
            os(&p1),
            os("--at"),
            second.as_os_str(),
        ]),
        "already running",
    );
    assert!(!second.exists());
    assert!(
        fs::read(tf.join("disk.raw")).unwrap()
            == fs::read(r.snaps.join(&p1).join("disk.raw")).unwrap()
    );
    let status = ok(drfs().arg("status").arg(&r.replica));
    assert!(
        String::from_utf8_lossy(&status.stdout)
            .contains(&format!("point {p1} at {}", tf.display())),
        "status does not show the test failover"
    );
    ok(drfs().arg("test-failover").arg(&r.replica).arg("--stop"));
}
