//! The vhost-user backend: features and config space for the frontend, one worker thread per
//! queue for the data path, draining and flushing when a queue stops.

use super::config::DeviceConfig;
use super::control::Control;
use super::inflight::{Region, Tracker};
use super::seccomp::{enter_or_abort, ThreadKind};
use super::worker::{Ctx, GuestMemory, Vring, Worker};
use parking_lot::{Condvar, Mutex};
use std::fs::File;
use std::io;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;
use vhost::vhost_user::message::{VhostUserInflight, VhostUserProtocolFeatures};
use vhost_user_backend::{VhostUserBackend, VringEpollHandler, VringT};
use virtio_queue::QueueT;
use vm_memory::GuestMemoryAtomic;
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{
    new_event_consumer_and_notifier, EventConsumer, EventFlag, EventNotifier,
};

/// One connection's device. Worker `i` serves queue `i` on vring worker thread `i`.
pub struct BlkBackend {
    ctx: Arc<Ctx>,
    config: Mutex<DeviceConfig>,
    features: u64,
    mem: GuestMemoryAtomic<GuestMemory>,
    workers: Vec<Slot>,
    control: Arc<Control>,
    /// The frontend's inflight region (SET_INFLIGHT_FD), taken up by each queue as it starts.
    inflight: Mutex<Option<Arc<Region>>>,
}

struct Slot {
    worker: Mutex<Worker>,
    /// Signalled when the worker has no request in flight.
    idle: Condvar,
}

impl BlkBackend {
    pub fn new(
        ctx: Arc<Ctx>,
        config: DeviceConfig,
        control: Arc<Control>,
    ) -> io::Result<BlkBackend> {
        // Room for a full queue of requests plus the engine's own metadata I/O.
        let entries = (u32::from(config.queue_size) * 2).next_power_of_two();
        let workers = (0..config.num_queues)
            .map(|q| {
                // A server's statistics have a part for each queue it offers.
                let stats = ctx.stats.queue(usize::from(q)).unwrap_or_default();
                Ok(Slot {
                    worker: Mutex::new(Worker::new(entries, stats)?),
                    idle: Condvar::new(),
                })
            })
            .collect::<io::Result<Vec<_>>>()?;
        ctx.write_through
            .store(!config.writeback, Ordering::Relaxed);
        Ok(BlkBackend {
            ctx,
            features: config.features(),
            config: Mutex::new(config),
            mem: GuestMemoryAtomic::new(GuestMemory::new()),
            workers,
            control,
            inflight: Mutex::new(None),
        })
    }

    /// The guest memory map the daemon must be created with.
    pub fn memory(&self) -> GuestMemoryAtomic<GuestMemory> {
        self.mem.clone()
    }

    /// epoll token of a worker's io_uring eventfd (tokens up to num_queues are the library's).
    fn uring_token(&self) -> u64 {
        self.workers.len() as u64 + 1
    }

    /// epoll token of a worker's throttle alarm.
    fn alarm_token(&self) -> u64 {
        self.workers.len() as u64 + 2
    }

    /// Puts each worker's io_uring eventfd into its thread's epoll, so completions wake it, and
    /// its throttle alarm, so throttled requests go when their wait is over.
    pub fn register(&self, handlers: &[Arc<VringEpollHandler<Arc<BlkBackend>>>]) -> io::Result<()> {
        for (slot, h) in self.workers.iter().zip(handlers) {
            let w = slot.worker.lock();
            h.register_listener(w.io.eventfd(), EventSet::IN, self.uring_token())?;
            h.register_listener(w.alarm.fd(), EventSet::IN, self.alarm_token())?;
        }
        Ok(())
    }

    /// Waits until queue `q` has no request in flight. Its worker thread keeps reaping
    /// completions meanwhile (the io_uring eventfd stays registered). Its throttled requests
    /// go without waiting for their turn: a drain (GET_VRING_BASE, a frontend leaving, a stop)
    /// must not last as long as the limits would make it.
    pub fn drain(&self, q: usize) {
        let Some(slot) = self.workers.get(q) else {
            return;
        };
        let mut w = slot.worker.lock();
        let release = w.release.clone();
        release.store(true, Ordering::Relaxed);
        // The woken tasks' thread is kicked; it runs them once we wait (and unlock).
        self.ctx.throttle.wake_all();
        while w.inflight() > 0 {
            if slot
                .idle
                .wait_for(&mut w, Duration::from_secs(10))
                .timed_out()
            {
                tracing::warn!(
                    "queue {q}: still waiting for {} requests to finish",
                    w.inflight()
                );
            }
        }
        release.store(false, Ordering::Relaxed);
    }

    pub fn drain_all(&self) {
        for q in 0..self.workers.len() {
            self.drain(q);
        }
    }

    /// Stops taking requests from the available rings (the server is stopping): what was taken
    /// finishes, what the guest adds stays for the next server.
    pub fn quiesce(&self) {
        self.ctx.stopping.store(true, Ordering::SeqCst);
    }

    /// The device's limits for an inflight region: (queues, queue size).
    fn inflight_limits(&self) -> (u16, u16) {
        let qs = self.config.lock().queue_size;
        (self.workers.len() as u16, qs)
    }

    /// Flushes the disk from the calling thread.
    pub fn flush(&self) {
        let disk = &self.ctx.disk;
        if let Err(e) = self.control.block_on(disk.flush(self.control.io())) {
            tracing::error!("flush failed: {e}");
        }
    }
}

impl VhostUserBackend for BlkBackend {
    type Bitmap = ();
    type Vring = Vring;

    fn num_queues(&self) -> usize {
        self.workers.len()
    }

    fn max_queue_size(&self) -> usize {
        usize::from(self.config.lock().queue_size)
    }

    // The callbacks below run on the connection thread, which restricts itself at the first one
    // (until then it runs under the main thread's filter, which it inherited).
    fn features(&self) -> u64 {
        enter_or_abort(ThreadKind::Connection);
        self.features
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        enter_or_abort(ThreadKind::Connection);
        DeviceConfig::protocol_features()
    }

    // The vrings track EVENT_IDX themselves (set_queue_event_idx); nothing to do here.
    fn set_event_idx(&self, _enabled: bool) {}

    fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        enter_or_abort(ThreadKind::Connection);
        let r = {
            let mut c = self.config.lock();
            // The size as of now: a resize changes it while served.
            c.capacity = self.ctx.disk.virtual_size();
            c.read(offset, size)
        };
        if r.is_empty() {
            tracing::debug!("GET_CONFIG outside the config space: offset {offset}, size {size}");
        }
        r
    }

    fn set_config(&self, offset: u32, buf: &[u8]) -> io::Result<()> {
        enter_or_abort(ThreadKind::Connection);
        let mut c = self.config.lock();
        if c.write(offset, buf) {
            self.ctx
                .write_through
                .store(!c.writeback, Ordering::Relaxed);
            tracing::info!(
                "guest set the write cache to {}",
                if c.writeback {
                    "write-back"
                } else {
                    "write-through"
                }
            );
        } else {
            // Writes to read-only fields are ignored, as the virtio spec has devices do.
            tracing::debug!("ignored SET_CONFIG at offset {offset}, {} bytes", buf.len());
        }
        Ok(())
    }

    // The frontend's channel for CONFIG_CHANGE_MSG after a resize (`ServerHandle::resize`).
    // Its ack wait is bounded: a frontend that never answers must not hold the control thread.
    fn set_backend_req_fd(&self, backend: vhost::vhost_user::Backend) {
        backend.set_timeout(Some(super::handle::BACKEND_REQ_TIMEOUT));
        self.ctx.backend_req.set(Some(backend));
    }

    // The memory map lives in `self.mem`, which the library updates in place; its mappings are
    // recorded for the SIGBUS handler.
    fn update_memory(&self, mem: GuestMemoryAtomic<GuestMemory>) -> io::Result<()> {
        enter_or_abort(ThreadKind::Connection);
        use vm_memory::{GuestAddressSpace, GuestMemoryBackend, GuestMemoryRegion};
        for r in mem.memory().iter() {
            super::sigbus::register(r.as_ptr() as usize, r.len() as usize);
        }
        Ok(())
    }

    fn queues_per_thread(&self) -> Vec<u64> {
        (0..self.workers.len()).map(|q| 1u64 << q).collect()
    }

    fn exit_event(&self, _thread_index: usize) -> Option<(EventConsumer, EventNotifier)> {
        match new_event_consumer_and_notifier(EventFlag::NONBLOCK | EventFlag::CLOEXEC) {
            Ok(pair) => Some(pair),
            Err(e) => {
                tracing::error!("cannot create a worker exit eventfd: {e}");
                None
            }
        }
    }

    /// GET_VRING_BASE: the queue is already unregistered; finish what the guest gave us and
    /// publish it (so the base returned equals the used index), then make it durable, before
    /// the frontend reads the ring position.
    fn stop_vring(&self, q: u32) -> io::Result<()> {
        enter_or_abort(ThreadKind::Connection);
        self.drain(q as usize);
        if let Some(slot) = self.workers.get(q as usize) {
            let mut w = slot.worker.lock();
            w.started = false;
            w.tracker = None;
            w.poll_ring = false;
        }
        self.flush();
        Ok(())
    }

    fn get_inflight_fd(&self, msg: &VhostUserInflight) -> io::Result<(VhostUserInflight, File)> {
        enter_or_abort(ThreadKind::Connection);
        let (max_queues, max_size) = self.inflight_limits();
        if msg.num_queues > max_queues || msg.queue_size > max_size {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "GET_INFLIGHT_FD for {} queues of {}; the device has {max_queues} of up to \
                     {max_size}",
                    msg.num_queues, msg.queue_size
                ),
            ));
        }
        let (_, file, reply) = Region::create(msg.num_queues, msg.queue_size)?;
        Ok((reply, file))
    }

    fn set_inflight_fd(&self, msg: &VhostUserInflight, file: File) -> io::Result<()> {
        enter_or_abort(ThreadKind::Connection);
        let (max_queues, max_size) = self.inflight_limits();
        let region = Region::open(msg, &file, max_queues, max_size).inspect_err(|e| {
            tracing::warn!("SET_INFLIGHT_FD refused: {e}");
        })?;
        *self.inflight.lock() = Some(Arc::new(region));
        Ok(())
    }

    /// The queue is about to run: with an inflight region, repair the used index, set where
    /// the available ring is read from next and resubmit what was in flight; then have the
    /// worker look at the ring once, kick or not.
    fn start_vring(&self, q: u32, vring: &Vring) -> io::Result<()> {
        enter_or_abort(ThreadKind::Connection);
        let Some(slot) = self.workers.get(q as usize) else {
            return Ok(());
        };
        let mut w = slot.worker.lock();
        if w.started {
            return Ok(());
        }
        if let Some(region) = self.inflight.lock().clone() {
            let size = vring.get_ref().get_queue().size();
            let used = vring.queue_used_idx().map_err(|e| {
                io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!("queue {q}: cannot read the used index: {e}"),
                )
            })?;
            let (tracker, found) = Tracker::start(region, q as u16, size, used)
                .inspect_err(|e| tracing::warn!("queue {q} not started: {e}"))?;
            if let Some(next) = found.next_avail {
                vring.set_queue_next_avail(next);
                vring.set_queue_next_used(used);
            }
            if !found.resubmit.is_empty() {
                tracing::info!(
                    "queue {q}: {} requests were in flight; resubmitting them",
                    found.resubmit.len()
                );
            }
            w.tracker = Some(tracker);
            w.resubmit(found.resubmit, vring, &self.mem, &self.ctx);
        }
        w.started = true;
        // Also without a region: requests the guest queued while no server ran may come with
        // no further kick.
        w.poll_ring = true;
        w.io.kick();
        Ok(())
    }

    fn handle_event(
        &self,
        device_event: u16,
        _evset: EventSet,
        vrings: &[Vring],
        thread_id: usize,
    ) -> io::Result<()> {
        // Before the first guest request is parsed on this thread.
        enter_or_abort(ThreadKind::Queue);
        // Never return an error: it would end this queue's worker thread for good.
        let (Some(slot), Some(vring)) = (self.workers.get(thread_id), vrings.first()) else {
            return Ok(());
        };
        let mut w = slot.worker.lock();
        let mut look = device_event == 0;
        if u64::from(device_event) == self.alarm_token() {
            w.alarm_fired(&self.ctx);
        }
        if u64::from(device_event) == self.uring_token() {
            w.reap();
            look |= std::mem::take(&mut w.poll_ring);
        }
        if look {
            w.pop_requests(vring, &self.mem, &self.ctx);
        }
        w.turn(vring, &self.ctx);
        if w.inflight() == 0 {
            slot.idle.notify_all();
        }
        Ok(())
    }
}

#[cfg(test)]
#[path = "backend_tests.rs"]
mod tests;
