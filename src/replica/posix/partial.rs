//! Partial blocks (`wire::Partial`): the new block composed from the latest file's block
//! (the base point's, which staging never changes) and the pieces the sender changed, then
//! checked whole against the sender's BLAKE3 before it is staged like any block. A block
//! that does not check out fails the cycle as transient: the sender's next cycle merges
//! this one's blocks and sends them whole.

use std::fs::File;

use crate::error::{Error, Result};
use crate::wire::{Block, Partial};

/// The block `p` describes, built on `base` (the latest file, `None` where the file is
/// new: zeros); checked against its BLAKE3.
pub fn compose(p: &Partial, base: Option<&File>, bs: u64) -> Result<Block> {
    let at = format!("partial block at {} of file {}", p.offset, p.id);
    if p.offset % bs != 0 || u64::from(p.len) > bs {
        return Err(Error::Invalid(format!(
            "{at}: does not fit the {bs}-byte blocks"
        )));
    }
    let mut buf = vec![0u8; p.len as usize];
    if let Some(f) = base {
        let got = crate::sys::read_full(f, &mut buf, p.offset).map_err(|e| Error::Io {
            path: "replica file".into(),
            source: e,
        })?;
        buf[got..].fill(0);
    }
    for (range, bytes) in p.pieces() {
        match bytes {
            Some(b) => buf[range].copy_from_slice(b),
            None => buf[range].fill(0),
        }
    }
    if *blake3::hash(&buf).as_bytes() != p.hash {
        return Err(Error::transient(format!(
            "{at}: the block it makes with the replica's fails its BLAKE3 check (the replica's latest block is not the one the sender built on); the next cycle sends it whole"
        )));
    }
    let zero = crate::sys::is_zero(&buf);
    Ok(Block {
        id: p.id,
        offset: p.offset,
        len: p.len,
        zero,
        hash: p.hash,
        data: if zero { Vec::new() } else { buf },
    })
}
