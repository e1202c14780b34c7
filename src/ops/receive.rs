//! `drfs receive REPLICA`: serves one replication stream on stdin/stdout. `drfs receive
//! --restrict-to DIR` is the forced command of a key in `authorized_keys`: it serves only
//! the replica the sender asked for (`SSH_ORIGINAL_COMMAND`, which must be `drfs receive
//! PATH`, nothing else) and only if that is a directory under DIR.

use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

/// Serves one sender until it says goodbye; the error tells whether it may retry.
pub fn receive(replica: &Path) -> Result<()> {
    // The receiver sets the modes of replicated files itself; its own state (undo
    // records, hashes, staging) is nobody else's business, whatever umask the caller
    // had (the mount daemon that spawns it runs with umask 0).
    unsafe { libc::umask(0o077) };
    let stdin = std::io::stdin();
    let stdout = std::io::stdout().lock();
    let roles = crate::replica::receive::Roles {
        promote: &crate::ops::failover::remote::promote_planned,
        demote: &crate::ops::reprotect::demote_here,
    };
    let r = crate::replica::receive::serve(replica, stdin, stdout, Some(&roles));
    if let Ok(rep) = crate::replica::posix::Replica::open_only(replica) {
        if let Ok(s) = crate::obs::status::replica(&rep) {
            crate::obs::watch::health(&rep.sd, s.health, &s.reasons);
        }
    }
    r
}

/// The replica a restricted key may serve: the path of `original` (the command the sender
/// asked ssh to run), if it is `drfs receive PATH` with PATH a directory under `dir`.
pub fn restricted(dir: &Path, original: Option<&str>) -> Result<PathBuf> {
    let only = || {
        format!(
            "this key may only run `drfs receive PATH` for a replica under {}",
            dir.display()
        )
    };
    let original =
        original.ok_or_else(|| Error::operator(format!("{}; ssh gave no command", only())))?;
    let words = shell_words(original)
        .map_err(|e| Error::operator(format!("{}, not {original:?} ({e})", only())))?;
    let path = match words.as_slice() {
        [drfs, receive, path]
            if receive == "receive" && Path::new(drfs).file_name().is_some_and(|n| n == "drfs") =>
        {
            PathBuf::from(path)
        }
        _ => return Err(Error::operator(format!("{}, not {original:?}", only()))),
    };
    let base = dir
        .canonicalize()
        .map_err(|e| Error::operator(format!("--restrict-to {}: {e}", dir.display())))?;
    let real = path.canonicalize().map_err(|e| {
        Error::operator(format!(
            "replica {}: {e} (it must be a directory under {})",
            path.display(),
            base.display()
        ))
    })?;
    if !real.starts_with(&base) || !real.is_dir() {
        return Err(Error::operator(format!(
            "{} is not a directory under {}: {}",
            path.display(),
            base.display(),
            only()
        )));
    }
    Ok(real)
}

/// A command line split as a POSIX shell would, for the one form senders use: words of
/// plain characters and single-quoted strings. Anything a shell would expand or run is
/// refused.
fn shell_words(s: &str) -> std::result::Result<Vec<String>, String> {
    let mut words = Vec::new();
    let mut cur: Option<String> = None;
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        match c {
            ' ' | '\t' => {
                if let Some(w) = cur.take() {
                    words.push(w);
                }
            }
            '\'' => {
                let w = cur.get_or_insert_with(String::new);
                loop {
                    match chars.next() {
                        Some('\'') => break,
                        Some(c) => w.push(c),
                        None => return Err("an unterminated quote".into()),
                    }
                }
            }
            '\\' => match chars.next() {
                Some('\'') => cur.get_or_insert_with(String::new).push('\''),
                _ => return Err("a backslash".into()),
            },
            c if c.is_ascii_alphanumeric() || "/._-,:=@+%".contains(c) => {
                cur.get_or_insert_with(String::new).push(c)
            }
            c => return Err(format!("the character {c:?}")),
        }
    }
    words.extend(cur);
    Ok(words)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_restricted_key_serves_only_replicas_under_its_directory() {
        let t = tempfile::tempdir().unwrap();
        let base = t.path().join("replicas");
        std::fs::create_dir_all(base.join("vm a")).unwrap();
        std::fs::create_dir_all(t.path().join("other")).unwrap();
        let q = |p: &Path| crate::transport::ssh::quote(&p.to_string_lossy());
        let ok = format!("drfs receive {}", q(&base.join("vm a")));
        assert_eq!(
            restricted(&base, Some(&ok)).unwrap(),
            base.join("vm a").canonicalize().unwrap()
        );
        for bad in [
            format!("drfs receive {}", q(&t.path().join("other"))),
            format!("drfs receive {}", q(&base.join("vm a/../../other"))),
            format!("drfs receive {}; rm -rf /", q(&base.join("vm a"))),
            format!("drfs receive $(id) {}", q(&base)),
            "drfs points /".to_string(),
            "sh".to_string(),
        ] {
            let e = restricted(&base, Some(&bad)).unwrap_err();
            assert_eq!(e.class(), crate::error::Class::Operator, "{bad}");
            assert!(e.to_string().contains("may only run"), "{bad}: {e}");
        }
        assert!(restricted(&base, None).is_err());
        assert_eq!(
            shell_words(r"drfs receive '/srv/it'\''s'").unwrap(),
            vec!["drfs", "receive", "/srv/it's"]
        );
    }
}
