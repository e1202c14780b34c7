//! Sending a source's data: for each file, its changed blocks (as the cut saw them), or for
//! a `whole` file every block whose BLAKE3 differs from the replica's. Holes and zero blocks
//! travel as zero blocks (no data), runs of them as one frame; each block carries its
//! BLAKE3 for the receiver to check. A changed block of which the source knows the only
//! 4 KiB pieces that changed travels as those pieces (`wire::Partial`, protocol 3 on),
//! with the BLAKE3 of the whole block they make.

use std::io::{Read, Write};

use crate::error::{Error, Result};
use crate::model::FileId;
use std::sync::Arc;

use crate::model::progress::Progress;
use crate::ship::{Blocks, SourceFile, refused, wire_err};
use crate::wire::{
    Block, BlockHash, Frame, Msg, PARTIAL_VERSION, PIECE, Partial, Reader, Writer, zero_hash,
};

/// How many blocks one hash request covers: its answer (33 bytes a block) must fit in a
/// pipe buffer, so the sender and receiver can never block on each other.
const REGION: u64 = 1024;

#[derive(Debug, Default, Clone, Copy)]
pub struct Stats {
    pub blocks: u64,
    pub data_bytes: u64,
    pub zero_blocks: u64,
    pub same_blocks: u64,
    /// Blocks sent as their changed pieces.
    pub partial_blocks: u64,
}

/// The bytes a file will cost at most (for progress).
pub fn planned(f: &dyn SourceFile, bs: u64) -> u64 {
    if f.whole() {
        return f.size();
    }
    let blocks = f.size().div_ceil(bs);
    f.changed()
        .iter()
        .map(|&(a, b)| b.min(blocks).saturating_sub(a))
        .sum::<u64>()
        * bs
}

pub struct Shipper<'a, W: Write, R: Read> {
    pub w: &'a mut Writer<W>,
    pub r: &'a mut Reader<R>,
    pub bs: u64,
    pub stats: Stats,
    pub progress: Option<Arc<dyn Progress>>,
    /// An earlier attempt of this cycle broke off: the receiver may hold some changed
    /// blocks staged already, so changed blocks too are compared by hash first.
    pub resume: bool,
    zero: [u8; 32],
    buf: Vec<u8>,
    /// Whole zero blocks waiting to travel as one run: (file, first block, count).
    run: Option<(FileId, u64, u64)>,
}

impl<'a, W: Write, R: Read> Shipper<'a, W, R> {
    pub fn new(
        w: &'a mut Writer<W>,
        r: &'a mut Reader<R>,
        bs: u64,
        progress: Option<Arc<dyn Progress>>,
    ) -> Self {
        Shipper {
            w,
            r,
            bs,
            stats: Stats::default(),
            progress,
            resume: false,
            zero: zero_hash(bs as usize),
            buf: Vec::with_capacity(bs as usize),
            run: None,
        }
    }

    /// Sends block `b` from the buffer the last read filled (a block is read once per
    /// cycle: the read marks it shipped, after which writes no longer preserve it).
    fn send_buf(&mut self, f: &dyn SourceFile, b: u64, zero: bool) -> Result<()> {
        let len = self.buf.len();
        if zero && len == self.bs as usize {
            return self.zero_block(f, b);
        }
        self.flush_run()?;
        let hash = match (zero, len == self.bs as usize) {
            (true, true) => self.zero,
            (true, false) => zero_hash(len),
            (false, _) => *blake3::hash(&self.buf).as_bytes(),
        };
        let block = Block {
            id: f.id(),
            offset: b * self.bs,
            len: len as u32,
            zero,
            hash,
            data: if zero {
                Vec::new()
            } else {
                std::mem::take(&mut self.buf)
            },
        };
        self.w.block(&block).map_err(wire_err)?;
        if !zero {
            self.buf = block.data;
        }
        self.stats.blocks += 1;
        if zero {
            self.stats.zero_blocks += 1;
        } else {
            self.stats.data_bytes += len as u64;
        }
        self.tick(len as u64);
        Ok(())
    }

    /// Sends pieces `mask` of block `b` from the buffer the last read filled (the whole
    /// block when they are all of it, or none of it).
    fn send_pieces(&mut self, f: &dyn SourceFile, b: u64, mask: u64) -> Result<()> {
        let len = self.buf.len() as u32;
        let n = (len as usize).div_ceil(PIECE) as u32;
        let within = if n >= 64 { u64::MAX } else { (1 << n) - 1 };
        let mask = mask & within;
        if mask == 0 || mask == within {
            return self.send_buf(f, b, false);
        }
        self.flush_run()?;
        let mut p = Partial {
            id: f.id(),
            offset: b * self.bs,
            len,
            hash: *blake3::hash(&self.buf).as_bytes(),
            data: 0,
            zero: 0,
            bytes: Vec::with_capacity(mask.count_ones() as usize * PIECE),
        };
        for i in (0..n).filter(|i| mask & (1 << i) != 0) {
            let piece = &self.buf[Partial::piece(len, i)];
            if crate::sys::is_zero(piece) {
                p.zero |= 1 << i;
            } else {
                p.data |= 1 << i;
                p.bytes.extend_from_slice(piece);
            }
        }
        self.w.partial(&p).map_err(wire_err)?;
        self.stats.blocks += 1;
        self.stats.partial_blocks += 1;
        self.stats.data_bytes += p.bytes.len() as u64;
        self.tick(u64::from(len));
        Ok(())
    }

    /// Adds a whole zero block to the pending run (runs of holes travel as one frame).
    fn zero_block(&mut self, f: &dyn SourceFile, b: u64) -> Result<()> {
        let max = u64::from(u32::MAX) / self.bs;
        match &mut self.run {
            Some((id, first, n)) if *id == f.id() && *first + *n == b && *n < max => *n += 1,
            _ => {
                self.flush_run()?;
                self.run = Some((f.id(), b, 1));
            }
        }
        self.stats.blocks += 1;
        self.stats.zero_blocks += 1;
        self.tick(self.bs);
        Ok(())
    }

    /// Sends the pending run of zero blocks, if any.
    pub fn flush_run(&mut self) -> Result<()> {
        let Some((id, first, n)) = self.run.take() else {
            return Ok(());
        };
        self.w
            .block(&Block {
                id,
                offset: first * self.bs,
                len: (n * self.bs) as u32,
                zero: true,
                hash: self.zero,
                data: Vec::new(),
            })
            .map_err(wire_err)
    }

    fn tick(&self, n: u64) {
        if let Some(p) = &self.progress {
            p.add(n);
        }
    }

    /// Ships a file: its changed blocks, or, for a `whole` one, every block that differs
    /// from the replica's.
    pub fn file(&mut self, f: &dyn SourceFile) -> Result<()> {
        if f.whole() {
            self.resync(f)
        } else {
            self.dirty(f)
        }
    }

    /// Ships the changed blocks of a file.
    fn dirty(&mut self, f: &dyn SourceFile) -> Result<()> {
        if self.resume {
            return self.dirty_resumed(f);
        }
        let blocks = f.size().div_ceil(self.bs);
        let mut rd = f.blocks();
        for (a, b) in f.changed() {
            for blk in a..b.min(blocks) {
                let zero = rd.read(blk, &mut self.buf)?;
                match f.pieces(blk) {
                    Some(m) if !zero && self.w.version >= PARTIAL_VERSION => {
                        self.send_pieces(f, blk, m)?
                    }
                    _ => self.send_buf(f, blk, zero)?,
                }
                crate::sys::fault::hit_nth("send", self.stats.blocks);
            }
        }
        self.flush_run()
    }

    /// Ships the blocks of a file that differ from the replica's, found by hash.
    fn resync(&mut self, f: &dyn SourceFile) -> Result<()> {
        let blocks = f.size().div_ceil(self.bs);
        let request = |w: &mut Writer<W>, first: u64| {
            w.msg(&Msg::HashRequest {
                id: f.id(),
                path: f.path().clone(),
                first,
                count: REGION.min(blocks - first),
            })
            .map_err(wire_err)
        };
        if blocks == 0 {
            return Ok(());
        }
        request(self.w, 0)?;
        let mut rd = f.blocks();
        let mut first = 0;
        while first < blocks {
            let next = first + REGION;
            if next < blocks {
                request(self.w, next)?;
            }
            let theirs = self.read_hashes(f, first)?;
            for (i, their) in theirs.into_iter().enumerate() {
                let b = first + i as u64;
                if self.compare(f, &mut *rd, b, their)? {
                    self.stats.same_blocks += 1;
                    self.tick(self.bs);
                }
            }
            first = next;
        }
        self.flush_run()
    }

    /// Ships the changed blocks of a file that the receiver does not hold staged from an
    /// attempt that broke off: asked for by hash, a region ahead, as `resync` does.
    fn dirty_resumed(&mut self, f: &dyn SourceFile) -> Result<()> {
        let blocks = f.size().div_ceil(self.bs);
        let mut regions = Vec::new();
        for (a, b) in f.changed() {
            let mut first = a;
            while first < b.min(blocks) {
                let n = REGION.min(b.min(blocks) - first);
                regions.push((first, n));
                first += n;
            }
        }
        let request = |w: &mut Writer<W>, (first, count): (u64, u64)| {
            w.msg(&Msg::HashRequest {
                id: f.id(),
                path: f.path().clone(),
                first,
                count,
            })
            .map_err(wire_err)
        };
        let Some(&head) = regions.first() else {
            return Ok(());
        };
        request(self.w, head)?;
        let mut rd = f.blocks();
        for (i, &(first, _)) in regions.iter().enumerate() {
            if let Some(&next) = regions.get(i + 1) {
                request(self.w, next)?;
            }
            let theirs = self.read_hashes(f, first)?;
            for (k, their) in theirs.into_iter().enumerate() {
                // A block the replica holds as the cut has it (staged by the broken
                // attempt, or rewritten with the same bytes) does not travel again.
                if self.compare(f, &mut *rd, first + k as u64, their)? {
                    self.stats.same_blocks += 1;
                    self.tick(self.bs);
                }
            }
        }
        self.flush_run()
    }

    /// Compares block `b` with the replica's (`their` hash); sends it if it differs.
    /// Returns whether it was the same.
    fn compare(
        &mut self,
        f: &dyn SourceFile,
        rd: &mut dyn Blocks,
        b: u64,
        their: BlockHash,
    ) -> Result<bool> {
        if their == BlockHash::Zero && rd.surely_zero(b) {
            return Ok(true);
        }
        let zero = rd.read(b, &mut self.buf)?;
        let mine = if zero {
            BlockHash::Zero
        } else {
            BlockHash::Data(*blake3::hash(&self.buf).as_bytes())
        };
        if mine == their {
            return Ok(true);
        }
        self.send_buf(f, b, zero)?;
        Ok(false)
    }

    fn read_hashes(&mut self, f: &dyn SourceFile, first: u64) -> Result<Vec<BlockHash>> {
        match self.r.read_frame().map_err(wire_err)? {
            Frame::Hashes(h) if h.id == f.id() && h.first == first => Ok(h.hashes),
            Frame::Msg(Msg::Error {
                message,
                recoverable,
            }) => Err(refused(message, recoverable)),
            _ => Err(Error::Link(
                "the receiver answered a hash request with something else".into(),
            )),
        }
    }
}
