//! `drfs restore`: writes a point's files (or one file or folder of it) to a destination,
//! sparse-aware (holes and zero blocks are not written), with a progress bar on a terminal.
//! It refuses to write inside the replica, and to overwrite anything unless forced.

use std::fs::{self, OpenOptions};
use std::io::IsTerminal;
use std::os::unix::fs::{FileExt, PermissionsExt, symlink};
use std::path::{Path, PathBuf};

use crate::error::{At, Error, Result};
use crate::relpath::RelPath;
use crate::replica::Replica;
use crate::view::PointView;
use crate::wire::{Entry, Kind};

pub struct RestoreOpts<'a> {
    pub point: &'a str,
    pub path: Option<&'a RelPath>,
    pub to: &'a Path,
    pub force: bool,
    pub progress: bool,
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

pub fn restore(r: &Replica, o: &RestoreOpts<'_>) -> Result<Restored> {
    let view = PointView::open(r, o.point)?;
    let dest = std::path::absolute(o.to).at(o.to)?;
    if dest.starts_with(&r.root) {
        return Err(Error::Invalid(format!(
            "{} is inside the replica {}: restore somewhere else",
            dest.display(),
            r.root.display()
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
    let bar = (o.progress && std::io::stderr().is_terminal()).then(|| bar(total));
    let mut done = Restored::default();
    let mut dirs = Vec::new();
    for e in &entries {
        let t = target(&dest, e, o.path);
        match e.kind {
            Kind::Dir => {
                fs::create_dir_all(&t).at(&t)?;
                dirs.push((t, *e));
            }
            Kind::File => {
                if let Some(p) = t.parent() {
                    fs::create_dir_all(p).at(p)?;
                }
                done.bytes += copy_file(&view, e, &t, o.force, bar.as_ref())?;
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
    if let Some(b) = bar {
        b.finish_and_clear();
    }
    Ok(done)
}

fn check_dest(dest: &Path, o: &RestoreOpts<'_>) -> Result<()> {
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

fn bar(total: u64) -> indicatif::ProgressBar {
    let pb = indicatif::ProgressBar::new(total);
    if let Ok(s) = indicatif::ProgressStyle::with_template(
        "restoring {bytes}/{total_bytes} [{wide_bar}] {binary_bytes_per_sec} eta {eta}",
    ) {
        pb.set_style(s);
    }
    pb
}

/// Copies one file of the point, leaving holes where the point has holes or zeros, and
/// checks every block against the BLAKE3 the primary sent for it.
fn copy_file(
    view: &PointView,
    e: &Entry,
    t: &Path,
    force: bool,
    bar: Option<&indicatif::ProgressBar>,
) -> Result<u64> {
    let src = view.file(e)?;
    let mut opts = OpenOptions::new();
    opts.write(true).create(true);
    if force {
        opts.truncate(true);
    } else {
        opts.create_new(true);
    }
    let dst = opts.open(t).at(t)?;
    let bs = view.manifest.block_size;
    let mut buf = vec![0u8; bs as usize];
    let mut written = 0;
    let mut off = 0;
    while off < e.size {
        let b = off / bs;
        let n = (e.size - off).min(bs) as usize;
        let got = if src.is_hole(b) {
            buf[..n].fill(0);
            n
        } else {
            src.read_at(&mut buf[..n], off).at(t)?
        };
        let want = src.expected(b)?;
        if want != Some(crate::replica::hashes::of(&buf[..got])) {
            return Err(Error::Corrupt {
                path: t.to_path_buf(),
                why: format!(
                    "block {b} of {} in point {} does not match its BLAKE3{}",
                    e.path,
                    view.info.id,
                    if want.is_none() { " (none kept)" } else { "" }
                ),
            });
        }
        if buf[..got].iter().any(|&x| x != 0) {
            dst.write_all_at(&buf[..got], off).at(t)?;
            written += got as u64;
        }
        if let Some(b) = bar {
            b.inc(n as u64);
        }
        off += n as u64;
    }
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
