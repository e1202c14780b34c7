//! The cycle being received: verified blocks staged in `incoming/` until the commit applies
//! them. Staging is what makes an apply atomic (nothing touches the latest files before the
//! whole cycle is here and verified) and a transfer resumable: an attempt that broke off
//! leaves its blocks staged, and the next attempt of the same generation re-hashes them
//! when the sender asks, so blocks already here do not travel again. Runs of zero blocks
//! (holes) are kept as ranges, so a sparse terabyte costs a few records, not millions.
//!
//! A partial block (`wire::Partial`, composed and checked whole in `partial`) is staged
//! as its changed pieces only, one after the other in `<id>.pieces` (a few large writes,
//! not a sparse file of scattered 4 KiB extents): the apply lays them over the latest
//! file's block, whose other pieces are already the block's (what it was composed on).
//!
//! A roll-back's block that an undo record of this replica holds (`put_saved`) is not
//! copied here: its record names the undo record (`saved`), whose data file has it at its
//! own offset; `verify_saved` checks every such block against its BLAKE3 before the apply
//! changes anything.
//!
//! Format v3: `incoming/cycle.json` `{version, generation, base}`; `sources.json` (the
//! undo records saved blocks come from: `saved`); per file `<id>.data` (data blocks at
//! their own offsets, sparse), `<id>.pieces` (partial blocks' pieces, appended) and
//! `<id>.idx`, 64-byte records: block u64, length u32, kind u8 (0 data, 1 zero block, 2 run of zero blocks:
//! length counts blocks, 3 partial block, 4 saved block), 3 pad bytes, BLAKE3 of the whole
//! block (32), then u64 pieces (of a partial block: bit `i` for bytes `i*4096..`; of a
//! saved block: its source's index in `sources.json`; else 0) and u64 offset of a partial
//! block's pieces in `<id>.pieces`. A staging area of another version is discarded (its
//! blocks are sent again).

use std::collections::{BTreeMap, HashMap};
use std::fs::{self, File, OpenOptions};
use std::io::{BufWriter, Read, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::{At, Error, Result};
use crate::model::FileId;
use crate::model::runs::{minus, union};
use crate::replica::posix::pieces::Pieces;
use crate::replica::posix::saved::{Check, Sources};
use crate::sys;
use crate::wire::{Block, BlockHash, zero_hash};

pub const VERSION: u32 = 3;
/// No file on a replica may be larger than this (4 PiB).
pub const MAX_FILE: u64 = 1 << 52;
/// How many files one cycle may stage.
const MAX_FILES: usize = 1 << 20;
const RECORD: usize = 64;
const OPEN_CAP: usize = 256;
const RUN: u8 = 2;
const PARTIAL: u8 = 3;
const SAVED: u8 = 4;
/// Index records are buffered 64 at a time: few write calls, and a crash loses at most
/// the last 64 blocks' records (those blocks are then sent again).
const IDX_BUFFER: usize = 64 * RECORD;

#[derive(Debug, Clone, Copy)]
pub struct Staged {
    pub len: u32,
    pub zero: bool,
    pub hash: [u8; 32],
    /// Received or re-hashed in this attempt: only confirmed blocks are applied.
    pub confirmed: bool,
    /// A partial block's staged pieces (bit `i`: bytes `i*4096..`); 0 for a whole block.
    pub pieces: u64,
    /// Where a partial block's pieces start in `<id>.pieces`.
    pub at: u64,
    /// A saved block: the index of the undo record holding it (`Incoming::sources`).
    pub source: Option<u32>,
}

impl Staged {
    fn record(&self, b: u64) -> [u8; RECORD] {
        match self.source {
            Some(i) => encode(b, self.len, SAVED, &self.hash, (u64::from(i), 0)),
            None => encode(
                b,
                self.len,
                kind_of(self),
                &self.hash,
                (self.pieces, self.at),
            ),
        }
    }
}

#[derive(Serialize, Deserialize, PartialEq)]
struct CycleFile {
    version: u32,
    generation: u64,
    base: Option<u64>,
}

/// What is staged for one file.
#[derive(Default)]
struct Staging {
    blocks: BTreeMap<u64, Staged>,
    /// Runs of whole zero blocks. They carry no data, so a run left by an earlier
    /// attempt is as good as a new one.
    zeros: Vec<[u64; 2]>,
}

pub struct Incoming {
    pub dir: PathBuf,
    pub generation: u64,
    bs: u64,
    files: HashMap<FileId, Staging>,
    open: HashMap<FileId, (File, BufWriter<File>)>,
    /// The open `<id>.pieces` files and their lengths.
    piece_files: HashMap<FileId, (File, u64)>,
    /// The undo records saved blocks come from.
    sources: Sources,
    received: u64,
}

fn encode(b: u64, len: u32, kind: u8, hash: &[u8; 32], pieces: (u64, u64)) -> [u8; RECORD] {
    let mut r = [0u8; RECORD];
    r[..8].copy_from_slice(&b.to_le_bytes());
    r[8..12].copy_from_slice(&len.to_le_bytes());
    r[12] = kind;
    r[16..48].copy_from_slice(hash);
    r[48..56].copy_from_slice(&pieces.0.to_le_bytes());
    r[56..64].copy_from_slice(&pieces.1.to_le_bytes());
    r
}

fn kind_of(s: &Staged) -> u8 {
    match (s.zero, s.pieces) {
        (true, _) => 1,
        (false, 0) => 0,
        _ => PARTIAL,
    }
}

/// The byte ranges, within a block of `len` bytes, of the pieces in `mask`.
pub fn piece_ranges(len: u32, mask: u64) -> impl Iterator<Item = std::ops::Range<usize>> {
    (0..64u32)
        .filter(move |i| mask & (1 << i) != 0)
        .map(move |i| crate::wire::Partial::piece(len, i))
        .filter(|r| !r.is_empty())
}

/// A block the staging area will not take, and why.
fn refused<T>(b: &Block, why: &str) -> Result<T> {
    Err(Error::Invalid(format!(
        "block at {} of file {}: {why}",
        b.offset, b.id
    )))
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
        let body = serde_json::to_vec(&cf).map_err(Error::encode)?;
        sys::write_atomic(&p, &body).at(&p)?;
        let mut inc = Incoming::empty(dir, generation, bs)?;
        if resume {
            inc.load(false)?;
        }
        Ok(inc)
    }

    fn empty(dir: &Path, generation: u64, bs: u64) -> Result<Incoming> {
        Ok(Incoming {
            dir: dir.to_path_buf(),
            generation,
            bs,
            files: HashMap::new(),
            open: HashMap::new(),
            piece_files: HashMap::new(),
            sources: Sources::load(dir, bs)?,
            received: 0,
        })
    }

    /// Loads a committed staging area (for recovering an interrupted apply): every
    /// staged block counts.
    pub fn committed(dir: &Path, bs: u64) -> Result<Incoming> {
        let p = dir.join("cycle.json");
        let b = fs::read(&p).at(&p)?;
        let cf: CycleFile =
            serde_json::from_slice(&b).map_err(|e| Error::corrupt(&p, e.to_string()))?;
        // A v2 area (before saved blocks) reads as v3: its records are v3's.
        if !(2..=VERSION).contains(&cf.version) {
            return Err(Error::corrupt(&p, format!("version {}", cf.version)));
        }
        let mut inc = Incoming::empty(dir, cf.generation, bs)?;
        inc.load(true)?;
        Ok(inc)
    }

    /// Takes in the records an earlier attempt left (the sources came with `empty`).
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
            let st = self.files.entry(id).or_default();
            for r in buf.chunks_exact(RECORD) {
                let b = u64::from_le_bytes(r[..8].try_into().unwrap_or([0; 8]));
                let len = u32::from_le_bytes(r[8..12].try_into().unwrap_or([0; 4]));
                let mut hash = [0u8; 32];
                hash.copy_from_slice(&r[16..48]);
                let pieces = u64::from_le_bytes(r[48..56].try_into().unwrap_or([0; 8]));
                let at = u64::from_le_bytes(r[56..64].try_into().unwrap_or([0; 8]));
                if r[12] == RUN {
                    let run = [b, b.saturating_add(u64::from(len))];
                    st.zeros = union(st.zeros.iter().copied().chain([run]).collect());
                    continue;
                }
                let source = (r[12] == SAVED).then_some(pieces);
                if source.is_some_and(|i| !self.sources.has(i)) {
                    return Err(Error::corrupt(&path, "a saved block of an unknown source"));
                }
                st.zeros = minus(&st.zeros, &[[b, b + 1]]);
                st.blocks.insert(
                    b,
                    Staged {
                        len,
                        zero: r[12] == 1,
                        hash,
                        confirmed,
                        pieces: if r[12] == PARTIAL { pieces } else { 0 },
                        at,
                        source: source.map(|i| i as u32),
                    },
                );
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

    fn files(&mut self, id: FileId) -> Result<&mut (File, BufWriter<File>)> {
        if !self.open.contains_key(&id) {
            if self.open.len() >= OPEN_CAP {
                self.open.clear();
            }
            let (d, i) = self.paths(id);
            let data = crate::sys::open_rw(&d).at(&d)?;
            let idx = OpenOptions::new()
                .append(true)
                .create(true)
                .open(&i)
                .at(&i)?;
            self.open
                .insert(id, (data, BufWriter::with_capacity(IDX_BUFFER, idx)));
        }
        self.open
            .get_mut(&id)
            .ok_or_else(|| Error::Invalid("staging file vanished".into()))
    }

    /// Where a block may be: on a block boundary, inside any file, in a cycle that has
    /// not staged too many files.
    fn bounds(&self, b: &Block) -> Result<()> {
        if b.offset % self.bs != 0 || b.len == 0 {
            return refused(b, &format!("does not fit the {}-byte blocks", self.bs));
        }
        if b.offset
            .checked_add(u64::from(b.len))
            .is_none_or(|e| e > MAX_FILE)
        {
            return refused(b, "beyond any file");
        }
        if !self.files.contains_key(&b.id) && self.files.len() >= MAX_FILES {
            return Err(Error::Invalid("too many files in one cycle".into()));
        }
        Ok(())
    }

    fn check(&self, b: &Block) -> Result<Option<u64>> {
        let bs = self.bs;
        let bad = |why: &str| refused(b, why);
        self.bounds(b)?;
        if b.zero && u64::from(b.len) > bs {
            // A run of whole zero blocks.
            if u64::from(b.len) % bs != 0 || b.hash != zero_hash(bs as usize) {
                return bad("a zero run that fails its check");
            }
            return Ok(Some(u64::from(b.len) / bs));
        }
        if u64::from(b.len) > bs {
            return bad(&format!("does not fit the {bs}-byte blocks"));
        }
        let ok = if b.zero {
            b.hash == zero_hash(b.len as usize)
        } else {
            *blake3::hash(&b.data).as_bytes() == b.hash
        };
        if !ok {
            return bad("fails its BLAKE3 check");
        }
        Ok(None)
    }

    /// Checks a block (or a run of zero blocks) from the stream and stages it.
    pub fn put(&mut self, b: &Block) -> Result<()> {
        let run = self.check(b)?;
        self.stage(b, run, 0)
    }

    /// Stages a block the caller made and checked against its hash (`partial::compose`,
    /// or a roll-back's read of a point), of which only `pieces` changed (the rest is the
    /// latest file's: only those pieces are written here; 0: the whole block).
    pub fn put_checked(&mut self, b: &Block, pieces: u64) -> Result<()> {
        self.bounds(b)?;
        if u64::from(b.len) > self.bs {
            return refused(b, &format!("does not fit the {}-byte blocks", self.bs));
        }
        self.stage(b, None, if b.zero { 0 } else { pieces })
    }

    fn stage(&mut self, b: &Block, run: Option<u64>, pieces: u64) -> Result<()> {
        let first = b.offset / self.bs;
        let (data_path, _) = self.paths(b.id);
        let at = if pieces != 0 {
            self.append_pieces(b, pieces)?
        } else {
            0
        };
        let s = Staged {
            len: b.len,
            zero: b.zero,
            hash: b.hash,
            confirmed: true,
            pieces,
            at,
            source: None,
        };
        let record = match run {
            Some(n) => encode(first, n as u32, RUN, &b.hash, (0, 0)),
            None => s.record(first),
        };
        {
            let (data, _) = self.files(b.id)?;
            // A partial block's pieces went to `<id>.pieces` (above).
            let whole = pieces == 0;
            if whole && !b.zero {
                data.write_all_at(&b.data, b.offset).at(&data_path)?;
            } else if whole && data.metadata().at(&data_path)?.len() > b.offset {
                // Zeros over bytes an earlier attempt staged: the staged file must stay
                // exactly what is staged (a new file is moved into place as it is).
                crate::sys::punch_hole(data, b.offset, u64::from(b.len)).at(&data_path)?;
            }
        }
        self.write_index(b.id, &record)?;
        match run {
            Some(n) => {
                let st = self.files.entry(b.id).or_default();
                let r = [first, first + n];
                let gone: Vec<u64> = st.blocks.range(first..first + n).map(|(k, _)| *k).collect();
                for k in gone {
                    st.blocks.remove(&k);
                }
                st.zeros = union(st.zeros.iter().copied().chain([r]).collect());
            }
            None => self.insert(b.id, first, s),
        }
        self.received();
        Ok(())
    }

    /// Appends `record` to file `id`'s index.
    fn write_index(&mut self, id: FileId, record: &[u8; RECORD]) -> Result<()> {
        let (_, idx_path) = self.paths(id);
        let (_, idx) = self.files(id)?;
        idx.write_all(record).at(&idx_path)
    }

    fn insert(&mut self, id: FileId, first: u64, s: Staged) {
        let st = self.files.entry(id).or_default();
        st.zeros = minus(&st.zeros, &[[first, first + 1]]);
        st.blocks.insert(first, s);
    }

    fn received(&mut self) {
        self.received += 1;
        crate::sys::fault::hit_nth("receive", self.received);
    }

    /// Stages a roll-back's block that the undo record in `record` holds at its own
    /// offset, with its hash entry there (`b.hash`; `b.data` is not used): only its index
    /// record is written. `verify_saved` checks it before the apply.
    pub fn put_saved(&mut self, b: &Block, record: &Path) -> Result<()> {
        self.bounds(b)?;
        if u64::from(b.len) > self.bs || b.zero {
            return refused(b, "not a saved data block");
        }
        let s = Staged {
            len: b.len,
            zero: false,
            hash: b.hash,
            confirmed: true,
            pieces: 0,
            at: 0,
            source: Some(self.sources.index(record)?),
        };
        let first = b.offset / self.bs;
        self.write_index(b.id, &s.record(first))?;
        self.insert(b.id, first, s);
        self.received();
        Ok(())
    }

    /// Checks every saved block against its BLAKE3 (read from its undo record): an
    /// error names the first that fails. Reads only; runs beside other work of the apply.
    pub fn verify_saved(&self) -> Result<()> {
        for (id, st) in &self.files {
            let saved = st
                .blocks
                .iter()
                .filter(|(_, s)| s.confirmed)
                .filter_map(|(b, s)| {
                    s.source.map(|source| Check {
                        source,
                        offset: b * self.bs,
                        len: s.len,
                        hash: s.hash,
                    })
                });
            self.sources.verify(*id, saved)?;
        }
        Ok(())
    }

    /// The hash of a block an earlier attempt staged, re-read from the staged data (so a
    /// torn write from a crash is never trusted); the block then counts for this attempt.
    pub fn rehash(&mut self, id: FileId, block: u64) -> Result<Option<BlockHash>> {
        let Some(st) = self.files.get(&id) else {
            return Ok(None);
        };
        if crate::model::runs::covers(&st.zeros, block) {
            return Ok(Some(BlockHash::Zero));
        }
        let Some(s) = st.blocks.get(&block).copied() else {
            return Ok(None);
        };
        if s.pieces != 0 || s.source.is_some() {
            // Only its pieces are here, or it is a roll-back's: it is sent again.
            return Ok(None);
        }
        let h = if s.zero {
            BlockHash::Zero
        } else {
            let mut buf = vec![0u8; s.len as usize];
            self.read(id, block, &mut buf)?;
            let h = *blake3::hash(&buf).as_bytes();
            if h != s.hash {
                if let Some(st) = self.files.get_mut(&id) {
                    st.blocks.remove(&block);
                }
                return Ok(None);
            }
            BlockHash::Data(h)
        };
        if let Some(st) = self
            .files
            .get_mut(&id)
            .and_then(|f| f.blocks.get_mut(&block))
        {
            st.confirmed = true;
        }
        Ok(Some(h))
    }

    fn pieces_path(&self, id: FileId) -> PathBuf {
        self.dir.join(format!("{id}.pieces"))
    }

    fn piece_file(&mut self, id: FileId) -> Result<&mut (File, u64)> {
        if !self.piece_files.contains_key(&id) {
            if self.piece_files.len() >= OPEN_CAP {
                self.piece_files.clear();
            }
            let p = self.pieces_path(id);
            let f = crate::sys::open_rw(&p).at(&p)?;
            let len = f.metadata().at(&p)?.len();
            self.piece_files.insert(id, (f, len));
        }
        self.piece_files
            .get_mut(&id)
            .ok_or_else(|| Error::Invalid("staging file vanished".into()))
    }

    /// Appends the bytes of `b`'s pieces `mask` to `<id>.pieces`; where they start.
    fn append_pieces(&mut self, b: &Block, mask: u64) -> Result<u64> {
        let mut bytes = Vec::with_capacity(b.data.len());
        for r in piece_ranges(b.len, mask) {
            bytes.extend_from_slice(&b.data[r]);
        }
        let p = self.pieces_path(b.id);
        let (f, len) = self.piece_file(b.id)?;
        let at = *len;
        f.write_all_at(&bytes, at).at(&p)?;
        *len += bytes.len() as u64;
        Ok(at)
    }

    /// Lays the staged pieces of partial block `s` of file `id` over `block` (its bytes
    /// as the latest file holds them).
    pub fn read_pieces(&mut self, id: FileId, s: &Staged, block: &mut [u8]) -> Result<()> {
        let ranges: Vec<std::ops::Range<usize>> = piece_ranges(s.len, s.pieces).collect();
        let total: usize = ranges.iter().map(|r| r.len()).sum();
        let mut bytes = vec![0u8; total];
        let p = self.pieces_path(id);
        let (f, _) = self.piece_file(id)?;
        let n = sys::read_full(f, &mut bytes, s.at).at(&p)?;
        if n != total {
            return Err(Error::corrupt(&p, "shorter than its index says"));
        }
        let mut from = 0;
        for r in ranges {
            let n = r.len();
            block[r].copy_from_slice(&bytes[from..from + n]);
            from += n;
        }
        Ok(())
    }

    /// Reads a staged whole block's bytes (`s`: what is staged for it), from here or
    /// from the undo record holding it.
    pub fn read_block(&mut self, id: FileId, block: u64, s: &Staged, buf: &mut [u8]) -> Result<()> {
        let Some(i) = s.source else {
            return self.read(id, block, buf);
        };
        self.sources.read(i, id, block * self.bs, buf)
    }

    /// Copies the piece record of saved block `b` of file `id` (`s`) from its undo record
    /// to `to`: whether it had one (else the caller computes it).
    pub fn copy_saved_pieces(
        &mut self,
        id: FileId,
        b: u64,
        s: &Staged,
        to: &Pieces,
    ) -> Result<bool> {
        match s.source {
            Some(i) => self.sources.copy_pieces(i, id, b, to),
            None => Ok(false),
        }
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

    /// The staged data of file `id`: its blocks at their own offsets, holes elsewhere.
    pub fn data_file(&self, id: FileId) -> PathBuf {
        self.paths(id).0
    }

    /// Whether the staged data file of `id` is exactly the file's content: it exists and
    /// every block in it counts for this attempt.
    pub fn adoptable(&self, id: FileId) -> bool {
        self.files.get(&id).is_some_and(|f| {
            f.blocks
                .values()
                .all(|s| s.confirmed && s.pieces == 0 && s.source.is_none())
        }) && self.data_file(id).exists()
    }

    /// The single blocks to apply to file `id`: those confirmed in this attempt.
    pub fn confirmed(&self, id: FileId) -> Vec<(u64, Staged)> {
        self.files
            .get(&id)
            .map(|f| {
                f.blocks
                    .iter()
                    .filter(|(_, s)| s.confirmed)
                    .map(|(b, s)| (*b, *s))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// The runs of zero blocks to apply to file `id`.
    pub fn zero_runs(&self, id: FileId) -> Vec<[u64; 2]> {
        self.files
            .get(&id)
            .map(|f| f.zeros.clone())
            .unwrap_or_default()
    }

    /// Every block the cycle changes in file `id`, as runs.
    pub fn changed(&self, id: FileId) -> Vec<[u64; 2]> {
        let singles = self.confirmed(id).into_iter().map(|(b, _)| [b, b + 1]);
        union(singles.chain(self.zero_runs(id)).collect())
    }

    pub fn bytes(&self) -> u64 {
        self.files
            .values()
            .map(|f| {
                let single: u64 = f
                    .blocks
                    .values()
                    .filter(|s| s.confirmed)
                    .map(|s| u64::from(s.len))
                    .sum();
                let zeros: u64 = f.zeros.iter().map(|r| r[1] - r[0]).sum();
                single + zeros * self.bs
            })
            .sum()
    }

    /// Before an apply: keeps only what this attempt confirmed in the index, and makes
    /// everything staged durable.
    pub fn seal(&mut self) -> Result<()> {
        self.open.clear();
        self.piece_files.clear();
        let ids: Vec<FileId> = self.files.keys().copied().collect();
        for id in ids {
            let (d, i) = self.paths(id);
            let mut body = Vec::new();
            for (b, s) in self.confirmed(id) {
                body.extend_from_slice(&s.record(b));
            }
            for r in self.zero_runs(id) {
                let mut start = r[0];
                while start < r[1] {
                    let n = (r[1] - start).min(u64::from(u32::MAX));
                    body.extend_from_slice(&encode(start, n as u32, RUN, &[0; 32], (0, 0)));
                    start += n;
                }
            }
            for f in [&d, &self.pieces_path(id)] {
                if f.exists() {
                    File::open(f).at(f)?.sync_all().at(f)?;
                }
            }
            sys::write_atomic(&i, &body).at(&i)?;
        }
        sys::fsync_dir(&self.dir).at(&self.dir)
    }
}
