//! Seeding the tracking of a store whose files drfs knows without having tracked them: a
//! replica promoted to a primary by a failover. Its files keep the ids the replica knows
//! them by, nothing is marked dirty, and the stop is recorded as clean, so the first
//! mount trusts them (anything changed after the seed is caught by the clean stop's
//! rule), and a cycle to a replica that holds the same point ships only what changes
//! afterwards. What an earlier seed or run left is replaced.

use std::os::fd::AsFd;
use std::os::unix::fs::MetadataExt;

use crate::error::{At, Result};
use crate::model::{FileId, RelPath};
use crate::primary::track::run;
use crate::primary::track::table::{FileEntry, Table};
use crate::state::StateDir;
use crate::sys;

/// What an earlier run or seed may have left in the state directory.
const LEFT: [&str; 8] = [
    "files.json",
    "run.json",
    "cycle.json",
    "stamps",
    "stamps.new",
    "recovery.json",
    "activity",
    "clean.json",
];

/// Seeds the tracking of `sd`'s store: `files` are its regular files, by id, at their
/// paths.
pub fn seed(sd: &StateDir, files: &[(FileId, Vec<RelPath>)]) -> Result<()> {
    sd.make_primary_dirs()?;
    for d in ["bitmaps", "log", "cow"] {
        let p = sd.path(d);
        if p.exists() {
            std::fs::remove_dir_all(&p).at(&p)?;
        }
    }
    for f in LEFT {
        let p = sd.path(f);
        if p.exists() {
            std::fs::remove_file(&p).at(&p)?;
        }
    }
    sd.make_primary_dirs()?;
    let mut entries = Vec::with_capacity(files.len());
    for (id, paths) in files {
        let Some(first) = paths.first() else { continue };
        let abs = first.under(sd.store());
        let fd = sys::open_path(&abs).at(&abs)?;
        let md = std::fs::symlink_metadata(&abs).at(&abs)?;
        entries.push(FileEntry {
            id: *id,
            ino: md.ino(),
            btime: sys::btime_ns(fd.as_fd()),
            paths: paths.clone(),
            needs_resync: false,
            resync_why: None,
        });
    }
    Table::seeded(entries).save(&sd.path(""))?;
    run::mark_clean(sd)
}
