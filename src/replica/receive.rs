//! `drfs receive REPLICA`: the receiving end of the stream protocol, over stdin/stdout. It
//! binds an empty directory to a store (on `drfs protect`), refuses a cycle whose base is
//! not its latest point (a diverged copy), answers hash requests for resyncs, stages and
//! verifies blocks, and applies a committed cycle atomically. Every byte is hostile: paths,
//! sizes and counts are checked before they touch the disk.

use std::collections::BTreeSet;
use std::fs::File;
use std::io::{BufReader, BufWriter, Read, Write};
use std::os::fd::AsRawFd;
use std::path::Path;

use crate::error::{At, Class, Error, Result};
use crate::model::FileId;
use crate::model::relpath::RelPath;
use crate::model::retention::Policy;
use crate::model::{Kind, Manifest};
use crate::replica::posix::incoming::{Incoming, MAX_FILE};
use crate::replica::posix::tree::validate;
use crate::replica::posix::{Replica, apply};
use crate::sys;
use crate::wire::{BlockHash, Frame, Hashes, Msg, Reader, Writer};

/// How many entries one manifest may have.
const MAX_ENTRIES: usize = 10_000_000;
/// How many blocks one hash request may cover.
const MAX_HASH_BLOCKS: u64 = 1 << 16;

fn refuse<T>(message: impl Into<String>, recoverable: bool) -> Result<T> {
    Err(Error::Refused {
        message: message.into(),
        class: Class::from_recoverable(recoverable),
    })
}

/// Waits until no other receiver works on this replica (the lock goes with the process).
fn lock(root: &Path) -> Result<File> {
    let dir = File::open(root).at(root)?;
    if unsafe { libc::flock(dir.as_raw_fd(), libc::LOCK_EX) } != 0 {
        return refuse(format!("cannot lock replica {}", root.display()), true);
    }
    Ok(dir)
}

/// Serves one sender until it says goodbye. An error is also sent to the sender.
pub fn serve(root: &Path, input: impl Read, output: impl Write) -> Result<()> {
    let _lock = lock(root);
    let mut w = Writer::new(BufWriter::with_capacity(1 << 20, output))?;
    let r = match Reader::new(BufReader::with_capacity(1 << 20, input)) {
        Ok(r) => r,
        Err(e) => {
            let _ = w.msg(&Msg::Error {
                message: e.to_string(),
                recoverable: true,
            });
            return Err(e.into());
        }
    };
    let mut s = Session {
        root,
        w,
        r,
        replica: None,
        inc: None,
    };
    let result = s.run();
    if let Err(e) = &result {
        let _ = s.w.msg(&Msg::Error {
            message: e.to_string(),
            recoverable: e.recoverable(),
        });
    }
    result
}

struct Session<'a, R: Read, W: Write> {
    root: &'a Path,
    w: Writer<W>,
    r: Reader<R>,
    replica: Option<Replica>,
    inc: Option<Incoming>,
}

impl<R: Read, W: Write> Session<'_, R, W> {
    fn run(&mut self) -> Result<()> {
        let Msg::Hello {
            store_id,
            block_size,
            init,
            keep,
        } = self.r.msg()?
        else {
            return refuse("the stream did not start with a hello", true);
        };
        let replica = self.bind(&store_id, block_size, init, &keep)?;
        let latest = replica.latest()?;
        self.w.msg(&Msg::Welcome {
            replica_id: replica.cfg.store_id.clone(),
            source: replica.cfg.source.clone(),
            latest: latest.map(|p| p.to_ref()),
        })?;
        self.replica = Some(replica);
        loop {
            match self.r.read_frame()? {
                Frame::Msg(Msg::Bye) => return Ok(()),
                Frame::Msg(Msg::Begin {
                    generation,
                    base,
                    resync,
                    ..
                }) => self.begin(generation, base, resync)?,
                Frame::Block(b) => self.incoming()?.put(&b)?,
                Frame::Msg(Msg::HashRequest {
                    id,
                    path,
                    first,
                    count,
                }) => self.hashes(id, &path, first, count)?,
                Frame::Msg(Msg::Commit { manifest }) => self.commit(*manifest)?,
                Frame::Msg(m) => return refuse(format!("unexpected message {m:?}"), true),
                Frame::Hashes(_) => return refuse("unexpected hashes from the sender", true),
            }
        }
    }

    /// The replica this stream writes to, binding an uninitialised one on `init`.
    fn bind(&self, store_id: &str, bs: u64, init: bool, keep: &str) -> Result<Replica> {
        if !bs.is_power_of_two() || !(4096..=16 << 20).contains(&bs) {
            return refuse(format!("block size {bs}"), false);
        }
        if init {
            Policy::parse(keep).map_err(Error::operator)?;
        }
        let exists = crate::state::StateDir::new(self.root).exists();
        let r = if !exists && init {
            Replica::init(self.root, store_id, bs, keep)?
        } else {
            Replica::open(self.root)?
        };
        if r.cfg.source.as_deref() != Some(store_id) {
            return refuse(
                format!(
                    "{} is the replica of another store ({}), not of {store_id}",
                    r.root.display(),
                    r.cfg.source.as_deref().unwrap_or("?")
                ),
                false,
            );
        }
        if r.cfg.block_size != bs {
            return refuse(
                format!(
                    "replica block size {} is not the store's {bs}",
                    r.cfg.block_size
                ),
                false,
            );
        }
        if init && r.cfg.keep.as_deref() != Some(keep) {
            let mut cfg = r.cfg.clone();
            cfg.keep = Some(keep.to_string());
            r.sd.write_config(&cfg)?;
            return Replica::open(self.root);
        }
        Ok(r)
    }

    fn replica(&self) -> Result<&Replica> {
        match &self.replica {
            Some(r) => Ok(r),
            None => refuse("no replica", true),
        }
    }

    fn incoming(&mut self) -> Result<&mut Incoming> {
        match &mut self.inc {
            Some(i) => Ok(i),
            None => refuse("data before a cycle began", true),
        }
    }

    fn begin(&mut self, generation: u64, base: Option<u64>, resync: bool) -> Result<()> {
        let r = self.replica()?;
        let latest = r.latest()?.map(|p| p.generation);
        if base != latest && !resync {
            return refuse(
                format!(
                    "the replica's latest point is generation {} but the cycle builds on {}: the copies have diverged; resync with `drfs ship --resync`",
                    latest.map_or("none".into(), |g| g.to_string()),
                    base.map_or("none".into(), |g| g.to_string())
                ),
                false,
            );
        }
        if generation <= latest.unwrap_or(0) {
            return refuse(
                format!("generation {generation} is not newer than the replica's"),
                false,
            );
        }
        let dir = r.sd.path("incoming");
        let inc = Incoming::begin(&dir, generation, latest, r.cfg.block_size)?;
        self.inc = Some(inc);
        Ok(())
    }

    /// Answers a hash request: staged blocks first, then the latest file (or, before a
    /// first point, a file at the same path to seed from).
    fn hashes(&mut self, id: FileId, path: &RelPath, first: u64, count: u64) -> Result<()> {
        if count > MAX_HASH_BLOCKS || first.saturating_add(count) > MAX_FILE {
            return refuse("hash request too large", true);
        }
        validate(path).map_err(Error::operator)?;
        let bs = self.replica()?.cfg.block_size;
        let file = self.latest_file(id, path)?;
        let size = file
            .as_ref()
            .and_then(|f| f.metadata().ok())
            .map_or(0, |m| m.len());
        let mut holes = file.as_ref().map(sys::Holes::new);
        let mut out = Vec::with_capacity(count as usize);
        let mut buf = vec![0u8; bs as usize];
        for b in first..first + count {
            if let Some(h) = self.incoming()?.rehash(id, b)? {
                out.push(h);
                continue;
            }
            out.push(match (&file, &mut holes) {
                (Some(f), Some(h)) => hash_block(f, h, size, b, bs, &mut buf)?,
                _ => BlockHash::Absent,
            });
        }
        self.w.hashes(&Hashes {
            id,
            first,
            hashes: out,
        })?;
        Ok(())
    }

    fn latest_file(&self, id: FileId, path: &RelPath) -> Result<Option<File>> {
        let r = self.replica()?;
        let at = match r.latest()? {
            Some(p) => r
                .manifest(&p.id)?
                .entries
                .into_iter()
                .find(|e| e.id == Some(id))
                .map(|e| e.path),
            None => Some(path.clone()),
        };
        Ok(at.and_then(|p| r.tree.open_file(&p, libc::O_RDONLY, 0).ok()))
    }

    fn commit(&mut self, manifest: Manifest) -> Result<()> {
        let generation = self.incoming()?.generation;
        let bs = self.replica()?.cfg.block_size;
        check_manifest(&manifest, generation, bs)
            .map_err(|e| Error::operator(format!("refusing the cycle's manifest: {e}")))?;
        let mut inc = match self.inc.take() {
            Some(i) => i,
            None => return refuse("commit without a cycle", true),
        };
        let r = self.replica()?;
        let point = apply::commit(r, &mut inc, manifest)?;
        if let Err(e) = r.prune(sys::now_ns() as i64) {
            tracing::warn!("retention: {e}");
        }
        self.w.msg(&Msg::Done {
            point: point.to_ref(),
            bytes: point.bytes_changed,
        })?;
        Ok(())
    }
}

/// The BLAKE3 of block `b` of `f` (holes and zero blocks as `Zero`, beyond the end `Absent`).
fn hash_block(
    f: &File,
    holes: &mut sys::Holes<'_>,
    size: u64,
    b: u64,
    bs: u64,
    buf: &mut [u8],
) -> Result<BlockHash> {
    let off = b * bs;
    if off >= size {
        return Ok(BlockHash::Absent);
    }
    let n = ((size - off).min(bs)) as usize;
    if holes.hole(off, n as u64) {
        return Ok(BlockHash::Zero);
    }
    let got = sys::read_full(f, &mut buf[..n], off).map_err(|e| Error::Io {
        path: "replica file".into(),
        source: e,
    })?;
    buf[got..n].fill(0);
    if buf[..n].iter().all(|&x| x == 0) {
        return Ok(BlockHash::Zero);
    }
    Ok(BlockHash::Data(*blake3::hash(&buf[..n]).as_bytes()))
}

/// A manifest from the stream must describe a sane tree before anything is applied.
pub fn check_manifest(m: &Manifest, generation: u64, bs: u64) -> std::result::Result<(), String> {
    if m.generation != generation {
        return Err(format!(
            "generation {} in a cycle of {generation}",
            m.generation
        ));
    }
    if m.block_size != bs {
        return Err(format!("block size {}", m.block_size));
    }
    if m.entries.len() > MAX_ENTRIES {
        return Err(format!("{} entries", m.entries.len()));
    }
    let mut paths = BTreeSet::new();
    let dirs: BTreeSet<&RelPath> = m
        .entries
        .iter()
        .filter(|e| e.kind == Kind::Dir)
        .map(|e| &e.path)
        .collect();
    for e in &m.entries {
        validate(&e.path)?;
        if !paths.insert(&e.path) {
            return Err(format!("{} appears twice", e.path));
        }
        let b = e.path.as_bytes();
        if let Some(slash) = b.iter().rposition(|&c| c == b'/') {
            if !dirs.contains(&RelPath::from_bytes(&b[..slash])) {
                return Err(format!(
                    "{} has no parent directory in the manifest",
                    e.path
                ));
            }
        }
        match e.kind {
            Kind::File if e.id.is_none() => return Err(format!("file {} has no id", e.path)),
            Kind::File if e.size > MAX_FILE => {
                return Err(format!("file {} of {} bytes", e.path, e.size));
            }
            Kind::Symlink => {
                let t = e
                    .target
                    .as_ref()
                    .ok_or_else(|| format!("symlink {} has no target", e.path))?;
                if t.as_bytes().is_empty() || t.as_bytes().len() > 4096 || t.as_bytes().contains(&0)
                {
                    return Err(format!("symlink {} has a bad target", e.path));
                }
            }
            _ => {}
        }
    }
    Ok(())
}
