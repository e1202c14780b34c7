//! Keeping the latest point of a promoted store readable while its failover is not
//! committed (the point may still change, and what the VMs write is then kept as a
//! `diverged` point: `replica::posix::diverge`, which owns the layout). The first change
//! to a block of the point copies the block into the file's side file and makes the copy
//! durable before the change reaches the store; a delete or a rename over a file's last
//! link first hard-links it into the history. A block is copied once: which are is known
//! in memory, and found again at the next mount by comparing the side file's blocks
//! with the point's BLAKE3 (a copy a crash lost does not match, and then neither did the
//! change reach the store).

use std::collections::HashMap;
use std::ffi::CStr;
use std::fs::{File, OpenOptions};
use std::os::fd::{AsRawFd, BorrowedFd};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use parking_lot::Mutex;

use crate::error::{At, Error, Result};
use crate::model::{FileId, Kind};
use crate::replica::posix::Replica;
use crate::replica::posix::diverge::{self, side_path, whole_path};
use crate::replica::posix::hashes::{self, Hashes};
use crate::state::StateDir;
use crate::sys::{self, read_full};

/// One file of the kept point.
struct Kept {
    size: u64,
    saved: Box<[AtomicU64]>,
    /// Held while copying; the side file, once opened.
    side: Mutex<Option<File>>,
    side_path: PathBuf,
    whole: AtomicBool,
}

impl Kept {
    fn blocks(&self, bs: u64) -> u64 {
        self.size.div_ceil(bs)
    }

    fn is_saved(&self, b: u64) -> bool {
        self.saved
            .get((b / 64) as usize)
            .is_some_and(|w| w.load(Ordering::Acquire) & (1 << (b % 64)) != 0)
    }

    fn mark(&self, b: u64) {
        if let Some(w) = self.saved.get((b / 64) as usize) {
            w.fetch_or(1 << (b % 64), Ordering::AcqRel);
        }
    }
}

/// The history of one run of a promoted store.
pub struct History {
    dir: PathBuf,
    bs: u64,
    files: HashMap<FileId, Kept>,
}

impl History {
    /// Opens (or starts) the history of the store at `sd`, whose latest point it keeps;
    /// `dirty` gives each file's blocks changed since the promotion (candidates for
    /// having been copied).
    pub fn open(
        sd: &StateDir,
        bs: u64,
        dirty: &dyn Fn(FileId) -> Result<Vec<(u64, u64)>>,
    ) -> Result<History> {
        let dir = diverge::dir(sd);
        if diverge::plan_path(&dir).exists() {
            return Err(Error::operator(format!(
                "a change of the failover's point of {} was interrupted; run `drfs failover {} --point ID` again before mounting it",
                sd.store().display(),
                sd.store().display()
            )));
        }
        let r = Replica::open_only(sd.store())?;
        let latest = r
            .latest()?
            .ok_or_else(|| Error::Invalid(format!("{} has no point", sd.store().display())))?;
        std::fs::create_dir_all(&dir).at(&dir)?;
        match diverge::kept_point(&dir)? {
            Some(p) if p == latest.id => {}
            Some(p) => {
                return Err(Error::corrupt(
                    &diverge::point_path(&dir),
                    format!("it keeps point {p}, but the latest point is {}", latest.id),
                ));
            }
            None => {
                let p = diverge::point_path(&dir);
                sys::write_atomic(&p, latest.id.as_bytes()).at(&p)?;
                sys::fsync_dir(&dir).at(&dir)?;
            }
        }
        let m = r.manifest(&latest.id)?;
        let mut files = HashMap::new();
        for e in m.entries.iter().filter(|e| e.kind == Kind::File) {
            let Some(id) = e.id else { continue };
            let k = Kept {
                size: e.size,
                saved: (0..e.size.div_ceil(bs).div_ceil(64) + 1)
                    .map(|_| AtomicU64::new(0))
                    .collect(),
                side: Mutex::new(None),
                side_path: side_path(&dir, id),
                whole: AtomicBool::new(whole_path(&dir, id).exists()),
            };
            found_saved(&k, &r.hash_file(id), bs, &dirty(id)?)?;
            files.insert(id, k);
        }
        Ok(History { dir, bs, files })
    }

    /// Before blocks `first..=last` of file `id` (read through `src`) change: copies those
    /// of the kept point not copied yet, durably.
    pub fn preserve(&self, id: FileId, src: &File, first: u64, last: u64) -> Result<()> {
        let Some(k) = self.files.get(&id) else {
            return Ok(());
        };
        let blocks = k.blocks(self.bs);
        if first >= blocks || (first..=last.min(blocks - 1)).all(|b| k.is_saved(b)) {
            return Ok(());
        }
        let mut side = k.side.lock();
        if side.is_none() {
            let f = OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .open(&k.side_path)
                .at(&k.side_path)?;
            *side = Some(f);
        }
        let Some(f) = side.as_ref() else {
            return Ok(());
        };
        let mut buf = vec![0u8; self.bs as usize];
        let mut copied = Vec::new();
        for b in first..=last.min(blocks - 1) {
            if k.is_saved(b) {
                continue;
            }
            let n = (k.size - b * self.bs).min(self.bs) as usize;
            let got = read_full(src, &mut buf[..n], b * self.bs).at(&k.side_path)?;
            buf[got..n].fill(0);
            if !sys::is_zero(&buf[..n]) {
                f.write_all_at(&buf[..n], b * self.bs).at(&k.side_path)?;
            }
            copied.push(b);
        }
        f.sync_data().at(&k.side_path)?;
        for b in copied {
            k.mark(b);
        }
        Ok(())
    }

    /// Before `name` in `dir` is deleted or replaced: keeps file `id` whole if this is
    /// its last link.
    pub fn keep_whole(&self, id: FileId, dir: BorrowedFd<'_>, name: &CStr) -> Result<()> {
        let Some(k) = self.files.get(&id) else {
            return Ok(());
        };
        if k.whole.load(Ordering::Acquire) {
            return Ok(());
        }
        let _l = k.side.lock();
        let mut st: libc::stat = unsafe { std::mem::zeroed() };
        let r = unsafe {
            libc::fstatat(
                dir.as_raw_fd(),
                name.as_ptr(),
                &mut st,
                libc::AT_SYMLINK_NOFOLLOW,
            )
        };
        if r != 0 || st.st_nlink > 1 {
            // Not there (the operation fails by itself), or other links remain.
            return Ok(());
        }
        let to = whole_path(&self.dir, id);
        let c = sys::cpath(&to).at(&to)?;
        let r = unsafe {
            libc::linkat(
                dir.as_raw_fd(),
                name.as_ptr(),
                libc::AT_FDCWD,
                c.as_ptr(),
                0,
            )
        };
        match sys::cvt(r) {
            Ok(_) => {}
            Err(e) if e.raw_os_error() == Some(libc::EEXIST) => {}
            Err(e) => return Err(e).at(&to),
        }
        sys::fsync_dir(&self.dir).at(&self.dir)?;
        k.whole.store(true, Ordering::Release);
        Ok(())
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

/// Marks the blocks among `dirty` whose copy in the side file is the point's content.
fn found_saved(k: &Kept, index: &Path, bs: u64, dirty: &[(u64, u64)]) -> Result<()> {
    let Ok(side) = File::open(&k.side_path) else {
        return Ok(());
    };
    let Ok(h) = Hashes::open_ro(index) else {
        return Ok(());
    };
    let blocks = k.blocks(bs);
    let mut buf = vec![0u8; bs as usize];
    for b in dirty.iter().flat_map(|&(a, z)| a..z.min(blocks)) {
        let n = (k.size - b * bs).min(bs) as usize;
        let got = read_full(&side, &mut buf[..n], b * bs).at(&k.side_path)?;
        buf[got..n].fill(0);
        if hashes::of(&buf[..n]) == h.get(b)? {
            k.mark(b);
        }
    }
    Ok(())
}
