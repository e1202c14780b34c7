//! `drfs assess` on a real mount with real writers (dd in a loop): the churn per window
//! is the distinct bytes changed (the same 8 MiB overwritten again and again is 8 MiB a
//! window, not the write volume), random data compresses to about its size and text to
//! far less, and a protected store's cycles, run during and after the assessment, still
//! ship everything (the replica's latest files equal the store).

mod common;

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::rep::*;
use common::*;

const MIB: u64 = 1 << 20;

/// A writer (bash loop of dd) overwriting the first 8 MiB of `dst` from `src` until
/// killed; each pass appends a line to `passes`. Killed by its pid when dropped.
struct Writer(Child);

impl Writer {
    fn start(src: &std::path::Path, dst: &std::path::Path, passes: &std::path::Path) -> Writer {
        let script = format!(
            "while :; do dd if={} of={} bs=1M count=8 conv=notrunc,fsync status=none; echo >> {}; done",
            src.display(),
            dst.display(),
            passes.display()
        );
        Writer(
            Command::new("bash")
                .arg("-c")
                .arg(script)
                .spawn()
                .expect("writer"),
        )
    }
}

impl Drop for Writer {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn passes(p: &std::path::Path) -> u64 {
    std::fs::read_to_string(p).map_or(0, |s| s.lines().count() as u64)
}

fn assess(store: &std::path::Path, extra: &[&str]) -> serde_json::Value {
    let out = ok(drfs()
        .arg("assess")
        .arg(store)
        .args(["--for", "6s", "--windows", "2s,6s,30s", "--json"])
        .args(extra));
    serde_json::from_slice(&out.stdout).expect("assess --json is JSON")
}

/// Waits until the writer has done a pass (so every window sees it running).
fn wait_pass(p: &std::path::Path) {
    let end = Instant::now() + Duration::from_secs(60);
    while passes(p) == 0 {
        assert!(Instant::now() < end, "the writer made no pass in 60 s");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
#[cfg_attr(not(drfs_root), ignore = "mounts FUSE filesystems: run as root")]
fn churn_is_distinct_bytes_and_cycles_ship_everything() {
    let r = Rep::new("assess", "manual", "all:1h");
    let f = &r.f;
    let (random, text) = (f.root.join("random"), f.root.join("text"));
    sh(&format!(
        "head -c 8M /dev/urandom > {}; (yes 'a line of a log file, compressible' || true) | head -c 8M > {}",
        random.display(),
        text.display()
    ));
    sh(&format!(
        "head -c 64M /dev/urandom > {}; cp {} {}",
        f.m("a.img").display(),
        f.m("a.img").display(),
        f.m("b.img").display()
    ));
    r.ship();
    assert!(f.dirty_blocks("a.img").is_empty());

    // Random data overwritten in place, a cycle shipped while the assessment runs.
    let count = f.root.join("passes-a");
    let w = Writer::start(&random, &f.m("a.img"), &count);
    wait_pass(&count);
    let before = passes(&count);
    let child = drfs()
        .arg("assess")
        .arg(&f.store)
        .args(["--for", "6s", "--windows", "2s,6s,30s", "--json"])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_secs(3));
    ok(drfs().arg("ship").arg(&f.store));
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let done = passes(&count) - before;
    drop(w);
    let a: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    eprintln!("random: {a:#}\n{done} passes of 8 MiB written while assessing");
    let win = a["windows"].as_array().unwrap();
    assert_eq!(win[0]["seconds"], 2);
    assert_eq!(win[0]["measured"], 3);
    assert_eq!(win[1]["measured"], 1);
    // Distinct bytes, not the write volume: never more than the 8 MiB rewritten.
    assert_eq!(win[0]["max_bytes"], 8 * MIB, "2 s window: {a:#}");
    assert_eq!(win[1]["max_bytes"], 8 * MIB, "6 s window: {a:#}");
    assert!(done * 8 * MIB > 8 * MIB, "the writer wrote more than once");
    assert_eq!(win[2]["extrapolated"], true);
    assert_eq!(win[2]["measured"], 0);
    let ratio = a["wire_ratio"].as_f64().unwrap();
    assert!(ratio > 0.95, "random data compressed to {ratio}");
    assert!(a["sample"]["blocks"].as_u64().unwrap() > 0);

    // Compressible data: a far smaller share on the wire; a cap gives an RPO.
    let count = f.root.join("passes-b");
    let w = Writer::start(&text, &f.m("b.img"), &count);
    wait_pass(&count);
    let b = assess(&f.store, &["--bwlimit", "1M"]);
    drop(w);
    eprintln!("text: {b:#}");
    let ratio = b["wire_ratio"].as_f64().unwrap();
    assert!(ratio < 0.2, "text compressed only to {ratio}");
    let w6 = &b["windows"][1];
    assert_eq!(w6["max_bytes"], 8 * MIB);
    assert_eq!(b["bwlimit_bps"], MIB);
    let cycle = w6["cycle_s_at_cap"].as_f64().unwrap();
    assert!(cycle > 0.0 && cycle < 6.0, "{w6:#}");
    assert_eq!(w6["rpo_s_at_cap"].as_f64().unwrap(), 6.0 + cycle);

    // Nothing was cleared: the writes since the last cycle are all still to ship.
    assert_eq!(f.dirty_blocks("b.img").len(), 128);
    r.ship();
    r.check_latest();

    // The table for people.
    let w = Writer::start(&text, &f.m("b.img"), &count);
    let out = ok(drfs()
        .arg("assess")
        .arg(&f.store)
        .args(["--for", "2s", "--windows", "2s,1m"]));
    drop(w);
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(table.contains("INTERVAL"), "{table}");
    assert!(table.contains("not measured"), "{table}");
    r.ship();
    r.check_latest();
}

#[test]
#[cfg_attr(not(drfs_root), ignore = "mounts FUSE filesystems: run as root")]
fn assess_refuses_clearly() {
    let assess_for = |store: &std::path::Path, d: &str| {
        run(&[
            os("assess"),
            store.as_os_str(),
            os("--for"),
            os(d),
            os("--windows"),
            os("2s"),
        ])
    };
    let f = Fixture::new("assess-refuse");
    std::fs::write(f.s("x"), b"x").unwrap();
    // Not mounted: a store, but nothing to watch.
    f.mount(&[]);
    f.unmount();
    fails(assess_for(&f.store, "2s"), "is not mounted");
    fails(
        assess_for(&f.store, "1s"),
        "shorter than the shortest window",
    );
    fails(
        run(&[
            os("assess"),
            f.store.as_os_str(),
            os("--windows"),
            os("30s,45s"),
        ]),
        "not a multiple",
    );
    // One assessment at a time.
    f.mount(&[]);
    let first = drfs()
        .arg("assess")
        .arg(&f.store)
        .args(["--for", "4s", "--windows", "2s", "--json"])
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let log = f.s(".drfs/daemon.log");
    let end = Instant::now() + Duration::from_secs(30);
    while !std::fs::read_to_string(&log)
        .unwrap_or_default()
        .contains("assessment started")
    {
        assert!(Instant::now() < end, "the first assessment did not start");
        std::thread::sleep(Duration::from_millis(20));
    }
    fails(assess_for(&f.store, "2s"), "already running");
    let out = first.wait_with_output().unwrap();
    assert!(out.status.success());
    f.unmount();
}
