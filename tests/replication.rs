//! Replication end to end: a protected, mounted store written by real clients (qemu-io,
//! fio, dd, and plain file operations: renames, deletes, truncates, chmod, new files), a
//! cycle after each round. After every cycle the replica's latest files equal the primary;
//! at the end every retained point, rebuilt from the latest files and undo records, is
//! byte-identical to a copy of the primary taken at its cut.

mod common;

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::process::Command;

use common::rep::*;
use common::*;

fn qemu_io(args: &[&str], img: &std::path::Path) {
    ok(Command::new(need("qemu-io")).args(args).arg(img));
}

#[test]
#[cfg_attr(not(drfs_root), ignore = "mounts FUSE filesystems: run as root")]
fn cycles_keep_the_replica_latest_and_every_point_exact() {
    let r = Rep::new("e2e", "manual", "all:1h,hourly:24h");
    let f = &r.f;
    // Round 1: a VM store with a raw and a qcow2 disk, written with O_DIRECT.
    fs::create_dir(f.m("vm1")).unwrap();
    ok(Command::new(need("qemu-img"))
        .args(["create", "-q", "-f", "raw"])
        .arg(f.m("vm1/disk0.raw"))
        .arg("128M"));
    ok(Command::new(need("qemu-img"))
        .args(["create", "-q", "-f", "qcow2"])
        .arg(f.m("vm1/disk1.qcow2"))
        .arg("1G"));
    qemu_io(
        &[
            "-f",
            "raw",
            "-t",
            "none",
            "-c",
            "write -P 0xab 0 8M",
            "-c",
            "write -P 0xcd 64M 64k",
        ],
        &f.m("vm1/disk0.raw"),
    );
    qemu_io(
        &[
            "-f",
            "qcow2",
            "-t",
            "none",
            "-c",
            "write -P 0x11 0 4M",
            "-c",
            "write -P 0x22 512M 1M",
        ],
        &f.m("vm1/disk1.qcow2"),
    );
    fs::write(f.m("vm1/vm.xml"), b"<domain/>").unwrap();
    std::os::unix::fs::symlink("disk0.raw", f.m("vm1/current")).unwrap();
    let p1 = r.ship();
    r.check_latest();

    // Round 2: overwrite, fio random writes, rename, delete, truncate, chmod, a new disk.
    qemu_io(
        &[
            "-f",
            "raw",
            "-t",
            "none",
            "-c",
            "write -P 0xef 4M 8M",
            "-c",
            "write -z 100M 1M",
        ],
        &f.m("vm1/disk0.raw"),
    );
    ok(Command::new(need("fio"))
        .arg(format!("--directory={}", f.mnt.display()))
        .args([
            "--name=w",
            "--filename=vm1/fio.img",
            "--size=32M",
            "--rw=randwrite",
            "--bs=4k",
            "--direct=1",
        ])
        .args([
            "--ioengine=libaio",
            "--iodepth=8",
            "--io_size=8M",
            "--randrepeat=1",
            "--output-format=terse",
        ]));
    fs::rename(f.m("vm1/vm.xml"), f.m("vm1/vm-renamed.xml")).unwrap();
    fs::set_permissions(f.m("vm1/vm-renamed.xml"), fs::Permissions::from_mode(0o600)).unwrap();
    fs::create_dir(f.m("vm2")).unwrap();
    sh(&format!(
        "dd if=/dev/urandom of={} bs=64k count=40 status=none",
        f.m("vm2/new.raw").display()
    ));
    let p2 = r.ship();
    r.check_latest();

    // Round 3: delete a disk, truncate another down, grow a third, a deep folder.
    fs::remove_file(f.m("vm1/disk1.qcow2")).unwrap();
    fs::OpenOptions::new()
        .write(true)
        .open(f.m("vm1/disk0.raw"))
        .unwrap()
        .set_len(70 << 20)
        .unwrap();
    fs::OpenOptions::new()
        .write(true)
        .open(f.m("vm2/new.raw"))
        .unwrap()
        .set_len(10 << 20)
        .unwrap();
    fs::create_dir_all(f.m("vm2/a/b/c")).unwrap();
    fs::write(f.m("vm2/a/b/c/deep.txt"), b"deep").unwrap();
    fs::remove_file(f.m("vm1/current")).unwrap();
    std::os::unix::fs::symlink("fio.img", f.m("vm1/current")).unwrap();
    let p3 = r.ship();
    r.check_latest();

    // Round 4: nothing changed: an empty cycle is still a point.
    let p4 = r.ship();
    r.check_latest();

    let ids: Vec<String> = r
        .points()
        .iter()
        .map(|p| p["id"].as_str().unwrap().to_string())
        .collect();
    for p in [&p1, &p2, &p3, &p4] {
        assert!(ids.contains(p), "point {p} missing from {ids:?}");
        r.check_point(p);
    }
    // The JSON contract of `drfs points`.
    let newest = &r.points()[0];
    for k in [
        "id",
        "time",
        "consistency",
        "generation",
        "files",
        "bytes_changed",
    ] {
        assert!(newest.get(k).is_some(), "points --json lacks {k}: {newest}");
    }
    assert_eq!(newest["consistency"], "crash");
    assert!(newest["time"].as_str().unwrap().ends_with('Z'));
    // `drfs status` on both sides.
    let st: serde_json::Value =
        serde_json::from_slice(&ok(drfs().arg("status").arg(&f.store).arg("--json")).stdout)
            .unwrap();
    assert_eq!(st["health"], "normal", "{st:#}");
    assert_eq!(st["last_point"], p4);
    let st: serde_json::Value =
        serde_json::from_slice(&ok(drfs().arg("status").arg(&r.replica).arg("--json")).stdout)
            .unwrap();
    assert_eq!(st["points"], 4);
    // The replica's own state is root's alone, though the daemon that ran the receiver
    // has umask 0.
    let loose = sh(&format!(
        "find {} -perm /022 -printf '%m %p\\n'",
        r.replica.join(".drfs").display()
    ));
    assert!(
        loose.stdout.is_empty(),
        "group/other-writable replica state:\n{}",
        String::from_utf8_lossy(&loose.stdout)
    );
    f.unmount();
}

#[test]
#[cfg_attr(not(drfs_root), ignore = "mounts FUSE filesystems: run as root")]
fn retention_drops_oldest_and_merges_intermediate_points() {
    let r = Rep::new("keep", "manual", "all:1h,hourly:24h");
    let f = &r.f;
    let w = |name: &str, off: u64, byte: u8| {
        let file = fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(false)
            .open(f.m(name))
            .unwrap();
        std::os::unix::fs::FileExt::write_all_at(&file, &vec![byte; 200_000], off).unwrap();
    };
    w("a.img", 0, 1);
    w("b.img", 0, 9);
    let p1 = r.ship();
    w("a.img", 100_000, 2);
    fs::remove_file(f.m("b.img")).unwrap();
    let p2 = r.ship();
    w("a.img", 50_000, 3);
    w("c.img", 0, 7);
    let p3 = r.ship();
    // Age the points: p1 alone in an older hour; p2 and p3 in one hour (so p2, older
    // there, goes: an intermediate point, merged into p1).
    let hour = 3_600_000_000_000i64;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as i64;
    let base = now - now.rem_euclid(hour);
    for (id, t) in [
        (&p1, base - 5 * hour + 600_000_000_000),
        (&p2, base - 3 * hour + 600_000_000_000),
        (&p3, base - 3 * hour + 1_200_000_000_000),
    ] {
        let p = r.replica.join(format!(".drfs/points/{id}/point.json"));
        let mut v: serde_json::Value = serde_json::from_slice(&fs::read(&p).unwrap()).unwrap();
        v["time_ns"] = serde_json::json!(t);
        fs::write(&p, v.to_string()).unwrap();
    }
    let latest_before = fs::read(r.replica.join("a.img")).unwrap();
    w("a.img", 0, 4);
    let p4 = r.ship();
    let ids: Vec<String> = r
        .points()
        .iter()
        .map(|p| p["id"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(
        ids,
        vec![p4.clone(), p3.clone(), p1.clone()],
        "p2 should be pruned"
    );
    r.check_point(&p1);
    r.check_point(&p3);
    r.check_point(&p4);
    r.check_latest();
    assert_ne!(latest_before, fs::read(r.replica.join("a.img")).unwrap());
    // The oldest goes with its undo record and nothing else: age p1 beyond a day.
    let p = r.replica.join(format!(".drfs/points/{p1}/point.json"));
    let mut v: serde_json::Value = serde_json::from_slice(&fs::read(&p).unwrap()).unwrap();
    v["time_ns"] = serde_json::json!(now - 30 * hour);
    fs::write(&p, v.to_string()).unwrap();
    let p5 = r.ship();
    let ids: Vec<String> = r
        .points()
        .iter()
        .map(|p| p["id"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(ids, vec![p5.clone(), p4.clone(), p3.clone()]);
    assert!(!r.replica.join(format!(".drfs/points/{p1}")).exists());
    r.check_point(&p3);
    r.check_point(&p4);
    f.unmount();
}

#[test]
#[cfg_attr(not(drfs_root), ignore = "mounts FUSE filesystems: run as root")]
fn a_sigkill_under_writes_costs_the_next_cycle_only_the_marked_blocks() {
    const SIZE: u64 = 1 << 30;
    let r = Rep::new("kill-ship", "manual", "all:1h");
    let f = &r.f;
    fs::File::create(f.m("disk.raw"))
        .unwrap()
        .set_len(SIZE)
        .unwrap();
    qemu_io(
        &["-f", "raw", "-t", "none", "-c", "write -P 0x3c 0 64M"],
        &f.m("disk.raw"),
    );
    r.ship();
    // A VM's steady 4 KiB random writes (qemu cache=none), killed mid-stream.
    let mut fio = Command::new(need("fio"))
        .arg(format!("--filename={}", f.m("disk.raw").display()))
        .args([
            "--name=vm",
            "--rw=randwrite",
            "--bs=4k",
            "--direct=1",
            "--ioengine=libaio",
            "--iodepth=16",
            "--rate_iops=2000",
            "--time_based",
            "--runtime=30",
            "--output-format=terse",
        ])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("fio");
    std::thread::sleep(std::time::Duration::from_millis(1500));
    f.kill_daemon();
    let _ = fio.wait();
    f.mount(&[]);
    let c = f.file_changes("disk.raw");
    assert_eq!(c["needs_resync"], false, "a SIGKILL forced a resync: {c}");
    let marked = f.dirty_blocks("disk.raw").len() as u64 * 65536;
    assert!(marked > 0, "fio wrote nothing before the kill");
    ok(drfs().arg("ship").arg(&f.store));
    let st: serde_json::Value =
        serde_json::from_slice(&fs::read(f.s(".drfs/cycle.json")).unwrap()).unwrap();
    let (sent, data) = (
        st["last"]["bytes"].as_u64().unwrap(),
        st["last"]["data_bytes"].as_u64().unwrap(),
    );
    eprintln!(
        "after the kill: {marked} bytes marked ({:.2} % of the {} MiB disk); the next cycle sent {sent} bytes ({data} of block data): {:.2} % of the disk",
        marked as f64 * 100.0 / SIZE as f64,
        SIZE >> 20,
        sent as f64 * 100.0 / SIZE as f64
    );
    assert!(
        data <= marked,
        "the cycle sent {data} bytes of data, more than the {marked} marked"
    );
    assert!(
        sent <= marked + marked / 50 + (1 << 20),
        "the cycle sent {sent} bytes for {marked} marked"
    );
    r.check_latest();
    f.unmount();
}

/// The pattern the fixture's disk was written with.
fn pat(n: usize, seed: u8) -> Vec<u8> {
    (0..n)
        .map(|i| ((i as u64 * 31 + u64::from(seed)) & 0xff) as u8)
        .collect()
}

#[test]
#[cfg_attr(not(drfs_root), ignore = "mounts FUSE filesystems: run as root")]
fn a_store_and_replica_of_an_older_drfs_mount_ship_and_browse() {
    let f = Fixture::new("compat");
    let tar = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/v1-store-and-replica.tar.gz");
    std::fs::remove_dir(&f.store).unwrap();
    sh(&format!(
        "tar --sparse -xzf {} -C {}",
        tar.display(),
        f.root.display()
    ));
    let replica = f.root.join("replica");
    // What each point held (tests/fixtures/README.md).
    let mut disk1 = vec![0u8; 4 << 20];
    disk1[..1 << 20].copy_from_slice(&pat(1 << 20, 1));
    disk1[3 << 20..(3 << 20) + 65536].copy_from_slice(&pat(65536, 2));
    let mut disk2 = disk1.clone();
    disk2[2 << 20..(2 << 20) + 131072].copy_from_slice(&pat(131072, 3));
    // The replica moved with the store: bind it again where it is now.
    ok(drfs()
        .arg("protect")
        .arg(&f.store)
        .arg("--to")
        .arg(&replica)
        .arg("--rebind"));
    f.mount(&[]);
    assert_eq!(fs::read(f.m("vm1/disk.raw")).unwrap(), disk2);
    let file = fs::OpenOptions::new()
        .write(true)
        .open(f.m("vm1/disk.raw"))
        .unwrap();
    std::os::unix::fs::FileExt::write_all_at(&file, &pat(65536, 4), 1 << 20).unwrap();
    drop(file);
    let mut disk3 = disk2.clone();
    disk3[1 << 20..(1 << 20) + 65536].copy_from_slice(&pat(65536, 4));
    ok(drfs().arg("ship").arg(&f.store));
    // The tar copy gave the files new inodes: the mount found them as new files (new
    // ids), so this cycle sent them whole; what matters here is that it applied.
    let points: serde_json::Value =
        serde_json::from_slice(&ok(drfs().arg("points").arg(&replica).arg("--json")).stdout)
            .unwrap();
    let ids: Vec<&str> = points
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["00000003", "00000002", "00000001"]);
    let br = f.mountpoint("points");
    ok(drfs().arg("browse").arg(&replica).arg(&br));
    for (id, disk) in [
        ("00000001", &disk1),
        ("00000002", &disk2),
        ("00000003", &disk3),
    ] {
        let p = br.join("points").join(id);
        assert!(
            fs::read(p.join("vm1/disk.raw")).unwrap() == *disk,
            "point {id}"
        );
        assert_eq!(
            fs::read_link(p.join("vm1/current")).unwrap(),
            std::path::Path::new("disk.raw")
        );
        assert_eq!(p.join("vm1/notes.txt").exists(), id != "00000001");
    }
    ok(drfs().arg("unmount").arg(&br));
    ok(drfs().arg("status").arg(&f.store));
    ok(drfs().arg("status").arg(&replica));
    f.unmount();
}

const MIB: u64 = 1 << 20;

/// A protected store holding a 64 MiB disk of data, shipped.
fn disk_shipped(name: &str) -> Rep {
    let r = Rep::new(name, "manual", "all:1h");
    fs::File::create(r.f.m("disk.raw"))
        .unwrap()
        .set_len(64 * MIB)
        .unwrap();
    qemu_io(
        &["-f", "raw", "-t", "none", "-c", "write -P 0x3c 0 64M"],
        &r.f.m("disk.raw"),
    );
    r.ship();
    r
}

fn figures(f: &Fixture) -> (u64, u64, u64) {
    let l = last_cycle(f);
    let n = |k: &str| l[k].as_u64().unwrap();
    (n("bytes"), n("data_bytes"), n("partial_blocks"))
}

#[test]
#[cfg_attr(not(drfs_root), ignore = "mounts FUSE filesystems: run as root")]
fn a_cycle_ships_the_4k_pieces_that_changed_once_and_other_changes_whole() {
    let r = disk_shipped("pieces");
    let (f, disk) = (&r.f, r.f.m("disk.raw"));
    // 2000 scattered 4 KiB writes, a tenth of them written three times, and one piece
    // zeroed: 64 KiB tracking blocks, but only the pieces travel, each once.
    let offs = random_pieces(64 * MIB, 2000, 11);
    let mut pieces = write_direct(&disk, &offs, 4096, 1);
    write_direct(&disk, &offs[..200], 4096, 2);
    write_direct(&disk, &offs[..200], 4096, 3);
    let zeroed = 1000 * 65536 + 4096 * 5;
    std::os::unix::fs::FileExt::write_all_at(
        &fs::OpenOptions::new().write(true).open(&disk).unwrap(),
        &[0u8; 4096],
        zeroed,
    )
    .unwrap();
    let zero_new = pieces.insert(zeroed / 4096);
    let id = r.ship();
    let (sent, data, partial) = figures(f);
    let changed = pieces.len() as u64 * 4096;
    eprintln!(
        "4 KiB writes: {changed} bytes changed, {sent} sent ({data} of data, {partial} partial blocks): {:.3} per byte changed",
        sent as f64 / changed as f64
    );
    assert!(partial > 0, "no block travelled as pieces");
    assert!(
        data <= changed && data + 8192 >= changed - u64::from(zero_new) * 4096,
        "{data} bytes of data for {changed} changed"
    );
    assert!(
        sent as f64 <= 1.1 * changed as f64,
        "{sent} bytes sent for {changed} changed"
    );
    r.check_latest();
    r.check_point(&id);
    // 1 MiB sequential writes: whole blocks, nothing more.
    let seq: Vec<u64> = (0..16).map(|i| i * MIB).collect();
    write_direct(&disk, &seq, MIB as usize, 4);
    let id2 = r.ship();
    let (sent, data, partial) = figures(f);
    eprintln!("1 MiB writes: 16 MiB changed, {sent} bytes sent");
    assert_eq!((data, partial), (16 * MIB, 0));
    assert!(sent as f64 <= 1.01 * (16 * MIB) as f64, "{sent} sent");
    // A piece written, then a hole punched in the same block; a piece written, then the
    // file cut inside its block: changes that record no pieces, so both blocks go whole.
    write_direct(&disk, &[40 * MIB + 4096], 4096, 5);
    let fd = fs::OpenOptions::new().write(true).open(&disk).unwrap();
    let punch = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
    let rc = unsafe {
        libc::fallocate(
            std::os::fd::AsRawFd::as_raw_fd(&fd),
            punch,
            (40 * MIB + 32768) as i64,
            8192,
        )
    };
    assert_eq!(rc, 0, "punch hole");
    write_direct(&disk, &[64 * MIB - 65536], 4096, 6);
    fd.set_len(64 * MIB - 8192).unwrap();
    drop(fd);
    let id3 = r.ship();
    let (_, data, partial) = figures(f);
    assert_eq!(partial, 0, "a punched or cut block travelled as pieces");
    assert_eq!(data, 65536 + 65536 - 8192, "the two blocks whole");
    r.check_latest();
    for id in [&id, &id2, &id3] {
        r.check_point(id);
    }
    f.unmount();
}

#[test]
#[cfg_attr(not(drfs_root), ignore = "mounts FUSE filesystems: run as root")]
fn a_receiver_of_protocol_2_is_sent_whole_blocks() {
    let r = disk_shipped("wire2");
    let f = &r.f;
    // The daemon starts the receiver, which inherits this: it speaks at most version 2.
    f.unmount();
    ok(drfs()
        .env("DRFS_WIRE_MAX", "2")
        .arg("mount")
        .arg(&f.store)
        .arg(&f.mnt));
    let offs = random_pieces(64 * MIB, 100, 5);
    write_direct(&f.m("disk.raw"), &offs, 4096, 7);
    let blocks: std::collections::BTreeSet<u64> = offs.iter().map(|o| o / 65536).collect();
    let id = r.ship();
    let (_, data, partial) = figures(f);
    assert_eq!(partial, 0, "partial blocks to a version 2 receiver");
    assert_eq!(data, blocks.len() as u64 * 65536);
    r.check_latest();
    r.check_point(&id);
    f.unmount();
}

#[test]
#[cfg_attr(not(drfs_root), ignore = "mounts FUSE filesystems: run as root")]
fn fsx_under_a_cycle_a_second_leaves_the_replica_equal() {
    // fsx's writes, mapped writes, truncates, punches and fallocates in blocks that
    // cycles a second apart ship as pieces or whole.
    let r = Rep::new("fsx-cycles", "1s", "last:3");
    let f = &r.f;
    let art = f.root.join("fsx-art");
    fs::create_dir(&art).unwrap();
    // A 16 MiB file and operations up to 16 KiB: most blocks a cycle ships are partly
    // written; every kind of operation is in the mix.
    let cfg = f.root.join("fsx.toml");
    fs::write(&cfg, "flen = 16777216\n[opsize]\nmax = 16384\n").unwrap();
    let ops = std::env::var("DRFS_FSX_OPS").unwrap_or_else(|_| "10000".into());
    let out = ok(Command::new(need("fsx"))
        .arg("-f")
        .arg(&cfg)
        .args(["-N", &ops, "-S", "7", "-P"])
        .arg(&art)
        .arg(f.m("fsx.dat")));
    assert!(String::from_utf8_lossy(&out.stdout).contains("A-OK"));
    r.ship();
    r.check_latest();
    let st: serde_json::Value =
        serde_json::from_slice(&fs::read(f.s(".drfs/cycle.json")).unwrap()).unwrap();
    let t = &st["totals"];
    eprintln!(
        "{} cycles, {} blocks as pieces",
        t["cycles"], t["partial_blocks"]
    );
    assert!(
        t["partial_blocks"].as_u64().unwrap() > 0,
        "no block went as pieces"
    );
    // The latest files' blocks against the entries the applies wrote for them.
    ok(drfs().arg("verify").arg(&r.replica));
    f.unmount();
}
