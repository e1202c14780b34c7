//! The command line's arguments (clap): every command, option and positional argument
//! with its help line.

use std::path::PathBuf;

use clap::{Parser, Subcommand};

use crate::model::settings::parse_size;

#[derive(Parser)]
#[command(
    name = "drfs",
    version,
    about = "Disaster-recovery replication for VM disk images, as a filesystem",
    after_help = "Exit codes: 0 done; 1 failed, a retry may fix it; 2 needs an operator; 64 bad usage."
)]
pub struct Cli {
    #[command(subcommand)]
    pub cmd: Cmd,
}

#[derive(Subcommand)]
pub enum Cmd {
    /// Mount STORE at MOUNTPOINT, tracking every change; returns once the mount serves.
    Mount {
        /// The directory that holds the VM disk images.
        store: PathBuf,
        /// An empty directory where the VMs will see the store.
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
        /// Where a store, a browse or a test failover is mounted.
        mountpoint: PathBuf,
        /// Detach now even if files are open; the daemon stops when they are closed.
        #[arg(long)]
        lazy: bool,
    },
    /// Replicate STORE to a replica, or change one setting of it (the others keep their
    /// values); the mounted daemon then runs a cycle every interval.
    Protect {
        /// The store (or its mountpoint).
        store: PathBuf,
        /// The replica directory: an empty one, this store's replica, or with --seed one
        /// holding a copy to seed it; on another host ssh://[user@]host[:port]/path.
        /// Needed the first time.
        #[arg(long)]
        to: Option<PathBuf>,
        /// Time between cycles (1s and up; e.g. 30s, 5m, 15m), or `manual` for cycles only
        /// when `drfs ship` runs (from cron). Default the first time: 30s.
        #[arg(long)]
        interval: Option<String>,
        /// With --interval manual: how often cron runs `drfs ship` (e.g. 15m), so that a
        /// job that stopped turns the store Warning, then Critical.
        #[arg(long)]
        expect_every: Option<String>,
        /// Retention policy, e.g. all:1h,hourly:24h,daily:7d (see README). Default the
        /// first time: all:1h,hourly:24h.
        #[arg(long)]
        keep: Option<String>,
        /// Consistency groups: `store` (one cut for the whole store) or `dir` (one per
        /// top-level folder, one per VM). Default the first time: store.
        #[arg(long)]
        group: Option<String>,
        /// Let a directory that already holds files become the replica: its files are a
        /// seed copy (only blocks that differ are sent; nothing else in it is touched).
        #[arg(long)]
        seed: bool,
        /// Move a protected store to another replica (the old one keeps its points).
        #[arg(long)]
        rebind: bool,
        /// For an ssh:// replica: the ssh client command, e.g. 'ssh -F FILE -i KEY' (run
        /// by sh; drfs adds -T, BatchMode=yes and keepalives). Kept in the settings; the
        /// DRFS_SSH_COMMAND environment variable overrides it. '' goes back to ssh.
        #[arg(long, value_name = "COMMAND")]
        ssh_command: Option<String>,
        /// Compression of the stream: none, zstd (level 3) or zstd:LEVEL (-7..19); BLAKE3
        /// stays over the uncompressed data. `default`: zstd over ssh, none locally.
        #[arg(long, value_name = "CODEC")]
        compress: Option<String>,
        /// Cap the bytes per second on the wire, e.g. 10M, or by local time of day:
        /// 08:00-18:00=5M,20M (5M in the window, 20M otherwise; 0 uncapped). `none`: no cap.
        #[arg(long, value_name = "RATE")]
        bwlimit: Option<String>,
        /// Print the settings in force and change nothing.
        #[arg(long, conflicts_with_all = ["to", "interval", "expect_every", "keep", "group", "seed", "rebind", "ssh_command", "compress", "bwlimit"])]
        show: bool,
    },
    /// Stop replicating STORE and forget its replica (the replica is left intact).
    Unprotect {
        /// The store (or its mountpoint).
        store: PathBuf,
    },
    /// Pause STORE's cycles (e.g. maintenance on the replica host); changes are still
    /// tracked and ship after `drfs resume`.
    Pause {
        /// The store (or its mountpoint).
        store: PathBuf,
        /// Resume by itself after this long (e.g. 2h); without it, until `drfs resume`.
        #[arg(long = "for", value_name = "DURATION")]
        for_: Option<String>,
    },
    /// Resume STORE's cycles after `drfs pause`.
    Resume {
        /// The store (or its mountpoint).
        store: PathBuf,
    },
    /// Run one replication cycle now (exit 0: shipped; 1: failed, a retry may fix it;
    /// 2: failed, needs an operator).
    Ship {
        /// The store (or its mountpoint).
        store: PathBuf,
        /// Compare every block by hash and continue from the replica's latest point
        /// (after the replica diverged).
        #[arg(long)]
        resync: bool,
    },
    /// Serve the receiving end of the replication stream on stdin/stdout (run by the
    /// sender, locally or through ssh).
    Receive {
        /// The replica directory.
        #[arg(
            required_unless_present = "restrict_to",
            conflicts_with = "restrict_to"
        )]
        replica: Option<PathBuf>,
        /// As the forced command of a key in authorized_keys: serve only the replica the
        /// sender asks for (SSH_ORIGINAL_COMMAND `drfs receive PATH`) if it is a directory
        /// under DIR; nothing else is runnable with the key.
        #[arg(long, value_name = "DIR")]
        restrict_to: Option<PathBuf>,
    },
    /// List REPLICA's recovery points, newest first.
    Points {
        /// The replica directory.
        replica: PathBuf,
        /// Print JSON, for tools.
        #[arg(long)]
        json: bool,
    },
    /// Write a point's files (or one PATH of it) to DEST, sparse-aware and verified.
    Restore {
        /// The replica directory.
        replica: PathBuf,
        /// The point's id (`drfs points` lists them).
        #[arg(long)]
        point: String,
        /// One file or folder of the point, relative to the store root.
        #[arg(long)]
        path: Option<String>,
        /// Where to write it (a new path, or an empty directory).
        #[arg(long, value_name = "DEST")]
        to: PathBuf,
        /// Overwrite what is at DEST.
        #[arg(long)]
        force: bool,
        /// Create DEST's missing parent directories.
        #[arg(long)]
        parents: bool,
    },
    /// Mount REPLICA's recovery points read-only at MOUNTPOINT (points/, latest, by-time/).
    Browse {
        /// The replica directory.
        replica: PathBuf,
        /// An empty directory to mount the points at.
        mountpoint: PathBuf,
        /// Let users other than the one mounting read it.
        #[arg(long)]
        allow_other: bool,
        /// Stay in the foreground (for systemd).
        #[arg(long)]
        foreground: bool,
    },
    /// A writable, throwaway clone of a point at DIR (nothing is copied), or --stop it.
    TestFailover {
        /// The replica directory.
        replica: PathBuf,
        /// The point to clone (`drfs points` lists them).
        #[arg(long, required_unless_present = "stop")]
        point: Option<String>,
        /// Where to mount the clone (created if missing; outside the replica).
        #[arg(long, value_name = "DIR", required_unless_present = "stop")]
        at: Option<PathBuf>,
        /// Stop the running test failover and discard its writes.
        #[arg(long, conflicts_with_all = ["point", "at"])]
        stop: bool,
        /// Let other users (qemu as libvirt-qemu) use the clone.
        #[arg(long)]
        allow_other: bool,
        /// Stay in the foreground (for systemd).
        #[arg(long)]
        foreground: bool,
    },
    /// Health and state of a store or a replica.
    Status {
        /// A store (or its mountpoint), or a replica directory.
        path: PathBuf,
        /// Print JSON, for tools.
        #[arg(long)]
        json: bool,
    },
    /// Show what is tracked for STORE (or one PATH in it) since tracking began.
    Changes {
        /// The store (or its mountpoint).
        store: PathBuf,
        /// One file or folder of the store (relative to it, or under its mountpoint).
        path: Option<PathBuf>,
        /// Print JSON, for tools.
        #[arg(long)]
        json: bool,
    },
}
