//! Faults during replication. In each: no point is lost or wrong, the replica holds a
//! whole point (never a mix), and the next cycle completes.
//! - SIGKILL of the daemon mid-cycle;
//! - SIGKILL of `drfs receive` at every step of an apply;
//! - SIGKILL of `drfs receive` mid-transfer, after which the transfer resumes;
//! - a replica on a small filesystem that fills up, then gets space back;
//! - one corrupted byte in the stream.

mod common;

use std::fs;
use std::path::Path;
use std::process::{Command, Output};

use common::rep::*;
use common::*;

fn random_file(p: &Path, mib: u64) {
    sh(&format!("head -c {}M /dev/urandom > {}", mib, p.display()));
}

/// `drfs ship` on an unmounted store, with extra environment for the receiver.
fn ship_env(r: &Rep, env: &[(&str, &str)]) -> Output {
    let mut c = drfs();
    c.arg("ship").arg(&r.f.store);
    for (k, v) in env {
        c.env(k, v);
    }
    c.output().unwrap()
}

fn point_ids(r: &Rep) -> Vec<String> {
    r.points()
        .iter()
        .map(|p| p["id"].as_str().unwrap().to_string())
        .collect()
}

/// Every point matches a snapshot: its own, or (for a point a crash left behind, which
/// carries the same content) the one named in `alias`.
fn check_all(r: &Rep, alias: &[(String, String)]) {
    for id in point_ids(r) {
        let snap = alias
            .iter()
            .find(|(p, _)| *p == id)
            .map(|(_, s)| s.clone())
            .unwrap_or(id.clone());
        let got = r.restore(&id);
        same_tree(&r.snaps.join(&snap), &got, &format!("point {id}"));
        let _ = fs::remove_dir_all(&got);
    }
    r.check_latest();
}

#[test]
#[cfg_attr(not(drfs_root), ignore = "mounts FUSE filesystems: run as root")]
fn daemon_killed_mid_cycle_loses_nothing() {
    let r = Rep::new("killd", "manual", "all:1h");
    random_file(&r.f.m("big.img"), 192);
    r.ship();
    sh(&format!(
        "dd if=/dev/urandom of={} bs=1M count=96 seek=40 conv=notrunc status=none",
        r.f.m("big.img").display()
    ));
    r.snapshot("pre-kill");
    let ship = std::thread::spawn({
        let store = r.f.store.clone();
        move || drfs().arg("ship").arg(&store).output().unwrap()
    });
    std::thread::sleep(std::time::Duration::from_millis(250));
    r.f.kill_daemon();
    let out = ship.join().unwrap();
    assert!(
        !out.status.success(),
        "the ship through a killed daemon cannot have succeeded"
    );
    r.f.mount(&[]);
    let before = point_ids(&r);
    let id = r.ship();
    assert!(!before.contains(&id));
    // The killed cycle may have reached the replica whole (its receiver finishes an apply
    // on its own): such a point holds what the store held after the dd.
    let alias: Vec<(String, String)> = before
        .iter()
        .filter(|p| p.as_str() != "00000001")
        .map(|p| (p.clone(), "pre-kill".to_string()))
        .collect();
    check_all(&r, &alias);
    r.f.unmount();
}

#[test]
#[cfg_attr(not(drfs_root), ignore = "mounts FUSE filesystems: run as root")]
fn receiver_killed_at_every_apply_step() {
    let r = Rep::new("killr", "manual", "all:1h");
    let f = &r.f;
    fs::create_dir(f.m("d")).unwrap();
    random_file(&f.m("d/a.img"), 8);
    random_file(&f.m("b.img"), 4);
    r.ship();
    let phases = [
        "apply:sealed",
        "apply:undo",
        "apply:detach",
        "apply:place",
        "apply:data-file",
        "apply:data",
        "apply:meta",
        "apply:published",
    ];
    let mut alias = Vec::new();
    for (i, phase) in phases.iter().enumerate() {
        // Changes of every kind, through the mount.
        sh(&format!(
            "dd if=/dev/urandom of={} bs=64k count=8 seek={} conv=notrunc status=none",
            f.m("d/a.img").display(),
            i * 10
        ));
        let moved = if i % 2 == 0 {
            ("b.img", "b2.img")
        } else {
            ("b2.img", "b.img")
        };
        fs::rename(f.m(moved.0), f.m(moved.1)).unwrap();
        fs::write(f.m(&format!("new{i}.txt")), format!("file {i}")).unwrap();
        if i > 0 {
            fs::remove_file(f.m(&format!("new{}.txt", i - 1))).unwrap();
        }
        f.unmount();
        let snap = format!("pre-{i}");
        r.snapshot(&snap);
        let before = point_ids(&r);
        let out = ship_env(&r, &[("DRFS_FAULT", phase)]);
        assert!(!out.status.success(), "{phase}: the receiver was to die");
        // The next cycle (its receiver finishes a half-done apply first) completes.
        let out = ship_env(&r, &[]);
        assert!(
            out.status.success(),
            "{phase}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        for id in point_ids(&r) {
            if !before.contains(&id) {
                alias.push((id, snap.clone()));
            }
        }
        check_all(&r, &alias);
        f.mount(&[]);
    }
    f.unmount();
}

#[test]
#[cfg_attr(not(drfs_root), ignore = "mounts FUSE filesystems: run as root")]
fn an_interrupted_transfer_resumes() {
    let r = Rep::new("resume", "manual", "all:1h");
    random_file(&r.f.m("big.img"), 64);
    r.f.unmount();
    r.snapshot("full");
    // The receiver dies after 600 of the 1024 blocks of the initial replication.
    let out = ship_env(&r, &[("DRFS_FAULT", "receive:600")]);
    assert!(!out.status.success());
    assert!(point_ids(&r).is_empty());
    let out = ship_env(&r, &[]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let st: serde_json::Value =
        serde_json::from_slice(&fs::read(r.f.s(".drfs/cycle.json")).unwrap()).unwrap();
    let sent = st["last"]["data_bytes"].as_u64().unwrap();
    assert!(
        sent < 30 << 20,
        "resumed transfer sent {sent} bytes of data; the first 600 blocks were already there"
    );
    let id = point_ids(&r).remove(0);
    check_all(&r, &[(id, "full".into())]);
}

#[test]
#[cfg_attr(not(drfs_root), ignore = "mounts FUSE filesystems: run as root")]
fn a_full_replica_disk_is_recoverable() {
    let f = Fixture::new("full");
    let img = f.root.join("small.img");
    let mnt = f.root.join("small");
    fs::create_dir(&mnt).unwrap();
    make_ext4(&img, 96 << 20, &["-m", "0"]);
    ok(Command::new("mount")
        .args(["-o", "loop"])
        .arg(&img)
        .arg(&mnt));
    let result = std::panic::catch_unwind(|| {
        let replica = mnt.join("replica");
        fs::create_dir(&replica).unwrap();
        random_file(&mnt.join("filler"), 60);
        f.mount(&[]);
        ok(drfs()
            .arg("protect")
            .arg(&f.store)
            .arg("--to")
            .arg(&replica)
            .args(["--interval", "manual"]));
        random_file(&f.m("disk.img"), 40);
        let out = drfs().arg("ship").arg(&f.store).output().unwrap();
        assert_eq!(
            out.status.code(),
            Some(1),
            "a full disk is recoverable: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let st: serde_json::Value =
            serde_json::from_slice(&ok(drfs().arg("status").arg(&f.store).arg("--json")).stdout)
                .unwrap();
        assert_ne!(st["health"], "normal", "{st:#}");
        assert!(
            st["last_error"].as_str().unwrap_or("").contains("space"),
            "{st:#}"
        );
        fs::remove_file(mnt.join("filler")).unwrap();
        let out = drfs().arg("ship").arg(&f.store).output().unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        sh(&format!(
            "cmp {} {}",
            f.s("disk.img").display(),
            replica.join("disk.img").display()
        ));
        let st: serde_json::Value =
            serde_json::from_slice(&ok(drfs().arg("status").arg(&f.store).arg("--json")).stdout)
                .unwrap();
        assert!(st["last_error"].is_null(), "{st:#}");
        f.unmount();
    });
    let _ = Command::new("umount").arg(&mnt).status();
    result.unwrap();
}

#[test]
#[cfg_attr(not(drfs_root), ignore = "mounts FUSE filesystems: run as root")]
fn one_corrupted_byte_is_rejected() {
    let r = Rep::new("corrupt", "manual", "all:1h");
    random_file(&r.f.m("a.img"), 8);
    let p1 = r.ship();
    sh(&format!(
        "dd if=/dev/urandom of={} bs=64k count=16 conv=notrunc status=none",
        r.f.m("a.img").display()
    ));
    r.f.unmount();
    let proxy = Path::new(env!("CARGO_MANIFEST_DIR")).join("tools/flip-byte");
    for offset in [300, 40_000, 700_000] {
        let wrapper = format!("{} {offset} {} receive", proxy.display(), BIN);
        let out = ship_env(&r, &[("DRFS_RECEIVE", &wrapper)]);
        assert_eq!(
            out.status.code(),
            Some(1),
            "byte {offset}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(
            point_ids(&r),
            vec![p1.clone()],
            "a corrupted cycle must not be applied"
        );
        same_tree_excluding_state(
            &r.snaps.join(&p1),
            &r.replica,
            "latest after a rejected cycle",
        );
    }
    let out = ship_env(&r, &[]);
    assert!(out.status.success());
    let p2 = point_ids(&r).remove(0);
    r.snapshot(&p2);
    check_all(&r, &[]);
}
