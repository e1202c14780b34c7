//! `drfs changes`: what tracking holds for a store, read straight from its state directory
//! (works whether or not the store is mounted). The JSON form is the contract tests and
//! tools read: `{"block_size", "files": [{"path", "id", "size", "needs_resync", "dirty"}],
//! "log": [records]}`, dirty runs as `[first_block, end_block_exclusive]`.

use std::path::Path;

use serde::Serialize;

use crate::error::{Error, Result};
use crate::model::FileId;
use crate::model::relpath::RelPath;
use crate::primary::track;
use crate::primary::track::changelog::{self, Op, Record};
use crate::state::StateDir;

#[derive(Debug, Serialize)]
pub struct Changes {
    pub block_size: u64,
    pub files: Vec<FileChanges>,
    pub log: Vec<Record>,
}

#[derive(Debug, Serialize)]
pub struct FileChanges {
    pub path: RelPath,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub links: Vec<RelPath>,
    pub id: FileId,
    pub size: u64,
    pub needs_resync: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub resync_why: Option<String>,
    pub dirty: Vec<[u64; 2]>,
}

/// The paths a record is about.
fn op_paths(op: &Op) -> Vec<&RelPath> {
    match op {
        Op::Create { path, .. }
        | Op::Mkdir { path, .. }
        | Op::Mknod { path, .. }
        | Op::Symlink { path, .. }
        | Op::Link { path, .. }
        | Op::Unlink { path, .. }
        | Op::Rmdir { path }
        | Op::Truncate { path, .. }
        | Op::Fallocate { path, .. }
        | Op::Chmod { path, .. }
        | Op::Chown { path, .. }
        | Op::Utimens { path }
        | Op::Setxattr { path, .. }
        | Op::Removexattr { path, .. }
        | Op::Found { path, .. }
        | Op::Changed { path, .. }
        | Op::Vanished { path, .. } => vec![path],
        Op::Rename { from, to, .. } => vec![from, to],
        Op::Moved { paths, .. } => paths.iter().collect(),
        Op::Mount { .. } | Op::Unmount | Op::Resynced { .. } => vec![],
    }
}

/// The store-relative form of PATH (given relative to the store or absolute inside it).
fn filter_path(store: &Path, path: &Path) -> Result<RelPath> {
    let rel = if path.is_absolute() {
        path.strip_prefix(store).map_err(|_| {
            Error::Invalid(format!(
                "{} is not inside store {}",
                path.display(),
                store.display()
            ))
        })?
    } else {
        path
    };
    let s = rel.as_os_str().as_encoded_bytes();
    let trimmed = s.strip_suffix(b"/").unwrap_or(s);
    Ok(RelPath::from_bytes(trimmed))
}

pub fn collect(store: &Path, path: Option<&Path>) -> Result<Changes> {
    let store = store
        .canonicalize()
        .map_err(|e| Error::Invalid(format!("store {}: {e}", store.display())))?;
    let (sd, cfg) = StateDir::open(&store)?;
    let only = path.map(|p| filter_path(&store, p)).transpose()?;
    let wanted = |p: &RelPath| only.as_ref().is_none_or(|o| p.starts_with(o));
    let table = track::load_table(&sd)?;
    let mut files = Vec::new();
    for f in table.entries() {
        let mut paths = f.paths.clone();
        paths.sort();
        if !paths.iter().any(wanted) {
            continue;
        }
        let size = std::fs::metadata(paths[0].under(&store)).map_or(0, |m| m.len());
        let dirty = track::bitmap_ranges(&sd, cfg.block_size, f.id)?;
        files.push(FileChanges {
            path: paths[0].clone(),
            links: if paths.len() > 1 {
                paths[1..].to_vec()
            } else {
                Vec::new()
            },
            id: f.id,
            size,
            needs_resync: f.needs_resync,
            resync_why: f.resync_why.clone(),
            dirty: dirty.into_iter().map(|(a, b)| [a, b]).collect(),
        });
    }
    files.sort_by(|a, b| a.path.cmp(&b.path));
    let log: Vec<Record> = changelog::read_all(&sd.path("log"))?
        .into_iter()
        .filter(|r| only.is_none() || op_paths(&r.op).into_iter().any(wanted))
        .collect();
    if let Some(o) = &only {
        if files.is_empty() && log.is_empty() && std::fs::symlink_metadata(o.under(&store)).is_err()
        {
            return Err(Error::Invalid(format!(
                "{o} is not in store {} (nothing there is, or was, tracked)",
                store.display()
            )));
        }
    }
    Ok(Changes {
        block_size: cfg.block_size,
        files,
        log,
    })
}
