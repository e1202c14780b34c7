//! The CLI's replication commands: `protect`, `ship`, `receive`, `points`, `status`. They
//! reach a mounted store's daemon over its control socket and work on the store directly
//! when it is not mounted.

use std::fs::OpenOptions;
use std::os::fd::AsRawFd;
use std::path::Path;

use anyhow::{Context, Result, bail};

use crate::daemon::control::{self, Request, ShipReply};
use crate::obs::status;
use crate::primary::cycle::{self, CycleOpts};
use crate::primary::track::Tracker;
use crate::replica::posix::Replica;
use crate::state::StateDir;

fn store_dir(store: &Path) -> Result<(StateDir, crate::state::Config)> {
    let canon = store
        .canonicalize()
        .with_context(|| format!("store {}", store.display()))?;
    Ok(StateDir::open(&canon)?)
}

pub fn protect(store: &Path, to: &Path, interval: &str, keep: &str, group: &str) -> Result<()> {
    let rep = cycle::protect(store, to, interval, keep, group)?;
    let (_, cfg) = store_dir(store)?;
    let running = control::call(&cfg.store_id, &Request::Poke)?.is_some();
    println!(
        "{} replicates to {} every {} (keep {}, group {}){}",
        store.display(),
        rep.target,
        rep.interval,
        rep.keep,
        rep.group,
        if running {
            "; the mounted daemon starts now"
        } else {
            "; cycles run while it is mounted, or with `drfs ship`"
        }
    );
    Ok(())
}

fn report(r: &ShipReply) -> i32 {
    if r.code == 0 {
        println!(
            "{}: {} sent in {} ms, cut pause {} us",
            r.message,
            crate::model::fmt::human(r.bytes),
            r.duration_ms,
            r.pause_us
        );
    } else {
        let kind = if r.code == 1 {
            "will retry"
        } else {
            "needs an operator"
        };
        eprintln!("drfs: cycle failed ({kind}): {}", r.message);
    }
    r.code
}

/// `drfs ship`: one cycle, through the daemon if the store is mounted.
pub fn ship(store: &Path, resync: bool) -> Result<i32> {
    let (sd, cfg) = store_dir(store)?;
    if cfg.replication.is_none() {
        eprintln!(
            "drfs: {} is not protected: run `drfs protect {} --to REPLICA` first",
            sd.store().display(),
            sd.store().display()
        );
        return Ok(2);
    }
    let req = Request::Ship {
        resync,
        consistency: None,
    };
    if let Some(v) = control::call(&cfg.store_id, &req)? {
        let r: ShipReply = serde_json::from_value(v).context("the daemon's answer")?;
        return Ok(report(&r));
    }
    // Not mounted: ship directly, one `drfs ship` at a time.
    let lock_path = sd.path("ship.lock");
    let lock = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)
        .with_context(|| lock_path.display().to_string())?;
    if unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX) } != 0 {
        bail!("cannot lock {}", lock_path.display());
    }
    let _store_lock = match sd.lock() {
        Ok(l) => l,
        Err(e) => {
            eprintln!("drfs: {e}");
            return Ok(1);
        }
    };
    let tracker = Tracker::start(sd.clone(), cfg, Path::new("(drfs ship)"))?;
    let o = cycle::run(
        &tracker,
        CycleOpts {
            resync,
            progress: true,
            consistency: None,
        },
    );
    tracker.close()?;
    Ok(report(&ShipReply::from(&o)))
}

/// `drfs receive`: serves one stream; the exit code says whether the sender may retry.
pub fn receive(replica: &Path) -> i32 {
    // The receiver sets the modes of replicated files itself; its own state (undo
    // records, hashes, staging) is nobody else's business, whatever umask the caller
    // had (the mount daemon that spawns it runs with umask 0).
    unsafe { libc::umask(0o077) };
    let stdin = std::io::stdin().lock();
    let stdout = std::io::stdout().lock();
    match crate::replica::receive::serve(replica, stdin, stdout) {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("drfs receive: {}", e.message);
            if e.recoverable { 1 } else { 2 }
        }
    }
}

pub fn points(replica: &Path, json: bool) -> Result<()> {
    let r = Replica::open_only(replica)?;
    let mut points = r.points()?;
    points.reverse();
    if json {
        let v: Vec<serde_json::Value> = points
            .iter()
            .map(|p| {
                serde_json::json!({
                    "id": p.id, "time": p.time, "consistency": p.consistency,
                    "generation": p.generation, "files": p.files, "bytes_changed": p.bytes_changed,
                })
            })
            .collect();
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    println!(
        "{:<10} {:<26} {:<12} {:>6} {:>12}",
        "ID", "TIME (UTC)", "CONSISTENCY", "FILES", "CHANGED"
    );
    for p in &points {
        println!(
            "{:<10} {:<26} {:<12} {:>6} {:>12}",
            p.id,
            p.time,
            format!("{:?}", p.consistency).to_lowercase(),
            p.files,
            crate::model::fmt::human(p.bytes_changed)
        );
    }
    Ok(())
}

pub fn status(path: &Path, json: bool) -> Result<()> {
    let canon = path
        .canonicalize()
        .with_context(|| format!("{}", path.display()))?;
    if Replica::is_replica(&canon) {
        let s = status::replica(&Replica::open_only(&canon)?)?;
        if json {
            println!("{}", serde_json::to_string_pretty(&s)?);
        } else {
            print!("{}", status::render_replica(&s));
        }
        return Ok(());
    }
    let (sd, cfg) = StateDir::open(&canon)?;
    let v = match control::call(&cfg.store_id, &Request::Status)? {
        Some(v) => v,
        None => serde_json::to_value(status::store(&sd, None, false)?)?,
    };
    if json {
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        let s: serde_json::Value = v;
        print!("{}", render_value(&s));
    }
    Ok(())
}

/// Renders a status that may have come from the daemon as JSON.
fn render_value(v: &serde_json::Value) -> String {
    match serde_json::from_value::<status::StoreStatus>(v.clone()) {
        Ok(s) => status::render_store(&s),
        Err(_) => format!("{v:#}\n"),
    }
}

pub fn restore(
    replica: &Path,
    point: &str,
    path: Option<&str>,
    to: &Path,
    force: bool,
) -> Result<()> {
    let r = Replica::open_only(replica)?;
    let rel = match path {
        Some(p) => Some(
            crate::model::relpath::RelPath::parse(p.trim_matches('/'))
                .filter(|r| !r.is_root())
                .with_context(|| format!("bad --path {p:?}"))?,
        ),
        None => None,
    };
    let done = crate::points::restore::restore(
        &r,
        &crate::points::restore::RestoreOpts {
            point,
            path: rel.as_ref(),
            to,
            force,
            progress: true,
        },
    )?;
    println!(
        "restored point {point}: {} files, {} of data to {}",
        done.files,
        crate::model::fmt::human(done.bytes),
        to.display()
    );
    Ok(())
}

/// Checks that a mountpoint is usable and outside the replica.
fn outside(r: &Replica, p: &Path, what: &str) -> Result<std::path::PathBuf> {
    let mnt = crate::fuse::daemon::mountpoint(p)?;
    not_inside(r, &mnt, what)?;
    Ok(mnt)
}

/// Refuses an absolute path inside the replica.
fn not_inside(r: &Replica, abs: &Path, what: &str) -> Result<()> {
    if abs.starts_with(&r.root) {
        bail!(
            "{what} {} is inside the replica {}",
            abs.display(),
            r.root.display()
        );
    }
    Ok(())
}

pub fn browse(
    replica: &Path,
    mountpoint: &Path,
    allow_other: bool,
    foreground: bool,
) -> Result<()> {
    let r = Replica::open_only(replica)?;
    if foreground {
        let mnt = crate::fuse::daemon::absolute(mountpoint)?;
        return Ok(crate::mounts::browse::serve(
            &r.root,
            &mnt,
            allow_other,
            crate::fuse::daemon::Ready::from_env(),
        )?);
    }
    let mnt = outside(&r, mountpoint, "mountpoint")?;
    let mut args: Vec<std::ffi::OsString> = vec![
        "browse".into(),
        "--foreground".into(),
        r.root.clone().into(),
        mnt.into(),
    ];
    if allow_other {
        args.push("--allow-other".into());
    }
    Ok(crate::fuse::daemon::spawn(
        &args,
        &crate::mounts::browse::log_path(&r),
    )?)
}

pub fn test_failover(
    replica: &Path,
    point: Option<&str>,
    at: Option<&Path>,
    stop: bool,
    allow_other: bool,
    foreground: bool,
) -> Result<()> {
    let r = Replica::open_only(replica)?;
    if stop {
        let s = crate::mounts::test_failover::stop(&r)?;
        println!(
            "test failover of point {} at {} stopped and discarded",
            s.point,
            s.at.display()
        );
        return Ok(());
    }
    let (Some(point), Some(at)) = (point, at) else {
        bail!("--point and --at are needed (or --stop)");
    };
    if foreground {
        let at = crate::fuse::daemon::absolute(at)?;
        return Ok(crate::mounts::test_failover::serve(
            &r.root,
            point,
            &at,
            allow_other,
            crate::fuse::daemon::Ready::from_env(),
        )?);
    }
    // Check everything before making anything.
    crate::replica::posix::read::PointView::open(&r, point)?;
    // Before anything is created there (`outside` checks again once it exists).
    not_inside(&r, &crate::fuse::daemon::resolved(at)?, "--at")?;
    if let Some(s) = crate::mounts::test_failover::running(&r) {
        bail!(
            "a test failover of {} is already running at {} (point {}); stop it with `drfs test-failover {} --stop`",
            r.root.display(),
            s.at.display(),
            s.point,
            r.root.display()
        );
    }
    drop(crate::mounts::test_failover::lock(&r)?);
    if !at.exists() {
        std::fs::create_dir_all(at).with_context(|| at.display().to_string())?;
    }
    let at = outside(&r, at, "--at")?;
    let mut args: Vec<std::ffi::OsString> = vec![
        "test-failover".into(),
        "--foreground".into(),
        r.root.clone().into(),
        "--point".into(),
        point.into(),
        "--at".into(),
        at.clone().into(),
    ];
    if allow_other {
        args.push("--allow-other".into());
    }
    crate::fuse::daemon::spawn(&args, &crate::mounts::test_failover::log_path(&r))?;
    println!(
        "point {point} is at {} as a writable clone; `drfs test-failover {} --stop` discards it",
        at.display(),
        r.root.display()
    );
    Ok(())
}
