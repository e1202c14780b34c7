//! `drfs receive REPLICA`: serves one replication stream on stdin/stdout.

use std::path::Path;

use crate::error::Result;

/// Serves one sender until it says goodbye; the error tells whether it may retry.
pub fn receive(replica: &Path) -> Result<()> {
    // The receiver sets the modes of replicated files itself; its own state (undo
    // records, hashes, staging) is nobody else's business, whatever umask the caller
    // had (the mount daemon that spawns it runs with umask 0).
    unsafe { libc::umask(0o077) };
    let stdin = std::io::stdin().lock();
    let stdout = std::io::stdout().lock();
    let r = crate::replica::receive::serve(replica, stdin, stdout);
    if let Ok(rep) = crate::replica::posix::Replica::open_only(replica) {
        if let Ok(s) = crate::obs::status::replica(&rep) {
            crate::obs::watch::health(&rep.sd, s.health, &s.reasons);
        }
    }
    r
}
