//! The vocabulary every layer speaks, with no I/O: file ids and random ids, store-relative
//! paths, block runs, a recovery point's manifest and summary, retention policies, a
//! protected store's settings and its replication target, and how quantities and times
//! are written. Nothing here imports anything else of drfs but `error`.

pub mod fmt;
pub mod id;
pub mod lineage;
pub mod manifest;
pub mod progress;
pub mod relpath;
pub mod retention;
pub mod runs;
pub mod settings;
pub mod target;

pub use id::{FileId, new_id};
pub use manifest::{Consistency, Entry, Kind, Manifest, Origin, PointInfo, PointRef};
pub use relpath::RelPath;
pub use settings::{Group, Interval};
pub use target::Target;
