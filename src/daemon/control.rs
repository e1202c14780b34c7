//! The daemon's control socket: how `drfs ship`, `drfs status` and `drfs protect` reach a
//! mounted store's daemon. A Unix socket at `/run/drfs/<store id>.sock` (socket paths are
//! limited to 108 bytes, store paths are not); one JSON request line, one JSON reply line.
//! An `assess` request opens a session instead: after its reply, each `take` line gets
//! the blocks changed since the last one (`AssessTake`), until the client hangs up,
//! which ends the observer.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::error::{At, Error, Result};
use crate::model::{Consistency, FileId, RelPath};
use crate::primary::cycle::schedule::Scheduler;
use crate::primary::cycle::{CycleOpts, Outcome};
use crate::primary::track::Tracker;

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "snake_case")]
pub enum Request {
    Ship {
        resync: bool,
        consistency: Option<Consistency>,
    },
    Status,
    /// The settings changed: look again.
    Poke,
    /// The settings changed (`line` says how): log it, and look again.
    Note {
        line: String,
    },
    /// A planned failover to `replica` begins: turn the store read-only unless files
    /// are open for writing (the reply names them: `LockReply`).
    Lock {
        replica: String,
    },
    /// The planned failover failed before the switch: accept writes again.
    Unlock,
    /// Opens an assessment session (`drfs assess`) on this connection.
    Assess,
    /// In an assessment session: the blocks changed since the last take.
    Take,
}

/// The answer to a `take`: per file, the block runs `[first, end)` changed since the
/// last take, with the file's path in the store (none when it is gone).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AssessTake {
    pub files: Vec<Churn>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Churn {
    pub id: FileId,
    pub path: Option<RelPath>,
    pub runs: Vec<[u64; 2]>,
}

/// The answer to `Lock`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct LockReply {
    /// The store is read-only now.
    pub locked: bool,
    /// Files open for writing through the mount (then nothing was locked).
    #[serde(default)]
    pub open_writers: Vec<String>,
    #[serde(default)]
    pub error: Option<String>,
}

/// What the daemon does for a lock request: `Some(replica)` locks, `None` unlocks.
pub type LockFn = Arc<dyn Fn(Option<String>) -> LockReply + Send + Sync>;

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ShipReply {
    pub code: i32,
    pub message: String,
    pub point: Option<String>,
    pub bytes: u64,
    /// After compression (0 from a daemon older than it).
    #[serde(default)]
    pub wire_bytes: u64,
    pub pause_us: u64,
    pub duration_ms: u64,
}

impl From<&Outcome> for ShipReply {
    fn from(o: &Outcome) -> Self {
        ShipReply {
            code: o.code(),
            message: o.message.clone(),
            point: o.point.clone(),
            bytes: o.bytes,
            wire_bytes: o.wire_bytes,
            pause_us: o.pause_us,
            duration_ms: o.duration_ms,
        }
    }
}

pub fn socket_path(store_id: &str) -> PathBuf {
    let base = if unsafe { libc::geteuid() } == 0 {
        PathBuf::from("/run/drfs")
    } else {
        std::env::var_os("XDG_RUNTIME_DIR")
            .map(|d| PathBuf::from(d).join("drfs"))
            .unwrap_or_else(|| PathBuf::from(format!("/tmp/drfs-{}", unsafe { libc::geteuid() })))
    };
    base.join(format!("{store_id}.sock"))
}

/// Serves requests until the daemon ends; `status` builds the status reply.
pub fn serve(
    path: PathBuf,
    sched: Arc<Scheduler>,
    tracker: Arc<Tracker>,
    status: Arc<dyn Fn() -> serde_json::Value + Send + Sync>,
    lock: LockFn,
) -> Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).at(dir)?;
    }
    let _ = std::fs::remove_file(&path);
    let listener = UnixListener::bind(&path).at(&path)?;
    std::thread::Builder::new()
        .name("control".into())
        .spawn(move || {
            for conn in listener.incoming().flatten() {
                let (sched, status, t, lock) =
                    (sched.clone(), status.clone(), tracker.clone(), lock.clone());
                let _ = std::thread::Builder::new()
                    .name("control-req".into())
                    .spawn(move || {
                        if let Err(e) = answer(conn, &sched, &t, &*status, &*lock) {
                            tracing::warn!("control request: {e}");
                        }
                    });
            }
        })
        .at(&path)?;
    Ok(())
}

fn answer(
    conn: UnixStream,
    sched: &Scheduler,
    tracker: &Tracker,
    status: &dyn Fn() -> serde_json::Value,
    lock: &dyn Fn(Option<String>) -> LockReply,
) -> std::io::Result<()> {
    let mut line = String::new();
    let mut reader = BufReader::new(&conn);
    reader.read_line(&mut line)?;
    let reply = match serde_json::from_str::<Request>(&line) {
        Ok(Request::Ship {
            resync,
            consistency,
        }) => {
            let o = sched.ship_now(CycleOpts {
                resync,
                progress: None,
                consistency,
            });
            sched.poke();
            serde_json::to_value(ShipReply::from(&o)).unwrap_or_default()
        }
        Ok(Request::Status) => status(),
        Ok(Request::Poke) => {
            sched.poke();
            serde_json::json!({"ok": true})
        }
        Ok(Request::Note { line }) => {
            tracing::info!("{line}");
            sched.poke();
            serde_json::json!({"ok": true})
        }
        Ok(Request::Lock { replica }) => {
            serde_json::to_value(lock(Some(replica))).unwrap_or_default()
        }
        Ok(Request::Unlock) => serde_json::to_value(lock(None)).unwrap_or_default(),
        Ok(Request::Assess) => return assess(reader, &conn, tracker),
        Ok(Request::Take) => serde_json::json!({"error": "take outside an assessment"}),
        Err(e) => serde_json::json!({"error": e.to_string()}),
    };
    let mut w = &conn;
    writeln!(w, "{reply}")
}

/// An assessment session: the observer lives as long as the connection.
fn assess(
    mut reader: BufReader<&UnixStream>,
    conn: &UnixStream,
    tracker: &Tracker,
) -> std::io::Result<()> {
    let mut w = conn;
    let Some(observer) = tracker.observe() else {
        let e = "an assessment of this store is already running";
        return writeln!(w, "{}", serde_json::json!({ "error": e }));
    };
    tracing::info!("assessment started");
    let r = (|| {
        writeln!(w, "{}", serde_json::json!({"ok": true}))?;
        let mut line = String::new();
        loop {
            line.clear();
            if reader.read_line(&mut line)? == 0 {
                return Ok(());
            }
            let files = observer
                .take()
                .into_iter()
                .map(|(id, runs)| Churn {
                    id,
                    path: tracker.path_of(id),
                    runs: runs.into_iter().map(|(a, b)| [a, b]).collect(),
                })
                .collect();
            let body = serde_json::to_string(&AssessTake { files }).unwrap_or_default();
            writeln!(w, "{body}")?;
        }
    })();
    tracker.unobserve();
    tracing::info!("assessment ended");
    r
}

/// A session with the daemon of store `store_id` (an assessment): requests and replies
/// on one connection; None when no daemon answers.
pub struct Session {
    conn: UnixStream,
    reader: BufReader<UnixStream>,
}

impl Session {
    pub fn open(store_id: &str, req: &Request) -> Result<Option<(Session, serde_json::Value)>> {
        let path = socket_path(store_id);
        let Ok(conn) = UnixStream::connect(&path) else {
            return Ok(None);
        };
        let reader = BufReader::new(conn.try_clone().at(&path)?);
        let mut s = Session { conn, reader };
        let first = s.call(req)?;
        Ok(Some((s, first)))
    }

    pub fn call(&mut self, req: &Request) -> Result<serde_json::Value> {
        let body = serde_json::to_string(req).map_err(Error::encode)?;
        let gone = |e: std::io::Error| Error::Link(format!("the store's daemon: {e}"));
        self.conn
            .write_all(format!("{body}\n").as_bytes())
            .map_err(gone)?;
        let mut line = String::new();
        if self.reader.read_line(&mut line).map_err(gone)? == 0 {
            return Err(Error::Link(
                "the store's daemon hung up (unmounted?)".into(),
            ));
        }
        serde_json::from_str(&line).map_err(|e| Error::Invalid(format!("the daemon's answer: {e}")))
    }
}

/// Sends a request to the daemon of store `store_id`; None when no daemon answers.
pub fn call(store_id: &str, req: &Request) -> Result<Option<serde_json::Value>> {
    let path = socket_path(store_id);
    let conn = match UnixStream::connect(&path) {
        Ok(c) => c,
        Err(_) => return Ok(None),
    };
    let _ = conn.set_read_timeout(None::<Duration>);
    let body = serde_json::to_string(req).map_err(Error::encode)?;
    (&conn)
        .write_all(format!("{body}\n").as_bytes())
        .at(&path)?;
    let mut line = String::new();
    BufReader::new(&conn).read_line(&mut line).at(&path)?;
    serde_json::from_str(&line)
        .map(Some)
        .map_err(|e| Error::Invalid(format!("the daemon's answer: {e}")))
}
