//! When to prefetch: idle-time copying at a bounded rate that backs off under contention.
//!
//! Pure policy over explicit time, so it is tested with virtual time. The driver (the server's
//! prefetch thread) asks [`Throttle::next`] what to do, does it, and reports back.

use std::time::Duration;

#[derive(Clone, Debug)]
pub struct PrefetchConfig {
    /// Wait this long after start before the first copy.
    pub start_delay: Duration,
    /// Upper bound on prefetch bandwidth, bytes per second.
    pub rate: u64,
    /// Guest requests per second above which the guest counts as busy: prefetch pauses.
    pub busy_iops: u64,
    /// Prefetch's own throughput (bytes/s) below which the storage counts as contended.
    pub min_throughput: u64,
    /// First back-off pause; doubles on repeated contention up to `max_backoff`.
    pub backoff: Duration,
    pub max_backoff: Duration,
    /// Blocks per step.
    pub step_blocks: u64,
}

impl Default for PrefetchConfig {
    fn default() -> Self {
        PrefetchConfig {
            start_delay: Duration::from_secs(5),
            rate: 32 << 20,
            busy_iops: 500,
            min_throughput: 1 << 20,
            backoff: Duration::from_secs(1),
            max_backoff: Duration::from_secs(30),
            step_blocks: 16,
        }
    }
}

/// What the driver should do next.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum Action {
    /// Copy one step now.
    Copy,
    /// Sleep this long, then ask again.
    Sleep(Duration),
}

/// Prefetch throttle state.
#[derive(Debug)]
pub struct Throttle {
    cfg: PrefetchConfig,
    started: Option<Duration>,
    last_check: Option<(Duration, u64)>,
    current_backoff: Duration,
    /// Time before which the rate limit forbids copying.
    not_before: Duration,
    /// The last step (when it ended, bytes, duration) and the end of a back-off it caused: a
    /// new rate recomputes the wait from them.
    last_step: Option<(Duration, u64, Duration)>,
    backoff_until: Duration,
    pub backoffs: u64,
}

impl Throttle {
    pub fn new(cfg: PrefetchConfig) -> Self {
        let b = cfg.backoff;
        Throttle {
            cfg,
            started: None,
            last_check: None,
            current_backoff: b,
            not_before: Duration::ZERO,
            last_step: None,
            backoff_until: Duration::ZERO,
            backoffs: 0,
        }
    }

    /// `now` is time since an arbitrary origin; `guest_ops` the total guest requests so far.
    pub fn next(&mut self, now: Duration, guest_ops: u64) -> Action {
        let start = *self.started.get_or_insert(now);
        if now < start + self.cfg.start_delay {
            return Action::Sleep(start + self.cfg.start_delay - now);
        }
        if now < self.not_before {
            return Action::Sleep(self.not_before - now);
        }
        // Guest activity since the last look.
        if let Some((t, ops)) = self.last_check {
            let dt = now.saturating_sub(t).as_secs_f64();
            if dt > 0.0 {
                let iops = guest_ops.saturating_sub(ops) as f64 / dt;
                if iops > self.cfg.busy_iops as f64 {
                    self.last_check = Some((now, guest_ops));
                    return self.back_off();
                }
            }
        }
        self.last_check = Some((now, guest_ops));
        Action::Copy
    }

    /// Changes the rate limit (bytes per second, 0: none) at once: the wait the last step
    /// caused is recomputed at the new rate (an operator raising the speed is not held to the
    /// old one's wait).
    pub fn set_rate(&mut self, rate: u64) {
        self.cfg.rate = rate;
        if let Some((now, bytes, took)) = self.last_step {
            self.not_before = self.rate_wait(now, bytes, took).max(self.backoff_until);
        }
    }

    /// When the rate limit lets the step after one of `bytes` (ending at `now`, taking `took`)
    /// start.
    fn rate_wait(&self, now: Duration, bytes: u64, took: Duration) -> Duration {
        if self.cfg.rate == 0 {
            return now;
        }
        let cost = Duration::from_secs_f64(bytes as f64 / self.cfg.rate as f64);
        now + cost.saturating_sub(took)
    }

    /// Reports a finished step: `bytes` copied in `took`.
    pub fn copied(&mut self, now: Duration, bytes: u64, took: Duration) {
        // Rate limit: the step's bytes "cost" bytes/rate seconds.
        self.last_step = Some((now, bytes, took));
        self.backoff_until = Duration::ZERO;
        if self.cfg.rate > 0 {
            self.not_before = self.rate_wait(now, bytes, took);
        }
        let secs = took.as_secs_f64();
        let throughput = if secs > 0.0 {
            bytes as f64 / secs
        } else {
            f64::INFINITY
        };
        if bytes > 0 && throughput < self.cfg.min_throughput as f64 {
            // The storage is slow for us: someone else is using it. Yield for a while.
            if let Action::Sleep(d) = self.back_off() {
                self.backoff_until = now + d;
                self.not_before = self.not_before.max(now + d);
            }
        } else {
            self.current_backoff = self.cfg.backoff;
        }
    }

    fn back_off(&mut self) -> Action {
        self.backoffs += 1;
        let d = self.current_backoff;
        self.current_backoff = (self.current_backoff * 2).min(self.cfg.max_backoff);
        Action::Sleep(d)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(v: u64) -> Duration {
        Duration::from_millis(v)
    }

    #[test]
    fn waits_for_start_delay_then_copies_at_bounded_rate() {
        let mut t = Throttle::new(PrefetchConfig {
            start_delay: ms(1000),
            rate: 1 << 20,
            ..Default::default()
        });
        assert_eq!(t.next(ms(0), 0), Action::Sleep(ms(1000)));
        assert_eq!(t.next(ms(1000), 0), Action::Copy);
        // 512 KiB at 1 MiB/s costs 500 ms; the step took 100 ms.
        t.copied(ms(1100), 512 << 10, ms(100));
        assert_eq!(t.next(ms(1100), 0), Action::Sleep(ms(400)));
        assert_eq!(t.next(ms(1500), 0), Action::Copy);
    }

    #[test]
    fn backs_off_exponentially_when_guest_is_busy_and_recovers() {
        let cfg = PrefetchConfig {
            start_delay: ms(0),
            busy_iops: 100,
            backoff: ms(100),
            max_backoff: ms(350),
            ..Default::default()
        };
        let mut t = Throttle::new(cfg);
        assert_eq!(t.next(ms(0), 0), Action::Copy);
        // 1000 guest ops in 1 s: busy.
        assert_eq!(t.next(ms(1000), 1000), Action::Sleep(ms(100)));
        assert_eq!(t.next(ms(1100), 2000), Action::Sleep(ms(200)));
        assert_eq!(t.next(ms(1300), 3000), Action::Sleep(ms(350)));
        // Guest went quiet.
        assert_eq!(t.next(ms(5000), 3001), Action::Copy);
        assert_eq!(t.backoffs, 3);
    }

    #[test]
    fn slow_storage_counts_as_contention() {
        let cfg = PrefetchConfig {
            start_delay: ms(0),
            min_throughput: 10 << 20,
            backoff: ms(250),
            rate: 0,
            ..Default::default()
        };
        let mut t = Throttle::new(cfg);
        assert_eq!(t.next(ms(0), 0), Action::Copy);
        // 1 MiB in 1 s = 1 MiB/s < 10 MiB/s.
        t.copied(ms(1000), 1 << 20, ms(1000));
        assert_eq!(t.next(ms(1000), 0), Action::Sleep(ms(250)));
        // Fast again: no pause.
        t.copied(ms(1300), 1 << 20, ms(10));
        assert_eq!(t.next(ms(1300), 0), Action::Copy);
    }

    #[test]
    fn set_rate_applies_at_once_including_the_current_wait() {
        let cfg = PrefetchConfig {
            start_delay: Duration::ZERO,
            rate: 1 << 20,
            busy_iops: u64::MAX,
            min_throughput: 0,
            ..Default::default()
        };
        let mut t = Throttle::new(cfg);
        assert_eq!(t.next(Duration::ZERO, 0), Action::Copy);
        // 1 MiB at 1 MiB/s: the next step waits a second.
        t.copied(Duration::ZERO, 1 << 20, Duration::ZERO);
        assert_eq!(
            t.next(Duration::ZERO, 0),
            Action::Sleep(Duration::from_secs(1))
        );
        // Unlimited from now on, the wait included: copies at once.
        t.set_rate(0);
        assert_eq!(t.next(Duration::ZERO, 0), Action::Copy);
        t.copied(Duration::from_secs(1), 1 << 20, Duration::ZERO);
        assert_eq!(t.next(Duration::from_secs(1), 0), Action::Copy);
        // Slower again: 4 MiB/s makes 1 MiB cost a quarter second.
        t.set_rate(4 << 20);
        t.copied(Duration::from_secs(1), 1 << 20, Duration::ZERO);
        assert_eq!(
            t.next(Duration::from_secs(1), 0),
            Action::Sleep(Duration::from_millis(250))
        );
        // Slower while waiting: the same step now costs a second.
        t.set_rate(1 << 20);
        assert_eq!(
            t.next(Duration::from_secs(1), 0),
            Action::Sleep(Duration::from_secs(1))
        );
    }
}
