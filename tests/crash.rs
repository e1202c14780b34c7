//! Crash safety: SIGKILL of the daemon at a random instant during heavy random writes
//! loses no dirty bit. Two clients (O_DIRECT 4 KiB, as qemu cache=none does, and buffered
//! unaligned writes) record every write the mount acknowledged; after `drfs mount` again
//! (which replaces the stale mount) every block they wrote is still marked.
//! `DRFS_CRASH_ROUNDS` sets the rounds (CI: 3; `tools/crash-soak` runs many).
//!
//! A host crash (power loss) loses the page cache, bitmaps included; the activity log must
//! then cover every written block. The second test simulates that: it kills the daemon,
//! changes the recorded boot id and deletes the bitmaps, which is what a power loss before
//! any bitmap writeback leaves.

mod common;

use std::collections::BTreeSet;
use std::fs::OpenOptions;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;

const BS: u64 = 65536;
const SIZE: u64 = 1 << 30;

/// A tiny deterministic generator (xorshift), so failures can be replayed by seed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

type Log = Arc<Mutex<Vec<(u64, u64)>>>;

/// Writes at random offsets until the mount dies or `stop`; logs acknowledged writes.
fn writer(path: std::path::PathBuf, direct: bool, seed: u64, log: Log, stop: Arc<AtomicBool>) {
    let mut opts = OpenOptions::new();
    opts.write(true);
    if direct {
        opts.custom_flags(libc::O_DIRECT);
    }
    let Ok(file) = opts.open(&path) else { return };
    let layout = std::alloc::Layout::from_size_align(65536, 4096).unwrap();
    let buf = unsafe { std::slice::from_raw_parts_mut(std::alloc::alloc(layout), 65536) };
    buf.fill(0xc3);
    let mut rng = Rng(seed | 1);
    while !stop.load(Ordering::Relaxed) {
        let (off, len) = if direct {
            ((rng.next() % (SIZE / 4096)) * 4096, 4096)
        } else {
            (rng.next() % (SIZE - 70_000), 1 + rng.next() % 65_536)
        };
        if file.write_all_at(&buf[..len as usize], off).is_err() {
            break;
        }
        log.lock().unwrap().push((off, len));
    }
    unsafe { std::alloc::dealloc(buf.as_mut_ptr(), layout) };
}

fn blocks_of(writes: &[(u64, u64)]) -> BTreeSet<u64> {
    let mut s = BTreeSet::new();
    for &(off, len) in writes {
        s.extend(off / BS..=(off + len - 1) / BS);
    }
    s
}

/// One round: two writers on fresh files, a kill at a random instant, a remount.
/// Returns the written blocks per file.
fn round(f: &Fixture, r: usize, seed: u64) -> Vec<(String, BTreeSet<u64>)> {
    let names = [format!("r{r}-direct.img"), format!("r{r}-buffered.img")];
    for n in &names {
        let file = std::fs::File::create(f.m(n)).unwrap();
        file.set_len(SIZE).unwrap();
    }
    let stop = Arc::new(AtomicBool::new(false));
    let logs: Vec<Log> = names
        .iter()
        .map(|_| Arc::new(Mutex::new(Vec::new())))
        .collect();
    let threads: Vec<_> = names
        .iter()
        .zip(&logs)
        .enumerate()
        .map(|(i, (n, log))| {
            let (p, log, stop) = (f.m(n), log.clone(), stop.clone());
            std::thread::spawn(move || writer(p, i == 0, seed + i as u64, log, stop))
        })
        .collect();
    std::thread::sleep(Duration::from_millis(150 + seed % 600));
    f.kill_daemon();
    stop.store(true, Ordering::Relaxed);
    for t in threads {
        t.join().unwrap();
    }
    f.mount(&[]);
    names
        .iter()
        .zip(&logs)
        .map(|(n, log)| (n.clone(), blocks_of(&log.lock().unwrap())))
        .collect()
}

#[test]
fn sigkill_during_random_writes_loses_no_dirty_bit() {
    let rounds: usize = std::env::var("DRFS_CRASH_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3);
    let seed0: u64 = std::env::var("DRFS_CRASH_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0x5eed);
    let f = Fixture::new("crash");
    f.mount(&[]);
    let mut checked = 0usize;
    for r in 0..rounds {
        let seed = seed0
            .wrapping_mul(r as u64 + 1)
            .wrapping_add(r as u64 * 7919);
        for (name, written) in round(&f, r, seed) {
            assert!(
                !written.is_empty(),
                "round {r} {name}: the writer wrote nothing before the kill"
            );
            let dirty = f.dirty_blocks(&name);
            let missing: Vec<_> = written.difference(&dirty).take(10).collect();
            assert!(
                missing.is_empty(),
                "round {r} (seed {seed}) {name}: written but unmarked: {missing:?}"
            );
            checked += written.len();
        }
    }
    eprintln!("{rounds} kills, {checked} written blocks checked, none unmarked");
    f.unmount();
}

#[test]
fn host_crash_is_covered_by_the_activity_log() {
    let f = Fixture::new("hostcrash");
    f.mount(&[]);
    let written = round_without_remount(&f);
    // Power loss: the page cache is gone. Pretend no bitmap page was ever written back and
    // the daemon's boot ended.
    let run = f.s(".drfs/run.json");
    let text = std::fs::read_to_string(&run).unwrap();
    let mut v: serde_json::Value = serde_json::from_str(&text).unwrap();
    v["boot_id"] = serde_json::json!("00000000-dead-beef-0000-000000000000");
    std::fs::write(&run, v.to_string()).unwrap();
    for e in std::fs::read_dir(f.s(".drfs/bitmaps")).unwrap() {
        std::fs::remove_file(e.unwrap().path()).unwrap();
    }
    f.mount(&[]);
    let dirty = f.dirty_blocks("hc.img");
    let missing: Vec<_> = written.difference(&dirty).take(10).collect();
    assert!(
        missing.is_empty(),
        "after a host crash, written but unmarked: {missing:?}"
    );
    // Over-approximation stays within the extents that were written (64 MiB each).
    let extents: BTreeSet<u64> = written.iter().map(|b| (b * BS) >> 26).collect();
    assert!(
        dirty.iter().all(|b| extents.contains(&((b * BS) >> 26))),
        "marked outside the written extents"
    );
    let log = f.changes()["log"].to_string();
    assert!(
        log.contains("host crashed"),
        "the mount record names the host crash"
    );
    f.unmount();
}

/// Random O_DIRECT writes into part of a file, then SIGKILL; no remount.
fn round_without_remount(f: &Fixture) -> BTreeSet<u64> {
    let file = std::fs::File::create(f.m("hc.img")).unwrap();
    file.set_len(SIZE).unwrap();
    drop(file);
    let stop = Arc::new(AtomicBool::new(false));
    let log: Log = Arc::new(Mutex::new(Vec::new()));
    let (p, l, s) = (f.m("hc.img"), log.clone(), stop.clone());
    let t = std::thread::spawn(move || writer(p, true, 99, l, s));
    std::thread::sleep(Duration::from_millis(400));
    f.kill_daemon();
    stop.store(true, Ordering::Relaxed);
    t.join().unwrap();
    let w = blocks_of(&log.lock().unwrap());
    assert!(!w.is_empty());
    w
}
