//! Applying a received cycle: the replica's latest files become the new point, atomically.
//!
//! 1. The staged blocks are sealed (durable; only this attempt's confirmed blocks count).
//! 2. The undo record of the current latest point is written in full and made durable:
//!    the content of every block the cycle will overwrite or cut off, and of a growing
//!    file's partial last block (it grows by zeros, so its BLAKE3 changes); deleted files
//!    are moved into it whole later. Meanwhile a roll-back's saved blocks (staged by
//!    reference to older undo records) are checked against their BLAKE3; one that fails
//!    ends the apply here. Nothing else has changed yet.
//! 3. `journal.json` records the apply; from here every phase is idempotent, and a restart
//!    finds the journal and rolls the apply forward from the phase it names:
//!    detach (files leaving their path go to `hold/`), place (deleted files into the undo
//!    record, directories, moved and new files, links, symlinks), data (staged blocks into
//!    the files, sizes), meta (modes, owners, mtimes), publish (point files, `latest`).
//!
//! A crash before the journal leaves the previous point untouched (the staging stays, so a
//! retry resumes); a crash after it ends, at the next start, in the new point.

use std::collections::{BTreeMap, BTreeSet};
use std::ffi::CString;
use std::fs::{self, File};
use std::os::fd::{AsFd, AsRawFd};
use std::os::unix::fs::FileExt;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::error::{At, Error, Result};
use crate::model::FileId;
use crate::model::PointInfo;
use crate::model::relpath::RelPath;
use crate::model::{Entry, Kind, Manifest};
use crate::replica::posix::Replica;
use crate::replica::posix::incoming::Incoming;
use crate::replica::posix::pieces::{self, Pieces};
use crate::replica::posix::undo::{UndoIndex, UndoWriter};
use crate::sys;
use crate::sys::punch_hole;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
enum Phase {
    Detach,
    Place,
    Data,
    Meta,
    Publish,
}

#[derive(Debug, Serialize, Deserialize)]
struct Journal {
    version: u32,
    generation: u64,
    from: Option<String>,
    phase: Phase,
}

/// What the apply changes, derived from the old and the new manifest.
struct Plan {
    from: Option<String>,
    new: Manifest,
    /// id -> its paths (sorted; the first holds the data, the rest are hard links).
    old_files: BTreeMap<FileId, (Vec<RelPath>, u64)>,
    new_files: BTreeMap<FileId, (Vec<RelPath>, u64)>,
    old_other: Vec<Entry>,
}

fn files_of(m: &Manifest) -> BTreeMap<FileId, (Vec<RelPath>, u64)> {
    let mut out: BTreeMap<FileId, (Vec<RelPath>, u64)> = BTreeMap::new();
    for e in &m.entries {
        if let (Kind::File, Some(id)) = (e.kind, e.id) {
            let v = out.entry(id).or_insert((Vec::new(), e.size));
            v.0.push(e.path.clone());
        }
    }
    for v in out.values_mut() {
        v.0.sort();
    }
    out
}

impl Plan {
    fn new(from: Option<(String, Manifest)>, new: Manifest) -> Plan {
        let (from, old) = match from {
            Some((id, m)) => (Some(id), Some(m)),
            None => (None, None),
        };
        let old_files = old.as_ref().map(files_of).unwrap_or_default();
        let old_other = old
            .map(|m| {
                m.entries
                    .into_iter()
                    .filter(|e| e.kind != Kind::File)
                    .collect()
            })
            .unwrap_or_default();
        Plan {
            from,
            new_files: files_of(&new),
            new,
            old_files,
            old_other,
        }
    }

    fn deleted(&self) -> impl Iterator<Item = FileId> + '_ {
        self.old_files
            .keys()
            .filter(|id| !self.new_files.contains_key(id))
            .copied()
    }

    /// Old files that leave their paths: deleted, or at other paths now.
    fn leaving(&self) -> Vec<FileId> {
        self.old_files
            .iter()
            .filter(|(id, (paths, _))| self.new_files.get(id).is_none_or(|(np, _)| np != paths))
            .map(|(id, _)| *id)
            .collect()
    }

    /// Old non-file entries the new point does not have (as they were).
    fn gone_others(&self) -> Vec<&Entry> {
        let new: BTreeMap<&RelPath, &Entry> =
            self.new.entries.iter().map(|e| (&e.path, e)).collect();
        self.old_other
            .iter()
            .filter(|o| {
                new.get(&o.path)
                    .is_none_or(|n| n.kind != o.kind || n.target != o.target || n.rdev != o.rdev)
            })
            .collect()
    }
}

fn hold_name(id: FileId) -> CString {
    CString::new(id.to_string()).unwrap_or_default()
}

/// Commits the cycle staged in `inc` as the point `manifest` describes.
pub fn commit(r: &Replica, inc: &mut Incoming, manifest: Manifest) -> Result<PointInfo> {
    inc.seal()?;
    let mp = inc.dir.join("manifest.json");
    let body = serde_json::to_vec(&manifest).map_err(Error::encode)?;
    sys::write_atomic(&mp, &body).at(&mp)?;
    let from = r.latest()?;
    let plan = Plan::new(
        match &from {
            Some(p) => Some((p.id.clone(), r.manifest(&p.id)?)),
            None => None,
        },
        manifest,
    );
    crate::sys::fault::hit("apply:sealed");
    undo_and_verify(r, inc, &plan)?;
    crate::sys::fault::hit("apply:undo");
    // Readers: the latest files change from here until the apply is published.
    r.set_applying(true)?;
    let j = Journal {
        version: 1,
        generation: plan.new.generation,
        from: plan.from.clone(),
        phase: Phase::Detach,
    };
    write_journal(r, &j)?;
    roll_forward(r, inc, &plan, j)
}

fn write_journal(r: &Replica, j: &Journal) -> Result<()> {
    let p = r.sd.path("journal.json");
    let b = serde_json::to_vec(j).map_err(Error::encode)?;
    sys::write_atomic(&p, &b).at(&p)
}

/// Finishes an apply a crash interrupted (called whenever a replica is opened).
pub fn recover(r: &Replica) -> Result<()> {
    let p = r.sd.path("journal.json");
    let j: Journal = match fs::read(&p) {
        Ok(b) => serde_json::from_slice(&b).map_err(|e| Error::corrupt(&p, e.to_string()))?,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e).at(&p),
    };
    let dir = r.sd.path("incoming");
    let mut inc = Incoming::committed(&dir, r.cfg.block_size)?;
    let mp = dir.join("manifest.json");
    let b = fs::read(&mp).at(&mp)?;
    let manifest: Manifest =
        serde_json::from_slice(&b).map_err(|e| Error::corrupt(&mp, e.to_string()))?;
    let old = match &j.from {
        Some(id) => Some((id.clone(), r.manifest(id)?)),
        None => None,
    };
    let plan = Plan::new(old, manifest);
    tracing::info!(
        "finishing the interrupted apply of generation {} from its {:?} phase",
        j.generation,
        j.phase
    );
    r.set_applying(true)?;
    roll_forward(r, &mut inc, &plan, j).map(drop)
}

/// Writes the undo record of the point the apply replaces while another thread checks
/// the saved blocks (the one is mostly waiting for the disk, the other hashing).
fn undo_and_verify(r: &Replica, inc: &Incoming, plan: &Plan) -> Result<()> {
    let (checked, undone) = std::thread::scope(|s| {
        let check = s.spawn(|| inc.verify_saved());
        let undone = match &plan.from {
            Some(id) => write_undo(r, inc, plan, id),
            None => Ok(()),
        };
        (check.join(), undone)
    });
    checked.map_err(|_| Error::Invalid("the check of the saved blocks panicked".into()))??;
    undone
}

/// The undo record of point `from`: what this cycle overwrites or cuts off.
fn write_undo(r: &Replica, inc: &Incoming, plan: &Plan, from: &str) -> Result<()> {
    let bs = r.cfg.block_size;
    let mut w = UndoWriter::new(&r.undo_dir(from), bs)?;
    for (id, (paths, old_size)) in &plan.old_files {
        let Some((_, new_size)) = plan.new_files.get(id) else {
            w.whole(*id);
            continue;
        };
        let old_blocks = old_size.div_ceil(bs);
        let mut runs: Vec<[u64; 2]> =
            crate::model::runs::minus(&inc.changed(*id), &[[old_blocks, u64::MAX]]);
        if new_size < old_size {
            runs.push([new_size / bs, old_blocks]);
        }
        if let Some(b) = grown_tail(*old_size, *new_size, bs) {
            // Its bytes stay, but it grows by zeros: its BLAKE3 changes (see `data`).
            runs.push([b, b + 1]);
        }
        if runs.is_empty() {
            continue;
        }
        let src = r
            .tree
            .open_file(&paths[0], libc::O_RDONLY, 0)
            .at(&paths[0].under(&r.root))?;
        w.save(*id, &src, &r.hash_file(*id), runs, *old_size)?;
    }
    w.finish().map(drop)
}

fn roll_forward(r: &Replica, inc: &mut Incoming, plan: &Plan, mut j: Journal) -> Result<PointInfo> {
    let hold = r.sd.path("hold");
    fs::create_dir_all(&hold).at(&hold)?;
    let hold_fd = crate::replica::posix::tree::Tree::open(&hold).at(&hold)?;
    for phase in [Phase::Detach, Phase::Place, Phase::Data, Phase::Meta] {
        if j.phase > phase {
            continue;
        }
        match phase {
            Phase::Detach => detach(r, plan, &hold_fd)?,
            Phase::Place => place(r, inc, plan, &hold_fd)?,
            Phase::Data => data(r, inc, plan)?,
            Phase::Meta | Phase::Publish => meta(r, plan)?,
        }
        crate::sys::fault::hit(&format!("apply:{phase:?}").to_lowercase());
        j.phase = next(phase);
        write_journal(r, &j)?;
    }
    let info = publish(r, inc, plan)?;
    crate::sys::fault::hit("apply:published");
    let jp = r.sd.path("journal.json");
    fs::remove_file(&jp).at(&jp)?;
    r.set_applying(false)?;
    for d in [r.sd.path("incoming"), hold] {
        if d.exists() {
            fs::remove_dir_all(&d).at(&d)?;
        }
    }
    Ok(info)
}

fn next(p: Phase) -> Phase {
    match p {
        Phase::Detach => Phase::Place,
        Phase::Place => Phase::Data,
        Phase::Data => Phase::Meta,
        Phase::Meta | Phase::Publish => Phase::Publish,
    }
}

fn ignore_missing(r: std::io::Result<()>) -> std::io::Result<()> {
    match r {
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(()),
        r => r,
    }
}

/// Moves something in the way aside into `hold/` (never deletes what it did not make).
fn set_aside(r: &Replica, p: &RelPath, hold: &crate::replica::posix::tree::Tree) -> Result<()> {
    let name = CString::new(format!("orphan-{}", crate::model::new_id())).unwrap_or_default();
    tracing::warn!("{p} is in the way of the new point; moved to .drfs/hold");
    r.tree
        .rename_to(p, hold.root(), &name)
        .at(&p.under(&r.root))
}

fn detach(r: &Replica, plan: &Plan, hold: &crate::replica::posix::tree::Tree) -> Result<()> {
    for id in plan.leaving() {
        let Some((paths, _)) = plan.old_files.get(&id) else {
            continue;
        };
        let name = hold_name(id);
        let held = hold.exists(&RelPath::from_bytes(name.as_bytes()));
        if !held && r.tree.exists(&paths[0]) {
            r.tree
                .rename_to(&paths[0], hold.root(), &name)
                .at(&paths[0].under(&r.root))?;
        }
        for link in &paths[1..] {
            ignore_missing(r.tree.unlink(link, 0)).at(&link.under(&r.root))?;
        }
    }
    let gone = plan.gone_others();
    let (dirs, others): (Vec<&Entry>, Vec<&Entry>) =
        gone.into_iter().partition(|e| e.kind == Kind::Dir);
    for e in others {
        ignore_missing(r.tree.unlink(&e.path, 0)).at(&e.path.under(&r.root))?;
    }
    let mut dirs: Vec<&Entry> = dirs;
    dirs.sort_by(|a, b| b.path.cmp(&a.path));
    for d in dirs {
        match r.tree.unlink(&d.path, libc::AT_REMOVEDIR) {
            Ok(()) => {}
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {}
            Err(e) if e.raw_os_error() == Some(libc::ENOTEMPTY) => set_aside(r, &d.path, hold)?,
            Err(e) => return Err(e).at(&d.path.under(&r.root)),
        }
    }
    Ok(())
}

/// Makes room at `p` for a new entry of `kind`: something else there is set aside.
fn clear_for(
    r: &Replica,
    p: &RelPath,
    kind: Kind,
    hold: &crate::replica::posix::tree::Tree,
) -> Result<bool> {
    let Ok(st) = r.tree.lstat(p) else {
        return Ok(false);
    };
    let is = match st.st_mode & libc::S_IFMT {
        libc::S_IFREG => kind == Kind::File,
        libc::S_IFDIR => kind == Kind::Dir,
        _ => false,
    };
    if !is {
        set_aside(r, p, hold)?;
    }
    Ok(is)
}

/// New files whose staged data is their whole content move into place instead of being
/// copied. The choice is recorded before any move, so a crash never re-applies blocks
/// from a staged file that has already moved.
fn adopted(r: &Replica, inc: &Incoming, plan: &Plan) -> Result<BTreeSet<FileId>> {
    let p = inc.dir.join("adopted.json");
    if let Ok(b) = fs::read(&p) {
        return serde_json::from_slice(&b).map_err(|e| Error::corrupt(&p, e.to_string()));
    }
    let ids: BTreeSet<FileId> = plan
        .new_files
        .iter()
        .filter(|(id, (paths, _))| {
            !plan.old_files.contains_key(id) && !r.tree.exists(&paths[0]) && inc.adoptable(**id)
        })
        .map(|(id, _)| *id)
        .collect();
    let body = serde_json::to_vec(&ids).map_err(Error::encode)?;
    sys::write_atomic(&p, &body).at(&p)?;
    Ok(ids)
}

fn place(
    r: &Replica,
    inc: &Incoming,
    plan: &Plan,
    hold: &crate::replica::posix::tree::Tree,
) -> Result<()> {
    if let Some(from) = &plan.from {
        let undo = r.undo_dir(from);
        let undo_t = crate::replica::posix::tree::Tree::open(&undo).at(&undo)?;
        for id in plan.deleted() {
            let name = hold_name(id);
            let hp = r.hash_file(id);
            let to = crate::replica::posix::undo::hash_path(&undo, id);
            let (cv, cv_to) = (pieces::path(&hp), pieces::path(&to));
            if cv.exists() {
                fs::rename(&cv, &cv_to).at(&cv_to)?;
            }
            if hp.exists() {
                fs::rename(&hp, &to).at(&to)?;
            }
            if hold.exists(&RelPath::from_bytes(name.as_bytes())) {
                let dst = CString::new(format!("{id}.data")).unwrap_or_default();
                sys::cvt(unsafe {
                    libc::renameat(
                        hold.root().as_raw_fd(),
                        name.as_ptr(),
                        undo_t.root().as_raw_fd(),
                        dst.as_ptr(),
                    )
                })
                .at(&undo)?;
            }
        }
    }
    for e in plan.new.entries.iter().filter(|e| e.kind == Kind::Dir) {
        clear_for(r, &e.path, Kind::Dir, hold)?;
        r.tree.mkdir_all(&e.path).at(&e.path.under(&r.root))?;
    }
    let adopt = adopted(r, inc, plan)?;
    let inc_t = crate::replica::posix::tree::Tree::open(&inc.dir).at(&inc.dir)?;
    for (id, (paths, _)) in &plan.new_files {
        let name = hold_name(*id);
        let primary = &paths[0];
        if adopt.contains(id) {
            let staged = CString::new(format!("{id}.data")).unwrap_or_default();
            if inc.data_file(*id).exists() {
                if r.tree.lstat(primary).is_ok() {
                    set_aside(r, primary, hold)?;
                }
                r.tree
                    .rename_from(inc_t.root(), &staged, primary)
                    .at(&primary.under(&r.root))?;
            }
        } else if hold.exists(&RelPath::from_bytes(name.as_bytes())) {
            if r.tree.lstat(primary).is_ok() {
                set_aside(r, primary, hold)?;
            }
            r.tree
                .rename_from(hold.root(), &name, primary)
                .at(&primary.under(&r.root))?;
        } else if !clear_for(r, primary, Kind::File, hold)? {
            r.tree
                .open_file(primary, libc::O_CREAT | libc::O_WRONLY, 0o600)
                .at(&primary.under(&r.root))?;
        }
        for link in &paths[1..] {
            if !r.tree.exists(link) {
                let (sd, sn) = r.tree.parent(primary, false).at(&primary.under(&r.root))?;
                let (dd, dn) = r.tree.parent(link, true).at(&link.under(&r.root))?;
                sys::cvt(unsafe {
                    libc::linkat(sd.as_raw_fd(), sn.as_ptr(), dd.as_raw_fd(), dn.as_ptr(), 0)
                })
                .at(&link.under(&r.root))?;
            }
        }
    }
    for e in &plan.new.entries {
        match e.kind {
            Kind::Symlink => {
                let target = e.target.clone().unwrap_or_default();
                let same = r
                    .tree
                    .readlink(&e.path)
                    .is_ok_and(|t| t == target.as_bytes());
                if !same {
                    if r.tree.lstat(&e.path).is_ok() {
                        set_aside(r, &e.path, hold)?;
                    }
                    r.tree
                        .symlink(&target, &e.path)
                        .at(&e.path.under(&r.root))?;
                }
            }
            Kind::Fifo | Kind::Socket | Kind::Char | Kind::Block
                if r.tree.lstat(&e.path).is_err() =>
            {
                let kind = match e.kind {
                    Kind::Fifo => libc::S_IFIFO,
                    Kind::Socket => libc::S_IFSOCK,
                    Kind::Char => libc::S_IFCHR,
                    _ => libc::S_IFBLK,
                };
                r.tree
                    .mknod(&e.path, kind | (e.mode & 0o7777), e.rdev.unwrap_or(0))
                    .at(&e.path.under(&r.root))?;
            }
            _ => {}
        }
    }
    Ok(())
}

fn data(r: &Replica, inc: &mut Incoming, plan: &Plan) -> Result<()> {
    let bs = r.cfg.block_size;
    let mut buf = vec![0u8; bs as usize];
    let adopt = adopted(r, inc, plan)?;
    let hdir = r.sd.path("hashes");
    fs::create_dir_all(&hdir).at(&hdir)?;
    for (id, (paths, size)) in &plan.new_files {
        let p = &paths[0];
        let at = p.under(&r.root);
        let f = r.tree.open_file(p, libc::O_RDWR, 0).at(&at)?;
        // A file without a hash index, whose blocks did not all travel (a seed), gets
        // one from its content once its new blocks are in.
        // (It appears only once complete, so a crash before then computes it again.)
        let hp = r.hash_file(*id);
        let compute = !hp.exists() && !adopt.contains(id);
        if !compute {
            let h = crate::replica::posix::hashes::Hashes::open(&hp)?;
            for run in inc.zero_runs(*id) {
                h.zero(run[0], run[1])?;
            }
            for (b, s) in inc.confirmed(*id) {
                h.set(
                    b,
                    if s.zero {
                        &crate::replica::posix::hashes::ZERO
                    } else {
                        &s.hash
                    },
                )?;
            }
            h.set_blocks(size.div_ceil(bs))?;
            h.sync()?;
        }
        if adopt.contains(id) {
            f.set_len(*size).at(&at)?;
            set_pieces(inc, *id, &f, &at, &hp, *size, bs, &mut buf)?;
            continue;
        }
        // Piece records as the blocks are written (a file that gets its index computed
        // gets its records with it).
        let cv = if !compute && pieces::kept(bs) {
            Some(Pieces::open(&hp, bs)?)
        } else {
            None
        };
        let reread = write_blocks(inc, *id, &f, &at, *size, bs, &mut buf, cv.as_ref())?;
        f.set_len(*size).at(&at)?;
        if compute {
            crate::replica::posix::hashes::compute(&f, *size, bs, &hp)?;
        } else {
            if let Some(cv) = &cv {
                reread_pieces(cv, &f, &at, &reread, *size, bs, &mut buf)?;
                cv.set_blocks(size.div_ceil(bs))?;
                cv.sync()?;
            }
            if let Some((_, old)) = plan.old_files.get(id) {
                rehash_grown_tail(&f, &at, &hp, *old, *size, bs, &inc.changed(*id), &mut buf)?;
            }
        }
        crate::sys::fault::hit("apply:data-file");
    }
    syncfs(&r.root)
}

/// Writes the blocks this cycle brought for file `id` into `f` (zero runs and zero
/// blocks as holes where it has bytes) and their piece records into `cv` from the bytes
/// written; the blocks whose record must be read back from the file once it has its
/// size (a short block the file now extends past).
#[allow(clippy::too_many_arguments)]
fn write_blocks(
    inc: &mut Incoming,
    id: FileId,
    f: &File,
    at: &Path,
    size: u64,
    bs: u64,
    buf: &mut [u8],
    cv: Option<&Pieces>,
) -> Result<Vec<u64>> {
    let cur = f.metadata().at(at)?.len();
    for run in inc.zero_runs(id) {
        let (a, b) = (run[0] * bs, (run[1] * bs).min(cur).min(size));
        if a < b {
            punch_hole(f, a, b - a).at(at)?;
        }
        if let Some(cv) = cv {
            cv.clear(run[0], run[1])?;
        }
    }
    let mut reread = Vec::new();
    for (b, s) in inc.confirmed(id) {
        let off = b * bs;
        if off >= size {
            continue;
        }
        let len = u64::from(s.len).min(size - off);
        let chunk = &mut buf[..s.len as usize];
        if s.zero {
            if off < cur {
                punch_hole(f, off, len).at(at)?;
            }
            if let Some(cv) = cv {
                cv.clear(b, b + 1)?;
            }
            continue;
        }
        if s.pieces != 0 {
            // A partial block: its other pieces are the file's already. Written back
            // whole, so the disk sees one write a block, not one a piece.
            let got = sys::read_full(f, chunk, off).at(at)?;
            chunk[got..].fill(0);
            inc.read_pieces(id, &s, chunk)?;
        } else {
            inc.read_block(id, b, &s, chunk)?;
        }
        f.write_all_at(&chunk[..len as usize], off).at(at)?;
        match cv {
            // A roll-back's block brings its record from the undo record it came from.
            Some(cv) if inc.copy_saved_pieces(id, b, &s, cv)? => {}
            Some(cv) if len == (size - off).min(bs) => cv.set(b, &chunk[..len as usize])?,
            Some(_) => reread.push(b),
            None => {}
        }
    }
    Ok(reread)
}

/// The piece records of blocks `blocks` of file `f`, read back from it as it now holds
/// them.
fn reread_pieces(
    cv: &Pieces,
    f: &File,
    at: &Path,
    blocks: &[u64],
    size: u64,
    bs: u64,
    buf: &mut [u8],
) -> Result<()> {
    for &b in blocks {
        let off = b * bs;
        let n = (size - off).min(bs) as usize;
        let got = sys::read_full(f, &mut buf[..n], off).at(at)?;
        buf[got..n].fill(0);
        cv.set(b, &buf[..n])?;
    }
    Ok(())
}

/// The piece records of the blocks this cycle brought into file `f` (read back from it,
/// as it now holds them); the zero runs have none.
#[allow(clippy::too_many_arguments)]
fn set_pieces(
    inc: &Incoming,
    id: FileId,
    f: &File,
    at: &Path,
    hp: &Path,
    size: u64,
    bs: u64,
    buf: &mut [u8],
) -> Result<()> {
    if !pieces::kept(bs) {
        return Ok(());
    }
    let cv = Pieces::open(hp, bs)?;
    for run in inc.zero_runs(id) {
        cv.clear(run[0], run[1])?;
    }
    let mut data = Vec::new();
    for (b, s) in inc.confirmed(id) {
        if b * bs >= size {
            continue;
        }
        if s.zero {
            cv.clear(b, b + 1)?;
        } else {
            data.push(b);
        }
    }
    reread_pieces(&cv, f, at, &data, size, bs, buf)?;
    cv.set_blocks(size.div_ceil(bs))?;
    cv.sync()
}

/// The old last block of a file growing from `old` to `new` bytes, if that block was
/// partial: it keeps its bytes but grows by zeros, so its BLAKE3 (of the shorter block the
/// primary sent) no longer describes it, although the primary sends nothing for it.
fn grown_tail(old: u64, new: u64, bs: u64) -> Option<u64> {
    (new > old && old % bs != 0).then_some(old / bs)
}

/// Brings the hash entry of a grown file's old last block (`grown_tail`) to the block as
/// it now reads, unless the cycle sent that block (its entry came with it). The old bytes
/// must match the old entry first, so a corrupt block keeps failing its check; a block
/// whose entry is already the new one (an apply rolled forward again) is left alone.
#[allow(clippy::too_many_arguments)]
fn rehash_grown_tail(
    f: &File,
    at: &Path,
    hp: &Path,
    old: u64,
    size: u64,
    bs: u64,
    changed: &[[u64; 2]],
    buf: &mut [u8],
) -> Result<()> {
    use crate::replica::posix::hashes::{Hashes, of};
    let Some(b) = grown_tail(old, size, bs).filter(|&b| !crate::model::runs::covers(changed, b))
    else {
        return Ok(());
    };
    let off = b * bs;
    let (was, now) = ((old - off) as usize, (size - off).min(bs) as usize);
    let got = sys::read_full(f, &mut buf[..now], off).at(at)?;
    buf[got..now].fill(0);
    let h = Hashes::open(hp)?;
    let (entry, new) = (h.get(b)?, of(&buf[..now]));
    if entry == new {
        return Ok(());
    }
    if entry == of(&buf[..was]) && sys::is_zero(&buf[was..now]) {
        h.set(b, &new)?;
        h.sync()?;
        if pieces::kept(bs) {
            let cv = Pieces::open(hp, bs)?;
            cv.set(b, &buf[..now])?;
            cv.sync()?;
        }
        return Ok(());
    }
    tracing::warn!(
        "{}: block {b} does not match its BLAKE3; its entry is left as it was",
        at.display()
    );
    Ok(())
}

fn syncfs(root: &Path) -> Result<()> {
    let f = File::open(root).at(root)?;
    sys::cvt(unsafe { libc::syncfs(f.as_fd().as_raw_fd()) })
        .map(drop)
        .at(root)
}

fn meta(r: &Replica, plan: &Plan) -> Result<()> {
    let mut dirs = Vec::new();
    for e in &plan.new.entries {
        if e.kind == Kind::Dir {
            dirs.push(e);
            continue;
        }
        r.tree
            .set_meta(
                &e.path,
                e.mode,
                e.uid,
                e.gid,
                e.mtime_ns,
                e.kind == Kind::Symlink,
            )
            .at(&e.path.under(&r.root))?;
    }
    dirs.sort_by(|a, b| b.path.cmp(&a.path));
    for d in dirs {
        r.tree
            .set_meta(&d.path, d.mode, d.uid, d.gid, d.mtime_ns, false)
            .at(&d.path.under(&r.root))?;
    }
    syncfs(&r.root)
}

fn publish(r: &Replica, inc: &Incoming, plan: &Plan) -> Result<PointInfo> {
    crate::replica::posix::publish_point(&r.sd, &plan.new, plan.new_files.len(), inc.bytes())
}

/// The ids a point's undo record holds (for tests and inspection).
pub fn undo_ids(r: &Replica, id: &str) -> Result<BTreeSet<FileId>> {
    Ok(UndoIndex::load(&r.undo_dir(id))?
        .files
        .keys()
        .copied()
        .collect())
}
