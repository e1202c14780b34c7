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
    assert_eq!(out.status.code(), Some(64), "a usage error");
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

/// The bytes of every file below `dir` (not `.drfs`), by path.
fn contents(dir: &std::path::Path) -> Vec<(String, Vec<u8>)> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.file_name().is_some_and(|n| n == ".drfs") {
                continue;
            }
            if p.is_dir() {
                stack.push(p);
            } else {
                let rel = p.strip_prefix(dir).unwrap().display().to_string();
                out.push((rel, fs::read(&p).unwrap()));
            }
        }
    }
    out.sort();
    out
}

fn last_cycle(f: &Fixture) -> serde_json::Value {
    let st: serde_json::Value =
        serde_json::from_slice(&fs::read(f.s(".drfs/cycle.json")).unwrap()).unwrap();
    st["last"].clone()
}

fn code(out: &std::process::Output) -> Option<i32> {
    out.status.code()
}

#[test]
#[cfg_attr(not(drfs_root), ignore = "mounts FUSE filesystems: run as root")]
fn protect_refuses_a_directory_that_holds_files_and_seed_uses_them() {
    let f = Fixture::new("seed");
    f.mount(&[]);
    sh(&format!(
        "dd if=/dev/urandom of={} bs=64k count=16 status=none",
        f.m("disk.img").display()
    ));
    let rep = f.root.join("replica");
    fs::create_dir(&rep).unwrap();
    fs::write(rep.join("unrelated.txt"), b"not drfs's business").unwrap();
    // A copy of the disk, two blocks of which are out of date.
    let mut copy = fs::read(f.m("disk.img")).unwrap();
    copy[65536..65536 + 10].fill(0xaa);
    copy[5 * 65536..5 * 65536 + 10].fill(0xbb);
    fs::write(rep.join("disk.img"), &copy).unwrap();
    let before = contents(&rep);
    let out = drfs()
        .arg("protect")
        .arg(&f.store)
        .arg("--to")
        .arg(&rep)
        .output()
        .unwrap();
    assert_eq!(code(&out), Some(2));
    fails(out, "--seed");
    assert_eq!(
        contents(&rep),
        before,
        "a refused protect changed the directory"
    );
    assert!(!rep.join(".drfs").exists());
    ok(drfs()
        .arg("protect")
        .arg(&f.store)
        .arg("--to")
        .arg(&rep)
        .args(["--seed", "--interval", "manual"]));
    ok(drfs().arg("ship").arg(&f.store));
    let data = last_cycle(&f)["data_bytes"].as_u64().unwrap();
    assert_eq!(data, 2 * 65536, "only the two differing blocks travel");
    assert_eq!(
        fs::read(rep.join("disk.img")).unwrap(),
        fs::read(f.s("disk.img")).unwrap()
    );
    assert_eq!(
        fs::read(rep.join("unrelated.txt")).unwrap(),
        b"not drfs's business"
    );
    f.unmount();
}

#[test]
#[cfg_attr(not(drfs_root), ignore = "mounts FUSE filesystems: run as root")]
fn settings_change_one_at_a_time_and_a_rebind_is_asked_for() {
    let f = Fixture::new("settings");
    let (r1, r2) = (f.root.join("r1"), f.root.join("r2"));
    fs::create_dir(&r1).unwrap();
    fs::create_dir(&r2).unwrap();
    let show =
        || String::from_utf8(ok(drfs().arg("protect").arg(&f.store).arg("--show")).stdout).unwrap();
    let out = drfs().arg("protect").arg(&f.store).output().unwrap();
    assert_eq!(code(&out), Some(64));
    fails(out, "--to");
    f.mount(&[]);
    fs::write(f.m("a.img"), b"a").unwrap();
    ok(drfs()
        .arg("protect")
        .arg(&f.store)
        .arg("--to")
        .arg(&r1)
        .args(["--interval", "manual", "--keep", "daily:30d,last:3"]));
    ok(drfs().arg("ship").arg(&f.store));
    ok(drfs()
        .arg("protect")
        .arg(&f.store)
        .args(["--interval", "5m"]));
    let s = show();
    assert!(
        s.contains("every 5m") && s.contains("daily:30d,last:3"),
        "{s}"
    );
    let out = drfs()
        .arg("protect")
        .arg(&f.store)
        .arg("--to")
        .arg(&r2)
        .output()
        .unwrap();
    assert_eq!(code(&out), Some(64));
    fails(out, "--rebind");
    assert!(show().contains(r1.to_str().unwrap()));
    ok(drfs()
        .arg("protect")
        .arg(&f.store)
        .arg("--to")
        .arg(&r2)
        .arg("--rebind"));
    let st: serde_json::Value =
        serde_json::from_slice(&ok(drfs().arg("status").arg(&f.store).arg("--json")).stdout)
            .unwrap();
    assert_eq!(st["replica"], r2.to_str().unwrap(), "{st:#}");
    assert!(
        st["last_point"].is_null(),
        "the old replica's point is not current: {st:#}"
    );
    let log = fs::read_to_string(f.s(".drfs/daemon.log")).unwrap();
    assert!(log.contains("interval manual -> 5m"), "{log}");
    assert!(log.contains("replica "), "{log}");
    ok(drfs().arg("unprotect").arg(&f.store));
    let st: serde_json::Value =
        serde_json::from_slice(&ok(drfs().arg("status").arg(&f.store).arg("--json")).stdout)
            .unwrap();
    assert_eq!(st["state"], "not protected");
    assert!(
        r1.join("a.img").exists() && r1.join(".drfs").exists(),
        "r1 is left intact"
    );
    f.unmount();
}

#[test]
#[cfg_attr(not(drfs_root), ignore = "mounts FUSE filesystems: run as root")]
fn a_paused_store_tracks_but_does_not_ship_until_resumed() {
    let f = Fixture::new("pause");
    let rep = f.root.join("replica");
    fs::create_dir(&rep).unwrap();
    f.mount(&[]);
    fs::write(f.m("a.img"), vec![1u8; 100_000]).unwrap();
    ok(drfs()
        .arg("protect")
        .arg(&f.store)
        .arg("--to")
        .arg(&rep)
        .args(["--interval", "manual"]));
    ok(drfs().arg("ship").arg(&f.store));
    ok(drfs().arg("pause").arg(&f.store));
    fs::write(f.m("a.img"), vec![2u8; 100_000]).unwrap();
    let out = drfs().arg("ship").arg(&f.store).output().unwrap();
    assert_eq!(
        code(&out),
        Some(1),
        "a cycle while paused is refused, retry later"
    );
    fails(out, "paused");
    let points = || {
        let v: serde_json::Value =
            serde_json::from_slice(&ok(drfs().arg("points").arg(&rep).arg("--json")).stdout)
                .unwrap();
        v.as_array().unwrap().len()
    };
    assert_eq!(points(), 1, "nothing shipped while paused");
    let text = String::from_utf8(ok(drfs().arg("status").arg(&f.store)).stdout).unwrap();
    let text = text.split_whitespace().collect::<Vec<_>>().join(" ");
    assert!(text.contains("paused since"), "{text}");
    ok(drfs().arg("resume").arg(&f.store));
    ok(drfs().arg("ship").arg(&f.store));
    assert_eq!(points(), 2);
    assert_eq!(fs::read(rep.join("a.img")).unwrap(), vec![2u8; 100_000]);
    // A pause for a while ends by itself.
    ok(drfs().arg("pause").arg(&f.store).args(["--for", "1s"]));
    assert_eq!(
        code(&drfs().arg("ship").arg(&f.store).output().unwrap()),
        Some(1)
    );
    std::thread::sleep(Duration::from_millis(1200));
    ok(drfs().arg("ship").arg(&f.store));
    let log = fs::read_to_string(f.s(".drfs/daemon.log")).unwrap();
    assert!(
        log.contains("paused until drfs resume") && log.contains("resumed"),
        "{log}"
    );
    f.unmount();
}

#[test]
#[cfg_attr(not(drfs_root), ignore = "mounts FUSE filesystems: run as root")]
fn every_command_exits_by_the_class_of_its_failure() {
    let f = Fixture::new("codes");
    let rep = f.root.join("replica");
    fs::create_dir(&rep).unwrap();
    let plain = f.root.join("plain");
    fs::create_dir(&plain).unwrap();
    let nope = f.root.join("nope");
    let (s, n, p) = (f.store.as_os_str(), nope.as_os_str(), plain.as_os_str());
    let usage: Vec<(Vec<&std::ffi::OsStr>, &str)> = vec![
        (vec![os("mount")], "<STORE>"),
        (vec![os("mount"), s], "<MOUNTPOINT>"),
        (vec![os("frobnicate")], "frobnicate"),
        (vec![os("ship"), s, os("--bogus")], "--bogus"),
        (vec![os("ship"), n], "nope"),
        (vec![os("ship"), p], "not a drfs store"),
        (vec![os("status"), n], "nope"),
        (vec![os("points"), n], "nope"),
        (vec![os("points"), p], "not a drfs replica"),
        (vec![os("changes"), p], "not a drfs store"),
        (vec![os("unmount"), f.mnt.as_os_str()], "not mounted"),
        (vec![os("protect"), p], "--to"),
        (vec![os("protect"), p, os("--to"), n], "nope"),
        (vec![os("pause"), p], "not a drfs store"),
    ];
    for (args, needle) in &usage {
        let out = run(args);
        assert_eq!(
            code(&out),
            Some(64),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        fails(out, needle);
    }
    let out = drfs().output().unwrap();
    assert_eq!(code(&out), Some(64), "no arguments");
    assert!(String::from_utf8_lossy(&out.stderr).contains("Usage"));
    f.mount(&[]);
    fs::write(f.m("a.img"), b"x").unwrap();
    // Needs an operator: an unprotected store cannot ship; a directory that holds files.
    let out = run(&[os("ship"), s]);
    assert_eq!(code(&out), Some(2));
    fails(out, "not protected");
    let out = run(&[os("protect"), s, os("--to"), p]);
    assert_eq!(code(&out), Some(0), "an empty directory is a replica to be");
    let out = run(&[os("changes"), s, os("no/such/path")]);
    assert_eq!(code(&out), Some(64));
    fails(out, "is not in store");
    ok(drfs().arg("ship").arg(&f.store));
    let out = run(&[
        os("restore"),
        p,
        os("--point"),
        os("00000001"),
        os("--to"),
        f.root.join("no/such/dir/x").as_os_str(),
    ]);
    assert_eq!(code(&out), Some(64));
    fails(out, "--parents");
    assert!(!f.root.join("no").exists());
    ok(drfs()
        .arg("restore")
        .arg(&plain)
        .args(["--point", "00000001", "--parents", "--to"])
        .arg(f.root.join("no/such/dir/x")));
    assert_eq!(fs::read(f.root.join("no/such/dir/x/a.img")).unwrap(), b"x");
    // A retry may fix it: a paused store's cycle.
    ok(drfs().arg("pause").arg(&f.store));
    assert_eq!(code(&run(&[os("ship"), s])), Some(1));
    ok(drfs().arg("resume").arg(&f.store));
    f.unmount();
}

#[test]
#[cfg_attr(not(drfs_root), ignore = "mounts FUSE filesystems: run as root")]
fn status_says_what_the_store_is_doing() {
    let f = Fixture::new("truth");
    let rep = f.root.join("replica");
    fs::create_dir(&rep).unwrap();
    f.mount(&[]);
    fs::write(f.m("b.img"), b"b").unwrap();
    fs::write(f.m("a.img"), b"a").unwrap();
    ok(drfs()
        .arg("protect")
        .arg(&f.store)
        .arg("--to")
        .arg(&rep)
        .args(["--interval", "manual", "--expect-every", "2s"]));
    ok(drfs().arg("ship").arg(&f.store));
    let status = || {
        let v: serde_json::Value =
            serde_json::from_slice(&ok(drfs().arg("status").arg(&f.store).arg("--json")).stdout)
                .unwrap();
        v
    };
    let st = status();
    assert_eq!(st["health"], "normal", "{st:#}");
    assert!(st["daemon_pid"].as_i64().is_some(), "{st:#}");
    let paths: Vec<&str> = st["files"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["path"].as_str().unwrap())
        .collect();
    assert_eq!(paths, ["a.img", "b.img"], "files sorted by path");
    let text = String::from_utf8(ok(drfs().arg("status").arg(&f.store)).stdout).unwrap();
    let text = text.split_whitespace().collect::<Vec<_>>().join(" ");
    assert!(
        text.contains("manually (drfs ship, expected every 2s)"),
        "{text}"
    );
    assert!(text.contains("daemon pid"), "{text}");
    // The cron job stopped: the newest point ages past 3 and then 12 cadences (at
    // least an hour).
    let age = |secs: i64| {
        let p = f.s(".drfs/cycle.json");
        let mut v: serde_json::Value = serde_json::from_slice(&fs::read(&p).unwrap()).unwrap();
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos() as i64;
        v["point_time_ns"] = serde_json::json!(now - secs * 1_000_000_000);
        fs::write(&p, v.to_string()).unwrap();
    };
    age(10);
    assert_eq!(status()["health"], "warning");
    age(7200);
    let st = status();
    assert_eq!(st["health"], "critical", "{st:#}");
    f.unmount();
    // Protected and not mounted: nothing ships.
    ok(drfs()
        .arg("protect")
        .arg(&f.store)
        .args(["--interval", "30s"]));
    let st = status();
    assert!(
        st["state"].as_str().unwrap().starts_with("not mounted"),
        "{st:#}"
    );
}

#[test]
#[cfg_attr(not(drfs_root), ignore = "mounts FUSE filesystems: run as root")]
fn the_daemon_is_called_drfs() {
    let f = Fixture::new("name");
    f.mount(&[]);
    let run: serde_json::Value =
        serde_json::from_slice(&fs::read(f.s(".drfs/run.json")).unwrap()).unwrap();
    let pid = run["pid"].as_i64().unwrap().to_string();
    let out = Command::new("pgrep").args(["-x", "drfs"]).output().unwrap();
    let pids = String::from_utf8_lossy(&out.stdout);
    assert!(
        pids.lines().any(|l| l == pid),
        "pgrep -x drfs: {pids:?}, daemon {pid}"
    );
    let args = Command::new("ps")
        .args(["-o", "args=", "-p", &pid])
        .output()
        .unwrap();
    let args = String::from_utf8_lossy(&args.stdout);
    assert!(args.starts_with("drfs mount"), "{args}");
    f.unmount();
}
