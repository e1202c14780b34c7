//! The daemon's control socket: how `drfs ship`, `drfs status` and `drfs protect` reach a
//! mounted store's daemon. A Unix socket at `/run/drfs/<store id>.sock` (socket paths are
//! limited to 108 bytes, store paths are not); one JSON request line, one JSON reply line.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::error::{At, Error, Result};
use crate::model::Consistency;
use crate::primary::cycle::schedule::Scheduler;
use crate::primary::cycle::{CycleOpts, Outcome};

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
                let (sched, status, lock) = (sched.clone(), status.clone(), lock.clone());
                let _ = std::thread::Builder::new()
                    .name("control-req".into())
                    .spawn(move || {
                        if let Err(e) = answer(conn, &sched, &*status, &*lock) {
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
    status: &dyn Fn() -> serde_json::Value,
    lock: &dyn Fn(Option<String>) -> LockReply,
) -> std::io::Result<()> {
    let mut line = String::new();
    BufReader::new(&conn).read_line(&mut line)?;
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
        Err(e) => serde_json::json!({"error": e.to_string()}),
    };
    let mut w = &conn;
    writeln!(w, "{reply}")
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
