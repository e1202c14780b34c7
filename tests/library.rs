//! The replication library without root or FUSE: a source made in memory ships through
//! `ship::session` over a pipe to `replica::receive` serving a POSIX replica in a temp
//! dir, and every point is read back through `points::view` (and `drfs restore`'s
//! library) and compared with what the source held at its cut. Covers the receive
//! session, the apply, undo records, retention (dropping the oldest point, merging an
//! intermediate one), the read check, and the refusals (a diverged base, a replica of
//! another store), all in-process. Runs as any user.

mod common;

use std::collections::BTreeMap;
use std::io::{BufReader, BufWriter};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::Arc;

use drfs::error::{Class, Result};
use drfs::model::{Consistency, Entry, FileId, Kind, Manifest, RelPath};
use drfs::points::view::PointView;
use drfs::replica::PointStore;
use drfs::replica::posix::Replica;
use drfs::ship::session::{self, Cycle, Hello};
use drfs::ship::{Blocks, Source, SourceFile};

use common::flip;
use drfs::wire::{Reader, Writer};

const BS: u64 = 65536;
const STORE: &str = "00000000feedf00d";

/// A file as a source holds it at a cut, and which blocks changed since the last one.
#[derive(Clone)]
struct MemFile {
    id: FileId,
    path: RelPath,
    data: Vec<u8>,
    whole: bool,
    changed: Vec<(u64, u64)>,
}

struct MemSource(Vec<MemFile>);

impl Source for MemSource {
    fn files(&self) -> Vec<&dyn SourceFile> {
        self.0.iter().map(|f| f as &dyn SourceFile).collect()
    }
}

impl SourceFile for MemFile {
    fn id(&self) -> FileId {
        self.id
    }
    fn path(&self) -> &RelPath {
        &self.path
    }
    fn size(&self) -> u64 {
        self.data.len() as u64
    }
    fn whole(&self) -> bool {
        self.whole
    }
    fn changed(&self) -> Vec<(u64, u64)> {
        self.changed.clone()
    }
    fn blocks(&self) -> Box<dyn Blocks + '_> {
        Box::new(MemBlocks(&self.data))
    }
}

struct MemBlocks<'a>(&'a [u8]);

impl Blocks for MemBlocks<'_> {
    fn surely_zero(&mut self, _b: u64) -> bool {
        false
    }
    fn read(&mut self, b: u64, buf: &mut Vec<u8>) -> Result<bool> {
        let a = ((b * BS) as usize).min(self.0.len());
        let z = (a + BS as usize).min(self.0.len());
        buf.clear();
        buf.extend_from_slice(&self.0[a..z]);
        Ok(buf.iter().all(|&x| x == 0))
    }
}

/// The store's tree at a cut: files by path.
#[derive(Clone, Default)]
struct Tree(BTreeMap<String, (FileId, Vec<u8>)>);

impl Tree {
    fn put(&mut self, path: &str, id: FileId, data: Vec<u8>) {
        self.0.insert(path.to_string(), (id, data));
    }

    fn entries(&self) -> Vec<Entry> {
        let (uid, gid) = unsafe { (libc::geteuid(), libc::getegid()) };
        let mut out = Vec::new();
        let mut dirs = std::collections::BTreeSet::new();
        for p in self.0.keys() {
            if let Some((d, _)) = p.rsplit_once('/') {
                dirs.insert(d.to_string());
            }
        }
        for d in dirs {
            out.push(Entry {
                path: RelPath::from_bytes(d.as_bytes()),
                kind: Kind::Dir,
                id: None,
                size: 0,
                mode: libc::S_IFDIR | 0o755,
                uid,
                gid,
                mtime_ns: 0,
                target: None,
                rdev: None,
            });
        }
        for (p, (id, data)) in &self.0 {
            out.push(Entry {
                path: RelPath::from_bytes(p.as_bytes()),
                kind: Kind::File,
                id: Some(*id),
                size: data.len() as u64,
                mode: libc::S_IFREG | 0o644,
                uid,
                gid,
                mtime_ns: 1_000_000_000,
                target: None,
                rdev: None,
            });
        }
        out.sort_by(|a, b| a.path.cmp(&b.path));
        out
    }
}

/// A receiver serving `root` on a thread, and the sender's ends of the two pipes.
struct Conn {
    w: Writer<BufWriter<UnixStream>>,
    r: Reader<BufReader<UnixStream>>,
    receiver: std::thread::JoinHandle<Result<()>>,
}

fn connect(root: &Path) -> Conn {
    let (mine, theirs) = UnixStream::pair().expect("socket pair");
    let root = root.to_path_buf();
    let receiver = std::thread::spawn(move || {
        let input = theirs.try_clone().expect("clone");
        drfs::replica::receive::serve(&root, input, theirs, None)
    });
    let (w, r) = drfs::wire::greeting::open(
        BufWriter::new(mine.try_clone().expect("clone")),
        BufReader::new(mine),
    )
    .expect("greeting");
    Conn { w, r, receiver }
}

impl Conn {
    fn bye(mut self) -> Result<()> {
        self.w.msg(&drfs::wire::Msg::Bye).expect("bye");
        self.receiver.join().expect("receiver thread")
    }
}

fn hello(keep: &str) -> Hello<'_> {
    Hello {
        store_id: STORE,
        block_size: BS,
        keep,
        seed: false,
    }
}

/// One cycle: `tree` as the cut, `changed` per path (None: compare the whole file).
fn ship(
    root: &Path,
    tree: &Tree,
    changed: &BTreeMap<&str, Option<Vec<(u64, u64)>>>,
    time_ns: i64,
) -> Result<String> {
    let mut c = connect(root);
    let w = session::hello(&mut c.w, &mut c.r, &hello("all:1h"), false)?;
    let base = w.latest.as_ref().map(|l| l.generation);
    let generation = base.unwrap_or(0) + 1;
    let files = tree
        .0
        .iter()
        .filter_map(|(p, (id, data))| {
            let ch = changed.get(p.as_str())?;
            Some(MemFile {
                id: *id,
                path: RelPath::from_bytes(p.as_bytes()),
                data: data.clone(),
                whole: ch.is_none(),
                changed: ch.clone().unwrap_or_default(),
            })
        })
        .collect();
    let manifest = Manifest {
        version: 1,
        generation,
        cut_id: format!("cut{generation}"),
        time: drfs::model::fmt::rfc3339_ns(i128::from(time_ns)),
        time_ns,
        consistency: Consistency::Crash,
        block_size: BS,
        groups: vec![(String::new(), time_ns)],
        entries: tree.entries(),
        origin: None,
    };
    let cycle = Cycle {
        resume: false,
        generation,
        base,
        cut_id: &manifest.cut_id.clone(),
        resync: base.is_none(),
    };
    let (point, _) = session::send(
        &mut c.w,
        &mut c.r,
        &cycle,
        &MemSource(files),
        manifest,
        None,
    )?;
    c.bye()?;
    Ok(point.id)
}

fn bind(root: &Path, keep: &str) {
    let mut c = connect(root);
    session::hello(&mut c.w, &mut c.r, &hello(keep), true).expect("bind");
    c.bye().expect("receiver ends cleanly");
}

/// Reads every file of point `id` through `points::view` and compares it with `want`.
fn check_point(root: &Path, id: &str, want: &Tree) {
    let store: Arc<dyn PointStore> = Arc::new(Replica::open_only(root).expect("replica"));
    let view = PointView::open(store, id).expect("point");
    let files: Vec<&Entry> = drfs::points::view::files(&view).collect();
    assert_eq!(files.len(), want.0.len(), "point {id}: files");
    for e in files {
        let (wid, data) = &want.0[&e.path.to_string()];
        assert_eq!(e.id, Some(*wid));
        let f = view.file(e).expect("open");
        let mut got = vec![0u8; data.len() + 10];
        let n = f.read_at(&mut got, 0).expect("read");
        assert_eq!(n, data.len(), "point {id}, {}: size", e.path);
        assert!(
            got[..n] == data[..],
            "point {id}, {}: content differs",
            e.path
        );
    }
}

fn bytes(n: usize, seed: u8) -> Vec<u8> {
    (0..n)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

fn times(n: i64) -> i64 {
    let hour = 3_600_000_000_000i64;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as i64);
    now - now.rem_euclid(hour) - n * hour
}

#[test]
fn cycles_from_a_source_become_points_that_read_back_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    bind(root, "all:1h");
    let (a, b) = (FileId(0xa1), FileId(0xb2));
    let mut t1 = Tree::default();
    let mut disk = bytes(3 * BS as usize + 1000, 1);
    disk[BS as usize..2 * BS as usize].fill(0);
    t1.put("vm1/disk.raw", a, disk.clone());
    t1.put("vm1/vm.xml", b, b"<domain/>".to_vec());
    let all = BTreeMap::from([("vm1/disk.raw", None), ("vm1/vm.xml", None)]);
    let p1 = ship(root, &t1, &all, times(0)).unwrap();
    check_point(root, &p1, &t1);
    assert_eq!(std::fs::read(root.join("vm1/disk.raw")).unwrap(), disk);

    // Block 1 rewritten, the file grows by a block, a new file; vm.xml unchanged.
    let mut t2 = t1.clone();
    disk[BS as usize..BS as usize + 10].copy_from_slice(b"second cut");
    disk.extend(bytes(BS as usize, 7));
    t2.put("vm1/disk.raw", a, disk.clone());
    t2.put("new.img", FileId(0xc3), bytes(5000, 3));
    let changed = BTreeMap::from([("vm1/disk.raw", Some(vec![(1, 5)])), ("new.img", None)]);
    let p2 = ship(root, &t2, &changed, times(0) + 1).unwrap();
    check_point(root, &p2, &t2);
    check_point(root, &p1, &t1);

    // Restore's library writes point 1 out, verified.
    let elsewhere = tempfile::tempdir().unwrap();
    let out = elsewhere.path().join("restored");
    let r: Arc<dyn PointStore> = Arc::new(Replica::open_only(root).unwrap());
    drfs::points::restore::restore(
        r,
        &drfs::points::restore::RestoreOpts {
            point: &p1,
            path: None,
            to: &out,
            force: false,
            parents: false,
            progress: None,
        },
    )
    .unwrap();
    assert_eq!(
        std::fs::read(out.join("vm1/disk.raw")).unwrap(),
        t1.0["vm1/disk.raw"].1
    );
}

#[test]
fn retention_drops_the_oldest_and_merges_an_intermediate_point() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    bind(root, "hourly:24h");
    let a = FileId(0xa1);
    let mut trees = Vec::new();
    let mut data = bytes(4 * BS as usize, 9);
    // p1 alone in its hour; p2 and p3 in a later one, so p2 (not the newest there) goes.
    let at = [
        times(3) + 60_000_000_000,
        times(1) + 1_000_000_000,
        times(1) + 2_000_000_000,
    ];
    let mut ids = Vec::new();
    for (i, t) in at.iter().enumerate() {
        let changed = if i == 0 {
            BTreeMap::from([("disk.raw", None)])
        } else {
            let b = i as u64;
            data[(b * BS) as usize..(b * BS) as usize + 4].copy_from_slice(&[i as u8; 4]);
            BTreeMap::from([("disk.raw", Some(vec![(b, b + 1)]))])
        };
        let mut tree = Tree::default();
        tree.put("disk.raw", a, data.clone());
        ids.push(ship(root, &tree, &changed, *t).unwrap());
        trees.push(tree);
    }
    let r = Replica::open_only(root).unwrap();
    let kept: Vec<String> = r.points().unwrap().into_iter().map(|p| p.id).collect();
    assert_eq!(kept, [ids[0].clone(), ids[2].clone()], "p2 merged away");
    check_point(root, &ids[0], &trees[0]);
    check_point(root, &ids[2], &trees[2]);
}

#[test]
fn a_diverged_base_or_another_store_is_refused_and_nothing_applied() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    bind(root, "all:1h");
    let mut t = Tree::default();
    t.put("a.img", FileId(1), bytes(1000, 1));
    let p1 = ship(root, &t, &BTreeMap::from([("a.img", None)]), times(0)).unwrap();

    // A cycle that builds on a generation the replica is not at.
    let mut c = connect(root);
    session::hello(&mut c.w, &mut c.r, &hello("all:1h"), false).unwrap();
    let m = Manifest {
        version: 1,
        generation: 9,
        cut_id: "x".into(),
        time: "t".into(),
        time_ns: times(0),
        consistency: Consistency::Crash,
        block_size: BS,
        groups: vec![],
        entries: t.entries(),
        origin: None,
    };
    let cycle = Cycle {
        resume: false,
        generation: 9,
        base: Some(7),
        cut_id: "x",
        resync: false,
    };
    let e = session::send(&mut c.w, &mut c.r, &cycle, &MemSource(vec![]), m, None).unwrap_err();
    assert_eq!(e.class(), Class::Operator, "{e}");
    assert!(e.to_string().contains("diverged"), "{e}");
    let rx = c.receiver.join().unwrap();
    assert!(rx.is_err(), "the receiver ended with the refusal");
    let r = Replica::open_only(root).unwrap();
    assert_eq!(r.points().unwrap().len(), 1);
    check_point(root, &p1, &t);

    // Another store's hello.
    let mut c = connect(root);
    let other = Hello {
        store_id: "00000000deadbeef",
        block_size: BS,
        keep: "all:1h",
        seed: false,
    };
    let e = session::hello(&mut c.w, &mut c.r, &other, false).unwrap_err();
    assert_eq!(e.class(), Class::Operator, "{e}");
    assert!(e.to_string().contains("another store"), "{e}");
    let _ = c.receiver.join();
}

/// 4 KiB of file `e` of point `id` at `off`, read through a fresh open.
fn piece_at(root: &Path, id: &str, off: u64) -> std::io::Result<Vec<u8>> {
    let store: Arc<dyn PointStore> = Arc::new(Replica::open_only(root).expect("replica"));
    let view = PointView::open(store, id).expect("point");
    let e = drfs::points::view::files(&view)
        .next()
        .expect("a file")
        .clone();
    let f = view.file(&e).expect("open");
    let mut buf = vec![0u8; 4096];
    f.read_at(&mut buf, off).map(|_| buf)
}

#[test]
fn piece_records_check_4k_reads_and_never_decide_alone() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    bind(root, "all:1h");
    let id = FileId(0xd4);
    let data = bytes(4 * BS as usize, 5);
    let mut t = Tree::default();
    t.put("disk.raw", id, data.clone());
    let p = ship(root, &t, &BTreeMap::from([("disk.raw", None)]), times(0)).unwrap();
    let at = |off: usize| data[off..off + 4096].to_vec();
    assert_eq!(
        piece_at(root, &p, BS + 8192).unwrap(),
        at(BS as usize + 8192)
    );
    // A damaged record is no record: the whole block is checked, and reads right.
    let cv = root.join(format!(".drfs/hashes/{id}.cv"));
    assert!(cv.exists(), "records are kept beside the hash index");
    flip(&cv, 512 + 40);
    assert_eq!(
        piece_at(root, &p, BS + 8192).unwrap(),
        at(BS as usize + 8192)
    );
    // Damaged data: the pieces that check out read; the damaged one fails.
    flip(&root.join("disk.raw"), 2 * BS + 3 * 4096 + 7);
    assert_eq!(piece_at(root, &p, 2 * BS).unwrap(), at(2 * BS as usize));
    let e = piece_at(root, &p, 2 * BS + 3 * 4096).unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::EIO));
}
