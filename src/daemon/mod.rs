//! The store daemon: the running side of `drfs mount`. It opens the store's tracking (a
//! run of `primary::track`), writes the heartbeat, mounts the tracked passthrough, runs
//! the replication schedule, and answers the control socket (`control`: ship now,
//! status, poke); once the filesystem is unmounted it stops the schedule and records a
//! clean stop. How it reports its status is given to it (`DaemonOpts::status`).

pub mod control;
pub mod http;

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use crate::error::{At, Result};
use crate::fuse::daemon::Ready;
use crate::fuse::serve::{Options, Starting};
use crate::primary::cycle::schedule::Scheduler;
use crate::primary::passthrough::fs::{self, DrFs, StoreIo};
use crate::primary::track::Tracker;
use crate::primary::track::run;
use crate::state::StateDir;

/// A store's status as the control socket answers it.
pub type StatusFn = Arc<dyn Fn(&StateDir, &Tracker) -> serde_json::Value + Send + Sync>;

/// How the daemon runs.
pub struct DaemonOpts {
    pub block_size: Option<u64>,
    pub threads: usize,
    pub allow_other: bool,
    /// Off for benchmarks only: changes go unrecorded.
    pub track: bool,
    pub status: StatusFn,
    /// Where to serve `GET /metrics` (none: nowhere).
    pub metrics_listen: Option<String>,
    /// How buffered clients reach the store.
    pub store_io: StoreIo,
    /// `fs.fuse.max_pages_limit` to raise to before mounting (0: leave it).
    pub max_pages: u32,
}

/// The store daemon's log.
pub fn log_path(sd: &StateDir) -> PathBuf {
    sd.path("daemon.log")
}

/// Serves store `store` at `mnt` in this process until it is unmounted.
pub fn serve(o: &DaemonOpts, store: &Path, mnt: &Path, ready: Ready) -> Result<()> {
    unsafe { libc::umask(0) };
    let mut start = Starting::new(ready);
    let sd = StateDir::new(store);
    let (tracker, lock) = start.check(track(o, store, mnt))?;
    let listener = match &o.metrics_listen {
        Some(a) => Some(start.check(http::bind(a))?),
        None => None,
    };
    let stop = Arc::new(AtomicBool::new(false));
    if tracker.is_some() {
        start.check(heartbeat(&sd, stop.clone()))?;
    }
    let drfs = DrFs::new(
        store.to_path_buf(),
        tracker.clone(),
        fs::Options {
            impersonate: unsafe { libc::geteuid() } == 0,
            store_io: o.store_io,
        },
    )
    .at(store);
    let drfs = start.check(drfs)?;
    let writers = Arc::new(drfs.open_writers());
    let opts = Options {
        fsname: format!(
            "{}{}",
            crate::fuse::mountinfo::SOURCE_PREFIX,
            store.display()
        ),
        read_only: false,
        allow_other: o.allow_other,
        threads: o.threads,
        max_pages: o.max_pages,
    };
    let served = start.mount(drfs, mnt, store, &opts)?;
    let mut watcher = None;
    let (sched, socket) = match &tracker {
        Some(t) => {
            let watch = health_watch(sd.clone(), t.clone());
            let w2 = watch.clone();
            let sched = Scheduler::start(t.clone(), Arc::new(move |_| w2()));
            watcher = start_watch(watch, stop.clone());
            if let Some(l) = listener {
                if let Err(e) = http::serve(l, routes(sd.clone(), t.clone())) {
                    tracing::error!("metrics listener: {e}");
                }
            }
            let path = control::socket_path(&t.config().store_id);
            let (t2, sd2, status) = (t.clone(), sd.clone(), o.status.clone());
            let answer = Arc::new(move || status(&sd2, &t2));
            let lock = lockdown(sd.clone(), t.clone(), writers);
            let serve = control::serve(path.clone(), sched.clone(), t.clone(), answer, lock);
            if let Err(e) = serve {
                tracing::error!("control socket: {e}");
            }
            (Some(sched), Some(path))
        }
        None => (None, None),
    };
    let r = served.serve(&format!("serving {} at {}", store.display(), mnt.display()));
    stop.store(true, Ordering::Release);
    if let Some(s) = &sched {
        s.stop();
    }
    // No look at the health after the tracking closes.
    if let Some(w) = watcher {
        let _ = w.join();
    }
    if let Some(p) = &socket {
        let _ = std::fs::remove_file(p);
    }
    if let Some(t) = &tracker {
        t.close()?;
        tracing::info!("unmounted cleanly");
    }
    drop(lock);
    r
}

/// The store's tracking for this run (and its lock), or just the lock when tracking is off.
fn track(o: &DaemonOpts, store: &Path, mnt: &Path) -> Result<(Option<Arc<Tracker>>, Option<File>)> {
    let sd = StateDir::new(store);
    if !o.track {
        let lock = if sd.exists() {
            Some(run::lock(&sd)?)
        } else {
            None
        };
        return Ok((None, lock));
    }
    let (sd, cfg) = StateDir::open_or_init(store, o.block_size)?;
    let lock = run::lock(&sd)?;
    crate::fuse::daemon::log_to(&log_path(&sd));
    let promoted = cfg.promoted.clone();
    let t = Tracker::start(sd.clone(), cfg, mnt)?;
    match promoted {
        Some(p) if !p.committed => {
            if let Err(e) = t.keep_history() {
                let _ = t.close();
                return Err(e);
            }
        }
        Some(_) => {
            // Committed: the point can no longer change, so its copies are done with.
            let h = crate::replica::posix::diverge::dir(&sd);
            if h.exists() {
                std::fs::remove_dir_all(&h).at(&h)?;
            }
        }
        None => {}
    }
    Ok((Some(Arc::new(t)), Some(lock)))
}

/// Locks the store for a planned failover (read-only through the mount, `[locked]` in
/// its state), unless files are open for writing; or unlocks it.
fn lockdown(
    sd: StateDir,
    t: Arc<Tracker>,
    writers: Arc<dyn Fn() -> Vec<String> + Send + Sync>,
) -> control::LockFn {
    Arc::new(move |replica: Option<String>| {
        let Some(replica) = replica else {
            t.unlock_writes();
            let error = sd.set_locked(None).err().map(|e| e.to_string());
            tracing::info!(
                "unlocked: the planned failover did not happen; writes are accepted again"
            );
            return control::LockReply {
                error,
                ..Default::default()
            };
        };
        let open_writers = t.lock_writes(&*writers);
        if !open_writers.is_empty() {
            return control::LockReply {
                open_writers,
                ..Default::default()
            };
        }
        if let Err(e) = sd.set_locked(Some(&replica)) {
            t.unlock_writes();
            return control::LockReply {
                error: Some(e.to_string()),
                ..Default::default()
            };
        }
        tracing::info!("locked for a planned failover to {replica}: the mount is read-only");
        control::LockReply {
            locked: true,
            ..Default::default()
        }
    })
}

/// What the HTTP listener serves: `/metrics` and the status page at `/`.
fn routes(sd: StateDir, t: Arc<Tracker>) -> http::Route {
    Arc::new(move |path| {
        let status = crate::obs::status::store(&sd, Some(&t), true);
        match path {
            "/metrics" => Some((
                crate::obs::metrics::CONTENT_TYPE,
                match status {
                    Ok(s) => crate::obs::metrics::of_store(&sd, &s),
                    Err(e) => format!("# drfs: {e}\n"),
                },
            )),
            "/" | "/index.html" => Some((
                "text/html; charset=utf-8",
                match status {
                    Ok(s) => crate::obs::page::of_store(&sd, &s),
                    Err(e) => format!("<!DOCTYPE html><p>drfs: {e}</p>\n"),
                },
            )),
            _ => None,
        }
    })
}

/// Looks at the store's health and records a change as an event.
/// One look at a time: a status taken before a cycle ended must not be recorded after
/// the one taken when it ended.
fn health_watch(sd: StateDir, t: Arc<Tracker>) -> Arc<dyn Fn() + Send + Sync> {
    let one = parking_lot::Mutex::new(());
    Arc::new(move || {
        let _one = one.lock();
        match crate::obs::status::store(&sd, Some(&t), true) {
            Ok(s) => crate::obs::watch::health(&sd, s.health, &s.reasons),
            Err(e) => tracing::warn!("health: {e}"),
        }
    })
}

/// How often the daemon looks at the health between cycles.
const WATCH_EVERY: std::time::Duration = std::time::Duration::from_secs(5);

fn start_watch(
    watch: Arc<dyn Fn() + Send + Sync>,
    stop: Arc<AtomicBool>,
) -> Option<std::thread::JoinHandle<()>> {
    let r = std::thread::Builder::new()
        .name("watch".into())
        .spawn(move || {
            let tick = std::time::Duration::from_millis(100);
            let mut waited = WATCH_EVERY;
            while !stop.load(Ordering::Acquire) {
                if waited >= WATCH_EVERY {
                    watch();
                    waited = std::time::Duration::ZERO;
                }
                std::thread::sleep(tick);
                waited += tick;
            }
        });
    r.map_err(|e| tracing::error!("cannot start the health watch: {e}"))
        .ok()
}

fn heartbeat(sd: &StateDir, stop: Arc<AtomicBool>) -> Result<()> {
    let f = run::open_heartbeat(sd)?;
    run::beat(&f);
    std::thread::Builder::new()
        .name("heartbeat".into())
        .spawn(move || {
            while !stop.load(Ordering::Acquire) {
                run::beat(&f);
                std::thread::sleep(run::HEARTBEAT);
            }
        })
        .at(Path::new("heartbeat thread"))?;
    Ok(())
}
