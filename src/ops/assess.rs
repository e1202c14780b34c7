//! `drfs assess`: what replicating a mounted store would take, with no replica. Through
//! the daemon's control socket it runs an observer beside the change bitmaps (it never
//! clears a bit or takes a cut, so cycles of a protected store go on as before), takes
//! the distinct blocks changed every tick (the shortest window), unions them into each
//! window (30 s, 1 min, 5 min, 15 min by default), and encodes a sample of each tick's
//! blocks, read from the store, as a cycle would send them (block frames, one zstd
//! stream). From that: the bandwidth each interval needs at its busiest window, and the
//! RPO a bandwidth cap gives. Windows longer than the run are extrapolated from the
//! longest one measured, as an upper bound, and say so.

use std::collections::HashMap;
use std::fs::File;
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::daemon::control::{AssessTake, Request, Session};
use crate::error::{Error, Result};
use crate::model::FileId;
use crate::model::settings::Compress;
use crate::state::StateDir;
use crate::wire::{self, Block};

/// The windows measured when none are given.
pub const WINDOWS: [u64; 4] = [30, 60, 300, 900];
/// Blocks of each tick's churn read and encoded for the compression sample.
const SAMPLE_PER_TICK: usize = 64;

/// What to measure.
pub struct Assess {
    /// How long to watch.
    pub run_for: Duration,
    /// Window lengths in seconds, each a multiple of the shortest.
    pub windows: Vec<u64>,
    pub compress: Compress,
    /// The cap to judge the RPO at (bytes per second on the wire).
    pub bwlimit: Option<u64>,
}

/// The assessment's report (`--json` prints it as is; version 1).
#[derive(Debug, Serialize)]
pub struct Assessment {
    pub version: u32,
    pub store: String,
    pub block_size: u64,
    /// How long the observer watched.
    pub seconds: u64,
    pub compress: Compress,
    pub sample: Sample,
    /// Bytes on the wire per changed byte, from the sample (1.0 when nothing changed).
    pub wire_ratio: f64,
    pub bwlimit_bps: Option<u64>,
    pub windows: Vec<Window>,
}

/// The blocks read and encoded as a cycle would send them.
#[derive(Debug, Default, Serialize)]
pub struct Sample {
    pub blocks: u64,
    pub bytes: u64,
    pub wire_bytes: u64,
}

/// One interval length's churn.
#[derive(Debug, Serialize)]
pub struct Window {
    pub seconds: u64,
    /// How many whole windows of this length were watched (0: extrapolated).
    pub measured: u64,
    pub extrapolated: bool,
    /// Distinct changed bytes per window (block granularity): mean and busiest.
    pub mean_bytes: u64,
    pub max_bytes: u64,
    /// The busiest window's bytes on the wire (the sample's ratio applied).
    pub wire_bytes_max: u64,
    /// The bandwidth that ships the busiest window within one interval.
    pub need_bps: u64,
    /// At the cap: how long a cycle of the busiest window takes, and the RPO (interval
    /// plus that cycle) when it keeps up.
    pub cycle_s_at_cap: Option<f64>,
    pub rpo_s_at_cap: Option<f64>,
    pub keeps_up: Option<bool>,
}

/// What one tick saw, for whoever shows progress.
pub struct Tick {
    pub elapsed: Duration,
    pub changed_bytes: u64,
}

type Runs = HashMap<FileId, Vec<[u64; 2]>>;

/// Checks the windows and the run length; the tick is the shortest window.
fn check(a: &Assess) -> Result<u64> {
    let tick = *a
        .windows
        .iter()
        .min()
        .ok_or_else(|| Error::Invalid("--windows: give at least one".into()))?;
    if tick == 0 {
        return Err(Error::Invalid("--windows: a window of 0 s".into()));
    }
    if let Some(w) = a.windows.iter().find(|&&w| w % tick != 0) {
        return Err(Error::Invalid(format!(
            "--windows: {w}s is not a multiple of the shortest window, {tick}s"
        )));
    }
    if a.run_for < Duration::from_secs(tick) {
        return Err(Error::Invalid(format!(
            "--for {}s is shorter than the shortest window, {tick}s",
            a.run_for.as_secs()
        )));
    }
    Ok(tick)
}

/// Watches `store` (mounted) for `a.run_for` and reports; `on_tick` hears each tick.
pub fn assess(store: &Path, a: &Assess, on_tick: &dyn Fn(&Tick)) -> Result<Assessment> {
    let tick = check(a)?;
    let canon = store
        .canonicalize()
        .map_err(|e| Error::Invalid(format!("store {}: {e}", store.display())))?;
    let (sd, cfg) = StateDir::open(&canon)?;
    let Some((mut session, first)) = Session::open(&cfg.store_id, &Request::Assess)? else {
        return Err(Error::Invalid(format!(
            "{} is not mounted: drfs assess watches the live changes of a mounted store \
             (drfs mount {} MOUNTPOINT first)",
            canon.display(),
            canon.display()
        )));
    };
    if let Some(e) = first.get("error").and_then(|e| e.as_str()) {
        return Err(Error::Busy(format!("{}: {e}", canon.display())));
    }
    let bs = cfg.block_size;
    let ticks = a.run_for.as_secs() / tick;
    let mut acc: Vec<(u64, Runs, Vec<u64>)> = a
        .windows
        .iter()
        .map(|&w| (w / tick, Runs::new(), Vec::new()))
        .collect();
    let mut sample = Sample::default();
    let start = Instant::now();
    for i in 1..=ticks {
        let due = start + Duration::from_secs(i * tick);
        std::thread::sleep(due.saturating_duration_since(Instant::now()));
        let v = session.call(&Request::Take)?;
        let took: AssessTake = serde_json::from_value(v)
            .map_err(|e| Error::Link(format!("the daemon's answer: {e}")))?;
        let changed: u64 = took.files.iter().map(|f| blocks(&f.runs)).sum::<u64>() * bs;
        sample_tick(sd.store(), bs, a.compress, &took, &mut sample)?;
        for (k, runs, done) in &mut acc {
            for f in &took.files {
                let r = runs.entry(f.id).or_default();
                r.extend_from_slice(&f.runs);
                *r = crate::model::runs::union(std::mem::take(r));
            }
            if i % *k == 0 {
                done.push(runs.values().map(|r| blocks(r)).sum::<u64>() * bs);
                runs.clear();
            }
        }
        on_tick(&Tick {
            elapsed: start.elapsed(),
            changed_bytes: changed,
        });
    }
    drop(session);
    let ratio = if sample.bytes == 0 {
        1.0
    } else {
        sample.wire_bytes as f64 / sample.bytes as f64
    };
    let measured: Vec<(u64, Vec<u64>)> = a
        .windows
        .iter()
        .zip(acc)
        .map(|(&w, (_, _, done))| (w, done))
        .collect();
    let windows = windows(&measured, ratio, a.bwlimit);
    Ok(Assessment {
        version: 1,
        store: canon.display().to_string(),
        block_size: bs,
        seconds: ticks * tick,
        compress: a.compress,
        sample,
        wire_ratio: ratio,
        bwlimit_bps: a.bwlimit,
        windows,
    })
}

fn blocks(runs: &[[u64; 2]]) -> u64 {
    runs.iter().map(|r| r[1] - r[0]).sum()
}

/// Each window's figures; those not measured come from the longest one that was.
fn windows(measured: &[(u64, Vec<u64>)], ratio: f64, cap: Option<u64>) -> Vec<Window> {
    let longest = measured
        .iter()
        .filter(|(_, d)| !d.is_empty())
        .max_by_key(|(w, _)| *w);
    measured
        .iter()
        .map(|(w, done)| {
            let (mean, max, extrapolated) = if done.is_empty() {
                let (lw, ld): (u64, &[u64]) = longest.map_or((*w, &[]), |(lw, ld)| (*lw, ld));
                let k = w.div_ceil(lw);
                (
                    mean_of(ld) * k,
                    ld.iter().max().copied().unwrap_or(0) * k,
                    true,
                )
            } else {
                (
                    mean_of(done),
                    done.iter().max().copied().unwrap_or(0),
                    false,
                )
            };
            window(*w, done.len() as u64, extrapolated, mean, max, ratio, cap)
        })
        .collect()
}

fn mean_of(v: &[u64]) -> u64 {
    if v.is_empty() {
        0
    } else {
        v.iter().sum::<u64>() / v.len() as u64
    }
}

fn window(
    seconds: u64,
    measured: u64,
    extrapolated: bool,
    mean: u64,
    max: u64,
    ratio: f64,
    cap: Option<u64>,
) -> Window {
    let wire = (max as f64 * ratio).round() as u64;
    let cycle = cap.map(|c| wire as f64 / c as f64);
    let keeps_up = cycle.map(|t| t <= seconds as f64);
    Window {
        seconds,
        measured,
        extrapolated,
        mean_bytes: mean,
        max_bytes: max,
        wire_bytes_max: wire,
        need_bps: wire.div_ceil(seconds),
        cycle_s_at_cap: cycle,
        rpo_s_at_cap: cycle
            .filter(|&t| t <= seconds as f64)
            .map(|t| seconds as f64 + t),
        keeps_up,
    }
}

/// Reads up to `SAMPLE_PER_TICK` of the tick's blocks, spread evenly over them, and
/// encodes them as a cycle's stream would carry them.
fn sample_tick(
    store: &Path,
    bs: u64,
    compress: Compress,
    took: &AssessTake,
    s: &mut Sample,
) -> Result<()> {
    let all: Vec<(usize, u64)> = took
        .files
        .iter()
        .enumerate()
        .flat_map(|(i, f)| {
            f.runs
                .iter()
                .flat_map(move |r| (r[0]..r[1]).map(move |b| (i, b)))
        })
        .collect();
    if all.is_empty() {
        return Ok(());
    }
    let step = all.len().div_ceil(SAMPLE_PER_TICK);
    let sink = wire::compress::Counted::new(std::io::sink());
    let count = sink.count.clone();
    let inner: Box<dyn Write + Send> = match compress {
        Compress::None => Box::new(sink),
        Compress::Zstd(l) => wire::compress::encoder(sink, l).map_err(Error::encode)?,
    };
    let mut w = wire::Writer::at(inner, wire::VERSION);
    let mut files: HashMap<usize, Option<File>> = HashMap::new();
    let mut buf = vec![0u8; bs as usize];
    for &(i, b) in all.iter().step_by(step) {
        let f = files.entry(i).or_insert_with(|| {
            let p = took.files[i].path.as_ref()?;
            File::open(p.under(store)).ok()
        });
        let Some(f) = f else { continue };
        let n = read_block(f, &mut buf, b * bs);
        if n == 0 {
            continue;
        }
        let data = &buf[..n];
        let zero = crate::sys::is_zero(data);
        w.block(&Block {
            id: took.files[i].id,
            offset: b * bs,
            len: n as u32,
            zero,
            hash: *blake3::hash(data).as_bytes(),
            data: if zero { Vec::new() } else { data.to_vec() },
        })?;
        s.blocks += 1;
        s.bytes += n as u64;
    }
    drop(w);
    s.wire_bytes += count.load(std::sync::atomic::Ordering::Relaxed);
    Ok(())
}

/// Reads the block at `off` (short at the end of the file; 0 past it or on an error).
fn read_block(f: &File, buf: &mut [u8], off: u64) -> usize {
    let mut got = 0;
    while got < buf.len() {
        match f.read_at(&mut buf[got..], off + got as u64) {
            Ok(0) | Err(_) => break,
            Ok(n) => got += n,
        }
    }
    got
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn windows_extrapolate_as_a_bound() {
        let m = vec![(30, vec![10, 20]), (60, vec![25]), (300, vec![])];
        let w = windows(&m, 0.5, Some(1));
        assert_eq!(
            (w[0].mean_bytes, w[0].max_bytes, w[0].extrapolated),
            (15, 20, false)
        );
        assert_eq!(w[1].wire_bytes_max, 13);
        assert_eq!(
            (w[2].max_bytes, w[2].extrapolated, w[2].measured),
            (125, true, 0)
        );
        assert_eq!(w[0].rpo_s_at_cap, Some(40.0));
        assert_eq!(w[2].keeps_up, Some(true));
        let slow = windows(&[(30, vec![100])], 1.0, Some(1));
        assert_eq!(
            (slow[0].keeps_up, slow[0].rpo_s_at_cap),
            (Some(false), None)
        );
    }

    #[test]
    fn windows_must_divide() {
        let a = |w: Vec<u64>, s| Assess {
            run_for: Duration::from_secs(s),
            windows: w,
            compress: Compress::None,
            bwlimit: None,
        };
        assert!(check(&a(vec![30, 45], 60)).is_err());
        assert!(check(&a(vec![30], 10)).is_err());
        assert_eq!(check(&a(vec![60, 30], 60)).unwrap(), 30);
    }
}
