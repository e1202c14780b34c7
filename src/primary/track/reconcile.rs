//! The reconcile at mount: walks the store and compares it with the file table, so that
//! nothing changed while drfs was not watching goes unnoticed. It yields change-log ops:
//! `Found` for files tracking does not know, `Moved` for known files at new paths,
//! `Vanished` for known files that are gone, and `Changed` for files whose ctime shows a
//! change that drfs did not watch (`Rule`). Those get `needs_resync`: never trusted.
//!
//! The rule depends on how the previous run ended: after a clean unmount, anything changed
//! since it; after a host crash, anything changed since this boot began; after the daemon
//! was killed, per file, anything changed after the daemon's own last operation on that
//! file (`stamps`), so files only the daemon wrote keep their bitmaps as the truth.

use std::collections::{BTreeMap, HashMap};
use std::os::unix::fs::MetadataExt;
use std::path::Path;

use crate::error::{At, Result};
use crate::model::FileId;
use crate::model::fmt::rfc3339_ns;
use crate::model::relpath::RelPath;
use crate::primary::track::changelog::Op;
use crate::primary::track::run::LastStop;
use crate::primary::track::stamps::{Found, Stamp};
use crate::primary::track::table::Table;
use crate::state::STATE_DIR;
use crate::sys;

/// How to tell whether a known file changed while drfs did not watch it.
pub enum Rule {
    /// Nothing was tracked before: every file is new.
    Fresh,
    /// Store-wide: a ctime at or after `since_ns` (a clean stop, a host crash, or a
    /// killed daemon that left no stamps).
    Since { since_ns: i128, why: &'static str },
    /// Per file, after a killed daemon: a ctime later than its own last operation on the
    /// file could explain; a file it did not touch, later than when its run began.
    Stamped {
        watch_ns: i128,
        alive_ns: i128,
        found: Found,
    },
}

impl Rule {
    /// The rule for a previous run that ended as `last`; `stamps` are what it left.
    pub fn after(last: LastStop, stamps: Option<Found>) -> Rule {
        match last {
            LastStop::Fresh => Rule::Fresh,
            LastStop::Clean { since_ns } => Rule::Since {
                since_ns,
                why: "changed while not mounted",
            },
            LastStop::HostCrash { boot_ns } => Rule::Since {
                since_ns: boot_ns,
                why: "changed after the host restarted, before drfs mounted",
            },
            LastStop::Killed(d) => match (d.run, d.watch_ns, stamps) {
                (Some(run), Some(watch_ns), Some(found)) if found.run == run => Rule::Stamped {
                    watch_ns,
                    alive_ns: d.alive_ns,
                    found,
                },
                _ => Rule::Since {
                    since_ns: d.since_ns(),
                    why: "changed after the daemon died (it left no stamps)",
                },
            },
        }
    }

    fn is_fresh(&self) -> bool {
        matches!(self, Rule::Fresh)
    }

    /// Why file `id` with this ctime cannot be trusted, if it cannot.
    pub fn changed(&self, id: FileId, ctime: i128) -> Option<String> {
        match self {
            Rule::Fresh => None,
            Rule::Since { since_ns, why } => (ctime >= *since_ns).then(|| (*why).to_string()),
            Rule::Stamped {
                watch_ns,
                alive_ns,
                found,
            } => {
                let bound = match found.files.get(&id.0) {
                    Some(s) => s.bound(*alive_ns).max(*watch_ns),
                    // Overflow: an unstamped file may have been in flight at the kill.
                    None if found.overflow => Stamp {
                        inflight: 1,
                        ..Stamp::default()
                    }
                    .bound(*alive_ns)
                    .max(*watch_ns),
                    None => *watch_ns,
                };
                (ctime > bound).then(|| {
                    format!(
                        "changed after the daemon died (ctime {}, after its last operation on the file, {})",
                        rfc3339_ns(ctime),
                        rfc3339_ns(bound)
                    )
                })
            }
        }
    }
}

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
pub fn scan(root: &Path, table: &Table, rule: &Rule) -> Result<Vec<Op>> {
    let seen = walk(root)?;
    let new_why = if rule.is_fresh() {
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
        if f.needs_resync {
            continue;
        }
        if let Some(why) = rule.changed(f.id, s.ctime) {
            ops.push(Op::Changed {
                id: f.id,
                path: s.paths[0].clone(),
                why,
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
    use crate::primary::track::changelog::Record;

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
        let ops = scan(root, &t, &Rule::Fresh).unwrap();
        assert_eq!(ops.len(), 3, "{ops:?}");
        apply_all(&mut t, ops);
        assert!(t.entries().all(|f| f.needs_resync));

        std::thread::sleep(std::time::Duration::from_millis(20));
        let since = sys::now_ns();
        std::thread::sleep(std::time::Duration::from_millis(20));
        std::fs::rename(root.join("b.img"), root.join("vm1/b.img")).unwrap();
        std::fs::remove_file(root.join("gone.img")).unwrap();
        std::fs::write(root.join("new.img"), b"n").unwrap();
        let rule = Rule::after(LastStop::Clean { since_ns: since }, None);
        let ops = scan(root, &t, &rule).unwrap();
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
