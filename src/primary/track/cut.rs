//! The cut: the instant a recovery point describes. Namespace changes are held off for the
//! whole cut; data writes pause only while each consistency group's files flip their
//! bitmaps (microseconds). Then, still with the namespace held, every file of the cut is
//! opened (its read descriptor survives later renames and deletes) and the tree is walked
//! into the point's manifest, with each file's size as the cut saw it.

use std::collections::{BTreeMap, HashMap};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::error::{At, Result};
use crate::model::FileId;
use crate::model::relpath::RelPath;
use crate::model::{Entry, Kind};
use crate::primary::track::cow::Cow;
use crate::primary::track::fine::Pieces;
use crate::primary::track::{FileTrack, Pending, Tracker};
use crate::state::STATE_DIR;
use crate::sys;

/// One file of a cut.
pub struct CutFile {
    pub id: FileId,
    pub path: RelPath,
    pub ft: Arc<FileTrack>,
    pub cow: Arc<Cow>,
    /// Tracking could not vouch for this file: compare every block by hash.
    pub resync: bool,
    /// The changed pieces of its partly written frozen blocks (the others ship whole).
    pub pieces: Arc<Pieces>,
}

pub struct Cut {
    /// The cut epochs of its groups, first to last.
    pub epochs: (u64, u64),
    pub time_ns: i64,
    /// How long writes were held off, summed over the groups.
    pub pause: Duration,
    /// Per consistency group: its name ("" = the whole store or the root's own files) and
    /// the instant of its cut.
    pub groups: Vec<(String, i64)>,
    pub files: Vec<CutFile>,
    pub entries: Vec<Entry>,
}

struct Tracked {
    id: FileId,
    path: RelPath,
    ino: u64,
    resync: bool,
}

fn group_of(path: &RelPath, by_dir: bool) -> Vec<u8> {
    if by_dir && path.as_bytes().contains(&b'/') {
        path.top().to_vec()
    } else {
        Vec::new()
    }
}

fn now_ns() -> i64 {
    sys::now_ns() as i64
}

impl Tracker {
    /// Cuts the store: the whole store as one consistency group, or (`by_dir`) each
    /// top-level folder as its own. With `whole`, every file is cut whole (its every block
    /// is protected until shipped), as a cycle that compares whole files needs.
    ///
    /// `around(group, true)` runs right before a group's instant and `around(group,
    /// false)` right after it (also when the flip failed): the pre- and post-cut hooks.
    pub fn cut(
        &self,
        by_dir: bool,
        whole: bool,
        around: &mut dyn FnMut(&str, bool),
    ) -> Result<Cut> {
        let _ns = self.ns.write();
        let tracked: Vec<Tracked> = {
            let inner = self.inner.lock();
            inner
                .table
                .entries()
                .filter_map(|f| {
                    let mut paths = f.paths.clone();
                    paths.sort();
                    Some(Tracked {
                        id: f.id,
                        path: paths.into_iter().next()?,
                        ino: f.ino,
                        resync: f.needs_resync || whole,
                    })
                })
                .collect()
        };
        let mut groups: BTreeMap<Vec<u8>, Vec<&Tracked>> = BTreeMap::new();
        for t in &tracked {
            groups.entry(group_of(&t.path, by_dir)).or_default().push(t);
        }
        if groups.is_empty() {
            groups.insert(Vec::new(), Vec::new());
        }
        let mut pause = Duration::ZERO;
        let mut cut_times = Vec::new();
        let mut epochs = (0, 0);
        for (g, members) in &groups {
            let name = String::from_utf8_lossy(g).into_owned();
            around(&name, true);
            let r = self.cut_group(members);
            around(&name, false);
            let (e, t, p) = r?;
            if epochs.0 == 0 {
                epochs.0 = e;
            }
            epochs.1 = e;
            pause += p;
            cut_times.push((name, t));
        }
        let mut files = Vec::new();
        for t in &tracked {
            let Some(ft) = self.track_path(t.id, &t.path, t.ino)? else {
                tracing::warn!("{} vanished before its cut could open it", t.path);
                continue;
            };
            let Some(cow) = ft.cow() else { continue };
            files.push(CutFile {
                id: t.id,
                path: t.path.clone(),
                pieces: ft.frozen_pieces(),
                ft,
                cow,
                resync: t.resync,
            });
        }
        let sizes: HashMap<FileId, u64> = files.iter().map(|f| (f.id, f.cow.cut_size)).collect();
        let entries = self.walk(&sizes)?;
        let time_ns = cut_times.iter().map(|c| c.1).max().unwrap_or_else(now_ns);
        Ok(Cut {
            epochs,
            time_ns,
            pause,
            groups: cut_times,
            files,
            entries,
        })
    }

    /// One group's instant: writes wait while its live files flip; the others are marked
    /// to flip when they are next opened.
    fn cut_group(&self, members: &[&Tracked]) -> Result<(u64, i64, Duration)> {
        let live: HashMap<FileId, Arc<FileTrack>> = {
            let open = self.open.lock();
            members
                .iter()
                .filter_map(|t| {
                    open.map
                        .get(&t.id)
                        .and_then(|w| w.upgrade())
                        .map(|ft| (t.id, ft))
                })
                .collect()
        };
        let start = Instant::now();
        let g = self.gate.write();
        let epoch = self.epoch.fetch_add(1, std::sync::atomic::Ordering::AcqRel) + 1;
        let t = now_ns();
        {
            let mut open = self.open.lock();
            for m in members {
                match live.get(&m.id) {
                    Some(ft) => {
                        let cow = self.new_cow(m.id, epoch, ft.size(), m.resync);
                        ft.flip(epoch, Arc::new(cow))?;
                    }
                    None => {
                        open.pending.insert(
                            m.id,
                            Pending {
                                epoch,
                                all: m.resync,
                            },
                        );
                    }
                }
            }
        }
        drop(g);
        Ok((epoch, t, start.elapsed()))
    }

    /// The store's tree as manifest entries (regular files tracking does not know are left
    /// out: they are found, and shipped whole, at the next mount).
    fn walk(&self, sizes: &HashMap<FileId, u64>) -> Result<Vec<Entry>> {
        let root = self.state.store().to_path_buf();
        let keys: HashMap<(u64, u64), FileId> = {
            let inner = self.inner.lock();
            inner
                .table
                .entries()
                .map(|f| ((f.ino, f.btime), f.id))
                .collect()
        };
        let mut out = Vec::new();
        let mut stack = vec![RelPath::root()];
        while let Some(dir) = stack.pop() {
            let abs = dir.under(&root);
            for ent in std::fs::read_dir(&abs).at(&abs)? {
                let ent = ent.at(&abs)?;
                let name = ent.file_name();
                if dir.is_root() && name == STATE_DIR {
                    continue;
                }
                let rel = dir.join(&name);
                let p = ent.path();
                let md = match std::fs::symlink_metadata(&p) {
                    Ok(m) => m,
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                    Err(e) => return Err(e).at(&p),
                };
                let ft = md.file_type();
                let mut e = Entry {
                    path: rel.clone(),
                    kind: Kind::File,
                    id: None,
                    size: 0,
                    mode: md.mode(),
                    uid: md.uid(),
                    gid: md.gid(),
                    mtime_ns: md.mtime() * 1_000_000_000 + md.mtime_nsec(),
                    target: None,
                    rdev: None,
                };
                if ft.is_dir() {
                    e.kind = Kind::Dir;
                    stack.push(rel);
                } else if ft.is_symlink() {
                    e.kind = Kind::Symlink;
                    let t = std::fs::read_link(&p).at(&p)?;
                    e.target = Some(RelPath::from_bytes(t.as_os_str().as_bytes()));
                } else if ft.is_file() {
                    let fd = sys::open_path(&p).at(&p)?;
                    let btime = sys::btime_ns(std::os::fd::AsFd::as_fd(&fd));
                    let Some(&id) = keys.get(&(md.ino(), btime)) else {
                        tracing::warn!("{rel} is not tracked yet; it is left out of this point");
                        continue;
                    };
                    e.id = Some(id);
                    e.size = sizes.get(&id).copied().unwrap_or(md.len());
                } else {
                    e.kind = if ft.is_fifo() {
                        Kind::Fifo
                    } else if ft.is_socket() {
                        Kind::Socket
                    } else if ft.is_char_device() {
                        Kind::Char
                    } else {
                        Kind::Block
                    };
                    e.rdev = Some(md.rdev());
                }
                out.push(e);
            }
        }
        out.sort_by(|a, b| a.path.cmp(&b.path));
        Ok(out)
    }

    /// The cycle of `cut` is over: if it shipped, its frozen sets are cleared and its
    /// resynced files trusted again.
    pub fn end_cycle(&self, cut: &Cut, shipped: bool) -> Result<()> {
        {
            let mut open = self.open.lock();
            let (a, b) = cut.epochs;
            open.pending.retain(|_, p| p.epoch < a || p.epoch > b);
        }
        for f in &cut.files {
            f.ft.end_cycle(shipped);
            if shipped && f.resync {
                self.record(crate::primary::track::changelog::Op::Resynced { id: f.id })?;
            }
        }
        if shipped {
            self.save_table()?;
        }
        Ok(())
    }
}
