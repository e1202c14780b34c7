//! `RelPath`: a path relative to a store root, as raw bytes, that round-trips through JSON.
//! UTF-8 names without a backslash print as themselves; a backslash prints as `\\` and a
//! byte that is not UTF-8 as `\xNN`, so every name Linux allows survives the change log,
//! the file table and `drfs changes --json`.

use std::ffi::OsStr;
use std::fmt;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Deserializer, Serialize, Serializer};

#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct RelPath(Vec<u8>);

impl RelPath {
    pub fn root() -> Self {
        RelPath(Vec::new())
    }

    pub fn from_bytes(b: &[u8]) -> Self {
        RelPath(b.to_vec())
    }

    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }

    pub fn is_root(&self) -> bool {
        self.0.is_empty()
    }

    /// The child `name` of this directory.
    pub fn join(&self, name: &OsStr) -> RelPath {
        let mut v = self.0.clone();
        if !v.is_empty() {
            v.push(b'/');
        }
        v.extend_from_slice(name.as_bytes());
        RelPath(v)
    }

    /// Whether `self` is `dir` or lies below it.
    pub fn starts_with(&self, dir: &RelPath) -> bool {
        dir.0.is_empty()
            || self.0 == dir.0
            || (self.0.starts_with(&dir.0) && self.0.get(dir.0.len()) == Some(&b'/'))
    }

    /// Replaces the leading `from` directory by `to` (for a directory rename).
    pub fn rebase(&self, from: &RelPath, to: &RelPath) -> RelPath {
        let rest = &self.0[from.0.len()..];
        let mut v = to.0.clone();
        v.extend_from_slice(rest);
        RelPath(v)
    }

    /// The first component: the consistency-group folder of a file (e.g. one VM).
    pub fn top(&self) -> &[u8] {
        self.0.split(|&b| b == b'/').next().unwrap_or(&[])
    }

    pub fn to_path(&self) -> &Path {
        Path::new(OsStr::from_bytes(&self.0))
    }

    /// The absolute path under `root`.
    pub fn under(&self, root: &Path) -> PathBuf {
        if self.0.is_empty() {
            root.to_path_buf()
        } else {
            root.join(self.to_path())
        }
    }

    /// Parses the printed form back (the inverse of `Display`).
    pub fn parse(s: &str) -> Option<RelPath> {
        let b = s.as_bytes();
        let mut out = Vec::with_capacity(b.len());
        let mut i = 0;
        while i < b.len() {
            if b[i] != b'\\' {
                out.push(b[i]);
                i += 1;
                continue;
            }
            match b.get(i + 1) {
                Some(b'\\') => {
                    out.push(b'\\');
                    i += 2;
                }
                Some(b'x') => {
                    let hex = s.get(i + 2..i + 4)?;
                    out.push(u8::from_str_radix(hex, 16).ok()?);
                    i += 4;
                }
                _ => return None,
            }
        }
        Some(RelPath(out))
    }
}

impl fmt::Display for RelPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for chunk in self.0.utf8_chunks() {
            for c in chunk.valid().chars() {
                if c == '\\' {
                    f.write_str("\\\\")?;
                } else {
                    write!(f, "{c}")?;
                }
            }
            for b in chunk.invalid() {
                write!(f, "\\x{b:02x}")?;
            }
        }
        Ok(())
    }
}

impl fmt::Debug for RelPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", self.to_string())
    }
}

impl Serialize for RelPath {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for RelPath {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        RelPath::parse(&s).ok_or_else(|| serde::de::Error::custom("bad escaped path"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_odd_names() {
        for raw in [&b"vm1/disk.img"[..], b"a\\b", b"bad\xff\xfename", b"\\x41"] {
            let p = RelPath::from_bytes(raw);
            let s = p.to_string();
            assert_eq!(RelPath::parse(&s).as_ref(), Some(&p), "{s}");
        }
    }

    #[test]
    fn prefix_and_rebase() {
        let p = RelPath::from_bytes(b"vm1/disks/a.img");
        let d = RelPath::from_bytes(b"vm1");
        assert!(p.starts_with(&d));
        assert!(!RelPath::from_bytes(b"vm10/a").starts_with(&d));
        let q = p.rebase(&d, &RelPath::from_bytes(b"vm2"));
        assert_eq!(q.to_string(), "vm2/disks/a.img");
        assert_eq!(p.top(), b"vm1");
    }
}
