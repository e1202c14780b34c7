//! A replica on another host: `drfs receive PATH` run there through the system's OpenSSH
//! client, the stream over ssh's stdin and stdout. The client is `ssh` (so `~/.ssh/config`,
//! agents, `ProxyJump` and known_hosts apply), or the command `--ssh-command` kept in the
//! store's settings, or `DRFS_SSH_COMMAND` over both (run by `sh -c`, as git runs
//! `GIT_SSH_COMMAND`); drfs adds `-T`, `BatchMode=yes` (never a password prompt) and
//! keepalives. When the stream does not open, ssh's exit code and last words say why, each
//! reason in one line of its own class: an unknown or changed host key and a refused
//! key need an operator, as do a far side without drfs, noise instead of drfs's banner and
//! a protocol version in common missing; a host that cannot be reached is worth a retry.

use std::process::{Command, Stdio};

use crate::error::{Class, Error, Result};
use crate::model::Target;
use crate::transport::{Failure, Link, Options};

/// Seconds between ssh's keepalives, and how many may go unanswered before it gives up:
/// a link that died is noticed within a minute.
const ALIVE_INTERVAL: u32 = 15;
const ALIVE_COUNT: u32 = 4;
const CONNECT_TIMEOUT: u32 = 30;

/// `s` quoted for a POSIX shell (the far side's login shell reads the command).
pub fn quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// The ssh client command in force: `DRFS_SSH_COMMAND`, else the store's, else `ssh`.
pub fn client(o: &Options) -> String {
    match std::env::var("DRFS_SSH_COMMAND") {
        Ok(c) if !c.trim().is_empty() => c,
        _ => o
            .ssh_command
            .clone()
            .filter(|c| !c.trim().is_empty())
            .unwrap_or_else(|| "ssh".into()),
    }
}

/// The arguments drfs adds to the client's: no tty, no prompts, keepalives, the port and
/// user, the host and the remote command.
pub fn args(user: Option<&str>, host: &str, port: Option<u16>, path: &str) -> Vec<String> {
    let mut a: Vec<String> = vec!["-T".into()];
    for o in [
        "BatchMode=yes".to_string(),
        format!("ServerAliveInterval={ALIVE_INTERVAL}"),
        format!("ServerAliveCountMax={ALIVE_COUNT}"),
        format!("ConnectTimeout={CONNECT_TIMEOUT}"),
    ] {
        a.push("-o".into());
        a.push(o);
    }
    if let Some(p) = port {
        a.push("-p".into());
        a.push(p.to_string());
    }
    if let Some(u) = user {
        a.push("-l".into());
        a.push(u.into());
    }
    a.push(host.into());
    a.push(format!("drfs receive {}", quote(path)));
    a
}

/// Starts `drfs receive` for `target` through ssh and opens the stream.
pub fn connect(target: &Target, o: &Options) -> Result<Link> {
    let Target::Ssh {
        user,
        host,
        port,
        path,
    } = target
    else {
        return Err(Error::Invalid(format!("{target} is not an ssh:// target")));
    };
    let client = client(o);
    let child = Command::new("sh")
        .arg("-c")
        .arg(format!("exec {client} \"$@\""))
        .arg("drfs-ssh")
        .args(args(user.as_deref(), host, *port, path))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| {
            Error::operator(format!(
                "{target}: cannot run the ssh client ({client}): {e}"
            ))
        })?;
    let what = target.to_string();
    Link::open(child, o, &|code, lines, f| {
        diagnose(&what, host, code, lines, f)
    })
}

/// Why the stream to `target` did not open: one line, of its class.
pub fn diagnose(
    target: &str,
    host: &str,
    code: Option<i32>,
    lines: &[String],
    f: Failure,
) -> Error {
    let has = |s: &str| lines.iter().any(|l| l.contains(s));
    let last = lines.last().map_or("", |l| l.trim());
    let f = match f {
        Failure::Version(v) => return Error::operator(format!("{target}: {v}")),
        Failure::Noise(n) => {
            return Error::operator(format!(
                "{target}: the far side wrote {n:?} instead of drfs's banner: a login script or the key's command= in authorized_keys prints to stdout; make it quiet, or fix the forced command (README: the restricted key)"
            ));
        }
        Failure::Stream(e) => e,
    };
    if let Some(l) = lines.iter().rev().find(|l| l.starts_with("drfs receive: ")) {
        return Error::Refused {
            message: format!("{target}: {}", &l["drfs receive: ".len()..]),
            class: Class::from_exit_code(code),
        };
    }
    if has("Host key verification failed")
        || has("REMOTE HOST IDENTIFICATION HAS CHANGED")
        || has("host key is known")
    {
        return Error::operator(format!(
            "{target}: the host key of {host} is unknown or has changed (ssh: Host key verification failed): check its fingerprint and add it to known_hosts (e.g. ssh-keyscan)"
        ));
    }
    if has("Permission denied") || has("Too many authentication failures") {
        return Error::operator(format!(
            "{target}: {host} refused this host's ssh key ({last}): add its public key to authorized_keys there (README: the restricted key)"
        ));
    }
    if code == Some(127) || has("command not found") || has("drfs: not found") {
        return Error::operator(format!(
            "{target}: drfs is not installed on {host} (or not on the PATH of the ssh user there): install the same drfs release there"
        ));
    }
    if code == Some(255) {
        return Error::Link(format!(
            "{target}: cannot reach {host}: {}",
            if last.is_empty() { "ssh failed" } else { last }
        ));
    }
    let code = code.map_or("a signal".to_string(), |c| format!("exit code {c}"));
    Error::Link(format!(
        "{target}: the far side ended before drfs's banner ({code}{}): {f}",
        if last.is_empty() {
            String::new()
        } else {
            format!(", {last}")
        }
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::WireError;

    fn why(code: i32, lines: &[&str]) -> Error {
        let lines: Vec<String> = lines.iter().map(|s| s.to_string()).collect();
        diagnose(
            "ssh://h/r",
            "h",
            Some(code),
            &lines,
            Failure::Stream(WireError::Closed),
        )
    }

    #[test]
    fn each_failure_to_connect_says_its_own_reason() {
        let e = why(255, &["Host key verification failed."]);
        assert!(e.to_string().contains("host key of h"), "{e}");
        assert_eq!(e.class(), Class::Operator);
        let e = why(255, &["root@h: Permission denied (publickey)."]);
        assert!(e.to_string().contains("refused this host's ssh key"), "{e}");
        assert_eq!(e.class(), Class::Operator);
        let e = why(127, &["sh: 1: drfs: not found"]);
        assert!(e.to_string().contains("drfs is not installed on h"), "{e}");
        assert_eq!(e.class(), Class::Operator);
        let e = why(255, &["ssh: connect to host h port 22: Connection refused"]);
        assert!(e.to_string().contains("cannot reach h"), "{e}");
        assert_eq!(e.class(), Class::Transient);
        let e = why(2, &["drfs receive: /x is not under /srv"]);
        assert_eq!(e.to_string(), "ssh://h/r: /x is not under /srv");
        assert_eq!(e.class(), Class::Operator);
    }

    #[test]
    fn the_remote_path_is_quoted_for_the_shell() {
        assert_eq!(quote("/srv/a b"), "'/srv/a b'");
        assert_eq!(quote("/srv/it's"), r"'/srv/it'\''s'");
        let a = args(Some("u"), "h", Some(2222), "/r");
        assert_eq!(a.last().unwrap(), "drfs receive '/r'");
        assert!(a.contains(&"BatchMode=yes".to_string()));
    }
}
