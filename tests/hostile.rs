//! Hostile streams into `drfs receive`: paths outside the replica (`..`, absolute, through a
//! symlink, into `.drfs`), absurd sizes, a bad BLAKE3, garbage. Each is refused with a
//! non-zero exit; no point is created and nothing outside the replica is touched.

mod common;

use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};

use common::*;
use drfs::model::FileId;
use drfs::model::RelPath;
use drfs::model::{Consistency, Entry, Kind, Manifest};
use drfs::wire::{Block, Msg, Writer, zero_hash};

const BS: u64 = 65536;

fn entry(path: &str, kind: Kind, id: Option<u64>, size: u64) -> Entry {
    Entry {
        path: RelPath::from_bytes(path.as_bytes()),
        kind,
        id: id.map(FileId),
        size,
        mode: if kind == Kind::Dir { 0o755 } else { 0o644 },
        uid: 0,
        gid: 0,
        mtime_ns: 0,
        target: None,
        rdev: None,
    }
}

fn manifest(entries: Vec<Entry>) -> Manifest {
    Manifest {
        version: 1,
        generation: 1,
        cut_id: "x".into(),
        time: "2026-11-21T00:00:00Z".into(),
        time_ns: 1,
        consistency: Consistency::Crash,
        block_size: BS,
        groups: vec![],
        entries,
        origin: None,
    }
}

fn data_block(id: u64, offset: u64, data: Vec<u8>) -> Block {
    Block {
        id: FileId(id),
        offset,
        len: data.len() as u32,
        zero: false,
        hash: *blake3::hash(&data).as_bytes(),
        data,
    }
}

/// A whole cycle as a byte stream: hello (binding the replica), begin, blocks, commit.
fn stream(blocks: &[Block], m: Manifest) -> Vec<u8> {
    let mut out = Vec::new();
    let mut w = Writer::new(&mut out).unwrap();
    w.msg(&Msg::Hello {
        store_id: "s0".into(),
        block_size: BS,
        init: true,
        keep: "all:1h".into(),
        // The planted-symlink case binds a directory that holds something.
        seed: true,
    })
    .unwrap();
    w.msg(&Msg::Begin {
        generation: 1,
        base: None,
        cut_id: "x".into(),
        resync: false,
    })
    .unwrap();
    for b in blocks {
        w.block(b).unwrap();
    }
    w.msg(&Msg::Commit {
        manifest: Box::new(m),
    })
    .unwrap();
    w.msg(&Msg::Bye).unwrap();
    out
}

struct Case {
    /// Owns the temporary directories (removed when the case ends).
    _f: Fixture,
    replica: std::path::PathBuf,
    outside: std::path::PathBuf,
}

impl Case {
    fn new(name: &str) -> Case {
        let f = Fixture::new(name);
        let replica = f.root.join("replica");
        let outside = f.root.join("outside");
        std::fs::create_dir(&replica).unwrap();
        std::fs::create_dir(&outside).unwrap();
        Case {
            _f: f,
            replica,
            outside,
        }
    }

    fn feed(&self, bytes: &[u8]) -> std::process::Output {
        let mut child = Command::new(BIN)
            .arg("receive")
            .arg(&self.replica)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut stdin = child.stdin.take().unwrap();
        let _ = stdin.write_all(bytes);
        drop(stdin);
        child.wait_with_output().unwrap()
    }

    /// The stream was refused and left nothing behind.
    fn refused(&self, bytes: &[u8], why: &str) {
        let out = self.feed(bytes);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{why}: accepted");
        assert_eq!(
            err.trim_end().lines().count(),
            1,
            "{why}: not one line: {err}"
        );
        assert!(
            empty(&self.outside),
            "{why}: something was written outside the replica"
        );
        let points = self.replica.join(".drfs/points");
        assert!(
            !points.exists() || empty(&points),
            "{why}: a point was created"
        );
        let leftovers: Vec<_> = std::fs::read_dir(&self.replica)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n != ".drfs" && n != "link")
            .collect();
        assert!(
            leftovers.is_empty(),
            "{why}: the replica's tree changed: {leftovers:?}"
        );
        eprintln!("{why}: refused: {}", err.trim());
    }
}

fn empty(p: &Path) -> bool {
    std::fs::read_dir(p)
        .map(|mut d| d.next().is_none())
        .unwrap_or(true)
}

#[test]
#[cfg_attr(not(drfs_root), ignore = "mounts FUSE filesystems: run as root")]
fn paths_outside_the_replica_are_refused() {
    let c = Case::new("hostile-path");
    let blk = data_block(1, 0, vec![0x41; 100]);
    for (path, why) in [
        ("../outside/evil", "a .. path"),
        ("/tmp/evil", "an absolute path"),
        (".drfs/state.toml", "a path into the state directory"),
        ("a/../../outside/evil", "a .. in the middle"),
    ] {
        let m = manifest(vec![entry(path, Kind::File, Some(1), 100)]);
        c.refused(&stream(std::slice::from_ref(&blk), m), why);
    }
    // A file below a symlink that points outside.
    let mut link = entry("link", Kind::Symlink, None, 0);
    link.target = Some(RelPath::from_bytes(
        c.outside.as_os_str().as_encoded_bytes(),
    ));
    let m = manifest(vec![link, entry("link/evil", Kind::File, Some(1), 100)]);
    c.refused(&stream(&[blk], m), "a file below a symlink");
}

#[test]
#[cfg_attr(not(drfs_root), ignore = "mounts FUSE filesystems: run as root")]
fn a_symlink_planted_in_the_replica_leads_nowhere() {
    let c = Case::new("hostile-plant");
    std::os::unix::fs::symlink(&c.outside, c.replica.join("link")).unwrap();
    let blk = data_block(1, 0, vec![0x42; 100]);
    // The stream makes `link` a directory with a file in it: drfs sets the planted symlink
    // aside (into .drfs/hold) instead of writing through it.
    let m = manifest(vec![
        entry("link", Kind::Dir, None, 0),
        entry("link/evil", Kind::File, Some(1), 100),
    ]);
    let out = c.feed(&stream(&[blk], m));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(empty(&c.outside), "written through the planted symlink");
    assert!(c.replica.join("link").is_dir() && !c.replica.join("link").is_symlink());
    assert_eq!(
        std::fs::read(c.replica.join("link/evil")).unwrap(),
        vec![0x42; 100]
    );
}

#[test]
#[cfg_attr(not(drfs_root), ignore = "mounts FUSE filesystems: run as root")]
fn absurd_sizes_and_bad_data_are_refused() {
    let c = Case::new("hostile-size");
    let ok_entry = || entry("f", Kind::File, Some(1), 100);
    let blk = data_block(1, 0, vec![1; 100]);
    c.refused(
        &stream(
            std::slice::from_ref(&blk),
            manifest(vec![entry("f", Kind::File, Some(1), 1 << 60)]),
        ),
        "a 1 EiB file",
    );
    c.refused(
        &stream(
            &[data_block(1, 1 << 60, vec![1; 100])],
            manifest(vec![ok_entry()]),
        ),
        "a block 1 EiB in",
    );
    c.refused(
        &stream(
            &[data_block(1, 100, vec![1; 100])],
            manifest(vec![ok_entry()]),
        ),
        "an unaligned block",
    );
    let mut bad = blk.clone();
    bad.data[7] ^= 1;
    c.refused(
        &stream(&[bad], manifest(vec![ok_entry()])),
        "a block failing its BLAKE3",
    );
    let mut z = Block {
        id: FileId(1),
        offset: 0,
        len: 100,
        zero: true,
        hash: zero_hash(99),
        data: vec![],
    };
    c.refused(
        &stream(&[z.clone()], manifest(vec![ok_entry()])),
        "a zero block with a wrong hash",
    );
    z.hash = zero_hash(100);
    c.refused(
        &stream(&[z], manifest(vec![entry("d/f", Kind::File, Some(1), 100)])),
        "a file without its directory",
    );
    // A frame announcing 4 GiB.
    let mut s = stream(&[], manifest(vec![]));
    s.truncate(12);
    s.extend_from_slice(&u32::MAX.to_le_bytes());
    s.extend_from_slice(&[1; 64]);
    c.refused(&s, "a 4 GiB frame");
    c.refused(b"GET / HTTP/1.1\r\n\r\n", "not a drfs stream");
    let many = manifest((0..3).map(|_| ok_entry()).collect());
    c.refused(&stream(&[blk], many), "one path three times");
}
