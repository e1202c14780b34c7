//! Verify (after PBS's verify jobs): re-reads the sources points read from — the latest
//! files and the undo records — and checks every block against the BLAKE3 entry kept
//! beside it when it was applied (`hashes::of`, the one hash rule reads use too), so bit
//! rot is found before a failover reads it. A bad block is named by its file, its byte
//! offset and length, its source, and every point that reads it from there.
//!
//! Scope: the latest point (its files), one point (the latest files and the undo records
//! from it on), or all points. Reads go at a bounded rate (`rate`, bytes per second) and
//! resume: `.drfs/verify.json` (format 1) records the scope, the sources done, the place
//! reached in the current one (saved every 64 MiB), what was found so far, and when a run
//! finished; a run of the same scope that finds an unfinished record carries on from it.
//! Reads under a running apply are redone (the apply counter moved); undo records are
//! read under the shared prune lock, so retention does not merge them meanwhile.

use std::collections::BTreeSet;
use std::fs::File;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::error::{At, Error, Result};
use crate::model::{FileId, Manifest, PointInfo, RelPath};
use crate::replica::posix::Replica;
use crate::replica::posix::hashes::{self, Hashes};
use crate::replica::posix::tree::Tree;
use crate::replica::posix::undo::{self, UndoIndex};
use crate::sys;

pub const VERSION: u32 = 1;
const FILE: &str = "verify.json";
/// The progress is saved this often within a source.
const SAVE_EVERY: u64 = 64 << 20;

/// What a run checks.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Scope {
    /// The latest point: the latest files.
    Latest,
    /// One point: the latest files and the undo records from it on.
    Point(String),
    /// Every point: the latest files and every undo record.
    All,
}

/// A block that does not match its BLAKE3.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BadBlock {
    /// The file's path (in the latest point, or in the record's point).
    pub file: String,
    pub file_id: FileId,
    pub offset: u64,
    pub len: u64,
    /// `latest file`, or `undo record of point ID`.
    pub source: String,
    /// Every point that reads this block from this source.
    pub points: Vec<String>,
    pub why: String,
}

/// A run's record (`.drfs/verify.json`) and its report.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Report {
    pub version: u32,
    pub scope: Option<Scope>,
    pub started: String,
    /// Sources finished (`latest/<id>`, `undo/<point>/<id>`).
    pub done: BTreeSet<String>,
    /// The source under way and the block reached.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub at: Option<(String, u64)>,
    pub blocks: u64,
    pub bytes: u64,
    /// Bytes read by this run (not the runs it resumed), and in how long.
    pub run_bytes: u64,
    pub run_seconds: f64,
    pub bad: Vec<BadBlock>,
    /// Whether this run carried on from an unfinished one.
    pub resumed: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finished: Option<String>,
}

/// The last run's record, if any.
pub fn last(r: &Replica) -> Option<Report> {
    let b = std::fs::read(r.sd.path(FILE)).ok()?;
    serde_json::from_slice(&b).ok()
}

/// One source: a data file and the hash entries kept beside it.
struct Source {
    key: String,
    id: FileId,
    path: String,
    data: PathBuf,
    hashes: PathBuf,
    size: u64,
    /// Blocks to check (runs).
    runs: Vec<[u64; 2]>,
    /// The point whose undo record this is (None: the latest file).
    record_of: Option<String>,
    /// A latest file's path in the replica.
    rel: Option<RelPath>,
}

/// Everything verify needs to know about the replica's points.
struct Points {
    all: Vec<PointInfo>,
    manifests: Vec<Manifest>,
    undos: Vec<(PathBuf, UndoIndex)>,
}

impl Points {
    fn load(r: &Replica) -> Result<Points> {
        let all = r.points()?;
        let mut manifests = Vec::new();
        let mut undos = Vec::new();
        for p in &all {
            manifests.push(r.manifest(&p.id)?);
            let dir = r.undo_dir(&p.id);
            undos.push((dir.clone(), UndoIndex::load(&dir)?));
        }
        Ok(Points {
            all,
            manifests,
            undos,
        })
    }

    fn size_in(&self, i: usize, id: FileId) -> Option<(u64, String)> {
        self.manifests[i]
            .entries
            .iter()
            .find(|e| e.id == Some(id))
            .map(|e| (e.size, e.path.to_string()))
    }

    /// The points that read block `b` of file `id` from `src`.
    fn affected(&self, src: &Source, b: u64, bs: u64) -> Vec<String> {
        let mut out = Vec::new();
        for (i, p) in self.all.iter().enumerate() {
            let Some((size, _)) = self.size_in(i, src.id) else {
                continue;
            };
            if b * bs >= size.max(1) {
                continue;
            }
            let from = undo::block_source(&self.undos[i..], src.id, b);
            let mine = match &src.record_of {
                None => from.is_none(),
                Some(_) => from.as_deref() == Some(src.data.as_path()),
            };
            if mine {
                out.push(p.id.clone());
            }
        }
        out
    }
}

fn blocks(size: u64, bs: u64) -> u64 {
    size.div_ceil(bs)
}

/// The sources of `scope`, in a stable order.
fn sources(r: &Replica, pts: &Points, scope: &Scope) -> Result<Vec<Source>> {
    let bs = r.cfg.block_size;
    let mut out = Vec::new();
    let Some(latest) = pts.all.len().checked_sub(1) else {
        return Ok(out);
    };
    for e in &pts.manifests[latest].entries {
        let Some(id) = e.id else { continue };
        out.push(Source {
            key: format!("latest/{id}"),
            id,
            path: e.path.to_string(),
            data: e.path.under(&r.root),
            hashes: r.hash_file(id),
            size: e.size,
            runs: vec![[0, blocks(e.size, bs)]],
            record_of: None,
            rel: Some(e.path.clone()),
        });
    }
    let first = match scope {
        Scope::Latest => return Ok(out),
        Scope::All => 0,
        Scope::Point(id) => pts
            .all
            .iter()
            .position(|p| &p.id == id)
            .ok_or_else(|| Error::Invalid(format!("no point {id} on {}", r.root.display())))?,
    };
    for i in first..pts.all.len() {
        let (dir, index) = &pts.undos[i];
        let q = &pts.all[i].id;
        for (id, f) in &index.files {
            let data = undo::data_path(dir, *id);
            let (size, path) = pts.size_in(i, *id).unwrap_or_else(|| {
                let len = std::fs::metadata(&data).map_or(0, |m| m.len());
                (len, format!("(file {id})"))
            });
            let n = blocks(size, bs);
            let runs = if f.whole {
                vec![[0, n]]
            } else {
                f.blocks
                    .iter()
                    .map(|r| [r[0].min(n), r[1].min(n)])
                    .filter(|r| r[0] < r[1])
                    .collect()
            };
            out.push(Source {
                key: format!("undo/{q}/{id}"),
                id: *id,
                path,
                data,
                hashes: undo::hash_path(dir, *id),
                size,
                runs,
                record_of: Some(q.clone()),
                rel: None,
            });
        }
    }
    Ok(out)
}

/// How a run goes: its rate, and what it is told as it finds bad blocks.
pub struct Opts<'a> {
    pub scope: Scope,
    /// Bytes per second at most (None: as fast as the disk gives).
    pub rate: Option<u64>,
    /// Start afresh even if an unfinished run of the same scope is recorded.
    pub restart: bool,
    pub on_bad: &'a dyn Fn(&BadBlock),
}

/// A run over `o.scope`; the report is also saved as `.drfs/verify.json`.
pub fn verify(r: &Replica, o: &Opts) -> Result<Report> {
    let pts = Points::load(r)?;
    let srcs = sources(r, &pts, &o.scope)?;
    let mut rep = match last(r) {
        Some(p) if !o.restart && p.finished.is_none() && p.scope.as_ref() == Some(&o.scope) => {
            Report {
                resumed: true,
                run_bytes: 0,
                run_seconds: 0.0,
                ..p
            }
        }
        _ => Report {
            version: VERSION,
            scope: Some(o.scope.clone()),
            started: crate::model::fmt::rfc3339_now(),
            ..Default::default()
        },
    };
    let mut run = Run {
        r,
        pts: &pts,
        o,
        t0: Instant::now(),
        since_save: 0,
    };
    for s in &srcs {
        if rep.done.contains(&s.key) {
            continue;
        }
        run.source(s, &mut rep)?;
        rep.done.insert(s.key.clone());
        rep.at = None;
        run.save(&mut rep)?;
        sys::fault::hit_nth("verify", rep.done.len() as u64);
    }
    rep.finished = Some(crate::model::fmt::rfc3339_now());
    run.save(&mut rep)?;
    Ok(rep)
}

struct Run<'a> {
    r: &'a Replica,
    pts: &'a Points,
    o: &'a Opts<'a>,
    t0: Instant,
    since_save: u64,
}

impl Run<'_> {
    fn save(&mut self, rep: &mut Report) -> Result<()> {
        rep.run_seconds = self.t0.elapsed().as_secs_f64();
        self.since_save = 0;
        let p = self.r.sd.path(FILE);
        let b = serde_json::to_vec_pretty(rep).map_err(Error::encode)?;
        sys::write_atomic(&p, &b).at(&p)
    }

    /// The apply counter (odd while an apply changes latest files).
    fn seq(&self) -> u64 {
        let p = self.r.sd.path("apply.seq");
        let mut b = [0u8; 8];
        match File::open(&p).and_then(|f| sys::read_full(&f, &mut b, 0)) {
            Ok(8) => u64::from_le_bytes(b),
            _ => 0,
        }
    }

    /// Checks one source; a latest file read while an apply moved it is read again.
    fn source(&mut self, s: &Source, rep: &mut Report) -> Result<()> {
        loop {
            let _lock = match s.record_of {
                Some(_) => self.r.prune_lock(libc::LOCK_SH)?,
                None => None,
            };
            let s0 = self.seq();
            if s.record_of.is_none() && s0 % 2 == 1 {
                std::thread::sleep(Duration::from_millis(50));
                continue;
            }
            let mut found = Vec::new();
            self.blocks(s, rep, &mut found)?;
            if s.record_of.is_some() || self.seq() == s0 {
                for b in found {
                    (self.o.on_bad)(&b);
                    rep.bad.push(b);
                }
                return Ok(());
            }
            rep.at = None;
        }
    }

    fn blocks(&mut self, s: &Source, rep: &mut Report, found: &mut Vec<BadBlock>) -> Result<()> {
        let bs = self.r.cfg.block_size;
        let bad = |b: u64, len: u64, why: &str| BadBlock {
            file: s.path.clone(),
            file_id: s.id,
            offset: b * bs,
            len,
            source: match &s.record_of {
                None => "latest file".into(),
                Some(q) => format!("undo record of point {q}"),
            },
            points: self.pts.affected(s, b, bs),
            why: why.into(),
        };
        let data = open_data(self.r, s);
        let idx = Hashes::open_ro(&s.hashes);
        let (data, idx) = match (data, idx) {
            (Ok(d), Ok(i)) => (d, i),
            (Err(e), _) => {
                found.push(bad(
                    s.runs.first().map_or(0, |r| r[0]),
                    s.size,
                    &e.to_string(),
                ));
                return Ok(());
            }
            (_, Err(_)) => {
                found.push(bad(0, s.size, "has no BLAKE3 kept"));
                return Ok(());
            }
        };
        let resume = rep
            .at
            .as_ref()
            .filter(|(k, _)| *k == s.key)
            .map(|(_, b)| *b);
        let mut buf = vec![0u8; bs as usize];
        for run in &s.runs {
            for b in run[0].max(resume.unwrap_or(0))..run[1] {
                let len = (s.size - b * bs).min(bs) as usize;
                let n = sys::read_full(&data, &mut buf[..len], b * bs).at(&s.data)?;
                buf[n..len].fill(0);
                if hashes::of(&buf[..len]) != idx.get(b)? {
                    found.push(bad(b, len as u64, "does not match its BLAKE3"));
                }
                rep.blocks += 1;
                rep.bytes += len as u64;
                rep.run_bytes += len as u64;
                self.since_save += len as u64;
                self.pace(rep.run_bytes);
                if self.since_save >= SAVE_EVERY {
                    rep.at = Some((s.key.clone(), b + 1));
                    self.save(rep)?;
                }
            }
        }
        Ok(())
    }

    /// Sleeps as long as it takes to keep to the rate.
    fn pace(&self, bytes: u64) {
        let Some(rate) = self.o.rate.filter(|&r| r > 0) else {
            return;
        };
        let due = Duration::from_secs_f64(bytes as f64 / rate as f64);
        let spent = self.t0.elapsed();
        if due > spent {
            std::thread::sleep(due - spent);
        }
    }
}

/// A source's data file: a latest file through the confined tree, or a record's data.
fn open_data(r: &Replica, s: &Source) -> Result<File> {
    let Some(rel) = &s.rel else {
        return File::open(&s.data).at(&s.data);
    };
    Tree::open(&r.root)
        .and_then(|t| t.open_file(rel, libc::O_RDONLY | libc::O_NOFOLLOW, 0))
        .at(&s.data)
}
