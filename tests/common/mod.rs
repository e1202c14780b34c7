//! Shared test fixture: a temporary store and mountpoint, the real `drfs` binary, and a
//! guard that unmounts and stops the daemon even when the test fails. The temp tree is
//! removed only after the mountpoint is verifiably not a mount any more, so a failing test
//! can never recurse through a live mount into the store.
#![allow(dead_code)]

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

pub const BIN: &str = env!("CARGO_BIN_EXE_drfs");

pub fn drfs() -> Command {
    Command::new(BIN)
}

/// Runs a command, panicking with its output unless it succeeds.
pub fn ok(cmd: &mut Command) -> Output {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("running {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}):\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// Path of a required external tool; a missing tool fails the test (CI installs them).
pub fn need(tool: &str) -> PathBuf {
    let paths = std::env::var_os("PATH").unwrap_or_default();
    let extra = [
        PathBuf::from(std::env::var("HOME").unwrap_or_default()).join(".cargo/bin"),
        PathBuf::from("/usr/sbin"),
        PathBuf::from("/sbin"),
    ];
    std::env::split_paths(&paths)
        .chain(extra)
        .map(|d| d.join(tool))
        .find(|p| p.is_file())
        .unwrap_or_else(|| panic!("{tool} is not installed; `bash .ci/run` installs it"))
}

pub fn is_mounted(p: &Path) -> bool {
    let text = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let want = p.as_os_str().as_bytes();
    text.lines().any(|l| {
        let f: Vec<&str> = l.split(' ').collect();
        f.get(4).map(|m| unescape(m)) == Some(want.to_vec())
    })
}

fn unescape(s: &str) -> Vec<u8> {
    let b = s.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 4 <= b.len() {
            if let Ok(v) = u8::from_str_radix(&s[i + 1..i + 4], 8) {
                out.push(v);
                i += 4;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    out
}

/// Pids of drfs daemons serving `mnt` (found by command line, so --no-track ones too).
pub fn daemons_of(mnt: &Path) -> Vec<i32> {
    let mut out = Vec::new();
    let Ok(rd) = std::fs::read_dir("/proc") else {
        return out;
    };
    for e in rd.flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let Ok(cmd) = std::fs::read(e.path().join("cmdline")) else {
            continue;
        };
        let args: Vec<&[u8]> = cmd.split(|&b| b == 0).collect();
        let is_daemon = args.iter().any(|a| *a == b"--foreground")
            && args.iter().any(|a| *a == mnt.as_os_str().as_bytes());
        if is_daemon {
            out.push(pid);
        }
    }
    out
}

pub fn wait_gone(pid: i32, within: Duration) -> bool {
    let end = Instant::now() + within;
    while Instant::now() < end {
        if unsafe { libc::kill(pid, 0) } != 0 {
            return true;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    false
}

pub struct Fixture {
    pub root: PathBuf,
    pub store: PathBuf,
    pub mnt: PathBuf,
    /// Further mounts the test made (browse, test failover, loop mounts), released in
    /// reverse order before the store's.
    extra: std::sync::Mutex<Vec<PathBuf>>,
}

impl Fixture {
    pub fn new(name: &str) -> Fixture {
        let base = std::env::var_os("DRFS_TEST_DIR").map_or_else(std::env::temp_dir, PathBuf::from);
        let root = tempfile::Builder::new()
            .prefix(&format!("drfs-{name}-"))
            .tempdir_in(base)
            .expect("temp dir")
            .keep();
        let root = root.canonicalize().expect("canonical temp dir");
        let (store, mnt) = (root.join("store"), root.join("mnt"));
        std::fs::create_dir(&store).expect("store dir");
        std::fs::create_dir(&mnt).expect("mnt dir");
        Fixture {
            root,
            store,
            mnt,
            extra: Default::default(),
        }
    }

    /// Makes directory `rel` under the fixture root and registers it as a mountpoint the
    /// guard releases.
    pub fn mountpoint(&self, rel: &str) -> PathBuf {
        let p = self.root.join(rel);
        std::fs::create_dir_all(&p).expect("mountpoint dir");
        self.extra
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(p.clone());
        p
    }

    pub fn mount(&self, extra: &[&str]) {
        ok(drfs()
            .arg("mount")
            .arg(&self.store)
            .arg(&self.mnt)
            .args(extra));
        assert!(
            is_mounted(&self.mnt),
            "drfs mount returned but nothing is mounted"
        );
    }

    pub fn unmount(&self) {
        ok(drfs().arg("unmount").arg(&self.mnt));
        assert!(!is_mounted(&self.mnt));
    }

    /// SIGKILLs the daemon and waits until it is gone (the mount is then stale).
    pub fn kill_daemon(&self) {
        let pids = daemons_of(&self.mnt);
        assert!(!pids.is_empty(), "no daemon serves {}", self.mnt.display());
        for pid in pids {
            unsafe { libc::kill(pid, libc::SIGKILL) };
            assert!(
                wait_gone(pid, Duration::from_secs(10)),
                "daemon {pid} survived SIGKILL"
            );
        }
    }

    pub fn m(&self, rel: &str) -> PathBuf {
        self.mnt.join(rel)
    }

    pub fn s(&self, rel: &str) -> PathBuf {
        self.store.join(rel)
    }

    pub fn changes(&self) -> serde_json::Value {
        let out = ok(drfs().arg("changes").arg(&self.store).arg("--json"));
        serde_json::from_slice(&out.stdout).expect("changes --json is JSON")
    }

    /// The tracked entry of file `rel` in `drfs changes --json`.
    pub fn file_changes(&self, rel: &str) -> serde_json::Value {
        let c = self.changes();
        c["files"]
            .as_array()
            .and_then(|fs| fs.iter().find(|f| f["path"] == rel).cloned())
            .unwrap_or_else(|| panic!("{rel} is not tracked: {c:#}"))
    }

    /// Dirty blocks of `rel` as a set.
    pub fn dirty_blocks(&self, rel: &str) -> std::collections::BTreeSet<u64> {
        let f = self.file_changes(rel);
        let mut set = std::collections::BTreeSet::new();
        for r in f["dirty"].as_array().expect("dirty array") {
            let (a, b) = (r[0].as_u64().unwrap(), r[1].as_u64().unwrap());
            set.extend(a..b);
        }
        set
    }
}

/// Unmounts whatever is at `mnt` (a drfs mount through `drfs unmount`, anything else
/// lazily) and waits for drfs daemons serving it to end.
pub fn release(mnt: &Path) {
    for _ in 0..4 {
        if !is_mounted(mnt) {
            break;
        }
        let _ = Command::new(BIN).arg("unmount").arg(mnt).output();
        if is_mounted(mnt) {
            let c = std::ffi::CString::new(mnt.as_os_str().as_bytes()).unwrap_or_default();
            unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
            let _ = Command::new("fusermount3")
                .args(["-u", "-z", "-q"])
                .arg(mnt)
                .status();
        }
    }
    for pid in daemons_of(mnt) {
        if !wait_gone(pid, Duration::from_secs(5)) {
            unsafe { libc::kill(pid, libc::SIGKILL) };
            wait_gone(pid, Duration::from_secs(5));
        }
    }
}

impl Drop for Fixture {
    fn drop(&mut self) {
        let mut all: Vec<PathBuf> = self
            .extra
            .lock()
            .map(|v| v.iter().rev().cloned().collect())
            .unwrap_or_default();
        all.push(self.mnt.clone());
        for m in &all {
            release(m);
        }
        if let Some(m) = all.iter().find(|m| is_mounted(m)) {
            eprintln!(
                "leaving {} in place: {} is still mounted",
                self.root.display(),
                m.display()
            );
            return;
        }
        let _ = std::fs::remove_dir_all(&self.root);
    }
}

/// Runs a shell command line with `bash -c`, requiring success.
pub fn sh(script: &str) -> Output {
    ok(Command::new("bash")
        .arg("-euo")
        .arg("pipefail")
        .arg("-c")
        .arg(script))
}

pub fn os(s: &str) -> &OsStr {
    OsStr::new(s)
}
pub mod rep;

/// Asserts a failure with a single-line message containing `needle`.
pub fn fails(out: Output, needle: &str) {
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "expected failure, got success: {err}"
    );
    assert_eq!(err.trim_end().lines().count(), 1, "not one line: {err:?}");
    assert!(err.contains(needle), "{err:?} does not mention {needle:?}");
    assert!(!err.contains("panicked"), "{err}");
}

/// XORs the byte at `off` of `p` with 0x20 (bit rot, a bad disk, a stray write).
pub fn flip(p: &Path, off: u64) {
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(p)
        .unwrap();
    let mut b = [0u8];
    f.read_exact_at(&mut b, off).unwrap();
    b[0] ^= 0x20;
    f.write_all_at(&b, off).unwrap();
    f.sync_all().unwrap();
}

/// `drfs ARGS`, its output.
pub fn run(args: &[&OsStr]) -> Output {
    drfs().args(args).output().unwrap()
}

/// Makes `img` a sparse file of `size` bytes holding a fresh ext4 (mkfs.ext4 -q -F and
/// `extra` options).
pub fn make_ext4(img: &Path, size: u64, extra: &[&str]) {
    std::fs::File::create(img)
        .expect("image file")
        .set_len(size)
        .expect("image size");
    ok(Command::new(need("mkfs.ext4"))
        .args(["-q", "-F"])
        .args(extra)
        .arg(img));
}
