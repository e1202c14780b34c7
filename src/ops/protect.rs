//! `drfs protect`, `unprotect`, `pause` and `resume`: a store's replication settings, one
//! at a time. The first `protect` binds the replica (an empty directory, or with `--seed`
//! one whose files seed it; an existing replica must already be this store's); later ones
//! change only what they name. Moving to another replica takes `--rebind` and forgets the
//! old one's cycle state (the old replica keeps its points). `unprotect` forgets the
//! binding and leaves the replica as it is. `pause` stops cycles (changes are still
//! tracked and ship after `resume`). Each returns what changed, in words, for the caller
//! to print and log.

use std::path::Path;

use crate::error::{At, Error, Result};
use crate::model::fmt::rfc3339_ns;
use crate::model::retention::{self, Policy};
use crate::model::settings::{BwLimit, Compress};
use crate::model::{Group, Interval, Target};
use crate::ship::session::{self, Hello};
use crate::state::{Config, Hooks, Pause, Replication, Role, StateDir};

/// What `drfs protect` sets; what is left out keeps its value (or its default, the first
/// time).
#[derive(Default)]
pub struct Protect<'a> {
    pub to: Option<&'a str>,
    pub interval: Option<&'a str>,
    pub expect_every: Option<&'a str>,
    pub keep: Option<&'a str>,
    pub group: Option<&'a str>,
    /// The replica's directory may already hold files: they seed it.
    pub seed: bool,
    /// The store may move to another replica than the one it replicates to.
    pub rebind: bool,
    /// Pre-cut hooks (replacing the ones set), in order.
    pub pre_cut: Option<&'a [String]>,
    /// Post-cut hooks (replacing the ones set), run in reverse order.
    pub post_cut: Option<&'a [String]>,
    /// How often a cycle runs the hooks (e.g. `4h`; `always`: every cycle).
    pub app_consistent_every: Option<&'a str>,
    pub hook_timeout: Option<&'a str>,
    /// Forget the hooks.
    pub no_hooks: bool,
    /// The ssh client command for an ssh:// replica (`Some("")`: back to `ssh`).
    pub ssh_command: Option<&'a str>,
    /// `--compress`: none, zstd or zstd:LEVEL (`Some("default")`: the target's default).
    pub compress: Option<&'a str>,
    /// `--bwlimit`: RATE or HH:MM-HH:MM=RATE,...,RATE (`Some("none")`: uncapped).
    pub bwlimit: Option<&'a str>,
}

/// The interval a first `protect` takes when none is given.
pub const DEFAULT_INTERVAL: &str = "30s";

/// The settings in force after a change, and the change in words.
pub struct Changed {
    pub rep: Replication,
    pub what: Vec<String>,
    /// Warnings about the settings (a manual schedule with no expected cadence).
    pub warnings: Vec<String>,
}

fn store_dir(store: &Path) -> Result<StateDir> {
    let store = store
        .canonicalize()
        .map_err(|e| Error::Invalid(format!("store {}: {e}", store.display())))?;
    if !store.is_dir() {
        return Err(Error::Invalid(format!(
            "store {} is not a directory",
            store.display()
        )));
    }
    Ok(StateDir::new(&store))
}

/// An existing directory for the replica, outside the store (on another host: whatever
/// its receiver says when it is bound).
fn replica_dir(to: &str, store: &Path) -> Result<Target> {
    let target: Target = to.parse().map_err(Error::Invalid)?;
    if let Target::Ssh { .. } = target {
        return Ok(target);
    }
    let dir = target.local().map_err(Error::Invalid)?;
    let replica = dir
        .canonicalize()
        .map_err(|e| Error::Invalid(format!("replica {}: {e}", dir.display())))?;
    if !replica.is_dir() {
        return Err(Error::Invalid(format!(
            "replica {} is not a directory",
            replica.display()
        )));
    }
    if replica.starts_with(store) || store.starts_with(&replica) {
        return Err(Error::Invalid(format!(
            "store {} and replica {} must not contain each other",
            store.display(),
            replica.display()
        )));
    }
    Ok(Target::Local(replica))
}

/// Protects a store, or changes the settings it replicates with.
pub fn protect(store: &Path, p: &Protect<'_>) -> Result<Changed> {
    let sd = store_dir(store)?;
    let old = if sd.exists() {
        sd.config()?.replication
    } else {
        None
    };
    let target = match (p.to, &old) {
        (Some(to), _) => replica_dir(to, sd.store())?,
        (None, Some(r)) => r.target.clone(),
        (None, None) => {
            return Err(Error::Invalid(format!(
                "{} is not protected yet: give --to REPLICA",
                sd.store().display()
            )));
        }
    };
    let moved = old.as_ref().is_some_and(|r| r.target != target);
    if moved && !p.rebind {
        let r = old
            .as_ref()
            .map(|r| r.target.to_string())
            .unwrap_or_default();
        return Err(Error::Invalid(format!(
            "{} replicates to {r}; to move it to {target}, add --rebind ({r} keeps its points and receives no more cycles)",
            sd.store().display()
        )));
    }
    let interval: Interval = match (p.interval, &old) {
        (Some(i), _) => i.parse().map_err(Error::Invalid)?,
        (None, Some(r)) => r.interval,
        (None, None) => DEFAULT_INTERVAL.parse().map_err(Error::Invalid)?,
    };
    let expect_every = match (p.expect_every, &old) {
        (Some(e), _) => Some(parse_expect(e, interval)?),
        (None, Some(r)) if interval == Interval::Manual => r.expect_every,
        _ => None,
    };
    let keep = match (p.keep, &old) {
        (Some(k), _) => {
            Policy::parse(k).map_err(Error::Invalid)?;
            k.to_string()
        }
        (None, Some(r)) => r.keep.clone(),
        (None, None) => retention::DEFAULT.to_string(),
    };
    let group: Group = match (p.group, &old) {
        (Some(g), _) => g.parse().map_err(Error::Invalid)?,
        (None, Some(r)) => r.group,
        (None, None) => Group::default(),
    };
    let hooks = hooks(p, old.as_ref().and_then(|r| r.hooks.clone()))?;
    let ssh_command = match (p.ssh_command, &old) {
        (Some(c), _) => Some(c.trim().to_string()).filter(|c| !c.is_empty()),
        (None, Some(r)) => r.ssh_command.clone(),
        (None, None) => None,
    };
    let compress: Option<Compress> = match (p.compress, &old) {
        (Some("default"), _) => None,
        (Some(c), _) => Some(c.parse().map_err(Error::Invalid)?),
        (None, Some(r)) => r.compress,
        (None, None) => None,
    };
    let bwlimit: Option<BwLimit> = match (p.bwlimit, &old) {
        (Some("none"), _) => None,
        (Some(b), _) => Some(b.parse().map_err(Error::Invalid)?),
        (None, Some(r)) => r.bwlimit.clone(),
        (None, None) => None,
    };
    let (sd, mut cfg) = match sd.exists().then(|| sd.config()).transpose()? {
        Some(c) if c.role == Role::Replica => (onward(&sd, &c, &target)?, c),
        _ => StateDir::open_or_init(sd.store(), None)?,
    };
    // The replica learns its store, and its retention policy, when it is bound.
    let bind = old.is_none() || moved || p.to.is_some() || p.keep.is_some();
    let replica_id = if bind {
        let hello = Hello {
            store_id: &cfg.store_id,
            block_size: cfg.block_size,
            keep: &keep,
            seed: p.seed,
        };
        let o = crate::transport::Options {
            ssh_command: ssh_command.clone(),
            compress: Compress::None,
            bwlimit: None,
        };
        session::bind(&target, &o, &hello)?
    } else {
        old.as_ref()
            .map(|r| r.replica_id.clone())
            .unwrap_or_default()
    };
    let rep = Replication {
        target,
        interval,
        keep,
        group,
        replica_id,
        expect_every,
        ssh_command,
        compress,
        bwlimit,
        paused: old.as_ref().and_then(|r| r.paused.clone()),
        hooks,
    };
    let what = changes(old.as_ref(), &rep);
    if old.as_ref().is_none_or(|r| r.replica_id != rep.replica_id) {
        forget_cycles(&sd)?;
    }
    cfg.replication = Some(rep.clone());
    sd.write_config(&cfg)?;
    let mut warnings = Vec::new();
    if rep.interval == Interval::Manual && rep.expect_every.is_none() {
        warnings.push(
            "with --interval manual and no --expect-every, no lag alarm can tell that the cron job stopped".to_string(),
        );
    }
    Ok(Changed {
        rep,
        what,
        warnings,
    })
}

/// The hooks after this change: each option given replaces its part, the others keep
/// theirs; every command must be executable.
fn hooks(p: &Protect<'_>, old: Option<Hooks>) -> Result<Option<Hooks>> {
    if p.no_hooks {
        return Ok(None);
    }
    let given = p.pre_cut.is_some()
        || p.post_cut.is_some()
        || p.app_consistent_every.is_some()
        || p.hook_timeout.is_some();
    if !given {
        return Ok(old);
    }
    let mut h = old.unwrap_or(Hooks {
        pre: Vec::new(),
        post: Vec::new(),
        every: None,
        timeout_s: crate::state::DEFAULT_HOOK_TIMEOUT_S,
    });
    use crate::primary::cycle::hooks::check;
    if let Some(v) = p.pre_cut {
        v.iter().try_for_each(|c| check(c, "--pre-cut"))?;
        h.pre = v.to_vec();
    }
    if let Some(v) = p.post_cut {
        v.iter().try_for_each(|c| check(c, "--post-cut"))?;
        h.post = v.to_vec();
    }
    if let Some(e) = p.app_consistent_every {
        h.every = match e {
            "always" => None,
            _ => match e.parse().map_err(Error::Invalid)? {
                Interval::Manual => {
                    return Err(Error::Invalid(
                        "--app-consistent-every takes a duration (e.g. 4h) or `always`".into(),
                    ));
                }
                i => Some(i),
            },
        };
    }
    if let Some(t) = p.hook_timeout {
        let d = humantime::parse_duration(t)
            .map_err(|e| Error::Invalid(format!("--hook-timeout {t:?}: {e}")))?;
        h.timeout_s = d.as_secs().max(1);
    }
    if h.pre.is_empty() && h.post.is_empty() {
        return Err(Error::Invalid(
            "--app-consistent-every and --hook-timeout need a --pre-cut or --post-cut hook".into(),
        ));
    }
    Ok(Some(h))
}

/// The hooks in words.
pub fn hooks_text(h: Option<&Hooks>) -> String {
    let Some(h) = h else {
        return "none".into();
    };
    format!(
        "pre {:?}, post {:?}, {}, timeout {} s",
        h.pre,
        h.post,
        h.every
            .map_or("every cycle".to_string(), |e| format!("every {e}")),
        h.timeout_s
    )
}

fn parse_expect(e: &str, interval: Interval) -> Result<Interval> {
    if interval != Interval::Manual {
        return Err(Error::Invalid(
            "--expect-every is for --interval manual (a fixed interval is its own cadence)".into(),
        ));
    }
    match e.parse().map_err(Error::Invalid)? {
        Interval::Manual => Err(Error::Invalid(
            "--expect-every takes a duration, e.g. 15m".into(),
        )),
        every => Ok(every),
    }
}

/// The cycle state of a replica the store no longer ships to (a relay's too).
fn forget_cycles(sd: &StateDir) -> Result<()> {
    for name in ["cycle.json", "relay.json"] {
        let p = sd.path(name);
        match std::fs::remove_file(&p) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e).at(&p),
            _ => {}
        }
    }
    Ok(())
}

/// Extended replication: a replica protected onward, to a third directory (never to the
/// store it replicates).
fn onward(sd: &StateDir, cfg: &Config, target: &Target) -> Result<StateDir> {
    let dir = target.local().map_err(Error::Invalid)?;
    let theirs = StateDir::new(dir).config().ok();
    if let (Some(t), Some(src)) = (&theirs, &cfg.source) {
        if &t.store_id == src {
            return Err(Error::Invalid(format!(
                "{} is the primary of {}: extended replication goes to a third directory",
                dir.display(),
                sd.store().display()
            )));
        }
    }
    Ok(sd.clone())
}

/// What differs between two settings, in words.
fn changes(old: Option<&Replication>, new: &Replication) -> Vec<String> {
    let Some(old) = old else {
        return vec![format!(
            "protected: replicates to {} {} (keep {}, group {})",
            new.target,
            cadence(new),
            new.keep,
            new.group
        )];
    };
    let mut out = Vec::new();
    let mut diff = |what: &str, a: String, b: String| {
        if a != b {
            out.push(format!("{what} {a} -> {b}"));
        }
    };
    diff("replica", old.target.to_string(), new.target.to_string());
    diff(
        "interval",
        old.interval.to_string(),
        new.interval.to_string(),
    );
    diff(
        "expected cadence",
        old.expect_every.map_or("none".into(), |e| e.to_string()),
        new.expect_every.map_or("none".into(), |e| e.to_string()),
    );
    diff("keep", old.keep.clone(), new.keep.clone());
    diff("group", old.group.to_string(), new.group.to_string());
    diff(
        "hooks",
        hooks_text(old.hooks.as_ref()),
        hooks_text(new.hooks.as_ref()),
    );
    diff(
        "bandwidth cap",
        old.bwlimit
            .as_ref()
            .map_or("none".into(), |b| b.to_string()),
        new.bwlimit
            .as_ref()
            .map_or("none".into(), |b| b.to_string()),
    );
    diff(
        "compression",
        compress_of(old).to_string(),
        compress_of(new).to_string(),
    );
    diff(
        "ssh command",
        old.ssh_command.clone().unwrap_or_else(|| "ssh".into()),
        new.ssh_command.clone().unwrap_or_else(|| "ssh".into()),
    );
    out
}

/// The compression in force.
pub fn compress_of(r: &Replication) -> Compress {
    r.compress
        .unwrap_or_else(|| crate::transport::default_compress(&r.target))
}

/// "every 30s", "manually (drfs ship; expected every 15m)".
pub fn cadence(r: &Replication) -> String {
    match (r.interval, r.expect_every) {
        (Interval::Manual, Some(e)) => format!("manually (drfs ship, expected every {e})"),
        (Interval::Manual, None) => "manually (drfs ship)".to_string(),
        (i, _) => format!("every {i}"),
    }
}

fn protected(store: &Path) -> Result<(StateDir, Config, Replication)> {
    let sd = store_dir(store)?;
    let (sd, cfg) = StateDir::open(sd.store())?;
    let rep = cfg
        .replication
        .clone()
        .ok_or_else(|| Error::Invalid(format!("{} is not protected", sd.store().display())))?;
    Ok((sd, cfg, rep))
}

/// The settings in force.
pub fn show(store: &Path) -> Result<Replication> {
    protected(store).map(|(_, _, r)| r)
}

/// Stops replicating: the binding is forgotten, the replica left as it is.
pub fn unprotect(store: &Path) -> Result<Changed> {
    let (sd, mut cfg, rep) = protected(store)?;
    cfg.replication = None;
    sd.write_config(&cfg)?;
    Ok(Changed {
        what: vec![format!(
            "unprotected: {} no longer receives cycles; it keeps its points",
            rep.target
        )],
        rep,
        warnings: Vec::new(),
    })
}

/// Pauses cycles, for `for_ns` (none: until `resume`).
pub fn pause(store: &Path, for_ns: Option<i64>) -> Result<Changed> {
    let (sd, mut cfg, mut rep) = protected(store)?;
    let now = crate::sys::now_ns() as i64;
    let until_ns = for_ns.map(|d| now + d);
    rep.paused = Some(Pause {
        since: rfc3339_ns(i128::from(now)),
        since_ns: now,
        until: until_ns.map(|u| rfc3339_ns(i128::from(u))),
        until_ns,
    });
    cfg.replication = Some(rep.clone());
    sd.write_config(&cfg)?;
    let until = until_ns.map_or("until drfs resume".into(), |u| {
        format!("until {}", rfc3339_ns(i128::from(u)))
    });
    Ok(Changed {
        what: vec![format!(
            "paused {until}: changes are tracked and ship when cycles resume"
        )],
        rep,
        warnings: Vec::new(),
    })
}

/// Resumes cycles.
pub fn resume(store: &Path) -> Result<Changed> {
    let (sd, mut cfg, mut rep) = protected(store)?;
    let was = rep.paused.take();
    cfg.replication = Some(rep.clone());
    sd.write_config(&cfg)?;
    Ok(Changed {
        what: vec![match was {
            Some(p) => format!("resumed (paused since {})", p.since),
            None => "resumed (it was not paused)".into(),
        }],
        rep,
        warnings: Vec::new(),
    })
}
