//! Retention policies: which recovery points a replica keeps.
//!
//! Grammar: rules separated by commas; a point is kept if any rule keeps it, and the
//! newest point is always kept.
//! - `all:DURATION`: every point younger than DURATION.
//! - `minutely:DURATION`, `hourly:DURATION`, `daily:DURATION`, `weekly:DURATION`: among the
//!   points younger than DURATION, the newest of each UTC minute, hour, day or ISO week.
//! - `last:N`: the N newest points.
//!
//! DURATION is a number and a unit: `s`, `m`, `h`, `d`, `w` (e.g. `90m`, `24h`, `7d`). The
//! default, `all:1h,hourly:24h`, keeps every point of the last hour and then one per hour
//! for a day: Hyper-V's 24 hourly points as a floor.

use std::collections::BTreeSet;

pub const DEFAULT: &str = "all:1h,hourly:24h";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Rule {
    All(i64),
    Bucket { width: i64, within: i64 },
    Last(usize),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Policy {
    rules: Vec<Rule>,
    text: String,
}

const NS: i64 = 1_000_000_000;

fn duration(s: &str) -> Result<i64, String> {
    let (num, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len()));
    let n: i64 = num.parse().map_err(|_| format!("bad duration {s:?}"))?;
    let secs = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        "w" => 7 * 86_400,
        _ => return Err(format!("bad duration unit in {s:?} (use s, m, h, d or w)")),
    };
    if n <= 0 {
        return Err(format!("duration {s:?} must be positive"));
    }
    n.checked_mul(secs * NS)
        .ok_or_else(|| format!("duration {s:?} too long"))
}

impl Policy {
    pub fn parse(text: &str) -> Result<Policy, String> {
        let mut rules = Vec::new();
        for part in text.split(',').map(str::trim) {
            let (kind, arg) = part
                .split_once(':')
                .ok_or_else(|| format!("bad retention rule {part:?}: expected KIND:VALUE"))?;
            let width = match kind {
                "minutely" => Some(60 * NS),
                "hourly" => Some(3600 * NS),
                "daily" => Some(86_400 * NS),
                "weekly" => Some(7 * 86_400 * NS),
                _ => None,
            };
            rules.push(match (kind, width) {
                ("all", _) => Rule::All(duration(arg)?),
                ("last", _) => Rule::Last(
                    arg.parse()
                        .ok()
                        .filter(|&n| n > 0)
                        .ok_or_else(|| format!("bad count in {part:?}"))?,
                ),
                (_, Some(width)) => Rule::Bucket {
                    width,
                    within: duration(arg)?,
                },
                _ => {
                    return Err(format!(
                        "unknown retention rule {kind:?} (all, minutely, hourly, daily, weekly, last)"
                    ));
                }
            });
        }
        Ok(Policy {
            rules,
            text: text.to_string(),
        })
    }

    pub fn text(&self) -> &str {
        &self.text
    }

    /// Which of `points` (their cut times in ns, any order) to keep at time `now`.
    /// Returns indexes into `points`.
    pub fn keep(&self, points: &[i64], now: i64) -> BTreeSet<usize> {
        let mut order: Vec<usize> = (0..points.len()).collect();
        order.sort_by_key(|&i| std::cmp::Reverse(points[i]));
        let mut keep = BTreeSet::new();
        if let Some(&newest) = order.first() {
            keep.insert(newest);
        }
        for rule in &self.rules {
            match *rule {
                Rule::All(d) => keep.extend(order.iter().filter(|&&i| now - points[i] < d)),
                Rule::Last(n) => keep.extend(order.iter().take(n)),
                Rule::Bucket { width, within } => {
                    let mut seen = BTreeSet::new();
                    for &i in &order {
                        if now - points[i] < within && seen.insert(bucket(points[i], width)) {
                            keep.insert(i);
                        }
                    }
                }
            }
        }
        keep
    }
}

/// The UTC bucket of a time: weeks start on Monday (the epoch was a Thursday).
fn bucket(t: i64, width: i64) -> i64 {
    let shift = if width == 7 * 86_400 * NS {
        3 * 86_400 * NS
    } else {
        0
    };
    (t + shift).div_euclid(width)
}

#[cfg(test)]
mod tests {
    use super::*;

    const H: i64 = 3600 * NS;

    #[test]
    fn parses_and_rejects() {
        assert!(Policy::parse(DEFAULT).is_ok());
        assert!(Policy::parse("all:30m,daily:7d,weekly:4w,last:3").is_ok());
        for bad in [
            "",
            "hourly",
            "hourly:",
            "yearly:1d",
            "all:0h",
            "all:5x",
            "last:0",
            "all:-1h",
        ] {
            assert!(Policy::parse(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn default_keeps_all_of_the_last_hour_then_hourly() {
        let p = Policy::parse(DEFAULT).unwrap();
        let now = 1000 * H;
        // A point every 10 minutes for 30 hours.
        let pts: Vec<i64> = (0..180).map(|k| now - k * H / 6).collect();
        let keep = p.keep(&pts, now);
        // 6 in the last hour, then one per hour for the rest of the day.
        let in_hour = keep.iter().filter(|&&i| now - pts[i] < H).count();
        assert_eq!(in_hour, 6);
        let older: Vec<i64> = keep
            .iter()
            .map(|&i| pts[i])
            .filter(|&t| now - t >= H)
            .collect();
        let hours: BTreeSet<i64> = older.iter().map(|t| t / H).collect();
        assert_eq!(hours.len(), older.len(), "one per hour");
        assert!(older.iter().all(|&t| now - t < 24 * H));
        assert!(keep.contains(&0), "the newest is kept");
    }

    #[test]
    fn newest_is_always_kept() {
        let p = Policy::parse("all:1s").unwrap();
        let keep = p.keep(&[5, 100, 50], 1_000_000 * H);
        assert_eq!(keep.into_iter().collect::<Vec<_>>(), vec![1]);
    }
}
