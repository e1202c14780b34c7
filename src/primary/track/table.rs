//! The file table: which regular files tracking knows, by stable id. An id is given once,
//! when tracking first sees a file, and follows the file through renames and links; the
//! table finds it again by the file's (inode, birth time) key. The table is derived state:
//! the last snapshot (`STATE/files.json`, format v1) plus the change-log records after it,
//! applied with `apply` — the same code for the daemon and for `drfs changes`.

use std::collections::HashMap;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::error::{At, Error, Result};
use crate::model::FileId;
use crate::model::relpath::RelPath;
use crate::primary::track::changelog::{self, Op, Record};
use crate::sys;

pub const VERSION: u32 = 1;

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct FileEntry {
    pub id: FileId,
    pub ino: u64,
    pub btime: u64,
    pub paths: Vec<RelPath>,
    pub needs_resync: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resync_why: Option<String>,
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct Snapshot {
    version: u32,
    log_seq: u64,
    files: Vec<FileEntry>,
}

#[derive(Debug, Default, Clone)]
pub struct Table {
    files: HashMap<FileId, FileEntry>,
    by_key: HashMap<(u64, u64), FileId>,
    pub log_seq: u64,
}

impl Table {
    /// Loads the snapshot and replays the log after it.
    pub fn load(state: &Path, log_dir: &Path) -> Result<Table> {
        let p = state.join("files.json");
        let mut t = Table::default();
        match std::fs::read(&p) {
            Ok(bytes) => {
                let s: Snapshot = serde_json::from_slice(&bytes)
                    .map_err(|e| Error::corrupt(&p, e.to_string()))?;
                if s.version != VERSION {
                    return Err(Error::corrupt(&p, format!("version {}", s.version)));
                }
                t.log_seq = s.log_seq;
                for f in s.files {
                    t.insert(f);
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e).at(&p),
        }
        for r in changelog::read_all(log_dir)? {
            if r.seq > t.log_seq {
                t.apply(&r);
            }
        }
        Ok(t)
    }

    /// A table of `files`, as if a snapshot held them (for a seeded store).
    pub fn seeded(files: Vec<FileEntry>) -> Table {
        let mut t = Table::default();
        for f in files {
            t.insert(f);
        }
        t
    }

    pub fn save(&self, state: &Path) -> Result<()> {
        let mut files: Vec<FileEntry> = self.files.values().cloned().collect();
        files.sort_by(|a, b| a.paths.cmp(&b.paths));
        let s = Snapshot {
            version: VERSION,
            log_seq: self.log_seq,
            files,
        };
        let p = state.join("files.json");
        let body = serde_json::to_vec_pretty(&s).map_err(Error::encode)?;
        sys::write_atomic(&p, &body).at(&p)
    }

    fn insert(&mut self, f: FileEntry) {
        self.by_key.insert((f.ino, f.btime), f.id);
        self.files.insert(f.id, f);
    }

    fn remove(&mut self, id: FileId) {
        if let Some(f) = self.files.remove(&id) {
            if self.by_key.get(&(f.ino, f.btime)) == Some(&id) {
                self.by_key.remove(&(f.ino, f.btime));
            }
        }
    }

    pub fn by_key(&self, ino: u64, btime: u64) -> Option<&FileEntry> {
        self.by_key
            .get(&(ino, btime))
            .and_then(|id| self.files.get(id))
    }

    pub fn get(&self, id: FileId) -> Option<&FileEntry> {
        self.files.get(&id)
    }

    pub fn by_path(&self, path: &RelPath) -> Option<&FileEntry> {
        self.files.values().find(|f| f.paths.contains(path))
    }

    pub fn entries(&self) -> impl Iterator<Item = &FileEntry> {
        self.files.values()
    }

    /// Drops `path` (and, for a directory, everything below it) from every entry.
    fn drop_path(&mut self, path: &RelPath) -> Vec<FileId> {
        let mut gone = Vec::new();
        for f in self.files.values_mut() {
            f.paths.retain(|p| !p.starts_with(path));
            if f.paths.is_empty() {
                gone.push(f.id);
            }
        }
        for id in &gone {
            self.remove(*id);
        }
        gone
    }

    fn rename(&mut self, from: &RelPath, to: &RelPath, exchange: bool) {
        if !exchange {
            self.drop_path(to);
        }
        for f in self.files.values_mut() {
            for p in f.paths.iter_mut() {
                if p.starts_with(from) {
                    *p = p.rebase(from, to);
                } else if exchange && p.starts_with(to) {
                    *p = p.rebase(to, from);
                }
            }
        }
    }

    /// Applies one change-log record. Returns the ids whose last path went away.
    pub fn apply(&mut self, r: &Record) -> Vec<FileId> {
        self.log_seq = self.log_seq.max(r.seq);
        let mut gone = Vec::new();
        match &r.op {
            Op::Create {
                id,
                path,
                ino,
                btime,
                ..
            } => {
                gone = self.drop_path(path);
                self.insert(FileEntry {
                    id: *id,
                    ino: *ino,
                    btime: *btime,
                    paths: vec![path.clone()],
                    needs_resync: false,
                    resync_why: None,
                });
            }
            Op::Found {
                id,
                path,
                ino,
                btime,
                why,
            } => {
                gone = self.drop_path(path);
                self.insert(FileEntry {
                    id: *id,
                    ino: *ino,
                    btime: *btime,
                    paths: vec![path.clone()],
                    needs_resync: true,
                    resync_why: Some(why.clone()),
                });
            }
            Op::Link { id: Some(id), path } => {
                if let Some(f) = self.files.get_mut(id) {
                    f.paths.push(path.clone());
                }
            }
            Op::Unlink { path, .. } => gone = self.drop_path(path),
            Op::Rename { from, to, exchange } => self.rename(from, to, *exchange),
            Op::Moved { id, paths } => {
                if let Some(f) = self.files.get_mut(id) {
                    f.paths = paths.clone();
                }
            }
            Op::Changed { id, why, .. } => {
                if let Some(f) = self.files.get_mut(id) {
                    f.needs_resync = true;
                    f.resync_why = Some(why.clone());
                }
            }
            Op::Resynced { id } => {
                if let Some(f) = self.files.get_mut(id) {
                    f.needs_resync = false;
                    f.resync_why = None;
                }
            }
            Op::Vanished { id, .. } => {
                self.remove(*id);
                gone.push(*id);
            }
            _ => {}
        }
        gone
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(seq: u64, op: Op) -> Record {
        Record {
            seq,
            time: String::new(),
            op,
        }
    }

    fn p(s: &str) -> RelPath {
        RelPath::from_bytes(s.as_bytes())
    }

    #[test]
    fn follows_renames_links_and_deletes() {
        let mut t = Table::default();
        let a = FileId(1);
        let b = FileId(2);
        let create = |id, path: &str, ino| Op::Create {
            id,
            path: p(path),
            ino,
            btime: 5,
            mode: 0o644,
        };
        t.apply(&rec(1, create(a, "vm1/a.img", 10)));
        t.apply(&rec(2, create(b, "vm1/b.img", 11)));
        t.apply(&rec(
            3,
            Op::Rename {
                from: p("vm1"),
                to: p("vm2"),
                exchange: false,
            },
        ));
        assert_eq!(t.get(a).unwrap().paths, vec![p("vm2/a.img")]);
        t.apply(&rec(
            4,
            Op::Link {
                id: Some(a),
                path: p("a-link"),
            },
        ));
        // Renaming b over a's first name replaces that link only.
        let gone = t.apply(&rec(
            5,
            Op::Rename {
                from: p("vm2/b.img"),
                to: p("vm2/a.img"),
                exchange: false,
            },
        ));
        assert!(gone.is_empty());
        assert_eq!(t.get(a).unwrap().paths, vec![p("a-link")]);
        assert_eq!(t.by_path(&p("vm2/a.img")).unwrap().id, b);
        let gone = t.apply(&rec(
            6,
            Op::Unlink {
                id: Some(a),
                path: p("a-link"),
            },
        ));
        assert_eq!(gone, vec![a]);
        assert!(t.by_key(10, 5).is_none());
        assert_eq!(t.by_key(11, 5).unwrap().id, b);
        assert_eq!(t.log_seq, 6);
    }
}
