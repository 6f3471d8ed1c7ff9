//! The vhost-user backend: features and config space for the frontend, one worker thread per
//! queue for the data path, draining and flushing when a queue stops.

use super::config::DeviceConfig;
use super::control::Control;
use super::seccomp::{enter_or_abort, ThreadKind};
use super::worker::{Ctx, GuestMemory, Vring, Worker};
use parking_lot::{Condvar, Mutex};
use std::io;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;
use vhost::vhost_user::message::VhostUserProtocolFeatures;
use vhost_user_backend::{VhostUserBackend, VringEpollHandler};
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
            .map(|_| {
                Ok(Slot {
                    worker: Mutex::new(Worker::new(entries)?),
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

    /// Puts each worker's io_uring eventfd into its thread's epoll, so completions wake it.
    pub fn register(&self, handlers: &[Arc<VringEpollHandler<Arc<BlkBackend>>>]) -> io::Result<()> {
        for (slot, h) in self.workers.iter().zip(handlers) {
            h.register_listener(
                slot.worker.lock().io.eventfd(),
                EventSet::IN,
                self.uring_token(),
            )?;
        }
        Ok(())
    }

    /// Waits until queue `q` has no request in flight. Its worker thread keeps reaping
    /// completions meanwhile (the io_uring eventfd stays registered).
    pub fn drain(&self, q: usize) {
        let Some(slot) = self.workers.get(q) else {
            return;
        };
        let mut w = slot.worker.lock();
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
    }

    pub fn drain_all(&self) {
        for q in 0..self.workers.len() {
            self.drain(q);
        }
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
        let r = self.config.lock().read(offset, size);
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

    /// GET_VRING_BASE: the queue is already unregistered; finish what the guest gave us, then
    /// make it durable, before the frontend reads the ring position.
    fn stop_vring(&self, q: u32) -> io::Result<()> {
        enter_or_abort(ThreadKind::Connection);
        self.drain(q as usize);
        self.flush();
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
        if u64::from(device_event) == self.uring_token() {
            w.reap();
        } else if device_event == 0 {
            w.pop_requests(vring, &self.mem, &self.ctx);
        }
        w.turn(vring, self.ctx.signal_each);
        if w.inflight() == 0 {
            slot.idle.notify_all();
        }
        Ok(())
    }
}
