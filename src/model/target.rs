//! Where a store replicates to, parsed once from `--to` (and from `state.toml`, where it
//! is kept as the text the operator gave): a directory on this host, another host over
//! ssh, or an object store. Object stores are not supported yet; the form parses, so that
//! it is refused with a clear word instead of being taken for a path.

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// A directory on this host.
    Local(PathBuf),
    /// `ssh://[user@]host[:port]/path`: a directory on another host, reached with the
    /// system's ssh client.
    Ssh {
        user: Option<String>,
        host: String,
        port: Option<u16>,
        path: String,
    },
    /// `s3://bucket/prefix`: an S3-compatible object store.
    S3 { bucket: String, prefix: String },
}

impl Target {
    /// The local directory, or why this target is not one.
    pub fn local(&self) -> Result<&Path, String> {
        match self {
            Target::Local(p) => Ok(p),
            Target::Ssh { host, path, .. } => Err(format!(
                "{self} is on another host: run this on {host} with {path}"
            )),
            Target::S3 { .. } => Err(format!(
                "{self}: replicating to an object store is not supported by this drfs yet; give a local directory"
            )),
        }
    }
}

fn ssh(rest: &str) -> Result<Target, String> {
    let bad = || format!("ssh://{rest}: expected ssh://[user@]host[:port]/path");
    let (authority, path) = rest.split_once('/').ok_or_else(bad)?;
    let (user, hostport) = match authority.rsplit_once('@') {
        Some((u, h)) if !u.is_empty() => (Some(u.to_string()), h),
        Some(_) => return Err(bad()),
        None => (None, authority),
    };
    let (host, port) = match hostport.rsplit_once(':') {
        Some((h, p)) => (h, Some(p.parse::<u16>().map_err(|_| bad())?)),
        None => (hostport, None),
    };
    // A host or user that begins with `-` would read as an option of ssh.
    let odd =
        |s: &str| s.starts_with('-') || s.chars().any(|c| c.is_whitespace() || c.is_control());
    if host.is_empty() || path.is_empty() || odd(host) || user.as_deref().is_some_and(odd) {
        return Err(bad());
    }
    Ok(Target::Ssh {
        user,
        host: host.to_string(),
        port,
        path: format!("/{path}"),
    })
}

impl FromStr for Target {
    type Err = String;

    fn from_str(s: &str) -> Result<Target, String> {
        if let Some(rest) = s.strip_prefix("ssh://") {
            return ssh(rest);
        }
        if let Some(rest) = s.strip_prefix("s3://") {
            let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
            if bucket.is_empty() {
                return Err(format!("{s}: expected s3://bucket[/prefix]"));
            }
            return Ok(Target::S3 {
                bucket: bucket.to_string(),
                prefix: prefix.trim_matches('/').to_string(),
            });
        }
        if let Some((scheme, _)) = s.split_once("://") {
            if !scheme.is_empty() && scheme.chars().all(|c| c.is_ascii_alphanumeric()) {
                return Err(format!(
                    "{s}: unknown kind of target {scheme}://; give a directory (or ssh://, s3://)"
                ));
            }
        }
        if s.is_empty() {
            return Err("the target is empty: give the replica's directory".into());
        }
        Ok(Target::Local(PathBuf::from(s)))
    }
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Target::Local(p) => write!(f, "{}", p.display()),
            Target::Ssh {
                user,
                host,
                port,
                path,
            } => {
                f.write_str("ssh://")?;
                if let Some(u) = user {
                    write!(f, "{u}@")?;
                }
                f.write_str(host)?;
                if let Some(p) = port {
                    write!(f, ":{p}")?;
                }
                f.write_str(path)
            }
            Target::S3 { bucket, prefix } if prefix.is_empty() => write!(f, "s3://{bucket}"),
            Target::S3 { bucket, prefix } => write!(f, "s3://{bucket}/{prefix}"),
        }
    }
}

impl Serialize for Target {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Target {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d)?
            .parse()
            .map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_parse_and_print_back() {
        for s in [
            "/backup/vmstore",
            "ssh://backup.example/srv/replica",
            "ssh://root@10.0.0.2:2222/srv/replica",
            "s3://drfs/site-b",
        ] {
            let t: Target = s.parse().unwrap();
            assert_eq!(t.to_string(), s);
        }
        assert_eq!(
            "ssh://u@h:22/p".parse::<Target>(),
            Ok(Target::Ssh {
                user: Some("u".into()),
                host: "h".into(),
                port: Some(22),
                path: "/p".into()
            })
        );
        assert!("relative/dir".parse::<Target>().unwrap().local().is_ok());
        let e = "ssh://h/p".parse::<Target>().unwrap().local().unwrap_err();
        assert!(e.contains("run this on h with /p"), "{e}");
        assert!("ssh://-oProxyCommand=x/p".parse::<Target>().is_err());
        assert!("ssh://-u@h/p".parse::<Target>().is_err());
        assert!("ssh://h".parse::<Target>().is_err());
        assert!("ssh://h:x/p".parse::<Target>().is_err());
        assert!("ftp://h/p".parse::<Target>().is_err());
        assert!("".parse::<Target>().is_err());
    }
}
