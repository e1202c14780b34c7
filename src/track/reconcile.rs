//! The reconcile at mount: walks the store and compares it with the file table, so that
//! nothing changed while drfs was not watching goes unnoticed. It yields change-log ops:
//! `Found` for files tracking does not know, `Moved` for known files at new paths,
//! `Vanished` for known files that are gone, and `Changed` for files whose ctime shows a
//! change after the previous mount stopped watching (after a clean unmount, or after the
//! daemon's last heartbeat when it was killed). Those get `needs_resync`: never trusted.

use std::collections::{BTreeMap, HashMap};
use std::os::unix::fs::MetadataExt;
use std::path::Path;

use crate::error::{At, Result};
use crate::relpath::RelPath;
use crate::state::{LastStop, STATE_DIR};
use crate::sys;
use crate::track::FileId;
use crate::track::changelog::Op;
use crate::track::table::Table;

struct Seen {
    paths: Vec<RelPath>,
    ctime: i128,
}

/// Every regular file below `root` (not following symlinks, skipping `.drfs`), by key.
fn walk(root: &Path) -> Result<BTreeMap<(u64, u64), Seen>> {
    let mut out: BTreeMap<(u64, u64), Seen> = BTreeMap::new();
    let mut stack = vec![RelPath::root()];
    while let Some(dir) = stack.pop() {
        let abs = dir.under(root);
        let rd = match std::fs::read_dir(&abs) {
            Ok(rd) => rd,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(e).at(&abs),
        };
        for ent in rd {
            let ent = ent.at(&abs)?;
            let name = ent.file_name();
            if dir.is_root() && name == STATE_DIR {
                continue;
            }
            let rel = dir.join(&name);
            let md = match std::fs::symlink_metadata(ent.path()) {
                Ok(md) => md,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => return Err(e).at(&ent.path()),
            };
            if md.is_dir() {
                stack.push(rel);
            } else if md.is_file() {
                let fd = sys::open_path(&ent.path()).at(&ent.path())?;
                let btime = sys::btime_ns(std::os::fd::AsFd::as_fd(&fd));
                let ctime = i128::from(md.ctime()) * 1_000_000_000 + i128::from(md.ctime_nsec());
                let seen = out.entry((md.ino(), btime)).or_insert(Seen {
                    paths: Vec::new(),
                    ctime,
                });
                seen.paths.push(rel);
            }
        }
    }
    for s in out.values_mut() {
        s.paths.sort();
    }
    Ok(out)
}

/// The ops that bring the table in line with the store.
pub fn scan(root: &Path, table: &Table, last: LastStop) -> Result<Vec<Op>> {
    let seen = walk(root)?;
    let since = match last {
        LastStop::Fresh => None,
        LastStop::Clean { since_ns } | LastStop::Crashed { since_ns, .. } => Some(since_ns),
    };
    let new_why = if since.is_none() {
        "present when tracking began"
    } else {
        "created while not mounted"
    };
    let mut ops = Vec::new();
    let mut known: HashMap<FileId, bool> = table.entries().map(|f| (f.id, false)).collect();
    for ((ino, btime), s) in &seen {
        let Some(f) = table.by_key(*ino, *btime) else {
            ops.push(Op::Found {
                id: FileId::new(),
                path: s.paths[0].clone(),
                ino: *ino,
                btime: *btime,
                why: new_why.into(),
            });
            for p in &s.paths[1..] {
                ops.push(Op::Link {
                    id: Some(FileId(0)),
                    path: p.clone(),
                });
            }
            continue;
        };
        known.insert(f.id, true);
        let mut had = f.paths.clone();
        had.sort();
        if had != s.paths {
            ops.push(Op::Moved {
                id: f.id,
                paths: s.paths.clone(),
            });
        }
        if since.is_some_and(|t| s.ctime >= t) && !f.needs_resync {
            ops.push(Op::Changed {
                id: f.id,
                path: s.paths[0].clone(),
                why: "changed while not mounted".into(),
            });
        }
    }
    for (id, found) in known {
        if !found {
            let path = table
                .get(id)
                .and_then(|f| f.paths.first().cloned())
                .unwrap_or_default();
            ops.push(Op::Vanished { id, path });
        }
    }
    fix_link_ids(&mut ops);
    Ok(ops)
}

/// A `Found` file with several names: its extra `Link` ops take the new id.
fn fix_link_ids(ops: &mut [Op]) {
    let mut current = FileId(0);
    for op in ops.iter_mut() {
        match op {
            Op::Found { id, .. } => current = *id,
            Op::Link { id: Some(id), .. } if id.0 == 0 => *id = current,
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::track::changelog::Record;

    fn apply_all(t: &mut Table, ops: Vec<Op>) {
        for (i, op) in ops.into_iter().enumerate() {
            t.apply(&Record {
                seq: t.log_seq + 1 + i as u64,
                time: String::new(),
                op,
            });
        }
    }

    #[test]
    fn finds_new_moved_changed_and_vanished_files() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        std::fs::create_dir(root.join(STATE_DIR)).unwrap();
        std::fs::write(root.join(STATE_DIR).join("x"), b"state").unwrap();
        std::fs::create_dir(root.join("vm1")).unwrap();
        std::fs::write(root.join("vm1/a.img"), b"a").unwrap();
        std::fs::write(root.join("b.img"), b"b").unwrap();
        std::fs::write(root.join("gone.img"), b"g").unwrap();

        let mut t = Table::default();
        let ops = scan(root, &t, LastStop::Fresh).unwrap();
        assert_eq!(ops.len(), 3, "{ops:?}");
        apply_all(&mut t, ops);
        assert!(t.entries().all(|f| f.needs_resync));

        std::thread::sleep(std::time::Duration::from_millis(20));
        let since = sys::now_ns();
        std::thread::sleep(std::time::Duration::from_millis(20));
        std::fs::rename(root.join("b.img"), root.join("vm1/b.img")).unwrap();
        std::fs::remove_file(root.join("gone.img")).unwrap();
        std::fs::write(root.join("new.img"), b"n").unwrap();
        let ops = scan(root, &t, LastStop::Clean { since_ns: since }).unwrap();
        let kinds: Vec<&str> = ops
            .iter()
            .map(|o| match o {
                Op::Found { .. } => "found",
                Op::Moved { .. } => "moved",
                Op::Vanished { .. } => "vanished",
                Op::Changed { .. } => "changed",
                _ => "other",
            })
            .collect();
        assert!(
            kinds.contains(&"found") && kinds.contains(&"moved") && kinds.contains(&"vanished"),
            "{kinds:?}"
        );
        apply_all(&mut t, ops);
        assert!(t.by_path(&RelPath::from_bytes(b"vm1/b.img")).is_some());
        assert!(t.by_path(&RelPath::from_bytes(b"gone.img")).is_none());
    }
}
