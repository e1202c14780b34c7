//! Reading a recovery point: its tree comes from its manifest; a file's block comes from
//! the first undo record, going forward from the point, that saved it, or else from the
//! latest file. Nothing is copied to read a point.

use std::collections::HashMap;
use std::fs::File;
use std::io;
use std::path::PathBuf;

use crate::error::{At, Error, Result};
use crate::relpath::RelPath;
use crate::replica::undo::{UndoIndex, data_path};
use crate::replica::{PointInfo, Replica};
use crate::sys::read_full;
use crate::track::FileId;
use crate::wire::{Entry, Kind, Manifest};

/// A point, ready to be read.
pub struct PointView {
    pub info: PointInfo,
    pub manifest: Manifest,
    bs: u64,
    /// The undo records from this point up to (not including) the latest, oldest first.
    undos: Vec<(PathBuf, UndoIndex)>,
    /// Where each file's data lives in the latest point (None: deleted since).
    latest: HashMap<FileId, RelPath>,
    root: PathBuf,
}

impl PointView {
    pub fn open(r: &Replica, id: &str) -> Result<PointView> {
        let points = r.points()?;
        let Some(pos) = points.iter().position(|p| p.id == id) else {
            return Err(Error::Invalid(format!(
                "no point {id} on {} (drfs points lists them)",
                r.root.display()
            )));
        };
        let manifest = r.manifest(id)?;
        let latest_id = r.latest()?.map(|p| p.id).unwrap_or_default();
        let latest_m = if latest_id == id {
            manifest.clone()
        } else {
            r.manifest(&latest_id)?
        };
        let mut undos = Vec::new();
        for p in &points[pos..] {
            if p.id == latest_id {
                break;
            }
            undos.push((r.undo_dir(&p.id), UndoIndex::load(&r.undo_dir(&p.id))?));
        }
        let latest = latest_m
            .entries
            .iter()
            .filter(|e| e.kind == Kind::File)
            .filter_map(|e| e.id.map(|i| (i, e.path.clone())))
            .collect();
        Ok(PointView {
            info: points[pos].clone(),
            manifest,
            bs: r.cfg.block_size,
            undos,
            latest,
            root: r.root.clone(),
        })
    }

    pub fn entry(&self, path: &RelPath) -> Option<&Entry> {
        self.manifest
            .entries
            .binary_search_by(|e| e.path.cmp(path))
            .ok()
            .map(|i| &self.manifest.entries[i])
    }

    /// Opens a file of this point for reading.
    pub fn file(&self, e: &Entry) -> Result<PointFile> {
        let id =
            e.id.ok_or_else(|| Error::Invalid(format!("{} is not a regular file", e.path)))?;
        let latest = match self.latest.get(&id) {
            Some(p) => Some(File::open(p.under(&self.root)).at(&p.under(&self.root))?),
            None => None,
        };
        let mut layers = Vec::new();
        for (dir, idx) in &self.undos {
            if let Some(f) = idx.files.get(&id) {
                let p = data_path(dir, id);
                layers.push((f.clone(), File::open(&p).at(&p)?));
            }
        }
        Ok(PointFile {
            size: e.size,
            bs: self.bs,
            layers,
            latest,
        })
    }
}

/// One file of a point.
pub struct PointFile {
    pub size: u64,
    bs: u64,
    layers: Vec<(crate::replica::undo::UndoFile, File)>,
    latest: Option<File>,
}

impl PointFile {
    /// Where block `b` comes from.
    fn source(&self, b: u64) -> Option<&File> {
        self.layers
            .iter()
            .find(|(f, _)| f.has(b))
            .map(|(_, file)| file)
            .or(self.latest.as_ref())
    }

    /// Reads at `off` into `buf` (short only at the end of the file).
    pub fn read_at(&self, buf: &mut [u8], off: u64) -> io::Result<usize> {
        let end = (off + buf.len() as u64).min(self.size);
        let mut pos = off;
        while pos < end {
            let b = pos / self.bs;
            let stop = ((b + 1) * self.bs).min(end);
            let chunk = &mut buf[(pos - off) as usize..(stop - off) as usize];
            let n = match self.source(b) {
                Some(f) => read_full(f, chunk, pos)?,
                None => 0,
            };
            chunk[n..].fill(0);
            pos = stop;
        }
        Ok(end.saturating_sub(off) as usize)
    }

    /// Whether block `b` is known to be a hole (all zeros) without reading it.
    pub fn is_hole(&self, b: u64) -> bool {
        let Some(f) = self.source(b) else { return true };
        let off = b * self.bs;
        use std::os::fd::AsRawFd;
        match crate::sys::lseek(f.as_raw_fd(), off as i64, libc::SEEK_DATA) {
            Ok(d) => d as u64 >= off + self.bs,
            Err(_) => true,
        }
    }
}
