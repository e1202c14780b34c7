//! `drfs restore`: writes a point's files (or one file or folder of it) to a destination,
//! sparse-aware (holes and zero blocks are not written), telling its progress.
//! It refuses to write inside the replica, and to overwrite anything unless forced.

use std::fs::{self, OpenOptions};
use std::os::unix::fs::{FileExt, PermissionsExt, symlink};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::error::{At, Error, Result};
use crate::model::progress::Progress;
use crate::model::relpath::RelPath;
use crate::model::{Entry, Kind};
use crate::points::view::PointView;
use crate::replica::PointStore;

pub struct RestoreOpts<'a> {
    pub point: &'a str,
    pub path: Option<&'a RelPath>,
    pub to: &'a Path,
    pub force: bool,
    /// Create DEST's missing parent directories.
    pub parents: bool,
    pub progress: Option<Arc<dyn Progress>>,
}

/// What a restore wrote.
#[derive(Debug, Default)]
pub struct Restored {
    pub files: u64,
    pub bytes: u64,
}

/// Where entry `e` goes: below DEST by its path, or, when one entry `base` is restored,
/// that entry at DEST itself and its content below it.
fn target(dest: &Path, e: &Entry, base: Option<&RelPath>) -> PathBuf {
    let Some(b) = base else {
        return e.path.under(dest);
    };
    let rest = &e.path.as_bytes()[b.as_bytes().len()..];
    match rest.strip_prefix(b"/") {
        None => dest.to_path_buf(),
        Some(r) => dest.join(RelPath::from_bytes(r).to_path()),
    }
}

pub fn restore(store: Arc<dyn PointStore>, o: &RestoreOpts<'_>) -> Result<Restored> {
    let view = PointView::open(store, o.point)?;
    let dest = crate::fuse::daemon::resolved(o.to)?;
    if dest.starts_with(view.replica()) {
        return Err(Error::Invalid(format!(
            "{} is inside the replica {}: restore somewhere else",
            dest.display(),
            view.replica().display()
        )));
    }
    let entries: Vec<&Entry> = view
        .manifest
        .entries
        .iter()
        .filter(|e| o.path.is_none_or(|p| e.path.starts_with(p)))
        .collect();
    if let Some(p) = o.path {
        if entries.is_empty() {
            return Err(Error::Invalid(format!("point {} has no {p}", o.point)));
        }
    }
    check_dest(&dest, o)?;
    let total: u64 = entries
        .iter()
        .filter(|e| e.kind == Kind::File)
        .map(|e| e.size)
        .sum();
    let bar = o.progress.as_deref();
    if let Some(b) = bar {
        b.total(total);
    }
    let fresh = fs::symlink_metadata(&dest).is_err();
    let r = write_all(&view, &entries, &dest, o, bar);
    if let Some(b) = bar {
        b.done();
    }
    if r.is_err() && fresh {
        remove_fresh(&dest);
    }
    r
}

/// Removes a DEST this restore created, after a failure (never across a mount).
fn remove_fresh(dest: &Path) {
    use std::os::unix::fs::MetadataExt;
    let dev = |p: &Path| fs::symlink_metadata(p).map(|m| m.dev()).ok();
    let parent = dest.parent().and_then(dev);
    if parent.is_some() && dev(dest) == parent {
        let _ = fs::remove_dir_all(dest).or_else(|_| fs::remove_file(dest));
    }
}

fn write_all(
    view: &PointView,
    entries: &[&Entry],
    dest: &Path,
    o: &RestoreOpts<'_>,
    bar: Option<&dyn Progress>,
) -> Result<Restored> {
    let mut done = Restored::default();
    let mut dirs = Vec::new();
    for e in entries {
        let t = target(dest, e, o.path);
        match e.kind {
            Kind::Dir => {
                fs::create_dir_all(&t).at(&t)?;
                dirs.push((t, *e));
            }
            Kind::File => {
                if let Some(p) = t.parent() {
                    fs::create_dir_all(p).at(p)?;
                }
                done.bytes += copy_file(view, e, &t, o.force, bar)?;
                done.files += 1;
                set_meta(&t, e)?;
            }
            Kind::Symlink => {
                if o.force {
                    let _ = fs::remove_file(&t);
                }
                let target = e.target.clone().unwrap_or_default();
                symlink(target.to_path(), &t).at(&t)?;
            }
            _ => tracing::info!("{}: special files are not restored", e.path),
        }
    }
    for (t, e) in dirs.into_iter().rev() {
        set_meta(&t, e)?;
    }
    Ok(done)
}

fn check_dest(dest: &Path, o: &RestoreOpts<'_>) -> Result<()> {
    if let Some(parent) = dest.parent().filter(|p| !o.parents && !p.exists()) {
        return Err(Error::Invalid(format!(
            "{} does not exist: create it first, or add --parents",
            parent.display()
        )));
    }
    if o.force {
        return Ok(());
    }
    match fs::symlink_metadata(dest) {
        Err(_) => Ok(()),
        Ok(m) if m.is_dir() && fs::read_dir(dest).at(dest)?.next().is_none() => Ok(()),
        Ok(_) => Err(Error::Invalid(format!(
            "{} exists; restore to a new or empty place, or use --force",
            dest.display()
        ))),
    }
}

/// Copies one file of the point, leaving holes where the point has holes or zeros, and
/// checks every block against the BLAKE3 the primary sent for it (a hole of the point
/// against the index's zero entries, without reading it).
/// The file is written under a temporary name and renamed into place once all of it
/// checked out: a failed restore leaves nothing half-written (and, with `--force`, the old
/// file as it was).
fn copy_file(
    view: &PointView,
    e: &Entry,
    t: &Path,
    force: bool,
    bar: Option<&dyn Progress>,
) -> Result<u64> {
    if !force && fs::symlink_metadata(t).is_ok() {
        return Err(Error::Invalid(format!(
            "{} exists; use --force to overwrite it",
            t.display()
        )));
    }
    let name = t.file_name().unwrap_or_default().to_string_lossy();
    let tmp = t.with_file_name(format!(".{name}.drfs-restore"));
    let _ = fs::remove_file(&tmp);
    let dst = OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&tmp)
        .at(&tmp)?;
    match copy_into(view, e, &dst, t, bar) {
        Ok(n) => {
            fs::rename(&tmp, t).at(t)?;
            Ok(n)
        }
        Err(err) => {
            let _ = fs::remove_file(&tmp);
            Err(err)
        }
    }
}

fn copy_into(
    view: &PointView,
    e: &Entry,
    dst: &fs::File,
    t: &Path,
    bar: Option<&dyn Progress>,
) -> Result<u64> {
    let src = view.file(e)?;
    let bs = view.manifest.block_size;
    let blocks = e.size.div_ceil(bs);
    let mut buf = vec![0u8; bs as usize];
    let mut written = 0;
    let mut b = 0;
    let mut shown = 0;
    let mut progress = |upto: u64| {
        if let Some(p) = bar {
            p.add(upto.min(e.size) - shown);
            shown = upto.min(e.size);
        }
    };
    let bad = |b: u64, why: &str| Error::Corrupt {
        path: view.replica().to_path_buf(),
        why: format!(
            "block {b} of {} in point {} {why}; {} was not written",
            e.path,
            view.info.id,
            t.display()
        ),
    };
    while b < blocks {
        // Blocks wholly before the next data are holes of the point.
        let data = src.seek(b * bs, true).at(t)?.unwrap_or(e.size);
        let first = (data / bs).max(b);
        if let Some(x) = src.first_nonzero_entry(b, first.min(blocks)).at(t)? {
            return Err(bad(x, "is a hole here but held data on the primary"));
        }
        b = first;
        let hole = src.seek(b * bs, false).at(t)?.unwrap_or(e.size);
        let end = hole.div_ceil(bs).max(b + 1).min(blocks);
        while b < end {
            let off = b * bs;
            let n = (e.size - off).min(bs) as usize;
            let (got, check) = src.read_checked(&mut buf[..n], b).at(t)?;
            if let Some(why) = check {
                return Err(bad(b, why.why()));
            }
            if buf[..got].iter().any(|&x| x != 0) {
                dst.write_all_at(&buf[..got], off).at(t)?;
                written += got as u64;
            }
            b += 1;
        }
        progress(b * bs);
    }
    progress(e.size);
    dst.set_len(e.size).at(t)?;
    dst.sync_all().at(t)?;
    Ok(written)
}

fn set_meta(t: &Path, e: &Entry) -> Result<()> {
    fs::set_permissions(t, fs::Permissions::from_mode(e.mode & 0o7777)).at(t)?;
    let _ = std::os::unix::fs::chown(t, Some(e.uid), Some(e.gid));
    let mtime = std::time::UNIX_EPOCH + std::time::Duration::from_nanos(e.mtime_ns.max(0) as u64);
    if let Ok(f) = fs::File::options().write(true).open(t) {
        let _ = f.set_modified(mtime);
    } else if let Ok(f) = fs::File::open(t) {
        let _ = f.set_modified(mtime);
    }
    Ok(())
}
