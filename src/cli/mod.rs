//! The command line: argument parsing (clap), dispatch to `ops` and the library, and what
//! is printed (`render`, `progress`). Errors print as a single line `drfs: ...` with a
//! non-zero exit; usage errors exit 2 (clap's convention); `drfs ship` and `drfs receive`
//! exit 1 when a retry can help and 2 when an operator must act.

pub mod progress;
pub mod render;

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};

use crate::error::Class;
use crate::model::settings::parse_size;
use crate::ops::mount::{self, MountOpts};

#[derive(Parser)]
#[command(
    name = "drfs",
    version,
    about = "Disaster-recovery replication for VM disk images, as a filesystem"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Mount STORE at MOUNTPOINT, tracking every change; returns once the mount serves.
    Mount {
        store: PathBuf,
        mountpoint: PathBuf,
        /// Tracking block size (power of two, 4K..16M), fixed when a store is first mounted.
        #[arg(long, value_parser = parse_size)]
        block_size: Option<u64>,
        /// Threads serving FUSE requests.
        #[arg(long, default_value_t = crate::fuse::serve::DEFAULT_THREADS)]
        threads: usize,
        /// Let users other than the one mounting use the mount (e.g. qemu as libvirt-qemu).
        #[arg(long)]
        allow_other: bool,
        /// Stay in the foreground (for systemd); the mount is ready when READY=1 is sent.
        #[arg(long)]
        foreground: bool,
        /// Pass through without tracking (for benchmarks only: changes go unrecorded, and
        /// the next tracked mount resyncs every file they touched).
        #[arg(long)]
        no_track: bool,
    },
    /// Unmount MOUNTPOINT and wait until the daemon has stopped cleanly.
    Unmount {
        mountpoint: PathBuf,
        /// Detach now even if files are open; the daemon stops when they are closed.
        #[arg(long)]
        lazy: bool,
    },
    /// Replicate STORE to REPLICA (a local directory): records the settings and binds the
    /// replica; the mounted daemon then runs a cycle every interval.
    Protect {
        store: PathBuf,
        /// The replica directory (it must exist; an empty one, or this store's replica).
        #[arg(long)]
        to: PathBuf,
        /// Time between cycles (1s and up; e.g. 30s, 5m, 15m), or `manual` for cycles
        /// only when `drfs ship` runs (from cron).
        #[arg(long, default_value = "30s")]
        interval: String,
        /// Retention policy, e.g. all:1h,hourly:24h,daily:7d (see README).
        #[arg(long, default_value = crate::model::retention::DEFAULT)]
        keep: String,
        /// Consistency groups: the whole store, or each top-level folder (one per VM).
        #[arg(long, default_value = "store")]
        group: String,
    },
    /// Run one replication cycle now. Exit 0: shipped; 1: failed, will work on retry;
    /// 2: failed and needs an operator.
    Ship {
        store: PathBuf,
        /// Compare every block by hash and continue from the replica's latest point
        /// (after the replica diverged).
        #[arg(long)]
        resync: bool,
    },
    /// Serve the receiving end of the replication stream on stdin/stdout.
    Receive { replica: PathBuf },
    /// List REPLICA's recovery points, newest first.
    Points {
        replica: PathBuf,
        #[arg(long)]
        json: bool,
    },
    /// Write a point's files (or one PATH of it) to DEST, sparse-aware.
    Restore {
        replica: PathBuf,
        #[arg(long)]
        point: String,
        /// One file or folder of the point, relative to the store root.
        #[arg(long)]
        path: Option<String>,
        #[arg(long)]
        to: PathBuf,
        /// Overwrite what is at DEST.
        #[arg(long)]
        force: bool,
    },
    /// Mount REPLICA's recovery points read-only at MOUNTPOINT (points/, latest, by-time/).
    Browse {
        replica: PathBuf,
        mountpoint: PathBuf,
        /// Let users other than the one mounting read it.
        #[arg(long)]
        allow_other: bool,
        #[arg(long)]
        foreground: bool,
    },
    /// A writable, throwaway clone of a point at DIR (nothing is copied), or --stop it.
    TestFailover {
        replica: PathBuf,
        #[arg(long, required_unless_present = "stop")]
        point: Option<String>,
        #[arg(long, required_unless_present = "stop")]
        at: Option<PathBuf>,
        /// Discard the running clone.
        #[arg(long, conflicts_with_all = ["point", "at"])]
        stop: bool,
        /// Let other users (qemu as libvirt-qemu) use the clone.
        #[arg(long)]
        allow_other: bool,
        #[arg(long)]
        foreground: bool,
    },
    /// Health and state of a store or a replica.
    Status {
        path: PathBuf,
        #[arg(long)]
        json: bool,
    },
    /// Show what is tracked for STORE (or one PATH in it) since tracking began.
    Changes {
        store: PathBuf,
        path: Option<PathBuf>,
        #[arg(long)]
        json: bool,
    },
}

fn check_block_size(bs: Option<u64>) -> Result<()> {
    if let Some(bs) = bs {
        anyhow::ensure!(
            bs.is_power_of_two() && (4096..=16 << 20).contains(&bs),
            "--block-size must be a power of two from 4K to 16M, not {bs}"
        );
    }
    Ok(())
}

fn behind(p: &std::path::Path) -> PathBuf {
    crate::fuse::mountinfo::behind(p)
}

fn run(cli: Cli) -> Result<i32> {
    match cli.cmd {
        Cmd::Mount {
            store,
            mountpoint,
            block_size,
            threads,
            allow_other,
            foreground,
            no_track,
        } => {
            check_block_size(block_size)?;
            anyhow::ensure!((1..=256).contains(&threads), "--threads must be 1..256");
            mount::mount(&MountOpts {
                store,
                mountpoint,
                block_size,
                threads,
                allow_other,
                foreground,
                track: !no_track,
            })?;
        }
        Cmd::Unmount { mountpoint, lazy } => mount::unmount(&mountpoint, lazy)?,
        Cmd::Changes { store, path, json } => {
            let mnt = store.canonicalize().unwrap_or_else(|_| store.clone());
            let store = behind(&store);
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
        }
        Cmd::Protect {
            store,
            to,
            interval,
            keep,
            group,
        } => protect(&behind(&store), &to, &interval, &keep, &group)?,
        Cmd::Ship { store, resync } => {
            let progress = progress::bar("shipping");
            return match crate::ops::ship::ship(&behind(&store), resync, progress) {
                Ok(r) => {
                    render::ship(&r);
                    Ok(r.code)
                }
                Err(e) => {
                    eprintln!("drfs: {e}");
                    Ok(exit_code(e.class()))
                }
            };
        }
        Cmd::Receive { replica } => {
            return Ok(match crate::ops::receive::receive(&replica) {
                Ok(()) => 0,
                Err(e) => {
                    eprintln!("drfs receive: {e}");
                    exit_code(e.class())
                }
            });
        }
        Cmd::Points { replica, json } => {
            let r = crate::replica::posix::Replica::open_only(&replica)?;
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
        }
        Cmd::Status { path, json } => match crate::ops::status::of(&behind(&path))? {
            crate::ops::status::Status::Replica(s) if json => {
                println!("{}", serde_json::to_string_pretty(&s)?)
            }
            crate::ops::status::Status::Replica(s) => print!("{}", render::replica(&s)),
            crate::ops::status::Status::Store(v) if json => {
                println!("{}", serde_json::to_string_pretty(&v)?)
            }
            crate::ops::status::Status::Store(v) => print!("{}", render::store_value(&v)),
        },
        Cmd::Browse {
            replica,
            mountpoint,
            allow_other,
            foreground,
        } => crate::ops::browse::browse(&replica, &mountpoint, allow_other, foreground)?,
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
        )?,
        Cmd::Restore {
            replica,
            point,
            path,
            to,
            force,
        } => restore(&replica, &point, path.as_deref(), &to, force)?,
    }
    Ok(0)
}

/// The exit code of a command that failed with an error of `class`.
fn exit_code(class: Class) -> i32 {
    match class {
        Class::Transient => 1,
        Class::Operator => 2,
    }
}

fn protect(
    store: &std::path::Path,
    to: &std::path::Path,
    interval: &str,
    keep: &str,
    group: &str,
) -> Result<()> {
    let to = to.to_string_lossy();
    let rep = crate::ops::protect::protect(&crate::ops::protect::Protect {
        store,
        to: &to,
        interval,
        keep,
        group,
    })?;
    let (_, cfg) = crate::state::StateDir::open(&store.canonicalize()?)?;
    let req = crate::daemon::control::Request::Poke;
    let running = crate::daemon::control::call(&cfg.store_id, &req)?.is_some();
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

fn restore(
    replica: &std::path::Path,
    point: &str,
    path: Option<&str>,
    to: &std::path::Path,
    force: bool,
) -> Result<()> {
    let r = crate::replica::posix::Replica::open_only(replica)?;
    let rel = match path {
        Some(p) => Some(
            crate::model::RelPath::parse(p.trim_matches('/'))
                .filter(|r| !r.is_root())
                .with_context(|| format!("bad --path {p:?}"))?,
        ),
        None => None,
    };
    let done = crate::points::restore::restore(
        std::sync::Arc::new(r),
        &crate::points::restore::RestoreOpts {
            point,
            path: rel.as_ref(),
            to,
            force,
            progress: progress::bar("restoring"),
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

fn test_failover(
    replica: &std::path::Path,
    point: Option<&str>,
    at: Option<&std::path::Path>,
    stop: bool,
    allow_other: bool,
    foreground: bool,
) -> Result<()> {
    if stop {
        let s = crate::ops::test_failover::stop(replica)?;
        println!(
            "test failover of point {} at {} stopped and discarded",
            s.point,
            s.at.display()
        );
        return Ok(());
    }
    let (Some(point), Some(at)) = (point, at) else {
        anyhow::bail!("--point and --at are needed (or --stop)");
    };
    let at = crate::ops::test_failover::start(replica, point, at, allow_other, foreground)?;
    if !foreground {
        let r = crate::replica::posix::Replica::open_only(replica)?;
        println!(
            "point {point} is at {} as a writable clone; `drfs test-failover {} --stop` discards it",
            at.display(),
            r.root.display()
        );
    }
    Ok(())
}

/// Runs the CLI; returns the process exit code.
pub fn main() -> i32 {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) if !e.use_stderr() => {
            let _ = e.print();
            return 0;
        }
        Err(e) => {
            // One line, not clap's usage block.
            let text = e.render().to_string();
            let first = text.lines().next().unwrap_or("bad usage");
            eprintln!(
                "drfs: {} (see drfs --help)",
                first.trim_start_matches("error: ")
            );
            return 2;
        }
    };
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("drfs: {e:#}");
            1
        }
    }
}
