//! Reaching a replica's receiver: a target (`model::Target`) becomes a `Link`, the
//! stream protocol's two directions to a `drfs receive` child process (for a local
//! directory today, `local`; over ssh later), with the receiver's exit code and last
//! words when the stream ends badly.

pub mod local;

use std::io::{BufReader, BufWriter, Read};
use std::process::{Child, ChildStdin, ChildStdout};

use crate::error::{Class, Error, Result};
use crate::model::Target;
use crate::wire::{Reader, WireError, Writer};

/// An open stream to a receiver.
pub struct Link {
    child: Child,
    pub w: Writer<BufWriter<ChildStdin>>,
    pub r: Reader<BufReader<ChildStdout>>,
}

/// Connects to the receiver of `target`.
pub fn connect(target: &Target) -> Result<Link> {
    let dir = target.local().map_err(Error::Invalid)?;
    local::connect(dir)
}

impl Link {
    /// A link whose stream opened (`w`, `r`: the protocol's greeting both ways), or why not.
    fn open(
        mut child: Child,
        w: std::result::Result<Writer<BufWriter<ChildStdin>>, WireError>,
        r: std::result::Result<Reader<BufReader<ChildStdout>>, WireError>,
        target: &str,
    ) -> Result<Link> {
        match (w, r) {
            (Ok(w), Ok(r)) => Ok(Link { child, w, r }),
            (Err(e), _) | (_, Err(e)) => {
                let (_, why) = stop(&mut child);
                let why = if why.is_empty() {
                    why
                } else {
                    format!("{why}; ")
                };
                Err(Error::Link(format!(
                    "replica {target} unreachable: {why}{e}"
                )))
            }
        }
    }

    /// Waits for a receiver that said goodbye.
    pub fn finish(mut self) {
        drop(self.w);
        let _ = self.child.wait();
    }

    /// Ends a session that failed with `e`. A broken stream says little: then the
    /// receiver's own last words say why it stopped, and its exit code whether a retry
    /// can help (`Class::from_exit_code`).
    pub fn fail(mut self, e: Error) -> Error {
        drop(self.w);
        let (code, why) = stop(&mut self.child);
        tracing::warn!("replication stream failed: {e} ({why})");
        match (&e, why.is_empty()) {
            (Error::Link(_) | Error::Hangup(_), false) => Error::Refused {
                message: format!("replica: {why}"),
                class: Class::from_exit_code(code),
            },
            _ => e,
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
