//! When each attempt may start, shared by all threads: the --max count, the --duration window
//! and the optional --rate pacing.

use std::sync::atomic::{AtomicU64, Ordering};
use std::thread;
use std::time::{Duration, Instant};

pub struct Schedule {
    start: Instant,
    deadline: Instant,
    max: Option<u64>,
    /// Time between two attempt starts, over all threads; None runs unpaced.
    interval: Option<Duration>,
    issued: AtomicU64,
}

impl Schedule {
    /// `rate` must be finite and above 0 (the command line checks it).
    pub fn new(start: Instant, duration: Duration, max: Option<u64>, rate: Option<f64>) -> Self {
        Schedule {
            start,
            deadline: start + duration,
            max,
            interval: rate.and_then(|r| Duration::try_from_secs_f64(1.0 / r).ok()),
            issued: AtomicU64::new(0),
        }
    }

    /// When attempt number `k` (from 0) may start at the earliest.
    pub fn slot(&self, k: u64) -> Instant {
        match self.interval {
            // k * interval in floating point: an exact Duration product could overflow for a huge
            // k, and a slot past the deadline is all that matters then.
            Some(interval) => {
                let offset = interval.as_secs_f64() * k as f64;
                let limit = (self.deadline - self.start).as_secs_f64();
                self.start + Duration::from_secs_f64(offset.min(limit))
            }
            None => self.start,
        }
    }

    /// Blocks until the calling thread may start its next attempt; None when the run is over:
    /// after --max attempts at once, else at the deadline.
    ///
    /// Attempt k does not start before start + k/rate. Threads that fall behind (a slow server)
    /// start their next attempts at once, so the achieved rate is at most the one asked for.
    pub fn next(&self) -> Option<u64> {
        let k = self.issued.fetch_add(1, Ordering::Relaxed);
        if self.max.is_some_and(|max| k >= max) {
            return None;
        }
        let slot = self.slot(k);
        let now = Instant::now();
        if slot >= self.deadline {
            // Paced runs end at the deadline, not at the last slot before it, so that the
            // reported duration is the window the rate was spread over.
            if self.deadline > now {
                thread::sleep(self.deadline - now);
            }
            return None;
        }
        if slot > now {
            thread::sleep(slot - now);
        }
        (Instant::now() < self.deadline).then_some(k)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots() {
        let start = Instant::now();
        let ten = Duration::from_secs(10);
        // (rate, attempt number, expected offset of its slot)
        let cases: &[(Option<f64>, u64, Duration)] = &[
            (None, 0, Duration::ZERO),
            (None, 1_000_000, Duration::ZERO),
            (Some(4.0), 0, Duration::ZERO),
            (Some(4.0), 1, Duration::from_millis(250)),
            (Some(4.0), 10, Duration::from_millis(2500)),
            (Some(0.5), 3, Duration::from_secs(6)),
            (Some(4.0), u64::MAX, ten),
        ];
        for (rate, k, want) in cases {
            let s = Schedule::new(start, ten, None, *rate);
            let got = s.slot(*k) - start;
            let err = got.abs_diff(*want);
            assert!(err < Duration::from_micros(1), "rate {rate:?} k {k}: {got:?}");
        }
    }

    #[test]
    fn max_bounds_the_count() {
        for max in [1, 3, 50] {
            let s = Schedule::new(Instant::now(), Duration::from_secs(30), Some(max), None);
            let granted = std::iter::from_fn(|| s.next()).take(1000).count() as u64;
            assert_eq!(granted, max);
        }
    }

    #[test]
    fn duration_bounds_the_count() {
        // Paced at 100/s for 0.2 s: about 20 attempts, never more than the slots in the window.
        let started = Instant::now();
        let s = Schedule::new(started, Duration::from_millis(200), None, Some(100.0));
        let granted = std::iter::from_fn(|| s.next()).take(1000).count();
        let elapsed = started.elapsed();
        assert!((15..=20).contains(&granted), "{granted}");
        assert!(elapsed >= Duration::from_millis(200), "{elapsed:?}");
        assert!(elapsed < Duration::from_secs(2), "{elapsed:?}");
    }

    #[test]
    fn over_when_the_window_has_passed() {
        let s = Schedule::new(Instant::now(), Duration::from_millis(1), None, None);
        thread::sleep(Duration::from_millis(5));
        assert_eq!(s.next(), None);
    }
}
