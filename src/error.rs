//! The library's error type, and the one rule that says whether a retry can help.
//!
//! Every failure that reaches an operator reads as one line: what went wrong and where.
//! Each error has a `Class` (Azure Site Recovery's split, and a usage class): `Transient`
//! when trying again later can succeed — the link to the replica broke, the receiver went
//! away, a disk is full, something is busy; `Operator` when it cannot until someone acts —
//! the replica diverged or belongs to another store, a permission is missing, state is
//! corrupt; `Usage` when the command itself is wrong — a bad option, a path that does not
//! exist or is not a drfs store. The daemon's schedule retries only the first; every
//! command exits 1, 2 or 64 by it (`cli`); the receiver tells the sender which it was.

use std::io;
use std::path::{Path, PathBuf};

/// Whether trying again later can help.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Class {
    Transient,
    Operator,
    /// The command is wrong: it will not work as given.
    Usage,
}

impl Class {
    /// From the stream's `recoverable` flag.
    pub fn from_recoverable(recoverable: bool) -> Class {
        if recoverable {
            Class::Transient
        } else {
            Class::Operator
        }
    }

    pub fn is_transient(self) -> bool {
        self == Class::Transient
    }

    /// The exit code of a command that failed so (README: exit codes): 1 a retry may fix
    /// it, 2 it needs an operator, 64 (`EX_USAGE`) the command is wrong.
    pub fn exit_code(self) -> i32 {
        match self {
            Class::Transient => 1,
            Class::Operator => 2,
            Class::Usage => 64,
        }
    }

    /// The class a drfs process that exited with `code` failed with.
    pub fn from_exit_code(code: Option<i32>) -> Class {
        match code {
            Some(2) => Class::Operator,
            Some(64) => Class::Usage,
            _ => Class::Transient,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A system call failed on a path: the errno decides (`Io::class`).
    #[error("{}: {source}", path.display())]
    Io { path: PathBuf, source: io::Error },
    /// A command that cannot work as given: a path that does not exist or is not a
    /// store, an option out of range (usage).
    #[error("{0}")]
    Invalid(String),
    /// drfs's own state, or a replica's, is not what drfs wrote.
    #[error("{} is corrupt: {why}", path.display())]
    Corrupt { path: PathBuf, why: String },
    /// Something else holds what this needs (a lock, a mount, open files).
    #[error("{0}")]
    Busy(String),
    /// The stream to the other side broke or made no sense (a dropped link, a receiver
    /// that died, a garbled frame).
    #[error("{0}")]
    Link(String),
    /// The other side stopped reading our stream (it hung up, maybe after saying why).
    #[error("{0}")]
    Hangup(String),
    /// The other side, or a rule of drfs, refused, saying whether to retry.
    #[error("{message}")]
    Refused { message: String, class: Class },
}

pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    pub fn corrupt(path: &Path, why: impl Into<String>) -> Self {
        Error::Corrupt {
            path: path.to_path_buf(),
            why: why.into(),
        }
    }

    /// A refusal an operator must resolve.
    pub fn operator(message: impl Into<String>) -> Self {
        Error::Refused {
            message: message.into(),
            class: Class::Operator,
        }
    }

    /// A refusal a later retry can get past.
    pub fn transient(message: impl Into<String>) -> Self {
        Error::Refused {
            message: message.into(),
            class: Class::Transient,
        }
    }

    /// Encoding drfs's own record failed: a bug, not something a retry fixes.
    pub fn encode(e: impl std::fmt::Display) -> Self {
        Error::operator(format!("encoding a drfs record: {e}"))
    }

    pub fn class(&self) -> Class {
        match self {
            Error::Io { source, .. } => io_class(source),
            Error::Busy(_) | Error::Link(_) | Error::Hangup(_) => Class::Transient,
            Error::Invalid(_) => Class::Usage,
            Error::Corrupt { .. } => Class::Operator,
            Error::Refused { class, .. } => *class,
        }
    }

    /// Whether retrying later may succeed.
    pub fn recoverable(&self) -> bool {
        self.class().is_transient()
    }

    /// The errno behind an I/O failure, if there is one.
    pub fn errno(&self) -> Option<i32> {
        match self {
            Error::Io { source, .. } => source.raw_os_error(),
            _ => None,
        }
    }
}

/// A permission or a read-only filesystem needs an operator; a full disk, a network
/// filesystem that went away, an interrupted call may clear by themselves.
fn io_class(e: &io::Error) -> Class {
    match e.raw_os_error() {
        Some(libc::EACCES | libc::EPERM | libc::EROFS) => Class::Operator,
        _ => Class::Transient,
    }
}

/// Attaches the path an I/O error happened on.
pub trait At<T> {
    fn at(self, path: &Path) -> Result<T>;
}

impl<T> At<T> for io::Result<T> {
    fn at(self, path: &Path) -> Result<T> {
        self.map_err(|source| Error::Io {
            path: path.to_path_buf(),
            source,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_rule_classifies_every_error() {
        let io = |errno| Error::Io {
            path: "/x".into(),
            source: io::Error::from_raw_os_error(errno),
        };
        assert_eq!(io(libc::ENOSPC).class(), Class::Transient);
        assert_eq!(io(libc::EACCES).class(), Class::Operator);
        assert_eq!(io(libc::EROFS).class(), Class::Operator);
        assert_eq!(Error::Link("gone".into()).class(), Class::Transient);
        assert_eq!(Error::Busy("locked".into()).class(), Class::Transient);
        assert_eq!(Error::Invalid("no".into()).class(), Class::Usage);
        assert_eq!(
            Error::corrupt(Path::new("/x"), "bad").class(),
            Class::Operator
        );
        assert_eq!(Error::operator("diverged").class(), Class::Operator);
        assert_eq!(Error::transient("full").class(), Class::Transient);
        assert_eq!(Class::from_recoverable(true), Class::Transient);
    }
}
