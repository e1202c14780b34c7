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
use drfs::wire::{Block, Msg, Partial, Writer, zero_hash};

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
    // The planted-symlink case binds a directory that holds something.
    let mut w = begun(&mut out, 0, true);
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
    s.truncate(13);
    s.extend_from_slice(&u32::MAX.to_le_bytes());
    s.extend_from_slice(&[1; 64]);
    c.refused(&s, "a 4 GiB frame");
    c.refused(b"GET / HTTP/1.1\r\n\r\n", "not a drfs stream");
    let many = manifest((0..3).map(|_| ok_entry()).collect());
    c.refused(&stream(&[blk], many), "one path three times");
}

/// A stream into `out` up to the cycle's first block: hello (binding the replica, with
/// `seed`), begin (of the generation after `base`, 0 for none).
fn begun(out: &mut Vec<u8>, base: u64, seed: bool) -> Writer<&mut Vec<u8>> {
    let mut w = Writer::new(out).unwrap();
    w.msg(&Msg::Hello {
        store_id: "s0".into(),
        block_size: BS,
        init: true,
        keep: "all:1h".into(),
        seed,
        planned: false,
        reprotect: None,
    })
    .unwrap();
    w.msg(&Msg::Begin {
        generation: base + 1,
        base: (base > 0).then_some(base),
        cut_id: "x".into(),
        resync: false,
    })
    .unwrap();
    w
}

/// A cycle of partial blocks on generation `base`: begin, the pieces, commit, bye.
fn partial_stream(base: u64, parts: &[Partial], m: Manifest) -> Vec<u8> {
    let mut out = Vec::new();
    let mut w = begun(&mut out, base, false);
    for p in parts {
        w.partial(p).unwrap();
    }
    w.msg(&Msg::Commit {
        manifest: Box::new(Manifest {
            generation: base + 1,
            time_ns: m.time_ns + base as i64,
            ..m
        }),
    })
    .unwrap();
    w.msg(&Msg::Bye).unwrap();
    out
}

/// Piece 1 of a 64 KiB block changed to `fill`, on `old`: the partial frame for it.
fn piece_one(old: &[u8], fill: u8) -> (Partial, Vec<u8>) {
    let mut new = old.to_vec();
    new[4096..8192].fill(fill);
    let p = Partial {
        id: FileId(1),
        offset: 0,
        len: BS as u32,
        hash: *blake3::hash(&new).as_bytes(),
        data: 0b10,
        zero: 0,
        bytes: new[4096..8192].to_vec(),
    };
    (p, new)
}

#[test]
#[cfg_attr(not(drfs_root), ignore = "mounts FUSE filesystems: run as root")]
fn partial_blocks_are_composed_on_the_latest_block_and_checked_whole() {
    let c = Case::new("hostile-partial");
    let old: Vec<u8> = (0..BS).map(|i| (i % 253) as u8).collect();
    let m = || manifest(vec![entry("f", Kind::File, Some(1), BS)]);
    let (good, new) = piece_one(&old, 0xaa);
    c.refused(
        &partial_stream(0, std::slice::from_ref(&good), m()),
        "a partial block before a first point",
    );
    let first = c.feed(&stream(&[data_block(1, 0, old.clone())], m()));
    assert!(first.status.success(), "{first:?}");
    // Pieces that do not make the block their BLAKE3 names with the replica's.
    let mut bad = good.clone();
    bad.bytes[5] ^= 1;
    let out = c.feed(&partial_stream(1, &[bad], m()));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "a partial block failing its BLAKE3 was accepted"
    );
    assert!(err.contains("fails its BLAKE3"), "{err}");
    assert_eq!(std::fs::read(c.replica.join("f")).unwrap(), old);
    // Pieces that check out, but of a block beyond any file (composed on zeros there):
    // refused before anything is staged or written.
    let mut far = good.clone();
    far.offset = 1 << 52;
    let mut block = vec![0u8; BS as usize];
    block[4096..8192].fill(0xaa);
    far.hash = *blake3::hash(&block).as_bytes();
    let out = c.feed(&partial_stream(1, &[far], m()));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "a partial block beyond any file was accepted"
    );
    assert!(err.contains("beyond any file"), "{err}");
    assert_eq!(std::fs::metadata(c.replica.join("f")).unwrap().len(), BS);
    // The right pieces make the new block, and the old one is kept in the older point.
    let out = c.feed(&partial_stream(1, &[good], m()));
    assert!(out.status.success(), "{out:?}");
    assert_eq!(std::fs::read(c.replica.join("f")).unwrap(), new);
    ok(drfs().arg("verify").arg(&c.replica).arg("--all"));
}

/// `plain` (a sender's greeting and frames) with its frames compressed as zstd frames:
/// those before the commit in one, the commit and bye in another. The greeting's codec
/// byte says zstd.
fn compressed(plain: &[u8], commit_at: usize) -> (Vec<u8>, std::ops::Range<usize>) {
    let mut out = plain[..13].to_vec();
    out[12] = 1;
    let a = zstd::encode_all(&plain[13..commit_at], 3).unwrap();
    let first = out.len()..out.len() + a.len();
    out.extend(a);
    out.extend(zstd::encode_all(&plain[commit_at..], 3).unwrap());
    (out, first)
}

#[test]
#[cfg_attr(not(drfs_root), ignore = "mounts FUSE filesystems: run as root")]
fn compressed_streams_apply_and_corrupt_frames_or_bombs_are_refused() {
    let c = Case::new("hostile-zstd");
    let data: Vec<u8> = (0..65536u32).map(|i| (i % 251) as u8).collect();
    let m = manifest(vec![entry("f", Kind::File, Some(1), 65536)]);
    let plain = stream(&[data_block(1, 0, data.clone())], m);
    // Where the commit begins: after hello, begin and the block.
    let head = {
        let mut out = Vec::new();
        let mut w = Writer::new(&mut out).unwrap();
        w.msg(&Msg::Hello {
            store_id: "s0".into(),
            block_size: BS,
            init: true,
            keep: "all:1h".into(),
            seed: true,
            planned: false,
            reprotect: None,
        })
        .unwrap();
        w.msg(&Msg::Begin {
            generation: 1,
            base: None,
            cut_id: "x".into(),
            resync: false,
        })
        .unwrap();
        w.block(&data_block(1, 0, data.clone())).unwrap();
        out.len()
    };
    let (good, first) = compressed(&plain, head);
    assert!(
        good.len() < plain.len() / 10,
        "{} of {}",
        good.len(),
        plain.len()
    );
    // A byte flipped anywhere in the compressed frames before the commit: refused, and
    // nothing applied (the block's CRC32 and BLAKE3 are over the uncompressed bytes).
    for at in (first.start + 4..first.end).step_by((first.len() / 12).max(1)) {
        let mut bad = good.clone();
        bad[at] ^= 0x55;
        c.refused(
            &bad,
            &format!("compressed byte {at} of {} flipped", good.len()),
        );
    }
    // A zstd frame that asks for a 2 GiB window and announces 1 TiB of content: refused
    // when its header is read, before anything is allocated for it.
    let mut bomb = good[..13].to_vec();
    bomb.extend_from_slice(&[0x28, 0xb5, 0x2f, 0xfd, 0xc0, 21 << 3]);
    bomb.extend_from_slice(&(1u64 << 40).to_le_bytes());
    bomb.extend_from_slice(&[0; 64]);
    c.refused(&bomb, "a zstd frame asking for a 2 GiB window");
    // 1 GiB of zeros in a few KiB of zstd: read as a frame length of 0, refused at once.
    let zeros = vec![0u8; 64 << 20];
    let mut e = zstd::stream::write::Encoder::new(Vec::new(), 3).unwrap();
    for _ in 0..16 {
        std::io::Write::write_all(&mut e, &zeros).unwrap();
    }
    let mut bomb = good[..13].to_vec();
    bomb.extend(e.finish().unwrap());
    assert!(bomb.len() < 200 << 10, "{}", bomb.len());
    let t = std::time::Instant::now();
    c.refused(&bomb, "1 GiB of zeros in a small zstd stream");
    eprintln!("refused in {:?}", t.elapsed());
    // The whole stream applies, byte-identical.
    let out = c.feed(&good);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(std::fs::read(c.replica.join("f")).unwrap(), data);
}

/// A session from store `store` (a planned failover's, with `planned`) that binds no
/// new replica: hello, then `then`, then bye.
fn session_stream(store: &str, planned: bool, then: &[Msg]) -> Vec<u8> {
    let mut out = Vec::new();
    let mut w = Writer::new(&mut out).unwrap();
    w.msg(&Msg::Hello {
        store_id: store.into(),
        block_size: BS,
        init: false,
        keep: "all:1h".into(),
        seed: false,
        planned,
        reprotect: None,
    })
    .unwrap();
    for m in then {
        w.msg(m).unwrap();
    }
    w.msg(&Msg::Bye).unwrap();
    out
}

fn promote(point: &str, target: &str) -> Msg {
    Msg::Promote {
        point: point.into(),
        reverse: Box::new(drfs::wire::Reverse {
            target: target.into(),
            replica_id: "s0".into(),
            interval: drfs::model::Interval::Manual,
            keep: "all:1h".into(),
            group: drfs::model::Group::Store,
            expect_every: None,
            compress: None,
            bwlimit: None,
        }),
    }
}

#[test]
#[cfg_attr(not(drfs_root), ignore = "mounts FUSE filesystems: run as root")]
fn a_planned_session_promotes_only_for_its_primary_at_its_latest_point() {
    let c = Case::new("hostile-planned");
    let m = manifest(vec![entry("f", Kind::File, Some(1), BS)]);
    let first = c.feed(&stream(&[data_block(1, 0, vec![7; BS as usize])], m));
    assert!(first.status.success(), "{first:?}");
    let cfg = || std::fs::read_to_string(c.replica.join(".drfs/state.toml")).unwrap();
    let latest = std::fs::read_to_string(c.replica.join(".drfs/latest")).unwrap();
    let back = "ssh://primary.example/srv/store";
    let begin = Msg::Begin {
        generation: 2,
        base: Some(1),
        cut_id: "y".into(),
        resync: false,
    };
    let index = Msg::IndexRequest {
        id: FileId(1),
        first: 0,
        count: 1 << 20,
    };
    let plain = session_stream("s0", false, &[promote(&latest, back)]);
    for (bytes, why, says) in [
        (
            plain,
            "a promotion outside a planned session",
            "only a planned failover's session",
        ),
        (
            session_stream("s1", true, &[promote(&latest, back)]),
            "another store's session",
            "another store",
        ),
        (
            session_stream("s0", true, &[promote("00000009", back)]),
            "a point that is not the latest",
            "not 00000009",
        ),
        (
            session_stream("s0", true, &[promote(&latest, "/srv/store")]),
            "a way back that is not ssh",
            "must be an ssh:// target",
        ),
        (
            session_stream("s0", true, &[begin]),
            "a cycle in a planned session",
            "ships no cycle",
        ),
        (
            session_stream("s0", true, &[index]),
            "an index request too large",
            "too large",
        ),
    ] {
        let out = c.feed(&bytes);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{why}: accepted");
        assert_eq!(err.trim_end().lines().count(), 1, "{why}: {err}");
        assert!(err.contains(says), "{why}: {err}");
        assert!(cfg().contains("role = \"replica\""), "{why}: promoted");
    }
    // Its own primary, at the latest point: promoted, with the way back as settings.
    let out = c.feed(&session_stream("s0", true, &[promote(&latest, back)]));
    assert!(out.status.success(), "{out:?}");
    let cfg = cfg();
    assert!(cfg.contains("role = \"primary\""), "{cfg}");
    assert!(cfg.contains(back), "{cfg}");
    assert!(
        !cfg.contains("ssh_command") && !cfg.contains("hooks"),
        "{cfg}"
    );
}
