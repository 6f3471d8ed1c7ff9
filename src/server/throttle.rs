//! I/O throttling: per-disk limits on IOPS and bytes per second (total, read, write), with
//! bursts, in QEMU's terms (`include/qemu/throttle.h`, `util/throttle.c`,
//! `BlockIOThrottle` in `qapi/block-core.json`): one leaky bucket per limit, filled by each
//! admitted request and leaking at the limit's rate. A request is admitted while every bucket
//! it counts against is under its size; otherwise it waits, in order, behind the requests of
//! its direction already waiting. Requests over a limit wait, they never fail.
//!
//! The limits are shared by all the queues of a disk: the state is behind one lock, taken only
//! when a limit is set (an unset throttle costs a relaxed load of [`Throttle::is_enabled`]).
//! A waiting request's task sleeps on its queue thread's [`Alarm`] (a timerfd in that thread's
//! epoll), so the thread keeps serving everything else meanwhile.

use parking_lot::Mutex;
use std::collections::VecDeque;
use std::future::Future;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

/// QEMU's THROTTLE_VALUE_MAX: the largest rate, burst and burst length accepted.
pub const VALUE_MAX: u64 = 1_000_000_000_000_000;

/// One limit: `avg` units per second, bursts at up to `max` per second for `max_length`
/// seconds (QEMU's `LeakyBucket` avg, max, burst_length). 0 means unset.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limit {
    pub avg: u64,
    pub max: u64,
    /// Seconds a burst at `max` may last; 1 unless a burst rate is set.
    pub max_length: u64,
}

impl Default for Limit {
    fn default() -> Self {
        Limit {
            avg: 0,
            max: 0,
            max_length: 1,
        }
    }
}

/// The limits of one disk. The default sets none.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ThrottleConfig {
    pub bps_total: Limit,
    pub bps_read: Limit,
    pub bps_write: Limit,
    pub iops_total: Limit,
    pub iops_read: Limit,
    pub iops_write: Limit,
    /// Requests larger than this count as `size / iops_size` operations (0: each counts as one).
    pub iops_size: u64,
}

/// Which way a request moves data.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dir {
    Read = 0,
    Write = 1,
}

// Bucket indices, in the order of `ThrottleConfig::limits`.
const BPS_TOTAL: usize = 0;
const BPS_READ: usize = 1;
const BPS_WRITE: usize = 2;
const OPS_TOTAL: usize = 3;
const OPS_READ: usize = 4;
const OPS_WRITE: usize = 5;
const BUCKETS: usize = 6;

/// Why a configuration was refused (QEMU's messages, from `throttle_is_valid`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ThrottleError {
    #[error("bps/iops/max total values and read/write values cannot be used at the same time")]
    TotalAndReadWrite,
    #[error("iops size requires an iops value to be set")]
    SizeWithoutIops,
    #[error("bps/iops/max values must be within [0, {VALUE_MAX}]")]
    OutOfRange,
    #[error("the burst length cannot be 0")]
    ZeroBurstLength,
    #[error("burst length set without burst rate")]
    LengthWithoutMax,
    #[error("burst length too high for this burst rate")]
    LengthTooHigh,
    #[error("bps_max/iops_max require corresponding bps/iops values")]
    MaxWithoutAvg,
    #[error("bps_max/iops_max cannot be lower than bps/iops")]
    MaxBelowAvg,
}

impl ThrottleConfig {
    /// The six limits in bucket order: bps total/read/write, iops total/read/write.
    pub fn limits(&self) -> [Limit; BUCKETS] {
        [
            self.bps_total,
            self.bps_read,
            self.bps_write,
            self.iops_total,
            self.iops_read,
            self.iops_write,
        ]
    }

    /// Whether any limit is set.
    pub fn enabled(&self) -> bool {
        self.limits().iter().any(|l| l.avg > 0)
    }

    /// Checks the configuration as QEMU's `throttle_is_valid` does.
    pub fn validate(&self) -> Result<(), ThrottleError> {
        let l = self.limits();
        let both = |t: usize, r: usize, w: usize, f: fn(&Limit) -> u64| {
            f(&l[t]) != 0 && (f(&l[r]) != 0 || f(&l[w]) != 0)
        };
        if both(BPS_TOTAL, BPS_READ, BPS_WRITE, |l| l.avg)
            || both(OPS_TOTAL, OPS_READ, OPS_WRITE, |l| l.avg)
            || both(BPS_TOTAL, BPS_READ, BPS_WRITE, |l| l.max)
            || both(OPS_TOTAL, OPS_READ, OPS_WRITE, |l| l.max)
        {
            return Err(ThrottleError::TotalAndReadWrite);
        }
        if self.iops_size != 0
            && [OPS_TOTAL, OPS_READ, OPS_WRITE]
                .iter()
                .all(|&i| l[i].avg == 0)
        {
            return Err(ThrottleError::SizeWithoutIops);
        }
        // Not in QEMU's check (its field is as wide as the rates); bounded here all the same.
        if self.iops_size > VALUE_MAX {
            return Err(ThrottleError::OutOfRange);
        }
        for b in &l {
            if b.avg > VALUE_MAX || b.max > VALUE_MAX {
                return Err(ThrottleError::OutOfRange);
            }
            if b.max_length == 0 {
                return Err(ThrottleError::ZeroBurstLength);
            }
            if b.max_length > 1 && b.max == 0 {
                return Err(ThrottleError::LengthWithoutMax);
            }
            if b.max != 0 && b.max_length > VALUE_MAX / b.max {
                return Err(ThrottleError::LengthTooHigh);
            }
            if b.max != 0 && b.avg == 0 {
                return Err(ThrottleError::MaxWithoutAvg);
            }
            if b.max != 0 && b.max < b.avg {
                return Err(ThrottleError::MaxBelowAvg);
            }
        }
        Ok(())
    }
}

/// The fill of one bucket, and of its burst bucket (used when bursts last over a second).
#[derive(Clone, Copy, Debug, Default)]
struct Level {
    level: f64,
    burst: f64,
}

/// The buckets of a configuration: pure arithmetic on a given time, no waiting.
#[derive(Debug)]
struct Buckets {
    cfg: ThrottleConfig,
    levels: [Level; BUCKETS],
    /// Clock time of the last leak.
    last: Duration,
}

impl Buckets {
    fn new(cfg: ThrottleConfig, now: Duration) -> Buckets {
        Buckets {
            cfg,
            levels: [Level::default(); BUCKETS],
            last: now,
        }
    }

    /// The buckets a request of direction `dir` counts against (bytes, then operations).
    fn of(dir: Dir) -> [usize; 4] {
        match dir {
            Dir::Read => [BPS_TOTAL, BPS_READ, OPS_TOTAL, OPS_READ],
            Dir::Write => [BPS_TOTAL, BPS_WRITE, OPS_TOTAL, OPS_WRITE],
        }
    }

    /// Lets every bucket leak what its rate allows since the last leak.
    fn leak(&mut self, now: Duration) {
        let secs = now.saturating_sub(self.last).as_secs_f64();
        self.last = self.last.max(now);
        for (l, lim) in self.levels.iter_mut().zip(self.cfg.limits()) {
            l.level = (l.level - lim.avg as f64 * secs).max(0.0);
            if lim.max_length > 1 {
                l.burst = (l.burst - lim.max as f64 * secs).max(0.0);
            }
        }
    }

    /// How long a request of direction `dir` must wait before it may go (QEMU's
    /// `throttle_compute_wait`, the longest over its buckets).
    fn wait(&self, dir: Dir) -> Duration {
        let lims = self.cfg.limits();
        let secs = Self::of(dir)
            .iter()
            .map(|&i| bucket_wait(&lims[i], &self.levels[i]))
            .fold(0.0, f64::max);
        // Rounded up, plus a nanosecond: once the wait is over the bucket is under its size
        // despite rounding, so the request goes at the first wake-up rather than re-arming.
        if secs > 0.0 {
            Duration::from_nanos((secs.min(VALUE_MAX as f64) * 1e9).ceil() as u64 + 1)
        } else {
            Duration::ZERO
        }
    }

    /// Counts an admitted request of `bytes` bytes.
    fn account(&mut self, dir: Dir, bytes: u64) {
        let size = self.cfg.iops_size;
        let units = if size != 0 && bytes > size {
            bytes as f64 / size as f64
        } else {
            1.0
        };
        let lims = self.cfg.limits();
        for (k, &i) in Self::of(dir).iter().enumerate() {
            let add = if k < 2 { bytes as f64 } else { units };
            if lims[i].avg == 0 {
                continue;
            }
            let l = &mut self.levels[i];
            l.level += add;
            if lims[i].max_length > 1 {
                l.burst += add;
            }
        }
    }
}

/// Seconds a bucket needs to leak below its size (0: not full).
fn bucket_wait(lim: &Limit, l: &Level) -> f64 {
    if lim.avg == 0 {
        return 0.0;
    }
    let (size, burst_size) = if lim.max == 0 {
        // Without a burst rate, a tenth of a second's worth still passes at once: smoother.
        (lim.avg as f64 / 10.0, 0.0)
    } else {
        // The whole burst passes at up to `max` per second before `avg` applies.
        (
            lim.max as f64 * lim.max_length as f64,
            lim.max as f64 / 10.0,
        )
    };
    let extra = l.level - size;
    if extra > 0.0 {
        return extra / lim.avg as f64;
    }
    if lim.max_length > 1 {
        let extra = l.burst - burst_size;
        if extra > 0.0 {
            return extra / lim.max as f64;
        }
    }
    0.0
}

/// Monotonic time for the throttle; tests drive their own.
pub trait Clock: Send + Sync {
    /// Time since an arbitrary fixed start.
    fn now(&self) -> Duration;
}

/// The real clock (CLOCK_MONOTONIC through `Instant`).
pub struct MonotonicClock(Instant);

impl Default for MonotonicClock {
    fn default() -> Self {
        MonotonicClock(Instant::now())
    }
}

impl Clock for MonotonicClock {
    fn now(&self) -> Duration {
        self.0.elapsed()
    }
}

/// Wakes a waiting request's queue thread when its wait is over.
pub trait Arm: Send + Sync {
    /// The first request of a direction must wait `wait` from `now`: make sure the thread
    /// wakes by then (an earlier wake-up already due is kept).
    fn arm(&self, now: Duration, wait: Duration);
}

/// A waiting request, in its direction's line.
struct Waiter {
    ticket: u64,
    waker: Waker,
}

struct State {
    buckets: Buckets,
    /// Requests waiting, per direction, first in line first.
    lines: [VecDeque<Waiter>; 2],
    next_ticket: u64,
}

impl State {
    fn wake_first(&self) {
        for line in &self.lines {
            if let Some(w) = line.front() {
                w.waker.wake_by_ref();
            }
        }
    }
}

/// The throttle of one disk, shared by its queues (and kept across connections).
pub struct Throttle {
    /// Whether any limit is set: the only thing an unthrottled request reads.
    enabled: AtomicBool,
    clock: Box<dyn Clock>,
    state: Mutex<State>,
}

impl Throttle {
    /// A throttle with limits `cfg` (checked by the caller with [`ThrottleConfig::validate`]).
    pub fn new(cfg: ThrottleConfig, clock: Box<dyn Clock>) -> Throttle {
        let now = clock.now();
        Throttle {
            enabled: AtomicBool::new(cfg.enabled()),
            state: Mutex::new(State {
                buckets: Buckets::new(cfg, now),
                lines: [VecDeque::new(), VecDeque::new()],
                next_ticket: 0,
            }),
            clock,
        }
    }

    /// Whether requests must go through [`Throttle::admit`]. Relaxed: a request that misses a
    /// change by a moment is as if it had come a moment earlier.
    #[inline]
    pub fn is_enabled(&self) -> bool {
        self.enabled.load(Ordering::Relaxed)
    }

    pub fn config(&self) -> ThrottleConfig {
        self.state.lock().buckets.cfg
    }

    /// Sets new limits (validated first). The buckets start empty, as QEMU's do; requests
    /// already waiting are measured against the new limits at once.
    pub fn set_config(&self, cfg: ThrottleConfig) -> Result<(), ThrottleError> {
        cfg.validate()?;
        let mut st = self.state.lock();
        st.buckets = Buckets::new(cfg, self.clock.now());
        self.enabled.store(cfg.enabled(), Ordering::Relaxed);
        st.wake_first();
        Ok(())
    }

    /// Has every waiting request look again: those whose queue is being drained go at once
    /// (see [`Admit`]'s `release`), the first in each line checks its wait.
    pub fn wake_all(&self) {
        let st = self.state.lock();
        for w in st.lines.iter().flatten() {
            w.waker.wake_by_ref();
        }
    }

    /// Has the first waiting request of each direction check its wait (its alarm went off).
    pub fn wake_first(&self) {
        self.state.lock().wake_first();
    }

    /// Waits until a request of `bytes` bytes in direction `dir` may go, and counts it. `alarm`
    /// wakes the calling task's thread when its wait is over; while `release` is set (its
    /// queue is being drained) the request goes at once, counted all the same.
    pub fn admit<'a>(
        &'a self,
        dir: Dir,
        bytes: u64,
        alarm: &'a dyn Arm,
        release: &'a AtomicBool,
    ) -> Admit<'a> {
        Admit {
            throttle: self,
            dir,
            bytes,
            alarm,
            release,
            ticket: None,
        }
    }

    /// Requests waiting (both directions).
    pub fn waiting(&self) -> usize {
        self.state.lock().lines.iter().map(VecDeque::len).sum()
    }
}

/// The future of [`Throttle::admit`].
pub struct Admit<'a> {
    throttle: &'a Throttle,
    dir: Dir,
    bytes: u64,
    alarm: &'a dyn Arm,
    release: &'a AtomicBool,
    /// Our place in line, once we wait.
    ticket: Option<u64>,
}

impl Future for Admit<'_> {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let this = self.get_mut();
        let t = this.throttle;
        let mut guard = t.state.lock();
        let st = &mut *guard;
        let now = t.clock.now();
        st.buckets.leak(now);
        let d = this.dir as usize;
        let first = match this.ticket {
            None => st.lines[d].is_empty(),
            Some(k) => st.lines[d].front().is_some_and(|w| w.ticket == k),
        };
        let released = this.release.load(Ordering::Relaxed);
        if first || released {
            let wait = if released {
                Duration::ZERO
            } else {
                st.buckets.wait(this.dir)
            };
            if wait.is_zero() {
                if let Some(k) = this.ticket.take() {
                    st.lines[d].retain(|w| w.ticket != k);
                }
                st.buckets.account(this.dir, this.bytes);
                // The next in line checks its own wait now.
                if let Some(w) = st.lines[d].front() {
                    w.waker.wake_by_ref();
                }
                return Poll::Ready(());
            }
            this.alarm.arm(now, wait);
        }
        match this.ticket {
            Some(k) => {
                if let Some(w) = st.lines[d].iter_mut().find(|w| w.ticket == k) {
                    w.waker.clone_from(cx.waker());
                }
            }
            None => {
                let k = st.next_ticket;
                st.next_ticket += 1;
                st.lines[d].push_back(Waiter {
                    ticket: k,
                    waker: cx.waker().clone(),
                });
                this.ticket = Some(k);
            }
        }
        Poll::Pending
    }
}

impl Drop for Admit<'_> {
    fn drop(&mut self) {
        let Some(k) = self.ticket else {
            return;
        };
        let mut st = self.throttle.state.lock();
        let line = &mut st.lines[self.dir as usize];
        let was_first = line.front().is_some_and(|w| w.ticket == k);
        line.retain(|w| w.ticket != k);
        if was_first {
            if let Some(w) = line.front() {
                w.waker.wake_by_ref();
            }
        }
    }
}

/// A queue thread's alarm: a timerfd in the thread's epoll. Arming keeps the earliest deadline
/// still to come; when it fires the thread calls [`Alarm::fired`] and then
/// [`Throttle::wake_first`].
pub struct Alarm {
    fd: OwnedFd,
    /// Clock time it is set to go off, if set.
    deadline: Mutex<Option<Duration>>,
}

impl Alarm {
    pub fn new() -> std::io::Result<Alarm> {
        // SAFETY: timerfd_create takes no pointers; the result is checked before use.
        let fd = unsafe {
            libc::timerfd_create(
                libc::CLOCK_MONOTONIC,
                libc::TFD_NONBLOCK | libc::TFD_CLOEXEC,
            )
        };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(Alarm {
            // SAFETY: a fresh descriptor we own.
            fd: unsafe { OwnedFd::from_raw_fd(fd) },
            deadline: Mutex::new(None),
        })
    }

    pub fn fd(&self) -> i32 {
        self.fd.as_raw_fd()
    }

    /// Consumes the expiry (the descriptor is readable until then).
    pub fn fired(&self) {
        let mut n = 0u64;
        // SAFETY: reads at most 8 bytes into `n`. Nonblocking: an early call reads nothing.
        let _ = unsafe { libc::read(self.fd(), (&mut n as *mut u64).cast(), 8) };
        *self.deadline.lock() = None;
    }
}

impl Arm for Alarm {
    fn arm(&self, now: Duration, wait: Duration) {
        let at = now + wait;
        let mut d = self.deadline.lock();
        if d.is_some_and(|d| d > now && d <= at) {
            return;
        }
        let spec = libc::itimerspec {
            it_interval: libc::timespec {
                tv_sec: 0,
                tv_nsec: 0,
            },
            it_value: libc::timespec {
                tv_sec: wait.as_secs().min(i64::MAX as u64) as libc::time_t,
                // A zero value would disarm the timer: at least a nanosecond.
                tv_nsec: libc::c_long::from(wait.subsec_nanos().max(u32::from(wait.is_zero()))),
            },
        };
        // SAFETY: a valid itimerspec; a null old value is allowed.
        let r = unsafe { libc::timerfd_settime(self.fd(), 0, &spec, std::ptr::null_mut()) };
        if r == 0 {
            *d = Some(at);
        } else {
            tracing::error!(
                "cannot arm the throttle timer: {}",
                std::io::Error::last_os_error()
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicU64;
    use std::sync::Arc;
    use std::task::Wake;

    /// A clock the test moves by hand, in nanoseconds.
    #[derive(Clone, Default)]
    struct TestClock(Arc<AtomicU64>);
    impl Clock for TestClock {
        fn now(&self) -> Duration {
            Duration::from_nanos(self.0.load(Ordering::SeqCst))
        }
    }
    impl TestClock {
        fn set_ms(&self, ms: f64) {
            self.0.store((ms * 1e6) as u64, Ordering::SeqCst);
        }
    }

    /// Records the last deadline it was armed for.
    #[derive(Default)]
    struct TestAlarm(Mutex<Option<Duration>>);
    impl Arm for TestAlarm {
        fn arm(&self, now: Duration, wait: Duration) {
            *self.0.lock() = Some(now + wait);
        }
    }

    #[derive(Default)]
    struct CountWaker(AtomicU64);
    impl Wake for CountWaker {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    fn iops(avg: u64) -> Limit {
        Limit {
            avg,
            ..Limit::default()
        }
    }

    fn ms(d: Duration) -> f64 {
        d.as_secs_f64() * 1e3
    }

    fn armed_ms(a: &TestAlarm) -> f64 {
        ms(a.0.lock().expect("armed"))
    }

    /// Admission times (ms) of `n` requests of `bytes` in `dir`, each submitted as soon as the
    /// previous went, stepping the clock to each wait's end.
    fn admit_times(b: &mut Buckets, dir: Dir, bytes: u64, n: usize) -> Vec<f64> {
        let mut now = b.last;
        let mut out = Vec::new();
        for _ in 0..n {
            b.leak(now);
            let w = b.wait(dir);
            now += w;
            b.leak(now);
            assert!(b.wait(dir).is_zero(), "still waiting after the wait");
            b.account(dir, bytes);
            out.push(ms(now));
        }
        out
    }

    #[test]
    fn validation_follows_qemu() {
        let ok = ThrottleConfig::default();
        assert_eq!(ok.validate(), Ok(()));
        assert!(!ok.enabled());
        let mut c = ok;
        c.bps_total.avg = 1;
        c.bps_read.avg = 1;
        assert_eq!(c.validate(), Err(ThrottleError::TotalAndReadWrite));
        let mut c = ok;
        c.iops_total.max = 10;
        c.iops_write.max = 10;
        assert_eq!(c.validate(), Err(ThrottleError::TotalAndReadWrite));
        let mut c = ok;
        c.bps_read.avg = 1;
        c.bps_write.avg = 1;
        c.iops_total.avg = 1;
        assert_eq!(c.validate(), Ok(()));
        let mut c = ok;
        c.iops_size = 4096;
        assert_eq!(c.validate(), Err(ThrottleError::SizeWithoutIops));
        c.iops_read.avg = 5;
        assert_eq!(c.validate(), Ok(()));
        let mut c = ok;
        c.bps_write.avg = VALUE_MAX + 1;
        assert_eq!(c.validate(), Err(ThrottleError::OutOfRange));
        c.bps_write.avg = VALUE_MAX;
        assert_eq!(c.validate(), Ok(()));
        let mut c = ok;
        c.iops_total = Limit {
            avg: 1,
            max: 1,
            max_length: 0,
        };
        assert_eq!(c.validate(), Err(ThrottleError::ZeroBurstLength));
        c.iops_total.max_length = VALUE_MAX;
        assert_eq!(c.validate(), Ok(()));
        c.iops_total.max_length = VALUE_MAX + 1;
        assert_eq!(c.validate(), Err(ThrottleError::LengthTooHigh));
        c.iops_total = Limit {
            avg: 1,
            max: 0,
            max_length: 2,
        };
        assert_eq!(c.validate(), Err(ThrottleError::LengthWithoutMax));
        c.iops_total = Limit {
            avg: 0,
            max: 100,
            max_length: 1,
        };
        assert_eq!(c.validate(), Err(ThrottleError::MaxWithoutAvg));
        c.iops_total.avg = 101;
        assert_eq!(c.validate(), Err(ThrottleError::MaxBelowAvg));
        c.iops_total.avg = 100;
        assert_eq!(c.validate(), Ok(()));
        assert!(c.enabled());
    }

    /// Without a burst rate a tenth of a second's worth goes at once, then requests are spaced
    /// at the rate.
    #[test]
    fn average_rate_after_a_small_initial_burst() {
        let cfg = ThrottleConfig {
            iops_total: iops(100),
            ..Default::default()
        };
        let mut b = Buckets::new(cfg, Duration::ZERO);
        let t = admit_times(&mut b, Dir::Read, 4096, 30);
        // Levels 0..10 are under the bucket size (10): 11 go at t=0.
        assert!(t[..11].iter().all(|&x| x == 0.0), "{t:?}");
        for w in t[11..].windows(2) {
            assert!((w[1] - w[0] - 10.0).abs() < 1e-6, "{t:?}");
        }
        assert!((t[11] - 10.0).abs() < 1e-6, "{t:?}");
        // Writes count against the total too: one more makes the next read wait 10 ms more.
        let before = b.wait(Dir::Read);
        b.account(Dir::Write, 4096);
        assert!((ms(b.wait(Dir::Read)) - ms(before) - 10.0).abs() < 1e-6);
    }

    /// With a burst rate, `max * max_length` goes at up to `max` per second, then `avg` applies;
    /// an idle bucket refills (leaks) at `avg`.
    #[test]
    fn burst_then_average_then_refill() {
        let cfg = ThrottleConfig {
            iops_write: Limit {
                avg: 10,
                max: 100,
                max_length: 2,
            },
            ..Default::default()
        };
        let mut b = Buckets::new(cfg, Duration::ZERO);
        let t = admit_times(&mut b, Dir::Write, 512, 400);
        // Reads are not limited at all.
        assert!(b.wait(Dir::Read).is_zero());
        // During the burst: at most max/10 + 1 in the first moment, then 10 ms apart (100/s).
        let burst_end = t.iter().position(|&x| x > 1990.0).unwrap();
        assert!(t[11] > 0.0 && t[10] == 0.0, "{:?}", &t[..20]);
        for w in t[12..burst_end].windows(2) {
            assert!((w[1] - w[0] - 10.0).abs() < 1e-3, "{:?}", &t[..30]);
        }
        // About max * max_length went in the first ~2 seconds.
        assert!((195..=215).contains(&burst_end), "{burst_end}");
        // Afterwards: 100 ms apart (10/s).
        let late = &t[300..];
        for w in late.windows(2) {
            assert!((w[1] - w[0] - 100.0).abs() < 1e-3, "{late:?}");
        }
        // Idle for a long time: the bucket leaks empty, the burst is available again.
        let idle = Duration::from_secs_f64(t[399] / 1e3 + 1000.0);
        b.leak(idle);
        assert_eq!(b.levels[OPS_WRITE].level, 0.0);
        let again = admit_times(&mut b, Dir::Write, 512, 50);
        assert!((again[49] - again[0]) < 500.0, "{again:?}");
    }

    /// Requests larger than iops_size count as several; bytes count in full against bps.
    #[test]
    fn iops_size_and_bytes() {
        let cfg = ThrottleConfig {
            iops_read: iops(10),
            iops_size: 4096,
            bps_total: Limit {
                avg: 1 << 20,
                ..Limit::default()
            },
            ..Default::default()
        };
        let mut b = Buckets::new(cfg, Duration::ZERO);
        b.account(Dir::Read, 4096 * 8);
        assert!((b.levels[OPS_READ].level - 8.0).abs() < 1e-9);
        assert!((b.levels[BPS_TOTAL].level - 32768.0).abs() < 1e-9);
        b.account(Dir::Read, 512);
        assert!((b.levels[OPS_READ].level - 9.0).abs() < 1e-9);
        // Level 9 over a bucket of 1: 0.8 s at 10/s.
        assert!((ms(b.wait(Dir::Read)) - 800.0).abs() < 1e-3);
        // A write: counted only against the total bytes.
        b.account(Dir::Write, 1 << 20);
        assert_eq!(b.levels[OPS_WRITE].level, 0.0);
        // bps: 1 MiB + 36.5 KiB over a bucket of 0.1 MiB at 1 MiB/s.
        let expect = (b.levels[BPS_TOTAL].level - (1u64 << 20) as f64 / 10.0) / (1u64 << 20) as f64;
        assert!((b.wait(Dir::Write).as_secs_f64() - expect).abs() < 1e-6);
        // The read waits for the longer of its two limits.
        assert!((b.wait(Dir::Read).as_secs_f64() - expect.max(0.8)).abs() < 1e-6);
    }

    /// Read and write limits are independent; a total limit couples them.
    #[test]
    fn read_write_and_total_interplay() {
        let cfg = ThrottleConfig {
            bps_read: iops(1000),
            bps_write: iops(2000),
            ..Default::default()
        };
        let mut b = Buckets::new(cfg, Duration::ZERO);
        b.account(Dir::Read, 1100);
        assert!((ms(b.wait(Dir::Read)) - 1000.0).abs() < 1e-3);
        assert!(b.wait(Dir::Write).is_zero());
        let cfg = ThrottleConfig {
            bps_total: iops(1000),
            ..Default::default()
        };
        let mut b = Buckets::new(cfg, Duration::ZERO);
        b.account(Dir::Read, 1100);
        assert!((ms(b.wait(Dir::Write)) - 1000.0).abs() < 1e-3);
        b.leak(Duration::from_millis(500));
        assert!((ms(b.wait(Dir::Read)) - 500.0).abs() < 1e-3);
    }

    fn poll(f: &mut Pin<Box<Admit<'_>>>, w: &Arc<CountWaker>) -> bool {
        let waker = Waker::from(w.clone());
        f.as_mut().poll(&mut Context::from_waker(&waker)).is_ready()
    }

    /// Requests wait in line, the first arms the alarm for its wait, the next in line is woken
    /// when one goes; a limit change wakes the first and applies to everyone waiting; a
    /// drained queue's requests go at once.
    #[test]
    fn waiting_line_alarm_limit_change_and_release() {
        let clock = TestClock::default();
        let cfg = ThrottleConfig {
            iops_total: iops(10),
            ..Default::default()
        };
        let t = Throttle::new(cfg, Box::new(clock.clone()));
        assert!(t.is_enabled());
        let alarm = TestAlarm::default();
        let release = AtomicBool::new(false);
        let w: Vec<Arc<CountWaker>> = (0..4).map(|_| Arc::default()).collect();
        // Bucket size 1: the first two go at once.
        for wk in &w[..2] {
            let mut f = Box::pin(t.admit(Dir::Read, 4096, &alarm, &release));
            assert!(poll(&mut f, wk));
        }
        let mut a = Box::pin(t.admit(Dir::Read, 4096, &alarm, &release));
        let mut b = Box::pin(t.admit(Dir::Write, 4096, &alarm, &release));
        let mut c = Box::pin(t.admit(Dir::Read, 4096, &alarm, &release));
        assert!(!poll(&mut a, &w[0]));
        // Level 2 over a bucket of 1 at 10/s: 100 ms.
        assert!((armed_ms(&alarm) - 100.0).abs() < 1e-4);
        assert!(!poll(&mut b, &w[1]));
        assert!(!poll(&mut c, &w[2]));
        assert_eq!(t.waiting(), 3);
        clock.set_ms(50.0);
        assert!(!poll(&mut a, &w[0]));
        assert!((armed_ms(&alarm) - 100.0).abs() < 1e-4);
        // c is not first in line: it waits behind a even once a could go.
        clock.set_ms(100.0);
        assert!(!poll(&mut c, &w[2]));
        assert!(poll(&mut a, &w[0]));
        assert_eq!(
            w[2].0.load(Ordering::SeqCst),
            1,
            "the next in line is woken"
        );
        // Raising the limit while b and c wait wakes the first of each line; the buckets
        // start empty, so both go.
        let woken = (w[1].0.load(Ordering::SeqCst), w[2].0.load(Ordering::SeqCst));
        t.set_config(ThrottleConfig {
            iops_total: iops(1000),
            ..Default::default()
        })
        .unwrap();
        assert_eq!(w[1].0.load(Ordering::SeqCst), woken.0 + 1);
        assert_eq!(w[2].0.load(Ordering::SeqCst), woken.1 + 1);
        assert!(poll(&mut b, &w[1]));
        assert!(poll(&mut c, &w[2]));
        assert_eq!(t.waiting(), 0);
        // An invalid change is refused and changes nothing.
        let before = t.config();
        let mut bad = before;
        bad.iops_read.avg = 1;
        assert_eq!(t.set_config(bad), Err(ThrottleError::TotalAndReadWrite));
        assert_eq!(t.config(), before);

        // Lowering the limit applies to those waiting: 1/s, bucket 0.1.
        t.set_config(ThrottleConfig {
            iops_total: iops(1),
            ..Default::default()
        })
        .unwrap();
        let mut d = Box::pin(t.admit(Dir::Read, 4096, &alarm, &release));
        assert!(poll(&mut d, &w[0]));
        let mut e = Box::pin(t.admit(Dir::Read, 4096, &alarm, &release));
        let mut f = Box::pin(t.admit(Dir::Read, 4096, &alarm, &release));
        assert!(!poll(&mut e, &w[1]));
        assert!(!poll(&mut f, &w[2]));
        assert!((armed_ms(&alarm) - 1000.0).abs() < 1e-4);
        // Draining: both go at once, f without waiting for e.
        release.store(true, Ordering::SeqCst);
        let before = w[2].0.load(Ordering::SeqCst);
        t.wake_all();
        assert_eq!(w[2].0.load(Ordering::SeqCst), before + 1);
        assert!(poll(&mut f, &w[2]));
        assert!(poll(&mut e, &w[1]));
        assert_eq!(t.waiting(), 0);
        release.store(false, Ordering::SeqCst);

        // A waiting request dropped leaves the line and wakes the next.
        let mut g = Box::pin(t.admit(Dir::Read, 4096, &alarm, &release));
        let mut h = Box::pin(t.admit(Dir::Read, 4096, &alarm, &release));
        assert!(!poll(&mut g, &w[0]));
        assert!(!poll(&mut h, &w[1]));
        let before = w[1].0.load(Ordering::SeqCst);
        drop(g);
        assert_eq!(w[1].0.load(Ordering::SeqCst), before + 1);
        assert_eq!(t.waiting(), 1);
        // Removing every limit lets the rest go in order.
        t.set_config(ThrottleConfig::default()).unwrap();
        assert!(!t.is_enabled());
        assert!(poll(&mut h, &w[1]));
    }

    #[test]
    fn the_timerfd_fires_at_the_earliest_deadline() {
        let a = Alarm::new().unwrap();
        let readable = |ms| {
            let mut p = libc::pollfd {
                fd: a.fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: one valid pollfd for the duration of the call.
            unsafe { libc::poll(&mut p, 1, ms) == 1 }
        };
        let now = Duration::from_secs(1);
        a.arm(now, Duration::from_millis(30));
        // A later deadline does not push the earlier one back.
        a.arm(now, Duration::from_secs(60));
        let start = Instant::now();
        assert!(readable(5000));
        assert!(start.elapsed() >= Duration::from_millis(25));
        a.fired();
        assert!(!readable(0));
        assert_eq!(*a.deadline.lock(), None);
    }
}
