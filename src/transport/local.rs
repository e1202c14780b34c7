//! A local replica's receiver: `drfs receive REPLICA` run as a child process, the stream
//! over its stdin and stdout. The environment variable `DRFS_RECEIVE` replaces the command
//! (the replica path is appended) so tests can put a corrupting proxy in the pipe.

use std::io::{BufReader, BufWriter};
use std::os::fd::AsRawFd;
use std::path::Path;
use std::process::{Command, Stdio};

use crate::error::{Error, Result};
use crate::transport::Link;
use crate::wire::{Reader, Writer};

fn grow_pipe(fd: i32) {
    // Bigger pipes keep a fast local receiver busy; failure only costs speed.
    unsafe { libc::fcntl(fd, libc::F_SETPIPE_SZ, 1 << 20) };
}

/// Starts the receiver for the replica directory `target` and opens the stream.
pub fn connect(target: &Path) -> Result<Link> {
    let mut cmd = match std::env::var("DRFS_RECEIVE") {
        Ok(prefix) if !prefix.trim().is_empty() => {
            let mut words = prefix.split_whitespace();
            let mut c = Command::new(words.next().unwrap_or("drfs"));
            c.args(words);
            c
        }
        _ => {
            // The running binary itself, even after an upgrade replaced the file on disk
            // (so the receiver always speaks this daemon's protocol version).
            let mut c = Command::new("/proc/self/exe");
            std::os::unix::process::CommandExt::arg0(&mut c, "drfs");
            c.arg("receive");
            c
        }
    };
    cmd.arg(target)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().map_err(|e| {
        Error::Link(format!(
            "cannot start the receiver for {}: {e}",
            target.display()
        ))
    })?;
    let (Some(stdin), Some(stdout)) = (child.stdin.take(), child.stdout.take()) else {
        return Err(Error::Link("the receiver's pipes are missing".into()));
    };
    grow_pipe(stdin.as_raw_fd());
    grow_pipe(stdout.as_raw_fd());
    let w = Writer::new(BufWriter::with_capacity(1 << 20, stdin));
    let r = Reader::new(BufReader::with_capacity(1 << 20, stdout));
    Link::open(child, w, r, &target.display().to_string())
}
