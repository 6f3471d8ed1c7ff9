//! Per-thread seccomp filters for `fvd serve` (least privilege, as cloud-hypervisor does).
//!
//! Every kind of serving thread installs its own allow-list before it handles input; a system
//! call outside it kills the whole process (`--seccomp on`, so the unit manager restarts a clean
//! server rather than leave one with a dead queue) or is only logged by the kernel
//! (`--seccomp log`: audit type 1326 in the kernel log, with the thread's name and the call's
//! number, for finding calls a new code path needs).
//!
//! Filters are inherited by threads created afterwards and stack with the ones a thread adds
//! (the kernel obeys the strictest), so the main thread's list also holds everything the
//! threads it starts later (connection, queue workers) need, and every list lets a thread add
//! a filter of its own (`prctl(PR_SET_NO_NEW_PRIVS)`, `seccomp(SET_MODE_FILTER)`).
//!
//! The data path itself (reads, writes, flushes, fallocate of the image) is io_uring requests,
//! which seccomp does not see: the rings accept only those operations
//! (`IORING_REGISTER_RESTRICTIONS`, see `crate::io::uring`), so a thread's `io_uring_enter`
//! cannot reach other kernel interfaces (opening files, sockets).
//!
//! The grow thread (`--grow-cmd`) stays unfiltered: it runs an operator-given shell command
//! (e.g. lvextend), and a child inherits its parent's filter across exec, so any filter would
//! have to allow everything that command may do. It handles no guest or frontend input.

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule,
};
use std::cell::Cell;
use std::collections::BTreeMap;
use std::sync::OnceLock;

/// What happens to a system call outside a thread's allow-list.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum SeccompMode {
    /// Kill the process.
    #[default]
    On,
    /// Install no filter.
    Off,
    /// Allow the call and have the kernel log it (SECCOMP_RET_LOG).
    Log,
}

/// The kinds of thread `fvd serve` runs, each with its own allow-list.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ThreadKind {
    /// Opens the image, accepts frontends, starts the threads below, closes the image.
    Main,
    /// Waits for SIGTERM/SIGINT and wakes the main thread.
    Signals,
    /// Serves one frontend's vhost-user messages (maps guest memory, takes eventfds).
    Connection,
    /// Serves one virtqueue: parses requests from guest memory, drives its io_uring.
    Queue,
    /// Copies the base image into the image in the background.
    Prefetch,
    /// Receives the replies of an NBD base image's server.
    NbdReader,
    /// Serves the QMP control socket's clients (`--control`).
    Qmp,
    /// Serves the metrics endpoint (`--metrics`): accepts scrapers and answers them.
    Metrics,
}

const KINDS: [ThreadKind; 8] = [
    ThreadKind::Main,
    ThreadKind::Signals,
    ThreadKind::Connection,
    ThreadKind::Queue,
    ThreadKind::Prefetch,
    ThreadKind::NbdReader,
    ThreadKind::Qmp,
    ThreadKind::Metrics,
];

#[derive(Debug, thiserror::Error)]
pub enum SeccompError {
    #[error("building the seccomp filter of the {kind:?} thread: {error}")]
    Build {
        kind: ThreadKind,
        error: seccompiler::BackendError,
    },
    #[error("seccomp: this architecture ({0}) is not supported; use --seccomp off")]
    Arch(&'static str),
    #[error("installing the seccomp filter of the {kind:?} thread: {error}")]
    Apply {
        kind: ThreadKind,
        error: seccompiler::Error,
    },
}

/// The compiled filters: one allow-list per [`ThreadKind`], and one that makes every `open`
/// fail for all kinds.
pub struct Filters {
    programs: Vec<BpfProgram>,
    no_open: BpfProgram,
}

impl Filters {
    /// Compiles every thread kind's filter for `mode` (None for `off`).
    pub fn compile(mode: SeccompMode) -> Result<Option<Filters>, SeccompError> {
        let mismatch = match mode {
            SeccompMode::Off => return Ok(None),
            SeccompMode::On => SeccompAction::KillProcess,
            SeccompMode::Log => SeccompAction::Log,
        };
        let arch = std::env::consts::ARCH
            .try_into()
            .map_err(|_| SeccompError::Arch(std::env::consts::ARCH))?;
        let programs = KINDS
            .iter()
            .map(|&kind| {
                let build = |error| SeccompError::Build { kind, error };
                let filter =
                    SeccompFilter::new(rules(kind), mismatch.clone(), SeccompAction::Allow, arch)
                        .map_err(build)?;
                BpfProgram::try_from(filter).map_err(build)
            })
            .collect::<Result<_, _>>()?;
        Ok(Some(Filters {
            programs,
            no_open: no_open(arch)?,
        }))
    }

    /// Installs `kind`'s filter on the calling thread.
    pub fn apply(&self, kind: ThreadKind) -> Result<(), SeccompError> {
        let i = KINDS.iter().position(|&k| k == kind).unwrap_or(0);
        let apply = |p: &BpfProgram| {
            seccompiler::apply_filter(p).map_err(|error| SeccompError::Apply { kind, error })
        };
        apply(&self.no_open)?;
        apply(&self.programs[i])
    }
}

/// The process's filters, set once by [`init`] (`fvd serve` only: the other commands and the
/// library's users run unfiltered).
static FILTERS: OnceLock<Filters> = OnceLock::new();

thread_local! {
    static ENTERED: Cell<bool> = const { Cell::new(false) };
}

/// Compiles the filters for `mode`; from then on [`enter`] installs them. Called once, by
/// `fvd serve`, before any serving thread starts.
pub fn init(mode: SeccompMode) -> Result<(), SeccompError> {
    if let Some(f) = Filters::compile(mode)? {
        let _ = FILTERS.set(f);
    }
    // An NBD base's reader thread is started inside the engine's open: a hook set here
    // rather than a server call from the io layer.
    crate::io::nbd::on_reader_start(|| enter_or_abort(ThreadKind::NbdReader));
    Ok(())
}

/// Installs `kind`'s filter on the calling thread, once per thread; nothing before [`init`] or
/// with `--seccomp off`.
pub fn enter(kind: ThreadKind) -> Result<(), SeccompError> {
    let Some(f) = FILTERS.get() else {
        return Ok(());
    };
    if ENTERED.with(Cell::get) {
        return Ok(());
    }
    f.apply(kind)?;
    ENTERED.with(|e| e.set(true));
    Ok(())
}

/// [`enter`] for threads that cannot hand an error back: one that failed to restrict itself
/// must not go on unrestricted, so the process ends.
pub fn enter_or_abort(kind: ThreadKind) {
    if let Err(e) = enter(kind) {
        tracing::error!("{e}");
        std::process::abort();
    }
}

type Rules = BTreeMap<i64, Vec<SeccompRule>>;

/// Serving threads open no file (the image and its bases are open before they start), but
/// glibc's malloc may, in any thread, read /proc/sys/vm/overcommit_memory when it shrinks a
/// heap, and does without it when the open fails. So opens are allowed by every allow-list but
/// fail with EACCES through this second filter (the kernel obeys the strictest of the two):
/// no thread can open a file, and none is killed for glibc's attempt.
fn no_open(arch: seccompiler::TargetArch) -> Result<BpfProgram, SeccompError> {
    let mut r = Rules::new();
    allow(
        &mut r,
        &[
            libc::SYS_openat,
            libc::SYS_openat2,
            #[cfg(target_arch = "x86_64")]
            libc::SYS_open,
        ],
    );
    let build = |error| SeccompError::Build {
        kind: ThreadKind::Main,
        error,
    };
    let filter = SeccompFilter::new(
        r,
        SeccompAction::Allow,
        SeccompAction::Errno(libc::EACCES as u32),
        arch,
    )
    .map_err(build)?;
    BpfProgram::try_from(filter).map_err(build)
}

/// Adds unconditionally allowed calls.
fn allow(r: &mut Rules, calls: &[libc::c_long]) {
    for &c in calls {
        r.insert(c, Vec::new());
    }
}

/// Allows `call` when its argument `arg` is one of `values`.
fn allow_arg(r: &mut Rules, call: libc::c_long, arg: u8, values: &[u64]) {
    let entry = r.entry(call).or_default();
    for &v in values {
        let cond = SeccompCondition::new(arg, SeccompCmpArgLen::Dword, SeccompCmpOp::Eq, v)
            .expect("argument index below 6");
        entry.push(SeccompRule::new(vec![cond]).expect("one condition"));
    }
}

/// Allows `call` (getsockopt or setsockopt) for the SOL_SOCKET-level options `opts` only.
fn allow_socket_options(r: &mut Rules, call: libc::c_long, opts: &[libc::c_int]) {
    let cond = |arg, v: libc::c_int| {
        SeccompCondition::new(arg, SeccompCmpArgLen::Dword, SeccompCmpOp::Eq, v as u64)
            .expect("argument index below 6")
    };
    let entry = r.entry(call).or_default();
    for &opt in opts {
        entry.push(
            SeccompRule::new(vec![cond(1, libc::SOL_SOCKET), cond(2, opt)])
                .expect("two conditions"),
        );
    }
}

// ioctl requests fvd and the crates it uses make (the image, the guest's eventfds, sockets).
const BLKSSZGET: u64 = 0x1268;
const BLKGETSIZE64: u64 = 0x8008_1272;
const FIONBIO: u64 = 0x5421;
const FIOCLEX: u64 = 0x5451;

/// Calls every thread makes: memory allocation, locks, time, logging, thread exit, signal
/// delivery (signal-hook's handler `send`s on a socket on whichever thread the signal hits),
/// and installing a further filter.
fn common(r: &mut Rules) {
    allow(
        r,
        &[
            libc::SYS_brk,
            libc::SYS_mmap,
            libc::SYS_munmap,
            libc::SYS_mremap,
            libc::SYS_mprotect,
            libc::SYS_madvise,
            libc::SYS_futex,
            libc::SYS_sched_yield,
            libc::SYS_clock_gettime,
            libc::SYS_clock_nanosleep,
            libc::SYS_nanosleep,
            libc::SYS_getrandom,
            libc::SYS_write,
            libc::SYS_writev,
            libc::SYS_sendto,
            libc::SYS_close,
            libc::SYS_fcntl,
            // Answered with EACCES by `no_open`.
            libc::SYS_openat,
            libc::SYS_openat2,
            #[cfg(target_arch = "x86_64")]
            libc::SYS_open,
            libc::SYS_rt_sigprocmask,
            // The SIGBUS handler (`sigbus`) restores the default action when it cannot map a
            // page over the fault, so the process dies of SIGBUS, not of SIGSYS.
            libc::SYS_rt_sigaction,
            libc::SYS_rt_sigreturn,
            libc::SYS_sigaltstack,
            libc::SYS_restart_syscall,
            libc::SYS_exit,
            libc::SYS_exit_group,
            libc::SYS_gettid,
            libc::SYS_getpid,
            // abort() raises SIGABRT with tgkill.
            libc::SYS_tgkill,
        ],
    );
    allow_arg(
        r,
        libc::SYS_prctl,
        0,
        &[libc::PR_SET_NO_NEW_PRIVS as u64, libc::PR_SET_NAME as u64],
    );
    allow_arg(
        r,
        libc::SYS_seccomp,
        0,
        &[libc::SECCOMP_SET_MODE_FILTER as u64],
    );
}

/// Calls that drive an io_uring ring and wait on its eventfd.
fn ring(r: &mut Rules) {
    allow(
        r,
        &[
            libc::SYS_io_uring_enter,
            libc::SYS_read,
            libc::SYS_ppoll,
            #[cfg(target_arch = "x86_64")]
            libc::SYS_poll,
        ],
    );
}

/// Calls on the image outside io_uring: growing a compact image file (ftruncate, fallocate),
/// its size, a block device's size and sector size.
fn image(r: &mut Rules) {
    allow(
        r,
        &[
            libc::SYS_ftruncate,
            libc::SYS_fallocate,
            libc::SYS_fdatasync,
            libc::SYS_fsync,
            libc::SYS_fstat,
            libc::SYS_statx,
            libc::SYS_newfstatat,
            libc::SYS_fstatfs,
            libc::SYS_lseek,
        ],
    );
    allow_arg(r, libc::SYS_ioctl, 1, &[BLKGETSIZE64, BLKSSZGET]);
}

/// Closing an NBD base's connection, which happens on whichever thread drops the last reference
/// to the base (the main thread at exit, prefetch or a queue worker when prefetching finishes):
/// socket timeouts so a stuck server cannot block the close, then shutdown.
fn nbd_close(r: &mut Rules) {
    allow(r, &[libc::SYS_shutdown]);
    allow_socket_options(
        r,
        libc::SYS_setsockopt,
        &[libc::SO_RCVTIMEO, libc::SO_SNDTIMEO],
    );
}

/// Starting a thread, and the new thread's own first calls.
fn spawn(r: &mut Rules) {
    allow(
        r,
        &[
            libc::SYS_clone,
            libc::SYS_clone3,
            libc::SYS_set_robust_list,
            libc::SYS_rseq,
            libc::SYS_sched_getaffinity,
        ],
    );
}

/// The allow-list of one kind of thread.
fn rules(kind: ThreadKind) -> Rules {
    let mut r = Rules::new();
    common(&mut r);
    match kind {
        ThreadKind::Queue => {
            ring(&mut r);
            image(&mut r);
            nbd_close(&mut r);
            // The vring event loop, and writing requests to an NBD base's server.
            allow(
                &mut r,
                &[
                    libc::SYS_epoll_pwait,
                    #[cfg(target_arch = "x86_64")]
                    libc::SYS_epoll_wait,
                    // Reading a kick eventfd without ever blocking (vendored vring.rs).
                    libc::SYS_preadv2,
                    // Arming the throttle alarm (a timerfd, read like the eventfds).
                    libc::SYS_timerfd_settime,
                ],
            );
        }
        ThreadKind::Connection => {
            ring(&mut r);
            image(&mut r);
            // vhost-user messages with file descriptors; guest memory regions are mmapped from
            // them; vring kick/call eventfds go into the queue workers' epoll.
            allow(
                &mut r,
                &[
                    libc::SYS_recvmsg,
                    libc::SYS_sendmsg,
                    libc::SYS_recvfrom,
                    libc::SYS_epoll_ctl,
                    // Checking that vring fds are eventfds (/proc/self/fd links).
                    #[cfg(target_arch = "x86_64")]
                    libc::SYS_readlink,
                    libc::SYS_readlinkat,
                    libc::SYS_shutdown,
                    libc::SYS_dup,
                    libc::SYS_eventfd2,
                    // GET_INFLIGHT_FD's region (sealed with fcntl, sized with ftruncate).
                    libc::SYS_memfd_create,
                ],
            );
            allow_arg(&mut r, libc::SYS_ioctl, 1, &[FIONBIO, FIOCLEX]);
            // The vhost crate checks that the fd of GPU_SET_SOCKET / SET_BACKEND_REQ_FD is a
            // unix stream socket before refusing or using it (a frontend may send either).
            allow_socket_options(
                &mut r,
                libc::SYS_getsockopt,
                &[libc::SO_DOMAIN, libc::SO_TYPE],
            );
        }
        ThreadKind::Main => {
            // Everything the connection and queue threads it starts need (filters stack).
            merge(&mut r, rules(ThreadKind::Connection));
            merge(&mut r, rules(ThreadKind::Queue));
            spawn(&mut r);
            allow(
                &mut r,
                &[
                    libc::SYS_accept4,
                    // Fresh rings, eventfds and epolls for each connection's queues.
                    libc::SYS_io_uring_setup,
                    libc::SYS_io_uring_register,
                    libc::SYS_epoll_create1,
                    // Each queue's throttle alarm.
                    libc::SYS_timerfd_create,
                    // Removing the socket file at exit.
                    libc::SYS_unlinkat,
                    #[cfg(target_arch = "x86_64")]
                    libc::SYS_unlink,
                    #[cfg(target_arch = "x86_64")]
                    libc::SYS_lstat,
                ],
            );
        }
        ThreadKind::Signals => {
            // Starting the stop watchdog (`listener::start_watchdog`).
            spawn(&mut r);
            allow(
                &mut r,
                &[
                    libc::SYS_recvfrom,
                    libc::SYS_read,
                    libc::SYS_ppoll,
                    #[cfg(target_arch = "x86_64")]
                    libc::SYS_poll,
                    // Ending a live frontend connection (`ShutdownHandle`).
                    libc::SYS_shutdown,
                ],
            );
        }
        ThreadKind::Qmp => {
            // `x-fvd-flush` drives the server's shared ring (the image's flush and journal).
            ring(&mut r);
            image(&mut r);
            // `quit` stops as SIGTERM does: cuts NBD base reads short, ends the frontend's
            // connection, starts the stop watchdog.
            nbd_close(&mut r);
            spawn(&mut r);
            allow(
                &mut r,
                &[
                    // `block_resize` tells the frontend on its backend request channel and
                    // waits for the ack, polling with a deadline (vendor/vhost patch 8).
                    libc::SYS_sendmsg,
                    libc::SYS_recvmsg,
                    #[cfg(target_arch = "x86_64")]
                    libc::SYS_poll,
                    libc::SYS_ppoll,
                    // Its event loop (created before the filter), clients and their sockets.
                    libc::SYS_epoll_pwait,
                    #[cfg(target_arch = "x86_64")]
                    libc::SYS_epoll_wait,
                    libc::SYS_epoll_ctl,
                    libc::SYS_accept4,
                    libc::SYS_recvfrom,
                    libc::SYS_shutdown,
                ],
            );
            allow_arg(&mut r, libc::SYS_ioctl, 1, &[FIONBIO]);
        }
        ThreadKind::Prefetch => {
            // Its own ring, created on the thread.
            ring(&mut r);
            image(&mut r);
            nbd_close(&mut r);
            allow(
                &mut r,
                &[libc::SYS_io_uring_setup, libc::SYS_io_uring_register],
            );
            allow(&mut r, &[libc::SYS_eventfd2]);
        }
        ThreadKind::NbdReader => {
            // The NBD client worker: serves the connection and reconnects after a loss (a
            // non-blocking connect and the handshake, every wait a poll with a deadline).
            allow(
                &mut r,
                &[
                    libc::SYS_read,
                    libc::SYS_recvfrom,
                    libc::SYS_recvmsg,
                    libc::SYS_shutdown,
                    #[cfg(target_arch = "x86_64")]
                    libc::SYS_poll,
                    libc::SYS_ppoll,
                    libc::SYS_socket,
                    libc::SYS_connect,
                    libc::SYS_getsockopt,
                    libc::SYS_setsockopt,
                    // Resolving a host name again on reconnect (glibc's DNS client; files it
                    // would read are refused like every open, so an IP literal is safer).
                    libc::SYS_sendmmsg,
                    libc::SYS_bind,
                    libc::SYS_getsockname,
                    libc::SYS_getpeername,
                ],
            );
        }
        ThreadKind::Metrics => {
            // Its epoll, listener, timer and sockets are set up before the filter: it only
            // waits, accepts, reads requests and their timer, and writes answers (`common`).
            allow(
                &mut r,
                &[
                    libc::SYS_epoll_pwait,
                    #[cfg(target_arch = "x86_64")]
                    libc::SYS_epoll_wait,
                    libc::SYS_epoll_ctl,
                    libc::SYS_accept4,
                    libc::SYS_read,
                    libc::SYS_recvfrom,
                ],
            );
            // Making accepted sockets non-blocking.
            allow_arg(&mut r, libc::SYS_ioctl, 1, &[FIONBIO]);
        }
    }
    r
}

/// Adds `other`'s rules to `r`: a call allowed unconditionally in either stays so.
fn merge(r: &mut Rules, other: Rules) {
    for (call, rules) in other {
        match r.get_mut(&call) {
            None => {
                r.insert(call, rules);
            }
            Some(mine) if mine.is_empty() => {}
            Some(_) if rules.is_empty() => {
                r.insert(call, rules);
            }
            Some(mine) => mine.extend(rules),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs `f` in a forked child after installing `kind`'s filter for `mode`; returns the
    /// child's wait status. A child, because killing the process is what `on` does.
    fn in_child(mode: SeccompMode, kind: ThreadKind, f: fn() -> i32) -> libc::c_int {
        // Compiled before the fork: the child only makes system calls.
        let filters = Filters::compile(mode).unwrap().unwrap();
        // SAFETY: the child calls only async-signal-safe functions (prctl, seccomp, the call
        // under test, _exit) and allocates nothing.
        let pid = unsafe { libc::fork() };
        assert!(pid >= 0, "fork: {}", std::io::Error::last_os_error());
        if pid == 0 {
            let code = match filters.apply(kind) {
                Ok(()) => f(),
                Err(_) => 100,
            };
            // SAFETY: ends the forked child without running the parent's exit handlers.
            unsafe { libc::_exit(code) };
        }
        let mut status = 0;
        // SAFETY: waits for the child forked above.
        let r = unsafe { libc::waitpid(pid, &mut status, 0) };
        assert_eq!(r, pid);
        status
    }

    /// Listening for connections: on no thread's list (the server's one listening socket is
    /// bound and listening before any filter). On an invalid fd, so that under `log` the call
    /// reaches the kernel (EBADF) without side effects.
    fn listen_call() -> i32 {
        // SAFETY: listen takes no pointers; the fd is invalid on purpose.
        let r = unsafe { libc::listen(-1, 1) };
        let errno = std::io::Error::last_os_error().raw_os_error();
        i32::from(!(r < 0 && errno == Some(libc::EBADF)))
    }

    #[test]
    fn a_call_outside_the_list_kills_under_on_and_is_only_logged_under_log() {
        for kind in KINDS {
            let st = in_child(SeccompMode::On, kind, listen_call);
            assert!(
                libc::WIFSIGNALED(st) && libc::WTERMSIG(st) == libc::SIGSYS,
                "{kind:?}: status {st:#x}, not killed by SIGSYS"
            );
            let st = in_child(SeccompMode::Log, kind, listen_call);
            assert!(
                libc::WIFEXITED(st) && libc::WEXITSTATUS(st) == 0,
                "{kind:?} under log: status {st:#x}; listen must have reached the kernel"
            );
        }
    }

    #[test]
    fn calls_on_the_list_work_and_opens_fail_with_eacces() {
        fn eventfd_then_open() -> i32 {
            // SAFETY: eventfd, write and close take no pointers but the 8-byte value.
            let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC) };
            let one = 1u64;
            // SAFETY: `one` outlives the call.
            let w = unsafe { libc::write(fd, (&one as *const u64).cast(), 8) };
            // SAFETY: closes the fd created above.
            unsafe { libc::close(fd) };
            if fd < 0 || w != 8 {
                return 2;
            }
            // SAFETY: a NUL-terminated path.
            let r = unsafe { libc::open(c"/proc/self/status".as_ptr(), libc::O_RDONLY) };
            // SAFETY: reads this thread's errno.
            let errno = unsafe { *libc::__errno_location() };
            if r == -1 && errno == libc::EACCES {
                0
            } else {
                3
            }
        }
        for mode in [SeccompMode::On, SeccompMode::Log] {
            let st = in_child(mode, ThreadKind::Main, eventfd_then_open);
            assert!(
                libc::WIFEXITED(st) && libc::WEXITSTATUS(st) == 0,
                "{mode:?}: status {st:#x}"
            );
        }
    }

    #[test]
    fn off_compiles_nothing_and_main_covers_its_threads() {
        assert!(Filters::compile(SeccompMode::Off).unwrap().is_none());
        // The connection and queue threads start under the main thread's filter.
        let main = rules(ThreadKind::Main);
        for kind in [ThreadKind::Connection, ThreadKind::Queue] {
            for call in rules(kind).keys() {
                assert!(
                    main.contains_key(call),
                    "{kind:?}: {call} not allowed by Main"
                );
            }
        }
    }
}
