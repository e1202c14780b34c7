//! Cuts are instants. A writer stamps every block it writes with an increasing sequence
//! number (O_DIRECT, across three files of one consistency group) while the daemon cuts a
//! point every second; in every point the blocks found are exactly the outcome of one
//! prefix of the write sequence. And a real filesystem: ext4 in an image on the mount,
//! written while cycles run; the replica's image and every point pass e2fsck.

mod common;

use std::collections::HashMap;
use std::fs;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::rep::*;
use common::*;

const FILES: [&str; 3] = ["g/a.img", "g/b.img", "g/c.img"];
const BLOCKS: u64 = 2048; // 8 MiB of 4 KiB blocks per file

fn stamp(seq: u64, file: u64, block: u64, buf: &mut [u8]) {
    for chunk in buf.chunks_exact_mut(24) {
        chunk[..8].copy_from_slice(&seq.to_le_bytes());
        chunk[8..16].copy_from_slice(&file.to_le_bytes());
        chunk[16..24].copy_from_slice(&block.to_le_bytes());
    }
}

#[test]
#[cfg_attr(not(drfs_root), ignore = "mounts FUSE filesystems: run as root")]
fn every_point_is_a_prefix_of_the_write_sequence() {
    let r = Rep::new("prefix", "1s", "all:1h");
    let f = &r.f;
    fs::create_dir(f.m("g")).unwrap();
    for name in FILES {
        let file = fs::File::create(f.m(name)).unwrap();
        file.set_len(BLOCKS * 4096).unwrap();
    }
    let log: Arc<Mutex<Vec<(u64, u64, u64)>>> = Arc::new(Mutex::new(Vec::new()));
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let (log, stop) = (log.clone(), stop.clone());
        let paths: Vec<_> = FILES.iter().map(|n| f.m(n)).collect();
        std::thread::spawn(move || {
            let files: Vec<fs::File> = paths
                .iter()
                .map(|p| {
                    fs::OpenOptions::new()
                        .write(true)
                        .custom_flags(libc::O_DIRECT)
                        .open(p)
                        .unwrap()
                })
                .collect();
            let layout = std::alloc::Layout::from_size_align(4096, 4096).unwrap();
            let buf = unsafe { std::slice::from_raw_parts_mut(std::alloc::alloc(layout), 4096) };
            let mut x = 0x9e3779b97f4a7c15u64;
            let mut seq = 0;
            while !stop.load(Ordering::Relaxed) {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                seq += 1;
                let (fi, b) = (x % 3, (x >> 8) % BLOCKS);
                stamp(seq, fi, b, buf);
                files[fi as usize].write_all_at(buf, b * 4096).unwrap();
                log.lock().unwrap().push((seq, fi, b));
            }
        })
    };
    std::thread::sleep(Duration::from_secs(7));
    stop.store(true, Ordering::Relaxed);
    writer.join().unwrap();
    let log = log.lock().unwrap().clone();
    let total = log.len() as u64;
    r.ship();
    let points = r.points();
    let mut mid = 0;
    for p in &points {
        let id = p["id"].as_str().unwrap();
        let dir = r.restore(id);
        let n = check_prefix(&dir, &log, id);
        if n > 0 && n < total {
            mid += 1;
        }
        let _ = fs::remove_dir_all(&dir);
    }
    assert!(
        mid >= 2,
        "only {mid} of {} points were cut while the writer ran ({total} writes)",
        points.len()
    );
    // The 4 KiB writes share 64 KiB tracking blocks: cycles sent their pieces.
    let st: serde_json::Value =
        serde_json::from_slice(&fs::read(f.s(".drfs/cycle.json")).unwrap()).unwrap();
    let partial = st["totals"]["partial_blocks"].as_u64().unwrap();
    eprintln!(
        "{} points, {mid} cut mid-write, {total} writes, each point a prefix; {partial} blocks sent as pieces",
        points.len()
    );
    assert!(partial > 0, "no cycle sent a block as its pieces");
    f.unmount();
}

/// Checks a restored point against the write log; returns the prefix length it shows.
fn check_prefix(dir: &std::path::Path, log: &[(u64, u64, u64)], id: &str) -> u64 {
    let mut seen: HashMap<(u64, u64), u64> = HashMap::new();
    let mut n = 0;
    for (fi, name) in FILES.iter().enumerate() {
        let Ok(data) = fs::read(dir.join(name)) else {
            continue;
        };
        for b in 0..BLOCKS {
            let off = (b * 4096) as usize;
            let Some(block) = data.get(off..off + 4096) else {
                break;
            };
            let seq = u64::from_le_bytes(block[..8].try_into().unwrap());
            if seq != 0 {
                assert!(
                    block.chunks_exact(24).all(|c| c[..8] == block[..8]),
                    "point {id}: torn block {fi}/{b}"
                );
                seen.insert((fi as u64, b), seq);
                n = n.max(seq);
            }
        }
    }
    let mut want: HashMap<(u64, u64), u64> = HashMap::new();
    for &(seq, fi, b) in log.iter().take_while(|w| w.0 <= n) {
        want.insert((fi, b), seq);
    }
    assert_eq!(
        seen.len(),
        want.len(),
        "point {id}: not the outcome of writes 1..={n}"
    );
    for (k, v) in &want {
        assert_eq!(
            seen.get(k),
            Some(v),
            "point {id}: block {k:?} is not the outcome of writes 1..={n}"
        );
    }
    n
}

#[test]
#[cfg_attr(not(drfs_root), ignore = "mounts FUSE filesystems: run as root")]
fn ext4_written_during_cycles_is_clean_in_every_point() {
    let r = Rep::new("ext4rep", "manual", "all:1h");
    let f = &r.f;
    let img = f.m("fs.img");
    let inner = f.root.join("inner");
    fs::create_dir(&inner).unwrap();
    make_ext4(&img, 256 << 20, &[]);
    ok(Command::new("mount")
        .args(["-o", "loop"])
        .arg(&img)
        .arg(&inner));
    // Cycles every second from here on (a point cut halfway through mkfs is no filesystem).
    ok(drfs()
        .arg("protect")
        .arg(&f.store)
        .arg("--to")
        .arg(&r.replica)
        .args(["--interval", "1s", "--keep", "all:1h"]));
    let work = std::panic::catch_unwind(|| {
        sh(&format!(
            "cd {d} && for i in $(seq 1 40); do mkdir -p d$((i % 5)); head -c $((i * 50000)) /dev/urandom > d$((i % 5))/f$i; \
             [ $((i % 10)) = 0 ] && sync; sleep 0.1; done; rm -f d1/f11 d2/f12; sync",
            d = inner.display()
        ));
    });
    let _ = Command::new("umount").arg(&inner).status();
    work.unwrap();
    r.ship();
    ok(Command::new(need("e2fsck"))
        .args(["-fn"])
        .arg(r.replica.join("fs.img")));
    let points = r.points();
    assert!(
        points.len() >= 3,
        "cycles did not run during the writes: {points:?}"
    );
    for p in &points {
        let id = p["id"].as_str().unwrap();
        let dir = r.restore(id);
        let pimg = dir.join("fs.img");
        if pimg.exists() {
            // A point is what a crash would have left: replay the journal, then check.
            let _ = Command::new(need("e2fsck"))
                .args(["-fy", "-E", "journal_only"])
                .arg(&pimg)
                .output();
            let out = Command::new(need("e2fsck"))
                .args(["-fn"])
                .arg(&pimg)
                .output()
                .unwrap();
            assert!(
                out.status.success(),
                "point {id}: e2fsck: {}",
                String::from_utf8_lossy(&out.stdout)
            );
        }
        let _ = fs::remove_dir_all(&dir);
    }
    f.unmount();
}
