//! The command line: argument parsing (clap) and one function per command. Errors print as
//! a single line `drfs: ...` with a non-zero exit; usage errors exit 2 (clap's convention).

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};

use crate::daemon::{self, MountOpts};

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
        #[arg(long, default_value_t = crate::daemon::DEFAULT_THREADS)]
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

/// Parses sizes like `65536`, `64K`, `1M`, `4KiB`.
pub fn parse_size(s: &str) -> std::result::Result<u64, String> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: u64 = num.parse().map_err(|_| format!("not a size: {s}"))?;
    let mult: u64 = match unit.trim().to_ascii_uppercase().as_str() {
        "" | "B" => 1,
        "K" | "KB" | "KIB" => 1 << 10,
        "M" | "MB" | "MIB" => 1 << 20,
        "G" | "GB" | "GIB" => 1 << 30,
        _ => return Err(format!("not a size: {s}")),
    };
    n.checked_mul(mult)
        .ok_or_else(|| format!("size too large: {s}"))
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
            daemon::mount(&MountOpts {
                store,
                mountpoint,
                block_size,
                threads,
                allow_other,
                foreground,
                track: !no_track,
            })?;
        }
        Cmd::Unmount { mountpoint, lazy } => daemon::unmount(&mountpoint, lazy)?,
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
                print!("{}", crate::obs::changes::render(&c));
            }
        }
        Cmd::Protect {
            store,
            to,
            interval,
            keep,
            group,
        } => crate::ops::protect(&behind(&store), &to, &interval, &keep, &group)?,
        Cmd::Ship { store, resync } => return crate::ops::ship(&behind(&store), resync),
        Cmd::Receive { replica } => return Ok(crate::ops::receive(&replica)),
        Cmd::Points { replica, json } => crate::ops::points(&replica, json)?,
        Cmd::Status { path, json } => crate::ops::status(&behind(&path), json)?,
        Cmd::Browse {
            replica,
            mountpoint,
            allow_other,
            foreground,
        } => crate::ops::browse(&replica, &mountpoint, allow_other, foreground)?,
        Cmd::TestFailover {
            replica,
            point,
            at,
            stop,
            allow_other,
            foreground,
        } => crate::ops::test_failover(
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
        } => crate::ops::restore(&replica, &point, path.as_deref(), &to, force)?,
    }
    Ok(0)
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("64K"), Ok(65536));
        assert_eq!(parse_size("1M"), Ok(1 << 20));
        assert_eq!(parse_size("4096"), Ok(4096));
        assert!(parse_size("12Q").is_err());
        assert!(parse_size("").is_err());
    }
}
