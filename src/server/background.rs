//! Background work of a served image: adaptive prefetching of the base image and growing a
//! thin image's logical volume ahead of need. Each runs on its own thread with its own ring
//! ([`Control`]), so guest queues never wait for it.

use super::control::Control;
use super::qmp::events::{self as ev, EventSink};
use crate::engine::prefetch::{Action, PrefetchConfig, Throttle};
use crate::engine::space::SpacePolicy;
use crate::engine::{Disk, Image};
use crate::io::uring::UringIo;
use parking_lot::{Condvar, Mutex};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// Tells background threads to stop, waking them from their sleeps.
#[derive(Default)]
pub struct StopFlag {
    stop: AtomicBool,
    lock: Mutex<()>,
    cv: Condvar,
}

impl StopFlag {
    pub fn stop(&self) {
        self.stop.store(true, Ordering::Release);
        let _g = self.lock.lock();
        self.cv.notify_all();
    }
    pub fn stopped(&self) -> bool {
        self.stop.load(Ordering::Acquire)
    }
    /// Sleeps up to `d`; returns early (true) when stopped.
    pub fn sleep(&self, d: Duration) -> bool {
        let mut g = self.lock.lock();
        if !self.stopped() {
            self.cv.wait_for(&mut g, d);
        }
        self.stopped()
    }
}

/// A background thread could not be started.
#[derive(Debug, thiserror::Error)]
#[error("{task}: cannot {op}: {source}")]
pub struct StartError {
    /// Which background work: "prefetch", "grow".
    pub task: &'static str,
    pub op: StartOp,
    pub source: std::io::Error,
}

/// The step of starting background work that failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StartOp {
    CreateRing,
    SpawnThread,
}

impl std::fmt::Display for StartOp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            StartOp::CreateRing => "create an io_uring",
            StartOp::SpawnThread => "start its thread",
        })
    }
}

fn start_error(task: &'static str, op: StartOp) -> impl FnOnce(std::io::Error) -> StartError {
    move |source| StartError { task, op, source }
}

fn image(disk: &Disk<UringIo>) -> Option<&Image<UringIo>> {
    match disk {
        Disk::Fvd(img) => Some(img),
        Disk::Raw(_) => None,
    }
}

/// The prefetch as a block job (`query-block-jobs`, `block-job-*` on the control socket): its
/// progress, and what the operator asked of it. Atomics only: the prefetch thread reads them
/// between steps, the control thread writes them, neither waits for the other.
#[derive(Default)]
pub struct PrefetchJob {
    /// The prefetch thread runs (until it finishes, is cancelled or the server stops).
    active: AtomicBool,
    paused: AtomicBool,
    cancel: AtomicBool,
    /// Copying a step right now.
    busy: AtomicBool,
    /// Bytes per second (0: unlimited).
    rate: AtomicU64,
    /// Bytes of the base to copy when the job started, and copied since.
    len: AtomicU64,
    offset: AtomicU64,
}

/// A snapshot of [`PrefetchJob`] for `query-block-jobs`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct JobInfo {
    pub paused: bool,
    pub busy: bool,
    pub speed: u64,
    pub len: u64,
    pub offset: u64,
}

/// Why a job command was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum JobError {
    #[error("no prefetch job is running")]
    NotRunning,
    #[error("the job is already paused")]
    AlreadyPaused,
    #[error("the job is not paused")]
    NotPaused,
}

impl PrefetchJob {
    /// The job's state, or None when there is no job (never started, or finished).
    pub fn info(&self) -> Option<JobInfo> {
        if !self.active.load(Ordering::Acquire) {
            return None;
        }
        Some(JobInfo {
            paused: self.paused.load(Ordering::Relaxed),
            busy: self.busy.load(Ordering::Relaxed),
            speed: self.rate.load(Ordering::Relaxed),
            len: self.len.load(Ordering::Relaxed),
            offset: self.offset.load(Ordering::Relaxed),
        })
    }

    fn running(&self) -> Result<(), JobError> {
        if self.active.load(Ordering::Acquire) {
            Ok(())
        } else {
            Err(JobError::NotRunning)
        }
    }

    pub fn pause(&self) -> Result<(), JobError> {
        self.running()?;
        if self.paused.swap(true, Ordering::AcqRel) {
            return Err(JobError::AlreadyPaused);
        }
        Ok(())
    }

    pub fn resume(&self) -> Result<(), JobError> {
        self.running()?;
        if !self.paused.swap(false, Ordering::AcqRel) {
            return Err(JobError::NotPaused);
        }
        Ok(())
    }

    /// The prefetch rate limit in bytes per second (0: none).
    pub fn set_speed(&self, rate: u64) -> Result<(), JobError> {
        self.running()?;
        self.rate.store(rate, Ordering::Relaxed);
        Ok(())
    }

    /// Stops the job at its next step; it reports `BLOCK_JOB_CANCELLED`.
    pub fn cancel(&self) -> Result<(), JobError> {
        self.running()?;
        self.cancel.store(true, Ordering::Release);
        Ok(())
    }

    /// The job is over: no longer listed, then `event` (a client that reads the event never
    /// sees the job listed after it).
    fn finish(&self, events: &EventSink, event: &'static str) {
        self.active.store(false, Ordering::Release);
        events.emit(event, self.event_data());
    }

    fn event_data(&self) -> serde_json::Value {
        serde_json::json!({
            "type": "stream",
            "device": PREFETCH_JOB,
            "len": self.len.load(Ordering::Relaxed),
            "offset": self.offset.load(Ordering::Relaxed),
            "speed": self.rate.load(Ordering::Relaxed),
        })
    }
}

/// The prefetch job's id (QEMU's `device` of a block job).
pub const PREFETCH_JOB: &str = "prefetch";

/// Starts the prefetch thread if the image has a base and prefetching is on; `Ok(None)` when
/// there is nothing to prefetch.
pub fn start_prefetch(
    disk: Arc<Disk<UringIo>>,
    cfg: PrefetchConfig,
    stop: Arc<StopFlag>,
    job: Arc<PrefetchJob>,
    events: Arc<EventSink>,
) -> Result<Option<JoinHandle<()>>, StartError> {
    let Some(img) = image(&disk) else {
        return Ok(None);
    };
    if img.base().is_none() || img.read_only() {
        return Ok(None);
    }
    if img.base_blocks_remaining() == 0 {
        let control = Control::new().map_err(start_error("prefetch", StartOp::CreateRing))?;
        let _ = control.block_on(img.mark_base_not_needed(control.io()));
        return Ok(None);
    }
    let bs = img.geometry().block_size;
    job.rate.store(cfg.rate, Ordering::Relaxed);
    job.len
        .store(img.base_blocks_remaining() * bs, Ordering::Relaxed);
    job.active.store(true, Ordering::Release);
    let spawned = std::thread::Builder::new()
        .name("fvd-prefetch".into())
        .spawn({
            let job = job.clone();
            move || {
                prefetch_loop(&disk, cfg, &stop, &job, &events);
                job.active.store(false, Ordering::Release);
            }
        });
    if spawned.is_err() {
        job.active.store(false, Ordering::Release);
    }
    spawned
        .map(Some)
        .map_err(start_error("prefetch", StartOp::SpawnThread))
}

/// Sleeps `d` in short slices so that a cancel or a stop is seen soon; true when the loop must
/// end.
fn job_sleep(stop: &StopFlag, job: &PrefetchJob, d: Duration) -> bool {
    let deadline = Instant::now() + d;
    loop {
        if job.cancel.load(Ordering::Acquire) {
            return true;
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return false;
        }
        if stop.sleep(left.min(Duration::from_millis(100))) {
            return true;
        }
    }
}

fn prefetch_loop(
    disk: &Disk<UringIo>,
    cfg: PrefetchConfig,
    stop: &StopFlag,
    job: &PrefetchJob,
    events: &EventSink,
) {
    super::seccomp::enter_or_abort(super::seccomp::ThreadKind::Prefetch);
    let Some(img) = image(disk) else { return };
    let control = match Control::new() {
        Ok(c) => c,
        Err(e) => {
            tracing::error!("prefetch: cannot create an io_uring: {e}");
            return;
        }
    };
    let bs = img.geometry().block_size;
    let step_blocks = cfg.step_blocks;
    let mut rate = cfg.rate;
    let mut throttle = Throttle::new(cfg);
    let origin = Instant::now();
    let mut last_log = Instant::now();
    let mut copied_total = 0u64;
    tracing::info!(
        "prefetch: {} bytes of the base image to copy",
        img.base_blocks_remaining() * bs
    );
    while !stop.stopped() {
        if job.cancel.load(Ordering::Acquire) {
            tracing::info!("prefetch: cancelled, {copied_total} bytes copied");
            job.finish(events, ev::BLOCK_JOB_CANCELLED);
            return;
        }
        if job.paused.load(Ordering::Acquire) {
            if job_sleep(stop, job, Duration::from_millis(100)) && stop.stopped() {
                break;
            }
            continue;
        }
        let speed = job.rate.load(Ordering::Relaxed);
        if speed != rate {
            rate = speed;
            throttle.set_rate(rate);
        }
        let c = img.counters().snapshot();
        let guest_ops = c.guest_reads + c.guest_writes + c.guest_flushes + c.guest_discards;
        match throttle.next(origin.elapsed(), guest_ops) {
            Action::Sleep(d) => {
                if job_sleep(stop, job, d) && stop.stopped() {
                    break;
                }
            }
            Action::Copy => {
                let t0 = Instant::now();
                job.busy.store(true, Ordering::Relaxed);
                let r = control.block_on(img.prefetch_step(control.io(), step_blocks));
                job.busy.store(false, Ordering::Relaxed);
                match r {
                    Ok(step) => {
                        copied_total += step.bytes;
                        job.offset.store(
                            job.len
                                .load(Ordering::Relaxed)
                                .saturating_sub(img.base_blocks_remaining() * bs),
                            Ordering::Relaxed,
                        );
                        throttle.copied(origin.elapsed(), step.bytes, t0.elapsed());
                        if step.done {
                            match control.block_on(img.mark_base_not_needed(control.io())) {
                                Ok(_) => tracing::info!(
                                    "prefetch: done, {copied_total} bytes copied; the base image is no longer needed"
                                ),
                                Err(e) => tracing::warn!("prefetch: done, but recording it failed: {e}"),
                            }
                            job.finish(events, ev::BLOCK_JOB_COMPLETED);
                            return;
                        }
                    }
                    Err(e) => {
                        tracing::warn!("prefetch: {e}; retrying later");
                        if job_sleep(stop, job, Duration::from_secs(5)) && stop.stopped() {
                            break;
                        }
                    }
                }
                if last_log.elapsed() >= Duration::from_secs(10) {
                    last_log = Instant::now();
                    tracing::info!(
                        "prefetch: {copied_total} bytes copied, {} bytes remaining, {} back-offs",
                        img.base_blocks_remaining() * bs,
                        throttle.backoffs
                    );
                }
            }
        }
    }
}

/// How to grow the storage of a thin image.
#[derive(Clone, Debug)]
pub struct GrowConfig {
    /// Shell command; `{unit}` (as given, e.g. `5G`), `{unit_bytes}`, `{device}` and `{image}`
    /// (both the image path) are substituted.
    pub command: String,
    pub unit: String,
    pub unit_bytes: u64,
    pub watermark: u64,
    pub timeout: Duration,
}

/// Installs the space policy and starts the grower thread (compact images on block devices);
/// `Ok(None)` for other images, whose storage does not grow this way.
pub fn start_grower(
    disk: Arc<Disk<UringIo>>,
    image_path: &Path,
    cfg: GrowConfig,
    stop: Arc<StopFlag>,
    events: Arc<EventSink>,
) -> Result<Option<JoinHandle<()>>, StartError> {
    let Some(img) = image(&disk) else {
        return Ok(None);
    };
    if img.free_bytes().is_none() {
        return Ok(None); // only bounded storage grows
    }
    let (tx, rx) = mpsc::channel::<()>();
    img.set_space_policy(SpacePolicy {
        watermark: cfg.watermark,
        on_low: Box::new(move || {
            let _ = tx.send(());
        }),
        wait: cfg.timeout,
    });
    let device = image_path.to_path_buf();
    let weak = Arc::downgrade(&disk);
    drop(disk);
    std::thread::Builder::new()
        .name("fvd-grow".into())
        .spawn(move || {
            let mut last_failure: Option<Instant> = None;
            loop {
                if stop.stopped() {
                    return;
                }
                // Wake at least every 200 ms: waiting writes re-check their deadline on notify.
                let asked = match rx.recv_timeout(Duration::from_millis(200)) {
                    Ok(()) => true,
                    Err(mpsc::RecvTimeoutError::Timeout) => false,
                    Err(mpsc::RecvTimeoutError::Disconnected) => return,
                };
                let Some(disk) = weak.upgrade() else { return };
                let Some(img) = image(&disk) else { return };
                if !asked {
                    if img.space_waiting() > 0 {
                        img.notify_space();
                    }
                    continue;
                }
                while rx.try_recv().is_ok() {}
                if img.free_bytes().is_some_and(|f| f >= cfg.watermark) {
                    continue; // an earlier grow already helped
                }
                if last_failure.is_some_and(|t| t.elapsed() < Duration::from_secs(5)) {
                    img.notify_space();
                    continue;
                }
                let cmd = cfg
                    .command
                    .replace("{unit_bytes}", &cfg.unit_bytes.to_string())
                    .replace("{unit}", &cfg.unit)
                    .replace("{device}", &device.display().to_string())
                    .replace("{image}", &device.display().to_string());
                let free = img.free_bytes().unwrap_or(0);
                tracing::info!("space low ({free} bytes free): running grow command: {cmd}");
                events.emit(
                    ev::STORAGE_LOW,
                    serde_json::json!({"free": free, "watermark": cfg.watermark}),
                );
                match std::process::Command::new("sh")
                    .arg("-c")
                    .arg(&cmd)
                    .status()
                {
                    Ok(s) if s.success() => {
                        last_failure = None;
                        img.notify_space();
                        let free = img.free_bytes().unwrap_or(0);
                        tracing::info!("storage grown: {free} bytes free");
                        events.emit(ev::STORAGE_GROWN, serde_json::json!({"free": free}));
                    }
                    Ok(s) => {
                        last_failure = Some(Instant::now());
                        tracing::error!("grow command failed ({s}): {cmd}");
                        events.emit(
                            ev::STORAGE_GROW_FAILED,
                            serde_json::json!({"reason": format!("the grow command failed ({s})")}),
                        );
                        img.notify_space();
                    }
                    Err(e) => {
                        last_failure = Some(Instant::now());
                        tracing::error!("cannot run grow command {cmd}: {e}");
                        events.emit(
                            ev::STORAGE_GROW_FAILED,
                            serde_json::json!({"reason": format!("cannot run the grow command: {e}")}),
                        );
                        img.notify_space();
                    }
                }
            }
        })
        .map(Some)
        .map_err(start_error("grow", StartOp::SpawnThread))
}
