//! `drfs receive REPLICA`: the receiving end of the stream protocol, over stdin/stdout,
//! for any `ReplicaStore`. It binds the replica to a store (an empty directory on `drfs
//! protect`), refuses a cycle whose base is not its latest point (a diverged copy),
//! answers hash requests for resyncs, stages and verifies blocks, and commits a cycle as
//! a point. A planned failover's session (a hello with `planned`) may instead promote the
//! replica (through the layer that owns roles: `Promoter`) and read its hash index.
//! Every byte is hostile: paths, sizes and counts are checked before they reach
//! the store. Refusals go back to the sender with their class (retry or not).

use std::collections::BTreeSet;
use std::fs::File;
use std::io::{BufReader, BufWriter, Read, Write};
use std::path::Path;

use crate::error::{At, Class, Error, Result};
use crate::model::{FileId, Kind, Manifest, PointRef, RelPath};
use crate::replica::posix::incoming::MAX_FILE;
use crate::replica::posix::store::Receiving;
use crate::replica::posix::tree::validate;
use crate::replica::{Binding, ReplicaStore};
use crate::wire::compress::{self, Compress};
use crate::wire::pipe::Prefetch;
use crate::wire::{Frame, Hashes, Msg, Reader, Reverse, WireError, Writer, greeting};

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
    crate::sys::flock(&dir, libc::LOCK_EX).at(root)?;
    Ok(dir)
}

/// A planned failover's promotion of the replica at a path, for the store with an id, at
/// a point, replicating back as `Reverse` says: done above this layer (`ops::failover`
/// owns roles), with the receive lock held. Returns the point and its manifest.
pub type Promoter<'a> = &'a dyn Fn(&Path, &str, &str, &Reverse) -> Result<(PointRef, Manifest)>;

/// A reprotect's demotion of the primary at a path (the store with the id a failover
/// replaced) into a replica of the store with the other id, keeping what it holds as a
/// `diverged` point: done above this layer (`ops::reprotect`), with the receive lock held.
pub type Demoter<'a> = &'a dyn Fn(&Path, &str, &str) -> Result<()>;

/// What a receiver may be asked to do to roles, done by the layer that owns them.
pub struct Roles<'a> {
    pub promote: Promoter<'a>,
    pub demote: Demoter<'a>,
}

/// Serves one sender for the POSIX replica at `root` until it says goodbye. An error is
/// also sent to the sender. Without `roles`, a planned failover and a reprotect are
/// refused.
pub fn serve(
    root: &Path,
    input: impl Read + Send + 'static,
    output: impl Write,
    roles: Option<&Roles<'_>>,
) -> Result<()> {
    let _lock = lock(root);
    let bind = |b: &Binding<'_>| {
        if let Some(old) = b.reprotect {
            let Some(r) = roles else {
                return refuse("this receiver cannot be reprotected", false);
            };
            (r.demote)(root, old, b.store_id)?;
        }
        Receiving::bind(root, b)
    };
    serve_store(bind, input, output, roles.map(|r| r.promote))
}

/// What binds a stream to its store.
pub trait Bind<S>: FnOnce(&Binding<'_>) -> Result<S> {}
impl<S, F: FnOnce(&Binding<'_>) -> Result<S>> Bind<S> for F {}

/// Serves one sender for the store `bind` opens, until it says goodbye. The stream is
/// read (and decompressed) ahead by a thread of its own (`wire::pipe::Prefetch`) while
/// this one verifies and stages.
pub fn serve_store<S: ReplicaStore>(
    bind: impl Bind<S>,
    input: impl Read + Send + 'static,
    output: impl Write,
    promoter: Option<Promoter<'_>>,
) -> Result<()> {
    let mut out = BufWriter::with_capacity(1 << 20, output);
    greeting::announce(&mut out)?;
    let mut input = BufReader::with_capacity(1 << 20, input);
    let (w, r) = match greeting::chosen(&mut input).and_then(|(v, codec)| {
        let input: Box<dyn Read + Send> = if codec == Compress::Zstd(0).code() {
            compress::decoder(input)?
        } else {
            Box::new(input)
        };
        Ok((v, Prefetch::new(input)?))
    }) {
        Ok((v, input)) => (Writer::at(out, v), Reader::at(input, v)),
        Err(e) => {
            let mut w = Writer::at(out, crate::wire::MIN_VERSION);
            let _ = w.msg(&Msg::Error {
                message: e.to_string(),
                recoverable: !matches!(e, WireError::Version(_)),
            });
            return Err(match e {
                WireError::Version(v) => Error::operator(v),
                e => e.into(),
            });
        }
    };
    let mut s = Session {
        w,
        r,
        generation: None,
        planned: None,
        promoter,
    };
    let result = s.run(bind);
    if let Err(e) = &result {
        let _ = s.w.msg(&Msg::Error {
            message: e.to_string(),
            recoverable: e.recoverable(),
        });
    }
    result
}

struct Session<'p, R: Read, W: Write> {
    w: Writer<W>,
    r: Reader<R>,
    /// The cycle being received, once begun.
    generation: Option<u64>,
    /// A planned failover's session: the store that asked. It ships no cycle.
    planned: Option<String>,
    promoter: Option<Promoter<'p>>,
}

impl<R: Read, W: Write> Session<'_, R, W> {
    fn run<S: ReplicaStore>(&mut self, bind: impl Bind<S>) -> Result<()> {
        let Msg::Hello {
            store_id,
            block_size,
            init,
            keep,
            seed,
            planned,
            reprotect,
        } = self.r.msg()?
        else {
            return refuse("the stream did not start with a hello", true);
        };
        if !block_size.is_power_of_two() || !(4096..=16 << 20).contains(&block_size) {
            return refuse(format!("block size {block_size}"), false);
        }
        let mut store = bind(&Binding {
            store_id: &store_id,
            block_size,
            init,
            keep: &keep,
            seed,
            planned,
            reprotect: reprotect.as_deref(),
        })?;
        check_binding(&store, &store_id, block_size)?;
        let latest = store.latest()?;
        self.w.msg(&Msg::Welcome {
            replica_id: store.id().to_string(),
            source: store.source().map(str::to_string),
            latest: latest.map(|p| p.to_ref()),
            promoted: store.promoted().map(str::to_string),
        })?;
        if planned {
            self.planned = Some(store_id);
        }
        loop {
            match self.r.read_frame()? {
                Frame::Msg(Msg::Bye) => return Ok(()),
                Frame::Msg(Msg::Begin {
                    generation,
                    base,
                    resync,
                    ..
                }) => self.begin(&mut store, generation, base, resync)?,
                Frame::Block(b) => {
                    self.begun()?;
                    store.stage(&b)?
                }
                Frame::Partial(p) => {
                    self.begun()?;
                    store.stage_partial(&p)?
                }
                Frame::Msg(Msg::HashRequest {
                    id,
                    path,
                    first,
                    count,
                }) => self.hashes(&mut store, id, &path, first, count)?,
                Frame::Msg(Msg::Commit { manifest }) => self.commit(&mut store, *manifest)?,
                Frame::Msg(Msg::Promote { point, reverse }) => {
                    self.promote(&store, &point, &reverse)?
                }
                Frame::Msg(Msg::IndexRequest { id, first, count }) => {
                    self.index(&mut store, id, first, count)?
                }
                Frame::Msg(m) => return refuse(format!("unexpected message {m:?}"), true),
                Frame::Hashes(_) => return refuse("unexpected hashes from the sender", true),
            }
        }
    }

    fn begun(&self) -> Result<u64> {
        self.generation
            .ok_or_else(|| Error::transient("data before a cycle began"))
    }

    fn begin<S: ReplicaStore>(
        &mut self,
        store: &mut S,
        generation: u64,
        base: Option<u64>,
        resync: bool,
    ) -> Result<()> {
        if self.planned.is_some() {
            return refuse("a planned failover's session ships no cycle", false);
        }
        let latest = store.latest()?.map(|p| p.generation);
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
        store.begin(generation, latest)?;
        self.generation = Some(generation);
        Ok(())
    }

    /// Answers a hash request: staged blocks first, then the latest file (or, before a
    /// first point, a file at the same path to seed from).
    fn hashes<S: ReplicaStore>(
        &mut self,
        store: &mut S,
        id: FileId,
        path: &RelPath,
        first: u64,
        count: u64,
    ) -> Result<()> {
        if count > MAX_HASH_BLOCKS || first.saturating_add(count) > MAX_FILE {
            return refuse("hash request too large", true);
        }
        validate(path).map_err(Error::operator)?;
        self.begun()?;
        let hashes = store.hashes(id, path, first, count)?;
        self.w.hashes(&Hashes { id, first, hashes })?;
        Ok(())
    }

    /// The store that asked for a planned failover, and what promotes this replica.
    fn planned(&self) -> Result<(&str, Promoter<'_>)> {
        let Some(from) = self.planned.as_deref() else {
            return refuse(
                "only a planned failover's session may promote the replica",
                false,
            );
        };
        let Some(p) = self.promoter else {
            return refuse("this receiver cannot promote its replica", false);
        };
        Ok((from, p))
    }

    /// Promotes the replica at `point` (or finds it promoted there by this sender).
    fn promote<S: ReplicaStore>(
        &mut self,
        store: &S,
        point: &str,
        reverse: &Reverse,
    ) -> Result<()> {
        let (from, promote) = self.planned()?;
        let (point, manifest) = promote(store.location(), from, point, reverse)?;
        self.w.msg(&Msg::Promoted {
            point,
            manifest: Box::new(manifest),
        })?;
        Ok(())
    }

    /// Answers an index request from the latest point's hash index.
    fn index<S: ReplicaStore>(
        &mut self,
        store: &mut S,
        id: FileId,
        first: u64,
        count: u64,
    ) -> Result<()> {
        self.planned()?;
        if count > MAX_HASH_BLOCKS || first.saturating_add(count) > MAX_FILE {
            return refuse("index request too large", true);
        }
        let hashes = store.index(id, first, count)?;
        self.w.hashes(&Hashes { id, first, hashes })?;
        Ok(())
    }

    fn commit<S: ReplicaStore>(&mut self, store: &mut S, manifest: Manifest) -> Result<()> {
        let generation = self.begun()?;
        check_manifest(&manifest, generation, store.block_size())
            .map_err(|e| Error::operator(format!("refusing the cycle's manifest: {e}")))?;
        let point = store.commit(manifest)?;
        self.generation = None;
        self.w.msg(&Msg::Done {
            point: point.to_ref(),
            bytes: point.bytes_changed,
        })?;
        Ok(())
    }
}

/// A stream may write only to a replica of its own store, at its block size.
fn check_binding<S: ReplicaStore>(store: &S, store_id: &str, bs: u64) -> Result<()> {
    if store.source() != Some(store_id) {
        return refuse(
            format!(
                "{} is the replica of another store ({}), not of {store_id}",
                store.location().display(),
                store.source().unwrap_or("?")
            ),
            false,
        );
    }
    if store.block_size() != bs {
        return refuse(
            format!(
                "replica block size {} is not the store's {bs}",
                store.block_size()
            ),
            false,
        );
    }
    Ok(())
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
