//! Extended replication (A → B → C): a replica ships its applied points onward, on its
//! own schedule (`drfs ship REPLICA`, from cron or a systemd timer). Each cycle sends B's
//! latest point to C as it is — the same generation, cut id, time and manifest — so every
//! point of C is a point of B, byte-identical, and only the blocks that changed between
//! the point C holds and this one travel (`source::PointSource`).
//!
//! `REPLICA/.drfs/relay.json` (format v1) keeps the point C last received: B's retention
//! never drops it (it is the base of C's next cycle: chained syncoid breaks exactly
//! there, sanoid#674), and while a cycle runs both its base and the point it sends are
//! pinned.

use std::time::Instant;

use serde::{Deserialize, Serialize};

use crate::error::{At, Error, Result};
use crate::model::PointInfo;
use crate::replica::posix::Replica;
use crate::replica::posix::source::PointSource;
use crate::ship::session::{self, Cycle, Hello};
use crate::sys;
use crate::transport;

pub const VERSION: u32 = 1;

/// What the onward replica holds, and the last onward cycle.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct RelayState {
    pub version: u32,
    /// The onward replica's id.
    pub replica_id: Option<String>,
    /// The point of this replica it last received (retention keeps it).
    pub point: Option<String>,
    pub generation: Option<u64>,
    pub last: Option<LastRelay>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct LastRelay {
    pub time: String,
    pub ok: bool,
    pub duration_ms: u64,
    pub bytes: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// What an onward cycle did.
#[derive(Debug, Clone)]
pub struct Relayed {
    /// The point sent (None: the onward replica already had the latest).
    pub point: Option<String>,
    pub bytes: u64,
    pub duration_ms: u64,
}

impl RelayState {
    pub fn load(r: &Replica) -> Result<RelayState> {
        let p = r.sd.path("relay.json");
        match std::fs::read(&p) {
            Ok(b) => serde_json::from_slice(&b).map_err(|e| Error::corrupt(&p, e.to_string())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(RelayState {
                version: VERSION,
                ..Default::default()
            }),
            Err(e) => Err(e).at(&p),
        }
    }

    fn save(&self, r: &Replica) -> Result<()> {
        let p = r.sd.path("relay.json");
        let b = serde_json::to_vec_pretty(self).map_err(Error::encode)?;
        sys::write_atomic(&p, &b).at(&p)
    }
}

/// The point retention must keep for the onward replica, if any.
pub fn pinned(r: &Replica) -> Option<String> {
    RelayState::load(r).ok().and_then(|s| s.point)
}

/// One onward cycle of `r` to the target its `[replication]` names; `resync`: compare
/// every block when the onward replica holds no point of this one.
pub fn ship(r: &Replica, resync: bool) -> Result<Relayed> {
    let t0 = Instant::now();
    let mut st = RelayState::load(r)?;
    let result = onward(r, &mut st, resync);
    let duration_ms = t0.elapsed().as_millis() as u64;
    st.version = VERSION;
    st.last = Some(LastRelay {
        time: crate::model::fmt::rfc3339_now(),
        ok: result.is_ok(),
        duration_ms,
        bytes: result.as_ref().map_or(0, |x| x.1),
        error: result.as_ref().err().map(|e| e.to_string()),
    });
    st.save(r)?;
    let (point, bytes) = result?;
    Ok(Relayed {
        point,
        bytes,
        duration_ms,
    })
}

fn onward(r: &Replica, st: &mut RelayState, resync: bool) -> Result<(Option<String>, u64)> {
    let rep = r.cfg.replication.clone().ok_or_else(|| {
        Error::operator(format!(
            "{} is not protected onward: `drfs protect {} --to THIRD` first",
            r.root.display(),
            r.root.display()
        ))
    })?;
    let _lock = lock(r)?;
    let latest = r
        .latest()?
        .ok_or_else(|| Error::transient(format!("{} has no point yet", r.root.display())))?;
    let _pin_to = r.pin(&latest.id)?;
    let mut link = transport::connect(&rep.target, &transport::Options::of(&rep))?;
    let hello = Hello {
        store_id: &r.cfg.store_id,
        block_size: r.cfg.block_size,
        keep: &rep.keep,
        seed: false,
    };
    let out = (|| {
        let w = session::hello(&mut link.w, &mut link.r, &hello, false)?;
        if w.source.as_deref() != Some(r.cfg.store_id.as_str()) || w.replica_id != rep.replica_id {
            return Err(crate::ship::refused(
                format!(
                    "{} is not the replica this one was protected onward with",
                    rep.target
                ),
                false,
            ));
        }
        if w.latest.as_ref().is_some_and(|l| l.cut_id == latest.cut_id) {
            return Ok((None, 0, w.latest.map(|l| (l.id, l.generation))));
        }
        let from = base(r, w.latest.as_ref(), resync)?;
        let _pin_from = from.as_ref().map(|f| r.pin(&f.id)).transpose()?;
        let source = PointSource::new(r, from.as_ref(), &latest)?;
        let c = Cycle {
            generation: latest.generation,
            base: w.latest.as_ref().map(|l| l.generation),
            cut_id: &latest.cut_id,
            resync: from.is_none(),
            resume: false,
        };
        let m = r.manifest(&latest.id)?;
        let (point, stats) = session::send(&mut link.w, &mut link.r, &c, &source, m, None)?;
        Ok((
            Some(point.id.clone()),
            stats.data_bytes,
            Some((point.id, point.generation)),
        ))
    })();
    match out {
        Ok((sent, bytes, held)) => {
            session::bye(link);
            st.replica_id = Some(rep.replica_id.clone());
            if let Some((id, generation)) = held {
                st.point = Some(id);
                st.generation = Some(generation);
            }
            Ok((sent, bytes))
        }
        Err(e) => Err(link.fail(e)),
    }
}

/// The point of ours the onward replica holds (it must still be here), or None for a
/// first cycle or a resync.
fn base(
    r: &Replica,
    theirs: Option<&crate::model::PointRef>,
    resync: bool,
) -> Result<Option<PointInfo>> {
    let Some(t) = theirs else { return Ok(None) };
    let ours = r
        .points()?
        .into_iter()
        .find(|p| p.cut_id == t.cut_id && p.generation == t.generation);
    match ours {
        Some(p) => Ok(Some(p)),
        None if resync => Ok(None),
        None => Err(Error::operator(format!(
            "the onward replica's latest point {} is not a point of {} (any more): `drfs ship {} --resync` compares every block",
            t.id,
            r.root.display(),
            r.root.display()
        ))),
    }
}

/// One onward cycle at a time.
fn lock(r: &Replica) -> Result<std::fs::File> {
    let p = r.sd.path("relay.lock");
    let f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&p)
        .at(&p)?;
    sys::flock(&f, libc::LOCK_EX).at(&p)?;
    Ok(f)
}
