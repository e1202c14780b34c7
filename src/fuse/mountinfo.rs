//! Reading `/proc/self/mountinfo`: which filesystem is mounted where, so `drfs mount` can
//! find and replace a stale mount left by a killed daemon, and `drfs unmount` can find the
//! store behind a mountpoint (drfs mounts carry `drfs:<store>` as their source).

use std::path::{Path, PathBuf};

pub const SOURCE_PREFIX: &str = "drfs:";
/// The source of a `drfs browse` mount (followed by the replica).
pub const BROWSE_PREFIX: &str = "drfs-browse:";
/// The source of a `drfs test-failover` clone (followed by the replica).
pub const TEST_FAILOVER_PREFIX: &str = "drfs-clone:";

#[derive(Debug, Clone)]
pub struct Entry {
    pub dev: String,
    pub mountpoint: PathBuf,
    pub fstype: String,
    pub source: String,
}

impl Entry {
    /// The store of a drfs mount.
    pub fn store(&self) -> Option<PathBuf> {
        self.source.strip_prefix(SOURCE_PREFIX).map(PathBuf::from)
    }
}

/// Undoes mountinfo's octal escapes (`\040` for a space, and so on).
fn unescape(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 4 <= b.len() {
            if let Ok(v) = u8::from_str_radix(&s[i + 1..i + 4], 8) {
                out.push(v);
                i += 4;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn parse_line(line: &str) -> Option<Entry> {
    let (left, right) = line.split_once(" - ")?;
    let l: Vec<&str> = left.split(' ').collect();
    let r: Vec<&str> = right.split(' ').collect();
    Some(Entry {
        dev: (*l.get(2)?).to_string(),
        mountpoint: PathBuf::from(unescape(l.get(4)?)),
        fstype: (*r.first()?).to_string(),
        source: unescape(r.get(1)?),
    })
}

pub fn all() -> Vec<Entry> {
    std::fs::read_to_string("/proc/self/mountinfo")
        .map(|t| t.lines().filter_map(parse_line).collect())
        .unwrap_or_default()
}

/// The topmost mount at `mountpoint` (an absolute, canonical path).
pub fn at(mountpoint: &Path) -> Option<Entry> {
    all().into_iter().rfind(|e| e.mountpoint == mountpoint)
}

/// Whether the entry is a FUSE mount drfs made (a store, a browse, a clone).
pub fn is_drfs(e: &Entry) -> bool {
    e.fstype.starts_with("fuse")
        && [SOURCE_PREFIX, BROWSE_PREFIX, TEST_FAILOVER_PREFIX]
            .iter()
            .any(|p| e.source.starts_with(p))
}

/// The store behind `path` when a drfs store is mounted at `path` (operators naturally name
/// the mountpoint); otherwise `path` itself.
pub fn behind(path: &Path) -> PathBuf {
    let Ok(canon) = path.canonicalize() else {
        return path.to_path_buf();
    };
    at(&canon)
        .filter(is_drfs)
        .and_then(|e| e.store())
        .unwrap_or(canon)
}

/// Every drfs mount of `store`.
pub fn of_store(store: &Path) -> Vec<Entry> {
    all()
        .into_iter()
        .filter(|e| is_drfs(e) && e.store().as_deref() == Some(store))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_fuse_line_with_spaces() {
        let l = r"612 29 0:70 / /tmp/my\040mnt rw,nosuid,nodev,relatime shared:300 - fuse drfs:/srv/vm\040store rw,user_id=0,group_id=0";
        let e = parse_line(l).unwrap();
        assert_eq!(e.mountpoint, PathBuf::from("/tmp/my mnt"));
        assert_eq!(e.dev, "0:70");
        assert!(is_drfs(&e));
        assert_eq!(e.store(), Some(PathBuf::from("/srv/vm store")));
    }
}
