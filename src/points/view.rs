//! A recovery point, ready to be read through any `PointStore`: its manifest, with the
//! indexes a filesystem needs (an entry by path, a directory's children, a file's
//! links), and its files opened for reading. Nothing is copied to open a point.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use parking_lot::Mutex;

use crate::error::{Error, Result};
use crate::model::{Entry, FileId, Kind, Manifest, PointInfo, RelPath};
use crate::replica::{PointRead, PointStore};

/// Indexes of a point's entries by their parent directory.
type Children = HashMap<RelPath, Vec<usize>>;

/// A point, ready to be read.
pub struct PointView {
    pub info: PointInfo,
    pub manifest: Manifest,
    store: Arc<dyn PointStore>,
    /// Directory entries by parent, built on first use.
    children: Mutex<Option<Arc<Children>>>,
    /// `allocated` answers, by file.
    alloc: Mutex<HashMap<FileId, u64>>,
}

impl PointView {
    pub fn open(store: Arc<dyn PointStore>, id: &str) -> Result<PointView> {
        let points = store.points()?;
        let Some(info) = points.into_iter().find(|p| p.id == id) else {
            return Err(Error::Invalid(format!(
                "no point {id} on {} (drfs points lists them)",
                store.location().display()
            )));
        };
        Ok(PointView {
            manifest: store.manifest(id)?,
            info,
            store,
            children: Mutex::new(None),
            alloc: Mutex::new(HashMap::new()),
        })
    }

    /// About how many bytes the file of entry `e` occupies: what its sources (the
    /// replica's file at its path, the undo records from this point on) have allocated,
    /// at most its size. An estimate, for `du` and for `cp`'s sparse-file detection.
    pub fn allocated(&self, e: &Entry) -> u64 {
        let Some(id) = e.id else {
            return 0;
        };
        if let Some(&a) = self.alloc.lock().get(&id) {
            return a;
        }
        let a = self
            .store
            .allocated(&self.info, e)
            .unwrap_or(e.size)
            .min(e.size);
        self.alloc.lock().insert(id, a);
        a
    }

    /// Where the replica the point is on is.
    pub fn replica(&self) -> &Path {
        self.store.location()
    }

    pub fn block_size(&self) -> u64 {
        self.store.block_size()
    }

    pub fn entry(&self, path: &RelPath) -> Option<(usize, &Entry)> {
        self.manifest
            .entries
            .binary_search_by(|e| e.path.cmp(path))
            .ok()
            .map(|i| (i, &self.manifest.entries[i]))
    }

    /// Indexes into the manifest of the entries directly in `dir` (root: empty path).
    pub fn children(&self, dir: &RelPath) -> Vec<usize> {
        let mut c = self.children.lock();
        let map = c.get_or_insert_with(|| {
            let mut m: Children = HashMap::new();
            for (i, e) in self.manifest.entries.iter().enumerate() {
                let b = e.path.as_bytes();
                let parent = b
                    .iter()
                    .rposition(|&x| x == b'/')
                    .map_or(&b[..0], |p| &b[..p]);
                m.entry(RelPath::from_bytes(parent)).or_default().push(i);
            }
            Arc::new(m)
        });
        map.get(dir).cloned().unwrap_or_default()
    }

    /// How many names the file of entry `e` has in this point.
    pub fn links(&self, e: &Entry) -> u32 {
        match e.id {
            Some(id) => self
                .manifest
                .entries
                .iter()
                .filter(|x| x.id == Some(id))
                .count() as u32,
            None => 1,
        }
    }

    /// Opens a file of this point for reading through the replica host's page cache.
    pub fn file(&self, e: &Entry) -> Result<Box<dyn PointRead>> {
        self.store.open(&self.info, e, false)
    }

    /// Opens a file of this point whose aligned reads bypass the replica host's page
    /// cache (O_DIRECT on the replica's files where their filesystem allows it; other
    /// reads stay buffered). For a client that reads with O_DIRECT, and for a mount whose
    /// kernel caches the point's pages itself.
    pub fn file_direct(&self, e: &Entry) -> Result<Box<dyn PointRead>> {
        self.store.open(&self.info, e, true)
    }
}

/// Every regular file of a point, for callers that walk it.
pub fn files(view: &PointView) -> impl Iterator<Item = &Entry> {
    view.manifest
        .entries
        .iter()
        .filter(|e| e.kind == Kind::File)
}
