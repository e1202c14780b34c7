//! Ids: a file's stable id (`FileId`, random, kept through renames) and the random ids of
//! stores, replicas and cuts.

use std::fmt;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// A random 64-bit id as 16 hex digits.
pub fn new_id() -> String {
    let mut b = [0u8; 8];
    if getrandom::fill(&mut b).is_err() {
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64);
        b = (t ^ u64::from(std::process::id())).to_le_bytes();
    }
    format!("{:016x}", u64::from_le_bytes(b))
}

/// A file's stable id: random, given once, kept through renames. Printed as 16 hex digits.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct FileId(pub u64);

impl Default for FileId {
    fn default() -> Self {
        FileId::new()
    }
}

impl FileId {
    pub fn new() -> FileId {
        let hex = new_id();
        FileId(u64::from_str_radix(&hex, 16).unwrap_or(1))
    }

    pub fn parse(s: &str) -> Option<FileId> {
        (s.len() == 16)
            .then(|| u64::from_str_radix(s, 16).ok())
            .flatten()
            .map(FileId)
    }
}

impl fmt::Display for FileId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:016x}", self.0)
    }
}

impl fmt::Debug for FileId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{self}")
    }
}

impl Serialize for FileId {
    fn serialize<S: Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for FileId {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        FileId::parse(&s).ok_or_else(|| serde::de::Error::custom("bad file id"))
    }
}
