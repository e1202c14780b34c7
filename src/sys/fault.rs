//! Fault injection for the crash tests: `DRFS_FAULT=NAME` makes the process SIGKILL itself
//! when it reaches the point called NAME (an apply phase, or a count of received or sent
//! blocks: `receive:N`, `send:N`),
//! so tests can stop it at every step that matters. Unset, it costs one lookup per point.
//! `DRFS_TEST_BOOT_NS=T` makes this boot seem to have begun at T (ns since the epoch), for
//! the simulated host-crash test.

use std::sync::OnceLock;

fn wanted() -> Option<&'static str> {
    static W: OnceLock<Option<String>> = OnceLock::new();
    W.get_or_init(|| std::env::var("DRFS_FAULT").ok())
        .as_deref()
}

/// Dies here if the tests asked for it.
pub fn hit(name: &str) {
    if wanted() == Some(name) {
        unsafe { libc::kill(libc::getpid(), libc::SIGKILL) };
    }
}

/// Dies at the `n`-th event of kind `kind` (`DRFS_FAULT=kind:n`).
pub fn hit_nth(kind: &str, n: u64) {
    let Some(w) = wanted() else { return };
    let at = w.strip_prefix(kind).and_then(|r| r.strip_prefix(':'));
    if at.and_then(|x| x.parse::<u64>().ok()) == Some(n) {
        unsafe { libc::kill(libc::getpid(), libc::SIGKILL) };
    }
}

/// The boot time a simulated host crash sets (`DRFS_TEST_BOOT_NS`).
pub fn boot_ns() -> Option<i128> {
    static B: OnceLock<Option<i128>> = OnceLock::new();
    *B.get_or_init(|| std::env::var("DRFS_TEST_BOOT_NS").ok()?.parse().ok())
}
