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
//! - 4 `Partial` (version 3): the changed 4 KiB pieces of a block the receiver holds:
//!   file id u64, offset u64, the block's len u32, BLAKE3 of the whole new block (32),
//!   mask u64 of the pieces sent as bytes, mask u64 of the pieces that are now zeros,
//!   then the bytes of each sent piece in order (4096 each; the last piece of a short
//!   block to the block's end). The receiver composes the block from its own and checks
//!   the whole block against the BLAKE3.

pub mod compress;
pub mod greeting;
pub mod pipe;

use std::io::{self, Read, Write};

use serde::{Deserialize, Serialize};

use crate::model::settings::{BwLimit, Compress};
use crate::model::{FileId, Group, Interval, Manifest, PointRef, RelPath};

pub const MAGIC: &[u8; 8] = b"DRFSWIRE";
/// The newest protocol version this drfs speaks: 2 adds the codec byte (compression), 3
/// the `Partial` frame (a block's changed pieces), 4 a planned failover and a reprotect
/// over the stream (`Promote`, `IndexRequest`, a hello's `reprotect`).
pub const VERSION: u32 = 4;
/// The first version with `Partial` frames.
pub const PARTIAL_VERSION: u32 = 3;
/// The first version a planned failover or a reprotect can run over.
pub const FAILOVER_VERSION: u32 = 4;
/// The grain of a `Partial` frame.
pub const PIECE: usize = 4096;
/// The oldest protocol version this drfs speaks.
pub const MIN_VERSION: u32 = 1;
/// The largest frame: a 16 MiB block plus its header.
pub const MAX_FRAME: usize = (16 << 20) + 4096;
/// The largest control message.
pub const MAX_MSG: usize = 64 << 20;

const KIND_MSG: u8 = 1;
const KIND_BLOCK: u8 = 2;
const KIND_HASHES: u8 = 3;
const KIND_PARTIAL: u8 = 4;

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
        /// A planned failover: a replica this store's planned failover already promoted
        /// binds too (to finish the command), for `Promote` and `IndexRequest` only.
        #[serde(default)]
        planned: bool,
        /// A reprotect (`FAILOVER_VERSION`): the receiver's directory is the primary with
        /// this id that a failover of this sender replaced; it becomes this sender's
        /// replica first, keeping what it holds as a `diverged` point.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        reprotect: Option<String>,
    },
    /// Receiver: what it holds.
    Welcome {
        replica_id: String,
        source: Option<String>,
        latest: Option<PointRef>,
        /// The point a planned failover of this sender promoted the replica at.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        promoted: Option<String>,
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
    /// Sender, in a planned session (`FAILOVER_VERSION`): everything is shipped and
    /// `point` is this store's state; the replica becomes the primary and replicates
    /// back as `reverse` says (done again, it only rewrites `reverse`).
    Promote {
        point: String,
        reverse: Box<Reverse>,
    },
    /// Receiver: promoted at `point`, whose manifest the old primary adopts.
    Promoted {
        point: PointRef,
        manifest: Box<Manifest>,
    },
    /// Sender: the BLAKE3 entries the replica keeps for blocks `first..first+count` of
    /// file `id` of its latest point (its hash index, not its files), answered by
    /// `Hashes`: what a demoted primary's index starts from.
    IndexRequest { id: FileId, first: u64, count: u64 },
    /// Sender: the cycle's data is complete; apply it as this point.
    Commit { manifest: Box<Manifest> },
    /// Receiver: the point is applied.
    Done { point: PointRef, bytes: u64 },
    /// Either side: the cycle cannot go on.
    Error { message: String, recoverable: bool },
    /// Sender: nothing more.
    Bye,
}

/// How a promoted replica replicates back to the primary it replaces. Only settings: a
/// command to run (an ssh client, hooks) never travels, so a key that may only ship
/// cannot make the replica's host run anything.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Reverse {
    /// How the replica's host reaches the old primary: an `ssh://` URL.
    pub target: String,
    /// The old primary's id (its replica id from now on).
    pub replica_id: String,
    pub interval: Interval,
    pub keep: String,
    pub group: Group,
    #[serde(default)]
    pub expect_every: Option<Interval>,
    #[serde(default)]
    pub compress: Option<Compress>,
    #[serde(default)]
    pub bwlimit: Option<BwLimit>,
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

/// Part of a block on the wire: the pieces that changed of a block the receiver holds.
#[derive(Debug, Clone, PartialEq)]
pub struct Partial {
    pub id: FileId,
    pub offset: u64,
    /// The block's length (its last piece may be short).
    pub len: u32,
    /// The BLAKE3 of the whole block the pieces make.
    pub hash: [u8; 32],
    /// The pieces sent as bytes (bit `i`: bytes `i*4096..`).
    pub data: u64,
    /// The pieces that are now zeros.
    pub zero: u64,
    /// The sent pieces' bytes, in order.
    pub bytes: Vec<u8>,
}

impl Partial {
    /// The byte range of piece `i` in a block of `len` bytes (empty beyond it).
    pub fn piece(len: u32, i: u32) -> std::ops::Range<usize> {
        let len = len as usize;
        let start = (i as usize * PIECE).min(len);
        start..(start + PIECE).min(len)
    }

    /// Its pieces, in order: (byte range in the block, its bytes or `None` for zeros).
    pub fn pieces(&self) -> impl Iterator<Item = (std::ops::Range<usize>, Option<&[u8]>)> {
        let mut at = 0;
        (0..64u32)
            .filter(move |i| (self.data | self.zero) & (1 << i) != 0)
            .map(move |i| {
                let r = Partial::piece(self.len, i);
                if self.data & (1 << i) != 0 {
                    let n = r.len();
                    at += n;
                    (r, Some(&self.bytes[at - n..at]))
                } else {
                    (r, None)
                }
            })
    }
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
    Partial(Partial),
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

    /// A block's changed pieces (only at version 3 and later).
    pub fn partial(&mut self, p: &Partial) -> Result<()> {
        if self.version < PARTIAL_VERSION {
            return Err(corrupt(format!(
                "partial blocks need protocol {PARTIAL_VERSION}, the stream speaks {}",
                self.version
            )));
        }
        let mut head = Vec::with_capacity(68);
        head.extend_from_slice(&p.id.0.to_le_bytes());
        head.extend_from_slice(&p.offset.to_le_bytes());
        head.extend_from_slice(&p.len.to_le_bytes());
        head.extend_from_slice(&p.hash);
        head.extend_from_slice(&p.data.to_le_bytes());
        head.extend_from_slice(&p.zero.to_le_bytes());
        self.frame(KIND_PARTIAL, &[&head, &p.bytes])
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
            KIND_PARTIAL if self.version >= PARTIAL_VERSION => {
                parse_partial(body).map(Frame::Partial)
            }
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

pub fn frame_name(f: &Frame) -> &'static str {
    match f {
        Frame::Msg(_) => "a message",
        Frame::Block(_) => "a block",
        Frame::Hashes(_) => "hashes",
        Frame::Partial(_) => "a partial block",
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

fn parse_partial(mut body: Vec<u8>) -> Result<Partial> {
    const HEAD: usize = 1 + 8 + 8 + 4 + 32 + 8 + 8;
    if body.len() < HEAD {
        return Err(corrupt("short partial block frame"));
    }
    let len = u32_at(&body, 17);
    let mut hash = [0u8; 32];
    hash.copy_from_slice(&body[21..53]);
    let (data, zero) = (u64_at(&body, 53), u64_at(&body, 61));
    let pieces = (len as usize).div_ceil(PIECE) as u32;
    let within = if pieces >= 64 {
        u64::MAX
    } else {
        (1 << pieces) - 1
    };
    if len == 0 || data & zero != 0 || (data | zero) & !within != 0 {
        return Err(corrupt("partial block with pieces outside it"));
    }
    let want: usize = (0..64)
        .filter(|i| data & (1 << i) != 0)
        .map(|i| Partial::piece(len, i).len())
        .sum();
    if body.len() - HEAD != want {
        return Err(corrupt("partial block's bytes do not match its pieces"));
    }
    let (id, offset) = (FileId(u64_at(&body, 1)), u64_at(&body, 9));
    body.drain(..HEAD);
    Ok(Partial {
        id,
        offset,
        len,
        hash,
        data,
        zero,
        bytes: body,
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

    #[test]
    fn partial_frames_round_trip_and_need_version_3() {
        let block: Vec<u8> = (0..10_000u32).map(|i| (i % 251) as u8).collect();
        let p = Partial {
            id: FileId(9),
            offset: 1 << 16,
            len: 10_000,
            hash: *blake3::hash(&block).as_bytes(),
            data: 0b101,
            zero: 0b010,
            bytes: [&block[..4096], &block[8192..]].concat(),
        };
        let mut buf = Vec::new();
        Writer::new(&mut buf).unwrap().partial(&p).unwrap();
        match Reader::new(&buf[..]).unwrap().read_frame().unwrap() {
            Frame::Partial(got) => {
                assert_eq!(got, p);
                let ranges: Vec<_> = got.pieces().map(|(r, b)| (r, b.is_some())).collect();
                assert_eq!(
                    ranges,
                    vec![(0..4096, true), (4096..8192, false), (8192..10_000, true)]
                );
            }
            f => panic!("{f:?}"),
        }
        // At version 2 the frame is neither written nor read.
        assert!(Writer::at(Vec::new(), 2).partial(&p).is_err());
        assert!(Reader::at(&buf[13..], 2).read_frame().is_err());
        // Pieces outside the block, or bytes that do not match the masks, are refused.
        for (data, zero, cut) in [(0b1000, 0, 0), (0b1, 0b1, 0), (0b101, 0b10, 1)] {
            let q = Partial {
                data,
                zero,
                bytes: p.bytes[..p.bytes.len() - cut].to_vec(),
                ..p.clone()
            };
            let mut buf = Vec::new();
            Writer::new(&mut buf).unwrap().partial(&q).unwrap();
            assert!(Reader::new(&buf[..]).unwrap().read_frame().is_err());
        }
    }
}
