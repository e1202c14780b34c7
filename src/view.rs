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

use std::collections::HashMap;
use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::sync::Arc;

use parking_lot::{Mutex, RwLock};

use crate::error::{At, Error, Result};
use crate::relpath::RelPath;
use crate::replica::hashes::{ENTRY, Hashes, ZERO};
use crate::replica::undo::{UndoFile, UndoIndex, data_path, hash_path};
use crate::replica::{PointInfo, Replica};
use crate::sys::{self, read_full};
use crate::track::FileId;
use crate::wire::{Entry, Kind, Manifest};

/// Indexes of a point's entries by their parent directory.
type Children = HashMap<RelPath, Vec<usize>>;

/// A point, ready to be read.
pub struct PointView {
    pub info: PointInfo,
    pub manifest: Manifest,
    bs: u64,
    replica: PathBuf,
    /// Directory entries by parent, built on first use.
    children: Mutex<Option<Arc<Children>>>,
    /// `allocated` answers, by file.
    alloc: Mutex<HashMap<FileId, u64>>,
}

impl PointView {
    pub fn open(r: &Replica, id: &str) -> Result<PointView> {
        let points = r.points()?;
        let Some(info) = points.into_iter().find(|p| p.id == id) else {
            return Err(Error::Invalid(format!(
                "no point {id} on {} (drfs points lists them)",
                r.root.display()
            )));
        };
        Ok(PointView {
            manifest: r.manifest(id)?,
            info,
            bs: r.cfg.block_size,
            replica: r.root.clone(),
            children: Mutex::new(None),
            alloc: Mutex::new(HashMap::new()),
        })
    }

    /// About how many bytes the file of entry `e` occupies: what its sources (the
    /// replica's file at its path, the undo records from this point on) have allocated,
    /// at most its size. An estimate, for `du` and for `cp`'s sparse-file detection.
    pub fn allocated(&self, e: &Entry) -> u64 {
        let Some(id) = e.id else {
            return 0;
        };
        if let Some(&a) = self.alloc.lock().get(&id) {
            return a;
        }
        let a = self.estimate(e, id).unwrap_or(e.size).min(e.size);
        self.alloc.lock().insert(id, a);
        a
    }

    fn estimate(&self, e: &Entry, id: FileId) -> Result<u64> {
        use std::os::unix::fs::MetadataExt;
        let r = Replica::open_only(&self.replica)?;
        let mut total = match r.tree.lstat(&e.path) {
            Ok(st) if st.st_mode & libc::S_IFMT == libc::S_IFREG => st.st_blocks as u64 * 512,
            _ => 0,
        };
        for p in r.points()? {
            if p.generation >= self.info.generation {
                let data = data_path(&r.undo_dir(&p.id), id);
                total += std::fs::metadata(&data).map_or(0, |m| m.blocks() * 512);
            }
        }
        Ok(total)
    }

    /// The replica the point is on.
    pub fn replica(&self) -> &std::path::Path {
        &self.replica
    }

    pub fn block_size(&self) -> u64 {
        self.bs
    }

    pub fn entry(&self, path: &RelPath) -> Option<(usize, &Entry)> {
        self.manifest
            .entries
            .binary_search_by(|e| e.path.cmp(path))
            .ok()
            .map(|i| (i, &self.manifest.entries[i]))
    }

    /// Indexes into the manifest of the entries directly in `dir` (root: empty path).
    pub fn children(&self, dir: &RelPath) -> Vec<usize> {
        let mut c = self.children.lock();
        let map = c.get_or_insert_with(|| {
            let mut m: Children = HashMap::new();
            for (i, e) in self.manifest.entries.iter().enumerate() {
                let b = e.path.as_bytes();
                let parent = b
                    .iter()
                    .rposition(|&x| x == b'/')
                    .map_or(&b[..0], |p| &b[..p]);
                m.entry(RelPath::from_bytes(parent)).or_default().push(i);
            }
            Arc::new(m)
        });
        map.get(dir).cloned().unwrap_or_default()
    }

    /// How many names the file of entry `e` has in this point.
    pub fn links(&self, e: &Entry) -> u32 {
        match e.id {
            Some(id) => self
                .manifest
                .entries
                .iter()
                .filter(|x| x.id == Some(id))
                .count() as u32,
            None => 1,
        }
    }

    /// Opens a file of this point for reading through the replica host's page cache.
    pub fn file(&self, e: &Entry) -> Result<PointFile> {
        self.open_file(e, false)
    }

    /// Opens a file of this point whose aligned reads bypass the replica host's page
    /// cache (O_DIRECT on the replica's files where their filesystem allows it; other
    /// reads stay buffered). For a client that reads with O_DIRECT, and for a mount whose
    /// kernel caches the point's pages itself.
    pub fn file_direct(&self, e: &Entry) -> Result<PointFile> {
        self.open_file(e, true)
    }

    fn open_file(&self, e: &Entry, direct: bool) -> Result<PointFile> {
        let id =
            e.id.ok_or_else(|| Error::Invalid(format!("{} is not a regular file", e.path)))?;
        let r = Replica::open_only(&self.replica)?;
        let pf = PointFile {
            id,
            size: e.size,
            bs: self.bs,
            from: self.info.generation,
            direct,
            _pin: r.pin(&self.info.id)?,
            seq: r.map_seq(),
            replica: r,
            state: RwLock::new(Chain::default()),
        };
        pf.refresh()?;
        Ok(pf)
    }
}

/// One layer a point's file reads from: an undo record's saved blocks.
struct Layer {
    generation: u64,
    file: UndoFile,
    data: File,
    /// `data` opened with O_DIRECT, for an uncached file.
    direct: Option<File>,
    hashes: Option<Hashes>,
}

#[derive(Default)]
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
    /// The file is not among the latest files (a record holds it whole).
    gone: bool,
    /// The apply counter when the chain was last brought up to date.
    seq: u64,
}

/// One file of a point.
pub struct PointFile {
    id: FileId,
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
            if let Some(l) = self.layer(&dir, p.generation)? {
                c.layers.push(l);
            }
            c.seen.insert(p.id.clone(), ino);
        }
        c.layers.sort_by_key(|l| l.generation);
        if c.latest.is_none() && !c.gone {
            if s0 % 2 == 1 {
                return Ok(false);
            }
            self.find_latest(&mut c)?;
            if self.seq_now() != s0 {
                (c.latest, c.latest_direct, c.latest_hashes) = (None, None, None);
                c.gone = false;
                return Ok(false);
            }
        }
        c.seq = s0;
        Ok(true)
    }

    /// This file's layer in the undo record at `dir`, if the record has its blocks.
    fn layer(&self, dir: &std::path::Path, generation: u64) -> Result<Option<Layer>> {
        let idx = UndoIndex::load(dir)?;
        let Some(f) = idx.files.get(&self.id) else {
            return Ok(None);
        };
        let (dp, hp) = (data_path(dir, self.id), hash_path(dir, self.id));
        Ok(Some(Layer {
            generation,
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
        }))
    }

    /// The O_DIRECT descriptor `open` makes, if this file's reads are uncached and the
    /// filesystem allows it (else reads stay buffered).
    fn if_direct(&self, open: impl FnOnce() -> io::Result<File>) -> Option<File> {
        self.direct.then(open).and_then(|f| f.ok())
    }

    /// Opens this file among the latest files (by its path in the latest point).
    fn find_latest(&self, c: &mut Chain) -> Result<()> {
        let r = &self.replica;
        let Some(l) = r.latest()? else {
            c.gone = true;
            return Ok(());
        };
        let m = r.manifest(&l.id)?;
        match m.entries.iter().find(|e| e.id == Some(self.id)) {
            Some(e) => {
                let p = e.path.under(&r.root);
                c.latest = Some(r.tree.open_file(&e.path, libc::O_RDONLY, 0).at(&p)?);
                c.latest_direct = self.if_direct(|| {
                    r.tree
                        .open_file(&e.path, libc::O_RDONLY | libc::O_DIRECT, 0)
                });
                c.latest_hashes = Hashes::open_ro(&r.hash_file(self.id)).ok();
            }
            None => c.gone = true,
        }
        Ok(())
    }

    fn source(c: &Chain, b: u64) -> Src {
        Self::span(c, b, b + 1).0
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

    /// Reads at `off` into `buf` (short only at the end of the file).
    pub fn read_at(&self, buf: &mut [u8], off: u64) -> io::Result<usize> {
        self.consistent(|c| self.read_in(c, buf, off))
    }

    /// Runs `f` over the chain until no apply started meanwhile (see the module notes).
    /// The check is against the counter of the chain this read used: another thread may
    /// bring the chain up to date meanwhile, and that must not bless a read made with
    /// the old one.
    fn consistent<T>(&self, mut f: impl FnMut(&Chain) -> io::Result<T>) -> io::Result<T> {
        loop {
            let (v, seq) = {
                let c = self.state.read();
                (f(&c)?, c.seq)
            };
            if self.seq_now() == seq {
                return Ok(v);
            }
            self.refresh().map_err(io::Error::other)?;
        }
    }

    fn read_in(&self, c: &Chain, buf: &mut [u8], off: u64) -> io::Result<usize> {
        let end = (off + buf.len() as u64).min(self.size);
        let blocks = self.size.div_ceil(self.bs);
        let mut pos = off;
        while pos < end {
            // One read per span of blocks with the same source.
            let (src, next) = Self::span(c, pos / self.bs, blocks);
            let stop = (next * self.bs).min(end);
            let chunk = &mut buf[(pos - off) as usize..(stop - off) as usize];
            let direct = Self::direct_of(c, src).filter(|_| aligned(chunk, pos));
            let got = match direct.or(Self::file_of(c, src)) {
                Some(f) => read_full(f, chunk, pos)?,
                None => 0,
            };
            chunk[got..].fill(0);
            pos = stop;
        }
        Ok(end.saturating_sub(off) as usize)
    }

    /// Reads block `b` into `buf` together with the BLAKE3 entry the primary sent for it
    /// (`ZERO` for a zero block; None where no hash is kept), both from the same sources.
    pub fn read_checked(&self, buf: &mut [u8], b: u64) -> io::Result<(usize, Option<[u8; 32]>)> {
        self.consistent(|c| {
            let n = self.read_in(c, buf, b * self.bs)?;
            let h = match Self::hashes_of(c, Self::source(c, b)) {
                Ok(Some(h)) => Some(h.get(b).map_err(io::Error::other)?),
                Ok(None) => None,
                Err(z) => Some(z),
            };
            Ok((n, h))
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

/// Every regular file of a point, for callers that walk it.
pub fn files(view: &PointView) -> impl Iterator<Item = &Entry> {
    view.manifest
        .entries
        .iter()
        .filter(|e| e.kind == Kind::File)
}
