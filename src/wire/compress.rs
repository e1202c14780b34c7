//! Compression of the sender's half of a stream (protocol 2): once the greeting chose it,
//! everything the sender writes goes through one zstd stream per connection, flushed
//! whenever the sender waits for an answer (so the receiver always has whole frames to
//! act on). One stream per cycle compresses better than a frame per block (BENCHMARKS.md:
//! measured on an ext4 image of /usr/share); BLAKE3 and the frames' CRC32 stay over the
//! uncompressed bytes, so verification is unchanged. The receiver's half (messages,
//! hashes) is small and travels plain.
//!
//! The receiver's decoder is bounded: a frame that asks for a window above
//! `WINDOW_LOG_MAX` is refused when its header is read, before anything is allocated for
//! it, and the decompressed frames are held to the frame length limits like plain ones
//! (a "bomb" of a few bytes that expands to gigabytes never gets past one frame header).

use std::io::{self, BufRead, Read, Write};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

/// The largest zstd window a receiver accepts (2^27 = 128 MiB; zstd's own default limit).
pub const WINDOW_LOG_MAX: u32 = 27;

pub use crate::model::settings::Compress;

/// A writer that counts what passes through it: the bytes on the wire.
pub struct Counted<W> {
    inner: W,
    pub count: Arc<AtomicU64>,
}

impl<W> Counted<W> {
    pub fn new(inner: W) -> Self {
        Counted {
            inner,
            count: Arc::new(AtomicU64::new(0)),
        }
    }
}

impl<W: Write> Write for Counted<W> {
    fn write(&mut self, b: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(b)?;
        self.count.fetch_add(n as u64, Ordering::Relaxed);
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// The sender's compressing writer over `w` (a zstd stream, finished when dropped).
pub fn encoder<W: Write + Send + 'static>(w: W, level: i32) -> io::Result<Box<dyn Write + Send>> {
    let mut e = zstd::stream::write::Encoder::new(w, level)?;
    // No content size (a stream has none), no checksum: the frames carry CRC32, blocks BLAKE3.
    e.include_contentsize(false)?;
    Ok(Box::new(e.auto_finish()))
}

/// The receiver's bounded decoder over `r`.
pub fn decoder<'a, R: BufRead + Send + 'a>(r: R) -> io::Result<Box<dyn Read + Send + 'a>> {
    let mut d = zstd::stream::read::Decoder::with_buffer(r)?;
    d.window_log_max(WINDOW_LOG_MAX)?;
    Ok(Box::new(d))
}
