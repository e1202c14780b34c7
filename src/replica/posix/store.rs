//! The POSIX replica behind the two seams: `PointStore` (its points read back through
//! `read`'s undo-record chains) and `ReplicaStore` (`Receiving`: a receive session's
//! staging in `incoming/`, hash answers from the staged blocks and the latest files, and
//! the atomic apply).

use std::fs::File;
use std::path::Path;

use crate::error::{At, Error, Result};
use crate::model::retention::Policy;
use crate::model::{Entry, FileId, Manifest, PointInfo, RelPath};
use crate::replica::posix::incoming::Incoming;
use crate::replica::posix::read::{self, PointFile};
use crate::replica::posix::{Replica, apply, hashes, partial};
use crate::replica::{Binding, PointRead, PointStore, ReplicaStore};
use crate::state::StateDir;
use crate::sys;
use crate::wire::{Block, BlockHash, Partial};

impl PointStore for Replica {
    fn location(&self) -> &Path {
        &self.root
    }

    fn block_size(&self) -> u64 {
        self.cfg.block_size
    }

    fn points(&self) -> Result<Vec<PointInfo>> {
        Replica::points(self)
    }

    fn latest(&self) -> Result<Option<PointInfo>> {
        Replica::latest(self)
    }

    fn manifest(&self, id: &str) -> Result<Manifest> {
        Replica::manifest(self, id)
    }

    fn open(&self, p: &PointInfo, e: &Entry, direct: bool) -> Result<Box<dyn PointRead>> {
        Ok(Box::new(PointFile::open(self, p, e, direct)?))
    }

    fn allocated(&self, p: &PointInfo, e: &Entry) -> Result<u64> {
        read::allocated(self, p, e)
    }
}

/// A POSIX replica receiving cycles.
pub struct Receiving {
    replica: Replica,
    inc: Option<Incoming>,
    /// The latest file partial blocks of one file build on (`partial`), kept while that
    /// file's blocks arrive.
    base: Option<(FileId, Option<File>)>,
}

impl Receiving {
    /// The replica at `root` for the store `b` names: an existing one, or with `init`
    /// (`drfs protect`) a directory made one now: an empty one, or with `seed` one whose
    /// files seed it (nothing in it is deleted; files at the store's paths are compared).
    pub fn bind(root: &Path, b: &Binding<'_>) -> Result<Receiving> {
        let (store_id, bs, init, keep) = (b.store_id, b.block_size, b.init, b.keep);
        if init {
            Policy::parse(keep).map_err(Error::operator)?;
        }
        let exists = StateDir::new(root).exists();
        if !exists && init && !b.seed {
            refuse_unless_empty(root)?;
        }
        let mut r = if !exists && init {
            Replica::init(root, store_id, bs, keep)?
        } else {
            Replica::open(root)?
        };
        let by_planned = r
            .cfg
            .promoted
            .as_ref()
            .is_some_and(|p| p.planned_by(store_id));
        if !(b.planned && by_planned) {
            r.refuse_if_promoted()?;
        }
        if init && r.cfg.keep.as_deref() != Some(keep) && r.cfg.source.as_deref() == Some(store_id)
        {
            let mut cfg = r.cfg.clone();
            cfg.keep = Some(keep.to_string());
            r.sd.write_config(&cfg)?;
            r = Replica::open(root)?;
        }
        Ok(Receiving {
            replica: r,
            inc: None,
            base: None,
        })
    }

    fn incoming(&mut self) -> Result<&mut Incoming> {
        self.inc
            .as_mut()
            .ok_or_else(|| Error::transient("data before a cycle began"))
    }

    /// The latest file of `id` (before a first point: the file at `path`, a seed).
    fn latest_file(&self, id: FileId, path: &RelPath) -> Result<Option<File>> {
        let r = &self.replica;
        let at = match r.latest()? {
            Some(p) => r
                .manifest(&p.id)?
                .entries
                .into_iter()
                .find(|e| e.id == Some(id))
                .map(|e| e.path),
            None => Some(path.clone()),
        };
        Ok(at.and_then(|p| r.tree.open_file(&p, libc::O_RDONLY, 0).ok()))
    }
}

impl ReplicaStore for Receiving {
    fn location(&self) -> &Path {
        &self.replica.root
    }

    fn id(&self) -> &str {
        &self.replica.cfg.store_id
    }

    fn source(&self) -> Option<&str> {
        self.replica.cfg.source.as_deref()
    }

    fn promoted(&self) -> Option<&str> {
        self.replica.cfg.promoted.as_ref().map(|p| p.point.as_str())
    }

    fn block_size(&self) -> u64 {
        self.replica.cfg.block_size
    }

    fn latest(&self) -> Result<Option<PointInfo>> {
        self.replica.latest()
    }

    fn begin(&mut self, generation: u64, base: Option<u64>) -> Result<()> {
        self.base = None;
        let dir = self.replica.sd.path("incoming");
        self.inc = Some(Incoming::begin(
            &dir,
            generation,
            base,
            self.replica.cfg.block_size,
        )?);
        Ok(())
    }

    fn stage(&mut self, b: &Block) -> Result<()> {
        self.incoming()?.put(b)
    }

    fn stage_partial(&mut self, p: &Partial) -> Result<()> {
        self.incoming()?;
        if self.base.as_ref().is_none_or(|(id, _)| *id != p.id) {
            if self.replica.latest()?.is_none() {
                return Err(Error::transient(
                    "a partial block before the replica has a point to build it on",
                ));
            }
            self.base = Some((p.id, self.latest_file(p.id, &RelPath::root())?));
        }
        let base = self.base.as_ref().and_then(|(_, f)| f.as_ref());
        let block = partial::compose(p, base, self.replica.cfg.block_size)?;
        // On a latest file only the pieces change; a new file gets the block whole.
        let pieces = if base.is_some() { p.data | p.zero } else { 0 };
        self.incoming()?.put_checked(&block, pieces)
    }

    fn hashes(
        &mut self,
        id: FileId,
        path: &RelPath,
        first: u64,
        count: u64,
    ) -> Result<Vec<BlockHash>> {
        let bs = self.replica.cfg.block_size;
        let file = self.latest_file(id, path)?;
        let size = file
            .as_ref()
            .and_then(|f| f.metadata().ok())
            .map_or(0, |m| m.len());
        let mut holes = file.as_ref().map(sys::Holes::new);
        let mut out = Vec::with_capacity(count as usize);
        let mut buf = vec![0u8; bs as usize];
        for b in first..first + count {
            if let Some(h) = self.incoming()?.rehash(id, b)? {
                out.push(h);
                continue;
            }
            out.push(match (&file, &mut holes) {
                (Some(f), Some(h)) => hash_block(f, h, size, b, bs, &mut buf)?,
                _ => BlockHash::Absent,
            });
        }
        Ok(out)
    }

    fn index(&mut self, id: FileId, first: u64, count: u64) -> Result<Vec<BlockHash>> {
        let p = self.replica.hash_file(id);
        if !p.exists() {
            return Ok(vec![BlockHash::Absent; count as usize]);
        }
        let h = hashes::Hashes::open_ro(&p)?;
        let blocks = h.blocks()?;
        let mut buf = vec![0u8; 32 * count as usize];
        h.read_entries(first, &mut buf)?;
        Ok((first..first + count)
            .zip(buf.chunks_exact(32))
            .map(|(b, e)| match e.try_into() {
                _ if b >= blocks => BlockHash::Absent,
                Ok(e) if e != hashes::ZERO => BlockHash::Data(e),
                _ => BlockHash::Zero,
            })
            .collect())
    }

    fn commit(&mut self, m: Manifest) -> Result<PointInfo> {
        let mut inc = self
            .inc
            .take()
            .ok_or_else(|| Error::transient("commit without a cycle"))?;
        let point = apply::commit(&self.replica, &mut inc, m)?;
        if let Err(e) = self.replica.prune(sys::now_ns() as i64) {
            tracing::warn!("retention: {e}");
        }
        Ok(point)
    }
}

/// A directory that holds files is no replica to bind without `--seed`: its files would
/// be taken for the store's, and overwritten where the paths meet.
fn refuse_unless_empty(root: &Path) -> Result<()> {
    let mut names: Vec<String> = std::fs::read_dir(root)
        .at(root)?
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    if names.is_empty() {
        return Ok(());
    }
    names.sort();
    let more = names.len().saturating_sub(3);
    names.truncate(3);
    let mut held = names.join(", ");
    if more > 0 {
        held.push_str(&format!(" and {more} more"));
    }
    Err(Error::operator(format!(
        "{} is not empty (it holds {held}) and is not a drfs replica: give an empty directory, or --seed to use its files as a seed copy (only blocks that differ are sent; nothing else in it is touched)",
        root.display()
    )))
}

/// The BLAKE3 of block `b` of `f` (holes and zero blocks as `Zero`, beyond the end `Absent`).
fn hash_block(
    f: &File,
    holes: &mut sys::Holes<'_>,
    size: u64,
    b: u64,
    bs: u64,
    buf: &mut [u8],
) -> Result<BlockHash> {
    let off = b * bs;
    if off >= size {
        return Ok(BlockHash::Absent);
    }
    let n = ((size - off).min(bs)) as usize;
    if holes.hole(off, n as u64) {
        return Ok(BlockHash::Zero);
    }
    let got = sys::read_full(f, &mut buf[..n], off).map_err(|e| Error::Io {
        path: "replica file".into(),
        source: e,
    })?;
    buf[got..n].fill(0);
    if crate::sys::is_zero(&buf[..n]) {
        return Ok(BlockHash::Zero);
    }
    Ok(BlockHash::Data(*blake3::hash(&buf[..n]).as_bytes()))
}
