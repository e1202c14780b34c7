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

// Parsed once per process: the size of the largest variant (protect's settings) costs nothing.
#[allow(clippy::large_enum_variant)]
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
        /// Serve Prometheus metrics at http://ADDR/metrics (e.g. 127.0.0.1:9811); off by
        /// default.
        #[arg(long, value_name = "ADDR")]
        metrics_listen: Option<String>,
        /// How buffered clients' I/O reaches the store: `buffered` (through the host page
        /// cache: re-reads are cached) or `direct` (O_DIRECT where the store allows, as
        /// qemu's cache=none: no second cached copy). O_DIRECT clients always go direct.
        #[arg(long, default_value = "buffered", value_name = "buffered|direct")]
        store_io: crate::primary::passthrough::fs::StoreIo,
        /// Raise the kernel's FUSE request cap (fs.fuse.max_pages_limit, host-wide) to this
        /// many pages before mounting, so 1 MiB requests from buffers not page-aligned
        /// arrive whole; 0 leaves it.
        #[arg(long, default_value_t = crate::fuse::serve::DEFAULT_MAX_PAGES, value_name = "PAGES")]
        fuse_max_pages: u32,
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
        /// A command run before each consistency group's cut, for application-consistent
        /// points (e.g. "virsh domfsfreeze vm1"; DRFS_GROUP names the group). Repeat for
        /// several (run in order); replaces the ones set.
        #[arg(long = "pre-cut", value_name = "CMD")]
        pre_cut: Vec<String>,
        /// A command run right after each group's cut, before shipping (the thaw); runs
        /// whenever a pre-cut hook started, also after it failed. Repeat for several (run
        /// in reverse order); replaces the ones set.
        #[arg(long = "post-cut", value_name = "CMD")]
        post_cut: Vec<String>,
        /// How often a cycle runs the hooks (e.g. 4h; default `always`: every cycle).
        #[arg(long, value_name = "DURATION")]
        app_consistent_every: Option<String>,
        /// Kill a hook running longer than this (default 30s); its point is crash-consistent.
        #[arg(long, value_name = "DURATION")]
        hook_timeout: Option<String>,
        /// Remove the pre- and post-cut hooks.
        #[arg(long, conflicts_with_all = ["pre_cut", "post_cut", "app_consistent_every", "hook_timeout"])]
        no_hooks: bool,
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
        #[arg(long, conflicts_with_all = ["to", "interval", "expect_every", "keep", "group", "seed", "rebind", "pre_cut", "post_cut", "app_consistent_every", "hook_timeout", "no_hooks", "ssh_command", "compress", "bwlimit"])]
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
    /// Make a replica the primary: unplanned (where the replica is, the primary gone;
    /// its files are rolled back in place to --point, default the newest), --commit to
    /// end the choice of point, or --planned on the healthy primary (final cycle, then
    /// the replica is promoted and this store becomes its replica).
    Failover {
        /// The replica (unplanned, --commit) or the primary store (--planned).
        path: PathBuf,
        /// The point to fail over to (`drfs points` lists them); default: the newest.
        #[arg(long, conflicts_with_all = ["commit", "planned"])]
        point: Option<String>,
        /// End the failover: the point can no longer be changed (the history stays).
        #[arg(long, conflicts_with = "planned")]
        commit: bool,
        /// A planned failover, run on the primary with its VMs stopped and unmounted: no
        /// data is lost, and replication is reversed.
        #[arg(long)]
        planned: bool,
        /// With --planned, for a replica on another host: how that host reaches this
        /// store (`ssh://[user@]host[:port]/path`) for the replication back.
        #[arg(long, requires = "planned", value_name = "URL")]
        reverse_to: Option<String>,
    },
    /// After an unplanned failover: make the old primary (back, diverged) the replica of
    /// STORE; only blocks that differ travel, and what it held is kept as a point tagged
    /// diverged on it.
    Reprotect {
        /// The store a failover promoted (the new primary).
        store: PathBuf,
        /// The old primary (unmounted): a directory, or `ssh://[user@]host[:port]/path`.
        #[arg(long)]
        to: PathBuf,
        /// Time between cycles; default: the old primary's (over ssh: 30s).
        #[arg(long)]
        interval: Option<String>,
        /// Retention policy; default: the old primary's (over ssh: the one this store
        /// kept as the replica).
        #[arg(long)]
        keep: Option<String>,
        /// For an ssh:// old primary: the ssh client command, kept in the settings.
        #[arg(long, value_name = "COMMAND")]
        ssh_command: Option<String>,
    },
    /// Health and state of a store or a replica.
    Status {
        /// A store (or its mountpoint), or a replica directory.
        path: PathBuf,
        /// Print JSON, for tools.
        #[arg(long)]
        json: bool,
    },
    /// The event history of a store or a replica, oldest first: health changes, cycles
    /// failing and recovering, resyncs, points pruned, hooks failing, verify findings, failovers.
    Events {
        /// A store (or its mountpoint), or a replica directory.
        path: PathBuf,
        /// Only events from this time on: RFC 3339 (2026-12-02T03:00:00Z) or an age (1h).
        #[arg(long, value_name = "T")]
        since: Option<String>,
        /// Print JSON (an array of events), for tools.
        #[arg(long)]
        json: bool,
    },
    /// Check every block of REPLICA's latest point (or one point, or all) against its
    /// BLAKE3, at the idle I/O priority; exit 2 if a block is bad. Resumes an unfinished run.
    Verify {
        /// The replica directory.
        replica: PathBuf,
        /// Check this point: the latest files and the undo records it reads.
        #[arg(long, conflicts_with = "all")]
        point: Option<String>,
        /// Check every point: the latest files and every undo record.
        #[arg(long)]
        all: bool,
        /// Read at most this many bytes per second (e.g. 50M).
        #[arg(long, value_parser = parse_size)]
        rate: Option<u64>,
        /// Start afresh instead of resuming an unfinished run.
        #[arg(long)]
        restart: bool,
        /// Print the report as JSON, for tools.
        #[arg(long)]
        json: bool,
    },
    /// Print the Prometheus metrics of a store or a replica once (the text GET /metrics
    /// serves), e.g. for node_exporter's textfile collector.
    Metrics {
        /// A store (or its mountpoint), or a replica directory.
        path: PathBuf,
    },
    /// Measure what replicating mounted STORE would take, with no replica: the distinct
    /// bytes changed per interval, their compressed size (a sample read from the store),
    /// the bandwidth each interval needs and the RPO a cap gives. Cycles go on untouched.
    Assess {
        /// The store (or its mountpoint); it must be mounted.
        store: PathBuf,
        /// How long to watch (windows longer than this are extrapolated, and say so).
        #[arg(long = "for", default_value = "15m")]
        for_: String,
        /// The interval lengths to measure, each a multiple of the shortest.
        #[arg(long, default_value = "30s,1m,5m,15m")]
        windows: String,
        /// How a cycle would compress: none, zstd or zstd:LEVEL.
        #[arg(long, default_value = "zstd")]
        compress: String,
        /// The RPO at this cap (bytes per second on the wire, e.g. 10M); default: the
        /// store's own --bwlimit at this time of day, if it has one.
        #[arg(long, value_parser = parse_size)]
        bwlimit: Option<u64>,
        /// Print the report as JSON, for tools.
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
