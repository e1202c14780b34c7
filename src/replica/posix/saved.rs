//! Saved blocks: a roll-back's blocks that an undo record of this replica already holds,
//! staged by reference to that record instead of copied (`Incoming::put_saved`). This
//! owns the list of those records, `incoming/sources.json` (paths relative to the state
//! directory: `["points/<id>/undo", ...]`), and reading the blocks, checking them and
//! copying their piece records back out of the records. An apply changes no undo record
//! but the one of the point it replaces, so a listed record holds the same bytes for as
//! long as a staging area names it.

use std::collections::HashMap;
use std::fs::{self, File};
use std::path::{Component, Path, PathBuf};

use crate::error::{At, Error, Result};
use crate::model::FileId;
use crate::replica::posix::pieces::Pieces;
use crate::replica::posix::undo::{data_path, hash_path};
use crate::sys;

/// How many records' files stay open at once.
const OPEN_CAP: usize = 256;

/// The undo records a staging area's saved blocks come from.
pub struct Sources {
    /// `incoming/sources.json`.
    file: PathBuf,
    /// The state directory the listed paths are relative to.
    state: PathBuf,
    /// The records, absolute, in the order of their indexes.
    dirs: Vec<PathBuf>,
    bs: u64,
    data: HashMap<(u32, FileId), File>,
    /// The piece records beside them (None: the record keeps none).
    pieces: HashMap<(u32, FileId), Option<Pieces>>,
}

/// One saved block to check: its source, offset, length and BLAKE3.
pub struct Check {
    pub source: u32,
    pub offset: u64,
    pub len: u32,
    pub hash: [u8; 32],
}

impl Sources {
    /// The sources of the staging area in `incoming` (none if it lists none yet).
    pub fn load(incoming: &Path, bs: u64) -> Result<Sources> {
        let state = incoming
            .parent()
            .ok_or_else(|| Error::Invalid(format!("{} has no parent", incoming.display())))?
            .to_path_buf();
        let file = incoming.join("sources.json");
        let rel: Vec<PathBuf> = match fs::read(&file) {
            Ok(b) => {
                serde_json::from_slice(&b).map_err(|e| Error::corrupt(&file, e.to_string()))?
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
            Err(e) => return Err(e).at(&file),
        };
        if rel
            .iter()
            .any(|r| !r.is_relative() || r.components().any(|c| c == Component::ParentDir))
        {
            return Err(Error::corrupt(
                &file,
                "a source outside the state directory",
            ));
        }
        Ok(Sources {
            dirs: rel.iter().map(|r| state.join(r)).collect(),
            file,
            state,
            bs,
            data: HashMap::new(),
            pieces: HashMap::new(),
        })
    }

    /// Whether `i` is a source's index.
    pub fn has(&self, i: u64) -> bool {
        i < self.dirs.len() as u64
    }

    /// The index of undo record `dir`, added (durably) if new.
    pub fn index(&mut self, dir: &Path) -> Result<u32> {
        if let Some(i) = self.dirs.iter().position(|s| s == dir) {
            return Ok(i as u32);
        }
        let outside = || {
            Error::Invalid(format!(
                "{} is not in {}",
                dir.display(),
                self.state.display()
            ))
        };
        let mut rel = Vec::with_capacity(self.dirs.len() + 1);
        for d in self.dirs.iter().map(PathBuf::as_path).chain([dir]) {
            rel.push(d.strip_prefix(&self.state).map_err(|_| outside())?);
        }
        let body = serde_json::to_vec(&rel).map_err(Error::encode)?;
        sys::write_atomic(&self.file, &body).at(&self.file)?;
        self.dirs.push(dir.to_path_buf());
        Ok((self.dirs.len() - 1) as u32)
    }

    fn dir(&self, i: u32) -> Result<&Path> {
        self.dirs
            .get(i as usize)
            .map(PathBuf::as_path)
            .ok_or_else(|| Error::corrupt(&self.file, "no such source"))
    }

    /// Reads file `id`'s saved bytes at `off` from source `i` into `buf` (zeros past the
    /// record's end).
    pub fn read(&mut self, i: u32, id: FileId, off: u64, buf: &mut [u8]) -> Result<()> {
        let p = data_path(self.dir(i)?, id);
        if !self.data.contains_key(&(i, id)) {
            if self.data.len() >= OPEN_CAP {
                self.data.clear();
            }
            self.data.insert((i, id), File::open(&p).at(&p)?);
        }
        let f = self
            .data
            .get(&(i, id))
            .ok_or_else(|| Error::Invalid("a source file vanished".into()))?;
        let n = sys::read_full(f, buf, off).at(&p)?;
        buf[n..].fill(0);
        Ok(())
    }

    /// Copies the piece record of block `b` of file `id` from source `i` to `to`: whether
    /// the source had one.
    pub fn copy_pieces(&mut self, i: u32, id: FileId, b: u64, to: &Pieces) -> Result<bool> {
        if !self.pieces.contains_key(&(i, id)) {
            if self.pieces.len() >= OPEN_CAP {
                self.pieces.clear();
            }
            let from = Pieces::open_ro(&hash_path(self.dir(i)?, id), self.bs);
            self.pieces.insert((i, id), from);
        }
        match self.pieces.get(&(i, id)) {
            Some(Some(from)) => from.copy_one(to, b),
            _ => Ok(false),
        }
    }

    /// Checks saved blocks of file `id` against their BLAKE3: an error names the first
    /// that fails. Reads only (its own descriptors), so it can run beside other work.
    pub fn verify(&self, id: FileId, blocks: impl Iterator<Item = Check>) -> Result<()> {
        let mut buf = vec![0u8; self.bs as usize];
        let mut open: HashMap<u32, File> = HashMap::new();
        for c in blocks {
            let p = data_path(self.dir(c.source)?, id);
            let f = match open.entry(c.source) {
                std::collections::hash_map::Entry::Occupied(o) => o.into_mut(),
                std::collections::hash_map::Entry::Vacant(v) => v.insert(File::open(&p).at(&p)?),
            };
            let chunk = &mut buf[..c.len as usize];
            let n = sys::read_full(f, chunk, c.offset).at(&p)?;
            chunk[n..].fill(0);
            if *blake3::hash(chunk).as_bytes() != c.hash {
                return Err(Error::operator(format!(
                    "{}: the saved block at byte {} does not match its BLAKE3; nothing was changed",
                    p.display(),
                    c.offset
                )));
            }
        }
        Ok(())
    }
}
