//! The per-store change log: every namespace and metadata change made through the mount
//! (creates, deletes, renames, links, truncates, fallocates, chmod/chown/utimens, xattrs)
//! and every change found by the reconcile at mount time, in order.
//!
//! Format v1: segment files `STATE/log/<first seq, 16 hex>.log`, each a 24-byte header
//! (magic `DRFSLOG1`, version u32, pad u32, first seq u64) then frames
//! `[len u32][crc32 u32][JSON record]`. A record is written with one `write` call after the
//! operation succeeded, so it is in the page cache before the operation returns. A torn
//! frame at a segment's end (crash mid-write) ends that segment; nothing after it counts.

use std::fs::{self, File, OpenOptions};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::{At, Error, Result};
use crate::model::FileId;
use crate::model::relpath::RelPath;

pub const MAGIC: &[u8; 8] = b"DRFSLOG1";
pub const VERSION: u32 = 1;
const SEG_HEADER: usize = 24;
/// A frame larger than this is corrupt, not a record.
const MAX_FRAME: usize = 1 << 20;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Op {
    Mount {
        mountpoint: String,
        last_stop: String,
    },
    Unmount,
    Create {
        id: FileId,
        path: RelPath,
        ino: u64,
        btime: u64,
        mode: u32,
    },
    Mkdir {
        path: RelPath,
        mode: u32,
    },
    Mknod {
        path: RelPath,
        mode: u32,
        rdev: u32,
    },
    Symlink {
        path: RelPath,
        target: RelPath,
    },
    Link {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        id: Option<FileId>,
        path: RelPath,
    },
    Unlink {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        id: Option<FileId>,
        path: RelPath,
    },
    Rmdir {
        path: RelPath,
    },
    Rename {
        from: RelPath,
        to: RelPath,
        #[serde(default, skip_serializing_if = "is_false")]
        exchange: bool,
    },
    Truncate {
        id: FileId,
        path: RelPath,
        from: u64,
        to: u64,
    },
    Fallocate {
        id: FileId,
        path: RelPath,
        mode: i32,
        offset: u64,
        len: u64,
    },
    Chmod {
        path: RelPath,
        mode: u32,
    },
    Chown {
        path: RelPath,
        uid: Option<u32>,
        gid: Option<u32>,
    },
    Utimens {
        path: RelPath,
    },
    Setxattr {
        path: RelPath,
        name: String,
    },
    Removexattr {
        path: RelPath,
        name: String,
    },
    /// Reconcile: a file tracking did not know (created while unmounted, or present when
    /// tracking began). It needs a full resync.
    Found {
        id: FileId,
        path: RelPath,
        ino: u64,
        btime: u64,
        why: String,
    },
    /// Reconcile: a known file now has these paths (renamed or linked while unmounted).
    Moved {
        id: FileId,
        paths: Vec<RelPath>,
    },
    /// Reconcile: tracking cannot vouch for this file's bitmap; it needs a resync.
    Changed {
        id: FileId,
        path: RelPath,
        why: String,
    },
    /// Reconcile: a known file is gone (deleted while unmounted).
    Vanished {
        id: FileId,
        path: RelPath,
    },
    /// A cycle compared the whole file with the replica: tracking vouches for it again.
    Resynced {
        id: FileId,
    },
}

fn is_false(b: &bool) -> bool {
    !*b
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Record {
    pub seq: u64,
    pub time: String,
    #[serde(flatten)]
    pub op: Op,
}

pub struct ChangeLog {
    dir: PathBuf,
    path: PathBuf,
    file: File,
    next_seq: u64,
}

fn segments(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut v: Vec<PathBuf> = fs::read_dir(dir)
        .at(dir)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "log"))
        .collect();
    v.sort();
    Ok(v)
}

fn read_segment(path: &Path) -> Result<Vec<Record>> {
    let mut buf = Vec::new();
    File::open(path).at(path)?.read_to_end(&mut buf).at(path)?;
    if buf.len() < SEG_HEADER || &buf[..8] != MAGIC {
        return Err(Error::corrupt(path, "not a drfs change log segment"));
    }
    let v = u32::from_le_bytes([buf[8], buf[9], buf[10], buf[11]]);
    if v != VERSION {
        return Err(Error::corrupt(path, format!("log version {v}")));
    }
    let mut out = Vec::new();
    let mut at = SEG_HEADER;
    while at + 8 <= buf.len() {
        let len = u32::from_le_bytes([buf[at], buf[at + 1], buf[at + 2], buf[at + 3]]) as usize;
        let crc = u32::from_le_bytes([buf[at + 4], buf[at + 5], buf[at + 6], buf[at + 7]]);
        let Some(body) = buf.get(at + 8..at + 8 + len).filter(|_| len <= MAX_FRAME) else {
            break;
        };
        if crc32fast::hash(body) != crc {
            break;
        }
        match serde_json::from_slice::<Record>(body) {
            Ok(r) => out.push(r),
            Err(e) => return Err(Error::corrupt(path, format!("record at byte {at}: {e}"))),
        }
        at += 8 + len;
    }
    Ok(out)
}

impl ChangeLog {
    /// Opens the log for appending: a new segment after the last record found.
    pub fn open(dir: &Path) -> Result<ChangeLog> {
        fs::create_dir_all(dir).at(dir)?;
        let last = match segments(dir)?.last() {
            Some(p) => read_segment(p)?.last().map(|r| r.seq),
            None => None,
        };
        let next_seq = last.map_or(1, |s| s + 1);
        let path = dir.join(format!("{next_seq:016x}.log"));
        let mut file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .at(&path)?;
        if file.metadata().at(&path)?.len() == 0 {
            let mut h = Vec::with_capacity(SEG_HEADER);
            h.extend_from_slice(MAGIC);
            h.extend_from_slice(&VERSION.to_le_bytes());
            h.extend_from_slice(&0u32.to_le_bytes());
            h.extend_from_slice(&next_seq.to_le_bytes());
            file.write_all(&h).at(&path)?;
        }
        Ok(ChangeLog {
            dir: dir.to_path_buf(),
            path,
            file,
            next_seq,
        })
    }

    /// Appends one record (a single write call) and returns it.
    pub fn append(&mut self, op: Op) -> Result<Record> {
        let rec = Record {
            seq: self.next_seq,
            time: crate::model::fmt::rfc3339_ns(crate::sys::now_ns()),
            op,
        };
        let body = serde_json::to_vec(&rec).map_err(Error::encode)?;
        let mut frame = Vec::with_capacity(body.len() + 8);
        frame.extend_from_slice(&(body.len() as u32).to_le_bytes());
        frame.extend_from_slice(&crc32fast::hash(&body).to_le_bytes());
        frame.extend_from_slice(&body);
        self.file.write_all(&frame).at(&self.path)?;
        self.next_seq += 1;
        Ok(rec)
    }

    pub fn sync(&self) -> Result<()> {
        self.file.sync_data().at(&self.path)
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

/// Every record in the log, oldest first.
pub fn read_all(dir: &Path) -> Result<Vec<Record>> {
    if !dir.exists() {
        return Ok(Vec::new());
    }
    let mut out = Vec::new();
    for seg in segments(dir)? {
        out.extend(read_segment(&seg)?);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn append_reopen_and_torn_tail() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path().join("log");
        let mut log = ChangeLog::open(&d).unwrap();
        let p = RelPath::from_bytes(b"vm/a.img");
        log.append(Op::Mkdir {
            path: RelPath::from_bytes(b"vm"),
            mode: 0o755,
        })
        .unwrap();
        log.append(Op::Unlink {
            id: None,
            path: p.clone(),
        })
        .unwrap();
        // A torn frame: a length with no body.
        log.file.write_all(&[200, 0, 0, 0, 1, 2]).unwrap();
        drop(log);
        let mut log = ChangeLog::open(&d).unwrap();
        let r = log.append(Op::Unmount).unwrap();
        assert_eq!(r.seq, 3);
        let all = read_all(&d).unwrap();
        assert_eq!(all.iter().map(|r| r.seq).collect::<Vec<_>>(), vec![1, 2, 3]);
        assert_eq!(all[1].op, Op::Unlink { id: None, path: p });
        let json = serde_json::to_string(&all[0]).unwrap();
        assert!(json.contains(r#""op":"mkdir""#), "{json}");
    }
}
