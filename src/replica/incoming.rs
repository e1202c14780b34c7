//! The cycle being received: verified blocks staged in `incoming/` until the commit applies
//! them. Staging is what makes an apply atomic (nothing touches the latest files before the
//! whole cycle is here and verified) and a transfer resumable: an attempt that broke off
//! leaves its blocks staged, and the next attempt of the same generation re-hashes them
//! when the sender asks, so blocks already here do not travel again.
//!
//! Format v1: `incoming/cycle.json` `{version, generation, base}`; per file `<id>.data`
//! (blocks at their own offsets, sparse) and `<id>.idx`, 48-byte records: block u64,
//! length u32, zero u8, 3 pad bytes, BLAKE3 (32).

use std::collections::{BTreeMap, HashMap};
use std::fs::{self, File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::{At, Error, Result};
use crate::sys;
use crate::track::FileId;
use crate::wire::{Block, BlockHash, zero_hash};

pub const VERSION: u32 = 1;
/// No file on a replica may be larger than this (4 PiB).
pub const MAX_FILE: u64 = 1 << 52;
/// How many files one cycle may stage.
const MAX_FILES: usize = 1 << 20;
const RECORD: usize = 48;
const OPEN_CAP: usize = 256;

#[derive(Debug, Clone, Copy)]
pub struct Staged {
    pub len: u32,
    pub zero: bool,
    pub hash: [u8; 32],
    /// Received or re-hashed in this attempt: only confirmed blocks are applied.
    pub confirmed: bool,
}

#[derive(Serialize, Deserialize, PartialEq)]
struct CycleFile {
    version: u32,
    generation: u64,
    base: Option<u64>,
}

pub struct Incoming {
    pub dir: PathBuf,
    pub generation: u64,
    bs: u64,
    blocks: HashMap<FileId, BTreeMap<u64, Staged>>,
    open: HashMap<FileId, (File, File)>,
    received: u64,
}

fn encode(b: u64, s: &Staged) -> [u8; RECORD] {
    let mut r = [0u8; RECORD];
    r[..8].copy_from_slice(&b.to_le_bytes());
    r[8..12].copy_from_slice(&s.len.to_le_bytes());
    r[12] = u8::from(s.zero);
    r[16..48].copy_from_slice(&s.hash);
    r
}

fn decode(r: &[u8]) -> (u64, Staged) {
    let mut b = [0u8; 8];
    b.copy_from_slice(&r[..8]);
    let mut l = [0u8; 4];
    l.copy_from_slice(&r[8..12]);
    let mut hash = [0u8; 32];
    hash.copy_from_slice(&r[16..48]);
    (
        u64::from_le_bytes(b),
        Staged {
            len: u32::from_le_bytes(l),
            zero: r[12] != 0,
            hash,
            confirmed: false,
        },
    )
}

impl Incoming {
    /// Starts receiving `generation`: resumes what an earlier attempt of the same
    /// generation staged, or starts clean.
    pub fn begin(dir: &Path, generation: u64, base: Option<u64>, bs: u64) -> Result<Incoming> {
        let cf = CycleFile {
            version: VERSION,
            generation,
            base,
        };
        let p = dir.join("cycle.json");
        let resume = fs::read(&p)
            .ok()
            .and_then(|b| serde_json::from_slice::<CycleFile>(&b).ok())
            .is_some_and(|old| old == cf);
        if !resume && dir.exists() {
            fs::remove_dir_all(dir).at(dir)?;
        }
        fs::create_dir_all(dir).at(dir)?;
        let body = serde_json::to_vec(&cf).map_err(|e| Error::Invalid(e.to_string()))?;
        sys::write_atomic(&p, &body).at(&p)?;
        let mut inc = Incoming {
            dir: dir.to_path_buf(),
            generation,
            bs,
            blocks: HashMap::new(),
            open: HashMap::new(),
            received: 0,
        };
        if resume {
            inc.load(false)?;
        }
        Ok(inc)
    }

    /// Loads a committed staging area (for recovering an interrupted apply): every
    /// staged block counts.
    pub fn committed(dir: &Path, bs: u64) -> Result<Incoming> {
        let p = dir.join("cycle.json");
        let b = fs::read(&p).at(&p)?;
        let cf: CycleFile =
            serde_json::from_slice(&b).map_err(|e| Error::corrupt(&p, e.to_string()))?;
        let mut inc = Incoming {
            dir: dir.to_path_buf(),
            generation: cf.generation,
            bs,
            blocks: HashMap::new(),
            open: HashMap::new(),
            received: 0,
        };
        inc.load(true)?;
        Ok(inc)
    }

    fn load(&mut self, confirmed: bool) -> Result<()> {
        for e in fs::read_dir(&self.dir).at(&self.dir)? {
            let path = e.at(&self.dir)?.path();
            let Some(id) = path
                .file_name()
                .and_then(|n| n.to_str())
                .and_then(|n| n.strip_suffix(".idx"))
                .and_then(FileId::parse)
            else {
                continue;
            };
            let mut buf = Vec::new();
            File::open(&path)
                .at(&path)?
                .read_to_end(&mut buf)
                .at(&path)?;
            let m = self.blocks.entry(id).or_default();
            for r in buf.chunks_exact(RECORD) {
                let (b, mut s) = decode(r);
                s.confirmed = confirmed;
                m.insert(b, s);
            }
        }
        Ok(())
    }

    fn paths(&self, id: FileId) -> (PathBuf, PathBuf) {
        (
            self.dir.join(format!("{id}.data")),
            self.dir.join(format!("{id}.idx")),
        )
    }

    fn files(&mut self, id: FileId) -> Result<&(File, File)> {
        if !self.open.contains_key(&id) {
            if self.open.len() >= OPEN_CAP {
                self.open.clear();
            }
            let (d, i) = self.paths(id);
            let data = OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .open(&d)
                .at(&d)?;
            let idx = OpenOptions::new()
                .append(true)
                .create(true)
                .open(&i)
                .at(&i)?;
            self.open.insert(id, (data, idx));
        }
        self.open
            .get(&id)
            .ok_or_else(|| Error::Invalid("staging file vanished".into()))
    }

    /// Checks a block from the stream and stages it.
    pub fn put(&mut self, b: &Block) -> Result<()> {
        let bs = self.bs;
        if b.offset % bs != 0 || b.len == 0 || u64::from(b.len) > bs {
            return Err(Error::Invalid(format!(
                "block at {} of {} bytes does not fit the {bs}-byte blocks",
                b.offset, b.len
            )));
        }
        if b.offset
            .checked_add(u64::from(b.len))
            .is_none_or(|e| e > MAX_FILE)
        {
            return Err(Error::Invalid(format!(
                "block at offset {} is beyond any file",
                b.offset
            )));
        }
        let ok = if b.zero {
            b.hash == zero_hash(b.len as usize)
        } else {
            *blake3::hash(&b.data).as_bytes() == b.hash
        };
        if !ok {
            return Err(Error::Invalid(format!(
                "block at {} of file {} fails its BLAKE3 check",
                b.offset, b.id
            )));
        }
        if !self.blocks.contains_key(&b.id) && self.blocks.len() >= MAX_FILES {
            return Err(Error::Invalid("too many files in one cycle".into()));
        }
        let s = Staged {
            len: b.len,
            zero: b.zero,
            hash: b.hash,
            confirmed: true,
        };
        let block = b.offset / bs;
        let (data_path, idx_path) = self.paths(b.id);
        let (data, idx) = self.files(b.id)?;
        if !b.zero {
            data.write_all_at(&b.data, b.offset).at(&data_path)?;
        }
        let mut w: &File = idx;
        w.write_all(&encode(block, &s)).at(&idx_path)?;
        self.blocks.entry(b.id).or_default().insert(block, s);
        self.received += 1;
        crate::fault::hit_nth("receive", self.received);
        Ok(())
    }

    /// The hash of a block staged by an earlier attempt, re-read from the staged data (so a
    /// torn write from a crash is never trusted); the block then counts for this attempt.
    pub fn rehash(&mut self, id: FileId, block: u64) -> Result<Option<BlockHash>> {
        let Some(s) = self.blocks.get(&id).and_then(|m| m.get(&block)).copied() else {
            return Ok(None);
        };
        let h = if s.zero {
            BlockHash::Zero
        } else {
            let mut buf = vec![0u8; s.len as usize];
            self.read(id, block, &mut buf)?;
            let h = *blake3::hash(&buf).as_bytes();
            if h != s.hash {
                if let Some(m) = self.blocks.get_mut(&id) {
                    m.remove(&block);
                }
                return Ok(None);
            }
            BlockHash::Data(h)
        };
        if let Some(st) = self.blocks.get_mut(&id).and_then(|m| m.get_mut(&block)) {
            st.confirmed = true;
        }
        Ok(Some(h))
    }

    /// Reads a staged block's bytes.
    pub fn read(&mut self, id: FileId, block: u64, buf: &mut [u8]) -> Result<()> {
        let off = block * self.bs;
        let (data_path, _) = self.paths(id);
        let (data, _) = self.files(id)?;
        let n = sys::read_full(data, buf, off).at(&data_path)?;
        buf[n..].fill(0);
        Ok(())
    }

    /// The blocks to apply to file `id`: those confirmed in this attempt.
    pub fn confirmed(&self, id: FileId) -> Vec<(u64, Staged)> {
        self.blocks
            .get(&id)
            .map(|m| {
                m.iter()
                    .filter(|(_, s)| s.confirmed)
                    .map(|(b, s)| (*b, *s))
                    .collect()
            })
            .unwrap_or_default()
    }

    pub fn bytes(&self) -> u64 {
        self.blocks
            .values()
            .flat_map(|m| m.values())
            .filter(|s| s.confirmed)
            .map(|s| u64::from(s.len))
            .sum()
    }

    /// Before an apply: keeps only confirmed blocks in the index, and makes everything
    /// staged durable.
    pub fn seal(&mut self) -> Result<()> {
        self.open.clear();
        let ids: Vec<FileId> = self.blocks.keys().copied().collect();
        for id in ids {
            let (d, i) = self.paths(id);
            let mut body = Vec::new();
            for (b, s) in self.confirmed(id) {
                body.extend_from_slice(&encode(b, &s));
            }
            if d.exists() {
                File::open(&d).at(&d)?.sync_all().at(&d)?;
            }
            sys::write_atomic(&i, &body).at(&i)?;
        }
        sys::fsync_dir(&self.dir).at(&self.dir)
    }
}
