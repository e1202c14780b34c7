//! `--bwlimit`: the bytes a link puts on the wire per second, held by pacing its writes
//! (a token bucket of `BURST` bytes: a write waits until the bytes before it are due at
//! the cap). It sits under the compressor, so the cap counts bytes on the wire. The cap
//! in force is looked up by local time of day once a second, so a cycle that runs across
//! a window's edge changes pace there.

use std::io::{self, Write};
use std::time::{Duration, Instant};

use crate::model::settings::BwLimit;

/// The most a link may send at once after it waited (zrepl's default bucket).
const BURST: u64 = 128 << 10;

/// The minute of the local day now.
pub fn local_minute() -> u32 {
    let now = unsafe { libc::time(std::ptr::null_mut()) };
    let mut tm: libc::tm = unsafe { std::mem::zeroed() };
    if unsafe { libc::localtime_r(&now, &mut tm) }.is_null() {
        return 0;
    }
    (tm.tm_hour * 60 + tm.tm_min) as u32
}

/// A writer that holds its bytes to a cap.
pub struct Limited<W> {
    inner: W,
    limit: BwLimit,
    /// The cap in force, and when it was looked up.
    rate: Option<u64>,
    looked: Instant,
    /// When the bytes written so far are due at the cap.
    due: Instant,
}

impl<W: Write> Limited<W> {
    pub fn new(inner: W, limit: BwLimit) -> Self {
        let now = Instant::now();
        Limited {
            rate: limit.rate_at(local_minute()),
            inner,
            limit,
            looked: now,
            due: now,
        }
    }

    /// Waits until `n` more bytes may go.
    fn pace(&mut self, n: usize) {
        let now = Instant::now();
        if now.duration_since(self.looked) >= Duration::from_secs(1) {
            self.rate = self.limit.rate_at(local_minute());
            self.looked = now;
        }
        let Some(rate) = self.rate else {
            self.due = now;
            return;
        };
        // Idle time earns at most one burst.
        let burst = Duration::from_secs_f64(BURST as f64 / rate as f64);
        if self.due + burst < now {
            self.due = now.checked_sub(burst).unwrap_or(now);
        }
        self.due += Duration::from_secs_f64(n as f64 / rate as f64);
        if self.due > now + burst {
            std::thread::sleep(self.due - now - burst);
        }
    }
}

impl<W: Write> Write for Limited<W> {
    fn write(&mut self, b: &[u8]) -> io::Result<usize> {
        let chunk = &b[..b.len().min(BURST as usize / 4)];
        self.pace(chunk.len());
        self.inner.write_all(chunk)?;
        Ok(chunk.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_are_paced_to_the_cap() {
        let mut w = Limited::new(io::sink(), "4M".parse().unwrap());
        let t = Instant::now();
        let buf = vec![0u8; 1 << 20];
        for _ in 0..2 {
            w.write_all(&buf).unwrap();
        }
        // 2 MiB at 4 MiB/s: half a second (less the first burst); generous bounds.
        let s = t.elapsed().as_secs_f64();
        assert!(s > 0.4, "{s}");
    }
}
