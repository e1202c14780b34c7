//! Sending a cut's data: for each file, its frozen blocks (as the cut saw them, through the
//! copy-on-write layer), or for a file under resync every block whose BLAKE3 differs from
//! the replica's. Holes and zero blocks travel as zero blocks (no data); each block carries
//! its BLAKE3 for the receiver to check.

use std::io::{Read, Write};

use indicatif::ProgressBar;

use crate::error::{Error, Result};
use crate::primary::track::cut::CutFile;
use crate::sys::Holes;
use crate::wire::{Block, BlockHash, Frame, Msg, Reader, Writer, zero_hash};

/// How many blocks one hash request covers: its answer (33 bytes a block) must fit in a
/// pipe buffer, so the sender and receiver can never block on each other.
const REGION: u64 = 1024;

#[derive(Debug, Default, Clone, Copy)]
pub struct Stats {
    pub blocks: u64,
    pub data_bytes: u64,
    pub zero_blocks: u64,
    pub same_blocks: u64,
}

pub struct Shipper<'a, W: Write, R: Read> {
    pub w: &'a mut Writer<W>,
    pub r: &'a mut Reader<R>,
    pub bs: u64,
    pub stats: Stats,
    pub progress: Option<ProgressBar>,
    zero: [u8; 32],
    buf: Vec<u8>,
    /// Whole zero blocks waiting to travel as one run: (file, first block, count).
    run: Option<(crate::model::FileId, u64, u64)>,
}

impl<'a, W: Write, R: Read> Shipper<'a, W, R> {
    pub fn new(
        w: &'a mut Writer<W>,
        r: &'a mut Reader<R>,
        bs: u64,
        progress: Option<ProgressBar>,
    ) -> Self {
        Shipper {
            w,
            r,
            bs,
            stats: Stats::default(),
            progress,
            zero: zero_hash(bs as usize),
            buf: Vec::with_capacity(bs as usize),
            run: None,
        }
    }

    /// The bytes a file will cost at most (for the progress bar).
    pub fn planned(f: &CutFile, bs: u64) -> u64 {
        if f.resync {
            return f.cow.cut_size;
        }
        let blocks = f.cow.blocks();
        f.ft.frozen_ranges()
            .iter()
            .map(|&(a, b)| b.min(blocks).saturating_sub(a))
            .sum::<u64>()
            * bs
    }

    /// Reads block `b` as the cut saw it and sends it.
    fn send(&mut self, f: &CutFile, b: u64, hole: bool) -> Result<()> {
        let zero = f.cow.read(&f.ft.fd, b, &mut self.buf, hole)?;
        self.send_buf(f, b, zero)
    }

    /// Sends block `b` from the buffer the last read filled (a block is read once per
    /// cycle: the read marks it shipped, after which writes no longer preserve it).
    fn send_buf(&mut self, f: &CutFile, b: u64, zero: bool) -> Result<()> {
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
            id: f.id,
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

    /// Adds a whole zero block to the pending run (runs of holes travel as one frame).
    fn zero_block(&mut self, f: &CutFile, b: u64) -> Result<()> {
        let max = u64::from(u32::MAX) / self.bs;
        match &mut self.run {
            Some((id, first, n)) if *id == f.id && *first + *n == b && *n < max => *n += 1,
            _ => {
                self.flush_run()?;
                self.run = Some((f.id, b, 1));
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
            p.inc(n);
        }
    }

    /// Ships the frozen blocks of a file.
    pub fn dirty(&mut self, f: &CutFile) -> Result<()> {
        let blocks = f.cow.blocks();
        let mut holes = Holes::new(&f.ft.fd);
        for (a, b) in f.ft.frozen_ranges() {
            for blk in a..b.min(blocks) {
                let hole = holes.hole(blk * self.bs, self.bs);
                self.send(f, blk, hole)?;
            }
        }
        self.flush_run()
    }

    /// Ships the blocks of a file that differ from the replica's, found by hash.
    pub fn resync(&mut self, f: &CutFile) -> Result<()> {
        let blocks = f.cow.blocks();
        let request = |w: &mut Writer<W>, first: u64| {
            w.msg(&Msg::HashRequest {
                id: f.id,
                path: f.path.clone(),
                first,
                count: REGION.min(blocks - first),
            })
            .map_err(wire_err)
        };
        if blocks == 0 {
            return Ok(());
        }
        request(self.w, 0)?;
        let mut holes = Holes::new(&f.ft.fd);
        let mut first = 0;
        while first < blocks {
            let next = first + REGION;
            if next < blocks {
                request(self.w, next)?;
            }
            let theirs = self.read_hashes(f, first)?;
            for (i, their) in theirs.into_iter().enumerate() {
                let b = first + i as u64;
                let hole = holes.hole(b * self.bs, self.bs);
                if self.compare(f, b, hole, their)? {
                    self.stats.same_blocks += 1;
                    self.tick(self.bs);
                }
            }
            first = next;
        }
        self.flush_run()
    }

    /// Compares block `b` with the replica's (`their` hash); sends it if it differs.
    /// Returns whether it was the same.
    fn compare(&mut self, f: &CutFile, b: u64, hole: bool, their: BlockHash) -> Result<bool> {
        if hole && !f.cow.preserved(b) && their == BlockHash::Zero {
            return Ok(true);
        }
        let zero = f.cow.read(&f.ft.fd, b, &mut self.buf, hole)?;
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

    fn read_hashes(&mut self, f: &CutFile, first: u64) -> Result<Vec<BlockHash>> {
        match self.r.read_frame().map_err(wire_err)? {
            Frame::Hashes(h) if h.id == f.id && h.first == first => Ok(h.hashes),
            Frame::Msg(Msg::Error {
                message,
                recoverable,
            }) => Err(refused(message, recoverable)),
            _ => Err(Error::Invalid(
                "the receiver answered a hash request with something else".into(),
            )),
        }
    }
}

pub fn wire_err(e: crate::wire::WireError) -> Error {
    Error::Invalid(format!("replica connection: {e}"))
}

/// A receiver's refusal.
pub fn refused(message: String, recoverable: bool) -> Error {
    Error::Refused {
        message: format!("replica: {message}"),
        recoverable,
    }
}
