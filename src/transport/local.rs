//! The pipe to a receiver. A local replica is served by `drfs receive REPLICA` run as a
//! child process; the same stream runs over ssh's stdin/stdout for a remote one. The
//! environment variable `DRFS_RECEIVE` replaces the command (the replica path is appended)
//! so tests can put a corrupting proxy in the pipe.

use std::io::{BufReader, BufWriter, Read};
use std::os::fd::AsRawFd;
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};

use crate::error::{Error, Result};
use crate::wire::{Reader, Writer};

pub struct Conn {
    child: Child,
    pub w: Writer<BufWriter<ChildStdin>>,
    pub r: Reader<BufReader<ChildStdout>>,
}

fn grow_pipe(fd: i32) {
    // Bigger pipes keep a fast local receiver busy; failure only costs speed.
    unsafe { libc::fcntl(fd, libc::F_SETPIPE_SZ, 1 << 20) };
}

/// Starts the receiver for `target` and opens the stream.
pub fn connect(target: &str) -> Result<Conn> {
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
            c.arg("receive");
            c
        }
    };
    cmd.arg(target)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd
        .spawn()
        .map_err(|e| Error::Invalid(format!("cannot start the receiver for {target}: {e}")))?;
    let (Some(stdin), Some(stdout)) = (child.stdin.take(), child.stdout.take()) else {
        return Err(Error::Invalid("receiver pipes missing".into()));
    };
    grow_pipe(stdin.as_raw_fd());
    grow_pipe(stdout.as_raw_fd());
    let w = Writer::new(BufWriter::with_capacity(1 << 20, stdin));
    let r = Reader::new(BufReader::with_capacity(1 << 20, stdout));
    match (w, r) {
        (Ok(w), Ok(r)) => Ok(Conn { child, w, r }),
        (Err(e), _) | (_, Err(e)) => {
            let why = stderr_of(&mut child);
            Err(Error::Invalid(format!(
                "replica {target} unreachable: {why}{e}"
            )))
        }
    }
}

/// Ends the receiver; its exit code and the last line it wrote to stderr.
fn stop(child: &mut Child) -> (Option<i32>, String) {
    let mut s = String::new();
    if let Some(mut e) = child.stderr.take() {
        // The receiver exits after an error; give it a moment to say why.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(2);
        while child.try_wait().ok().flatten().is_none() && std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        let _ = child.kill();
        let _ = e.read_to_string(&mut s);
    } else {
        let _ = child.kill();
    }
    let code = child.wait().ok().and_then(|st| st.code());
    let line = s.lines().last().unwrap_or("").trim();
    let line = line
        .strip_prefix("drfs receive: ")
        .unwrap_or(line)
        .to_string();
    (code, line)
}

fn stderr_of(child: &mut Child) -> String {
    let (_, line) = stop(child);
    if line.is_empty() {
        line
    } else {
        format!("{line}; ")
    }
}

impl Conn {
    /// Waits for a receiver that said goodbye.
    pub fn finish(mut self) {
        drop(self.w);
        let _ = self.child.wait();
    }

    /// Ends a failed stream: the receiver's exit code and its last stderr line.
    pub fn abort(mut self) -> (Option<i32>, String) {
        drop(self.w);
        stop(&mut self.child)
    }
}
