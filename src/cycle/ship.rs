//! Sending a cut's data: for each file, its frozen blocks (as the cut saw them, through the
//! copy-on-write layer), or for a file under resync every block whose BLAKE3 differs from
//! the replica's. Holes and zero blocks travel as zero blocks (no data); each block carries
//! its BLAKE3 for the receiver to check.

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::AsRawFd;

use indicatif::ProgressBar;

use crate::error::{Error, Result};
use crate::sys;
use crate::track::cut::CutFile;
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

/// Knows where the holes of a file are (SEEK_DATA / SEEK_HOLE), lazily.
struct Holes<'a> {
    f: &'a File,
    /// `[data_start, data_end)`: the data region at or after the last query.
    data: (u64, u64),
}

impl<'a> Holes<'a> {
    fn new(f: &'a File) -> Self {
        Holes { f, data: (0, 0) }
    }

    /// Whether `[off, off+len)` is entirely a hole.
    fn hole(&mut self, off: u64, len: u64) -> bool {
        if off >= self.data.1 {
            let fd = self.f.as_raw_fd();
            match sys::lseek(fd, off as i64, libc::SEEK_DATA) {
                Ok(d) => {
                    let end = sys::lseek(fd, d, libc::SEEK_HOLE).unwrap_or(i64::MAX);
                    self.data = (d as u64, end as u64);
                }
                // ENXIO: no data at or after `off`.
                Err(_) => self.data = (u64::MAX, u64::MAX),
            }
        }
        off + len <= self.data.0
    }
}

pub struct Shipper<'a, W: Write, R: Read> {
    pub w: &'a mut Writer<W>,
    pub r: &'a mut Reader<R>,
    pub bs: u64,
    pub stats: Stats,
    pub progress: Option<ProgressBar>,
    zero: [u8; 32],
    buf: Vec<u8>,
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
        Ok(())
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
        Ok(())
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
