//! Pre- and post-cut hooks: what makes a point application-consistent. Around each
//! consistency group's cut instant an app-consistent cycle runs the pre hooks in order
//! (e.g. `virsh domfsfreeze vm1`, `fsfreeze -f /mnt/guest`), cuts the group, and at once
//! runs the post hooks in reverse order (the thaw), before anything ships: the freeze
//! lasts the cut, not the transfer. A pre hook that fails or outlives the timeout stops
//! the pre hooks after it and makes the point `crash`; the post hooks run whenever a pre
//! hook started, also after a failure or a timeout (a freeze that timed out may still
//! have frozen the guest; Proxmox thaws "even on error").
//!
//! Each hook is `sh -c CMD` in its own process group (a timeout kills the group), with
//! `DRFS_HOOK` (`pre` or `post`), `DRFS_GROUP` (the group's top-level folder; empty for
//! the whole store), `DRFS_STORE` (the store's path) and, for post hooks after a failed
//! pre hook, `DRFS_PRE_FAILURE=1`. Its stdout and stderr (the last 4 KiB) go to the
//! daemon's log.

use std::io::Read;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::error::{Error, Result};

/// How much of a hook's output is kept for the log.
const TAIL: usize = 4096;

/// What happened around one group's cut.
#[derive(Debug, Default)]
pub struct Around {
    /// Why the point is not application-consistent, per failing hook.
    pub failures: Vec<String>,
    pre_started: bool,
}

impl Around {
    pub fn ok(&self) -> bool {
        self.failures.is_empty()
    }
}

/// The hooks of a store, as its settings give them.
pub struct Hooks<'a> {
    pub pre: &'a [String],
    pub post: &'a [String],
    pub timeout: Duration,
    pub store: &'a Path,
}

impl Hooks<'_> {
    /// Runs the pre hooks of `group` in order, stopping at the first that fails.
    pub fn pre(&self, group: &str, a: &mut Around) {
        for cmd in self.pre {
            a.pre_started = true;
            if let Err(e) = self.run(cmd, "pre", group, false) {
                a.failures.push(e);
                return;
            }
        }
    }

    /// Runs the post hooks of `group` in reverse order, if a pre hook started (or there
    /// are none).
    pub fn post(&self, group: &str, a: &mut Around) {
        if !a.pre_started && !self.pre.is_empty() {
            return;
        }
        let failed = !a.failures.is_empty();
        for cmd in self.post.iter().rev() {
            if let Err(e) = self.run(cmd, "post", group, failed) {
                a.failures.push(e);
            }
        }
    }

    /// One hook: Ok, or why not in one line (its stderr is in the log).
    fn run(
        &self,
        cmd: &str,
        phase: &str,
        group: &str,
        pre_failed: bool,
    ) -> std::result::Result<(), String> {
        let started = Instant::now();
        let mut c = Command::new("/bin/sh");
        c.arg("-c")
            .arg(cmd)
            .env("DRFS_HOOK", phase)
            .env("DRFS_GROUP", group)
            .env("DRFS_STORE", self.store)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0);
        if pre_failed {
            c.env("DRFS_PRE_FAILURE", "1");
        }
        let mut child = c
            .spawn()
            .map_err(|e| format!("{phase}-cut hook {cmd:?}: cannot start: {e}"))?;
        let out = tail_of(child.stdout.take());
        let err = tail_of(child.stderr.take());
        let deadline = started + self.timeout;
        let status = loop {
            match child.try_wait() {
                Ok(Some(s)) => break Some(s),
                Ok(None) if Instant::now() >= deadline => break None,
                Ok(None) => std::thread::sleep(Duration::from_millis(10)),
                Err(e) => return Err(format!("{phase}-cut hook {cmd:?}: {e}")),
            }
        };
        if status.is_none() {
            // Its whole process group: sh and what it started.
            unsafe { libc::kill(-(child.id() as i32), libc::SIGKILL) };
            let _ = child.wait();
        }
        let (out, err) = (
            out.join().unwrap_or_default(),
            err.join().unwrap_or_default(),
        );
        let group_name = if group.is_empty() { "the store" } else { group };
        let ms = started.elapsed().as_millis();
        if !out.trim().is_empty() {
            tracing::info!(
                "{phase}-cut hook {cmd:?} ({group_name}) said: {}",
                out.trim()
            );
        }
        let why = match status {
            Some(s) if s.success() => {
                tracing::info!("{phase}-cut hook {cmd:?} ({group_name}) done in {ms} ms");
                return Ok(());
            }
            Some(s) => format!("{phase}-cut hook {cmd:?} ({group_name}) failed ({s})"),
            None => format!(
                "{phase}-cut hook {cmd:?} ({group_name}) timed out after {} s and was killed",
                self.timeout.as_secs_f64()
            ),
        };
        tracing::warn!("{why}; its stderr: {}", err.trim());
        Err(why)
    }
}

/// Reads a pipe to its end in a thread; the last `TAIL` bytes as text.
fn tail_of<R: Read + Send + 'static>(r: Option<R>) -> std::thread::JoinHandle<String> {
    std::thread::spawn(move || {
        let Some(mut r) = r else {
            return String::new();
        };
        let mut keep = Vec::new();
        let mut buf = [0u8; 4096];
        while let Ok(n) = r.read(&mut buf) {
            if n == 0 {
                break;
            }
            keep.extend_from_slice(&buf[..n]);
            if keep.len() > TAIL {
                keep.drain(..keep.len() - TAIL);
            }
        }
        String::from_utf8_lossy(&keep).into_owned()
    })
}

/// Checks that a hook's command can run: its first word is an executable file (a path,
/// or found in PATH) or a shell builtin the hook may use.
pub fn check(cmd: &str, what: &str) -> Result<()> {
    let Some(first) = cmd.split_whitespace().next() else {
        return Err(Error::Invalid(format!("{what} is empty")));
    };
    if ["true", "false", "exit", "echo", "test", "[", ":", "sleep"].contains(&first) {
        return Ok(());
    }
    let exec = |p: &Path| {
        use std::os::unix::fs::PermissionsExt;
        p.metadata()
            .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
    };
    let found = if first.contains('/') {
        exec(Path::new(first))
    } else {
        std::env::var_os("PATH")
            .map(|p| std::env::split_paths(&p).any(|d| exec(&d.join(first))))
            .unwrap_or(false)
    };
    if found {
        Ok(())
    } else {
        Err(Error::Invalid(format!(
            "{what} {cmd:?}: {first} is not an executable file (give a path or a command in PATH)"
        )))
    }
}
