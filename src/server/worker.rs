//! One queue's worker state, living on that queue's vring worker thread: its own io_uring, its
//! own task executor, and the requests in flight.
//!
//! Each event-loop turn (one `handle_event` call): pop every available chain and spawn one task
//! per request, run the ready tasks (each hands its I/O to the kernel at once), put
//! finished requests in the used ring, and signal the guest once for the whole batch if
//! EVENT_IDX says it wants to hear about it. Completions arrive through the ring's eventfd,
//! registered in the same epoll as the queue's kick, so the thread sleeps when idle.

use super::inflight::Tracker;
use super::request::{self, Op, Request, Segs, ID_LEN, STATUS_IOERR, STATUS_OK};
use super::sigbus;
use super::stats::{OpKind, Outcome, QueueStats, Stats};
use super::throttle::{Alarm, Dir, Throttle};
use crate::engine::Disk;
use crate::io::executor::Executor;
use crate::io::uring::UringIo;
use crate::io::Buf;
use parking_lot::Mutex;
use std::cell::Cell;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Instant;
use vhost_user_backend::{VringRwLock, VringT};
use virtio_queue::{QueueOwnedT, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestAddressSpace, GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::event::EventNotifier;

pub type GuestMemory = GuestMemoryMmap<()>;
pub type Vring = VringRwLock<GuestMemoryAtomic<GuestMemory>>;

/// What every request task of a connection needs.
pub struct Ctx {
    pub disk: Arc<Disk<UringIo>>,
    pub serial: [u8; ID_LEN],
    /// The guest turned the write cache off (`wce` = 0): every write is flushed before it
    /// completes.
    pub write_through: AtomicBool,
    pub limits: request::Limits,
    /// Signal the guest after every completed request instead of once per event-loop turn
    /// (a benchmark knob: batching is the default because it halves interrupts at depth).
    pub signal_each: bool,
    /// [`sigbus::faults`] when the connection started: a change means the frontend shrank
    /// guest memory under the server, and the connection is broken.
    pub sigbus_base: u64,
    /// Ends the connection (set once it is established).
    pub conn: Mutex<Option<vhost_user_backend::ShutdownHandle>>,
    /// The server is stopping: requests still on the available ring stay there (for the next
    /// server), those taken finish.
    pub stopping: AtomicBool,
    /// What this connection has logged already.
    pub log: ConnLog,
    /// Where a failed request raises `BLOCK_IO_ERROR` (the control socket).
    pub events: Arc<super::qmp::events::EventSink>,
    /// The server's statistics (they outlive the connection): queue `i`'s worker writes part `i`.
    pub stats: Arc<Stats>,
    /// The disk's I/O limits (shared by all queues and connections).
    pub throttle: Arc<Throttle>,
    /// Where this connection's backend request channel goes (SET_BACKEND_REQ_FD).
    pub backend_req: Arc<super::handle::FrontendChannel>,
}

/// Problems a guest causes are logged the first time per connection, then only at trace level:
/// one guest cannot flood the log, and a later connection's problems are not hidden behind an
/// earlier one's (as a process-wide flag would).
#[derive(Default)]
pub struct ConnLog {
    avail: AtomicBool,
    submit: AtomicBool,
    used: AtomicBool,
    signal: AtomicBool,
    pub bad: request::BadLog,
    io_errors: AtomicU64,
}

impl Ctx {
    /// Whether guest memory was found truncated; the first call that finds it ends the
    /// connection.
    fn memory_lost(&self) -> bool {
        if sigbus::faults() == self.sigbus_base {
            return false;
        }
        if let Some(h) = self.conn.lock().take() {
            tracing::error!(
                "the frontend shrank guest memory under the server: failing its requests and \
                 ending the connection"
            );
            h.shutdown();
        }
        true
    }
}

/// A request that left the device.
struct Done {
    head: u16,
    /// Bytes written into the chain.
    len: u32,
    end: End,
}

/// What the statistics record of a request that left the device.
enum End {
    /// A task finished; its latency ends when it reaches the used ring.
    Task {
        op: OpKind,
        bytes: u64,
        ok: bool,
        taken: Instant,
    },
    Other(Outcome),
}

thread_local! {
    /// The worker whose event loop this thread is running, if any (see `Worker::new`).
    static CURRENT: Cell<usize> = const { Cell::new(0) };
}
static NEXT_ID: AtomicUsize = AtomicUsize::new(1);

pub struct Worker {
    id: usize,
    pub io: Arc<UringIo>,
    exec: Executor,
    /// Filled by tasks and by rejected chains, drained into the used ring once per turn.
    done: Arc<Mutex<Vec<Done>>>,
    /// The queue's part of the inflight region, while the queue runs with one.
    pub tracker: Option<Tracker>,
    /// The queue was started (`start_vring`) and not stopped since.
    pub started: bool,
    /// Look at the ring at the next wake-up even without a kick (set when the queue starts).
    pub poll_ring: bool,
    /// This queue's statistics; written only under the worker's mutex, so by one thread at a time.
    stats: Arc<QueueStats>,
    /// Wakes this thread when a throttled request's wait is over (in the thread's epoll).
    pub alarm: Arc<Alarm>,
    /// The queue is being drained: its throttled requests go without waiting.
    pub release: Arc<AtomicBool>,
}

impl Worker {
    pub fn new(entries: u32, stats: Arc<QueueStats>) -> std::io::Result<Worker> {
        let io = Arc::new(UringIo::new(entries)?);
        let id = NEXT_ID.fetch_add(1, Ordering::Relaxed);
        let kick = io.clone();
        // A wake-up from our own loop needs no kick: the loop runs ready tasks before it sleeps.
        // One from another thread (a task waiting on another queue's I/O) must end our sleep.
        let notify = move || {
            if CURRENT.with(Cell::get) != id {
                kick.kick();
            }
        };
        Ok(Worker {
            id,
            io,
            exec: Executor::new(Some(Box::new(notify))),
            done: Arc::new(Mutex::new(Vec::new())),
            tracker: None,
            started: false,
            poll_ring: false,
            stats,
            alarm: Arc::new(Alarm::new()?),
            release: Arc::new(AtomicBool::new(false)),
        })
    }

    /// Requests whose task has not finished. A finished task has pushed its entry to `done`,
    /// which every turn empties into the used ring, so between turns this is also the number
    /// of requests the guest is still waiting for.
    pub fn inflight(&self) -> usize {
        self.exec.live_tasks()
    }

    /// Takes `heads`, the requests the inflight region had in flight when the queue started,
    /// oldest first. Called as the queue starts, before any kick is watched, so their tasks are
    /// queued before anything new on the available ring (the queue thread runs them when
    /// woken). Their descriptors are still the guest's to read: it has not had them back.
    pub fn resubmit(
        &mut self,
        heads: Vec<u16>,
        vring: &Vring,
        memory: &GuestMemoryAtomic<GuestMemory>,
        ctx: &Arc<Ctx>,
    ) {
        // A stopping server leaves them flagged in the region for the next one.
        if heads.is_empty() || ctx.stopping.load(Ordering::SeqCst) {
            return;
        }
        let (table, size) = {
            let st = vring.get_ref();
            let q = st.get_queue();
            (GuestAddress(q.desc_table()), q.size())
        };
        let mem = memory.memory().into_inner();
        let now = Instant::now();
        for head in heads {
            let chain = request::chain_at(&*mem, table, size, head);
            self.take(head, chain, &mem, ctx, now);
        }
    }

    /// Marks one chain in flight and turns it into a task (or a rejection); `taken` is when
    /// it was taken off the ring (one clock read per batch).
    fn take(
        &mut self,
        head: u16,
        chain: impl IntoIterator<Item = virtio_queue::desc::split::Descriptor>,
        mem: &Arc<GuestMemory>,
        ctx: &Arc<Ctx>,
        taken: Instant,
    ) {
        if let Some(t) = &mut self.tracker {
            t.get(head);
        }
        // Against the current size (an online resize grows it): a request past the end is
        // refused here, counted as invalid, as QEMU counts it, not as an I/O error.
        let limits = request::Limits {
            capacity: ctx.disk.virtual_size() / 512 * 512,
            ..ctx.limits.clone()
        };
        let parsed = request::parse(chain, &**mem, &limits);
        // Read from zero pages the SIGBUS handler put in: not what the guest wrote,
        // so neither executed nor answered.
        if ctx.memory_lost() {
            self.done.lock().push(Done {
                head,
                len: 0,
                end: End::Other(Outcome::Dropped),
            });
            return;
        }
        match parsed {
            Ok(req) => {
                self.stats.taken();
                self.spawn(head, req, mem.clone(), ctx.clone(), taken)
            }
            Err(rej) => {
                let detail = format_args!("type {:?}, head {head}", rej.req_type);
                rej.reason.log_once(&ctx.log.bad, &detail);
                let len = match rej.status {
                    Some(addr) if write_status(mem, addr, rej.reason.status()) => 1,
                    _ => 0,
                };
                let op = rej.req_type.and_then(OpKind::from_virtio);
                self.done.lock().push(Done {
                    head,
                    len,
                    end: End::Other(Outcome::Rejected {
                        op,
                        reason: rej.reason,
                    }),
                });
            }
        }
    }

    /// Turns the queue's available chains into tasks.
    pub fn pop_requests(
        &mut self,
        vring: &Vring,
        memory: &GuestMemoryAtomic<GuestMemory>,
        ctx: &Arc<Ctx>,
    ) {
        loop {
            if ctx.stopping.load(Ordering::SeqCst) {
                return;
            }
            let _ = vring.disable_notification();
            {
                let mut st = vring.get_mut();
                let q = st.get_queue_mut();
                // A frontend that adds a memory region (ADD_MEM_REG, acknowledged) before
                // publishing requests that use it must find it here: so the snapshot is taken
                // after reading the available index, and only chains up to that index are
                // taken with it (later ones wait for the next round and a newer snapshot).
                let Some(avail) =
                    ring_ok(&ctx.log, q.avail_idx(&*memory.memory(), Ordering::Acquire))
                else {
                    return;
                };
                let ready = avail.0.wrapping_sub(q.next_avail()) as usize;
                let mem = memory.memory().into_inner();
                let Some(iter) = ring_ok(&ctx.log, q.iter(mem.clone())) else {
                    return;
                };
                let now = Instant::now();
                for chain in iter.take(ready) {
                    let head = chain.head_index();
                    self.take(head, chain, &mem, ctx, now);
                }
            }
            // With EVENT_IDX this re-arms the kick at the current position; true means the guest
            // added more in the meantime, so go round again rather than miss them.
            if !vring.enable_notification().unwrap_or(false) {
                return;
            }
        }
    }

    fn spawn(
        &mut self,
        head: u16,
        req: Request,
        mem: Arc<GuestMemory>,
        ctx: Arc<Ctx>,
        taken: Instant,
    ) {
        let io = self.io.clone();
        let done = self.done.clone();
        // Without limits this is the whole cost: one relaxed load and a branch.
        let gate = if ctx.throttle.is_enabled() {
            throttle_cost(&req.op).map(|c| (c, self.alarm.clone(), self.release.clone()))
        } else {
            None
        };
        self.exec.spawn(async move {
            let (op, bytes) = kind_and_bytes(&req.op);
            if let Some(((dir, cost), alarm, release)) = gate {
                ctx.throttle.admit(dir, cost, &*alarm, &release).await;
            }
            let status = execute(&ctx, &io, &mem, &req.op).await;
            let len = if status == STATUS_OK {
                req.written_len()
            } else {
                1
            };
            // The status address was checked at parse time against this same memory snapshot.
            let len = if write_status(&mem, req.status, status) {
                len
            } else {
                0
            };
            done.lock().push(Done {
                head,
                len,
                end: End::Task {
                    op,
                    bytes,
                    ok: status == STATUS_OK,
                    taken,
                },
            });
            // Copy-on-read work runs after the guest has its answer.
            if matches!(req.op, Op::Read { .. }) {
                ctx.disk.run_deferred(&io).await;
            }
        });
    }

    /// The alarm went off: the first throttled request of each direction checks its wait.
    pub fn alarm_fired(&self, ctx: &Ctx) {
        self.alarm.fired();
        // Our own tasks woken here need no kick: the `turn` that follows runs them.
        CURRENT.with(|c| c.set(self.id));
        ctx.throttle.wake_first();
        CURRENT.with(|c| c.set(0));
    }

    /// Drains the ring's completions. The wake-ups it causes need no kick of our own eventfd:
    /// the `turn` that follows runs the woken tasks. (Kicking here cost a write system call and
    /// a spurious event-loop round per completion.)
    pub fn reap(&self) {
        CURRENT.with(|c| c.set(self.id));
        self.io.reap();
        CURRENT.with(|c| c.set(0));
    }

    /// Runs tasks and submits their I/O until nothing is ready, then publishes what finished and
    /// signals the guest once if it asked to be told.
    pub fn turn(&mut self, vring: &Vring, ctx: &Ctx) {
        CURRENT.with(|c| c.set(self.id));
        loop {
            self.exec.run_ready();
            if let Err(e) = self.io.submit() {
                log_once(
                    &ctx.log.submit,
                    &format_args!("io_uring submit failed: {e}"),
                );
            }
            if !self.exec.has_ready() {
                break;
            }
        }
        CURRENT.with(|c| c.set(0));
        let done = std::mem::take(&mut *self.done.lock());
        if done.is_empty() {
            return;
        }
        // One clock read per batch: every request in it reaches the used ring now.
        let now = Instant::now();
        let mut st = vring.get_mut();
        let n = done.len();
        for (i, Done { head, len, end }) in done.into_iter().enumerate() {
            self.stats.record(match end {
                End::Task {
                    op,
                    bytes,
                    ok,
                    taken,
                } => Outcome::Done {
                    op,
                    bytes,
                    ok,
                    latency: now.saturating_duration_since(taken),
                },
                End::Other(o) => o,
            });
            // One entry at a time, in the spec's order: the last head, the used entry and
            // index, then the head's flag and the region's used index. A crash anywhere in
            // between leaves the region telling the next server exactly what was published.
            if let Some(t) = &self.tracker {
                t.pre_put(head);
            }
            match st.add_used(head, len) {
                Ok(()) => {
                    if let Some(t) = &self.tracker {
                        t.post_put(head, st.get_queue().next_used());
                    }
                }
                Err(e) => log_once(
                    &ctx.log.used,
                    &format_args!("cannot add head {head} to the used ring: {e}"),
                ),
            }
            if (ctx.signal_each || i + 1 == n) && st.needs_notification().unwrap_or(true) {
                if let Err(e) = signal_guest(st.get_call()) {
                    log_once(
                        &ctx.log.signal,
                        &format_args!("cannot signal the guest: {e}"),
                    );
                }
            }
        }
    }
}

/// What a request counts against the throttle: reads and writes (write-zeroes as writes of
/// their length, as QEMU counts them); flush, discard and GET_ID are not throttled.
fn throttle_cost(op: &Op) -> Option<(Dir, u64)> {
    let len = |segs: &Segs| segs.iter().map(|s| s.len as u64).sum();
    match op {
        Op::Read { data, .. } => Some((Dir::Read, len(data))),
        Op::Write { data, .. } => Some((Dir::Write, len(data))),
        Op::WriteZeroes { ranges } => Some((Dir::Write, ranges.iter().map(|r| r.len).sum())),
        Op::Flush | Op::GetId { .. } | Op::Discard { .. } => None,
    }
}

/// The value of an available-ring access, or None (logged once, unless the queue is simply not
/// ready) when the ring cannot be read: the queue then waits for the next kick.
fn ring_ok<T>(log: &ConnLog, r: Result<T, virtio_queue::Error>) -> Option<T> {
    match r {
        Ok(v) => Some(v),
        Err(virtio_queue::Error::QueueNotReady) => None,
        Err(e) => {
            log_once(
                &log.avail,
                &format_args!("cannot read the available ring: {e}"),
            );
            None
        }
    }
}

/// Signals the used ring, unless the call eventfd cannot take one more count without blocking:
/// a frontend can preload its counter to the maximum, and a blocking write would stall this
/// queue's thread, and with it the end of the connection, for good.
fn signal_guest(call: &Option<EventNotifier>) -> std::io::Result<()> {
    let Some(call) = call else {
        return Ok(());
    };
    let mut p = libc::pollfd {
        fd: call.as_raw_fd(),
        events: libc::POLLOUT,
        revents: 0,
    };
    // SAFETY: one valid pollfd for the duration of the call; a zero timeout never blocks.
    if unsafe { libc::poll(&mut p, 1, 0) } != 1 {
        return Err(std::io::Error::new(
            std::io::ErrorKind::WouldBlock,
            "the call eventfd is full",
        ));
    }
    call.notify()
}

/// Writes the status byte; false if it is no longer inside guest memory.
fn write_status(mem: &GuestMemory, addr: GuestAddress, status: u8) -> bool {
    mem.write_obj(status, addr).is_ok()
}

/// The statistics' kind of a request and the bytes it moves (ranges for discard and
/// write-zeroes).
fn kind_and_bytes(op: &Op) -> (OpKind, u64) {
    let data = |d: &Segs| d.iter().map(|s| s.len as u64).sum::<u64>();
    let ranges = |r: &[request::Range]| r.iter().map(|g| g.len).sum::<u64>();
    match op {
        Op::Read { data: d, .. } => (OpKind::Read, data(d)),
        Op::Write { data: d, .. } => (OpKind::Write, data(d)),
        Op::Flush => (OpKind::Flush, 0),
        Op::GetId { data: d } => (OpKind::GetId, data(d)),
        Op::Discard { ranges: r } => (OpKind::Discard, ranges(r)),
        Op::WriteZeroes { ranges: r } => (OpKind::WriteZeroes, ranges(r)),
    }
}

/// Runs one request against the disk; returns the virtio status.
async fn execute(ctx: &Ctx, io: &UringIo, mem: &Arc<GuestMemory>, op: &Op) -> u8 {
    let disk = &*ctx.disk;
    let r = match op {
        Op::Read { offset, data } => match guest_buf(data, mem) {
            Some(buf) => disk.read(io, *offset, buf).await,
            None => Ok(()),
        },
        Op::Write { offset, data } => match guest_buf(data, mem) {
            Some(buf) => match disk.write(io, *offset, buf).await {
                Ok(()) if ctx.write_through.load(Ordering::Relaxed) => disk.flush(io).await,
                r => r,
            },
            None => Ok(()),
        },
        Op::Flush => disk.flush(io).await,
        Op::GetId { data } => {
            if let Some(buf) = guest_buf(data, mem) {
                buf.copy_from_slice(0, &ctx.serial[..buf.len()]);
            }
            Ok(())
        }
        Op::Discard { ranges } => {
            let mut r = Ok(());
            for g in ranges.iter().filter(|g| g.len > 0) {
                r = disk.discard(io, g.offset, g.len).await;
                if r.is_err() {
                    break;
                }
            }
            r
        }
        Op::WriteZeroes { ranges } => {
            let mut r = Ok(());
            for g in ranges.iter().filter(|g| g.len > 0) {
                r = disk.write_zeroes(io, g.offset, g.len, g.unmap).await;
                if r.is_err() {
                    break;
                }
            }
            r
        }
    };
    match r {
        Ok(()) => STATUS_OK,
        Err(e) => {
            log_io_error(&ctx.log.io_errors, &e);
            // QEMU's operation names: a flush or discard fails as a write.
            let operation = if matches!(op, Op::Read { .. }) {
                "read"
            } else {
                "write"
            };
            let errno = e.errno();
            ctx.events.io_error(
                super::qmp::DEVICE_NAME,
                operation,
                errno == libc::ENOSPC,
                &std::io::Error::from_raw_os_error(errno).to_string(),
            );
            STATUS_IOERR
        }
    }
}

/// A `Buf` over guest memory, or None for an empty transfer.
fn guest_buf(segs: &Segs, mem: &Arc<GuestMemory>) -> Option<Buf> {
    if segs.is_empty() {
        return None;
    }
    // SAFETY: `parse` built every segment from this memory snapshot's own mappings, inside the
    // request's descriptors; the snapshot `Arc` becomes the buffer's owner, so the mappings stay
    // in place until every clone of the buffer (held by the I/O until completion) is gone.
    Some(unsafe { Buf::from_segments(segs.iter().copied(), mem.clone()) })
}

fn log_once(flag: &AtomicBool, msg: &std::fmt::Arguments<'_>) {
    if !flag.swap(true, Ordering::Relaxed) {
        tracing::warn!("{msg} (further ones are not logged)");
    } else {
        tracing::trace!("{msg}");
    }
}

/// Disk errors reach the guest as IOERR; the first few of a connection are logged, then one in
/// 10000.
fn log_io_error(count: &AtomicU64, e: &crate::engine::EngineError) {
    let n = count.fetch_add(1, Ordering::Relaxed);
    if n < 10 || n % 10_000 == 0 {
        tracing::warn!(
            "I/O error reported to the guest (errno {}): {e} [{} so far]",
            e.errno(),
            n + 1
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::io::host_file::OpenMode;
    use crate::io::{HostFile, Io};
    use crate::units::PhysOffset;

    fn readable(fd: i32, timeout_ms: i32) -> bool {
        let mut p = libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd for the duration of the call.
        unsafe { libc::poll(&mut p, 1, timeout_ms) == 1 }
    }

    /// Reaping on the worker's own thread wakes the finished task without writing the ring's
    /// eventfd: the eventfd is quiet afterwards, so the loop does not go round for nothing.
    #[test]
    fn reaping_on_the_own_thread_does_not_kick_the_eventfd() {
        let dir = tempfile::tempdir().unwrap();
        let file = HostFile::open_with(&dir.path().join("f"), OpenMode::Create, false).unwrap();
        file.ensure_len(4096).unwrap();
        let mut w = Worker::new(8, Default::default()).unwrap();
        let finished = Arc::new(AtomicBool::new(false));
        let (io, f, fin) = (w.io.clone(), file.clone(), finished.clone());
        w.exec.spawn(async move {
            io.read(&f, PhysOffset(0), Buf::alloc(4096)).await.unwrap();
            fin.store(true, Ordering::SeqCst);
        });
        w.exec.run_ready();
        w.io.submit().unwrap();
        assert!(readable(w.io.eventfd(), 5000), "no completion");
        w.reap();
        assert!(
            !readable(w.io.eventfd(), 0),
            "the wake-up kicked the worker's own eventfd"
        );
        assert!(!finished.load(Ordering::SeqCst));
        w.exec.run_ready();
        assert!(finished.load(Ordering::SeqCst));
        // A wake-up from another thread must still end the worker's sleep.
        let (io, f) = (w.io.clone(), file.clone());
        w.exec.spawn(async move {
            io.read(&f, PhysOffset(0), Buf::alloc(4096)).await.unwrap();
        });
        w.exec.run_ready();
        w.io.submit().unwrap();
        assert!(readable(w.io.eventfd(), 5000));
        let io = w.io.clone();
        std::thread::spawn(move || io.reap()).join().unwrap();
        assert!(
            readable(w.io.eventfd(), 0),
            "a reap on another thread must kick"
        );
    }
}
