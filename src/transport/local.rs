//! A local replica's receiver: `drfs receive REPLICA` run as a child process, the stream
//! over its stdin and stdout. The environment variable `DRFS_RECEIVE` replaces the command
//! (the replica path is appended) so tests can put a corrupting proxy in the pipe.

use std::os::fd::AsRawFd;
use std::path::Path;
use std::process::{Command, Stdio};

use crate::error::{Error, Result};
use crate::transport::{Failure, Link, Options};

fn grow_pipe(fd: i32) {
    // Bigger pipes keep a fast local receiver busy; failure only costs speed.
    unsafe { libc::fcntl(fd, libc::F_SETPIPE_SZ, 1 << 20) };
}

/// Starts the receiver for the replica directory `target` and opens the stream.
pub fn connect(target: &Path, o: &Options) -> Result<Link> {
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
    let child = cmd.spawn().map_err(|e| {
        Error::Link(format!(
            "cannot start the receiver for {}: {e}",
            target.display()
        ))
    })?;
    if let (Some(i), Some(o)) = (&child.stdin, &child.stdout) {
        grow_pipe(i.as_raw_fd());
        grow_pipe(o.as_raw_fd());
    }
    let what = target.display().to_string();
    Link::open(child, o, &|code, lines, f| diagnose(&what, code, lines, f))
}

/// Why a local receiver's stream did not open.
fn diagnose(target: &str, _code: Option<i32>, lines: &[String], f: Failure) -> Error {
    let why = super::last_words(lines);
    let why = if why.is_empty() {
        why
    } else {
        format!("{why}; ")
    };
    match f {
        Failure::Version(v) => Error::operator(format!("replica {target}: {v}")),
        Failure::Noise(n) => Error::Link(format!(
            "replica {target}: the receiver wrote {n:?} instead of drfs's banner"
        )),
        Failure::Stream(e) => Error::Link(format!("replica {target} unreachable: {why}{e}")),
    }
}
