//! Reaching a replica's receiver: a target (`model::Target`) becomes a `Link`, the
//! stream protocol's two directions to a `drfs receive` child process (`local` for a
//! directory on this host, `ssh` for one on another host through the system's ssh
//! client), opened by the greeting (`wire::greeting`: banner, version agreed), with the
//! receiver's exit code and last words when the stream ends badly.

pub mod limit;
pub mod local;
pub mod ssh;

use std::collections::VecDeque;
use std::io::{BufRead, BufReader, Read, Write};
use std::process::{Child, ChildStderr};
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::error::{Class, Error, Result};
use crate::model::Target;
use crate::model::settings::BwLimit;
use crate::wire::compress::{self, Compress, Counted};
use crate::wire::greeting::{self, Opening};
use crate::wire::{Reader, WireError, Writer};

/// How a store reaches its replica, beyond the target itself (kept in `state.toml`).
#[derive(Debug, Clone)]
pub struct Options {
    /// The ssh client command for `ssh://` targets (`--ssh-command`); the environment
    /// variable `DRFS_SSH_COMMAND` overrides it.
    pub ssh_command: Option<String>,
    /// How the stream to the receiver is compressed.
    pub compress: Compress,
    /// The cap on the bytes per second on the wire (`--bwlimit`).
    pub bwlimit: Option<BwLimit>,
}

impl Options {
    /// The options a store's settings give.
    pub fn of(rep: &crate::state::Replication) -> Options {
        Options {
            ssh_command: rep.ssh_command.clone(),
            compress: rep
                .compress
                .unwrap_or_else(|| default_compress(&rep.target)),
            bwlimit: rep.bwlimit.clone(),
        }
    }
}

pub type LinkWriter = Writer<Box<dyn Write + Send>>;
pub type LinkReader = Reader<BufReader<Box<dyn Read + Send>>>;

/// An open stream to a receiver.
pub struct Link {
    child: Child,
    stderr: Stderr,
    wire: Arc<AtomicU64>,
    compress: Compress,
    pub w: LinkWriter,
    pub r: LinkReader,
}

/// The compression a target gets unless `--compress` says otherwise: zstd at its default
/// level over ssh, none to a local directory (the pipe is faster than the compressor).
pub fn default_compress(target: &Target) -> Compress {
    match target {
        Target::Local(_) => Compress::None,
        _ => Compress::Zstd(crate::model::settings::DEFAULT_LEVEL),
    }
}

/// Connects to the receiver of `target`.
pub fn connect(target: &Target, o: &Options) -> Result<Link> {
    match target {
        Target::Local(dir) => local::connect(dir, o),
        Target::Ssh { .. } => ssh::connect(target, o),
        Target::S3 { .. } => Err(Error::Invalid(target.local().err().unwrap_or_default())),
    }
}

/// Why a link could not open, from the child's exit code, its last lines on stderr and
/// what the greeting met.
pub type Diagnose<'a> = &'a dyn Fn(Option<i32>, &[String], Failure) -> Error;

/// What went wrong while the stream opened.
#[derive(Debug)]
pub enum Failure {
    /// The far side printed something that is not drfs's banner.
    Noise(String),
    /// No version in common.
    Version(String),
    /// The stream broke (often: the child ended before it said anything).
    Stream(WireError),
}

impl Link {
    /// Opens the stream to the receiver `child` runs: reads its banner and versions,
    /// answers with the version both speak. `diagnose` says why it failed.
    fn open(mut child: Child, o: &Options, diagnose: Diagnose<'_>) -> Result<Link> {
        let compress = o.compress;
        let stderr = Stderr::drain(child.stderr.take());
        let (Some(stdin), Some(stdout)) = (child.stdin.take(), child.stdout.take()) else {
            return Err(Error::Link("the receiver's pipes are missing".into()));
        };
        let mut out = Counted::new(stdin);
        let wire = out.count.clone();
        let stdout: Box<dyn Read + Send> = Box::new(stdout);
        let mut r = BufReader::with_capacity(1 << 20, stdout);
        let opened = match greeting::opening(&mut r) {
            Ok(Opening::Speaks { min, max }) => greeting::choose(min, max)
                .map_err(|e| Failure::Version(e.to_string()))
                .and_then(|v| {
                    // Protocol 1 has no codec: such a receiver gets the stream plain.
                    let c = if v >= 2 { compress } else { Compress::None };
                    greeting::answer(&mut out, v, c.code())
                        .map(|()| (v, c))
                        .map_err(Failure::Stream)
                }),
            Ok(Opening::Noise(s)) => Err(Failure::Noise(s)),
            Err(e) => Err(Failure::Stream(e)),
        };
        let (v, c) = match opened {
            Ok(vc) => vc,
            Err(f) => {
                drop(out);
                let (code, lines) = stop(&mut child, &stderr);
                return Err(diagnose(code, &lines, f));
            }
        };
        if c != compress {
            tracing::warn!(
                "the receiver speaks protocol {v}, which has no compression: sending plain"
            );
        }
        let out: Box<dyn Write + Send> = match &o.bwlimit {
            Some(l) => Box::new(limit::Limited::new(out, l.clone())),
            None => Box::new(out),
        };
        let w: Box<dyn Write + Send> = match c {
            Compress::None => out,
            Compress::Zstd(level) => compress::encoder(out, level)
                .map_err(|e| Error::Link(format!("starting zstd: {e}")))?,
        };
        // Compressing, pacing and writing run on a thread of their own, beside the
        // reading and hashing of the next blocks.
        let w: Box<dyn Write + Send> = Box::new(
            crate::wire::pipe::Pipe::new(w)
                .map_err(|e| Error::Link(format!("starting the sending thread: {e}")))?,
        );
        Ok(Link {
            child,
            stderr,
            wire,
            compress: c,
            w: Writer::at(w, v),
            r: Reader::at(r, v),
        })
    }

    /// The bytes sent on the wire so far (after compression).
    pub fn wire_bytes(&self) -> u64 {
        self.wire.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// How the sender's half is compressed.
    pub fn compress(&self) -> Compress {
        self.compress
    }

    /// The protocol version the stream speaks.
    pub fn version(&self) -> u32 {
        self.w.version
    }

    /// Waits for a receiver that said goodbye.
    pub fn finish(mut self) {
        drop(self.w);
        let _ = self.child.wait();
    }

    /// The receiver's process id (ssh's, for an ssh target).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Ends a session that failed with `e`. A broken stream says little: then the
    /// receiver's own last words say why it stopped, and its exit code whether a retry
    /// can help (`Class::from_exit_code`).
    pub fn fail(mut self, e: Error) -> Error {
        drop(self.w);
        let (code, lines) = stop(&mut self.child, &self.stderr);
        let why = last_words(&lines);
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

/// The receiver's last line, without its `drfs receive: ` prefix.
fn last_words(lines: &[String]) -> String {
    let line = lines
        .iter()
        .rev()
        .find(|l| l.starts_with("drfs receive: "))
        .or_else(|| lines.last())
        .map_or("", |l| l.trim());
    line.strip_prefix("drfs receive: ")
        .unwrap_or(line)
        .to_string()
}

/// The child's stderr, read by a thread of its own (so a talkative child never blocks on
/// a full pipe): its last lines.
struct Stderr {
    lines: Arc<Mutex<VecDeque<String>>>,
    done: crossbeam_channel::Receiver<()>,
}

impl Stderr {
    const KEEP: usize = 32;

    fn drain(pipe: Option<ChildStderr>) -> Stderr {
        let lines = Arc::new(Mutex::new(VecDeque::new()));
        let (tx, done) = crossbeam_channel::bounded(1);
        if let Some(pipe) = pipe {
            let keep = lines.clone();
            let spawned = std::thread::Builder::new()
                .name("drfs-link-stderr".into())
                .spawn(move || {
                    for line in BufReader::new(pipe).split(b'\n').map_while(|l| l.ok()) {
                        let line = String::from_utf8_lossy(&line).trim_end().to_string();
                        tracing::debug!("receiver: {line}");
                        if let Ok(mut q) = keep.lock() {
                            if q.len() == Self::KEEP {
                                q.pop_front();
                            }
                            q.push_back(line);
                        }
                    }
                    let _ = tx.send(());
                });
            if spawned.is_err() {
                tracing::warn!("cannot start the thread that reads the receiver's stderr");
            }
        }
        Stderr { lines, done }
    }

    /// The lines so far, once the pipe closed or `wait` passed.
    fn lines(&self, wait: Duration) -> Vec<String> {
        let _ = self.done.recv_timeout(wait);
        self.lines
            .lock()
            .map(|q| q.iter().filter(|l| !l.is_empty()).cloned().collect())
            .unwrap_or_default()
    }
}

/// Ends the receiver; its exit code and its last lines on stderr.
fn stop(child: &mut Child, stderr: &Stderr) -> (Option<i32>, Vec<String>) {
    // The receiver exits after an error; give it a moment to say why.
    let deadline = Instant::now() + Duration::from_secs(2);
    while child.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    let _ = child.kill();
    let code = child.wait().ok().and_then(|st| st.code());
    (code, stderr.lines(Duration::from_secs(1)))
}
