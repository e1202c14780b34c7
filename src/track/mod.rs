//! Change tracking for one store: which blocks of which files changed, and which namespace
//! and metadata changes happened, since tracking began (or since the last cut).
//!
//! Every operation that changes the store goes through the tracker *before* it touches the
//! store: `begin_write` marks the blocks (and, for a cold extent, durably records it in the
//! activity log) and returns holding the store's gate; the caller does the operation and
//! drops the guard. A checkpoint (and, later, a cut) takes the gate exclusively, so it sees
//! every operation either wholly before it or wholly after it.

pub mod activity;
pub mod bitmap;
pub mod changelog;
pub mod reconcile;
pub mod table;

use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Weak};

use parking_lot::{Mutex, RwLock, RwLockReadGuard};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::error::{Error, Result};
use crate::relpath::RelPath;
use crate::state::{Config, LastStop, StateDir};
use activity::ActivityLog;
use bitmap::Bitmap;
use changelog::{ChangeLog, Op, Record};
use table::Table;

/// A file's stable id: random, given once, kept through renames. Printed as 16 hex digits.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct FileId(pub u64);

impl Default for FileId {
    fn default() -> Self {
        FileId::new()
    }
}

impl FileId {
    pub fn new() -> FileId {
        let hex = crate::state::new_id();
        FileId(u64::from_str_radix(&hex, 16).unwrap_or(1))
    }

    pub fn parse(s: &str) -> Option<FileId> {
        (s.len() == 16)
            .then(|| u64::from_str_radix(s, 16).ok())
            .flatten()
            .map(FileId)
    }
}

impl fmt::Display for FileId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:016x}", self.0)
    }
}

impl fmt::Debug for FileId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{self}")
    }
}

impl Serialize for FileId {
    fn serialize<S: Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for FileId {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        FileId::parse(&s).ok_or_else(|| serde::de::Error::custom("bad file id"))
    }
}

/// An activity-log extent number that stands for "the whole file".
const WHOLE_FILE: u64 = u64::MAX;
/// A change spanning more extents than this is recorded as whole-file.
const WHOLE_FILE_AFTER: u64 = 64;

/// The open bitmap of one file, plus which of its extents are hot in the activity log.
pub struct FileTrack {
    pub id: FileId,
    bits: RwLock<Bits>,
}

struct Bits {
    map: Bitmap,
    hot: Vec<AtomicU64>,
    whole_hot: AtomicBool,
}

impl Bits {
    fn extents_hot(&self, e0: u64, e1: u64) -> bool {
        if self.whole_hot.load(Ordering::Acquire) {
            return true;
        }
        (e0..=e1).all(|e| self.is_hot(e))
    }

    fn is_hot(&self, e: u64) -> bool {
        self.hot
            .get((e / 64) as usize)
            .is_some_and(|w| w.load(Ordering::Acquire) & (1 << (e % 64)) != 0)
    }

    fn set_hot(&mut self, e: u64) {
        let w = (e / 64) as usize;
        if self.hot.len() <= w {
            self.hot.resize_with(w + 1, || AtomicU64::new(0));
        }
        self.hot[w].fetch_or(1 << (e % 64), Ordering::AcqRel);
    }

    fn clear_hot(&self) {
        self.whole_hot.store(false, Ordering::Release);
        for w in &self.hot {
            w.store(0, Ordering::Release);
        }
    }
}

impl Drop for FileTrack {
    fn drop(&mut self) {
        // Bits set here may still sit in the page cache; a checkpoint after this drop
        // would not see this file, so make them durable now.
        if let Err(e) = self.bits.get_mut().map.flush() {
            tracing::error!("flushing bitmap of {}: {e}", self.id);
        }
    }
}

enum Mark {
    Done,
    LogFull,
}

impl FileTrack {
    fn try_mark(&self, t: &Tracker, off: u64, len: u64) -> Result<Mark> {
        let (bs, ext) = (t.cfg.block_size, t.cfg.al_extent);
        let end = off.saturating_add(len) - 1;
        let (first, last) = (off / bs, end / bs);
        let (e0, e1) = (off / ext, end / ext);
        {
            let bits = self.bits.read();
            if bits.map.capacity() > last && bits.extents_hot(e0, e1) {
                bits.map.set(first, last);
                return Ok(Mark::Done);
            }
        }
        let mut bits = self.bits.write();
        bits.map.grow(last + 1)?;
        if !bits.extents_hot(e0, e1) {
            let cold: Vec<u64> = if e1 - e0 >= WHOLE_FILE_AFTER {
                vec![WHOLE_FILE]
            } else {
                (e0..=e1).filter(|&e| !bits.is_hot(e)).collect()
            };
            if t.al.activate(self.id.0, &cold)?.is_err() {
                return Ok(Mark::LogFull);
            }
            for e in cold {
                if e == WHOLE_FILE {
                    bits.whole_hot.store(true, Ordering::Release);
                } else {
                    bits.set_hot(e);
                }
            }
        }
        bits.map.set(first, last);
        Ok(Mark::Done)
    }

    /// Dirty block runs `[first, end)`.
    pub fn ranges(&self) -> Vec<(u64, u64)> {
        self.bits.read().map.ranges()
    }
}

struct Inner {
    table: Table,
    log: ChangeLog,
}

pub struct Tracker {
    state: StateDir,
    cfg: Config,
    al: ActivityLog,
    gate: RwLock<()>,
    inner: Mutex<Inner>,
    open: Mutex<HashMap<FileId, Weak<FileTrack>>>,
}

/// Held while an operation changes the store; a checkpoint or cut waits for it.
pub type Guard<'a> = RwLockReadGuard<'a, ()>;

impl Tracker {
    /// Opens tracking for a store at mount time: replays the activity log after a host
    /// crash, reconciles the table with the store, and logs what it found.
    pub fn open(
        state: StateDir,
        cfg: Config,
        mountpoint: &Path,
        last: LastStop,
    ) -> Result<Tracker> {
        let log_dir = state.path("log");
        let table = Table::load(&state.path(""), &log_dir)?;
        let log = ChangeLog::open(&log_dir)?;
        let (al, found) = ActivityLog::open(&state.path("activity"), cfg.al_slots)?;
        let t = Tracker {
            state,
            cfg,
            al,
            gate: RwLock::new(()),
            inner: Mutex::new(Inner { table, log }),
            open: Mutex::new(HashMap::new()),
        };
        if let LastStop::Crashed {
            same_boot: false, ..
        } = last
        {
            t.replay_activity(&found)?;
        }
        t.al.reset()?;
        t.record(Op::Mount {
            mountpoint: mountpoint.display().to_string(),
            last_stop: describe(last),
        })?;
        let ops = {
            let inner = t.inner.lock();
            reconcile::scan(t.state.store(), &inner.table, last)?
        };
        for op in ops {
            t.record(op)?;
        }
        t.save_table()?;
        Ok(t)
    }

    /// After a host crash: every extent hot in the activity log becomes dirty.
    fn replay_activity(&self, found: &[(u64, u64)]) -> Result<()> {
        let (bs, ext) = (self.cfg.block_size, self.cfg.al_extent);
        for &(id, e) in found {
            let p = self.bitmap_path(FileId(id));
            let size = self.current_size(FileId(id));
            let mut bm = Bitmap::open(&p, bs, id, 1)?;
            let (first, last) = if e == WHOLE_FILE {
                (0, size.max(1).div_ceil(bs) - 1)
            } else {
                (e * ext / bs, (e + 1) * ext / bs - 1)
            };
            bm.grow(last + 1)?;
            bm.set(first, last);
            bm.flush()?;
        }
        Ok(())
    }

    fn current_size(&self, id: FileId) -> u64 {
        let inner = self.inner.lock();
        inner
            .table
            .get(id)
            .and_then(|f| f.paths.first())
            .and_then(|p| std::fs::metadata(p.under(self.state.store())).ok())
            .map_or(0, |m| m.len())
    }

    pub fn block_size(&self) -> u64 {
        self.cfg.block_size
    }

    fn bitmap_path(&self, id: FileId) -> PathBuf {
        self.state.path(&format!("bitmaps/{id}.bm"))
    }

    /// Holds the gate for a namespace or metadata change.
    pub fn begin(&self) -> Guard<'_> {
        self.gate.read()
    }

    /// Marks bytes `[off, off+len)` of a file as changing; returns holding the gate.
    pub fn begin_write(&self, ft: &FileTrack, off: u64, len: u64) -> Result<Guard<'_>> {
        loop {
            let g = self.gate.read();
            if len == 0 {
                return Ok(g);
            }
            match ft.try_mark(self, off, len)? {
                Mark::Done => return Ok(g),
                Mark::LogFull => {
                    drop(g);
                    self.checkpoint()?;
                }
            }
        }
    }

    /// Makes every bit durable, then empties the activity log.
    pub fn checkpoint(&self) -> Result<()> {
        let _w = self.gate.write();
        let live = self.live();
        for ft in &live {
            ft.bits.read().map.flush()?;
        }
        self.al.reset()?;
        for ft in &live {
            ft.bits.read().clear_hot();
        }
        Ok(())
    }

    fn live(&self) -> Vec<Arc<FileTrack>> {
        let mut open = self.open.lock();
        open.retain(|_, w| w.strong_count() > 0);
        open.values().filter_map(Weak::upgrade).collect()
    }

    fn track(&self, id: FileId) -> Result<Arc<FileTrack>> {
        let mut open = self.open.lock();
        if let Some(ft) = open.get(&id).and_then(Weak::upgrade) {
            return Ok(ft);
        }
        let map = Bitmap::open(&self.bitmap_path(id), self.cfg.block_size, id.0, 1)?;
        let ft = Arc::new(FileTrack {
            id,
            bits: RwLock::new(Bits {
                map,
                hot: Vec::new(),
                whole_hot: AtomicBool::new(false),
            }),
        });
        open.insert(id, Arc::downgrade(&ft));
        Ok(ft)
    }

    /// The tracking of an existing regular file, found by its (inode, birth time) key. A
    /// file tracking has never seen is taken in and flagged for a full resync.
    pub fn file(
        &self,
        ino: u64,
        btime: u64,
        path: impl FnOnce() -> RelPath,
    ) -> Result<Arc<FileTrack>> {
        let known = self.inner.lock().table.by_key(ino, btime).map(|f| f.id);
        let id = match known {
            Some(id) => id,
            None => {
                let id = FileId::new();
                self.record(Op::Found {
                    id,
                    path: path(),
                    ino,
                    btime,
                    why: "first seen while mounted".into(),
                })?;
                id
            }
        };
        self.track(id)
    }

    /// A regular file just created through the mount.
    pub fn created(
        &self,
        path: RelPath,
        ino: u64,
        btime: u64,
        mode: u32,
    ) -> Result<Arc<FileTrack>> {
        let id = FileId::new();
        self.record(Op::Create {
            id,
            path,
            ino,
            btime,
            mode,
        })?;
        self.track(id)
    }

    /// The first path of a tracked file (for log records).
    pub fn path_of(&self, id: FileId) -> RelPath {
        let inner = self.inner.lock();
        inner
            .table
            .get(id)
            .and_then(|f| f.paths.first().cloned())
            .unwrap_or_default()
    }

    /// Id of the regular file at `path`, if tracked.
    pub fn id_at(&self, path: &RelPath) -> Option<FileId> {
        self.inner.lock().table.by_path(path).map(|f| f.id)
    }

    /// Appends a change-log record and applies it to the table.
    pub fn record(&self, op: Op) -> Result<Record> {
        let mut inner = self.inner.lock();
        let rec = inner.log.append(op)?;
        for id in inner.table.apply(&rec) {
            self.forget_bitmap(id);
        }
        Ok(rec)
    }

    fn forget_bitmap(&self, id: FileId) {
        self.open.lock().remove(&id);
        let p = self.bitmap_path(id);
        if let Err(e) = std::fs::remove_file(&p) {
            if e.kind() != std::io::ErrorKind::NotFound {
                tracing::warn!("removing {}: {e}", p.display());
            }
        }
    }

    fn save_table(&self) -> Result<()> {
        let inner = self.inner.lock();
        inner.log.sync()?;
        inner.table.save(&self.state.path(""))
    }

    /// Clean shutdown, once nothing can reach the store through the mount any more.
    pub fn close(&self) -> Result<()> {
        self.checkpoint()?;
        self.record(Op::Unmount)?;
        self.save_table()?;
        self.state.mark_clean()
    }
}

fn describe(last: LastStop) -> String {
    match last {
        LastStop::Fresh => "fresh".into(),
        LastStop::Clean { .. } => "clean".into(),
        LastStop::Crashed {
            same_boot: true, ..
        } => "daemon killed".into(),
        LastStop::Crashed {
            same_boot: false, ..
        } => "host crashed".into(),
    }
}

/// Reads what is tracked without a daemon (for `drfs changes`).
pub fn load_table(state: &StateDir) -> Result<Table> {
    Table::load(&state.path(""), &state.path("log"))
}

pub fn bitmap_ranges(state: &StateDir, block_size: u64, id: FileId) -> Result<Vec<(u64, u64)>> {
    let p = state.path(&format!("bitmaps/{id}.bm"));
    match bitmap::read_ranges(&p, block_size) {
        Err(Error::Io { source, .. }) if source.kind() == std::io::ErrorKind::NotFound => {
            Ok(Vec::new())
        }
        r => r,
    }
}
