//! Failover, failback and reprotect on real mounts: unplanned failover to the newest and
//! older points (rolled back in place, at a cost of the blocks between them), changes
//! of point, commit, the split-brain guard, planned failover with reverse replication and
//! failback with no resync, reprotect of a diverged old primary (only differing blocks
//! travel, its writes kept as a `diverged` point, readable through browse), a SIGKILL at
//! every step of a planned failover and of a reprotect, and bad input.

mod common;

use std::fs;
use std::path::Path;
use std::process::Output;

use common::rep::{Rep, diverged_point, same_tree, same_tree_excluding_state};
use common::*;

const M: u64 = 1 << 20;
const G: u64 = 1 << 30;

fn random_at(p: &Path, off: u64, len: u64) {
    sh(&format!(
        "dd if=/dev/urandom of={} bs=64k seek={} count={} conv=notrunc status=none",
        p.display(),
        off / 65536,
        len / 65536
    ));
}

fn sparse(p: &Path, size: u64) {
    fs::File::create(p).unwrap().set_len(size).unwrap();
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// The figure before `what` in a line of `drfs failover` output ("12.0 MiB" → bytes).
fn bytes_in(text: &str, what: &str) -> u64 {
    let at = text
        .find(what)
        .unwrap_or_else(|| panic!("{what:?} not in {text:?}"));
    let words: Vec<&str> = text[..at].split_whitespace().collect();
    let (n, unit) = (words[words.len() - 2], words[words.len() - 1]);
    let n: f64 = n.trim_start_matches('(').parse().unwrap();
    let mul = match unit {
        "B" | "bytes" => 1.0,
        "KiB" => 1024.0,
        "MiB" => M as f64,
        "GiB" => G as f64,
        u => panic!("unit {u} in {text:?}"),
    };
    (n * mul) as u64
}

/// Runs a cycle of `store`; the bytes it sent, and its record.
fn ship_sent(store: &Path) -> (u64, serde_json::Value) {
    ok(drfs().arg("ship").arg(store));
    // A primary's cycles, or a replica's onward ones.
    let state = ["cycle.json", "relay.json"]
        .iter()
        .map(|n| store.join(".drfs").join(n))
        .find(|p| p.exists())
        .unwrap();
    let st: serde_json::Value = serde_json::from_slice(&fs::read(state).unwrap()).unwrap();
    (st["last"]["bytes"].as_u64().unwrap(), st["last"].clone())
}

fn failover(dir: &Path, extra: &[&str]) -> std::process::Command {
    let mut c = drfs();
    c.arg("failover").arg(dir).args(extra);
    c
}

fn status_json(p: &Path) -> serde_json::Value {
    let out = ok(drfs().arg("status").arg(p).arg("--json"));
    serde_json::from_slice(&out.stdout).unwrap()
}

fn points_json(p: &Path) -> Vec<serde_json::Value> {
    let out = ok(drfs().arg("points").arg(p).arg("--json"));
    serde_json::from_slice(&out.stdout).unwrap()
}

/// A primary with three points on a 4 GiB sparse disk: p1 (16 MiB written, a.txt),
/// p2 (8 MiB rewritten, a.txt deleted, b.txt created), p3 (4 MiB more, vm/c.txt).
fn three_points(name: &str) -> (Rep, [String; 3]) {
    let r = Rep::new(name, "manual", "all:1d");
    let f = &r.f;
    let disk = f.m("disk.raw");
    sparse(&disk, 4 * G);
    random_at(&disk, 0, 8 * M);
    random_at(&disk, 2 * G, 8 * M);
    fs::write(f.m("a.txt"), b"in p1 only\n").unwrap();
    let p1 = r.ship();
    random_at(&disk, 4 * M, 8 * M);
    fs::remove_file(f.m("a.txt")).unwrap();
    fs::write(f.m("b.txt"), b"from p2 on\n").unwrap();
    let p2 = r.ship();
    random_at(&disk, 3 * G, 4 * M);
    fs::create_dir(f.m("vm")).unwrap();
    fs::write(f.m("vm/c.txt"), b"p3\n").unwrap();
    let p3 = r.ship();
    f.unmount();
    (r, [p1, p2, p3])
}

/// Every data block of the replica's latest file `name` has a piece record, and it is the
/// block's (a roll-back copies them from the undo records its blocks come from).
fn piece_records_match(replica: &Path, name: &str) {
    use drfs::replica::posix::{Replica, pieces};
    use std::os::unix::fs::FileExt;
    let r = Replica::open_only(replica).unwrap();
    let latest = r.latest().unwrap().unwrap();
    let m = r.manifest(&latest.id).unwrap();
    let e = m
        .entries
        .iter()
        .find(|e| e.path.to_string() == name)
        .unwrap();
    let bs = r.cfg.block_size;
    let cv = pieces::Pieces::open_ro(&r.hash_file(e.id.unwrap()), bs).unwrap();
    let f = fs::File::open(replica.join(name)).unwrap();
    let mut holes = drfs::sys::Holes::new(&f);
    let (mut buf, mut checked) = (vec![0u8; bs as usize], 0);
    for b in 0..e.size.div_ceil(bs) {
        let len = (e.size - b * bs).min(bs);
        if holes.hole(b * bs, len) {
            continue;
        }
        let data = &mut buf[..len as usize];
        f.read_exact_at(data, b * bs).unwrap();
        if drfs::sys::is_zero(data) {
            continue;
        }
        let rec = cv.get(b, len.div_ceil(pieces::PIECE)).unwrap();
        assert!(
            rec == Some(pieces::of(data)),
            "{name}: the piece record of block {b} is not the block's"
        );
        checked += 1;
    }
    assert!(checked > 0, "{name}: no data block");
}

#[test]
#[cfg_attr(not(drfs_root), ignore = "mounts FUSE filesystems: run as root")]
fn unplanned_failover_rolls_back_in_place_and_the_point_can_change_until_commit() {
    let (r, [p1, p2, p3]) = three_points("unplanned");
    let rep = &r.replica;
    // To an older point: the files are p1's; what was rewritten is the blocks between.
    let out = ok(&mut failover(rep, &["--point", &p1]));
    let text = stdout(&out);
    println!("{text}");
    same_tree_excluding_state(&r.snaps.join(&p1), rep, "failed over to p1");
    piece_records_match(rep, "disk.raw");
    let rewritten = bytes_in(&text, "rewritten");
    println!("failover to p1 of a 4 GiB disk rewrote {rewritten} bytes");
    assert!(
        rewritten <= 13 * M,
        "rewrote {rewritten} bytes: more than the 12 MiB written after p1"
    );
    // Newer points stay, and so does the history of what the failover did.
    let pts = points_json(rep);
    for p in [&p1, &p2, &p3] {
        assert!(pts.iter().any(|x| x["id"] == p.as_str()), "{p} gone");
    }
    assert_eq!(pts[0]["restores"], p1.as_str(), "{pts:?}");
    // Change of point, twice, before mounting.
    ok(&mut failover(rep, &["--point", &p2]));
    same_tree_excluding_state(&r.snaps.join(&p2), rep, "changed to p2");
    piece_records_match(rep, "disk.raw");
    let out = ok(&mut failover(rep, &[]));
    println!("{}", stdout(&out));
    same_tree_excluding_state(&r.snaps.join(&p3), rep, "changed to the newest");
    r.check_point(&p1);
    // Once more to p2, then the promoted store is a primary: it mounts, its files are
    // trusted, and it is written.
    ok(&mut failover(rep, &["--point", &p2]));
    let st = status_json(rep);
    println!("{st:#}");
    let mnt2 = r.f.mountpoint("mnt2");
    ok(drfs().arg("mount").arg(rep).arg(&mnt2));
    let c = ok(drfs().arg("changes").arg(rep).arg("--json"));
    let c: serde_json::Value = serde_json::from_slice(&c.stdout).unwrap();
    for f in c["files"].as_array().unwrap() {
        assert_eq!(f["needs_resync"], false, "{f}");
    }
    random_at(&mnt2.join("disk.raw"), 64 * M, M);
    ok(drfs().arg("unmount").arg(&mnt2));
    ok(&mut failover(rep, &["--commit"]));
    fails(
        failover(rep, &["--point", &p3]).output().unwrap(),
        "was committed",
    );
    // The history is still browsable.
    assert!(points_json(rep).len() >= 3);
    // Each failover, change of point and the commit is an event, in order.
    let out = ok(drfs().arg("events").arg(rep).arg("--json"));
    let text = stdout(&out);
    let news: Vec<String> = text
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .chain(serde_json::from_str::<Vec<serde_json::Value>>(&text).unwrap_or_default())
        .filter(|e| e["kind"] == "failover")
        .map(|e| e["new"].as_str().unwrap_or("").to_string())
        .collect();
    assert_eq!(
        news,
        [
            "promoted",
            "promoted",
            "promoted",
            "promoted",
            "promoted (committed)"
        ],
        "{text}"
    );
}

/// Fails over to `point`, mounts the promoted store and writes through the mount: blocks
/// of the point rewritten whole and in part, a hole filled, a file replaced by a rename,
/// one created, the disk cut shorter and renamed; the daemon is SIGKILLed halfway and the store
/// mounted again, and the same blocks written once more. Returns a copy of the files as
/// the VMs left them.
fn written_after_failover(r: &Rep, point: &str, name: &str) -> std::path::PathBuf {
    ok(&mut failover(&r.replica, &["--point", point]));
    let mnt2 = r.f.mountpoint(name);
    ok(drfs().arg("mount").arg(&r.replica).arg(&mnt2));
    let disk = mnt2.join("disk.raw");
    random_at(&disk, 4 * M, 2 * M);
    random_at(&disk, 64 * M, M);
    let part = |off: u64| {
        sh(&format!(
            "dd if=/dev/urandom of={} bs=4k seek={} count=1 conv=notrunc oflag=direct status=none",
            disk.display(),
            off / 4096
        ))
    };
    part(2 * G + 3 * 4096);
    fs::write(mnt2.join("tmp.txt"), b"replaced after the failover\n").unwrap();
    fs::rename(mnt2.join("tmp.txt"), mnt2.join("b.txt")).unwrap();
    // A crash of the daemon: the copies made so far are found again, not made twice.
    for pid in daemons_of(&mnt2) {
        unsafe { libc::kill(pid, libc::SIGKILL) };
        assert!(wait_gone(pid, std::time::Duration::from_secs(10)));
    }
    release(&mnt2);
    ok(drfs().arg("mount").arg(&r.replica).arg(&mnt2));
    random_at(&disk, 4 * M, M);
    part(2 * G + 3 * 4096);
    part(5 * 4096);
    fs::write(mnt2.join("n.txt"), b"new after the failover\n").unwrap();
    fs::OpenOptions::new()
        .write(true)
        .open(&disk)
        .unwrap()
        .set_len(2 * G + 4 * M + 100)
        .unwrap();
    fs::rename(&disk, mnt2.join("vm.raw")).unwrap();
    ok(drfs().arg("unmount").arg(&mnt2));
    let dst = r.snaps.join(name);
    fs::create_dir(&dst).unwrap();
    sh(&format!(
        "cd {} && tar --sparse --exclude=./.drfs -cf - . | tar -C {} -xpf -",
        r.replica.display(),
        dst.display()
    ));
    dst
}

/// The point tagged diverged on `dir` reads as `want` (through `drfs restore`).
fn diverged_point_is(r: &Rep, want: &Path, what: &str) {
    let pts = points_json(&r.replica);
    let d: Vec<_> = pts.iter().filter(|p| p["diverged"] == true).collect();
    assert_eq!(d.len(), 1, "{what}: {pts:?}");
    let got = r.restore(d[0]["id"].as_str().unwrap());
    same_tree(want, &got, what);
}

#[test]
#[cfg_attr(not(drfs_root), ignore = "mounts FUSE filesystems: run as root")]
fn a_change_of_point_after_the_promoted_store_was_written_keeps_the_writes_as_a_diverged_point() {
    let (r, [p1, p2, p3]) = three_points("diverge");
    let written = written_after_failover(&r, &p2, "written");
    assert!(r.replica.join(".drfs/history/point").exists());
    let out = ok(&mut failover(&r.replica, &["--point", &p1]));
    let text = stdout(&out);
    println!("{text}");
    assert!(text.contains("(diverged"), "{text}");
    same_tree_excluding_state(&r.snaps.join(&p1), &r.replica, "changed to p1");
    piece_records_match(&r.replica, "disk.raw");
    // What the VMs wrote is a point; every other point reads as it was (p2's blocks the
    // VMs overwrote come from the copies the mounts kept).
    diverged_point_is(&r, &written, "the diverged point");
    for p in [&p1, &p2, &p3] {
        r.check_point(p);
    }
    // The newer points stay reachable; no mount since, so nothing more is kept.
    ok(&mut failover(&r.replica, &["--point", &p3]));
    same_tree_excluding_state(&r.snaps.join(&p3), &r.replica, "then to p3");
    diverged_point_is(&r, &written, "the diverged point, after another change");
    // Commit ends the choice, and the copies.
    ok(&mut failover(&r.replica, &["--commit"]));
    assert!(!r.replica.join(".drfs/history").exists());
    fails(
        failover(&r.replica, &["--point", &p1]).output().unwrap(),
        "was committed",
    );
    // A committed store's mount keeps no copies.
    let mnt3 = r.f.mountpoint("mnt3");
    ok(drfs().arg("mount").arg(&r.replica).arg(&mnt3));
    random_at(&mnt3.join("disk.raw"), 0, M);
    ok(drfs().arg("unmount").arg(&mnt3));
    assert!(!r.replica.join(".drfs/history").exists());
}

#[test]
#[cfg_attr(not(drfs_root), ignore = "mounts FUSE filesystems: run as root")]
fn a_change_of_point_is_refused_when_the_promoted_store_was_changed_behind_drfs() {
    let (r, [p1, p2, _]) = three_points("divergebehind");
    let written = written_after_failover(&r, &p2, "written");
    // Unmounted, a block of p2 the VMs never wrote is changed directly: p2's content
    // there is nowhere any more.
    flip(&r.replica.join("vm.raw"), 10 * M + 7);
    let before = points_json(&r.replica);
    fails(
        failover(&r.replica, &["--point", &p1]).output().unwrap(),
        "vm.raw: block 160 changed without its content at point",
    );
    assert_eq!(points_json(&r.replica), before, "a point changed");
    flip(&r.replica.join("vm.raw"), 10 * M + 7);
    same_tree_excluding_state(&written, &r.replica, "the files after the refusal");
    // Committing keeps what the VMs wrote.
    ok(&mut failover(&r.replica, &["--commit"]));
}

#[test]
#[cfg_attr(not(drfs_root), ignore = "mounts FUSE filesystems: run as root")]
fn a_change_of_point_after_writes_killed_at_any_step_completes_when_run_again() {
    for fault in [
        "diverge:planned",
        "diverge:undone",
        "diverge:indexed",
        "diverge:published",
        "apply:undo",
        "failover:rolled-back",
    ] {
        let (r, [p1, p2, _]) = three_points("divergekill");
        let written = written_after_failover(&r, &p2, "written");
        killed_failing_over(&r, &p1, fault);
        if fault == "diverge:undone" {
            let mnt2 = r.f.mountpoint("early");
            fails(
                drfs()
                    .arg("mount")
                    .arg(&r.replica)
                    .arg(&mnt2)
                    .output()
                    .unwrap(),
                "was interrupted",
            );
            fails(
                failover(&r.replica, &["--commit"]).output().unwrap(),
                "was interrupted",
            );
        }
        let out = ok(&mut failover(&r.replica, &["--point", &p1]));
        println!("{fault}: {}", stdout(&out).trim());
        same_tree_excluding_state(&r.snaps.join(&p1), &r.replica, fault);
        diverged_point_is(&r, &written, fault);
        r.check_point(&p2);
    }
}

#[test]
#[cfg_attr(not(drfs_root), ignore = "mounts FUSE filesystems: run as root")]
fn the_old_primary_is_refused_once_its_replica_was_promoted() {
    let (r, [_, _, p3]) = three_points("splitbrain");
    ok(&mut failover(&r.replica, &[]));
    let before = points_json(&r.replica).len();
    r.f.mount(&[]);
    random_at(&r.f.m("disk.raw"), 0, M);
    let out = r.ship_output();
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    fails(out, "was promoted");
    let st = status_json(&r.f.store);
    assert_eq!(st["health"], "critical", "{st:#}");
    assert_eq!(points_json(&r.replica).len(), before, "a point was added");
    same_tree_excluding_state(&r.snaps.join(&p3), &r.replica, "the promoted store");
    // Reprotect in the wrong direction: the old primary was not promoted.
    r.f.unmount();
    let out = drfs()
        .arg("reprotect")
        .arg(&r.f.store)
        .arg("--to")
        .arg(&r.replica)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    fails(out, "was not promoted by a failover");
}

#[test]
#[cfg_attr(not(drfs_root), ignore = "mounts FUSE filesystems: run as root")]
fn planned_failover_reverses_replication_and_failback_needs_no_resync() {
    let r = Rep::new("planned", "manual", "all:1d");
    let f = &r.f;
    let disk = f.m("disk.raw");
    sparse(&disk, 4 * G);
    random_at(&disk, 0, 16 * M);
    sh(&format!(
        "qemu-img create -q -f qcow2 {base} 256M && qemu-io -f qcow2 -c 'write -P 7 0 8M' {base} >/dev/null && qemu-img create -q -f qcow2 -F qcow2 -b base.qcow2 {top} && qemu-io -f qcow2 -c 'write -P 9 1M 2M' {top} >/dev/null",
        base = f.m("base.qcow2").display(),
        top = f.m("top.qcow2").display()
    ));
    r.ship();
    // Writes up to the stop.
    random_at(&disk, 32 * M, 4 * M);
    sh(&format!(
        "qemu-io -f qcow2 -t none -c 'write -P 5 4M 1M' {} >/dev/null",
        f.m("top.qcow2").display()
    ));
    f.unmount();
    let out = ok(&mut failover(&f.store, &["--planned"]));
    println!("{}", stdout(&out));
    // The new primary's files are the old primary's, byte for byte.
    same_tree_excluding_state(&f.store, &r.replica, "after the planned failover");
    // The old primary is a replica now: it does not mount, it has the point.
    fails(
        drfs()
            .arg("mount")
            .arg(&f.store)
            .arg(&f.mnt)
            .output()
            .unwrap(),
        "replica",
    );
    assert_eq!(points_json(&f.store).len(), 1);
    // The new primary mounts, is written, and its cycle ships only the new writes.
    let mnt2 = f.mountpoint("mnt2");
    ok(drfs().arg("mount").arg(&r.replica).arg(&mnt2));
    random_at(&mnt2.join("disk.raw"), G, 2 * M);
    let (sent, v) = ship_sent(&r.replica);
    println!("first cycle back after the planned failover sent {sent} bytes for 2 MiB written");
    assert!(sent <= 3 * M, "sent {sent} bytes for 2 MiB of writes: {v}");
    ok(drfs().arg("unmount").arg(&mnt2));
    same_tree_excluding_state(&r.replica, &f.store, "the old primary after a cycle back");
    // Failback: a planned failover the other way returns the original direction.
    ok(&mut failover(&r.replica, &["--planned"]));
    f.mount(&[]);
    random_at(&f.m("disk.raw"), 3 * G, M);
    let (sent, v) = ship_sent(&f.store);
    println!("first cycle after failback sent {sent} bytes for 1 MiB written");
    assert!(sent <= 2 * M, "sent {sent}: {v}");
    f.unmount();
    r.check_latest();
    let st = status_json(&f.store);
    println!("{st:#}");
}

#[test]
#[cfg_attr(not(drfs_root), ignore = "mounts FUSE filesystems: run as root")]
fn reprotect_sends_only_differing_blocks_and_keeps_the_diverged_writes() {
    let r = Rep::new("reprotect", "manual", "all:1d");
    let f = &r.f;
    let disk = f.m("disk.raw");
    sparse(&disk, 4 * G);
    random_at(&disk, 0, 32 * M);
    fs::write(f.m("a.txt"), b"shipped\n").unwrap();
    r.ship();
    // The primary goes on writing after its last cycle: this never reaches the replica.
    random_at(&disk, 100 * M, 4 * M);
    fs::write(f.m("new.txt"), b"written after the last cycle\n").unwrap();
    fs::remove_file(f.m("a.txt")).unwrap();
    r.snapshot("diverged");
    f.unmount();
    // Disaster: fail over to the newest point, and the new primary is written.
    ok(&mut failover(&r.replica, &[]));
    let mnt2 = f.mountpoint("mnt2");
    ok(drfs().arg("mount").arg(&r.replica).arg(&mnt2));
    random_at(&mnt2.join("disk.raw"), 200 * M, 2 * M);
    ok(drfs().arg("unmount").arg(&mnt2));
    // The old primary comes back: reprotect makes it the new primary's replica.
    let out = ok(drfs()
        .arg("reprotect")
        .arg(&r.replica)
        .arg("--to")
        .arg(&f.store));
    let text = stdout(&out);
    println!("{text}");
    let sent = bytes_in(&text, "(point");
    let differing = 6 * M + 64 * 1024;
    println!(
        "reprotect sent {sent} bytes; differing {differing}; disk {} (1 %: {})",
        4 * G,
        4 * G / 100
    );
    assert!(sent <= differing + 4 * G / 100, "sent {sent}");
    same_tree_excluding_state(&r.replica, &f.store, "the old primary after reprotect");
    // What it held is a point tagged diverged, readable through browse.
    let br = f.mountpoint("browse");
    ok(drfs().arg("browse").arg(&f.store).arg(&br));
    let at = br.join("points").join(diverged_point(&f.store));
    same_tree(&r.snaps.join("diverged"), &at, "the diverged point");
    ok(drfs().arg("unmount").arg(&br));
    // Onto a directory that is not the old primary: refused.
    let other = f.root.join("other");
    fs::create_dir(&other).unwrap();
    fails(
        drfs()
            .arg("reprotect")
            .arg(&r.replica)
            .arg("--to")
            .arg(&other)
            .output()
            .unwrap(),
        "is not a drfs store",
    );
}

#[test]
#[cfg_attr(not(drfs_root), ignore = "mounts FUSE filesystems: run as root")]
fn bad_input_to_failover_is_one_line_and_changes_nothing() {
    let (r, _) = three_points("badfailover");
    let empty = r.f.root.join("empty");
    fs::create_dir(&empty).unwrap();
    let out = failover(&empty, &[]).output().unwrap();
    assert_eq!(out.status.code(), Some(64));
    fails(out, "not a drfs replica");
    let out = failover(&r.replica, &["--point", "99999999"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    fails(out, "no point 99999999");
    let out = failover(&r.replica, &["--commit"]).output().unwrap();
    fails(out, "not failed over");
    let out = failover(&r.f.root.join("nowhere"), &[]).output().unwrap();
    assert_eq!(out.status.code(), Some(64));
    // A planned failover of a mounted store with a file open for writing is refused,
    // names the file, and leaves the store mounted, unlocked and writable.
    r.f.mount(&[]);
    let vm = fs::OpenOptions::new()
        .write(true)
        .open(r.f.m("disk.raw"))
        .unwrap();
    let out = failover(&r.f.store, &["--planned"]).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    fails(out, "open for writing through the mount at");
    let cfg = fs::read_to_string(r.f.s(".drfs/state.toml")).unwrap();
    assert!(!cfg.contains("[locked]"), "{cfg}");
    std::os::unix::fs::FileExt::write_all_at(&vm, &[7u8; 4096], 0).unwrap();
    drop(vm);
    random_at(&r.f.m("disk.raw"), 0, M);
    r.ship();
    r.f.unmount();
    same_tree_excluding_state(&r.f.store, &r.replica, "after the refusals");
}

#[test]
#[cfg_attr(not(drfs_root), ignore = "mounts FUSE filesystems: run as root")]
fn a_corrupt_undo_record_stops_a_failover_before_anything_changes() {
    let (r, [p1, _, p3]) = three_points("corruptundo");
    // p1's record holds the disk's blocks p2 overwrote (4-12 MiB; 4-8 MiB were data at
    // p1): a roll-back to p1 takes them from there.
    let undo = r.replica.join(format!(".drfs/points/{p1}/undo"));
    let disk = fs::read_dir(&undo)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "data"))
        .max_by_key(|p| fs::metadata(p).unwrap().len())
        .unwrap();
    flip(&disk, 5 * M + 4321);
    let out = failover(&r.replica, &["--point", &p1]).output().unwrap();
    println!("{}", String::from_utf8_lossy(&out.stderr));
    fails(out, "does not match its BLAKE3; nothing was changed");
    same_tree_excluding_state(&r.snaps.join(&p3), &r.replica, "after the refusal");
    assert!(
        !fs::read_to_string(r.replica.join(".drfs/state.toml"))
            .unwrap()
            .contains("[promoted]")
    );
    // To the newest point nothing is rolled back: the failover still works.
    ok(&mut failover(&r.replica, &[]));
    same_tree_excluding_state(&r.snaps.join(&p3), &r.replica, "failed over to p3");
}

/// An operation on a locked mount: refused with EROFS.
fn read_only(what: &str, r: std::io::Result<impl Sized>) {
    match r {
        Err(e) => assert_eq!(e.raw_os_error(), Some(libc::EROFS), "{what}: {e}"),
        Ok(_) => panic!("{what} succeeded on a locked mount"),
    }
}

#[test]
#[cfg_attr(not(drfs_root), ignore = "mounts FUSE filesystems: run as root")]
fn a_planned_failover_of_a_mounted_store_locks_it_read_only_and_ends_its_mount() {
    for fault in [
        "planned:locked",
        "planned:promoted",
        "planned:unmounted",
        "",
    ] {
        let r = Rep::new("plannedmounted", "manual", "all:1d");
        let disk = r.f.m("disk.raw");
        sparse(&disk, 256 * M);
        random_at(&disk, 0, 8 * M);
        r.ship();
        // Written, not shipped: the final cycle ships it.
        random_at(&disk, 16 * M, 2 * M);
        fs::write(r.f.m("notes.txt"), b"last words\n").unwrap();
        // A reader (a backup agent) keeps a file open: the lock does not wait for it,
        // the end of the mount does.
        let reader =
            (fault != "planned:unmounted").then(|| fs::File::open(r.f.m("notes.txt")).unwrap());
        if !fault.is_empty() {
            killed_at(
                &[os("failover"), r.f.store.as_os_str(), os("--planned")],
                fault,
            );
            one_accepting_primary(&r);
        }
        if fault == "planned:locked" {
            // Locked: the mount serves reads and refuses every change.
            assert_eq!(fs::read(r.f.m("notes.txt")).unwrap(), b"last words\n");
            read_only(
                "open for writing",
                fs::OpenOptions::new().write(true).open(&disk),
            );
            read_only("create", fs::File::create(r.f.m("new.txt")));
            read_only("mkdir", fs::create_dir(r.f.m("dir")));
            read_only("rename", fs::rename(r.f.m("notes.txt"), r.f.m("n.txt")));
            read_only("unlink", fs::remove_file(r.f.m("notes.txt")));
            read_only(
                "truncate",
                sh_result(&format!("truncate -s 0 {}", disk.display())),
            );
            let out = ok(drfs().arg("status").arg(&r.f.store));
            assert!(stdout(&out).contains("locked"), "{}", stdout(&out));
        }
        if fault != "planned:unmounted" {
            // The reader holds the old primary's mount: the switch waits for it.
            let out = failover(&r.f.store, &["--planned"]).output().unwrap();
            fails(out, "cannot end yet");
            assert!(is_mounted(&r.f.mnt));
            one_accepting_primary(&r);
        }
        drop(reader);
        let out = ok(&mut failover(&r.f.store, &["--planned"]));
        println!("{fault}: {}", stdout(&out).trim());
        assert!(
            !is_mounted(&r.f.mnt),
            "{fault}: the old primary is still mounted"
        );
        same_tree_excluding_state(&r.f.store, &r.replica, fault);
        assert_eq!(
            fs::read(r.replica.join("notes.txt")).unwrap(),
            b"last words\n"
        );
        let st = status_json(&r.f.store);
        assert_eq!(st["role"], "demoted", "{st}");
        // The new primary's cycles flow back, with no resync.
        let mnt2 = r.f.mountpoint("mnt2");
        ok(drfs().arg("mount").arg(&r.replica).arg(&mnt2));
        random_at(&mnt2.join("disk.raw"), 32 * M, M);
        let (sent, _) = ship_sent(&r.replica);
        assert!(sent < 2 * M, "{fault}: {sent} bytes sent for 1 MiB written");
        ok(drfs().arg("unmount").arg(&mnt2));
        same_tree_excluding_state(&r.replica, &r.f.store, fault);
    }
}

/// A shell command's outcome as an io::Result carrying its errno (from its message).
fn sh_result(script: &str) -> std::io::Result<()> {
    let out = std::process::Command::new("sh")
        .arg("-c")
        .arg(script)
        .output()?;
    if out.status.success() {
        return Ok(());
    }
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("Read-only file system"), "{err}");
    Err(std::io::Error::from_raw_os_error(libc::EROFS))
}

/// Runs `drfs ARGS` with `DRFS_FAULT=fault`: it must die of it (SIGKILL).
fn killed_at(args: &[&std::ffi::OsStr], fault: &str) {
    let out = drfs().args(args).env("DRFS_FAULT", fault).output().unwrap();
    assert!(
        !out.status.success(),
        "did not stop at {fault}: {}",
        String::from_utf8_lossy(&out.stdout)
    );
}

/// `drfs failover REPLICA --point P`, killed at `fault`.
fn killed_failing_over(r: &Rep, point: &str, fault: &str) {
    killed_at(
        &[
            os("failover"),
            r.replica.as_os_str(),
            os("--point"),
            os(point),
        ],
        fault,
    );
}

/// Never two primaries that both accept: the replica refuses cycles once promoted, and a
/// locked or demoted store does not mount as a primary.
fn one_accepting_primary(r: &Rep) {
    let store_cfg = fs::read_to_string(r.f.store.join(".drfs/state.toml")).unwrap();
    let rep_cfg = fs::read_to_string(r.replica.join(".drfs/state.toml")).unwrap();
    let store_open = store_cfg.contains("role = \"primary\"") && !store_cfg.contains("[locked]");
    let rep_primary = rep_cfg.contains("role = \"primary\"");
    assert!(
        !(store_open && rep_primary),
        "two primaries:\n{store_cfg}\n{rep_cfg}"
    );
}

#[test]
#[cfg_attr(not(drfs_root), ignore = "mounts FUSE filesystems: run as root")]
fn a_planned_failover_killed_at_any_step_completes_when_run_again() {
    for fault in [
        "planned:locked",
        "apply:undo",
        "planned:shipped",
        "failover:seeded",
        "planned:promoted",
        "planned:reversed",
        "planned:adopted",
    ] {
        let r = Rep::new("plannedkill", "manual", "all:1d");
        let disk = r.f.m("disk.raw");
        sparse(&disk, 256 * M);
        random_at(&disk, 0, 8 * M);
        r.ship();
        random_at(&disk, 16 * M, 2 * M);
        r.f.unmount();
        killed_at(
            &[os("failover"), r.f.store.as_os_str(), os("--planned")],
            fault,
        );
        one_accepting_primary(&r);
        let out = ok(&mut failover(&r.f.store, &["--planned"]));
        println!("{fault}: {}", stdout(&out).trim());
        same_tree_excluding_state(&r.f.store, &r.replica, fault);
        // The new primary's cycles flow back.
        let mnt2 = r.f.mountpoint("mnt2");
        ok(drfs().arg("mount").arg(&r.replica).arg(&mnt2));
        random_at(&mnt2.join("disk.raw"), 32 * M, M);
        ok(drfs().arg("ship").arg(&r.replica));
        ok(drfs().arg("unmount").arg(&mnt2));
        same_tree_excluding_state(&r.replica, &r.f.store, fault);
    }
}

#[test]
#[cfg_attr(not(drfs_root), ignore = "mounts FUSE filesystems: run as root")]
fn an_unplanned_failover_and_a_reprotect_killed_at_any_step_complete_when_run_again() {
    // The roll-back's blocks are staged by reference to the undo records: killed in
    // the apply's place and data phases, it rolls forward from the records.
    for fault in [
        "apply:sealed",
        "apply:undo",
        "apply:place",
        "apply:data-file",
        "apply:data",
        "failover:rolled-back",
        "failover:seeded",
    ] {
        let (r, [p1, _, _]) = three_points("unplannedkill");
        killed_failing_over(&r, &p1, fault);
        ok(&mut failover(&r.replica, &["--point", &p1]));
        same_tree_excluding_state(&r.snaps.join(&p1), &r.replica, fault);
    }
    for fault in [
        "reprotect:adopted",
        "reprotect:demoted",
        "reprotect:protected",
        "apply:undo",
    ] {
        let (r, _) = three_points("reprotectkill");
        r.f.mount(&[]);
        random_at(&r.f.m("disk.raw"), 0, M);
        r.f.unmount();
        ok(&mut failover(&r.replica, &[]));
        killed_at(
            &[
                os("reprotect"),
                r.replica.as_os_str(),
                os("--to"),
                r.f.store.as_os_str(),
            ],
            fault,
        );
        // The promoted store refuses the old primary's cycles throughout.
        let rep_cfg = fs::read_to_string(r.replica.join(".drfs/state.toml")).unwrap();
        assert!(rep_cfg.contains("[promoted]"), "{fault}: {rep_cfg}");
        let out = ok(drfs()
            .arg("reprotect")
            .arg(&r.replica)
            .arg("--to")
            .arg(&r.f.store));
        println!("{fault}: {}", stdout(&out).trim());
        same_tree_excluding_state(&r.replica, &r.f.store, fault);
        assert!(
            points_json(&r.f.store)
                .iter()
                .any(|p| p["diverged"] == true),
            "{fault}: the diverged point is gone"
        );
    }
}

#[test]
#[cfg_attr(not(drfs_root), ignore = "mounts FUSE filesystems: run as root")]
fn extended_replication_ships_points_onward_and_fails_over_at_the_third_site() {
    let r = Rep::new("extended", "manual", "last:2");
    let f = &r.f;
    let third = f.root.join("third");
    fs::create_dir(&third).unwrap();
    // Onto its own primary: refused.
    fails(
        drfs()
            .arg("protect")
            .arg(&r.replica)
            .arg("--to")
            .arg(&f.store)
            .output()
            .unwrap(),
        "extended replication goes to a third directory",
    );
    let disk = f.m("disk.raw");
    sparse(&disk, 4 * G);
    random_at(&disk, 0, 16 * M);
    fs::write(f.m("a.txt"), b"one\n").unwrap();
    let p1 = r.ship();
    ok(drfs()
        .arg("protect")
        .arg(&r.replica)
        .arg("--to")
        .arg(&third)
        .args(["--interval", "manual", "--keep", "all:1d"]));
    ok(drfs().arg("ship").arg(&r.replica));
    random_at(&disk, G, 4 * M);
    let p2 = r.ship();
    random_at(&disk, 2 * G, 2 * M);
    fs::remove_file(f.m("a.txt")).unwrap();
    let p3 = r.ship();
    // B keeps last:2, but p1 is the base of C's next cycle: it stays.
    let on_b: Vec<String> = points_json(&r.replica)
        .iter()
        .map(|p| p["id"].as_str().unwrap().to_string())
        .collect();
    assert!(on_b.contains(&p1), "B pruned C's base {p1}: {on_b:?}");
    let (data, last) = ship_sent(&r.replica);
    println!("onward cycle p1 -> {p3}: {data} bytes of block data sent, for 6 MiB changed");
    assert!(data <= 6 * M + 64 * 1024, "{last}");
    // Every point of C is the same point of B, and A's state at that cut.
    let on_c: Vec<String> = points_json(&third)
        .iter()
        .map(|p| p["id"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(on_c, [p3.clone(), p1.clone()], "C's points");
    for p in [&p1, &p3] {
        let dst = f.root.join(format!("from-c-{p}"));
        ok(drfs()
            .arg("restore")
            .arg(&third)
            .args(["--point", p, "--to"])
            .arg(&dst));
        same_tree(&r.snaps.join(p), &dst, &format!("C's point {p}"));
    }
    // The next cycle into B may now drop p1.
    random_at(&disk, 0, M);
    r.ship();
    assert!(
        !points_json(&r.replica)
            .iter()
            .any(|p| p["id"] == p1.as_str())
    );
    let _ = p2;
    // Failover at the third site.
    ok(&mut failover(&third, &[]));
    same_tree_excluding_state(&r.snaps.join(&p3), &third, "C after its failover");
    f.unmount();
}

/// The page cache's clean pages dropped: the next reads of a FUSE file reach its daemon.
fn drop_caches() {
    sh("sync; echo 3 > /proc/sys/vm/drop_caches");
}

#[test]
#[cfg_attr(not(drfs_root), ignore = "mounts FUSE filesystems: run as root")]
fn points_of_a_promoted_store_read_what_they_held_while_its_vms_write() {
    use std::os::unix::fs::FileExt;
    let (r, [_, _, p3]) = three_points("livebrowse");
    // A browse of the replica, with a file of its newest point held open across the
    // failover (its blocks checked and remembered as the latest file's).
    let br = r.f.mountpoint("browse");
    ok(drfs().arg("browse").arg(&r.replica).arg(&br));
    let point = br.join("points").join(&p3);
    let held = fs::File::open(point.join("disk.raw")).unwrap();
    let mut before = vec![0u8; (8 * M) as usize];
    held.read_exact_at(&mut before, 0).unwrap();
    ok(&mut failover(&r.replica, &[]));
    let mnt2 = r.f.mountpoint("mnt2");
    ok(drfs().arg("mount").arg(&r.replica).arg(&mnt2));
    random_at(&mnt2.join("disk.raw"), 0, 2 * M);
    fs::remove_file(mnt2.join("vm/c.txt")).unwrap();
    drop_caches();
    // Until the commit, what the point held is read from the copies the mount kept.
    let mut again = vec![0u8; before.len()];
    held.read_exact_at(&mut again, 0).unwrap();
    assert!(again == before, "the held file read the VMs' writes");
    same_tree(
        &r.snaps.join(&p3),
        &point,
        "the newest point while its VMs write",
    );
    // Committed, and the copies gone with the next mount: a block the VMs overwrote
    // fails with EIO, never reads as their bytes; the others still read.
    ok(&mut failover(&r.replica, &["--commit"]));
    ok(drfs().arg("unmount").arg(&mnt2));
    ok(drfs().arg("mount").arg(&r.replica).arg(&mnt2));
    ok(drfs().arg("unmount").arg(&mnt2));
    assert!(!r.replica.join(".drfs/history").exists());
    drop_caches();
    let fresh = fs::File::open(point.join("disk.raw")).unwrap();
    let mut b = vec![0u8; 65536];
    let e = fresh.read_exact_at(&mut b, 0).unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::EIO), "{e}");
    fresh.read_exact_at(&mut b, 4 * M).unwrap();
    assert!(b[..] == before[(4 * M) as usize..(4 * M) as usize + 65536]);
    drop(held);
    drop(fresh);
    ok(drfs().arg("unmount").arg(&br));
}
