//! The stream protocol between the shipper and `drfs receive` (over a pipe locally, over
//! ssh's stdin/stdout remotely). Versioned, framed and checksummed; the receiver treats
//! every byte as hostile.
//!
//! The stream opens as `greeting` says: the receiver's banner and the versions it speaks,
//! the sender's choice. Then frames, little-endian: `[len u32][kind u8][body: len-1 bytes][crc32 of
//! kind+body u32]`, `len` at most `MAX_FRAME`. Kinds:
//! - 1 `Msg`: a JSON control message (`Msg` below).
//! - 2 `Block`: file id u64, offset u64, len u32, flags u8 (1 = zero), BLAKE3 of the block's
//!   bytes (32), then the bytes unless zero. The receiver recomputes the BLAKE3 before it
//!   keeps anything.
//! - 3 `Hashes`: file id u64, first block u64, count u32, then per block 1 byte tag
//!   (0 absent, 1 zero, 2 data) and, for data, 32 bytes of BLAKE3.

pub mod compress;
pub mod greeting;
pub mod pipe;

use std::io::{self, Read, Write};

use serde::{Deserialize, Serialize};

use crate::model::{FileId, Manifest, PointRef, RelPath};

pub const MAGIC: &[u8; 8] = b"DRFSWIRE";
/// The newest protocol version this drfs speaks: 2 adds the codec byte (compression).
pub const VERSION: u32 = 2;
/// The oldest protocol version this drfs speaks.
pub const MIN_VERSION: u32 = 1;
/// The largest frame: a 16 MiB block plus its header.
pub const MAX_FRAME: usize = (16 << 20) + 4096;
/// The largest control message.
pub const MAX_MSG: usize = 64 << 20;

const KIND_MSG: u8 = 1;
const KIND_BLOCK: u8 = 2;
const KIND_HASHES: u8 = 3;

#[derive(Debug, thiserror::Error)]
pub enum WireError {
    #[error("connection: {0}")]
    Io(#[from] io::Error),
    #[error("the peer closed the stream")]
    Closed,
    #[error("corrupt stream: {0}")]
    Corrupt(String),
    #[error("{0}")]
    Version(String),
}

pub type Result<T> = std::result::Result<T, WireError>;

/// A stream that broke or made no sense: a retry can help (a new stream may be whole).
impl From<WireError> for crate::error::Error {
    fn from(e: WireError) -> Self {
        crate::error::Error::Link(e.to_string())
    }
}

pub(crate) fn corrupt(s: impl Into<String>) -> WireError {
    WireError::Corrupt(s.into())
}

/// Control messages.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "msg", rename_all = "snake_case")]
pub enum Msg {
    /// Sender: who is shipping.
    Hello {
        store_id: String,
        block_size: u64,
        /// Bind an uninitialised replica to this store (`drfs protect`).
        init: bool,
        keep: String,
        /// With `init`: a directory that already holds files may become the replica, its
        /// files a seed copy (`drfs protect --seed`). Absent from older senders.
        #[serde(default)]
        seed: bool,
    },
    /// Receiver: what it holds.
    Welcome {
        replica_id: String,
        source: Option<String>,
        latest: Option<PointRef>,
    },
    /// Sender: a cycle begins; its base must be the replica's latest.
    Begin {
        generation: u64,
        base: Option<u64>,
        cut_id: String,
        /// Resync cycle: accept whatever the replica's latest is as the base.
        resync: bool,
    },
    /// Sender: which blocks of file `id` (at `path` on the replica, if it has it) the
    /// receiver should hash, so only differing blocks travel.
    HashRequest {
        id: FileId,
        path: RelPath,
        first: u64,
        count: u64,
    },
    /// Sender: the cycle's data is complete; apply it as this point.
    Commit { manifest: Box<Manifest> },
    /// Receiver: the point is applied.
    Done { point: PointRef, bytes: u64 },
    /// Either side: the cycle cannot go on.
    Error { message: String, recoverable: bool },
    /// Sender: nothing more.
    Bye,
}

/// A block on the wire.
#[derive(Debug, Clone, PartialEq)]
pub struct Block {
    pub id: FileId,
    pub offset: u64,
    pub len: u32,
    pub zero: bool,
    pub hash: [u8; 32],
    pub data: Vec<u8>,
}

/// A block hash as the receiver reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BlockHash {
    Absent,
    Zero,
    Data([u8; 32]),
}

#[derive(Debug, Clone, PartialEq)]
pub struct Hashes {
    pub id: FileId,
    pub first: u64,
    pub hashes: Vec<BlockHash>,
}

#[derive(Debug)]
pub enum Frame {
    Msg(Msg),
    Block(Block),
    Hashes(Hashes),
}

/// The BLAKE3 of `len` zero bytes.
pub fn zero_hash(len: usize) -> [u8; 32] {
    let mut h = blake3::Hasher::new();
    let z = [0u8; 4096];
    let mut left = len;
    while left > 0 {
        let n = left.min(z.len());
        h.update(&z[..n]);
        left -= n;
    }
    *h.finalize().as_bytes()
}

pub struct Writer<W: Write> {
    w: W,
    pub bytes: u64,
    /// The protocol version the stream speaks.
    pub version: u32,
}

impl<W: Write> Writer<W> {
    /// A sender's stream at the newest version, for a receiver known to speak it: the
    /// sender's greeting (`greeting::answer`) first.
    pub fn new(mut w: W) -> Result<Self> {
        greeting::answer(&mut w, VERSION, 0)?;
        Ok(Writer {
            w,
            bytes: 13,
            version: VERSION,
        })
    }

    /// A stream whose greeting is done, at `version`.
    pub fn at(w: W, version: u32) -> Self {
        Writer {
            w,
            bytes: 0,
            version,
        }
    }

    fn frame(&mut self, kind: u8, parts: &[&[u8]]) -> Result<()> {
        let body: usize = parts.iter().map(|p| p.len()).sum();
        if body + 1 > MAX_FRAME {
            return Err(corrupt(format!("frame of {} bytes is too large", body + 1)));
        }
        let mut crc = crc32fast::Hasher::new();
        crc.update(&[kind]);
        for p in parts {
            crc.update(p);
        }
        self.w.write_all(&((body + 1) as u32).to_le_bytes())?;
        self.w.write_all(&[kind])?;
        for p in parts {
            self.w.write_all(p)?;
        }
        self.w.write_all(&crc.finalize().to_le_bytes())?;
        self.bytes += body as u64 + 9;
        Ok(())
    }

    pub fn msg(&mut self, m: &Msg) -> Result<()> {
        let body = serde_json::to_vec(m).map_err(|e| corrupt(e.to_string()))?;
        self.frame(KIND_MSG, &[&body])?;
        self.w.flush()?;
        Ok(())
    }

    pub fn block(&mut self, b: &Block) -> Result<()> {
        let mut head = Vec::with_capacity(53);
        head.extend_from_slice(&b.id.0.to_le_bytes());
        head.extend_from_slice(&b.offset.to_le_bytes());
        head.extend_from_slice(&b.len.to_le_bytes());
        head.push(u8::from(b.zero));
        head.extend_from_slice(&b.hash);
        let data: &[u8] = if b.zero { &[] } else { &b.data };
        self.frame(KIND_BLOCK, &[&head, data])
    }

    pub fn hashes(&mut self, h: &Hashes) -> Result<()> {
        let mut body = Vec::with_capacity(20 + h.hashes.len() * 33);
        body.extend_from_slice(&h.id.0.to_le_bytes());
        body.extend_from_slice(&h.first.to_le_bytes());
        body.extend_from_slice(&(h.hashes.len() as u32).to_le_bytes());
        for x in &h.hashes {
            match x {
                BlockHash::Absent => body.push(0),
                BlockHash::Zero => body.push(1),
                BlockHash::Data(d) => {
                    body.push(2);
                    body.extend_from_slice(d);
                }
            }
        }
        self.frame(KIND_HASHES, &[&body])?;
        self.w.flush()?;
        Ok(())
    }

    pub fn flush(&mut self) -> Result<()> {
        self.w.flush()?;
        Ok(())
    }
}

pub struct Reader<R: Read> {
    r: R,
    pub bytes: u64,
    pub version: u32,
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(a)
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[at..at + 4]);
    u32::from_le_bytes(a)
}

impl<R: Read> Reader<R> {
    /// Reads a plain sender's greeting (for tests of the frames).
    pub fn new(mut r: R) -> Result<Self> {
        let (version, _) = greeting::chosen(&mut r)?;
        Ok(Reader {
            r,
            bytes: 13,
            version,
        })
    }

    /// A stream whose greeting is done, at `version`.
    pub fn at(r: R, version: u32) -> Self {
        Reader {
            r,
            bytes: 0,
            version,
        }
    }

    /// The underlying stream (for the greeting).
    pub fn inner(&mut self) -> &mut R {
        &mut self.r
    }

    pub fn read_frame(&mut self) -> Result<Frame> {
        let mut len = [0u8; 4];
        read_exact(&mut self.r, &mut len)?;
        let len = u32::from_le_bytes(len) as usize;
        if len == 0 || len > MAX_FRAME.max(MAX_MSG) {
            return Err(corrupt(format!("frame length {len}")));
        }
        let mut body = vec![0u8; len + 4];
        read_exact(&mut self.r, &mut body)?;
        let crc = u32_at(&body, len);
        if crc32fast::hash(&body[..len]) != crc {
            return Err(corrupt("frame checksum mismatch"));
        }
        self.bytes += len as u64 + 8;
        body.truncate(len);
        let kind = body[0];
        let b = &body[1..];
        match kind {
            KIND_MSG => serde_json::from_slice(b)
                .map(Frame::Msg)
                .map_err(|e| corrupt(format!("bad message: {e}"))),
            KIND_BLOCK => parse_block(body).map(Frame::Block),
            KIND_HASHES => parse_hashes(b).map(Frame::Hashes),
            k => Err(corrupt(format!("unknown frame kind {k}"))),
        }
    }

    /// The next frame, which must be a control message.
    pub fn msg(&mut self) -> Result<Msg> {
        match self.read_frame()? {
            Frame::Msg(m) => Ok(m),
            f => Err(corrupt(format!(
                "expected a message, got {}",
                frame_name(&f)
            ))),
        }
    }
}

fn frame_name(f: &Frame) -> &'static str {
    match f {
        Frame::Msg(_) => "a message",
        Frame::Block(_) => "a block",
        Frame::Hashes(_) => "hashes",
    }
}

pub(crate) fn read_exact<R: Read>(r: &mut R, buf: &mut [u8]) -> Result<()> {
    match r.read_exact(buf) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => Err(WireError::Closed),
        Err(e) => Err(e.into()),
    }
}

fn parse_block(mut body: Vec<u8>) -> Result<Block> {
    const HEAD: usize = 1 + 8 + 8 + 4 + 1 + 32;
    if body.len() < HEAD {
        return Err(corrupt("short block frame"));
    }
    let id = FileId(u64_at(&body, 1));
    let offset = u64_at(&body, 9);
    let len = u32_at(&body, 17);
    let zero = match body[21] {
        0 => false,
        1 => true,
        f => return Err(corrupt(format!("block flags {f}"))),
    };
    let mut hash = [0u8; 32];
    hash.copy_from_slice(&body[22..54]);
    let data = if zero {
        if body.len() != HEAD {
            return Err(corrupt("zero block with data"));
        }
        Vec::new()
    } else {
        if body.len() - HEAD != len as usize {
            return Err(corrupt("block length does not match its data"));
        }
        body.drain(..HEAD);
        body
    };
    Ok(Block {
        id,
        offset,
        len,
        zero,
        hash,
        data,
    })
}

fn parse_hashes(b: &[u8]) -> Result<Hashes> {
    if b.len() < 20 {
        return Err(corrupt("short hashes frame"));
    }
    let id = FileId(u64_at(b, 0));
    let first = u64_at(b, 8);
    let count = u32_at(b, 16) as usize;
    let mut hashes = Vec::with_capacity(count.min(1 << 20));
    let mut at = 20;
    for _ in 0..count {
        let tag = *b.get(at).ok_or_else(|| corrupt("hashes frame too short"))?;
        at += 1;
        hashes.push(match tag {
            0 => BlockHash::Absent,
            1 => BlockHash::Zero,
            2 => {
                let h = b
                    .get(at..at + 32)
                    .ok_or_else(|| corrupt("hashes frame too short"))?;
                at += 32;
                let mut d = [0u8; 32];
                d.copy_from_slice(h);
                BlockHash::Data(d)
            }
            t => return Err(corrupt(format!("hash tag {t}"))),
        });
    }
    if at != b.len() {
        return Err(corrupt("trailing bytes in hashes frame"));
    }
    Ok(Hashes { id, first, hashes })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_round_trip_and_corruption_is_caught() {
        let mut buf = Vec::new();
        {
            let mut w = Writer::new(&mut buf).unwrap();
            w.msg(&Msg::Bye).unwrap();
            let data = vec![7u8; 1000];
            w.block(&Block {
                id: FileId(5),
                offset: 65536,
                len: 1000,
                zero: false,
                hash: *blake3::hash(&data).as_bytes(),
                data,
            })
            .unwrap();
            w.hashes(&Hashes {
                id: FileId(5),
                first: 3,
                hashes: vec![BlockHash::Absent, BlockHash::Zero, BlockHash::Data([9; 32])],
            })
            .unwrap();
        }
        let mut r = Reader::new(&buf[..]).unwrap();
        assert_eq!(r.msg().unwrap(), Msg::Bye);
        match r.read_frame().unwrap() {
            Frame::Block(b) => assert_eq!((b.offset, b.data.len()), (65536, 1000)),
            f => panic!("{f:?}"),
        }
        match r.read_frame().unwrap() {
            Frame::Hashes(h) => assert_eq!(h.hashes[2], BlockHash::Data([9; 32])),
            f => panic!("{f:?}"),
        }
        assert!(matches!(r.read_frame(), Err(WireError::Closed)));
        // Flip one byte anywhere after the magic: the stream is rejected, never misread.
        for i in 13..buf.len() {
            let mut bad = buf.clone();
            bad[i] ^= 0x20;
            let mut r = Reader::new(&bad[..]).unwrap();
            let mut ok = 0;
            while r.read_frame().is_ok() {
                ok += 1;
            }
            assert!(ok < 3, "byte {i} flipped yet all frames read");
        }
    }
}
