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

/// `--bwlimit`: a cap on the bytes per second on the wire, optionally by time of day
/// (`08:00-18:00=5M,20M`: 5 MiB/s from 08:00 to 18:00 local time, 20 MiB/s otherwise;
/// `none` or `0` for no cap). Windows may wrap midnight (`22:00-06:00=50M`); the first
/// window that holds a time wins.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BwLimit {
    /// (from, to minute of the day, bytes per second, 0 = uncapped).
    pub windows: Vec<(u32, u32, u64)>,
    /// Outside every window (0 = uncapped).
    pub otherwise: u64,
    text: String,
}

fn minute(s: &str) -> Option<u32> {
    let (h, m) = s.split_once(':')?;
    let (h, m): (u32, u32) = (h.parse().ok()?, m.parse().ok()?);
    (h < 24 && m < 60).then_some(h * 60 + m)
}

impl BwLimit {
    /// The cap at `minute` of the local day (none: uncapped).
    pub fn rate_at(&self, minute: u32) -> Option<u64> {
        let inside = |&&(a, b, _): &&(u32, u32, u64)| {
            if a <= b {
                (a..b).contains(&minute)
            } else {
                minute >= a || minute < b
            }
        };
        let r = self
            .windows
            .iter()
            .find(inside)
            .map_or(self.otherwise, |w| w.2);
        (r > 0).then_some(r)
    }
}

impl FromStr for BwLimit {
    type Err = String;

    fn from_str(s: &str) -> Result<BwLimit, String> {
        let bad = |why: String| {
            format!(
                "--bwlimit {s:?}: {why}; expected RATE (e.g. 10M, bytes per second) or HH:MM-HH:MM=RATE,...[,RATE]"
            )
        };
        let mut windows = Vec::new();
        let mut otherwise = 0;
        for part in s.split(',').map(str::trim) {
            if part == "none" {
                continue;
            }
            match part.split_once('=') {
                Some((span, rate)) => {
                    let (a, b) = span
                        .split_once('-')
                        .ok_or_else(|| bad(format!("{span:?} is not HH:MM-HH:MM")))?;
                    let (a, b) = minute(a)
                        .zip(minute(b))
                        .ok_or_else(|| bad(format!("{span:?} is not HH:MM-HH:MM")))?;
                    windows.push((a, b, parse_size(rate).map_err(bad)?));
                }
                None => otherwise = parse_size(part).map_err(bad)?,
            }
        }
        let low = windows
            .iter()
            .map(|w| w.2)
            .chain([otherwise])
            .filter(|&r| r > 0)
            .min();
        if low.is_some_and(|r| r < 4096) {
            return Err(bad("a cap below 4K/s".into()));
        }
        Ok(BwLimit {
            windows,
            otherwise,
            text: s.trim().to_string(),
        })
    }
}

impl fmt::Display for BwLimit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

impl Serialize for BwLimit {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for BwLimit {
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

    #[test]
    fn bandwidth_caps_by_time_of_day() {
        let b: BwLimit = "08:00-18:00=5M,22:00-06:00=0,20M".parse().unwrap();
        assert_eq!(b.rate_at(7 * 60 + 59), Some(20 << 20));
        assert_eq!(b.rate_at(8 * 60), Some(5 << 20));
        assert_eq!(b.rate_at(18 * 60), Some(20 << 20));
        assert_eq!(b.rate_at(23 * 60), None);
        assert_eq!(b.rate_at(60), None);
        assert_eq!("10M".parse::<BwLimit>().unwrap().rate_at(0), Some(10 << 20));
        assert_eq!("none".parse::<BwLimit>().unwrap().rate_at(0), None);
        assert_eq!(b.to_string(), "08:00-18:00=5M,22:00-06:00=0,20M");
        for bad in ["25:00-01:00=1M", "08:00=1M", "1X", "100"] {
            assert!(bad.parse::<BwLimit>().is_err(), "{bad}");
        }
    }
}
