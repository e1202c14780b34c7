//! What a crash cost, as the mount after it found it: how many files and blocks their
//! bitmaps mark (what the next cycle ships, crash or not), and which files need a full
//! resync, and why. Logged, and kept in `STATE/recovery.json` for `drfs status` until the
//! next crash replaces it.
//!
//! Format v1: `{version, time, after, files, blocks, bytes, resync: [{path, why}]}`.

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::error::{At, Error, Result};
use crate::model::relpath::RelPath;

pub const VERSION: u32 = 1;

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Recovery {
    pub version: u32,
    pub time: String,
    /// "daemon killed" or "host crashed".
    pub after: String,
    /// Files with blocks marked, and the blocks and bytes marked, across the store.
    pub files: u64,
    pub blocks: u64,
    pub bytes: u64,
    /// Files that need a full resync.
    pub resync: Vec<Resync>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Resync {
    pub path: RelPath,
    pub why: String,
}

fn plural(n: u64, one: &str) -> String {
    if n == 1 {
        format!("1 {one}")
    } else {
        format!("{n} {one}s")
    }
}

impl Recovery {
    pub fn new(
        after: String,
        files: u64,
        blocks: u64,
        block_size: u64,
        resync: Vec<(RelPath, String)>,
    ) -> Recovery {
        Recovery {
            version: VERSION,
            time: crate::model::fmt::rfc3339_now(),
            after,
            files,
            blocks,
            bytes: blocks * block_size,
            resync: resync
                .into_iter()
                .map(|(path, why)| Resync { path, why })
                .collect(),
        }
    }

    /// One line: "recovered after a daemon crash: N files, M blocks marked; K files
    /// need a resync (path: why; ...)".
    pub fn summary(&self) -> String {
        let what = match self.after.as_str() {
            "host crashed" => "a host crash",
            _ => "a daemon crash",
        };
        let mut s = format!(
            "recovered after {what}: {}, {} marked ({}); {} a resync",
            plural(self.files, "file"),
            plural(self.blocks, "block"),
            crate::model::fmt::human(self.bytes),
            match self.resync.len() {
                0 => "no file needs".to_string(),
                1 => "1 file needs".to_string(),
                n => format!("{n} files need"),
            }
        );
        if !self.resync.is_empty() {
            let shown: Vec<String> = self
                .resync
                .iter()
                .take(3)
                .map(|r| format!("{}: {}", r.path, r.why))
                .collect();
            let more = self.resync.len().saturating_sub(3);
            s.push_str(&format!(" ({}", shown.join("; ")));
            if more > 0 {
                s.push_str(&format!("; and {more} more"));
            }
            s.push(')');
        }
        s
    }

    pub fn log(&self) {
        if self.resync.is_empty() {
            tracing::info!("{}", self.summary());
        } else {
            tracing::warn!("{}", self.summary());
        }
    }

    pub fn save(&self, path: &Path) -> Result<()> {
        let body = serde_json::to_vec_pretty(self).map_err(Error::encode)?;
        crate::sys::write_atomic(path, &body).at(path)
    }

    /// The last recovery recorded in the state dir at `path`, if any.
    pub fn load(path: &Path) -> Option<Recovery> {
        let text = std::fs::read_to_string(path).ok()?;
        serde_json::from_str::<Recovery>(&text)
            .ok()
            .filter(|r| r.version == VERSION)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn summary_says_what_the_crash_cost() {
        let r = Recovery::new("daemon killed".into(), 3, 120, 65536, vec![]);
        assert_eq!(
            r.summary(),
            "recovered after a daemon crash: 3 files, 120 blocks marked (7.5 MiB); no file needs a resync"
        );
        let r = Recovery::new(
            "host crashed".into(),
            1,
            1,
            65536,
            vec![(
                RelPath::from_bytes(b"vm1/a.img"),
                "changed after the host restarted".into(),
            )],
        );
        assert_eq!(
            r.summary(),
            "recovered after a host crash: 1 file, 1 block marked (64.0 KiB); 1 file needs a resync (vm1/a.img: changed after the host restarted)"
        );
    }
}
