//! The library's error type. Every failure that reaches an operator reads as one line:
//! what went wrong and on which path. The CLI wraps these in anyhow for context.

use std::io;
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{}: {source}", path.display())]
    Io { path: PathBuf, source: io::Error },
    #[error("{0}")]
    Invalid(String),
    #[error("{} is corrupt: {why}", path.display())]
    Corrupt { path: PathBuf, why: String },
    #[error("{0}")]
    Busy(String),
    /// The replica refused, or a cycle failed in a way that says whether to retry.
    #[error("{message}")]
    Refused { message: String, recoverable: bool },
}

pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    pub fn corrupt(path: &Path, why: impl Into<String>) -> Self {
        Error::Corrupt {
            path: path.to_path_buf(),
            why: why.into(),
        }
    }

    /// Whether retrying later may succeed (Azure Site Recovery's recoverable errors:
    /// network, disk full, memory); permissions, diverged or corrupt state are not.
    pub fn recoverable(&self) -> bool {
        match self {
            Error::Io { source, .. } => !matches!(
                source.raw_os_error(),
                Some(libc::EACCES | libc::EPERM | libc::EROFS)
            ),
            Error::Corrupt { .. } => false,
            Error::Refused { recoverable, .. } => *recoverable,
            Error::Invalid(_) | Error::Busy(_) => true,
        }
    }

    /// The errno behind an I/O failure, if there is one.
    pub fn errno(&self) -> Option<i32> {
        match self {
            Error::Io { source, .. } => source.raw_os_error(),
            _ => None,
        }
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
