//! A protected store's settings, each parsed in one place: the interval between cycles
//! (`Interval`), the consistency groups (`Group`), and sizes given on the command line
//! (`parse_size`). In `state.toml` they are the strings an operator typed.

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// The time between cycles: a duration of 1 s or more, or `manual` (cycles only when
/// `drfs ship` runs, e.g. from cron), which has none.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Interval {
    Every(Duration),
    Manual,
}

pub const MANUAL: &str = "manual";

impl Interval {
    /// The duration, if the schedule has one.
    pub fn every(&self) -> Option<Duration> {
        match self {
            Interval::Every(d) => Some(*d),
            Interval::Manual => None,
        }
    }
}

impl FromStr for Interval {
    type Err = String;

    fn from_str(s: &str) -> Result<Interval, String> {
        if s == MANUAL {
            return Ok(Interval::Manual);
        }
        let d = humantime::parse_duration(s).map_err(|e| {
            format!("bad interval {s:?} ({e}): give a duration like 30s, 5m, 1h, or manual")
        })?;
        if d < Duration::from_secs(1) {
            return Err(format!("interval {s:?} is shorter than 1 s"));
        }
        Ok(Interval::Every(d))
    }
}

impl fmt::Display for Interval {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Interval::Every(d) => write!(f, "{}", humantime::format_duration(*d)),
            Interval::Manual => f.write_str(MANUAL),
        }
    }
}

impl Serialize for Interval {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Interval {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d)?
            .parse()
            .map_err(serde::de::Error::custom)
    }
}

/// Consistency groups: one cut instant for the whole store, or one per top-level folder
/// (one per VM, when each VM has its folder).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Group {
    #[default]
    Store,
    Dir,
}

impl FromStr for Group {
    type Err = String;

    fn from_str(s: &str) -> Result<Group, String> {
        match s {
            "store" => Ok(Group::Store),
            "dir" => Ok(Group::Dir),
            _ => Err(format!("--group must be store or dir, not {s:?}")),
        }
    }
}

impl fmt::Display for Group {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Group::Store => "store",
            Group::Dir => "dir",
        })
    }
}

/// Parses sizes like `65536`, `64K`, `1M`, `4KiB`.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: u64 = num.parse().map_err(|_| format!("not a size: {s}"))?;
    let mult: u64 = match unit.trim().to_ascii_uppercase().as_str() {
        "" | "B" => 1,
        "K" | "KB" | "KIB" => 1 << 10,
        "M" | "MB" | "MIB" => 1 << 20,
        "G" | "GB" | "GIB" => 1 << 30,
        _ => return Err(format!("not a size: {s}")),
    };
    n.checked_mul(mult)
        .ok_or_else(|| format!("size too large: {s}"))
}

/// The zstd level `--compress zstd` (and an ssh target by default) means.
pub const DEFAULT_LEVEL: i32 = 1;

/// `--compress`: how the sender's half of a stream is compressed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compress {
    None,
    Zstd(i32),
}

impl Compress {
    /// The codec byte of the sender's greeting.
    pub fn code(self) -> u8 {
        match self {
            Compress::None => 0,
            Compress::Zstd(_) => 1,
        }
    }
}

impl FromStr for Compress {
    type Err = String;

    fn from_str(s: &str) -> Result<Compress, String> {
        let bad = || {
            format!(
                "--compress {s:?}: expected none, zstd or zstd:LEVEL (1..19, or -7..-1 for the fastest)"
            )
        };
        match s.split_once(':') {
            None if s == "none" => Ok(Compress::None),
            None if s == "zstd" => Ok(Compress::Zstd(DEFAULT_LEVEL)),
            Some(("zstd", l)) => {
                let l: i32 = l.parse().map_err(|_| bad())?;
                if (-7..=19).contains(&l) && l != 0 {
                    Ok(Compress::Zstd(l))
                } else {
                    Err(bad())
                }
            }
            _ => Err(bad()),
        }
    }
}

impl fmt::Display for Compress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Compress::None => f.write_str("none"),
            Compress::Zstd(l) => write!(f, "zstd:{l}"),
        }
    }
}

impl Serialize for Compress {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Compress {
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
    fn settings_parse_once_and_print_back() {
        assert_eq!("30s".parse(), Ok(Interval::Every(Duration::from_secs(30))));
        assert_eq!("manual".parse(), Ok(Interval::Manual));
        assert!("500ms".parse::<Interval>().is_err());
        assert!("soon".parse::<Interval>().is_err());
        assert_eq!(Interval::Every(Duration::from_secs(300)).to_string(), "5m");
        assert_eq!("dir".parse(), Ok(Group::Dir));
        assert!("vm".parse::<Group>().is_err());
        assert_eq!(parse_size("64K"), Ok(65536));
        assert_eq!(parse_size("1M"), Ok(1 << 20));
        assert_eq!(parse_size("4096"), Ok(4096));
        assert!(parse_size("12Q").is_err());
        assert!(parse_size("").is_err());
    }

    #[test]
    fn compress_settings_parse_and_print_back() {
        for s in ["none", "zstd:3", "zstd:1", "zstd:-5", "zstd:19"] {
            assert_eq!(s.parse::<Compress>().unwrap().to_string(), s);
        }
        assert_eq!(
            "zstd".parse::<Compress>(),
            Ok(Compress::Zstd(DEFAULT_LEVEL))
        );
        for bad in ["zstd:0", "zstd:20", "gzip", "zstd:x", ""] {
            assert!(bad.parse::<Compress>().is_err(), "{bad}");
        }
    }
}
