//! Crash safety, and what a crash costs. SIGKILL of the daemon at a random instant during
//! heavy writes from three clients at once (O_DIRECT 4 KiB as qemu cache=none does,
//! buffered unaligned writes with fsync, and stores into a shared mmap with msync) loses
//! no dirty bit, and costs no resync: after `drfs mount` again (which replaces the stale
//! mount) every block they wrote is still marked and no file is `needs_resync`, because
//! the daemon's own operations are stamped (`track::stamps`). `DRFS_CRASH_ROUNDS` sets the
//! rounds (CI: 10; `tools/crash-soak` runs hundreds).
//!
//! Only a file changed behind drfs's back after the kill is flagged: one written straight
//! into the store right after the kill, or a file that was busy through the mount and
//! then written directly 50 ms after the kill.
//!
//! A host crash (power loss) loses the page cache, bitmaps included; the activity log must
//! then cover every written block. That test kills the daemon, changes the recorded boot
//! id, deletes the bitmaps and stamps (what a power loss before any writeback leaves), and
//! says when the "new boot" began (`DRFS_TEST_BOOT_NS`): files written before it stay
//! trusted, one written after it is flagged.

mod common;

use std::collections::BTreeSet;
use std::fs::OpenOptions;
use std::io::{BufRead, BufReader};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::rep::{Rep, last_cycle, random_pieces, write_direct};
use common::*;

const BS: u64 = 65536;
const SIZE: u64 = 1 << 30;
/// The part of a file the mmap writer maps.
const MAPPED: u64 = 64 << 20;

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

#[derive(Clone, Copy, PartialEq)]
enum How {
    Direct,
    BufferedFsync,
}

/// Writes at random offsets until the mount dies or `stop`; logs acknowledged writes.
fn writer(path: PathBuf, how: How, seed: u64, log: Log, stop: Arc<AtomicBool>) {
    let mut opts = OpenOptions::new();
    opts.write(true);
    if how == How::Direct {
        opts.custom_flags(libc::O_DIRECT);
    }
    let Ok(file) = opts.open(&path) else { return };
    let layout = std::alloc::Layout::from_size_align(65536, 4096).unwrap();
    let buf = unsafe { std::slice::from_raw_parts_mut(std::alloc::alloc(layout), 65536) };
    buf.fill(0xc3);
    let mut rng = Rng(seed | 1);
    let mut n = 0u64;
    while !stop.load(Ordering::Relaxed) {
        let (off, len) = match how {
            How::Direct => ((rng.next() % (SIZE / 4096)) * 4096, 4096),
            How::BufferedFsync => (rng.next() % (SIZE - 70_000), 1 + rng.next() % 65_536),
        };
        if file.write_all_at(&buf[..len as usize], off).is_err() {
            break;
        }
        log.lock().unwrap().push((off, len));
        n += 1;
        if how == How::BufferedFsync && n % 16 == 0 && file.sync_all().is_err() {
            break;
        }
    }
    unsafe { std::alloc::dealloc(buf.as_mut_ptr(), layout) };
}

/// Stores into a shared mapping of the first `MAPPED` bytes and msyncs each one; prints
/// "OFF LEN" once msync returned. In its own process: a page fault on a dead FUSE mount
/// is a SIGBUS.
const MMAP_WRITER: &str = r#"
import mmap, os, random, sys
path, seed, size = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
fd = os.open(path, os.O_RDWR)
m = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
for i in range(0, size, 4096):
    m[i]
print("ready", flush=True)
rnd = random.Random(seed)
data = b"\x5a" * 65536
try:
    while True:
        off = rnd.randrange(0, size - 65536)
        n = rnd.randrange(1, 65536)
        m[off:off + n] = data[:n]
        a = off & ~4095
        m.flush(a, (off + n - a + 4095) & ~4095)
        print(off, n, flush=True)
except Exception:
    pass
"#;

/// The mmap writer, started and ready.
fn mmap_writer(path: &Path, seed: u64) -> (Child, BufReader<std::process::ChildStdout>) {
    let mut child = Command::new(need("python3"))
        .arg("-c")
        .arg(MMAP_WRITER)
        .arg(path)
        .arg(seed.to_string())
        .arg(MAPPED.to_string())
        .stdout(Stdio::piped())
        .spawn()
        .expect("python3");
    let mut out = BufReader::new(child.stdout.take().expect("stdout"));
    let mut line = String::new();
    out.read_line(&mut line).expect("mmap writer output");
    assert_eq!(line.trim(), "ready", "mmap writer did not start");
    (child, out)
}

/// Waits for the mmap writer to end (the mount died) and returns what it acknowledged.
fn mmap_written(mut child: Child, out: BufReader<std::process::ChildStdout>) -> Vec<(u64, u64)> {
    let (tx, rx) = std::sync::mpsc::channel();
    let pid = child.id() as i32;
    let reader = std::thread::spawn(move || {
        let mut log = Vec::new();
        for line in out.lines().map_while(|l| l.ok()) {
            let mut it = line.split(' ').filter_map(|x| x.parse::<u64>().ok());
            if let (Some(a), Some(b)) = (it.next(), it.next()) {
                log.push((a, b));
            }
        }
        let _ = tx.send(());
        log
    });
    if rx.recv_timeout(Duration::from_secs(20)).is_err() {
        unsafe { libc::kill(pid, libc::SIGKILL) };
    }
    let _ = child.wait();
    reader.join().unwrap()
}

/// Text with every run of white space (a wrapped line) as one space.
fn words(text: &str) -> String {
    text.split_whitespace().collect::<Vec<_>>().join(" ")
}

fn blocks_of(writes: &[(u64, u64)]) -> BTreeSet<u64> {
    let mut s = BTreeSet::new();
    for &(off, len) in writes {
        s.extend(off / BS..=(off + len - 1) / BS);
    }
    s
}

fn make_file(f: &Fixture, name: &str) {
    let file = std::fs::File::create(f.m(name)).unwrap();
    file.set_len(SIZE).unwrap();
}

/// Writer threads on `names` through the mount (a direct, then a buffered one, in turn).
struct Writers {
    stop: Arc<AtomicBool>,
    threads: Vec<std::thread::JoinHandle<()>>,
    logs: Vec<(String, Log)>,
}

impl Writers {
    fn start(f: &Fixture, names: &[String], hows: &[How], seed: u64) -> Writers {
        let stop = Arc::new(AtomicBool::new(false));
        let mut threads = Vec::new();
        let mut logs = Vec::new();
        for (i, (n, how)) in names.iter().zip(hows).enumerate() {
            let log: Log = Arc::new(Mutex::new(Vec::new()));
            let (p, l, s, how) = (f.m(n), log.clone(), stop.clone(), *how);
            threads.push(std::thread::spawn(move || {
                writer(p, how, seed + i as u64, l, s)
            }));
            logs.push((n.clone(), log));
        }
        Writers {
            stop,
            threads,
            logs,
        }
    }

    /// Stops them (after the kill) and returns the blocks each one wrote.
    fn written(self) -> Vec<(String, BTreeSet<u64>)> {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads {
            t.join().unwrap();
        }
        self.logs
            .into_iter()
            .map(|(n, l)| (n, blocks_of(&l.lock().unwrap())))
            .collect()
    }
}

/// One round: three writers on fresh files, a kill at a random instant, a remount.
/// Returns the written blocks per file.
fn round(f: &Fixture, r: usize, seed: u64) -> Vec<(String, BTreeSet<u64>)> {
    let names = [
        format!("r{r}-direct.img"),
        format!("r{r}-buffered.img"),
        format!("r{r}-mmap.img"),
    ];
    for n in &names {
        make_file(f, n);
    }
    let (child, out) = mmap_writer(&f.m(&names[2]), seed + 2);
    let w = Writers::start(f, &names[..2], &[How::Direct, How::BufferedFsync], seed);
    std::thread::sleep(Duration::from_millis(150 + seed % 600));
    f.kill_daemon();
    let mut written = w.written();
    written.push((names[2].clone(), blocks_of(&mmap_written(child, out))));
    f.mount(&[]);
    written
}

/// Files of the store that `drfs changes` flags for a resync, with the reason.
fn flagged(f: &Fixture) -> Vec<(String, String)> {
    let c = f.changes();
    c["files"]
        .as_array()
        .expect("files")
        .iter()
        .filter(|x| x["needs_resync"] == true)
        .map(|x| {
            (
                x["path"].as_str().unwrap_or_default().to_string(),
                x["resync_why"].to_string(),
            )
        })
        .collect()
}

fn assert_marked(f: &Fixture, name: &str, written: &BTreeSet<u64>, what: &str) {
    assert!(!written.is_empty(), "{what} {name}: nothing was written");
    let dirty = f.dirty_blocks(name);
    let missing: Vec<_> = written.difference(&dirty).take(10).collect();
    assert!(
        missing.is_empty(),
        "{what} {name}: written but unmarked: {missing:?}"
    );
}

#[test]
#[cfg_attr(not(drfs_root), ignore = "mounts FUSE filesystems: run as root")]
fn sigkill_during_random_writes_loses_no_dirty_bit_and_costs_no_resync() {
    let rounds: usize = std::env::var("DRFS_CRASH_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10);
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
            assert_marked(&f, &name, &written, &format!("round {r} (seed {seed})"));
            checked += written.len();
        }
        let bad = flagged(&f);
        assert!(
            bad.is_empty(),
            "round {r} (seed {seed}): a SIGKILL made files need a resync: {bad:?}"
        );
    }
    let status = ok(drfs().arg("status").arg(&f.store));
    // Lines wrap: read the words.
    let text = words(&String::from_utf8_lossy(&status.stdout));
    assert!(
        text.contains("recovered after a daemon crash") && text.contains("no file needs a resync"),
        "status says what the last crash cost:\n{text}"
    );
    let log = std::fs::read_to_string(f.s(".drfs/daemon.log")).unwrap();
    assert!(
        log.matches("recovered after a daemon crash").count() >= rounds,
        "the daemon log says what each crash cost"
    );
    eprintln!(
        "{rounds} kills with three writers each, {checked} written blocks checked: none unmarked, no file needs a resync"
    );
    f.unmount();
}

/// Two files busy through the mount until the kill, one idle; returns the fixture,
/// mounted, with the daemon just killed and the writers stopped.
fn busy_then_killed(name: &str) -> (Fixture, Vec<(String, BTreeSet<u64>)>) {
    let f = Fixture::new(name);
    f.mount(&[]);
    for n in [
        "busy1.img",
        "busy2.img",
        "quiet.img",
        "quiet2.img",
        "quiet3.img",
    ] {
        make_file(&f, n);
    }
    std::fs::write(f.m("quiet.img"), vec![7u8; 1 << 20]).unwrap();
    let names = ["busy1.img".to_string(), "busy2.img".to_string()];
    let w = Writers::start(&f, &names, &[How::Direct, How::BufferedFsync], 77);
    std::thread::sleep(Duration::from_millis(400));
    f.kill_daemon();
    (f, w.written())
}

fn write_store_directly(f: &Fixture, name: &str) {
    let file = OpenOptions::new().write(true).open(f.s(name)).unwrap();
    file.write_all_at(b"behind drfs's back", 4096).unwrap();
}

#[test]
#[cfg_attr(not(drfs_root), ignore = "mounts FUSE filesystems: run as root")]
fn only_files_changed_behind_drfs_after_a_kill_are_flagged() {
    let (f, written) = busy_then_killed("direct-after-kill");
    // Right after the kill, straight into the store: a write, a rename, a new file, and a
    // file replaced by another.
    write_store_directly(&f, "quiet.img");
    std::fs::rename(f.s("quiet2.img"), f.s("moved.img")).unwrap();
    std::fs::write(f.s("new.img"), b"new").unwrap();
    std::fs::write(f.s("replacement.tmp"), b"other").unwrap();
    std::fs::rename(f.s("replacement.tmp"), f.s("quiet3.img")).unwrap();
    f.mount(&[]);
    for (name, w) in &written {
        assert_marked(&f, name, w, "busy");
    }
    let mut bad = flagged(&f);
    bad.sort();
    assert_eq!(
        bad.iter().map(|(p, _)| p.as_str()).collect::<Vec<_>>(),
        ["moved.img", "new.img", "quiet.img", "quiet3.img"],
        "exactly the files changed behind drfs's back: {bad:?}"
    );
    let why = |p: &str| bad.iter().find(|(x, _)| x == p).map(|(_, w)| w.clone());
    assert!(
        why("quiet.img").is_some_and(|w| w.contains("after the daemon died")),
        "{bad:?}"
    );
    f.unmount();
}

#[test]
#[cfg_attr(not(drfs_root), ignore = "mounts FUSE filesystems: run as root")]
fn a_busy_file_written_directly_50_ms_after_the_kill_is_flagged() {
    let (f, written) = busy_then_killed("direct-50ms");
    // `kill_daemon` returned once the daemon was gone; the window the stamps leave after
    // it is 20 ms plus the kernel's clock tick.
    std::thread::sleep(Duration::from_millis(50));
    write_store_directly(&f, "busy1.img");
    f.mount(&[]);
    for (name, w) in &written {
        assert_marked(&f, name, w, "busy");
    }
    let bad = flagged(&f);
    assert_eq!(
        bad.iter().map(|(p, _)| p.as_str()).collect::<Vec<_>>(),
        ["busy1.img"],
        "busy2 (written through the mount until the kill) and quiet stay trusted: {bad:?}"
    );
    f.unmount();
}

#[test]
#[cfg_attr(not(drfs_root), ignore = "mounts FUSE filesystems: run as root")]
fn host_crash_is_covered_by_the_activity_log() {
    let f = Fixture::new("hostcrash");
    f.mount(&[]);
    make_file(&f, "hc.img");
    make_file(&f, "after.img");
    std::fs::write(f.m("after.img"), b"before the crash").unwrap();
    let w = Writers::start(&f, &["hc.img".to_string()], &[How::Direct], 99);
    std::thread::sleep(Duration::from_millis(400));
    f.kill_daemon();
    let written = w.written().remove(0).1;
    let boot = power_loss(&f);
    // After the "reboot", before drfs mounts: a change behind its back.
    write_store_directly(&f, "after.img");
    ok(drfs()
        .env("DRFS_TEST_BOOT_NS", boot.to_string())
        .arg("mount")
        .arg(&f.store)
        .arg(&f.mnt));
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
    let bad = flagged(&f);
    assert_eq!(
        bad.iter().map(|(p, _)| p.as_str()).collect::<Vec<_>>(),
        ["after.img"],
        "only the file changed after the new boot needs a resync: {bad:?}"
    );
    let log = f.changes()["log"].to_string();
    assert!(
        log.contains("host crashed"),
        "the mount record names the host crash"
    );
    let status = ok(drfs().arg("status").arg(&f.store));
    let text = words(&String::from_utf8_lossy(&status.stdout));
    assert!(
        text.contains("recovered after a host crash") && text.contains("1 file needs a resync"),
        "status says what the crash cost:\n{text}"
    );
    f.unmount();
}

/// Power loss after the daemon was killed: the page cache is gone. Pretends no bitmap or
/// stamp page was ever written back, that the daemon's boot ended, and that a new one
/// began now; returns the new boot's start (for `DRFS_TEST_BOOT_NS`).
fn power_loss(f: &Fixture) -> u128 {
    let run = f.s(".drfs/run.json");
    let mut v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&run).unwrap()).unwrap();
    v["boot_id"] = serde_json::json!("00000000-dead-beef-0000-000000000000");
    std::fs::write(&run, v.to_string()).unwrap();
    for e in std::fs::read_dir(f.s(".drfs/bitmaps")).unwrap() {
        std::fs::remove_file(e.unwrap().path()).unwrap();
    }
    std::fs::remove_file(f.s(".drfs/stamps")).unwrap();
    let boot = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    std::thread::sleep(Duration::from_millis(30));
    boot
}

/// A host crash (`power_loss` after a SIGKILL) and the mount after the reboot.
fn host_crash_and_mount(f: &Fixture) {
    f.kill_daemon();
    let boot = power_loss(f);
    ok(drfs()
        .env("DRFS_TEST_BOOT_NS", boot.to_string())
        .arg("mount")
        .arg(&f.store)
        .arg(&f.mnt));
}

fn partial_blocks(f: &Fixture) -> u64 {
    last_cycle(f)["partial_blocks"].as_u64().unwrap()
}

/// A `size`-byte raw disk in the mounted store, written through with 1 MiB O_DIRECT
/// writes and shipped: a first point to build pieces on.
fn laid_out(r: &Rep, size: u64) -> PathBuf {
    let disk = r.f.m("disk.raw");
    std::fs::File::create(&disk).unwrap().set_len(size).unwrap();
    let all: Vec<u64> = (0..size / (1 << 20)).map(|i| i << 20).collect();
    write_direct(&disk, &all, 1 << 20, 1);
    r.ship();
    disk
}

#[test]
#[cfg_attr(not(drfs_root), ignore = "mounts FUSE filesystems: run as root")]
fn after_a_kill_mid_cycle_or_a_host_crash_partly_written_blocks_ship_whole() {
    const DISK: u64 = 64 << 20;
    let r = Rep::new("pieces-crash", "manual", "all:1h");
    let f = &r.f;
    let disk = laid_out(&r, DISK);
    // The daemon dies (SIGKILL) after sending five blocks of a cycle of pieces.
    f.unmount();
    ok(drfs()
        .env("DRFS_FAULT", "send:5")
        .arg("mount")
        .arg(&f.store)
        .arg(&f.mnt));
    write_direct(&disk, &random_pieces(DISK, 300, 3), 4096, 2);
    let out = r.ship_output();
    assert!(!out.status.success(), "the cycle outlived its daemon");
    for pid in daemons_of(&f.mnt) {
        assert!(
            wait_gone(pid, Duration::from_secs(10)),
            "daemon {pid} lives"
        );
    }
    f.mount(&[]);
    let id = r.ship();
    assert_eq!(partial_blocks(f), 0, "pieces trusted after a SIGKILL");
    r.check_latest();
    // Pieces written, then the host "crashes": the activity log's extents ship whole.
    write_direct(&disk, &random_pieces(DISK, 300, 4), 4096, 3);
    host_crash_and_mount(f);
    let id2 = r.ship();
    assert_eq!(partial_blocks(f), 0, "pieces trusted after a host crash");
    r.check_latest();
    // And pieces again, now that nothing is in doubt.
    write_direct(&disk, &random_pieces(DISK, 300, 5), 4096, 4);
    let id3 = r.ship();
    assert!(partial_blocks(f) > 0, "no pieces after the recoveries");
    r.check_latest();
    for id in [&id, &id2, &id3] {
        r.check_point(id);
    }
    f.unmount();
}

/// The records of kind 3 (a partial block: only its pieces staged) in a replica's
/// staging area (`incoming/<id>.idx`, 64-byte records, the kind at byte 12).
fn staged_partials(replica: &std::path::Path) -> usize {
    let Ok(dir) = std::fs::read_dir(replica.join(".drfs/incoming")) else {
        return 0;
    };
    dir.flatten()
        .filter(|e| e.file_name().to_string_lossy().ends_with(".idx"))
        .filter_map(|e| std::fs::read(e.path()).ok())
        .map(|b| b.chunks_exact(56).filter(|r| r[12] == 3).count())
        .sum()
}

#[test]
#[cfg_attr(not(drfs_root), ignore = "mounts FUSE filesystems: run as root")]
fn a_receiver_killed_mid_apply_of_pieces_finishes_it_or_sends_them_again() {
    const DISK: u64 = 64 << 20;
    let r = Rep::new("pieces-apply", "manual", "all:1h");
    let f = &r.f;
    let disk = laid_out(&r, DISK);
    // Before the journal (sealed, undo) the next attempt starts over and the pieces are
    // sent again; after it (data-file, data) the next open of the replica rolls the
    // apply forward from the staged pieces.
    for (i, phase) in [
        "apply:sealed",
        "apply:undo",
        "apply:data-file",
        "apply:data",
    ]
    .iter()
    .enumerate()
    {
        f.unmount();
        ok(drfs()
            .env("DRFS_FAULT", phase)
            .arg("mount")
            .arg(&f.store)
            .arg(&f.mnt));
        write_direct(
            &disk,
            &random_pieces(DISK, 200, 10 + i as u64),
            4096,
            5 + i as u8,
        );
        let pre = format!("pre-{i}");
        r.snapshot(&pre);
        let before: Vec<serde_json::Value> = r.points();
        let out = r.ship_output();
        assert!(!out.status.success(), "{phase}: the receiver was to die");
        let partials = staged_partials(&r.replica);
        assert!(partials > 0, "{phase}: no partial block was staged");
        f.unmount();
        f.mount(&[]);
        let id = r.ship();
        // A point the receiver's successor finished from the staged pieces holds the
        // store as it was at the failed cut (the next cycle sends those blocks whole
        // again, so only this check sees how the pieces were applied).
        let finished: Vec<String> = r
            .points()
            .iter()
            .filter_map(|p| p["id"].as_str().map(str::to_string))
            .filter(|p| *p != id && !before.iter().any(|b| b["id"] == p.as_str()))
            .collect();
        let after_journal = i >= 2;
        assert_eq!(
            finished.len(),
            usize::from(after_journal),
            "{phase}: {finished:?}"
        );
        for p in &finished {
            let got = r.restore(p);
            common::rep::same_tree(&r.snaps.join(&pre), &got, &format!("{phase}: point {p}"));
        }
        eprintln!(
            "{phase}: {partials} partial blocks staged when the receiver died; finished from them: {finished:?}; then point {id}"
        );
        r.check_latest();
        r.check_point(&id);
    }
    // And a cycle of pieces with nothing in the way, applied as pieces.
    write_direct(&disk, &random_pieces(DISK, 200, 20), 4096, 9);
    let id = r.ship();
    assert!(partial_blocks(f) > 0, "no pieces");
    r.check_latest();
    r.check_point(&id);
    f.unmount();
}
