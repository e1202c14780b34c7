//! Change tracking for one store: which blocks of which files changed, and which namespace
//! and metadata changes happened, since the last shipped cut.
//!
//! Every operation that changes the store goes through the tracker *before* it touches the
//! store: `begin_write` marks the blocks (and, for a cold extent, durably records it in the
//! activity log), saves the cut-time content of blocks a running cycle still has to ship,
//! and returns holding the store's gate; the caller does the operation and drops the
//! guard. Namespace operations also hold the namespace lock. A checkpoint takes the gate
//! exclusively; a cut takes the namespace lock and then the gate exclusively, so every
//! operation falls wholly before it or wholly after it.

pub mod activity;
pub mod bitmap;
pub mod changelog;
pub mod cow;
pub mod cut;
pub mod file;
pub mod fine;
pub mod history;
pub mod lockdown;
pub mod observe;
pub mod reconcile;
pub mod recovery;
pub mod run;
pub mod seed;
pub mod stamps;
pub mod table;

use std::collections::HashMap;
use std::fs::File;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Weak};

use parking_lot::{Mutex, RwLock, RwLockReadGuard};

use crate::error::{At, Error, Result};
use crate::model::{FileId, RelPath};
use crate::state::{Config, StateDir};
use activity::ActivityLog;
use bitmap::Bitmap;
use changelog::{ChangeLog, Op, Record};
use cow::Cow;
pub use file::FileTrack;
use file::{Mark, WHOLE_FILE};
use observe::Observer;
use run::{LastStop, RunStart};
use stamps::Stamps;
use table::Table;

struct Inner {
    table: Table,
    log: ChangeLog,
}

/// A cut that has not reached a file yet: the file flips when it is next loaded.
#[derive(Clone, Copy)]
struct Pending {
    epoch: u64,
    all: bool,
}

#[derive(Default)]
struct Open {
    map: HashMap<FileId, Weak<FileTrack>>,
    pending: HashMap<FileId, Pending>,
}

pub struct Tracker {
    state: StateDir,
    cfg: Config,
    al: ActivityLog,
    gate: RwLock<()>,
    ns: RwLock<()>,
    inner: Mutex<Inner>,
    open: Mutex<Open>,
    epoch: AtomicU64,
    stamps: Stamps,
    /// Locked for a planned failover: every change is refused (`lockdown`).
    read_only: AtomicBool,
    /// The running assessment's observer (`drfs assess`), if any.
    observer: RwLock<Option<Arc<Observer>>>,
    observing: AtomicBool,
    /// What the files' fine records may still hold (`fine`).
    budget: Arc<fine::Budget>,
    /// Each file's fine record, kept while its tracking is not loaded (no write can
    /// reach the file then, and its bitmaps wait on disk), dropped with its bitmaps.
    fines: Mutex<HashMap<FileId, Arc<Mutex<fine::Fine>>>>,
    /// A promoted store whose failover is not committed: its latest point kept readable.
    history: std::sync::OnceLock<history::History>,
}

/// Held while an operation changes file data; a checkpoint or cut waits for it. Dropping
/// it stamps the end of the operation (`stamps`).
pub struct Guard<'a> {
    _op: Option<stamps::Op<'a>>,
    _gate: RwLockReadGuard<'a, ()>,
}

/// Held while an operation changes the namespace or metadata (of the files it names).
pub struct NsGuard<'a> {
    _ops: [Option<stamps::Op<'a>>; 2],
    _gate: RwLockReadGuard<'a, ()>,
    _ns: RwLockReadGuard<'a, ()>,
}

/// How to reach a store file for its tracking: a read-only descriptor and its size.
pub type Opener<'a> = &'a dyn Fn() -> std::io::Result<File>;

impl Tracker {
    /// Starts tracking a store for a run (a mount, or an unmounted `drfs ship`) that holds
    /// its lock: judges how the previous run ended, opens the tracking, and records the
    /// new run once the store is reconciled.
    pub fn start(state: StateDir, cfg: Config, mountpoint: &Path) -> Result<Tracker> {
        let last = run::last_stop(&state)?;
        let run = RunStart::now();
        tracing::info!(
            "tracking {} for {} (previous stop: {})",
            state.store().display(),
            mountpoint.display(),
            describe(last)
        );
        let t = Tracker::open(state, cfg, mountpoint, last, run)?;
        run::begin(&t.state, mountpoint, &run)?;
        Ok(t)
    }

    /// Opens tracking: merges bits a crash left unshipped, replays the activity log after
    /// a host crash, reconciles the table with the store (by the rule the previous run's
    /// ending and stamps give), logs what it found, and starts run `run`'s stamps.
    pub fn open(
        state: StateDir,
        cfg: Config,
        mountpoint: &Path,
        last: LastStop,
        run: RunStart,
    ) -> Result<Tracker> {
        let log_dir = state.path("log");
        let table = Table::load(&state.path(""), &log_dir)?;
        let log = ChangeLog::open(&log_dir)?;
        let (al, found) = ActivityLog::open(&state.path("activity"), cfg.al_slots)?;
        let stamps_path = state.path("stamps");
        let rule = reconcile::Rule::after(last, stamps::read(&stamps_path)?);
        let stamps = Stamps::create(&state.path("stamps.new"), run.id)?;
        let t = Tracker {
            state,
            cfg,
            al,
            gate: RwLock::new(()),
            ns: RwLock::new(()),
            inner: Mutex::new(Inner { table, log }),
            open: Mutex::new(Open::default()),
            epoch: AtomicU64::new(0),
            stamps,
            read_only: AtomicBool::new(false),
            observer: RwLock::new(None),
            observing: AtomicBool::new(false),
            budget: fine::Budget::new(fine::BUDGET),
            fines: Mutex::new(HashMap::new()),
            history: std::sync::OnceLock::new(),
        };
        t.merge_frozen()?;
        if let LastStop::HostCrash { .. } = last {
            t.replay_activity(&found)?;
        }
        t.al.reset()?;
        let cow_dir = t.state.path("cow");
        if cow_dir.exists() {
            std::fs::remove_dir_all(&cow_dir).at(&cow_dir)?;
        }
        std::fs::create_dir_all(&cow_dir).at(&cow_dir)?;
        t.record(Op::Mount {
            mountpoint: mountpoint.display().to_string(),
            last_stop: describe(last),
        })?;
        let ops = {
            let inner = t.inner.lock();
            reconcile::scan(t.state.store(), &inner.table, &rule)?
        };
        let mut flagged = Vec::new();
        for op in ops {
            if let Op::Changed { path, why, .. } | Op::Found { path, why, .. } = &op {
                flagged.push((path.clone(), why.clone()));
            }
            if let Op::Changed { path, why, .. } = &op {
                let e = crate::events::Event::new(
                    &t.state,
                    crate::events::Kind::Resync,
                    "started",
                    why.clone(),
                );
                crate::events::record(&t.state, e.file(path.to_string()));
            }
            t.record(op)?;
        }
        t.save_table()?;
        // The previous run's stamps have served; this run's take their place.
        let new = t.state.path("stamps.new");
        std::fs::rename(&new, &stamps_path).at(&stamps_path)?;
        if matches!(last, LastStop::Killed(_) | LastStop::HostCrash { .. }) {
            t.report_recovery(last, flagged)?;
        }
        Ok(t)
    }

    /// Says, in the log and in `recovery.json` (for status), what a crash cost.
    fn report_recovery(&self, last: LastStop, flagged: Vec<(RelPath, String)>) -> Result<()> {
        let bs = self.cfg.block_size;
        let ids: Vec<FileId> = self.inner.lock().table.entries().map(|f| f.id).collect();
        let (mut files, mut blocks) = (0, 0);
        for id in ids {
            let n: u64 = bitmap_ranges(&self.state, bs, id)?
                .iter()
                .map(|(a, b)| b - a)
                .sum();
            files += u64::from(n > 0);
            blocks += n;
        }
        let r = recovery::Recovery::new(describe(last), files, blocks, bs, flagged);
        r.log();
        r.save(&self.state.path("recovery.json"))
    }

    fn map_paths(&self, id: FileId) -> [PathBuf; 2] {
        [
            self.state.path(&format!("bitmaps/{id}.bm")),
            self.state.path(&format!("bitmaps/{id}.2.bm")),
        ]
    }

    fn open_maps(&self, id: FileId) -> Result<[Bitmap; 2]> {
        let [p0, p1] = self.map_paths(id);
        let bs = self.cfg.block_size;
        Ok([
            Bitmap::open(&p0, bs, id.0, 1)?,
            Bitmap::open(&p1, bs, id.0, 1)?,
        ])
    }

    /// After any stop, what a cycle froze but may not have shipped is dirty again.
    fn merge_frozen(&self) -> Result<()> {
        let dir = self.state.path("bitmaps");
        let mut ids = Vec::new();
        for e in std::fs::read_dir(&dir).at(&dir)? {
            let name = e.at(&dir)?.file_name();
            let name = name.to_string_lossy();
            if let Some(id) = name.strip_suffix(".2.bm").and_then(FileId::parse) {
                ids.push(id);
            }
        }
        for id in ids {
            let [mut a, mut b] = self.open_maps(id)?;
            if b.any() {
                a.grow(b.capacity())?;
                a.or_from(&b);
                b.clear();
            }
            a.set_stamp(0);
            b.set_stamp(0);
            a.flush()?;
            b.flush()?;
        }
        Ok(())
    }

    /// After a host crash: every extent hot in the activity log becomes dirty.
    fn replay_activity(&self, found: &[(u64, u64)]) -> Result<()> {
        let (bs, ext) = (self.cfg.block_size, self.cfg.al_extent);
        for &(id, e) in found {
            let size = self.current_size(FileId(id));
            let [mut bm, _] = self.open_maps(FileId(id))?;
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
        self.path_of(id)
            .map(|p| p.under(self.state.store()))
            .and_then(|p| std::fs::metadata(p).ok())
            .map_or(0, |m| m.len())
    }

    pub fn block_size(&self) -> u64 {
        self.cfg.block_size
    }

    pub fn state(&self) -> &StateDir {
        &self.state
    }

    pub fn config(&self) -> &Config {
        &self.cfg
    }

    /// Holds the gate and the namespace lock for a namespace or metadata change, and
    /// stamps the operation on each of the regular files `on` names.
    pub fn begin(&self, on: [Option<FileId>; 2]) -> Result<NsGuard<'_>> {
        let ns = self.ns.read();
        let gate = self.writable()?;
        Ok(NsGuard {
            _ops: on.map(|id| self.stamp(id?)),
            _gate: gate,
            _ns: ns,
        })
    }

    fn stamp(&self, id: FileId) -> Option<stamps::Op<'_>> {
        self.stamps.slot(id.0).map(|s| self.stamps.begin(s))
    }

    /// Stamps an operation on `id` that began at `began` and is over (a create).
    pub fn stamp_done(&self, id: FileId, began: i128) {
        if let Some(s) = self.stamps.slot(id.0) {
            self.stamps.done(s, began);
        }
    }

    /// Holds the gate for a data change of a file tracking does not follow.
    pub fn begin_write_none(&self) -> Result<Guard<'_>> {
        Ok(Guard {
            _op: None,
            _gate: self.writable()?,
        })
    }

    /// Marks bytes `[off, off+len)` of a file as changing and saves what a running cycle
    /// still needs of them; returns holding the gate. The operation is stamped whatever
    /// its length (a truncate up or a fallocate changes the file's ctime too). The blocks
    /// it marks ship whole: for changes other than a plain write (punch, truncate,
    /// copy_file_range, mmap writeback).
    pub fn begin_write(&self, ft: &FileTrack, off: u64, len: u64) -> Result<Guard<'_>> {
        self.begin_change(ft, off, len, false)
    }

    /// `begin_write` for a write of exactly these bytes: its 4 KiB pieces are recorded, so
    /// a block it leaves partly written ships only its changed pieces (`fine`).
    pub fn begin_write_pieces(&self, ft: &FileTrack, off: u64, len: u64) -> Result<Guard<'_>> {
        self.begin_change(ft, off, len, true)
    }

    fn begin_change(&self, ft: &FileTrack, off: u64, len: u64, pieces: bool) -> Result<Guard<'_>> {
        let op = ft
            .stamp_slot(|| self.stamps.slot(ft.id.0))
            .map(|s| self.stamps.begin(s));
        loop {
            let g = self.writable()?;
            if len == 0 {
                return Ok(Guard { _op: op, _gate: g });
            }
            let bs = self.cfg.block_size;
            if pieces {
                ft.record_pieces(bs, off, len);
            }
            match ft.try_mark(&self.al, bs, self.cfg.al_extent, off, len)? {
                Mark::Done => {
                    let (first, last) = (off / bs, (off.saturating_add(len) - 1) / bs);
                    if !pieces {
                        ft.forget_pieces(first, last);
                    }
                    ft.preserve(first, last)?;
                    if let Some(h) = self.history.get() {
                        h.preserve(ft.id, &ft.fd, first, last)?;
                    }
                    if self.observing.load(Ordering::Acquire) {
                        if let Some(o) = &*self.observer.read() {
                            o.mark(ft.id, first, last);
                        }
                    }
                    return Ok(Guard { _op: op, _gate: g });
                }
                Mark::LogFull => {
                    drop(g);
                    self.checkpoint()?;
                }
            }
        }
    }

    /// Keeps the latest point readable from now on (before the mount serves).
    pub fn keep_history(&self) -> Result<()> {
        let bs = self.cfg.block_size;
        let h = history::History::open(&self.state, bs, &|id| bitmap_ranges(&self.state, bs, id))?;
        tracing::info!(
            "the failover is not committed: the first change to each block of the latest point keeps a copy in {}",
            h.dir().display()
        );
        let _ = self.history.set(h);
        Ok(())
    }

    /// Before `name` in `dir`, file `id`, is deleted or replaced: the history keeps it
    /// if that is its last link.
    pub fn keep_whole(
        &self,
        id: Option<FileId>,
        dir: std::os::fd::BorrowedFd<'_>,
        name: &std::ffi::CStr,
    ) -> Result<()> {
        match (self.history.get(), id) {
            (Some(h), Some(id)) => h.keep_whole(id, dir, name),
            _ => Ok(()),
        }
    }

    /// Starts an assessment's observer: every block marked from now on is also set in
    /// it. None while another assessment runs.
    pub fn observe(&self) -> Option<Arc<Observer>> {
        let mut slot = self.observer.write();
        if slot.is_some() {
            return None;
        }
        let o = Arc::new(Observer::default());
        *slot = Some(o.clone());
        self.observing.store(true, Ordering::Release);
        Some(o)
    }

    /// Ends the assessment's observer.
    pub fn unobserve(&self) {
        self.observing.store(false, Ordering::Release);
        *self.observer.write() = None;
    }

    /// Makes every bit durable, then empties the activity log.
    pub fn checkpoint(&self) -> Result<()> {
        let _w = self.gate.write();
        let live = self.live();
        for ft in &live {
            ft.flush()?;
        }
        let dir = self.state.path("bitmaps");
        crate::sys::fsync_dir(&dir).at(&dir)?;
        self.al.reset()?;
        for ft in &live {
            ft.clear_hot();
        }
        Ok(())
    }

    fn live(&self) -> Vec<Arc<FileTrack>> {
        let mut open = self.open.lock();
        open.map.retain(|_, w| w.strong_count() > 0);
        open.map.values().filter_map(Weak::upgrade).collect()
    }

    /// The live tracking of `id`, or a new one built from `fd` (applying a pending cut).
    fn track(&self, id: FileId, fd: File) -> Result<Arc<FileTrack>> {
        let mut open = self.open.lock();
        if let Some(ft) = open.map.get(&id).and_then(Weak::upgrade) {
            return Ok(ft);
        }
        let size = fd.metadata().at(self.state.store())?.len();
        let fine = self
            .fines
            .lock()
            .entry(id)
            .or_insert_with(|| {
                let f = fine::Fine::new(self.cfg.block_size, self.budget.clone());
                Arc::new(Mutex::new(f))
            })
            .clone();
        let ft = Arc::new(FileTrack::load(id, fd, size, self.open_maps(id)?, fine));
        if let Some(p) = open.pending.remove(&id) {
            ft.flip(p.epoch, Arc::new(self.new_cow(id, p.epoch, size, p.all)))?;
        }
        open.map.insert(id, Arc::downgrade(&ft));
        Ok(ft)
    }

    fn new_cow(&self, id: FileId, epoch: u64, size: u64, all: bool) -> Cow {
        Cow::new(
            epoch,
            size,
            all,
            self.cfg.block_size,
            self.state.path(&format!("cow/{id}")),
        )
    }

    /// The tracking of an existing regular file, found by its (inode, birth time) key. A
    /// file tracking has never seen is taken in and flagged for a full resync.
    pub fn file(
        &self,
        ino: u64,
        btime: u64,
        path: impl FnOnce() -> RelPath,
        open: Opener<'_>,
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
        self.track(id, open().at(self.state.store())?)
    }

    /// A regular file just created through the mount (or an existing one it turned out to be).
    pub fn created(
        &self,
        path: RelPath,
        ino: u64,
        btime: u64,
        mode: u32,
        open: Opener<'_>,
    ) -> Result<Arc<FileTrack>> {
        let known = self.inner.lock().table.by_key(ino, btime).map(|f| f.id);
        let id = match known {
            Some(id) => id,
            None => {
                let id = FileId::new();
                self.record(Op::Create {
                    id,
                    path,
                    ino,
                    btime,
                    mode,
                })?;
                id
            }
        };
        self.track(id, open().at(self.state.store())?)
    }

    /// The tracking of file `id`, opening it at its table path (for a cut).
    fn track_path(&self, id: FileId, path: &RelPath, ino: u64) -> Result<Option<Arc<FileTrack>>> {
        if let Some(ft) = self.open.lock().map.get(&id).and_then(Weak::upgrade) {
            return Ok(Some(ft));
        }
        let abs = path.under(self.state.store());
        let fd = match File::open(&abs) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e).at(&abs),
        };
        if fd.metadata().at(&abs)?.ino() != ino {
            return Ok(None);
        }
        self.track(id, fd).map(Some)
    }

    /// The first path of a tracked file (for log records).
    pub fn path_of(&self, id: FileId) -> Option<RelPath> {
        let inner = self.inner.lock();
        inner.table.get(id).and_then(|f| f.paths.first().cloned())
    }

    /// Id of the regular file at `path`, if tracked.
    pub fn id_at(&self, path: &RelPath) -> Option<FileId> {
        self.inner.lock().table.by_path(path).map(|f| f.id)
    }

    /// Id of the regular file with this (inode, birth time) key, if tracked.
    pub fn id_of(&self, ino: u64, btime: u64) -> Option<FileId> {
        self.inner.lock().table.by_key(ino, btime).map(|f| f.id)
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
        self.open.lock().map.remove(&id);
        self.fines.lock().remove(&id);
        for p in self.map_paths(id) {
            if let Err(e) = std::fs::remove_file(&p) {
                if e.kind() != std::io::ErrorKind::NotFound {
                    tracing::warn!("removing {}: {e}", p.display());
                }
            }
        }
    }

    fn save_table(&self) -> Result<()> {
        let inner = self.inner.lock();
        inner.log.sync()?;
        inner.table.save(&self.state.path(""))
    }

    /// Dirty bytes not yet shipped, per tracked file (for status): (id, path, bytes, resync).
    pub fn pending(&self) -> Result<Vec<(FileId, RelPath, u64, bool)>> {
        let entries: Vec<_> = {
            let inner = self.inner.lock();
            inner
                .table
                .entries()
                .map(|f| {
                    (
                        f.id,
                        f.paths.first().cloned().unwrap_or_default(),
                        f.needs_resync,
                    )
                })
                .collect()
        };
        let bs = self.cfg.block_size;
        let mut out = Vec::new();
        for (id, path, resync) in entries {
            let live = self.open.lock().map.get(&id).and_then(Weak::upgrade);
            let runs = match live {
                Some(ft) => ft.ranges(),
                None => bitmap_ranges(&self.state, bs, id)?,
            };
            let blocks: u64 = runs.iter().map(|(a, b)| b - a).sum();
            out.push((id, path, blocks * bs, resync));
        }
        Ok(out)
    }

    /// Clean shutdown, once nothing can reach the store through the mount any more.
    pub fn close(&self) -> Result<()> {
        self.checkpoint()?;
        self.record(Op::Unmount)?;
        self.save_table()?;
        run::mark_clean(&self.state)
    }
}

fn describe(last: LastStop) -> String {
    match last {
        LastStop::Fresh => "fresh".into(),
        LastStop::Clean { .. } => "clean".into(),
        LastStop::Killed(_) => "daemon killed".into(),
        LastStop::HostCrash { .. } => "host crashed".into(),
    }
}

/// Reads what is tracked without a daemon (for `drfs changes`).
pub fn load_table(state: &StateDir) -> Result<Table> {
    Table::load(&state.path(""), &state.path("log"))
}

/// Dirty runs of file `id` not yet shipped: both of its bitmaps, read from disk.
pub fn bitmap_ranges(state: &StateDir, block_size: u64, id: FileId) -> Result<Vec<(u64, u64)>> {
    let mut all = Vec::new();
    for name in [format!("bitmaps/{id}.bm"), format!("bitmaps/{id}.2.bm")] {
        let p = state.path(&name);
        match bitmap::read_ranges(&p, block_size) {
            Err(Error::Io { source, .. }) if source.kind() == std::io::ErrorKind::NotFound => {}
            r => all.extend(r?.into_iter().map(|(a, b)| [a, b])),
        }
    }
    Ok(crate::model::runs::union(all)
        .into_iter()
        .map(|r| (r[0], r[1]))
        .collect())
}
