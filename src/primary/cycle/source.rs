//! The tracker's cut as what a cycle sends (`ship::Source`): the cut's files that are in
//! its manifest, each with its frozen blocks (or, under resync, all of them), read as the
//! cut saw them through the copy-on-write layer.

use std::collections::HashSet;

use crate::error::Result;
use crate::model::{FileId, RelPath};
use crate::primary::track::cut::{Cut, CutFile};
use crate::ship::{Blocks, Source, SourceFile};
use crate::sys::Holes;

pub struct CutSource<'a> {
    files: Vec<&'a CutFile>,
}

impl<'a> CutSource<'a> {
    /// The files of `cut` its manifest lists (one that vanished before the walk is not).
    pub fn new(cut: &'a Cut) -> CutSource<'a> {
        let in_manifest: HashSet<FileId> = cut.entries.iter().filter_map(|e| e.id).collect();
        CutSource {
            files: cut
                .files
                .iter()
                .filter(|f| in_manifest.contains(&f.id))
                .collect(),
        }
    }
}

impl Source for CutSource<'_> {
    fn files(&self) -> Vec<&dyn SourceFile> {
        self.files.iter().map(|f| *f as &dyn SourceFile).collect()
    }
}

impl SourceFile for CutFile {
    fn id(&self) -> FileId {
        self.id
    }

    fn path(&self) -> &RelPath {
        &self.path
    }

    fn size(&self) -> u64 {
        self.cow.cut_size
    }

    fn whole(&self) -> bool {
        self.resync
    }

    fn changed(&self) -> Vec<(u64, u64)> {
        self.ft.frozen_ranges()
    }

    fn pieces(&self, b: u64) -> Option<u64> {
        self.pieces.get(&b).copied()
    }

    fn blocks(&self) -> Box<dyn Blocks + '_> {
        Box::new(CutBlocks {
            f: self,
            holes: Holes::new(&self.ft.fd),
            bs: self.cow.block_size(),
        })
    }
}

/// A cut file's blocks: from the side file where a write after the cut preserved them,
/// else from the store file; holes are known zero without reading.
struct CutBlocks<'a> {
    f: &'a CutFile,
    holes: Holes<'a>,
    bs: u64,
}

impl Blocks for CutBlocks<'_> {
    fn surely_zero(&mut self, b: u64) -> bool {
        self.holes.hole(b * self.bs, self.bs) && !self.f.cow.preserved(b)
    }

    fn read(&mut self, b: u64, buf: &mut Vec<u8>) -> Result<bool> {
        let hole = self.holes.hole(b * self.bs, self.bs);
        self.f.cow.read(&self.f.ft.fd, b, buf, hole)
    }
}
