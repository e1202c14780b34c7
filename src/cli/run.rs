//! One function per command: it calls `ops` or the library and prints what happened.
//! Each returns the exit code it ends with (a failed cycle is not an error: its code is
//! its class's); errors go back to `cli::main`, which prints them and exits by class.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, Result};

use crate::cli::args::{Cli, Cmd};
use crate::cli::{progress, render};
use crate::error::Error;
use crate::ops;
use crate::ops::mount::MountOpts;
use crate::replica::posix::Replica;
use crate::state::StateDir;

/// The replica at `p`; a path that does not exist is a usage error here (the receiver,
/// which the sender retries, takes it for a disk that may come back).
fn replica_at(p: &Path) -> Result<Replica> {
    here(p)?;
    if std::fs::symlink_metadata(p).is_err() {
        return Err(Error::Invalid(format!("{}: no such file or directory", p.display())).into());
    }
    Ok(Replica::open_only(p)?)
}

/// A replica given as `ssh://host/path` is read where it is: this says where.
fn here(p: &Path) -> Result<()> {
    let s = p.to_string_lossy();
    if s.starts_with("ssh://") || s.starts_with("s3://") {
        let t: crate::model::Target = s.parse().map_err(Error::Invalid)?;
        if let Err(why) = t.local() {
            return Err(Error::Invalid(why).into());
        }
    }
    Ok(())
}

/// A store given by its mountpoint means the store behind it.
fn behind(p: &Path) -> PathBuf {
    crate::fuse::mountinfo::behind(p)
}

pub fn run(cli: Cli) -> Result<i32> {
    match cli.cmd {
        Cmd::Mount {
            store,
            mountpoint,
            block_size,
            threads,
            allow_other,
            foreground,
            no_track,
            metrics_listen,
            store_io,
            fuse_max_pages,
        } => mount(MountOpts {
            store,
            mountpoint,
            block_size,
            threads,
            allow_other,
            foreground,
            track: !no_track,
            metrics_listen,
            store_io,
            max_pages: fuse_max_pages,
        }),
        Cmd::Unmount { mountpoint, lazy } => {
            ops::mount::unmount(&mountpoint, lazy)?;
            Ok(0)
        }
        Cmd::Changes { store, path, json } => changes(&store, path, json),
        Cmd::Assess {
            store,
            for_,
            windows,
            compress,
            bwlimit,
            json,
        } => assess(&behind(&store), &for_, &windows, &compress, bwlimit, json),
        Cmd::Protect {
            store,
            to,
            interval,
            expect_every,
            keep,
            group,
            seed,
            rebind,
            ssh_command,
            compress,
            bwlimit,
            show,
            pre_cut,
            post_cut,
            app_consistent_every,
            hook_timeout,
            no_hooks,
        } => {
            let store = behind(&store);
            if show {
                return show_settings(&store);
            }
            let to = to.map(|t| t.to_string_lossy().into_owned());
            let p = ops::protect::Protect {
                to: to.as_deref(),
                interval: interval.as_deref(),
                expect_every: expect_every.as_deref(),
                keep: keep.as_deref(),
                group: group.as_deref(),
                seed,
                rebind,
                pre_cut: (!pre_cut.is_empty()).then_some(pre_cut.as_slice()),
                post_cut: (!post_cut.is_empty()).then_some(post_cut.as_slice()),
                app_consistent_every: app_consistent_every.as_deref(),
                hook_timeout: hook_timeout.as_deref(),
                no_hooks,
                ssh_command: ssh_command.as_deref(),
                compress: compress.as_deref(),
                bwlimit: bwlimit.as_deref(),
            };
            settings(&store, ops::protect::protect(&store, &p)?)
        }
        Cmd::Unprotect { store } => {
            let store = behind(&store);
            settings(&store, ops::protect::unprotect(&store)?)
        }
        Cmd::Pause { store, for_ } => {
            let store = behind(&store);
            let ns = match for_ {
                Some(d) => Some(
                    humantime::parse_duration(&d)
                        .map_err(|e| Error::Invalid(format!("--for {d:?}: {e}")))?
                        .as_nanos() as i64,
                ),
                None => None,
            };
            settings(&store, ops::protect::pause(&store, ns)?)
        }
        Cmd::Resume { store } => {
            let store = behind(&store);
            settings(&store, ops::protect::resume(&store)?)
        }
        Cmd::Ship { store, resync } => {
            let r = ops::ship::ship(&behind(&store), resync, progress::bar("shipping"))?;
            render::ship(&r);
            Ok(r.code)
        }
        Cmd::Receive {
            replica,
            restrict_to,
        } => match receive(replica, restrict_to) {
            Ok(()) => Ok(0),
            Err(e) => {
                // The sender reads this last line as the reason.
                eprintln!("drfs receive: {e}");
                Ok(e.class().exit_code())
            }
        },
        Cmd::Points { replica, json } => points(&replica, json),
        Cmd::Status { path, json } => status(&behind(&path), json),
        Cmd::Verify {
            replica,
            point,
            all,
            rate,
            restart,
            json,
        } => {
            here(&replica)?;
            if std::fs::symlink_metadata(&replica).is_err() {
                return Err(Error::Invalid(format!(
                    "{}: no such file or directory",
                    replica.display()
                ))
                .into());
            }
            let v = ops::verify::Verify {
                point: point.as_deref(),
                all,
                rate,
                restart,
            };
            let rep = ops::verify::verify(&replica, &v)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&rep)?);
            } else {
                print!("{}", render::verify(&rep));
            }
            Ok(if rep.bad.is_empty() { 0 } else { 2 })
        }
        Cmd::Metrics { path } => {
            print!("{}", ops::metrics::text(&behind(&path))?);
            Ok(0)
        }
        Cmd::Events { path, since, json } => {
            let ev = ops::events::events(&behind(&path), since.as_deref())?;
            if json {
                println!("{}", serde_json::to_string_pretty(&ev)?);
            } else {
                print!("{}", render::events(&ev));
            }
            Ok(0)
        }
        Cmd::Browse {
            replica,
            mountpoint,
            allow_other,
            foreground,
        } => {
            replica_at(&replica)?;
            ops::browse::browse(&replica, &mountpoint, allow_other, foreground)?;
            Ok(0)
        }
        Cmd::TestFailover {
            replica,
            point,
            at,
            stop,
            allow_other,
            foreground,
        } => test_failover(
            &replica,
            point.as_deref(),
            at.as_deref(),
            stop,
            allow_other,
            foreground,
        ),
        Cmd::Failover {
            path,
            point,
            commit,
            planned,
            reverse_to,
        } => failover(
            &path,
            point.as_deref(),
            commit,
            planned,
            reverse_to.as_deref(),
        ),
        Cmd::Reprotect {
            store,
            to,
            interval,
            keep,
            ssh_command,
        } => reprotect(
            &store,
            &ops::reprotect::Reprotect {
                to: &to.to_string_lossy(),
                interval: interval.as_deref(),
                keep: keep.as_deref(),
                ssh_command: ssh_command.as_deref(),
            },
        ),
        Cmd::Restore {
            replica,
            point,
            path,
            to,
            force,
            parents,
        } => restore(&replica, &point, path.as_deref(), &to, force, parents),
    }
}

/// `drfs receive`: the replica given, or the one a restricted key's sender asked for.
fn receive(replica: Option<PathBuf>, restrict_to: Option<PathBuf>) -> crate::error::Result<()> {
    let replica = match (replica, restrict_to) {
        (_, Some(dir)) => {
            let asked = std::env::var("SSH_ORIGINAL_COMMAND").ok();
            ops::receive::restricted(&dir, asked.as_deref())?
        }
        (Some(r), None) => r,
        (None, None) => return Err(Error::Invalid("give the replica directory".into())),
    };
    ops::receive::receive(&replica)
}

fn mount(o: MountOpts) -> Result<i32> {
    if let Some(bs) = o.block_size {
        if !(bs.is_power_of_two() && (4096..=16 << 20).contains(&bs)) {
            return Err(Error::Invalid(format!(
                "--block-size must be a power of two from 4K to 16M, not {bs}"
            ))
            .into());
        }
    }
    if !(1..=256).contains(&o.threads) {
        return Err(Error::Invalid("--threads must be 1..256".into()).into());
    }
    ops::mount::mount(&o)?;
    Ok(0)
}

fn changes(store: &Path, path: Option<PathBuf>, json: bool) -> Result<i32> {
    let mnt = store.canonicalize().unwrap_or_else(|_| store.to_path_buf());
    let store = behind(store);
    // A path given under the mountpoint means the same file in the store.
    let path = path.map(|p| match p.strip_prefix(&mnt) {
        Ok(rel) if p.is_absolute() => store.join(rel),
        _ => p,
    });
    let c = crate::obs::changes::collect(&store, path.as_deref())?;
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&c).context("encoding JSON")?
        );
    } else {
        print!("{}", render::changes(&c));
    }
    Ok(0)
}

fn assess(
    store: &Path,
    for_: &str,
    windows: &str,
    compress: &str,
    bwlimit: Option<u64>,
    json: bool,
) -> Result<i32> {
    let dur = |s: &str, what: &str| {
        humantime::parse_duration(s.trim())
            .map_err(|e| Error::Invalid(format!("{what} {s:?}: {e} (e.g. 30s, 5m)")))
    };
    let windows = windows
        .split(',')
        .map(|w| dur(w, "--windows").map(|d| d.as_secs()))
        .collect::<std::result::Result<Vec<u64>, Error>>()?;
    let bwlimit = match bwlimit {
        Some(0) => None,
        Some(r) => Some(r),
        None => store_cap(store),
    };
    let a = ops::assess::Assess {
        run_for: dur(for_, "--for")?,
        windows,
        compress: compress.parse().map_err(Error::Invalid)?,
        bwlimit,
    };
    let quiet = json;
    let on_tick = |t: &ops::assess::Tick| {
        if !quiet {
            eprintln!(
                "{:>5}s  {} changed",
                t.elapsed.as_secs(),
                crate::model::fmt::human(t.changed_bytes)
            );
        }
    };
    let r = ops::assess::assess(store, &a, &on_tick)?;
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&r).context("encoding JSON")?
        );
    } else {
        print!("{}", render::assessment(&r));
    }
    Ok(0)
}

/// The store's own bandwidth cap at this time of day, if it has one.
fn store_cap(store: &Path) -> Option<u64> {
    let (_, cfg) = StateDir::open(store).ok()?;
    cfg.replication?
        .bwlimit?
        .rate_at(crate::transport::limit::local_minute())
}

/// Prints what a settings command changed (and its warnings), and tells the daemon.
fn settings(store: &Path, c: ops::protect::Changed) -> Result<i32> {
    let (sd, cfg) = StateDir::open(&store.canonicalize()?)?;
    let mut running = false;
    for line in &c.what {
        running = ops::note(&sd, &cfg.store_id, line)?;
        println!("{}: {line}", sd.store().display());
    }
    for w in &c.warnings {
        eprintln!("drfs: warning: {w}");
    }
    if c.what.iter().any(|l| l.starts_with("protected")) {
        println!(
            "{}",
            if running {
                "the mounted daemon runs the first cycle now"
            } else {
                "cycles run while the store is mounted, or with `drfs ship`"
            }
        );
    }
    Ok(0)
}

fn show_settings(store: &Path) -> Result<i32> {
    let r = ops::protect::show(store)?;
    println!("replica       {}", r.target);
    println!("interval      {}", ops::protect::cadence(&r));
    println!("keep          {}", r.keep);
    println!("group         {}", r.group);
    match &r.paused {
        Some(p) => println!(
            "paused        since {}{}",
            p.since,
            p.until
                .as_deref()
                .map_or(String::new(), |u| format!(", until {u}"))
        ),
        None => println!("paused        no"),
    }
    println!(
        "hooks         {}",
        ops::protect::hooks_text(r.hooks.as_ref())
    );
    println!("replica id    {}", r.replica_id);
    Ok(0)
}

fn points(replica: &Path, json: bool) -> Result<i32> {
    let r = replica_at(replica)?;
    let mut points = r.points()?;
    points.reverse();
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&render::points_json(&points))?
        );
    } else {
        print!("{}", render::points(&points));
    }
    Ok(0)
}

fn status(path: &Path, json: bool) -> Result<i32> {
    use ops::status::Status;
    here(path)?;
    match ops::status::of(path)? {
        Status::Replica(s) if json => println!("{}", serde_json::to_string_pretty(&s)?),
        Status::Replica(s) => print!("{}", render::replica(&s)),
        Status::Store(v) if json => println!("{}", serde_json::to_string_pretty(&v)?),
        Status::Store(v) => print!("{}", render::store_value(&v)),
    }
    Ok(0)
}

fn failover(
    path: &Path,
    point: Option<&str>,
    commit: bool,
    planned: bool,
    reverse_to: Option<&str>,
) -> Result<i32> {
    here(path)?;
    let f = if planned {
        ops::failover::planned(path, reverse_to)?
    } else if commit {
        ops::failover::commit(path)?
    } else {
        ops::failover::unplanned(path, point)?
    };
    print!("{}", render::failed_over(&f));
    Ok(0)
}

fn reprotect(store: &Path, p: &ops::reprotect::Reprotect<'_>) -> Result<i32> {
    let r = ops::reprotect::reprotect(store, p)?;
    println!(
        "{}: what it held is kept as point {} (diverged)",
        r.old, r.diverged
    );
    if r.cycle.code != 0 {
        println!(
            "{}: the first cycle back failed: {}",
            r.store.display(),
            r.cycle.message
        );
        return Ok(r.cycle.code);
    }
    println!(
        "{} replicates to {} now: the first cycle sent {} (point {})",
        r.store.display(),
        r.old,
        crate::model::fmt::human(r.cycle.bytes),
        r.cycle.point.as_deref().unwrap_or("-")
    );
    Ok(0)
}

fn restore(
    replica: &Path,
    point: &str,
    path: Option<&str>,
    to: &Path,
    force: bool,
    parents: bool,
) -> Result<i32> {
    let r = replica_at(replica)?;
    let rel = match path {
        Some(p) => Some(
            crate::model::RelPath::parse(p.trim_matches('/'))
                .filter(|r| !r.is_root())
                .ok_or_else(|| Error::Invalid(format!("bad --path {p:?}")))?,
        ),
        None => None,
    };
    let done = crate::points::restore::restore(
        Arc::new(r),
        &crate::points::restore::RestoreOpts {
            point,
            path: rel.as_ref(),
            to,
            force,
            parents,
            progress: progress::bar("restoring"),
        },
    )?;
    println!(
        "restored point {point}: {}, {} of data to {}",
        crate::model::fmt::plural(done.files, "file"),
        crate::model::fmt::human(done.bytes),
        to.display()
    );
    Ok(0)
}

fn test_failover(
    replica: &Path,
    point: Option<&str>,
    at: Option<&Path>,
    stop: bool,
    allow_other: bool,
    foreground: bool,
) -> Result<i32> {
    replica_at(replica)?;
    if stop {
        let s = ops::test_failover::stop(replica)?;
        println!(
            "test failover of point {} at {} stopped and discarded",
            s.point,
            s.at.display()
        );
        return Ok(0);
    }
    let (Some(point), Some(at)) = (point, at) else {
        return Err(Error::Invalid("--point and --at are needed (or --stop)".into()).into());
    };
    let at = ops::test_failover::start(replica, point, at, allow_other, foreground)?;
    if !foreground {
        let r = Replica::open_only(replica)?;
        println!(
            "point {point} is at {} as a writable clone; `drfs test-failover {} --stop` discards it",
            at.display(),
            r.root.display()
        );
    }
    Ok(0)
}
