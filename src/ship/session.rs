//! The protocol around a cycle's data, the same for every source: `hello` (who ships, and
//! what the replica holds: its id, whose replica it is, its latest point), `send` (begin a
//! cycle on a base generation, the source's blocks, commit the manifest, the point it
//! became), `bind` (protect: make an empty directory this store's replica), `bye`; and a
//! planned failover's session (`planned`: `promote`, `index`). The receiver's refusals
//! come back as errors of their class.

use std::io::{Read, Write};
use std::sync::Arc;

use crate::error::{Error, Result};
use crate::model::progress::Progress;
use crate::model::{FileId, Manifest, PointRef, Target};
use crate::ship::sender::{Shipper, Stats, planned};
use crate::ship::{Source, refused, wire_err};
use crate::transport::{self, Link};
use crate::wire::{BlockHash, Frame, Hashes, Msg, Reader, Reverse, Writer};

/// Who ships.
pub struct Hello<'a> {
    pub store_id: &'a str,
    pub block_size: u64,
    /// The retention policy the replica is to apply.
    pub keep: &'a str,
    /// Binding: a directory that holds files may become the replica (they seed it).
    pub seed: bool,
}

/// What the replica says it is.
#[derive(Debug, Clone)]
pub struct Welcome {
    pub replica_id: String,
    /// The store it replicates.
    pub source: Option<String>,
    pub latest: Option<PointRef>,
    /// The point a planned failover of this store promoted it at.
    pub promoted: Option<String>,
}

/// A cycle: the generation it makes, the one it builds on.
pub struct Cycle<'a> {
    pub generation: u64,
    pub base: Option<u64>,
    pub cut_id: &'a str,
    /// Accept whatever the replica's latest is as the base (every file is `whole`).
    pub resync: bool,
    /// An earlier attempt of this generation broke off: what the receiver staged then is
    /// asked for by hash, not sent again.
    pub resume: bool,
}

fn unexpected(what: &str, m: &Msg) -> Error {
    Error::Link(format!("unexpected answer {what}: {m:?}"))
}

/// Greets the receiver (`init`: binding a new replica) and returns what it holds.
pub fn hello<W: Write, R: Read>(
    w: &mut Writer<W>,
    r: &mut Reader<R>,
    h: &Hello<'_>,
    init: bool,
) -> Result<Welcome> {
    greet(w, r, h, init, Special::None)
}

/// A session that ships no cycle, or a hello that changes the receiver's role first.
enum Special<'a> {
    None,
    Planned,
    Reprotect(&'a str),
}

fn greet<W: Write, R: Read>(
    w: &mut Writer<W>,
    r: &mut Reader<R>,
    h: &Hello<'_>,
    init: bool,
    special: Special<'_>,
) -> Result<Welcome> {
    w.msg(&Msg::Hello {
        store_id: h.store_id.to_string(),
        block_size: h.block_size,
        init,
        keep: h.keep.to_string(),
        seed: h.seed,
        planned: matches!(special, Special::Planned),
        reprotect: match special {
            Special::Reprotect(old) => Some(old.to_string()),
            _ => None,
        },
    })
    .map_err(wire_err)?;
    match r.msg().map_err(wire_err)? {
        Msg::Welcome {
            replica_id,
            source,
            latest,
            promoted,
        } => Ok(Welcome {
            replica_id,
            source,
            latest,
            promoted,
        }),
        Msg::Error {
            message,
            recoverable,
        } => Err(refused(message, recoverable)),
        m => Err(unexpected("from the replica", &m)),
    }
}

/// Says goodbye and waits for the receiver to end.
pub fn bye(mut link: Link) {
    let _ = link.w.msg(&Msg::Bye);
    link.finish();
}

/// Ships one cycle of `source` and commits it as a point described by `manifest`. A
/// receiver that refuses says why and hangs up: when it stops reading, its last message
/// is the error.
pub fn send<W: Write, R: Read>(
    w: &mut Writer<W>,
    r: &mut Reader<R>,
    c: &Cycle<'_>,
    source: &dyn Source,
    manifest: Manifest,
    progress: Option<Arc<dyn Progress>>,
) -> Result<(PointRef, Stats)> {
    match send_cycle(w, r, c, source, manifest, progress) {
        Err(Error::Hangup(why)) => match r.msg() {
            Ok(Msg::Error {
                message,
                recoverable,
            }) => Err(refused(message, recoverable)),
            _ => Err(Error::Hangup(why)),
        },
        other => other,
    }
}

fn send_cycle<W: Write, R: Read>(
    w: &mut Writer<W>,
    r: &mut Reader<R>,
    c: &Cycle<'_>,
    source: &dyn Source,
    manifest: Manifest,
    progress: Option<Arc<dyn Progress>>,
) -> Result<(PointRef, Stats)> {
    let bs = manifest.block_size;
    let start = std::time::Instant::now();
    w.msg(&Msg::Begin {
        generation: c.generation,
        base: c.base,
        cut_id: c.cut_id.to_string(),
        resync: c.resync,
    })
    .map_err(wire_err)?;
    let files = source.files();
    if let Some(p) = &progress {
        p.total(files.iter().map(|f| planned(*f, bs)).sum());
    }
    let mut sh = Shipper::new(w, r, bs, progress.clone());
    sh.resume = c.resume;
    for f in files {
        sh.file(f)?;
    }
    let stats = sh.stats;
    if let Some(p) = &progress {
        p.done();
    }
    w.msg(&Msg::Commit {
        manifest: Box::new(manifest),
    })
    .map_err(wire_err)?;
    let sent = start.elapsed();
    match r.msg().map_err(wire_err)? {
        Msg::Done { point, .. } => {
            tracing::info!(
                "cycle: {} blocks streamed in {:.2} s, applied by the replica in {:.2} s",
                stats.blocks,
                sent.as_secs_f64(),
                (start.elapsed() - sent).as_secs_f64()
            );
            Ok((point, stats))
        }
        Msg::Error {
            message,
            recoverable,
        } => Err(refused(message, recoverable)),
        m => Err(unexpected("to the commit", &m)),
    }
}

/// Binds the replica at `target` to the store `h` names (`drfs protect`); the replica's id.
pub fn bind(target: &Target, o: &transport::Options, h: &Hello<'_>) -> Result<String> {
    let mut link = transport::connect(target, o)?;
    match hello(&mut link.w, &mut link.r, h, true) {
        Ok(w) => {
            bye(link);
            Ok(w.replica_id)
        }
        Err(e) => Err(link.fail(e)),
    }
}

/// Opens a planned failover's session with the replica at `target`: no cycle, only
/// `promote` and `index`. Refused by a receiver too old for it.
pub fn planned_session(
    target: &Target,
    o: &transport::Options,
    h: &Hello<'_>,
) -> Result<(Link, Welcome)> {
    special_session(target, o, h, Special::Planned, "a planned failover")
}

/// Makes the old primary at `target` (the store with id `old`) this store's replica,
/// keeping what it holds as a `diverged` point there (a reprotect): what it holds then.
pub fn reprotect(
    target: &Target,
    o: &transport::Options,
    h: &Hello<'_>,
    old: &str,
) -> Result<Welcome> {
    let (link, w) = special_session(target, o, h, Special::Reprotect(old), "a reprotect")?;
    bye(link);
    Ok(w)
}

fn special_session(
    target: &Target,
    o: &transport::Options,
    h: &Hello<'_>,
    special: Special<'_>,
    what: &str,
) -> Result<(Link, Welcome)> {
    let mut link = transport::connect(target, o)?;
    if link.version() < crate::wire::FAILOVER_VERSION {
        let e = Error::operator(format!(
            "the receiver at {target} speaks protocol {}; {what} over the link needs {}: update drfs there",
            link.version(),
            crate::wire::FAILOVER_VERSION
        ));
        return Err(link.fail(e));
    }
    match greet(&mut link.w, &mut link.r, h, false, special) {
        Ok(w) => Ok((link, w)),
        Err(e) => Err(link.fail(e)),
    }
}

/// Promotes the replica of a planned session at `point`: the point and its manifest.
pub fn promote(link: &mut Link, point: &str, reverse: Reverse) -> Result<(PointRef, Manifest)> {
    link.w
        .msg(&Msg::Promote {
            point: point.to_string(),
            reverse: Box::new(reverse),
        })
        .map_err(wire_err)?;
    match link.r.msg().map_err(wire_err)? {
        Msg::Promoted { point, manifest } => Ok((point, *manifest)),
        Msg::Error {
            message,
            recoverable,
        } => Err(refused(message, recoverable)),
        m => Err(unexpected("to the promotion", &m)),
    }
}

/// The replica's kept BLAKE3 entries of file `id`'s blocks `0..blocks`, in requests of
/// up to 65 536 blocks.
pub fn index(link: &mut Link, id: FileId, blocks: u64) -> Result<Vec<BlockHash>> {
    const STEP: u64 = 1 << 16;
    let mut out = Vec::with_capacity(blocks.min(1 << 24) as usize);
    let mut first = 0;
    while first < blocks {
        let count = (blocks - first).min(STEP);
        link.w
            .msg(&Msg::IndexRequest { id, first, count })
            .map_err(wire_err)?;
        match link.r.read_frame().map_err(wire_err)? {
            Frame::Hashes(Hashes {
                id: got,
                first: at,
                hashes,
            }) if got == id && at == first && hashes.len() as u64 == count => out.extend(hashes),
            Frame::Msg(Msg::Error {
                message,
                recoverable,
            }) => return Err(refused(message, recoverable)),
            f => {
                return Err(Error::Link(format!(
                    "unexpected answer to an index request: {} (for file {id} at block {first})",
                    crate::wire::frame_name(&f)
                )));
            }
        }
        first += count;
    }
    Ok(out)
}
