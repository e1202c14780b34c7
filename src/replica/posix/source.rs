//! A point of a POSIX replica as what a cycle sends (`ship::Source`): extended
//! replication's onward cycles (A → B → C) send B's latest point to C. The blocks that
//! changed between the point C holds and this one are exactly those the undo records in
//! between hold (`rollback::differing`), so nothing is compared and nothing else is
//! read; with no common point every file is `whole` (compared block by block by BLAKE3).
//! Every block is read through the point reader, so it is checked against its BLAKE3
//! before it leaves, and reads stay right while cycles from A apply.

use std::collections::BTreeMap;

use crate::error::Result;
use crate::model::{FileId, Kind, PointInfo, RelPath};
use crate::replica::posix::Replica;
use crate::replica::posix::read::PointFile;
use crate::replica::posix::rollback::differing;
use crate::ship::{Blocks, Source, SourceFile};

/// Point `to` of `r`, for a replica that holds point `from` (None: nothing in common).
pub struct PointSource {
    files: Vec<PointSourceFile>,
}

struct PointSourceFile {
    id: FileId,
    path: RelPath,
    size: u64,
    whole: bool,
    changed: Vec<(u64, u64)>,
    reader: PointFile,
    bs: u64,
}

impl PointSource {
    pub fn new(r: &Replica, from: Option<&PointInfo>, to: &PointInfo) -> Result<PointSource> {
        let m = r.manifest(&to.id)?;
        let changed: Option<BTreeMap<FileId, Vec<[u64; 2]>>> = match from {
            Some(f) => Some(differing(r, f, to, &m, &r.manifest(&f.id)?)?),
            None => None,
        };
        let mut seen = std::collections::BTreeSet::new();
        let mut files = Vec::new();
        for e in m.entries.iter().filter(|e| e.kind == Kind::File) {
            let Some(id) = e.id else { continue };
            if !seen.insert(id) {
                continue;
            }
            files.push(PointSourceFile {
                id,
                path: e.path.clone(),
                size: e.size,
                whole: changed.is_none(),
                changed: changed
                    .as_ref()
                    .and_then(|c| c.get(&id))
                    .map(|runs| runs.iter().map(|x| (x[0], x[1])).collect())
                    .unwrap_or_default(),
                reader: PointFile::open(r, to, e, false)?,
                bs: r.cfg.block_size,
            });
        }
        Ok(PointSource { files })
    }
}

impl Source for PointSource {
    fn files(&self) -> Vec<&dyn SourceFile> {
        self.files.iter().map(|f| f as &dyn SourceFile).collect()
    }
}

impl SourceFile for PointSourceFile {
    fn id(&self) -> FileId {
        self.id
    }

    fn path(&self) -> &RelPath {
        &self.path
    }

    fn size(&self) -> u64 {
        self.size
    }

    fn whole(&self) -> bool {
        self.whole
    }

    fn changed(&self) -> Vec<(u64, u64)> {
        self.changed.clone()
    }

    fn blocks(&self) -> Box<dyn Blocks + '_> {
        Box::new(PointBlocks { f: self })
    }
}

struct PointBlocks<'a> {
    f: &'a PointSourceFile,
}

impl Blocks for PointBlocks<'_> {
    fn surely_zero(&mut self, _b: u64) -> bool {
        false
    }

    fn read(&mut self, b: u64, buf: &mut Vec<u8>) -> Result<bool> {
        let f = self.f;
        let off = b * f.bs;
        let len = (f.size.saturating_sub(off)).min(f.bs) as usize;
        buf.resize(len, 0);
        let (got, bad) = f
            .reader
            .read_checked(buf, b)
            .map_err(|e| crate::error::Error::Io {
                path: f.path.under(std::path::Path::new("/")),
                source: e,
            })?;
        if let Some(bad) = bad {
            return Err(crate::error::Error::operator(format!(
                "{}: the block at byte {off} {}; nothing was sent onward",
                f.path,
                bad.why()
            )));
        }
        buf[got..].fill(0);
        Ok(crate::sys::is_zero(buf))
    }
}
