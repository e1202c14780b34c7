//! What a recovery point is: its manifest (the tree at the cut: every entry with its
//! kind, file id, size, mode, owner, mtime), its consistency, and the summary a replica
//! keeps of it (`PointInfo`) and names it by (`PointRef`). These are the on-disk
//! `manifest.json` and `point.json` (format v1) and travel in the stream's `commit`.

use serde::{Deserialize, Serialize};

use crate::model::{FileId, RelPath};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Consistency {
    Crash,
    Application,
}

/// What kind of entry a manifest line is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    File,
    Dir,
    Symlink,
    Fifo,
    Socket,
    Char,
    Block,
}

/// One entry of a point's tree.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Entry {
    pub path: RelPath,
    pub kind: Kind,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<FileId>,
    #[serde(default)]
    pub size: u64,
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub mtime_ns: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target: Option<RelPath>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rdev: Option<u64>,
}

/// A point's description: what the primary held at the cut.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    pub version: u32,
    pub generation: u64,
    pub cut_id: String,
    pub time: String,
    pub time_ns: i64,
    pub consistency: Consistency,
    pub block_size: u64,
    /// Per consistency group ("" for the whole store), the cut instant.
    #[serde(default)]
    pub groups: Vec<(String, i64)>,
    pub entries: Vec<Entry>,
    /// A point that is not a cut of the primary: a failover's roll-back to an older
    /// point, or the state a store held when it diverged.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub origin: Option<Origin>,
}

/// Where a point that is not a cut came from.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", tag = "kind")]
pub enum Origin {
    /// A failover rolled the files back to point `point`: this point holds its content.
    Restores { point: String },
    /// What a store held when it was made the replica of another (`drfs reprotect`):
    /// writes the other never got.
    Diverged { store: String },
}

/// A reference to a replica's point.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PointRef {
    pub id: String,
    pub generation: u64,
    pub cut_id: String,
}

pub const POINT_VERSION: u32 = 1;

/// A point's summary (`points/<id>/point.json`), as `drfs points --json` prints it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PointInfo {
    pub id: String,
    pub time: String,
    pub consistency: Consistency,
    pub generation: u64,
    pub files: usize,
    pub bytes_changed: u64,
    pub time_ns: i64,
    pub cut_id: String,
    /// What a store held when it diverged (see `Origin::Diverged`).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub diverged: bool,
    /// The point whose content a failover's roll-back made this one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub restores: Option<String>,
}

impl PointInfo {
    pub fn to_ref(&self) -> PointRef {
        PointRef {
            id: self.id.clone(),
            generation: self.generation,
            cut_id: self.cut_id.clone(),
        }
    }
}

pub fn point_id(generation: u64) -> String {
    format!("{generation:08}")
}
