//! How a stream opens, and the protocol version the two ends agree on. The receiver speaks
//! first: a fixed banner line (`BANNER`), so that a login shell that prints a message of
//! the day or a wrong forced command in `authorized_keys` is recognised as what it is
//! instead of as a garbled stream, then `DRFSWIRE` and the newest and oldest protocol
//! versions it speaks (u32 each, little-endian). The sender picks the newest version both
//! speak and answers `DRFSWIRE` + that version (+ from version 2 a codec byte: 0 plain, 1
//! the rest of the sender's half is one zstd stream, `wire::compress`); a sender and a
//! receiver with no version in common refuse clearly, saying which versions each speaks.
//!
//! A receiver older than the banner (drfs before protocol 2) opens with `DRFSWIRE` and
//! version 1 and reads the sender's greeting at once; a sender talks to it at version 1.

use std::io::{Read, Write};

use crate::wire::{MAGIC, MIN_VERSION, Result, VERSION, WireError, corrupt, read_exact};

/// The receiver's first line, before anything of the protocol.
pub const BANNER: &[u8; 18] = b"DRFS-RECEIVE-HELO\n";

/// What the receiver's opening said.
#[derive(Debug, PartialEq, Eq)]
pub enum Opening {
    /// A receiver that speaks versions `min..=max`.
    Speaks { min: u32, max: u32 },
    /// Bytes that are not drfs's: what the far side printed instead (one line, cut short).
    Noise(String),
}

/// The newest version a receiver offers: `VERSION`, or less with `DRFS_WIRE_MAX=N` (to
/// behave as an older drfs does: tests, or holding a mixed pair at one version).
pub fn newest() -> u32 {
    std::env::var("DRFS_WIRE_MAX")
        .ok()
        .and_then(|v| v.parse().ok())
        .map_or(VERSION, |v: u32| v.clamp(MIN_VERSION, VERSION))
}

/// The receiver's side: the banner and the versions it speaks.
pub fn announce<W: Write>(w: &mut W) -> Result<()> {
    let mut b = Vec::with_capacity(34);
    b.extend_from_slice(BANNER);
    b.extend_from_slice(MAGIC);
    b.extend_from_slice(&newest().to_le_bytes());
    b.extend_from_slice(&MIN_VERSION.to_le_bytes());
    w.write_all(&b)?;
    w.flush()?;
    Ok(())
}

/// The sender's side: reads the receiver's opening.
pub fn opening<R: Read>(r: &mut R) -> Result<Opening> {
    let mut got = Vec::with_capacity(BANNER.len());
    let mut byte = [0u8; 1];
    while got.len() < BANNER.len() {
        read_exact(r, &mut byte)?;
        got.push(byte[0]);
        if got.len() == MAGIC.len() && got == MAGIC {
            // A receiver older than the banner: version 1 only.
            let mut v = [0u8; 4];
            read_exact(r, &mut v)?;
            let v = u32::from_le_bytes(v);
            return Ok(Opening::Speaks { min: v, max: v });
        }
        let n = got.len();
        if BANNER[..n] != got[..] && MAGIC[..n.min(MAGIC.len())] != got[..n.min(MAGIC.len())] {
            return Ok(Opening::Noise(noise(r, got)));
        }
    }
    let mut head = [0u8; 16];
    read_exact(r, &mut head)?;
    if &head[..8] != MAGIC {
        return Err(corrupt("no drfs stream after the banner"));
    }
    let max = u32::from_le_bytes([head[8], head[9], head[10], head[11]]);
    let min = u32::from_le_bytes([head[12], head[13], head[14], head[15]]);
    Ok(Opening::Speaks { min, max })
}

/// The rest of the line the noise began, for the message (at most 120 bytes).
fn noise<R: Read>(r: &mut R, mut got: Vec<u8>) -> String {
    let mut byte = [0u8; 1];
    while got.len() < 120 && !got.ends_with(b"\n") && r.read(&mut byte).is_ok_and(|n| n == 1) {
        got.push(byte[0]);
    }
    let s = String::from_utf8_lossy(&got);
    s.lines()
        .next()
        .unwrap_or("")
        .trim()
        .escape_debug()
        .to_string()
}

/// The version a sender speaking `MIN_VERSION..=VERSION` uses with a receiver speaking
/// `min..=max`, or why there is none.
pub fn choose(min: u32, max: u32) -> Result<u32> {
    let v = max.min(VERSION);
    if v < min.max(MIN_VERSION) || min > max {
        return Err(WireError::Version(format!(
            "the receiver speaks protocol versions {min} to {max}, this drfs {MIN_VERSION} to {VERSION}: install the same drfs release on both hosts"
        )));
    }
    Ok(v)
}

/// The sender's answer: the version chosen, and (from version 2) the codec of the rest of
/// its half of the stream (`Compress::code`).
pub fn answer<W: Write>(w: &mut W, version: u32, codec: u8) -> Result<()> {
    w.write_all(MAGIC)?;
    w.write_all(&version.to_le_bytes())?;
    if version >= 2 {
        w.write_all(&[codec])?;
    }
    w.flush()?;
    Ok(())
}

/// The receiver's side: the version the sender chose, if this drfs speaks it, and the
/// codec of the rest of the sender's half.
pub fn chosen<R: Read>(r: &mut R) -> Result<(u32, u8)> {
    let mut head = [0u8; 12];
    read_exact(r, &mut head)?;
    if &head[..8] != MAGIC {
        return Err(corrupt("not a drfs stream (bad magic)"));
    }
    let v = u32::from_le_bytes([head[8], head[9], head[10], head[11]]);
    if !(MIN_VERSION..=VERSION).contains(&v) {
        return Err(WireError::Version(format!(
            "the sender speaks protocol version {v}, this receiver {MIN_VERSION} to {VERSION}: install the same drfs release on both hosts"
        )));
    }
    let mut codec = [0u8; 1];
    if v >= 2 {
        read_exact(r, &mut codec)?;
        if codec[0] > 1 {
            return Err(corrupt(format!("unknown codec {}", codec[0])));
        }
    }
    Ok((v, codec[0]))
}

/// The sender's whole greeting over `w` and `r`: the streams at the version agreed (for
/// callers that need no diagnosis of what the far side printed instead).
pub fn open<W: Write, R: Read>(
    mut w: W,
    mut r: R,
) -> Result<(crate::wire::Writer<W>, crate::wire::Reader<R>)> {
    let v = match opening(&mut r)? {
        Opening::Speaks { min, max } => choose(min, max)?,
        Opening::Noise(n) => return Err(corrupt(format!("{n:?} instead of drfs's banner"))),
    };
    answer(&mut w, v, 0)?;
    Ok((crate::wire::Writer::at(w, v), crate::wire::Reader::at(r, v)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_receiver_opens_with_its_banner_and_versions() {
        let mut b = Vec::new();
        announce(&mut b).unwrap();
        assert!(b.starts_with(BANNER));
        assert_eq!(
            opening(&mut &b[..]).unwrap(),
            Opening::Speaks {
                min: MIN_VERSION,
                max: VERSION
            }
        );
        assert_eq!(choose(MIN_VERSION, VERSION).unwrap(), VERSION);
    }

    #[test]
    fn an_older_receiver_is_spoken_to_at_its_version() {
        // drfs before the banner opened with the magic and version 1.
        let old = b"DRFSWIRE\x01\x00\x00\x00";
        let o = opening(&mut &old[..]).unwrap();
        assert_eq!(o, Opening::Speaks { min: 1, max: 1 });
        assert_eq!(choose(1, 1).unwrap(), 1);
        // A receiver newer than anything this drfs speaks is refused clearly.
        let e = choose(VERSION + 1, VERSION + 3).unwrap_err().to_string();
        assert!(e.contains("install the same drfs release"), "{e}");
        // And a sender's choice this receiver does not speak.
        let mut b = Vec::new();
        answer(&mut b, VERSION + 1, 0).unwrap();
        assert!(chosen(&mut &b[..]).is_err());
        let mut b = Vec::new();
        answer(&mut b, 1, 1).unwrap();
        assert_eq!(b.len(), 12, "version 1 has no codec byte");
        assert_eq!(chosen(&mut &b[..]).unwrap(), (1, 0));
        let mut b = Vec::new();
        answer(&mut b, 2, 1).unwrap();
        assert_eq!(chosen(&mut &b[..]).unwrap(), (2, 1));
    }

    #[test]
    fn noise_before_the_banner_is_reported_as_such() {
        let motd = b"Welcome to backup01!\nDRFS-RECEIVE-HELO\n";
        match opening(&mut &motd[..]).unwrap() {
            Opening::Noise(s) => assert_eq!(s, "Welcome to backup01!"),
            o => panic!("{o:?}"),
        }
        assert!(matches!(
            opening(&mut &b"DRFS-REC"[..]),
            Err(WireError::Closed)
        ));
    }
}
