//! The daemon's replication schedule: a cycle every interval (measured start to start; a
//! cycle longer than the interval is followed at once by the next), one at a time, with
//! Azure Site Recovery's retries. After a recoverable failure the next attempt waits 1, 2,
//! 4, 8, 10 minutes, then every 30 minutes, each scaled by interval / 5 min when the
//! interval is shorter (30 s: 6, 12, 24, 48, 60 s, then 3 min), and never under 1 s. An
//! unrecoverable failure stops the schedule (state Critical) until an operator
//! ships by hand (`drfs ship`) or protects the store again.

use std::sync::Arc;
use std::time::Duration;

use parking_lot::{Condvar, Mutex};

use crate::primary::cycle::{self, CycleOpts, CycleState, Outcome};
use crate::primary::track::Tracker;

const BACKOFF_MIN: [u64; 6] = [1, 2, 4, 8, 10, 30];
/// The wait before retry number `failures` (1 = the first retry).
pub fn backoff(failures: u32, interval: Duration) -> Duration {
    let step = BACKOFF_MIN[(failures.max(1) as usize - 1).min(BACKOFF_MIN.len() - 1)];
    let scale = (interval.as_secs_f64() / 300.0).min(1.0);
    Duration::from_secs_f64(step as f64 * 60.0 * scale).max(Duration::from_secs(1))
}

#[derive(Default)]
struct Wake {
    stop: bool,
    poke: bool,
}

/// Called after every cycle the scheduler runs (the daemon looks at the health again).
pub type AfterCycle = Arc<dyn Fn(&Outcome) + Send + Sync>;

pub struct Scheduler {
    tracker: Arc<Tracker>,
    after: AfterCycle,
    run: Mutex<()>,
    wake: Mutex<Wake>,
    cv: Condvar,
    thread: Mutex<Option<std::thread::JoinHandle<()>>>,
}

impl Scheduler {
    pub fn start(tracker: Arc<Tracker>, after: AfterCycle) -> Arc<Scheduler> {
        let s = Arc::new(Scheduler {
            tracker,
            after,
            run: Mutex::new(()),
            wake: Mutex::new(Wake::default()),
            cv: Condvar::new(),
            thread: Mutex::new(None),
        });
        let me = s.clone();
        let h = std::thread::Builder::new()
            .name("schedule".into())
            .spawn(move || me.main_loop());
        match h {
            Ok(h) => *s.thread.lock() = Some(h),
            Err(e) => tracing::error!("cannot start the replication schedule: {e}"),
        }
        s
    }

    /// Runs a cycle now (waiting for one in progress to end first).
    pub fn ship_now(&self, opts: CycleOpts) -> Outcome {
        let _r = self.run.lock();
        let o = cycle::run(&self.tracker, opts);
        log_outcome(&o);
        (self.after)(&o);
        o
    }

    /// Settings changed (or a manual cycle cleared an error): look again.
    pub fn poke(&self) {
        self.wake.lock().poke = true;
        self.cv.notify_all();
    }

    /// Stops the schedule, after the cycle in progress (if any).
    pub fn stop(&self) {
        self.wake.lock().stop = true;
        self.cv.notify_all();
        if let Some(h) = self.thread.lock().take() {
            let _ = h.join();
        }
    }

    /// Sleeps up to `d`; false when stopping.
    fn sleep(&self, d: Option<Duration>) -> bool {
        let mut w = self.wake.lock();
        if !w.stop && !w.poke {
            match d {
                Some(d) => {
                    self.cv.wait_for(&mut w, d);
                }
                None => self.cv.wait(&mut w),
            }
        }
        w.poke = false;
        !w.stop
    }

    /// How long until the next cycle is due (None: not scheduled).
    fn due_in(&self) -> Option<Duration> {
        if self.tracker.is_read_only() {
            // Locked by a planned failover, which ships its final cycle itself.
            return None;
        }
        let rep = self.tracker.state().config().ok()?.replication?;
        let now = crate::sys::now_ns() as i64;
        if let Some(p) = rep.paused_at(now) {
            // Asleep until the pause ends (or a poke: `drfs resume`).
            return p
                .until_ns
                .map(|u| Duration::from_nanos((u - now).max(0) as u64));
        }
        let interval = rep.interval.every()?;
        let st = CycleState::load(self.tracker.state()).ok()?;
        if st.critical.is_some() {
            return None;
        }
        let Some(last) = &st.last else {
            return Some(Duration::ZERO);
        };
        let wait = if st.failures == 0 {
            interval
        } else {
            backoff(st.failures, interval)
        };
        let elapsed_ns = (crate::sys::now_ns() as i64 - last.time_ns).max(0) as u64;
        Some(wait.saturating_sub(Duration::from_nanos(elapsed_ns)))
    }

    fn main_loop(&self) {
        loop {
            match self.due_in() {
                Some(d) if d.is_zero() => {
                    if self.wake.lock().stop {
                        return;
                    }
                    self.ship_now(CycleOpts::default());
                }
                d => {
                    if !self.sleep(d) {
                        return;
                    }
                }
            }
        }
    }
}

fn log_outcome(o: &Outcome) {
    if o.ok {
        tracing::info!(
            "cycle: {} ({} B sent, {} B on the wire{}, {} ms, pause {} us)",
            o.message,
            o.bytes,
            o.wire_bytes,
            if o.wire_bytes > 0 && o.wire_bytes != o.bytes {
                format!(", compressed {:.2}x", o.bytes as f64 / o.wire_bytes as f64)
            } else {
                String::new()
            },
            o.duration_ms,
            o.pause_us
        );
    } else if o.class.is_transient() {
        tracing::warn!("cycle failed (will retry): {}", o.message);
    } else {
        tracing::error!("cycle failed, replication stopped: {}", o.message);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_follows_azure_scaled_to_the_interval() {
        let five = Duration::from_secs(300);
        let mins: Vec<u64> = (1..=7).map(|f| backoff(f, five).as_secs() / 60).collect();
        assert_eq!(mins, vec![1, 2, 4, 8, 10, 30, 30]);
        let thirty = Duration::from_secs(30);
        let secs: Vec<u64> = (1..=6).map(|f| backoff(f, thirty).as_secs()).collect();
        assert_eq!(secs, vec![6, 12, 24, 48, 60, 180]);
        assert_eq!(backoff(1, Duration::from_secs(900)).as_secs(), 60);
        assert_eq!(backoff(1, Duration::from_secs(1)).as_secs(), 1);
    }
}
