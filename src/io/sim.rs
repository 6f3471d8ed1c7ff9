//! A deterministic simulated disk implementing [`Io`], in the spirit of FVD's `blksim`.
//!
//! A [`SimWorld`] owns simulated disks and one list of pending operations. An operation is
//! submitted when its future is first polled and does NOT complete then: it waits in the list
//! until [`SimWorld::complete_one`] picks it (uniformly at random from the world's seeded RNG),
//! applies its effect at that moment and wakes its task. A test's driver loop alternates
//! `executor.run_ready()` and `world.complete_one()`, so every interleaving is reproducible from
//! one seed.
//!
//! Semantics, modelled on O_DIRECT on a regular file or block device with a volatile cache:
//! * Reads see the disk's current (volatile) contents at completion; past the end they read zeros.
//! * Writes apply at completion. Past the end they extend the disk, unless it was created with
//!   [`SimWorld::create_block_device`] (fixed size, ENOSPC).
//! * Offsets, lengths and segment lengths must be multiples of [`IoFile::alignment`], memory
//!   addresses of [`IoFile::mem_alignment`]; otherwise the op fails with EINVAL at submission,
//!   which catches engine bugs a page-cache-backed test would hide.
//! * A flush covers the writes that completed before it was submitted; they are durable once it
//!   completes. [`SimWorld::power_loss`] decides per unflushed write whether it reached the media
//!   (whole, not at all, or torn per 512-byte sector); each sector keeps its newest version that
//!   did, else its durable content, so any of {durable, each unflushed version} may survive
//!   (torn and reordered writes). Unflushed file growth may be lost.
//! * Injected errors ([`SimConfig`]) fail ops with EIO: a failed read scribbles on its buffer, a
//!   failed write or punch applies none, all or a random subset of its sectors, a failed flush
//!   makes a random subset of what it covered durable.
//!
//! Power loss: every pending op is dropped without its effect; its future resolves to EIO and its
//! task is woken (so a task still alive fails instead of hanging). Every [`SimIo`] obtained before
//! the power loss belongs to the dead "process": its later ops fail with EIO, so stray tasks
//! cannot write to the surviving disk. Use a fresh [`SimWorld::io`] to reopen the image.

mod disk;
#[cfg(test)]
mod tests;

use super::{executor::Executor, Buf, Growth, Io, IoFile};
use crate::units::PhysOffset;
use disk::Disk;
use parking_lot::Mutex;
use rand::rngs::SmallRng;
use rand::{Rng, RngCore, SeedableRng};
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};

/// Error-injection probabilities, each in [0, 1].
#[derive(Clone, Debug, Default)]
pub struct SimConfig {
    pub read_error_prob: f64,
    /// Also used for punch_hole.
    pub write_error_prob: f64,
    pub flush_error_prob: f64,
    /// punch_hole fails with EOPNOTSUPP (storage that cannot zero or free ranges).
    pub no_punch: bool,
}

/// Operation counts of a world (completed ops, including failed ones).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SimCounters {
    pub reads: u64,
    pub writes: u64,
    pub flushes: u64,
    pub punches: u64,
    pub injected_errors: u64,
    pub power_losses: u64,
}

/// A set of simulated disks sharing one pending-op list and one seed.
pub struct SimWorld {
    state: Mutex<State>,
}

struct State {
    cfg: SimConfig,
    /// Picks which pending op completes next.
    sched: SmallRng,
    /// Error injection and torn writes.
    faults: SmallRng,
    /// Power-loss survivor choice.
    crash: SmallRng,
    disks: Vec<Disk>,
    pending: Vec<PendingOp>,
    /// Completion sequence number of writes (flush cut-offs compare against it).
    write_seq: u64,
    /// Incremented by each power loss or process crash; ops from older `SimIo`s fail.
    epoch: u64,
    /// Incremented by each power loss (the host's boot: see [`IoFile::boot_id`]).
    boot: u64,
    counters: SimCounters,
    /// Pending punches are passed over by [`SimWorld::complete_one`] (see
    /// [`SimWorld::hold_punches`]).
    hold_punches: bool,
    /// The next write submitted at each of these offsets is held (see
    /// [`SimWorld::hold_next_write_at`]).
    hold_next_writes: Vec<u64>,
}

struct PendingOp {
    disk: usize,
    kind: OpKind,
    slot: Arc<Slot>,
    /// Passed over by [`SimWorld::complete_one`] (see [`SimWorld::hold_next_write_at`]).
    held: bool,
}

enum OpKind {
    Read { off: u64, buf: Buf },
    Write { off: u64, buf: Buf },
    Flush { cutoff: u64, size: u64 },
    Punch { off: u64, len: u64 },
}

/// Where a completion meets the waiting future.
#[derive(Default)]
struct Slot(Mutex<SlotState>);

#[derive(Default)]
struct SlotState {
    result: Option<io::Result<()>>,
    waker: Option<Waker>,
}

impl Slot {
    fn complete(&self, r: io::Result<()>) {
        let waker = {
            let mut s = self.0.lock();
            s.result = Some(r);
            s.waker.take()
        };
        if let Some(w) = waker {
            w.wake();
        }
    }
}

fn err(code: i32) -> io::Error {
    io::Error::from_raw_os_error(code)
}

impl SimWorld {
    /// A world whose every random choice derives from `seed`.
    pub fn new(seed: u64, cfg: SimConfig) -> Arc<SimWorld> {
        let mut root = SmallRng::seed_from_u64(seed);
        let state = State {
            cfg,
            sched: SmallRng::seed_from_u64(root.next_u64()),
            faults: SmallRng::seed_from_u64(root.next_u64()),
            crash: SmallRng::seed_from_u64(root.next_u64()),
            disks: Vec::new(),
            pending: Vec::new(),
            write_seq: 0,
            epoch: 0,
            boot: 1,
            counters: SimCounters::default(),
            hold_punches: false,
            hold_next_writes: Vec::new(),
        };
        Arc::new(SimWorld {
            state: Mutex::new(state),
        })
    }

    fn add_disk(self: &Arc<Self>, disk: Disk) -> SimFile {
        let mut st = self.state.lock();
        st.disks.push(disk);
        SimFile {
            world: self.clone(),
            disk: st.disks.len() - 1,
            read_only: false,
        }
    }

    /// A regular file of `size` bytes that grows when written past its end. `alignment` (a
    /// power of two, 1 = no O_DIRECT) applies to offsets, lengths and memory.
    pub fn create_disk(self: &Arc<Self>, size: u64, alignment: u32) -> SimFile {
        assert!(alignment.is_power_of_two(), "alignment {alignment}");
        self.add_disk(Disk::new(size, alignment, false))
    }

    /// A block device of fixed `size` with 512-byte logical blocks.
    pub fn create_block_device(self: &Arc<Self>, size: u64) -> SimFile {
        self.add_disk(Disk::new(size, 512, true))
    }

    /// An I/O channel; all channels of a world share its pending list.
    pub fn io(self: &Arc<Self>) -> SimIo {
        SimIo {
            world: self.clone(),
            epoch: self.state.lock().epoch,
        }
    }

    /// Number of submitted, not yet completed ops.
    pub fn pending(&self) -> usize {
        self.state.lock().pending.len()
    }

    /// Number of submitted, not yet completed flushes (tests aim power losses at these windows).
    pub fn pending_flushes(&self) -> usize {
        let st = self.state.lock();
        st.pending
            .iter()
            .filter(|op| matches!(op.kind, OpKind::Flush { .. }))
            .count()
    }

    pub fn counters(&self) -> SimCounters {
        self.state.lock().counters.clone()
    }

    /// Replaces the error-injection probabilities (e.g. to stop injecting before a final check).
    pub fn set_config(&self, cfg: SimConfig) {
        self.state.lock().cfg = cfg;
    }

    /// Completes one randomly chosen pending op. Returns false if none was pending (or only
    /// held ops were).
    pub fn complete_one(&self) -> bool {
        let (slot, result) = {
            let mut st = self.state.lock();
            // Without holds the choice (and so every seed's schedule) is as it always was.
            let holds = st.hold_punches || st.pending.iter().any(|op| op.held);
            let i = if holds {
                let open: Vec<usize> = (0..st.pending.len())
                    .filter(|&i| {
                        let op = &st.pending[i];
                        let held_punch = st.hold_punches && matches!(op.kind, OpKind::Punch { .. });
                        !op.held && !held_punch
                    })
                    .collect();
                if open.is_empty() {
                    return false;
                }
                open[st.sched.gen_range(0..open.len())]
            } else {
                if st.pending.is_empty() {
                    return false;
                }
                let n = st.pending.len();
                st.sched.gen_range(0..n)
            };
            let op = st.pending.swap_remove(i);
            let r = st.apply(op.disk, op.kind);
            (op.slot, r)
        };
        slot.complete(result);
        true
    }

    /// While `hold` is set, pending punches do not complete: [`SimWorld::complete_one`] and
    /// [`SimWorld::run`] pass them over (a test keeps a DISCARD's punch in flight while other
    /// requests run). A power loss or process crash still drops them.
    pub fn hold_punches(&self, hold: bool) {
        self.state.lock().hold_punches = hold;
    }

    /// Keeps the next write submitted at `off` in flight: [`SimWorld::complete_one`] and
    /// [`SimWorld::run`] pass it over until [`SimWorld::release_writes`] (a test pauses one
    /// request at its data write while others run). [`SimWorld::complete_write_at`], a power
    /// loss or a process crash still complete it; later writes at `off` are not held (unless
    /// asked again).
    pub fn hold_next_write_at(&self, off: u64) {
        self.state.lock().hold_next_writes.push(off);
    }

    /// Lets every write held by [`SimWorld::hold_next_write_at`] complete (and cancels a hold
    /// not used yet).
    pub fn release_writes(&self) {
        let mut st = self.state.lock();
        st.hold_next_writes.clear();
        for op in &mut st.pending {
            op.held = false;
        }
    }

    /// Offsets and lengths of the pending writes, in no particular order (for tests that need
    /// one exact interleaving, with [`SimWorld::complete_write_at`]).
    pub fn pending_writes(&self) -> Vec<(u64, u64)> {
        let st = self.state.lock();
        st.pending
            .iter()
            .filter_map(|op| match &op.kind {
                OpKind::Write { off, buf } => Some((*off, buf.len() as u64)),
                _ => None,
            })
            .collect()
    }

    /// Completes the pending write at `off`: normally, or with `fail` as a failed write that
    /// reached the disk not at all. Returns false if no write at `off` was pending.
    pub fn complete_write_at(&self, off: u64, fail: bool) -> bool {
        let (slot, result) = {
            let mut st = self.state.lock();
            let Some(i) = st
                .pending
                .iter()
                .position(|op| matches!(op.kind, OpKind::Write { off: o, .. } if o == off))
            else {
                return false;
            };
            let op = st.pending.swap_remove(i);
            let r = if fail {
                st.counters.writes += 1;
                st.counters.injected_errors += 1;
                st.write_seq += 1;
                Err(err(libc::EIO))
            } else {
                st.apply(op.disk, op.kind)
            };
            (op.slot, r)
        };
        slot.complete(result);
        true
    }

    /// Drops every pending op (their futures fail with EIO), makes each disk keep a random
    /// mix of durable and unflushed contents, and retires every existing [`SimIo`].
    pub fn power_loss(&self) {
        let slots: Vec<Arc<Slot>> = {
            let mut st = self.state.lock();
            let st = &mut *st;
            st.epoch += 1;
            st.boot += 1;
            st.counters.power_losses += 1;
            for d in &mut st.disks {
                d.power_loss(&mut st.crash);
            }
            st.pending.drain(..).map(|op| op.slot).collect()
        };
        for s in slots {
            s.complete(Err(err(libc::EIO)));
        }
    }

    /// A crash of the process while the host stays up: every completed write stays (flushed or
    /// not), each pending write lands whole or not at all, and every pending op's future fails
    /// with EIO; every existing [`SimIo`] is retired.
    pub fn process_crash(&self) {
        let slots: Vec<Arc<Slot>> = {
            let mut st = self.state.lock();
            let st = &mut *st;
            st.epoch += 1;
            let ops: Vec<PendingOp> = st.pending.drain(..).collect();
            let mut slots = Vec::with_capacity(ops.len());
            for op in ops {
                let data = match &op.kind {
                    OpKind::Write { off, buf } => Some((*off, buf.to_vec())),
                    OpKind::Punch { off, len } => {
                        let len = (*len).min(st.disks[op.disk].size.saturating_sub(*off));
                        Some((*off, vec![0u8; len as usize]))
                    }
                    _ => None,
                };
                if let Some((off, data)) = data {
                    if st.crash.gen_bool(0.5) {
                        st.write_seq += 1;
                        st.disks[op.disk].write(off, &data, st.write_seq, None);
                    }
                }
                slots.push(op.slot);
            }
            slots
        };
        for s in slots {
            s.complete(Err(err(libc::EIO)));
        }
    }

    /// Alternates `ex.run_ready()` and [`SimWorld::complete_one`] until no task is ready and no
    /// op is pending (but held punches and writes). Returns the number of ops completed.
    pub fn run(&self, ex: &mut Executor) -> usize {
        let mut completed = 0;
        loop {
            ex.run_ready();
            if !self.complete_one() {
                if !ex.has_ready() {
                    return completed;
                }
            } else {
                completed += 1;
            }
        }
    }

    /// Runs `fut` to completion on a fresh executor driven by this world.
    ///
    /// # Panics
    /// If the future is still pending once no op is pending and no task is ready (a deadlock).
    pub fn block_on<T: Send + 'static>(&self, fut: impl Future<Output = T> + Send + 'static) -> T {
        let out = Arc::new(Mutex::new(None));
        let out2 = out.clone();
        let mut ex = Executor::default();
        ex.spawn(async move {
            *out2.lock() = Some(fut.await);
        });
        self.run(&mut ex);
        let v = out.lock().take();
        v.expect("simulated future stalled: no pending I/O and no ready task")
    }
}

impl State {
    fn apply(&mut self, disk: usize, kind: OpKind) -> io::Result<()> {
        let cfg = self.cfg.clone();
        let fail = |rng: &mut SmallRng, p: f64| p > 0.0 && rng.gen_bool(p.min(1.0));
        match kind {
            OpKind::Read { off, buf } => {
                self.counters.reads += 1;
                if fail(&mut self.faults, cfg.read_error_prob) {
                    self.counters.injected_errors += 1;
                    let junk: Vec<u8> = (0..buf.len()).map(|_| self.faults.gen()).collect();
                    buf.copy_from_slice(0, &junk);
                    return Err(err(libc::EIO));
                }
                let mut v = vec![0u8; buf.len()];
                self.disks[disk].read(off, &mut v);
                buf.copy_from_slice(0, &v);
                Ok(())
            }
            OpKind::Write { off, buf } => {
                self.counters.writes += 1;
                let v = buf.to_vec();
                self.write_seq += 1;
                let failed = fail(&mut self.faults, cfg.write_error_prob);
                self.write_or_tear(disk, off, &v, failed)
            }
            OpKind::Punch { off, len } => {
                self.counters.punches += 1;
                let len = len.min(self.disks[disk].size.saturating_sub(off));
                self.write_seq += 1;
                let zeros = vec![0u8; len as usize];
                let failed = fail(&mut self.faults, cfg.write_error_prob);
                self.write_or_tear(disk, off, &zeros, failed)
            }
            OpKind::Flush { cutoff, size } => {
                self.counters.flushes += 1;
                if fail(&mut self.faults, cfg.flush_error_prob) {
                    self.counters.injected_errors += 1;
                    self.disks[disk].flush(cutoff, size, Some(&mut self.faults));
                    return Err(err(libc::EIO));
                }
                self.disks[disk].flush(cutoff, size, None);
                Ok(())
            }
        }
    }

    fn write_or_tear(
        &mut self,
        disk: usize,
        off: u64,
        data: &[u8],
        failed: bool,
    ) -> io::Result<()> {
        let seq = self.write_seq;
        if failed {
            // A failed write may have reached the disk not at all, entirely, or in part.
            self.counters.injected_errors += 1;
            match self.faults.gen_range(0..3) {
                0 => {}
                1 => self.disks[disk].write(off, data, seq, None),
                _ => self.disks[disk].write(off, data, seq, Some(&mut self.faults)),
            }
            return Err(err(libc::EIO));
        }
        self.disks[disk].write(off, data, seq, None);
        Ok(())
    }

    /// Validates an op and queues it.
    fn submit(
        &mut self,
        epoch: u64,
        disk: usize,
        read_only: bool,
        kind: OpKind,
    ) -> io::Result<Arc<Slot>> {
        if epoch != self.epoch {
            return Err(err(libc::EIO));
        }
        let d = &self.disks[disk];
        let align = d.align as u64;
        let aligned = |off: u64, len: u64| off % align == 0 && len % align == 0;
        let buf_ok = |buf: &Buf| {
            buf.segments()
                .iter()
                .all(|s| s.addr as u64 % align == 0 && s.len as u64 % align == 0)
        };
        let kind = match kind {
            OpKind::Read { off, buf } => {
                if !aligned(off, buf.len() as u64) || !buf_ok(&buf) {
                    return Err(err(libc::EINVAL));
                }
                OpKind::Read { off, buf }
            }
            OpKind::Write { off, buf } => {
                if read_only {
                    return Err(err(libc::EBADF));
                }
                if !aligned(off, buf.len() as u64) || !buf_ok(&buf) {
                    return Err(err(libc::EINVAL));
                }
                if d.fixed_size && off + buf.len() as u64 > d.size {
                    return Err(err(libc::ENOSPC));
                }
                OpKind::Write { off, buf }
            }
            OpKind::Punch { off, len } => {
                if read_only {
                    return Err(err(libc::EBADF));
                }
                if self.cfg.no_punch {
                    return Err(err(libc::EOPNOTSUPP));
                }
                if !aligned(off, len) {
                    return Err(err(libc::EINVAL));
                }
                OpKind::Punch { off, len }
            }
            // The cut-off is fixed now: writes completing after submission are not covered.
            OpKind::Flush { .. } => OpKind::Flush {
                cutoff: self.write_seq + 1,
                size: d.size,
            },
        };
        let hold = match kind {
            OpKind::Write { off, .. } => self.hold_next_writes.iter().position(|&o| o == off),
            _ => None,
        };
        let held = hold.map(|i| self.hold_next_writes.swap_remove(i)).is_some();
        let slot = Arc::new(Slot::default());
        self.pending.push(PendingOp {
            disk,
            kind,
            slot: slot.clone(),
            held,
        });
        Ok(slot)
    }
}

/// A simulated disk. Cheap to clone; clones share the disk.
#[derive(Clone)]
pub struct SimFile {
    world: Arc<SimWorld>,
    disk: usize,
    read_only: bool,
}

impl std::fmt::Debug for SimFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SimFile")
            .field("disk", &self.disk)
            .field("read_only", &self.read_only)
            .finish()
    }
}

impl SimFile {
    /// A read-only handle to the same disk (for base images): writes fail with EBADF.
    pub fn read_only(&self) -> SimFile {
        SimFile {
            read_only: true,
            ..self.clone()
        }
    }

    /// Grows the disk to `new_size` bytes (ftruncate); never shrinks.
    pub fn grow(&self, new_size: u64) {
        let mut st = self.world.state.lock();
        let d = &mut st.disks[self.disk];
        d.size = d.size.max(new_size);
    }

    /// Test setup: writes `data` at `off` immediately and durably, bypassing the pending list.
    pub fn write_now(&self, off: u64, data: &[u8]) {
        self.world.state.lock().disks[self.disk].write_durable(off, data);
    }

    /// Inspection: the current (volatile) contents of `[off, off + len)`.
    pub fn read_now(&self, off: u64, len: usize) -> Vec<u8> {
        let mut v = vec![0u8; len];
        self.world.state.lock().disks[self.disk].read(off, &mut v);
        v
    }

    /// Number of 512-byte sectors holding unflushed writes.
    pub fn dirty_sectors(&self) -> usize {
        self.world.state.lock().disks[self.disk].dirty_sectors()
    }

    pub fn world(&self) -> &Arc<SimWorld> {
        &self.world
    }
}

impl IoFile for SimFile {
    fn grow(&self, len: u64, _how: Growth) -> io::Result<()> {
        self.world.state.lock().disks[self.disk].grow(len);
        Ok(())
    }
    fn size(&self) -> io::Result<u64> {
        Ok(self.world.state.lock().disks[self.disk].size)
    }
    fn alignment(&self) -> u32 {
        self.world.state.lock().disks[self.disk].align
    }
    fn mem_alignment(&self) -> u32 {
        self.alignment()
    }
    fn is_block_device(&self) -> bool {
        self.world.state.lock().disks[self.disk].fixed_size
    }
    fn is_read_only(&self) -> bool {
        self.read_only
    }
    fn boot_id(&self) -> Option<[u8; 16]> {
        let boot = self.world.state.lock().boot;
        let mut id = [0x5a; 16];
        id[..8].copy_from_slice(&boot.to_le_bytes());
        Some(id)
    }
}

/// An I/O channel of a [`SimWorld`].
#[derive(Clone)]
pub struct SimIo {
    world: Arc<SimWorld>,
    epoch: u64,
}

impl SimIo {
    pub fn world(&self) -> &Arc<SimWorld> {
        &self.world
    }

    fn op(&self, file: &SimFile, kind: OpKind) -> SimOp {
        assert!(
            Arc::ptr_eq(&self.world, &file.world),
            "SimFile used with another world's SimIo"
        );
        SimOp {
            io: self.clone(),
            disk: file.disk,
            read_only: file.read_only,
            req: Some(kind),
            slot: None,
        }
    }
}

impl Io for SimIo {
    type File = SimFile;

    fn read(
        &self,
        file: &SimFile,
        off: PhysOffset,
        buf: Buf,
    ) -> impl Future<Output = io::Result<()>> + Send {
        self.op(file, OpKind::Read { off: off.0, buf })
    }

    fn write(
        &self,
        file: &SimFile,
        off: PhysOffset,
        buf: Buf,
    ) -> impl Future<Output = io::Result<()>> + Send {
        self.op(file, OpKind::Write { off: off.0, buf })
    }

    fn flush(&self, file: &SimFile) -> impl Future<Output = io::Result<()>> + Send {
        self.op(file, OpKind::Flush { cutoff: 0, size: 0 })
    }

    fn punch_hole(
        &self,
        file: &SimFile,
        off: PhysOffset,
        len: u64,
    ) -> impl Future<Output = io::Result<()>> + Send {
        self.op(file, OpKind::Punch { off: off.0, len })
    }
}

/// One simulated op: submitted on first poll, resolved by [`SimWorld::complete_one`].
struct SimOp {
    io: SimIo,
    disk: usize,
    read_only: bool,
    req: Option<OpKind>,
    slot: Option<Arc<Slot>>,
}

impl Future for SimOp {
    type Output = io::Result<()>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if let Some(kind) = this.req.take() {
            let r =
                this.io
                    .world
                    .state
                    .lock()
                    .submit(this.io.epoch, this.disk, this.read_only, kind);
            match r {
                Ok(slot) => this.slot = Some(slot),
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
        let Some(slot) = &this.slot else {
            return Poll::Ready(Err(err(libc::EINVAL))); // polled again after completion
        };
        let mut s = slot.0.lock();
        if let Some(r) = s.result.take() {
            drop(s);
            this.slot = None;
            return Poll::Ready(r);
        }
        s.waker = Some(cx.waker().clone());
        Poll::Pending
    }
}
