//! Application-consistent points with a real freeze: an ext4 filesystem loop-mounted from
//! an image on the drfs mount, busy with a writer; the pre-cut hook runs `fsfreeze -f` on
//! it, the post-cut hook `fsfreeze -u`. Every `application` point's image is clean
//! without a journal replay; a `crash` point cut with no freeze is not. A failing and a
//! hanging pre hook (each after the freeze) give `crash` points and a Warning, and the
//! thaw ran each time.

mod common;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use common::rep::Rep;
use common::*;

/// Thaws the guest filesystem and stops the writer, whatever happened (a frozen
/// filesystem would hang its unmount).
struct Guard {
    guest: PathBuf,
    stop: Arc<AtomicBool>,
    writer: Option<std::thread::JoinHandle<()>>,
}

impl Drop for Guard {
    fn drop(&mut self) {
        let _ = Command::new("fsfreeze").arg("-u").arg(&self.guest).output();
        self.stop.store(true, Ordering::Release);
        if let Some(w) = self.writer.take() {
            let _ = w.join();
        }
    }
}

/// Writes files with fsync into `dir` until stopped.
fn writer(dir: PathBuf, stop: Arc<AtomicBool>) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        let data = vec![0x5au8; 256 << 10];
        let mut i = 0u64;
        while !stop.load(Ordering::Acquire) {
            let p = dir.join(format!("w{}", i % 32));
            if let Ok(mut f) = fs::File::create(&p) {
                use std::io::Write;
                let _ = f.write_all(&data);
                let _ = f.sync_all();
            }
            i += 1;
        }
    })
}

/// The guest filesystem takes a write within 20 s (it is not left frozen).
fn not_frozen(guest: &Path) {
    let out = Command::new("timeout")
        .arg("20")
        .arg("sh")
        .arg("-c")
        .arg(format!(
            "echo probe > {0}/probe && sync -f {0}/probe",
            guest.display()
        ))
        .output()
        .unwrap();
    assert!(out.status.success(), "the guest stayed frozen: {out:?}");
}

fn protect(r: &Rep, args: &[&str]) {
    ok(drfs().arg("protect").arg(&r.f.store).args(args));
}

fn status(r: &Rep) -> serde_json::Value {
    serde_json::from_slice(&ok(drfs().arg("status").arg(&r.f.store).arg("--json")).stdout).unwrap()
}

fn needs_recovery(img: &Path) -> bool {
    let out = ok(Command::new(need("dumpe2fs")).arg("-h").arg(img));
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .any(|l| l.starts_with("Filesystem features:") && l.contains("needs_recovery"))
}

#[test]
#[cfg_attr(not(drfs_root), ignore = "mounts FUSE filesystems: run as root")]
fn application_points_are_clean_without_a_journal_replay() {
    let r = Rep::new("hooks", "manual", "all:1h");
    make_ext4(&r.f.m("fs.img"), 64 << 20, &[]);
    let guest = r.f.mountpoint("guest");
    ok(Command::new("mount")
        .args(["-o", "loop"])
        .arg(r.f.m("fs.img"))
        .arg(&guest));
    let stop = Arc::new(AtomicBool::new(false));
    let _guard = Guard {
        guest: guest.clone(),
        stop: stop.clone(),
        writer: Some(writer(guest.clone(), stop.clone())),
    };
    let count = r.f.root.join("pre-count");
    let freeze = format!(
        "sh -c 'echo \"$DRFS_HOOK [$DRFS_GROUP]\" >> {}; fsfreeze -f {}'",
        count.display(),
        guest.display()
    );
    let thaw = format!("fsfreeze -u {}", guest.display());
    let mut want = Vec::new();

    // Two application-consistent points.
    protect(
        &r,
        &[
            "--pre-cut",
            &freeze,
            "--post-cut",
            &thaw,
            "--hook-timeout",
            "10s",
        ],
    );
    for _ in 0..2 {
        ok(drfs().arg("ship").arg(&r.f.store));
        not_frozen(&guest);
    }
    want.extend([("application", false), ("application", false)]);
    assert_eq!(status(&r)["health"], "normal", "{:#}", status(&r));

    // A pre hook that fails: a crash point, a Warning, its stderr in the log, thawed.
    let fail = "sh -c 'echo hook-said-no >&2; exit 3'";
    protect(
        &r,
        &["--pre-cut", &freeze, "--pre-cut", fail, "--post-cut", &thaw],
    );
    ok(drfs().arg("ship").arg(&r.f.store));
    // The freeze before the failing hook held at the cut: clean, but no longer vouched for.
    want.push(("crash", false));
    not_frozen(&guest);
    let st = status(&r);
    assert_eq!(st["health"], "warning", "{st:#}");
    let log = fs::read_to_string(r.f.s(".drfs/daemon.log")).unwrap();
    assert!(log.contains("hook-said-no"), "{log}");

    // A pre hook that hangs past the timeout: killed, a crash point, thawed.
    protect(
        &r,
        &[
            "--pre-cut",
            &freeze,
            "--pre-cut",
            "sleep 600",
            "--hook-timeout",
            "2s",
        ],
    );
    let t0 = std::time::Instant::now();
    ok(drfs().arg("ship").arg(&r.f.store));
    assert!(t0.elapsed() < std::time::Duration::from_secs(60));
    want.push(("crash", false));
    not_frozen(&guest);
    assert_eq!(status(&r)["health"], "warning");
    let log = fs::read_to_string(r.f.s(".drfs/daemon.log")).unwrap();
    assert!(log.contains("timed out after 2 s"), "{log}");
    let ev: serde_json::Value =
        serde_json::from_slice(&ok(drfs().arg("events").arg(&r.f.store).arg("--json")).stdout)
            .unwrap();
    let hooks: Vec<&serde_json::Value> = ev
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["kind"] == "hook")
        .collect();
    assert_eq!(hooks.len(), 2, "{ev:#}");

    // Fixed, with --app-consistent-every 1h: the next cycle retries (the last attempt
    // failed) and is application-consistent; the one after is not due, runs no hook.
    protect(
        &r,
        &[
            "--pre-cut",
            &freeze,
            "--app-consistent-every",
            "1h",
            "--hook-timeout",
            "10s",
        ],
    );
    ok(drfs().arg("ship").arg(&r.f.store));
    want.push(("application", false));
    assert_eq!(status(&r)["health"], "normal", "{:#}", status(&r));
    let before = fs::read_to_string(&count).unwrap().lines().count();
    ok(drfs().arg("ship").arg(&r.f.store));
    // No hook ran: what a crash leaves, with the writer busy.
    want.push(("crash", true));
    assert_eq!(fs::read_to_string(&count).unwrap().lines().count(), before);
    assert!(
        fs::read_to_string(&count)
            .unwrap()
            .lines()
            .all(|l| l == "pre []"),
        "DRFS_HOOK and DRFS_GROUP"
    );

    // Bad input: a hook that is not there, or not executable.
    let out = drfs()
        .arg("protect")
        .arg(&r.f.store)
        .args(["--pre-cut", "/nonexistent/freeze vm1"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    fails(out, "is not an executable file");
    let plain = r.f.root.join("not-executable");
    fs::write(&plain, "#!/bin/sh\n").unwrap();
    let out = drfs()
        .arg("protect")
        .arg(&r.f.store)
        .arg("--post-cut")
        .arg(&plain)
        .output()
        .unwrap();
    fails(out, "is not an executable file");

    // Every point's consistency, oldest first, as drfs points shows it; application
    // points' images are clean as they are, crash points' need a journal replay.
    let mut points = r.points();
    points.reverse();
    let got: Vec<&str> = points
        .iter()
        .map(|p| p["consistency"].as_str().unwrap())
        .collect();
    let tags: Vec<&str> = want.iter().map(|w| w.0).collect();
    assert_eq!(got, tags);
    for (p, (_, unclean)) in points.iter().zip(&want) {
        let id = p["id"].as_str().unwrap();
        let dir = r.restore(id);
        let img = dir.join("fs.img");
        if p["consistency"] == "application" {
            assert!(
                !needs_recovery(&img),
                "application point {id} needs recovery"
            );
            let out = Command::new(need("e2fsck"))
                .arg("-fn")
                .arg(&img)
                .output()
                .unwrap();
            assert!(
                out.status.success(),
                "application point {id}: e2fsck -fn: {}",
                String::from_utf8_lossy(&out.stdout)
            );
        } else if *unclean {
            assert!(needs_recovery(&img), "crash point {id} is clean");
        }
        let _ = fs::remove_dir_all(&dir);
    }
    let text = String::from_utf8(ok(drfs().arg("points").arg(&r.replica)).stdout).unwrap();
    assert!(text.contains("application"), "{text}");
    drop(_guard);
    let _ = Command::new("umount").arg(&guest).status();
    r.f.unmount();
}

#[test]
#[cfg_attr(not(drfs_root), ignore = "mounts FUSE filesystems: run as root")]
fn hooks_run_per_group_pre_in_order_post_in_reverse() {
    let r = Rep::new("hook-groups", "manual", "all:1h");
    for vm in ["vm1", "vm2"] {
        fs::create_dir(r.f.m(vm)).unwrap();
        fs::write(r.f.m(&format!("{vm}/disk.img")), vec![7u8; 100_000]).unwrap();
    }
    let log = r.f.root.join("hook-log");
    let say = |what: &str| {
        format!(
            "sh -c 'echo \"{what} $DRFS_HOOK $DRFS_GROUP ${{DRFS_PRE_FAILURE:-}}\" >> {}'",
            log.display()
        )
    };
    let (a, b, c, d) = (say("a"), say("b"), say("c"), say("d"));
    protect(
        &r,
        &[
            "--group",
            "dir",
            "--pre-cut",
            &a,
            "--pre-cut",
            &b,
            "--post-cut",
            &c,
            "--post-cut",
            &d,
        ],
    );
    ok(drfs().arg("ship").arg(&r.f.store));
    let lines: Vec<String> = fs::read_to_string(&log)
        .unwrap()
        .lines()
        .map(|l| l.trim().to_string())
        .collect();
    // One group at a time: its pre hooks in order, its cut, its post hooks in reverse.
    let want: Vec<String> = ["vm1", "vm2"]
        .iter()
        .flat_map(|g| {
            [
                format!("a pre {g}"),
                format!("b pre {g}"),
                format!("d post {g}"),
                format!("c post {g}"),
            ]
        })
        .collect();
    assert_eq!(lines, want);
    assert_eq!(r.points()[0]["consistency"], "application");

    // A failing first pre hook: the second does not run, the post hooks do, told so.
    fs::remove_file(&log).unwrap();
    let fail = "sh -c 'exit 1'";
    protect(&r, &["--pre-cut", fail, "--pre-cut", &b]);
    ok(drfs().arg("ship").arg(&r.f.store));
    let lines: Vec<String> = fs::read_to_string(&log)
        .unwrap()
        .lines()
        .map(|l| l.trim().to_string())
        .collect();
    assert_eq!(
        lines,
        [
            "d post vm1 1",
            "c post vm1 1",
            "d post vm2 1",
            "c post vm2 1"
        ]
    );
    assert_eq!(r.points()[0]["consistency"], "crash");
    r.f.unmount();
}
