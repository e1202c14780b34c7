//! The command line under bad input and odd situations: every error is one line on stderr
//! with a non-zero exit, and nothing is left mounted or changed. Also: a stale mount left
//! by a killed daemon is replaced, a busy mount is not unmounted (unless --lazy), and
//! --foreground serves until unmounted.

mod common;

use std::fs;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;

#[test]
#[cfg_attr(not(drfs_root), ignore = "mounts FUSE filesystems: run as root")]
fn bad_mount_arguments_get_one_line_errors() {
    let f = Fixture::new("badargs");
    let (s, m) = (f.store.as_os_str(), f.mnt.as_os_str());
    fails(
        run(&[os("mount"), f.root.join("nope").as_os_str(), m]),
        "nope",
    );
    fs::write(f.root.join("afile"), b"x").unwrap();
    fails(
        run(&[os("mount"), s, f.root.join("afile").as_os_str()]),
        "not a directory",
    );
    fails(
        run(&[os("mount"), f.root.join("afile").as_os_str(), m]),
        "not a directory",
    );
    fails(
        run(&[os("mount"), s, f.root.join("nodir").as_os_str()]),
        "nodir",
    );
    fs::write(f.mnt.join("junk"), b"x").unwrap();
    fails(run(&[os("mount"), s, m]), "not empty");
    fs::remove_file(f.mnt.join("junk")).unwrap();
    fails(
        run(&[os("mount"), s, f.store.join("inner").as_os_str()]),
        "inner",
    );
    fs::create_dir(f.s("inner")).unwrap();
    fails(
        run(&[os("mount"), s, f.store.join("inner").as_os_str()]),
        "must not contain",
    );
    fails(
        run(&[os("mount"), s, m, os("--block-size"), os("3000")]),
        "power of two",
    );
    fails(
        run(&[os("mount"), s, m, os("--threads"), os("0")]),
        "--threads",
    );
    let out = run(&[os("mount"), s, m, os("--bogus")]);
    assert_eq!(out.status.code(), Some(2));
    fails(out, "--bogus");
    fails(run(&[os("frobnicate")]), "frobnicate");
    assert!(!is_mounted(&f.mnt));
    assert!(!f.s(".drfs").exists(), "a failed mount left state behind");
}

#[test]
#[cfg_attr(not(drfs_root), ignore = "mounts FUSE filesystems: run as root")]
fn a_mounted_store_cannot_be_mounted_twice() {
    let f = Fixture::new("twice");
    f.mount(&["--block-size", "64K"]);
    let other = f.root.join("other");
    fs::create_dir(&other).unwrap();
    fails(
        run(&[os("mount"), f.store.as_os_str(), other.as_os_str()]),
        "already mounted",
    );
    fails(
        run(&[os("mount"), f.root.as_os_str(), f.mnt.as_os_str()]),
        "already a drfs mount",
    );
    assert!(!is_mounted(&other));
    f.unmount();
    fails(
        run(&[
            os("mount"),
            f.store.as_os_str(),
            f.mnt.as_os_str(),
            os("--block-size"),
            os("4K"),
        ]),
        "block-size",
    );
    assert!(!is_mounted(&f.mnt));
}

#[test]
#[cfg_attr(not(drfs_root), ignore = "mounts FUSE filesystems: run as root")]
fn other_commands_reject_bad_input() {
    let f = Fixture::new("badcmd");
    fails(
        run(&[os("changes"), f.store.as_os_str()]),
        "not a drfs store",
    );
    fails(
        run(&[os("changes"), f.root.join("nope").as_os_str()]),
        "nope",
    );
    fails(run(&[os("unmount"), f.mnt.as_os_str()]), "not mounted");
    fails(
        run(&[os("unmount"), f.root.join("nope").as_os_str()]),
        "nope",
    );
    f.mount(&[]);
    fails(
        run(&[os("changes"), f.store.as_os_str(), os("/etc/passwd")]),
        "not inside store",
    );
    f.unmount();
}

#[test]
#[cfg_attr(not(drfs_root), ignore = "mounts FUSE filesystems: run as root")]
fn a_stale_mount_is_replaced() {
    let f = Fixture::new("stale");
    f.mount(&[]);
    fs::write(f.m("a"), b"before").unwrap();
    f.kill_daemon();
    assert!(is_mounted(&f.mnt), "the stale mount is still there");
    let err = fs::read(f.m("a")).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::ENOTCONN));
    let out = ok(drfs().arg("mount").arg(&f.store).arg(&f.mnt));
    assert!(String::from_utf8_lossy(&out.stderr).contains("stale"));
    assert_eq!(fs::read(f.m("a")).unwrap(), b"before");
    let log = f.changes()["log"].to_string();
    assert!(log.contains("daemon killed"), "{log}");
    f.unmount();
}

#[test]
#[cfg_attr(not(drfs_root), ignore = "mounts FUSE filesystems: run as root")]
fn busy_mounts_stay_mounted_unless_lazy() {
    let f = Fixture::new("busy");
    f.mount(&[]);
    let held = fs::File::create(f.m("held")).unwrap();
    fails(run(&[os("unmount"), f.mnt.as_os_str()]), "busy");
    assert!(is_mounted(&f.mnt));
    ok(drfs().arg("unmount").arg("--lazy").arg(&f.mnt));
    assert!(!is_mounted(&f.mnt));
    let pids = daemons_of(&f.mnt);
    assert_eq!(
        pids.len(),
        1,
        "the daemon serves the open file until it is closed"
    );
    drop(held);
    assert!(
        wait_gone(pids[0], Duration::from_secs(10)),
        "daemon did not stop after the last close"
    );
    assert!(f.s(".drfs/clean.json").exists(), "no clean stop recorded");
}

#[test]
#[cfg_attr(not(drfs_root), ignore = "mounts FUSE filesystems: run as root")]
fn foreground_serves_until_unmounted() {
    let f = Fixture::new("fg");
    let mut child = drfs()
        .arg("mount")
        .arg("--foreground")
        .arg(&f.store)
        .arg(&f.mnt)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !is_mounted(&f.mnt) {
        assert!(
            std::time::Instant::now() < deadline,
            "foreground mount never appeared"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    fs::write(f.m("x"), b"x").unwrap();
    ok(Command::new("umount").arg(&f.mnt));
    let status = child.wait().unwrap();
    assert!(status.success(), "foreground daemon exited with {status}");
    assert!(f.s(".drfs/clean.json").exists());
    assert_eq!(f.file_changes("x")["dirty"], serde_json::json!([[0, 1]]));
}

#[test]
#[cfg_attr(not(drfs_root), ignore = "mounts FUSE filesystems: run as root")]
fn the_mount_helper_translates_fstab_options() {
    let f = Fixture::new("helper");
    let helper = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("mount/mount.drfs");
    ok(Command::new(&helper)
        .env("DRFS", BIN)
        .arg(&f.store)
        .arg(&f.mnt)
        .args([
            "-o",
            "rw,allow_other,block_size=4K,threads=4,nofail,x-systemd.automount",
        ]));
    assert!(is_mounted(&f.mnt));
    let cfg = fs::read_to_string(f.s(".drfs/state.toml")).unwrap();
    assert!(cfg.contains("block_size = 4096"), "{cfg}");
    let info = fs::read_to_string("/proc/self/mountinfo").unwrap();
    let line = info
        .lines()
        .find(|l| l.contains(f.mnt.to_str().unwrap()))
        .unwrap();
    assert!(line.contains("allow_other"), "{line}");
    let pids = daemons_of(&f.mnt);
    ok(Command::new("umount").arg(&f.mnt));
    for p in pids {
        assert!(wait_gone(p, Duration::from_secs(10)));
    }
    assert!(
        f.s(".drfs/clean.json").exists(),
        "umount must stop drfs cleanly"
    );
}

#[test]
#[cfg_attr(not(drfs_root), ignore = "mounts FUSE filesystems: run as root")]
fn replication_commands_reject_bad_input() {
    let f = Fixture::new("badrep");
    let (s, rep) = (f.store.as_os_str(), f.root.join("replica"));
    fs::create_dir(&rep).unwrap();
    let protect = |extra: &[&str]| {
        let mut c = drfs();
        c.arg("protect").arg(&f.store).args(extra);
        c.output().unwrap()
    };
    let r = rep.to_str().unwrap();
    fails(
        protect(&["--to", "/nonexistent/replica"]),
        "/nonexistent/replica",
    );
    fails(protect(&["--to", r, "--interval", "0"]), "interval");
    fails(protect(&["--to", r, "--interval", "fast"]), "interval");
    fails(protect(&["--to", r, "--keep", "hourly"]), "retention rule");
    fails(protect(&["--to", r, "--keep", "yearly:3d"]), "yearly");
    fails(protect(&["--to", r, "--group", "vm"]), "--group");
    fails(
        protect(&["--to", f.store.join("sub").to_str().unwrap()]),
        "sub",
    );
    fs::create_dir(f.s("inner")).unwrap();
    fails(
        protect(&["--to", f.s("inner").to_str().unwrap()]),
        "must not contain",
    );
    assert!(
        fs::read_dir(&rep).unwrap().next().is_none(),
        "a refused protect touched the replica"
    );
    fails(run(&[os("ship"), s]), "not a drfs store");
    ok(drfs()
        .arg("protect")
        .arg(&f.store)
        .arg("--to")
        .arg(&rep)
        .args(["--interval", "manual"]));
    // A second store may not take the first one's replica.
    let other = f.root.join("other");
    fs::create_dir(&other).unwrap();
    let out = drfs()
        .arg("protect")
        .arg(&other)
        .arg("--to")
        .arg(&rep)
        .output()
        .unwrap();
    fails(out, "another store");
    let cfg = fs::read_to_string(other.join(".drfs/state.toml")).unwrap_or_default();
    assert!(!cfg.contains("[replication]"), "{cfg}");
    let out = drfs().arg("ship").arg(&other).output().unwrap();
    assert_eq!(
        out.status.code(),
        Some(2),
        "an unprotected store cannot ship"
    );
    fails(out, "not protected");
    fails(run(&[os("points"), f.store.as_os_str()]), "not a replica");
    fails(
        run(&[os("points"), f.root.join("nope").as_os_str()]),
        "nope",
    );
    fails(
        run(&[os("status"), f.root.join("nope").as_os_str()]),
        "nope",
    );
    ok(drfs().arg("ship").arg(&f.store));
    let dest = f.root.join("dest");
    fails(
        run(&[
            os("restore"),
            rep.as_os_str(),
            os("--point"),
            os("99999999"),
            os("--to"),
            dest.as_os_str(),
        ]),
        "no point 99999999",
    );
    fails(
        run(&[
            os("restore"),
            rep.as_os_str(),
            os("--point"),
            os("00000001"),
            os("--to"),
            rep.join("x").as_os_str(),
        ]),
        "inside the replica",
    );
    assert!(!dest.exists());
}
