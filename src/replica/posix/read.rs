//! Reading a recovery point: its tree comes from its manifest; a file's block comes from
//! the first undo record, going forward from the point, that saved it, or else from the
//! latest file. Nothing is copied to read a point, and opening one costs its manifest and
//! the small undo indexes.
//!
//! Reads stay correct while cycles apply. An apply writes the undo record of the point it
//! replaces (durably) before it changes any latest file, and makes the replica's apply
//! counter odd in between (even again once published). A reader notes the counter when it
//! takes in the undo records, and after each read checks (one load from a mapped page, no
//! system call) that it has not moved; if it has, the reader takes in what appeared and
//! reads again. Files a retention run deletes stay readable through the descriptors a
//! reader holds; opening a file waits while an apply is moving latest files around.
//!
//! A reader pins its point (`Replica::pin`): retention keeps a point while any of its
//! files is open and drops it at the first run after they are closed. Records of later
//! points that retention merges into older ones are re-read when their index changes.
//!
//! No read returns a block that fails its BLAKE3. A block is checked against the hash
//! entry kept beside the data it came from (the latest file's index, or the undo
//! record's), the first time this open file reads it: a read that covers only part of
//! the block reads it whole. What a check found is remembered per source, until a refresh
//! takes in a record that covers the block (an apply is about to change it in the latest
//! file): a matching block reads without hashing again, a failing one fails with EIO at
//! once and is logged once. A check counts only if the read's counter check passed: a
//! mismatch seen while an apply moved blocks is read again, not reported.

use std::collections::{BTreeSet, HashMap};
use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};

use parking_lot::{Mutex, RwLock};

use crate::error::{At, Error, Result};
use crate::model::Entry;
use crate::model::FileId;
use crate::model::PointInfo;
use crate::model::relpath::RelPath;
use crate::replica::Bad;
use crate::replica::posix::hashes::{ENTRY, Hashes, ZERO, of};
use crate::replica::posix::pieces::{self, PIECE, Pieces};
use crate::replica::posix::undo::{UndoFile, UndoIndex, data_path, hash_path};
use crate::replica::posix::{Replica, diverge};
use crate::state::Role;
use crate::sys::aligned::with_scratch;
use crate::sys::{self, read_full};

impl PointFile {
    /// Opens file `e` of point `info` on `r`; `direct`: aligned reads bypass the replica
    /// host's page cache (O_DIRECT where the filesystem allows it).
    pub fn open(r: &Replica, info: &PointInfo, e: &Entry, direct: bool) -> Result<PointFile> {
        let id =
            e.id.ok_or_else(|| Error::Invalid(format!("{} is not a regular file", e.path)))?;
        let bs = r.cfg.block_size;
        let r = Replica::open_only(&r.root)?;
        let pf = PointFile {
            id,
            point: info.id.clone(),
            path: e.path.clone(),
            size: e.size,
            bs,
            from: info.generation,
            direct,
            _pin: r.pin(&info.id)?,
            seq: r.map_seq(),
            replica: r,
            state: RwLock::new(Chain::new(e.size.div_ceil(bs), bs)),
        };
        pf.refresh()?;
        Ok(pf)
    }
}

/// About how many bytes file `e` of point `p` occupies on `r`: what its sources (the
/// replica's file at its path, the undo records from this point on) have allocated.
pub fn allocated(r: &Replica, p: &PointInfo, e: &Entry) -> Result<u64> {
    use std::os::unix::fs::MetadataExt;
    let Some(id) = e.id else {
        return Ok(0);
    };
    let mut total = match r.tree.lstat(&e.path) {
        Ok(st) if st.st_mode & libc::S_IFMT == libc::S_IFREG => st.st_blocks as u64 * 512,
        _ => 0,
    };
    for q in r.points()? {
        if q.generation >= p.generation {
            let data = data_path(&r.undo_dir(&q.id), id);
            total += std::fs::metadata(&data).map_or(0, |m| m.blocks() * 512);
        }
    }
    Ok(total)
}

impl crate::replica::PointRead for PointFile {
    fn size(&self) -> u64 {
        self.size
    }

    fn read_at(&self, buf: &mut [u8], off: u64) -> io::Result<usize> {
        PointFile::read_at(self, buf, off)
    }

    fn read_checked(&self, buf: &mut [u8], b: u64) -> io::Result<(usize, Option<Bad>)> {
        PointFile::read_checked(self, buf, b)
    }

    fn first_nonzero_entry(&self, a: u64, z: u64) -> io::Result<Option<u64>> {
        PointFile::first_nonzero_entry(self, a, z)
    }

    fn seek(&self, off: u64, data: bool) -> io::Result<Option<u64>> {
        PointFile::seek(self, off, data)
    }
}

/// One layer a point's file reads from: an undo record's saved blocks.
struct Layer {
    generation: u64,
    /// The point whose record this is, and the record's data file (for the log).
    point: String,
    data_path: PathBuf,
    file: UndoFile,
    data: File,
    /// `data` opened with O_DIRECT, for an uncached file.
    direct: Option<File>,
    hashes: Option<Hashes>,
    pieces: Option<Pieces>,
    checked: Checked,
}

struct Chain {
    /// Nearest first (by generation). Layers of records a retention run has since
    /// removed stay: their open files hold blocks no other record may have.
    layers: Vec<Layer>,
    /// Undo records taken in: point id -> inode of its index when it was read.
    seen: HashMap<String, u64>,
    latest: Option<File>,
    /// `latest` opened with O_DIRECT, for an uncached file.
    latest_direct: Option<File>,
    latest_hashes: Option<Hashes>,
    latest_pieces: Option<Pieces>,
    /// Where `latest` was found (for the log).
    latest_path: Option<RelPath>,
    latest_checked: Checked,
    /// The file is not among the latest files (a record holds it whole).
    gone: bool,
    /// The latest files may change under the reader: the replica was promoted, and a
    /// mount of it may be writing them. A latest block's check is then never remembered.
    live: bool,
    /// A live store's copy of the latest point's blocks its mounts changed
    /// (`history/<id>.side`, kept until the failover's commit): a latest block that
    /// fails its check is read from there, and served if that matches.
    side: Option<File>,
    /// The apply counter when the chain was last brought up to date.
    seq: u64,
    /// The point's file's blocks (what each `Checked` covers), and their size.
    blocks: u64,
    bs: u64,
}

impl Chain {
    fn new(blocks: u64, bs: u64) -> Chain {
        Chain {
            layers: Vec::new(),
            seen: HashMap::new(),
            latest: None,
            latest_direct: None,
            latest_hashes: None,
            latest_pieces: None,
            latest_path: None,
            latest_checked: Checked::new(blocks),
            gone: false,
            live: false,
            side: None,
            seq: 0,
            blocks,
            bs,
        }
    }

    /// A layer at `generation` holding `f` has just been taken in (new, or re-read after
    /// a merge): the blocks it holds may now route to it, and in the latest file they are
    /// about to change (an apply writes the record first). Forgets what the sources
    /// beyond it (farther layers, the latest file) checked of those blocks.
    fn forget_under(&mut self, generation: u64, f: &UndoFile) {
        let all = [[0, u64::MAX]];
        let runs: &[[u64; 2]] = if f.whole { &all } else { &f.blocks };
        let beyond = self.layers.iter_mut().filter(|l| l.generation > generation);
        for k in beyond
            .map(|l| &mut l.checked)
            .chain([&mut self.latest_checked])
        {
            for r in runs {
                k.forget(r[0], r[1]);
            }
        }
    }
}

/// Blocks per page of `Checked` bits (a page is allocated when a block of it matches).
const PAGE_BLOCKS: u64 = 4096 * 8;

/// What this open file has found out about one source's blocks: which match their
/// BLAKE3 (they read without hashing again) and which do not (they fail at once). Set
/// under the chain's read lock once a read's counter check passed; forgotten under its
/// write lock where the source may have changed (`Chain::forget_under`).
struct Checked {
    blocks: u64,
    good: Bits,
    /// Blocks whose piece record gives their entry (their 4 KiB pieces check against it).
    rec: Bits,
    bad: Mutex<BTreeSet<u64>>,
}

/// A bit per block, in pages allocated as they are set.
type Bits = Box<[OnceLock<Box<[AtomicU64]>>]>;

fn pages(blocks: u64) -> Bits {
    (0..blocks.div_ceil(PAGE_BLOCKS))
        .map(|_| OnceLock::new())
        .collect()
}

fn test_bit(bits: &Bits, b: u64) -> bool {
    let page = bits.get((b / PAGE_BLOCKS) as usize).and_then(|p| p.get());
    page.is_some_and(|p| {
        p[((b % PAGE_BLOCKS) / 64) as usize].load(Ordering::Relaxed) & (1 << (b % 64)) != 0
    })
}

impl Checked {
    fn new(blocks: u64) -> Checked {
        Checked {
            blocks,
            good: pages(blocks),
            rec: pages(blocks),
            bad: Mutex::new(BTreeSet::new()),
        }
    }

    fn good(&self, b: u64) -> bool {
        test_bit(&self.good, b)
    }

    fn rec(&self, b: u64) -> bool {
        test_bit(&self.rec, b)
    }

    /// Block `b`'s piece record gives its entry.
    fn set_rec(&self, b: u64) {
        for (p, w, mask) in self.words(b, b + 1) {
            let page = self.rec[p]
                .get_or_init(|| (0..PAGE_BLOCKS / 64).map(|_| AtomicU64::new(0)).collect());
            page[w].fetch_or(mask, Ordering::Relaxed);
        }
    }

    /// The bits of blocks `a..z` (those of the file): (page, word, mask).
    fn words(&self, a: u64, z: u64) -> impl Iterator<Item = (usize, usize, u64)> + use<> {
        let z = z.min(self.blocks);
        let mut b = a;
        std::iter::from_fn(move || {
            if b >= z {
                return None;
            }
            let bit = b % 64;
            let n = (64 - bit).min(z - b);
            let mask = if n == 64 {
                u64::MAX
            } else {
                ((1 << n) - 1) << bit
            };
            let at = (
                (b / PAGE_BLOCKS) as usize,
                ((b % PAGE_BLOCKS) / 64) as usize,
            );
            b += n;
            Some((at.0, at.1, mask))
        })
    }

    /// Blocks `a..z` match.
    fn set_good(&self, a: u64, z: u64) {
        for (p, w, mask) in self.words(a, z) {
            let page = self.good[p]
                .get_or_init(|| (0..PAGE_BLOCKS / 64).map(|_| AtomicU64::new(0)).collect());
            page[w].fetch_or(mask, Ordering::Relaxed);
        }
    }

    fn bad(&self, b: u64) -> bool {
        self.bad.lock().contains(&b)
    }

    /// Block `b` fails; true the first time.
    fn set_bad(&self, b: u64) -> bool {
        self.bad.lock().insert(b)
    }

    /// Forgets what was found of blocks `a..z`.
    fn forget(&mut self, a: u64, z: u64) {
        let bad = self.bad.get_mut();
        if !bad.is_empty() {
            bad.retain(|&b| b < a || b >= z);
        }
        for (p, w, mask) in self.words(a, z) {
            for bits in [&mut self.good, &mut self.rec] {
                if let Some(page) = bits[p].get_mut() {
                    *page[w].get_mut() &= !mask;
                }
            }
        }
    }
}

/// What one read found out about the blocks it checked. It counts only once the read's
/// counter check passed (`PointFile::remember`).
#[derive(Default)]
struct Learnt {
    /// Runs `[a, z)` of blocks that matched, by source.
    good: Vec<(Src, u64, u64)>,
    /// Blocks that failed, by source, and why (None: known to fail before this read).
    bad: Vec<(Src, u64, Option<Bad>)>,
    /// Blocks whose piece record was found to give their entry.
    rec: Vec<(Src, u64)>,
}

impl Learnt {
    fn good(&mut self, src: Src, b: u64) {
        match self.good.last_mut() {
            Some((s, _, z)) if *s == src && *z == b => *z += 1,
            _ => self.good.push((src, b, b + 1)),
        }
    }
}

/// How an undo record holds a block of a point (`PointFile::saved_in`).
pub enum Saved {
    /// Its bytes, at their own offset in the data file of the record in `record`, whose
    /// entry for it is `hash`.
    Data { record: PathBuf, hash: [u8; 32] },
    /// A zero block: its entry says so and the record has a hole there.
    Zero,
}

/// One file of a point.
pub struct PointFile {
    id: FileId,
    /// The point and the file's path in it (for the log).
    point: String,
    path: RelPath,
    pub size: u64,
    bs: u64,
    from: u64,
    /// Aligned reads go to the replica with O_DIRECT.
    direct: bool,
    replica: Replica,
    state: RwLock<Chain>,
    /// The replica's apply counter (`Replica::set_applying`), mapped.
    seq: Option<memmap2::Mmap>,
    /// Keeps the point from being pruned while the file is open.
    _pin: File,
}

/// Where a block comes from.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Src {
    Layer(usize),
    Latest,
    Zero,
}

/// The alignment O_DIRECT reads of the replica use (memory, offset and length).
const DIRECT_ALIGN: u64 = 4096;

fn aligned(buf: &[u8], off: u64) -> bool {
    (buf.as_ptr() as u64 | buf.len() as u64 | off) % DIRECT_ALIGN == 0
}

/// How long opening a file waits for an apply that is moving the latest files around.
const APPLY_WAIT: std::time::Duration = std::time::Duration::from_secs(60);

/// The inode of an undo record's index: a retention run merging into the record writes a
/// new one.
fn index_ino(dir: &std::path::Path) -> Option<u64> {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(dir.join("index.json"))
        .ok()
        .map(|m| m.ino())
}

impl PointFile {
    fn seq_now(&self) -> u64 {
        self.seq.as_ref().map_or(0, |m| {
            // The map is 8 bytes at a page boundary; the receiver updates it with pwrite.
            let a = unsafe { &*(m.as_ptr() as *const std::sync::atomic::AtomicU64) };
            u64::from_le(a.load(std::sync::atomic::Ordering::Acquire))
        })
    }

    /// Brings the chain up to date: undo records that appeared or changed since the last
    /// look (the first time, all of them from this point on), and the latest file. The
    /// latest file is looked up only while no apply is under way (it may be moving).
    fn refresh(&self) -> Result<()> {
        let deadline = std::time::Instant::now() + APPLY_WAIT;
        while !self.refresh_at(self.seq_now())? {
            if std::time::Instant::now() > deadline {
                return Err(Error::Busy(format!(
                    "{} has been in the middle of an apply for {} s; try again",
                    self.replica.root.display(),
                    APPLY_WAIT.as_secs()
                )));
            }
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        Ok(())
    }

    /// One attempt at apply counter `s0`; false if it has to wait for an apply.
    fn refresh_at(&self, s0: u64) -> Result<bool> {
        let r = &self.replica;
        // Under the shared prune lock no retention merge is half done.
        let _lock = r.prune_lock(libc::LOCK_SH)?;
        let mut c = self.state.write();
        let mut fresh = Vec::new();
        for p in r.points()? {
            if p.generation < self.from {
                continue;
            }
            let dir = r.undo_dir(&p.id);
            let Some(ino) = index_ino(&dir) else {
                continue;
            };
            if c.seen.get(&p.id) == Some(&ino) {
                continue;
            }
            c.layers.retain(|l| l.generation != p.generation);
            if let Some(l) = self.layer(&dir, &p, c.blocks)? {
                fresh.push((l.generation, l.file.clone()));
                c.layers.push(l);
            }
            c.seen.insert(p.id.clone(), ino);
        }
        c.layers.sort_by_key(|l| l.generation);
        for (generation, f) in &fresh {
            c.forget_under(*generation, f);
        }
        // A failover bumps the counter when it promotes: the latest file is looked up
        // again, as a live one.
        if !c.live && s0 != c.seq && r.sd.config()?.role == Role::Primary {
            c.latest = None;
            c.gone = false;
        }
        if c.latest.is_none() && !c.gone {
            if s0 % 2 == 1 {
                return Ok(false);
            }
            self.find_latest(&mut c)?;
            if self.seq_now() != s0 {
                (c.latest, c.latest_direct, c.latest_hashes) = (None, None, None);
                c.latest_pieces = None;
                c.gone = false;
                return Ok(false);
            }
        }
        c.seq = s0;
        Ok(true)
    }

    /// This file's layer in the undo record of point `p` at `dir`, if the record has its
    /// blocks.
    fn layer(&self, dir: &std::path::Path, p: &PointInfo, blocks: u64) -> Result<Option<Layer>> {
        let idx = UndoIndex::load(dir)?;
        let Some(f) = idx.files.get(&self.id) else {
            return Ok(None);
        };
        let (dp, hp) = (data_path(dir, self.id), hash_path(dir, self.id));
        Ok(Some(Layer {
            generation: p.generation,
            point: p.id.clone(),
            checked: Checked::new(blocks),
            file: f.clone(),
            data: File::open(&dp).at(&dp)?,
            direct: self.if_direct(|| {
                use std::os::unix::fs::OpenOptionsExt;
                std::fs::OpenOptions::new()
                    .read(true)
                    .custom_flags(libc::O_DIRECT)
                    .open(&dp)
            }),
            hashes: Hashes::open_ro(&hp).ok(),
            pieces: Pieces::open_ro(&hp, self.bs),
            data_path: dp,
        }))
    }

    /// The O_DIRECT descriptor `open` makes, if this file's reads are uncached and the
    /// filesystem allows it (else reads stay buffered).
    fn if_direct(&self, open: impl FnOnce() -> io::Result<File>) -> Option<File> {
        self.direct.then(open).and_then(|f| f.ok())
    }

    /// Opens this file among the latest files (by its path in the latest point). On a
    /// live store whose history keeps the latest point, a file deleted or replaced since
    /// is read from its kept link, and the blocks its mounts changed from their copies.
    fn find_latest(&self, c: &mut Chain) -> Result<()> {
        let r = &self.replica;
        c.latest_checked.forget(0, u64::MAX);
        c.live = r.sd.config()?.role == Role::Primary;
        c.side = None;
        let Some(l) = r.latest()? else {
            c.gone = true;
            return Ok(());
        };
        let m = r.manifest(&l.id)?;
        let Some(e) = m.entries.iter().find(|e| e.id == Some(self.id)) else {
            c.gone = true;
            return Ok(());
        };
        let hist = diverge::dir(&r.sd);
        let kept = c.live && diverge::kept_point(&hist)?.as_deref() == Some(l.id.as_str());
        let whole = kept
            .then(|| File::open(diverge::whole_path(&hist, self.id)).ok())
            .flatten();
        c.side = kept
            .then(|| File::open(diverge::side_path(&hist, self.id)).ok())
            .flatten();
        let p = e.path.under(&r.root);
        c.latest_direct = None;
        c.latest = Some(match whole {
            Some(f) => f,
            None => {
                c.latest_direct = self.if_direct(|| {
                    r.tree
                        .open_file(&e.path, libc::O_RDONLY | libc::O_DIRECT, 0)
                });
                r.tree.open_file(&e.path, libc::O_RDONLY, 0).at(&p)?
            }
        });
        c.latest_hashes = Hashes::open_ro(&r.hash_file(self.id)).ok();
        c.latest_pieces = Pieces::open_ro(&r.hash_file(self.id), self.bs);
        c.latest_path = Some(e.path.clone());
        Ok(())
    }

    /// Where block `b` comes from, and the first block after it (at most `limit`) whose
    /// source may differ: the nearest layer wins, so each layer before the one holding
    /// `b` cuts the span where its own next run starts.
    fn span(c: &Chain, b: u64, limit: u64) -> (Src, u64) {
        let mut end = limit;
        for (i, l) in c.layers.iter().enumerate() {
            if l.file.whole {
                return (Src::Layer(i), end);
            }
            let runs = &l.file.blocks;
            match runs.get(runs.partition_point(|r| r[1] <= b)) {
                Some(r) if r[0] <= b => return (Src::Layer(i), end.min(r[1])),
                Some(r) => end = end.min(r[0]),
                None => {}
            }
        }
        let src = if c.latest.is_some() {
            Src::Latest
        } else {
            Src::Zero
        };
        (src, end)
    }

    fn file_of(c: &Chain, src: Src) -> Option<&File> {
        match src {
            Src::Layer(i) => Some(&c.layers[i].data),
            Src::Latest => c.latest.as_ref(),
            Src::Zero => None,
        }
    }

    /// The O_DIRECT descriptor of `src`, if this reader has one.
    fn direct_of(c: &Chain, src: Src) -> Option<&File> {
        match src {
            Src::Layer(i) => c.layers[i].direct.as_ref(),
            Src::Latest => c.latest_direct.as_ref(),
            Src::Zero => None,
        }
    }

    fn checked_of(c: &Chain, src: Src) -> Option<&Checked> {
        match src {
            Src::Layer(i) => Some(&c.layers[i].checked),
            Src::Latest => Some(&c.latest_checked),
            Src::Zero => None,
        }
    }

    /// Reads at `off` into `buf` (short only at the end of the file). A block that fails
    /// its BLAKE3 fails the read with EIO (and is logged, once per open file).
    pub fn read_at(&self, buf: &mut [u8], off: u64) -> io::Result<usize> {
        self.settled(
            |c| {
                let mut l = Learnt::default();
                let n = self.read_in(c, buf, off, &mut l)?;
                Ok((n, l))
            },
            |c, (n, l)| self.remember(c, l).map(|()| n),
        )
    }

    /// Where an undo record holds block `b` of this point, as a roll-back stages it
    /// (`Saved`); None where the latest file holds it, the record keeps no entries, or
    /// its entry is the zero block's but the record has bytes there (read and check it).
    pub fn saved_in(&self, b: u64) -> io::Result<Option<Saved>> {
        self.consistent(|c| {
            let (Src::Layer(i), _) = Self::span(c, b, self.size.div_ceil(self.bs)) else {
                return Ok(None);
            };
            let l = &c.layers[i];
            let (Some(h), Some(dir)) = (&l.hashes, l.data_path.parent()) else {
                return Ok(None);
            };
            let hash = h.get(b).map_err(io::Error::other)?;
            if hash != ZERO {
                let record = dir.to_path_buf();
                return Ok(Some(Saved::Data { record, hash }));
            }
            let (off, end) = (b * self.bs, self.block_end(b));
            Ok(sys::Holes::new(&l.data)
                .hole(off, end - off)
                .then_some(Saved::Zero))
        })
    }

    /// Reads block `b` into `buf` (its length) and checks it: what is wrong with it, if
    /// anything. Nothing is remembered or logged (restore reads each block once and
    /// reports for itself).
    pub fn read_checked(&self, buf: &mut [u8], b: u64) -> io::Result<(usize, Option<Bad>)> {
        self.settled(
            |c| {
                let mut l = Learnt::default();
                let n = self.read_in(c, buf, b * self.bs, &mut l)?;
                Ok((n, l))
            },
            |_, (n, l)| Ok((n, l.bad.first().map(|x| x.2.unwrap_or(Bad::Mismatch)))),
        )
    }

    /// Runs `f` over the chain until no apply started meanwhile (see the module notes),
    /// then `then` with what `f` returned. The check is against the counter of the chain
    /// this read used: another thread may bring the chain up to date meanwhile, and that
    /// must not bless a read made with the old one. The check and `then` run under the
    /// chain's read lock, so no refresh comes between them.
    fn settled<T, U>(
        &self,
        mut f: impl FnMut(&Chain) -> io::Result<T>,
        mut then: impl FnMut(&Chain, T) -> io::Result<U>,
    ) -> io::Result<U> {
        loop {
            {
                let c = self.state.read();
                let v = f(&c)?;
                if self.seq_now() == c.seq {
                    return then(&c, v);
                }
            }
            self.refresh().map_err(io::Error::other)?;
        }
    }

    fn consistent<T>(&self, f: impl FnMut(&Chain) -> io::Result<T>) -> io::Result<T> {
        self.settled(f, |_, v| Ok(v))
    }

    /// Takes in what a read whose counter check passed found out; EIO if a block failed.
    fn remember(&self, c: &Chain, l: Learnt) -> io::Result<()> {
        for (src, a, z) in l.good {
            if src == Src::Latest && c.live {
                continue;
            }
            if let Some(k) = Self::checked_of(c, src) {
                k.set_good(a, z);
            }
        }
        for (src, b) in l.rec {
            if let Some(k) = Self::checked_of(c, src) {
                k.set_rec(b);
            }
        }
        if l.bad.is_empty() {
            return Ok(());
        }
        for (src, b, why) in l.bad {
            let first = Self::checked_of(c, src).is_some_and(|k| k.set_bad(b));
            if let (true, Some(why)) = (first, why) {
                tracing::error!(
                    "point {}, {}: the block at byte {} ({} bytes) {} ({}); reads of it fail with EIO",
                    self.point,
                    self.path,
                    b * self.bs,
                    self.block_end(b) - b * self.bs,
                    why.why(),
                    self.source_name(c, src)
                );
            }
        }
        Err(io::Error::from_raw_os_error(libc::EIO))
    }

    /// Where a source's data is, for the log.
    fn source_name(&self, c: &Chain, src: Src) -> String {
        match src {
            Src::Layer(i) => format!(
                "read from the undo record of point {}, {}",
                c.layers[i].point,
                c.layers[i].data_path.display()
            ),
            Src::Latest => format!(
                "read from the latest file {}",
                c.latest_path
                    .as_ref()
                    .map_or_else(
                        || self.path.under(&self.replica.root),
                        |p| p.under(&self.replica.root)
                    )
                    .display()
            ),
            Src::Zero => "a hole".to_string(),
        }
    }

    /// The end of block `b` in the file (its last block may be short).
    fn block_end(&self, b: u64) -> u64 {
        ((b + 1) * self.bs).min(self.size)
    }

    fn read_in(&self, c: &Chain, buf: &mut [u8], off: u64, l: &mut Learnt) -> io::Result<usize> {
        let end = (off + buf.len() as u64).min(self.size);
        let blocks = self.size.div_ceil(self.bs);
        let mut pos = off;
        while pos < end {
            // One read per span of blocks with the same source.
            let (src, next) = Self::span(c, pos / self.bs, blocks);
            let stop = (next * self.bs).min(end);
            let chunk = &mut buf[(pos - off) as usize..(stop - off) as usize];
            self.read_span(c, src, chunk, pos, l)?;
            pos = stop;
        }
        Ok(end.saturating_sub(off) as usize)
    }

    /// Reads `chunk` at `pos`, all of it from `src`, checking every block not known to
    /// match yet: the blocks the chunk holds whole where they landed, a block it holds
    /// only part of (at most its first and its last) read whole on the side first.
    fn read_span(
        &self,
        c: &Chain,
        src: Src,
        chunk: &mut [u8],
        pos: u64,
        l: &mut Learnt,
    ) -> io::Result<()> {
        let Some(k) = Self::checked_of(c, src) else {
            chunk.fill(0);
            return Ok(());
        };
        let bs = self.bs;
        let stop = pos + chunk.len() as u64;
        let aside = |b: u64| (b * bs < pos || self.block_end(b) > stop) && !k.good(b);
        let (mut b, last) = (pos / bs, (stop - 1) / bs);
        while b <= last {
            let (x, y) = ((b * bs).max(pos), self.block_end(b).min(stop));
            let part = &mut chunk[(x - pos) as usize..(y - pos) as usize];
            if aside(b) {
                self.read_aside(c, src, k, b, part, x, l)?;
                b += 1;
                continue;
            }
            // A run of blocks straight into the chunk: each wholly in it, or known good.
            let first = b;
            while b <= last && !aside(b) {
                b += 1;
            }
            let (x, y) = ((first * bs).max(pos), self.block_end(b - 1).min(stop));
            let run = &mut chunk[(x - pos) as usize..(y - pos) as usize];
            Self::read_plain(c, src, run, x)?;
            for n in first..b {
                if !k.good(n) {
                    let at = (n * bs - x) as usize..(self.block_end(n) - x) as usize;
                    Self::check(c, src, k, n, &mut run[at], l)?;
                }
            }
        }
        Ok(())
    }

    /// Reads block `b` whole into the scratch buffer, checks it, and copies the part at
    /// `pos` into `part`.
    #[allow(clippy::too_many_arguments)]
    fn read_aside(
        &self,
        c: &Chain,
        src: Src,
        k: &Checked,
        b: u64,
        part: &mut [u8],
        pos: u64,
        l: &mut Learnt,
    ) -> io::Result<()> {
        // The pieces first: a block known to be bad may still have good pieces.
        if self.read_pieces(c, src, k, b, part, pos, l)? {
            return Ok(());
        }
        if k.bad(b) {
            l.bad.push((src, b, None));
            return Ok(());
        }
        let start = b * self.bs;
        with_scratch((self.block_end(b) - start) as usize, |block| {
            Self::read_plain(c, src, block, start)?;
            Self::check(c, src, k, b, block, l)?;
            let from = (pos - start) as usize;
            part.copy_from_slice(&block[from..from + part.len()]);
            Ok(())
        })
    }

    /// Reads `part` (at `pos`, inside block `b`) through the 4 KiB pieces it touches,
    /// checked against the block's piece record, the record against the block's hash
    /// entry: a 4 KiB read of a 64 KiB block costs 4 KiB. False when that cannot tell
    /// (no record, a record that does not give the entry, a piece that does not match):
    /// then the whole block is read and checked, and that decides.
    #[allow(clippy::too_many_arguments)]
    fn read_pieces(
        &self,
        c: &Chain,
        src: Src,
        k: &Checked,
        b: u64,
        part: &mut [u8],
        pos: u64,
        l: &mut Learnt,
    ) -> io::Result<bool> {
        let start = b * self.bs;
        let len = self.block_end(b) - start;
        let Some(cv) = Self::pieces_of(c, src).filter(|_| len > PIECE) else {
            return Ok(false);
        };
        let (first, last) = (
            (pos - start) / PIECE,
            (pos + part.len() as u64 - 1 - start) / PIECE,
        );
        // The record checked once per block (and source); then only its pieces' values.
        let rec = if k.rec(b) {
            cv.range(b, first, last + 1 - first)
        } else {
            let entry = match Self::hashes_of(c, src) {
                Ok(Some(h)) => h.get(b).map_err(io::Error::other)?,
                _ => return Ok(false),
            };
            match cv.get(b, len.div_ceil(PIECE)).map_err(io::Error::other)? {
                Some(rec) if pieces::root(&rec, len) == Some(entry) => {
                    l.rec.push((src, b));
                    Ok(Some(rec[first as usize..=last as usize].to_vec()))
                }
                _ => return Ok(false),
            }
        };
        let Some(want) = rec.map_err(io::Error::other)? else {
            return Ok(false);
        };
        let (x, y) = (
            start + first * PIECE,
            (start + (last + 1) * PIECE).min(start + len),
        );
        with_scratch((y - x) as usize, |cover| {
            Self::read_plain(c, src, cover, x)?;
            for (i, p) in cover.chunks(PIECE as usize).enumerate() {
                if pieces::piece(p, first + i as u64) != want[i] {
                    return Ok(false);
                }
            }
            let from = (pos - x) as usize;
            part.copy_from_slice(&cover[from..from + part.len()]);
            Ok(true)
        })
    }

    fn pieces_of(c: &Chain, src: Src) -> Option<&Pieces> {
        match src {
            Src::Layer(i) => c.layers[i].pieces.as_ref(),
            Src::Latest => c.latest_pieces.as_ref(),
            Src::Zero => None,
        }
    }

    /// One read from `src` (O_DIRECT where this reader has it and `chunk` is aligned);
    /// zeros past the source's end.
    fn read_plain(c: &Chain, src: Src, chunk: &mut [u8], pos: u64) -> io::Result<()> {
        let direct = Self::direct_of(c, src).filter(|_| aligned(chunk, pos));
        let got = match direct.or(Self::file_of(c, src)) {
            Some(f) => read_full(f, chunk, pos)?,
            None => 0,
        };
        chunk[got..].fill(0);
        Ok(())
    }

    /// Checks block `b` (`data`, all of it) against the entry its source keeps; a live
    /// latest block that fails is replaced by its kept copy if that matches.
    fn check(
        c: &Chain,
        src: Src,
        k: &Checked,
        b: u64,
        data: &mut [u8],
        l: &mut Learnt,
    ) -> io::Result<()> {
        if k.bad(b) {
            l.bad.push((src, b, None));
            return Ok(());
        }
        let want = match Self::hashes_of(c, src) {
            Err(zero) => zero,
            Ok(None) => {
                l.bad.push((src, b, Some(Bad::Unhashed)));
                return Ok(());
            }
            Ok(Some(h)) => h.get(b).map_err(io::Error::other)?,
        };
        if of(data) == want {
            l.good(src, b);
        } else if !(src == Src::Latest && Self::from_side(c, b, data, &want)?) {
            l.bad.push((src, b, Some(Bad::Mismatch)));
        }
        Ok(())
    }

    /// Block `b` from the live store's kept copy, into `data`, if it matches `want`.
    fn from_side(c: &Chain, b: u64, data: &mut [u8], want: &[u8; 32]) -> io::Result<bool> {
        let Some(side) = &c.side else {
            return Ok(false);
        };
        with_scratch(data.len(), |copy| {
            let got = read_full(side, copy, b * c.bs)?;
            copy[got..].fill(0);
            if of(copy) != *want {
                return Ok(false);
            }
            data.copy_from_slice(copy);
            Ok(true)
        })
    }

    /// The hash index of a source; `Err(ZERO)` for a source that is all zeros.
    fn hashes_of(c: &Chain, src: Src) -> std::result::Result<Option<&Hashes>, [u8; 32]> {
        match src {
            Src::Layer(i) => Ok(c.layers[i].hashes.as_ref()),
            Src::Latest => Ok(c.latest_hashes.as_ref()),
            Src::Zero => Err(ZERO),
        }
    }

    /// The first block in `a..z` whose entry is not the zero block's (or that has no
    /// entry): for checking that a hole of the point was a hole or zeros on the primary.
    pub fn first_nonzero_entry(&self, a: u64, z: u64) -> io::Result<Option<u64>> {
        const CHUNK: u64 = 2048;
        let mut buf = vec![0u8; (CHUNK * ENTRY) as usize];
        self.consistent(|c| {
            let mut b = a;
            while b < z {
                let (src, next) = Self::span(c, b, z);
                let h = match Self::hashes_of(c, src) {
                    Err(_) => {
                        b = next;
                        continue;
                    }
                    Ok(None) => return Ok(Some(b)),
                    Ok(Some(h)) => h,
                };
                while b < next {
                    let n = (next - b).min(CHUNK);
                    let part = &mut buf[..(n * ENTRY) as usize];
                    h.read_entries(b, part).map_err(io::Error::other)?;
                    if let Some(k) = part.chunks(ENTRY as usize).position(|e| e != ZERO) {
                        return Ok(Some(b + k as u64));
                    }
                    b += n;
                }
            }
            Ok(None)
        })
    }

    /// SEEK_DATA / SEEK_HOLE over the point's content: the next offset at or after `off`
    /// that is data (`data`) or a hole; None past the end (ENXIO).
    pub fn seek(&self, off: u64, data: bool) -> io::Result<Option<u64>> {
        self.consistent(|c| Ok(self.seek_in(c, off, data)))
    }

    /// One span at a time, asking the span's source file (one lseek per span, so a
    /// mostly empty 1 TiB disk answers at once).
    fn seek_in(&self, c: &Chain, off: u64, data: bool) -> Option<u64> {
        let blocks = self.size.div_ceil(self.bs);
        let whence = if data {
            libc::SEEK_DATA
        } else {
            libc::SEEK_HOLE
        };
        let mut pos = off;
        while pos < self.size {
            let (src, next) = Self::span(c, pos / self.bs, blocks);
            let stop = (next * self.bs).min(self.size);
            let found = match Self::file_of(c, src) {
                // ENXIO: past the source's end, which reads as a hole.
                Some(f) => match sys::lseek(f.as_raw_fd(), pos as i64, whence) {
                    Ok(o) => Some(o as u64),
                    Err(_) => (!data).then_some(pos),
                },
                None => (!data).then_some(pos),
            };
            if let Some(o) = found.filter(|&o| o < stop) {
                return Some(o);
            }
            pos = stop;
        }
        // Every file ends in a hole at its size.
        (!data).then_some(self.size)
    }

    /// The size of a hash file entry (for callers sizing reads).
    pub fn entry_size() -> u64 {
        ENTRY
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layer(generation: u64, blocks: Vec<[u64; 2]>, n: u64) -> Layer {
        Layer {
            generation,
            point: format!("{generation:08}"),
            data_path: PathBuf::from("/dev/null"),
            file: UndoFile {
                whole: false,
                blocks,
            },
            data: File::open("/dev/null").unwrap(),
            direct: None,
            hashes: None,
            pieces: None,
            checked: Checked::new(n),
        }
    }

    fn good(k: &Checked, r: std::ops::Range<u64>) -> bool {
        r.clone().all(|b| k.good(b))
    }

    fn none(k: &Checked, r: std::ops::Range<u64>) -> bool {
        r.clone().all(|b| !k.good(b))
    }

    #[test]
    fn checked_blocks_are_set_and_forgotten_across_words_and_pages() {
        let n = 2 * PAGE_BLOCKS + 10;
        let mut k = Checked::new(n);
        assert!(none(&k, 0..n), "nothing is checked at first");
        k.set_good(60, 70);
        k.set_good(PAGE_BLOCKS - 3, PAGE_BLOCKS + 3);
        k.set_good(n - 2, n + 500);
        assert!(good(&k, 60..70) && none(&k, 0..60) && none(&k, 70..PAGE_BLOCKS - 3));
        assert!(good(&k, PAGE_BLOCKS - 3..PAGE_BLOCKS + 3) && !k.good(PAGE_BLOCKS + 3));
        assert!(good(&k, n - 2..n) && !k.good(n) && !k.good(u64::MAX));
        assert!(k.set_bad(64) && !k.set_bad(64) && k.bad(64) && !k.bad(65));
        k.forget(62, PAGE_BLOCKS - 1);
        assert!(good(&k, 60..62) && none(&k, 62..PAGE_BLOCKS - 1) && !k.bad(64));
        assert!(good(&k, PAGE_BLOCKS - 1..PAGE_BLOCKS + 3));
        k.set_bad(3);
        k.forget(0, u64::MAX);
        assert!(none(&k, 0..n) && !k.bad(3));
    }

    #[test]
    fn a_layer_taken_in_forgets_the_checks_of_the_sources_beyond_it() {
        let n = 200;
        let mut c = Chain::new(n, 65536);
        c.layers = vec![layer(3, vec![[0, 50]], n), layer(5, vec![[0, 200]], n)];
        let all = |c: &Chain| {
            for k in c
                .layers
                .iter()
                .map(|l| &l.checked)
                .chain([&c.latest_checked])
            {
                k.set_good(0, n);
                k.set_bad(20);
                k.set_bad(100);
            }
        };
        all(&c);
        // A record at generation 4 covering blocks 10..30 and 90..110: the layer nearer
        // the point (3) keeps its checks; the farther one (5) and the latest file forget
        // those blocks, good and bad.
        let f = UndoFile {
            whole: false,
            blocks: vec![[10, 30], [90, 110]],
        };
        c.forget_under(4, &f);
        let near = &c.layers[0].checked;
        assert!(good(near, 0..n) && near.bad(20) && near.bad(100));
        for k in [&c.layers[1].checked, &c.latest_checked] {
            assert!(good(k, 0..10) && none(k, 10..30) && good(k, 30..90));
            assert!(none(k, 90..110) && good(k, 110..n) && !k.bad(20) && !k.bad(100));
        }
        // A record holding the file whole, nearest of all: every source beyond it forgets
        // everything.
        all(&c);
        let whole = UndoFile {
            whole: true,
            blocks: Vec::new(),
        };
        c.forget_under(2, &whole);
        for k in c
            .layers
            .iter()
            .map(|l| &l.checked)
            .chain([&c.latest_checked])
        {
            assert!(none(k, 0..n) && !k.bad(20));
        }
    }
}
