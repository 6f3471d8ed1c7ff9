//! io_uring backend: one ring per server worker thread, completions signalled through an eventfd.
//!
//! The worker's event loop does, each turn: run ready tasks (each submits its SQE on first
//! poll), [`UringIo::submit`] (whatever had to wait for room), wait for the eventfd,
//! [`UringIo::reap`] (drain CQEs, wake the tasks). [`UringIo::kick`] makes the eventfd readable
//! so a wake-up from another thread also ends the wait.
//!
//! # Buffer safety
//!
//! Each operation lives in a heap-allocated slot from the moment its SQE is built until its CQE
//! is seen (the slot's box stays put and is reused for later operations; it is freed only with
//! the ring). The slot owns the [`Buf`] (whose owner keeps the memory mapped), the iovec array the
//! SQE points to, and a clone of the [`HostFile`] (so the fd number cannot be closed and reused).
//! Nothing in the slot is moved or freed while the kernel may use it:
//! * A future dropped before completion only marks its slot orphaned; [`UringIo::reap`] releases
//!   the slot when the CQE arrives.
//! * Only the future (after taking the result) or reap (for an orphan) releases a slot, so a slot
//!   index is never reused while another party still refers to it.
//! * Dropping the last handle (the `UringIo` and every future share one `Arc`) waits for every
//!   SQE handed to the kernel to complete before the ring and the slots are freed; should that
//!   wait fail, the slots are leaked rather than freed under the kernel.
//!
//! A short transfer is resubmitted for the remainder from `reap`; a short read at end of a
//! regular file zero-fills the rest, as [`super::sync`] does.

use super::{Buf, HostFile, Io, IoFile};
use crate::units::PhysOffset;
use io_uring::{cqueue, opcode, squeue, types, IoUring};
use parking_lot::Mutex;
use smallvec::SmallVec;
use std::collections::VecDeque;
use std::future::Future;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};

/// Largest transfer per SQE: the kernel caps a single read/write near 2 GiB anyway; a power of
/// two keeps the split O_DIRECT-aligned.
const MAX_SQE_LEN: usize = 1 << 30;

/// Per-thread io_uring I/O channel.
pub struct UringIo {
    shared: Arc<Shared>,
}

struct Shared {
    state: Mutex<State>,
    eventfd: OwnedFd,
}

struct State {
    ring: IoUring,
    /// Slot `i` holds operation `i`. A slot's box is kept for the next operation after this one
    /// finishes (an allocation per operation showed in the server's profile), and freed only
    /// with the ring. The box keeps an operation's address fixed while the vector grows: the
    /// kernel holds pointers into it (the iovec array).
    #[allow(clippy::vec_box)]
    slots: Vec<Box<Option<Pending>>>,
    free: Vec<usize>,
    busy: usize,
    /// SQEs waiting for room in the submission queue (or under the completion-queue cap).
    overflow: VecDeque<squeue::Entry>,
    /// SQEs pushed to the submission queue whose CQE has not been reaped yet.
    in_kernel: usize,
    /// Bound on `in_kernel` so completions can never overflow the completion queue.
    kernel_cap: usize,
    cqes: Vec<(u64, i32)>,
}

enum Kind {
    Read(Buf),
    Write(Buf),
    Flush,
    Punch(u64),
}

/// One operation owned by the ring from its first SQE to its last CQE.
struct Pending {
    kind: Kind,
    file: HostFile,
    off: u64,
    /// Bytes transferred so far (reads and writes).
    done: usize,
    iov: IoVecs,
    waker: Option<Waker>,
    result: Option<io::Result<()>>,
    /// The future went away; free the slot when the CQE arrives.
    orphaned: bool,
}

/// The iovec array an SQE points to.
struct IoVecs(SmallVec<[libc::iovec; 4]>);

// SAFETY: the iovecs only describe memory owned by the `Buf` in the same `Pending`; the pointers
// are never dereferenced by Rust code, only handed to the kernel.
unsafe impl Send for IoVecs {}
// SAFETY: as above; shared access only reads the plain pointer/length values.
unsafe impl Sync for IoVecs {}

/// Limits the ring to the operations fvd submits and no further registration, then enables it:
/// a thread that can enter the ring (seccomp does not see what the ring does) cannot use it to
/// open files, make connections or reach any other kernel interface io_uring offers.
fn restrict(ring: &IoUring) -> io::Result<()> {
    use io_uring::register::Restriction;
    let mut allowed = [
        Restriction::sqe_op(opcode::Read::CODE),
        Restriction::sqe_op(opcode::Readv::CODE),
        Restriction::sqe_op(opcode::Write::CODE),
        Restriction::sqe_op(opcode::Writev::CODE),
        Restriction::sqe_op(opcode::Fsync::CODE),
        Restriction::sqe_op(opcode::Fallocate::CODE),
    ];
    ring.submitter().register_restrictions(&mut allowed)?;
    ring.submitter().register_enable_rings()
}

impl UringIo {
    /// A ring with `entries` submission-queue entries and a fresh eventfd registered with it.
    pub fn new(entries: u32) -> io::Result<UringIo> {
        // COOP_TASKRUN: a completion that arrives while the submitting thread runs in user space
        // waits for its next system call instead of interrupting it with an IPI. Every thread
        // that submits here returns to the kernel promptly (epoll_wait, poll, io_uring_enter),
        // and a sleeping one is still woken. Where completions come from io-wq workers (tmpfs,
        // buffered files) that interrupt cost more than the I/O: 150k against 385k reads/s
        // (docs/PERFORMANCE.md, "Completion interrupts"). Kernels before 5.19 reject the flag;
        // they get a ring without it.
        //
        // R_DISABLED: the ring starts disabled so that it can be limited to fvd's operations
        // first (see `restrict`); kernels before 5.10 reject the flag and get an unrestricted
        // ring.
        let attempts = [
            IoUring::builder()
                .setup_coop_taskrun()
                .setup_r_disabled()
                .clone(),
            IoUring::builder().setup_r_disabled().clone(),
        ];
        let mut ring = None;
        for b in attempts {
            match b.build(entries) {
                Ok(r) => {
                    ring = Some(r);
                    break;
                }
                Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {}
                Err(e) => return Err(e),
            }
        }
        let disabled = ring.is_some();
        let ring = match ring {
            Some(r) => r,
            None => IoUring::new(entries)?,
        };
        // SAFETY: eventfd has no memory arguments; a non-negative result is a new fd we own.
        let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` was just returned by eventfd and is owned by nobody else.
        let eventfd = unsafe { OwnedFd::from_raw_fd(fd) };
        ring.submitter().register_eventfd(eventfd.as_raw_fd())?;
        if disabled {
            restrict(&ring)?;
        }
        let kernel_cap = ring.params().cq_entries() as usize;
        Ok(UringIo {
            shared: Arc::new(Shared {
                state: Mutex::new(State {
                    ring,
                    slots: Vec::new(),
                    free: Vec::new(),
                    busy: 0,
                    overflow: VecDeque::new(),
                    in_kernel: 0,
                    kernel_cap,
                    cqes: Vec::new(),
                }),
                eventfd,
            }),
        })
    }

    /// Readable whenever CQEs are waiting (or after [`UringIo::kick`]).
    pub fn eventfd(&self) -> RawFd {
        self.shared.eventfd.as_raw_fd()
    }

    /// Hands every queued SQE to the kernel (operations normally go at once, see
    /// [`State::submit`]; this catches what had to wait for room).
    pub fn submit(&self) -> io::Result<()> {
        match self.shared.state.lock().submit() {
            Ok(true) => Ok(()),
            Ok(false) => {
                // The kernel is short of resources; come back round the event loop and retry
                // rather than sleep on an eventfd that nothing may signal.
                self.kick();
                Ok(())
            }
            Err(e) => Err(e),
        }
    }

    /// Clears the eventfd, drains all CQEs and wakes the tasks whose operations finished.
    /// Returns the number of CQEs reaped.
    pub fn reap(&self) -> usize {
        let mut counter = 0u64;
        // SAFETY: reads 8 bytes into `counter`; the fd is non-blocking, so EAGAIN just means
        // nothing was signalled (ignored).
        let _ = unsafe { libc::read(self.eventfd(), (&mut counter as *mut u64).cast(), 8) };
        let mut wakers: SmallVec<[Waker; 16]> = SmallVec::new();
        let n = {
            let mut st = self.shared.state.lock();
            let mut cqes = std::mem::take(&mut st.cqes);
            cqes.extend(
                st.ring
                    .completion()
                    .map(|c: cqueue::Entry| (c.user_data(), c.result())),
            );
            for &(idx, res) in &cqes {
                if let Some(w) = st.complete(idx as usize, res) {
                    wakers.push(w);
                }
            }
            let n = cqes.len();
            cqes.clear();
            st.cqes = cqes;
            n
        };
        // Wake outside the lock: a waker may run arbitrary code (e.g. the executor's notify).
        for w in wakers {
            w.wake();
        }
        n
    }

    /// Makes the eventfd readable so a blocked event loop wakes up.
    pub fn kick(&self) {
        let one = 1u64;
        // SAFETY: writes 8 bytes from `one`; a full counter (EAGAIN) already means readable.
        let _ = unsafe { libc::write(self.eventfd(), (&one as *const u64).cast(), 8) };
    }

    /// Operations holding a slot: queued, in the kernel, or orphaned and awaiting their CQE.
    pub fn in_flight(&self) -> usize {
        self.shared.state.lock().busy
    }

    fn op(&self, kind: Kind, file: &HostFile, off: u64) -> UringOp {
        UringOp {
            shared: self.shared.clone(),
            state: OpState::Start(kind, file.clone(), off),
        }
    }
}

impl std::fmt::Debug for UringIo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UringIo")
            .field("eventfd", &self.eventfd())
            .finish()
    }
}

// The methods return the concrete `UringOp` so callers holding a `UringIo` get futures that own
// everything they need ('static), not ones tied to `&self`.
#[allow(refining_impl_trait)]
impl Io for UringIo {
    type File = HostFile;

    fn read(&self, file: &HostFile, off: PhysOffset, buf: Buf) -> UringOp {
        self.op(Kind::Read(buf), file, off.0)
    }

    fn write(&self, file: &HostFile, off: PhysOffset, buf: Buf) -> UringOp {
        self.op(Kind::Write(buf), file, off.0)
    }

    fn flush(&self, file: &HostFile) -> UringOp {
        self.op(Kind::Flush, file, 0)
    }

    fn punch_hole(&self, file: &HostFile, off: PhysOffset, len: u64) -> UringOp {
        self.op(Kind::Punch(len), file, off.0)
    }
}

impl State {
    /// Takes a slot for `p` and queues its first SQE.
    fn start(&mut self, p: Pending) -> usize {
        let idx = match self.free.pop() {
            Some(i) => i,
            None => {
                self.slots.push(Box::new(None));
                self.slots.len() - 1
            }
        };
        let sqe = build_sqe(self.slots[idx].insert(p), idx);
        self.busy += 1;
        self.push(sqe);
        idx
    }

    /// Hands queued SQEs to the kernel. `Ok(false)`: the kernel is short of resources, the
    /// SQEs stay queued for a later call.
    ///
    /// One `io_uring_enter` per operation instead of one per batch: a batch of 32 reads
    /// reaches a virtio disk as one notification after all 32 are built, and the VM disk
    /// here served such rounds at 54.0k–66.9k reads/s (median 58.1k) against 67.7k–75.5k
    /// (median 69.6k) for operations submitted as they come (docs/PERFORMANCE.md, "Submitting
    /// at once").
    fn submit(&mut self) -> io::Result<bool> {
        loop {
            self.refill();
            if self.ring.submission().is_empty() {
                return Ok(true);
            }
            match self.ring.submit() {
                Ok(0) => return Ok(true),
                Ok(_) => {}
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => continue,
                Err(e) if matches!(e.raw_os_error(), Some(libc::EAGAIN | libc::EBUSY)) => {
                    return Ok(false)
                }
                Err(e) => return Err(e),
            }
            if self.overflow.is_empty() || self.in_kernel >= self.kernel_cap {
                return Ok(true);
            }
        }
    }

    /// The operation in slot `idx`, if the slot is in use.
    fn pending(&mut self, idx: usize) -> Option<&mut Pending> {
        self.slots.get_mut(idx).and_then(|s| Option::as_mut(s))
    }

    fn release(&mut self, idx: usize) {
        if let Some(slot) = self.slots.get_mut(idx) {
            if slot.take().is_some() {
                self.free.push(idx);
                self.busy -= 1;
            }
        }
    }

    /// Queues an SQE, keeping FIFO order with anything already waiting in the overflow list.
    fn push(&mut self, sqe: squeue::Entry) {
        if self.overflow.is_empty() && self.in_kernel < self.kernel_cap {
            // SAFETY: the SQE points only into a boxed `Pending` (buffer, iovecs, file) that its
            // slot keeps alive and unmoved until the CQE is reaped (see the module doc).
            if unsafe { self.ring.submission().push(&sqe) }.is_ok() {
                self.in_kernel += 1;
                return;
            }
        }
        self.overflow.push_back(sqe);
    }

    /// Moves overflowed SQEs into the submission queue while there is room.
    fn refill(&mut self) {
        let mut sq = self.ring.submission();
        while self.in_kernel < self.kernel_cap && !sq.is_full() {
            let Some(sqe) = self.overflow.pop_front() else {
                break;
            };
            // SAFETY: as in `push`; the queue has room, so the push cannot fail.
            let _ = unsafe { sq.push(&sqe) };
            self.in_kernel += 1;
        }
    }

    /// Handles one CQE. Returns the waker to call once the operation has finished.
    fn complete(&mut self, idx: usize, res: i32) -> Option<Waker> {
        self.in_kernel = self.in_kernel.saturating_sub(1);
        let p = self.pending(idx)?;
        if p.orphaned {
            self.release(idx);
            return None;
        }
        let outcome = match (&p.kind, res) {
            (_, r) if r < 0 => Err(io::Error::from_raw_os_error(-r)),
            (Kind::Flush | Kind::Punch(_), _) => Ok(()),
            (Kind::Read(buf) | Kind::Write(buf), n) => {
                let write = matches!(p.kind, Kind::Write(_));
                let len = buf.len();
                let n = n as usize;
                p.done = (p.done + n).min(len);
                let pos = p.off + p.done as u64;
                if p.done == len {
                    Ok(())
                } else if n == 0 && write {
                    Err(io::Error::new(io::ErrorKind::WriteZero, "write returned 0"))
                } else if !write && (n == 0 || p.file.size().is_ok_and(|s| s <= pos)) {
                    // End of file: the rest reads as zeros. Checking the size first avoids an
                    // O_DIRECT read at an unaligned offset past EOF.
                    buf.zero(p.done, len - p.done);
                    Ok(())
                } else {
                    let sqe = build_sqe(p, idx);
                    self.push(sqe);
                    return None;
                }
            }
        };
        p.result = Some(outcome);
        p.waker.take()
    }
}

/// The SQE for the (rest of the) operation in `p`, with `user_data` = slot index.
fn build_sqe(p: &mut Pending, idx: usize) -> squeue::Entry {
    let fd = types::Fd(p.file.fd());
    let entry = match &p.kind {
        Kind::Flush => opcode::Fsync::new(fd)
            .flags(types::FsyncFlags::DATASYNC)
            .build(),
        Kind::Punch(len) => opcode::Fallocate::new(fd, *len)
            .offset(p.off)
            .mode(libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE)
            .build(),
        Kind::Read(buf) | Kind::Write(buf) => {
            let write = matches!(p.kind, Kind::Write(_));
            let off = p.off + p.done as u64;
            let rest = (buf.len() - p.done).min(MAX_SQE_LEN);
            p.iov = IoVecs(buf.slice(p.done, rest).iovecs());
            // More than UIO_MAXIOV segments is EINVAL: send the first ones, the short transfer
            // resubmits the rest.
            let n = p.iov.0.len().min(libc::UIO_MAXIOV as usize);
            match (&p.iov.0[..n], write) {
                ([one], false) => opcode::Read::new(fd, one.iov_base.cast(), one.iov_len as u32)
                    .offset(off)
                    .build(),
                ([one], true) => opcode::Write::new(fd, one.iov_base.cast(), one.iov_len as u32)
                    .offset(off)
                    .build(),
                (iov, false) => opcode::Readv::new(fd, iov.as_ptr(), n as u32)
                    .offset(off)
                    .build(),
                (iov, true) => opcode::Writev::new(fd, iov.as_ptr(), n as u32)
                    .offset(off)
                    .build(),
            }
        }
    };
    entry.user_data(idx as u64)
}

/// Future of one operation: queues its SQE on first poll, resolves once `reap` saw the CQE.
/// Owns a clone of the file and the ring state, so it may outlive the `UringIo` handle.
#[must_use = "futures do nothing unless polled"]
pub struct UringOp {
    shared: Arc<Shared>,
    state: OpState,
}

enum OpState {
    Start(Kind, HostFile, u64),
    Waiting(usize),
    Done,
}

impl Future for UringOp {
    type Output = io::Result<()>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        match std::mem::replace(&mut this.state, OpState::Done) {
            OpState::Start(kind, file, off) => {
                let empty = match &kind {
                    Kind::Read(b) | Kind::Write(b) => b.is_empty(),
                    Kind::Punch(len) => *len == 0,
                    Kind::Flush => false,
                };
                if empty {
                    return Poll::Ready(Ok(()));
                }
                let p = Pending {
                    kind,
                    file,
                    off,
                    done: 0,
                    iov: IoVecs(SmallVec::new()),
                    waker: Some(cx.waker().clone()),
                    result: None,
                    orphaned: false,
                };
                let mut st = this.shared.state.lock();
                let idx = st.start(p);
                // Submitted at once rather than with the rest of the event-loop turn: the device
                // starts on it while the remaining requests are parsed. A failure leaves the SQE
                // queued for `UringIo::submit`, which retries and reports it.
                let _ = st.submit();
                this.state = OpState::Waiting(idx);
                Poll::Pending
            }
            OpState::Waiting(idx) => {
                let mut st = this.shared.state.lock();
                let Some(p) = st.pending(idx) else {
                    return Poll::Ready(Err(io::Error::other("io_uring slot lost")));
                };
                if let Some(r) = p.result.take() {
                    st.release(idx);
                    return Poll::Ready(r);
                }
                if !p.waker.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
                    p.waker = Some(cx.waker().clone());
                }
                this.state = OpState::Waiting(idx);
                Poll::Pending
            }
            OpState::Done => Poll::Ready(Err(io::Error::other(
                "io_uring future polled after completion",
            ))),
        }
    }
}

impl Drop for UringOp {
    fn drop(&mut self) {
        if let OpState::Waiting(idx) = self.state {
            let mut st = self.shared.state.lock();
            let Some(p) = st.pending(idx) else {
                return;
            };
            if p.result.is_some() {
                st.release(idx);
            } else {
                // The kernel may still use the buffer: keep the slot until reap sees the CQE.
                p.orphaned = true;
                p.waker = None;
            }
        }
    }
}

impl Drop for Shared {
    fn drop(&mut self) {
        // No future is left, so every remaining slot is orphaned. SQEs never given to the kernel
        // can go; those in the kernel must complete before their buffers are freed.
        let st = self.state.get_mut();
        st.overflow.clear();
        while st.in_kernel > 0 {
            match st.ring.submit_and_wait(1) {
                Ok(_) => {}
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => continue,
                Err(e) => {
                    tracing::error!("io_uring teardown: {e}; leaking {} buffers", st.busy);
                    std::mem::forget(std::mem::take(&mut st.slots));
                    return;
                }
            }
            let done = st.ring.completion().count();
            st.in_kernel = st.in_kernel.saturating_sub(done);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Submits `sqe` on the ring of `io` and returns its completion's result.
    fn run_raw(io: &UringIo, sqe: squeue::Entry) -> i32 {
        let mut st = io.shared.state.lock();
        // SAFETY: callers pass operations whose memory (a path) is static.
        unsafe { st.ring.submission().push(&sqe.user_data(u64::MAX)).unwrap() };
        st.ring.submit_and_wait(1).unwrap();
        let cqe = st.ring.completion().next().unwrap();
        cqe.result()
    }

    /// The ring serves fvd's operations only: an `openat`, which a compromised thread could
    /// otherwise submit past its seccomp filter, is refused with EACCES.
    #[test]
    fn the_ring_refuses_operations_fvd_does_not_submit() {
        let io = UringIo::new(8).unwrap();
        let path = c"/proc/self/status";
        let open = opcode::OpenAt::new(types::Fd(libc::AT_FDCWD), path.as_ptr()).build();
        assert_eq!(run_raw(&io, open), -libc::EACCES);
        assert_eq!(run_raw(&io, opcode::Nop::new().build()), -libc::EACCES);
        // One of fvd's own goes through (an fsync of the ring's eventfd: EINVAL from fsync,
        // not EACCES from the restriction).
        let fsync = opcode::Fsync::new(types::Fd(io.eventfd())).build();
        assert_ne!(run_raw(&io, fsync), -libc::EACCES);
    }
}
