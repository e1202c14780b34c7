//! Reading a recovery point: its tree comes from its manifest; a file's block comes from
//! the first undo record, going forward from the point, that saved it, or else from the
//! latest file. Nothing is copied to read a point, and opening one costs its manifest and
//! the small undo indexes.
//!
//! Reads stay correct while cycles apply. An apply writes the undo record of the point it
//! replaces (durably) before it changes any latest file; so after reading from the latest
//! files a reader checks whether that record has appeared and, if it has, takes it in and
//! reads again. Files a retention run deletes stay readable through the descriptors a
//! reader holds.

use std::collections::{BTreeSet, HashMap};
use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::sync::Arc;

use parking_lot::Mutex;

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
        })
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

    /// Opens a file of this point for reading.
    pub fn file(&self, e: &Entry) -> Result<PointFile> {
        let id =
            e.id.ok_or_else(|| Error::Invalid(format!("{} is not a regular file", e.path)))?;
        let r = Replica::open_only(&self.replica)?;
        let pf = PointFile {
            id,
            size: e.size,
            bs: self.bs,
            from: self.info.generation,
            replica: r,
            state: Mutex::new(Chain::default()),
        };
        pf.refresh()?;
        Ok(pf)
    }
}

/// One layer a point's file reads from: an undo record's saved blocks.
struct Layer {
    file: UndoFile,
    data: File,
    hashes: Option<Hashes>,
}

#[derive(Default)]
struct Chain {
    layers: Vec<Layer>,
    loaded: BTreeSet<String>,
    latest: Option<File>,
    latest_hashes: Option<Hashes>,
    /// The undo directory whose appearance means the latest files are about to change.
    watch: Option<PathBuf>,
}

/// One file of a point.
pub struct PointFile {
    id: FileId,
    pub size: u64,
    bs: u64,
    from: u64,
    replica: Replica,
    state: Mutex<Chain>,
}

/// Where a block comes from.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Src {
    Layer(usize),
    Latest,
    Zero,
}

impl PointFile {
    /// Takes in undo records that appeared since the last look (and, the first time, all
    /// of them from this point on), and finds the latest file.
    fn refresh(&self) -> Result<()> {
        let mut c = self.state.lock();
        let r = &self.replica;
        let latest = r.latest()?;
        for p in r.points()? {
            if p.generation < self.from || c.loaded.contains(&p.id) {
                continue;
            }
            let dir = r.undo_dir(&p.id);
            if !dir.exists() {
                continue;
            }
            let idx = UndoIndex::load(&dir)?;
            if let Some(f) = idx.files.get(&self.id) {
                let dp = data_path(&dir, self.id);
                let hp = hash_path(&dir, self.id);
                c.layers.push(Layer {
                    file: f.clone(),
                    data: File::open(&dp).at(&dp)?,
                    hashes: Hashes::open_ro(&hp).ok(),
                });
            }
            c.loaded.insert(p.id.clone());
        }
        if c.latest.is_none() {
            if let Some(l) = &latest {
                let m = r.manifest(&l.id)?;
                if let Some(e) = m.entries.iter().find(|e| e.id == Some(self.id)) {
                    c.latest = r.tree.open_file(&e.path, libc::O_RDONLY, 0).ok();
                    c.latest_hashes = Hashes::open_ro(&r.hash_file(self.id)).ok();
                }
            }
        }
        c.watch = latest.map(|l| r.undo_dir(&l.id));
        Ok(())
    }

    /// Whether an apply started since the last look (so the latest files may change):
    /// the current latest point has an undo record this reader has not taken in.
    fn stale(&self) -> bool {
        let cur = std::fs::read_to_string(self.replica.sd.path("latest")).unwrap_or_default();
        let cur = cur.trim();
        if cur.is_empty() {
            return false;
        }
        let c = self.state.lock();
        let undo = self.replica.undo_dir(cur);
        (c.watch.as_ref() != Some(&undo)) || (undo.exists() && !c.loaded.contains(cur))
    }

    fn source(c: &Chain, b: u64) -> Src {
        match c.layers.iter().position(|l| l.file.has(b)) {
            Some(i) => Src::Layer(i),
            None if c.latest.is_some() => Src::Latest,
            None => Src::Zero,
        }
    }

    /// Reads at `off` into `buf` (short only at the end of the file).
    pub fn read_at(&self, buf: &mut [u8], off: u64) -> io::Result<usize> {
        loop {
            let n = self.read_once(buf, off)?;
            if !self.stale() {
                return Ok(n);
            }
            self.refresh().map_err(io::Error::other)?;
        }
    }

    fn read_once(&self, buf: &mut [u8], off: u64) -> io::Result<usize> {
        let c = self.state.lock();
        let end = (off + buf.len() as u64).min(self.size);
        let mut pos = off;
        while pos < end {
            let src = Self::source(&c, pos / self.bs);
            // Extend over following blocks with the same source: one read.
            let mut stop = ((pos / self.bs + 1) * self.bs).min(end);
            while stop < end && Self::source(&c, stop / self.bs) == src {
                stop = ((stop / self.bs + 1) * self.bs).min(end);
            }
            let chunk = &mut buf[(pos - off) as usize..(stop - off) as usize];
            let got = match src {
                Src::Layer(i) => read_full(&c.layers[i].data, chunk, pos)?,
                Src::Latest => c
                    .latest
                    .as_ref()
                    .map_or(Ok(0), |f| read_full(f, chunk, pos))?,
                Src::Zero => 0,
            };
            chunk[got..].fill(0);
            pos = stop;
        }
        Ok(end.saturating_sub(off) as usize)
    }

    /// The BLAKE3 the primary sent for block `b` (`ZERO` for a zero block); None where no
    /// hash is kept.
    pub fn expected(&self, b: u64) -> Result<Option<[u8; 32]>> {
        let c = self.state.lock();
        let h = match Self::source(&c, b) {
            Src::Layer(i) => c.layers[i].hashes.as_ref(),
            Src::Latest => c.latest_hashes.as_ref(),
            Src::Zero => return Ok(Some(ZERO)),
        };
        h.map(|h| h.get(b)).transpose()
    }

    /// Whether block `b` is a hole (reads as zeros) without reading it.
    pub fn is_hole(&self, b: u64) -> bool {
        let c = self.state.lock();
        let f = match Self::source(&c, b) {
            Src::Layer(i) => &c.layers[i].data,
            Src::Latest => match &c.latest {
                Some(f) => f,
                None => return true,
            },
            Src::Zero => return true,
        };
        let off = b * self.bs;
        sys::lseek(f.as_raw_fd(), off as i64, libc::SEEK_DATA)
            .map_or(true, |d| d as u64 >= off + self.bs)
    }

    /// SEEK_DATA / SEEK_HOLE over the point's content: the next offset at or after `off`
    /// that is data (`data`) or a hole; None past the end (ENXIO).
    pub fn seek(&self, off: u64, data: bool) -> Option<u64> {
        if off >= self.size {
            return None;
        }
        let blocks = self.size.div_ceil(self.bs);
        let mut b = off / self.bs;
        while b < blocks {
            if self.is_hole(b) != data {
                return Some((b * self.bs).max(off));
            }
            b += 1;
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
