//! How long work (shipping, restoring) tells how far it has got, without printing: the
//! command line draws a bar from it on a terminal; a daemon passes none.

/// Progress of one piece of work, in bytes.
pub trait Progress: Send + Sync {
    /// The work is `n` bytes in all (as far as is known).
    fn total(&self, n: u64);
    /// `n` more bytes are done.
    fn add(&self, n: u64);
    /// The work is over; whatever shows it can go.
    fn done(&self);
}
