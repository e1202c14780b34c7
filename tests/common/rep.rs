//! Replication test helpers: a protected store with its replica, cycles, copies of the
//! primary taken at each cut, and the check that a point, rebuilt from the replica's latest
//! files and undo records, is byte-identical to the copy (content, sizes, modes, symlinks).
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use super::*;

pub struct Rep {
    pub f: Fixture,
    pub replica: PathBuf,
    pub snaps: PathBuf,
}

impl Rep {
    /// A mounted, protected store (manual cycles unless `interval` is given).
    pub fn new(name: &str, interval: &str, keep: &str) -> Rep {
        let f = Fixture::new(name);
        let replica = f.root.join("replica");
        let snaps = f.root.join("snaps");
        std::fs::create_dir(&replica).unwrap();
        std::fs::create_dir(&snaps).unwrap();
        f.mount(&[]);
        ok(drfs()
            .arg("protect")
            .arg(&f.store)
            .arg("--to")
            .arg(&replica)
            .args(["--interval", interval, "--keep", keep]));
        Rep { f, replica, snaps }
    }

    pub fn ship_output(&self) -> Output {
        drfs().arg("ship").arg(&self.f.store).output().unwrap()
    }

    /// Runs a cycle (no writes may run meanwhile), copies the primary as of that cut, and
    /// returns the new point's id.
    pub fn ship(&self) -> String {
        ok(drfs().arg("ship").arg(&self.f.store));
        let id = self.latest();
        self.snapshot(&id);
        id
    }

    pub fn points(&self) -> Vec<serde_json::Value> {
        let out = ok(drfs().arg("points").arg(&self.replica).arg("--json"));
        serde_json::from_slice(&out.stdout).unwrap()
    }

    pub fn latest(&self) -> String {
        self.points()[0]["id"].as_str().unwrap().to_string()
    }

    /// Copies the store (without `.drfs`) as it is now.
    pub fn snapshot(&self, id: &str) {
        let dst = self.snaps.join(id);
        std::fs::create_dir(&dst).unwrap();
        sh(&format!(
            "cd {} && tar --sparse --exclude=./.drfs -cf - . | tar -C {} -xpf -",
            self.f.store.display(),
            dst.display()
        ));
    }

    /// Rebuilds point `id` with `drfs restore` into a fresh directory.
    pub fn restore(&self, id: &str) -> PathBuf {
        let dst = self.f.root.join(format!("restored-{id}"));
        let _ = std::fs::remove_dir_all(&dst);
        ok(drfs()
            .arg("restore")
            .arg(&self.replica)
            .args(["--point", id, "--to"])
            .arg(&dst));
        dst
    }

    /// Asserts that point `id`, rebuilt, equals the copy taken at its cut.
    pub fn check_point(&self, id: &str) {
        let got = self.restore(id);
        same_tree(&self.snaps.join(id), &got, &format!("point {id}"));
    }

    /// Asserts that the replica's latest files equal the primary's store.
    pub fn check_latest(&self) {
        same_tree_excluding_state(&self.f.store, &self.replica, "latest files");
    }
}

/// A listing of a tree: path, type, mode, size, symlink target (not mtimes of dirs).
fn listing(dir: &Path) -> String {
    let out = Command::new("bash")
        .arg("-c")
        .arg(format!(
            "cd {} && find . -path ./.drfs -prune -o -printf '%p %y %m %s %l\\n' | grep -v '^\\./\\.drfs ' | sort",
            dir.display()
        ))
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

pub fn same_tree(want: &Path, got: &Path, what: &str) {
    let (a, b) = (listing(want), listing(got));
    assert_eq!(a, b, "{what}: listings differ");
    let diff = Command::new("diff")
        .args(["-r", "--no-dereference", "-q"])
        .arg(want)
        .arg(got)
        .output()
        .unwrap();
    assert!(
        diff.status.success(),
        "{what}: content differs:\n{}",
        String::from_utf8_lossy(&diff.stdout)
    );
}

pub fn same_tree_excluding_state(want: &Path, got: &Path, what: &str) {
    let (a, b) = (listing(want), listing(got));
    assert_eq!(a, b, "{what}: listings differ");
    let diff = Command::new("diff")
        .args(["-r", "--no-dereference", "-q", "--exclude=.drfs"])
        .arg(want)
        .arg(got)
        .output()
        .unwrap();
    assert!(
        diff.status.success(),
        "{what}: content differs:\n{}",
        String::from_utf8_lossy(&diff.stdout)
    );
}

/// The last cycle's figures (`cycle.json` `last`).
pub fn last_cycle(f: &Fixture) -> serde_json::Value {
    let st: serde_json::Value =
        serde_json::from_slice(&std::fs::read(f.s(".drfs/cycle.json")).unwrap()).unwrap();
    st["last"].clone()
}

/// Writes `len` bytes of `fill`-seeded data at each offset of `offs` with O_DIRECT (a
/// VM's writes); returns the 4 KiB pieces they cover.
pub fn write_direct(
    path: &Path,
    offs: &[u64],
    len: usize,
    fill: u8,
) -> std::collections::BTreeSet<u64> {
    use std::os::unix::fs::{FileExt, OpenOptionsExt};
    let file = std::fs::OpenOptions::new()
        .write(true)
        .custom_flags(libc::O_DIRECT)
        .open(path)
        .unwrap();
    let layout = std::alloc::Layout::from_size_align(len, 4096).unwrap();
    // SAFETY: a fresh allocation of `len` bytes, freed below.
    let ptr = unsafe { std::alloc::alloc(layout) };
    assert!(!ptr.is_null());
    let buf = unsafe { std::slice::from_raw_parts_mut(ptr, len) };
    let mut pieces = std::collections::BTreeSet::new();
    for (i, &off) in offs.iter().enumerate() {
        for (k, b) in buf.iter_mut().enumerate() {
            *b = (k as u64 * 131 + i as u64 * 7 + u64::from(fill)).to_le_bytes()[0] | 1;
        }
        file.write_all_at(buf, off).unwrap();
        pieces.extend(off / 4096..(off + len as u64).div_ceil(4096));
    }
    unsafe { std::alloc::dealloc(ptr, layout) };
    pieces
}

/// `n` distinct 4 KiB-aligned offsets in a file of `size` bytes, from `seed`.
pub fn random_pieces(size: u64, n: usize, seed: u64) -> Vec<u64> {
    let mut x = seed | 1;
    let mut seen = std::collections::BTreeSet::new();
    let mut out = Vec::new();
    while out.len() < n {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let p = x % (size / 4096);
        if seen.insert(p) {
            out.push(p * 4096);
        }
    }
    out
}

/// The id of the newest point of `replica` tagged diverged (`drfs points --json`).
pub fn diverged_point(replica: &Path) -> String {
    let out = ok(drfs().arg("points").arg(replica).arg("--json"));
    let pts: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).unwrap();
    pts.iter()
        .rev()
        .find(|p| p["diverged"] == true)
        .and_then(|p| p["id"].as_str())
        .unwrap_or_else(|| panic!("no diverged point in {}: {pts:?}", replica.display()))
        .to_string()
}
