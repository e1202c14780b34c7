//! The stream's pipeline stages: a thread between the frames and the bytes, so one side
//! of a stream works while the other moves bytes. `Pipe` is the sender's: frames are
//! encoded into 256 KiB chunks that a thread of its own compresses, paces and writes to
//! the link, while the caller reads and hashes the next blocks. `Prefetch` is the
//! receiver's: a thread reads (and decompresses) the link ahead into chunks while the
//! caller decodes, verifies and stages frames. Both hold at most `DEPTH` chunks in
//! flight (bounded channels), keep the bytes in order, and change nothing in the format.
//!
//! A `Pipe` flush passes the flush on in order: everything written before it reaches the
//! link before the caller's next read of an answer can be satisfied. A write error in the
//! thread comes back, with its kind, from the next write or flush (a receiver that hung
//! up is still a broken pipe). Dropping a `Pipe` sends what is left and waits for the
//! thread, so the inner writer (the zstd stream's end, the child's stdin) is closed when
//! the drop returns.

use std::io::{self, Read, Write};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use crossbeam_channel::{Receiver, Sender, bounded};

/// The bytes of one hand-over between the stages.
pub const CHUNK: usize = 256 << 10;
/// Chunks in flight between the two stages (2 MiB).
pub const DEPTH: usize = 8;

enum Chunk {
    Data(Vec<u8>),
    Flush,
}

/// The sender's writing stage: a thread owns the inner writer.
pub struct Pipe {
    tx: Option<Sender<Chunk>>,
    /// Emptied chunks coming back, to be filled again.
    free: Receiver<Vec<u8>>,
    buf: Vec<u8>,
    failed: Arc<Mutex<Option<(io::ErrorKind, String)>>>,
    thread: Option<JoinHandle<()>>,
}

impl Pipe {
    pub fn new<W: Write + Send + 'static>(mut inner: W) -> io::Result<Pipe> {
        let (tx, rx) = bounded::<Chunk>(DEPTH);
        let (back, free) = bounded::<Vec<u8>>(DEPTH + 1);
        let failed = Arc::new(Mutex::new(None));
        let fail = failed.clone();
        let thread = std::thread::Builder::new()
            .name("drfs-send".into())
            .spawn(move || {
                for c in rx {
                    let r = match c {
                        Chunk::Data(mut b) => {
                            let r = inner.write_all(&b);
                            b.clear();
                            let _ = back.try_send(b);
                            r
                        }
                        Chunk::Flush => inner.flush(),
                    };
                    if let Err(e) = r {
                        if let Ok(mut f) = fail.lock() {
                            *f = Some((e.kind(), e.to_string()));
                        }
                        return;
                    }
                }
            })?;
        Ok(Pipe {
            tx: Some(tx),
            free,
            buf: Vec::with_capacity(CHUNK),
            failed,
            thread: Some(thread),
        })
    }

    /// The thread's error, if it stopped on one.
    fn failure(&self) -> Option<io::Error> {
        let f = self.failed.lock().ok()?;
        f.as_ref().map(|(k, m)| io::Error::new(*k, m.clone()))
    }

    fn send(&mut self, c: Chunk) -> io::Result<()> {
        if let Some(e) = self.failure() {
            return Err(e);
        }
        let gone = || io::Error::new(io::ErrorKind::BrokenPipe, "the sending thread stopped");
        let tx = self.tx.as_ref().ok_or_else(gone)?;
        if tx.send(c).is_err() {
            return Err(self.failure().unwrap_or_else(gone));
        }
        Ok(())
    }

    fn hand_over(&mut self) -> io::Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let next = self
            .free
            .try_recv()
            .unwrap_or_else(|_| Vec::with_capacity(CHUNK));
        let full = std::mem::replace(&mut self.buf, next);
        self.send(Chunk::Data(full))
    }
}

impl Write for Pipe {
    fn write(&mut self, b: &[u8]) -> io::Result<usize> {
        let n = b.len().min(CHUNK - self.buf.len());
        self.buf.extend_from_slice(&b[..n]);
        if self.buf.len() == CHUNK {
            self.hand_over()?;
        }
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.hand_over()?;
        self.send(Chunk::Flush)
    }
}

impl Drop for Pipe {
    fn drop(&mut self) {
        let _ = self.hand_over();
        let _ = self.send(Chunk::Flush);
        drop(self.tx.take());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The receiver's reading stage: a thread reads the inner reader ahead.
pub struct Prefetch {
    rx: Receiver<io::Result<Vec<u8>>>,
    back: Sender<Vec<u8>>,
    cur: Vec<u8>,
    at: usize,
    ended: bool,
}

impl Prefetch {
    /// Reads `inner` ahead on a thread of its own. The thread ends at the end of the
    /// stream, on an error, or once this is dropped and its next chunk is read.
    pub fn new<R: Read + Send + 'static>(mut inner: R) -> io::Result<Prefetch> {
        let (tx, rx) = bounded::<io::Result<Vec<u8>>>(DEPTH);
        let (back, free) = bounded::<Vec<u8>>(DEPTH + 1);
        std::thread::Builder::new()
            .name("drfs-receive".into())
            .spawn(move || {
                loop {
                    let mut b = free.try_recv().unwrap_or_default();
                    b.resize(CHUNK, 0);
                    let r = loop {
                        match inner.read(&mut b) {
                            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                            r => break r,
                        }
                    };
                    let (item, end) = match r {
                        Ok(0) => return,
                        Ok(n) => {
                            b.truncate(n);
                            (Ok(b), false)
                        }
                        Err(e) => (Err(e), true),
                    };
                    if tx.send(item).is_err() || end {
                        return;
                    }
                }
            })?;
        Ok(Prefetch {
            rx,
            back,
            cur: Vec::new(),
            at: 0,
            ended: false,
        })
    }
}

impl Read for Prefetch {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        while self.at == self.cur.len() {
            if self.ended {
                return Ok(0);
            }
            match self.rx.recv() {
                Ok(Ok(b)) => {
                    let old = std::mem::replace(&mut self.cur, b);
                    let _ = self.back.try_send(old);
                    self.at = 0;
                }
                Ok(Err(e)) => {
                    self.ended = true;
                    return Err(e);
                }
                Err(_) => self.ended = true,
            }
        }
        let n = out.len().min(self.cur.len() - self.at);
        out[..n].copy_from_slice(&self.cur[self.at..self.at + n]);
        self.at += n;
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A writer that records what reached it and fails after `limit` bytes.
    struct Sink(Arc<Mutex<Vec<u8>>>, usize);

    impl Write for Sink {
        fn write(&mut self, b: &[u8]) -> io::Result<usize> {
            let mut v = self.0.lock().unwrap();
            if v.len() + b.len() > self.1 {
                return Err(io::Error::new(io::ErrorKind::BrokenPipe, "gone"));
            }
            v.extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn pipe_keeps_order_and_reports_a_broken_pipe() {
        let got = Arc::new(Mutex::new(Vec::new()));
        let data: Vec<u8> = (0..3_000_000u32).map(|i| (i * 7 % 251) as u8).collect();
        let mut p = Pipe::new(Sink(got.clone(), usize::MAX)).unwrap();
        for c in data.chunks(1000) {
            p.write_all(c).unwrap();
        }
        drop(p);
        assert_eq!(*got.lock().unwrap(), data);

        let mut p = Pipe::new(Sink(Arc::new(Mutex::new(Vec::new())), 1 << 20)).unwrap();
        let e = (0..100)
            .find_map(|_| p.write_all(&data[..100_000]).and_then(|()| p.flush()).err())
            .expect("an error");
        assert_eq!(e.kind(), io::ErrorKind::BrokenPipe);
    }

    #[test]
    fn prefetch_reads_everything_in_order() {
        let data: Vec<u8> = (0..3_000_000u32).map(|i| (i * 13 % 241) as u8).collect();
        let mut r = Prefetch::new(io::Cursor::new(data.clone())).unwrap();
        let mut got = Vec::new();
        r.read_to_end(&mut got).unwrap();
        assert_eq!(got, data);
    }
}
