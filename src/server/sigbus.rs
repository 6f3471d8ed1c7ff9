//! SIGBUS from guest memory. A frontend can shrink the memfd behind a region after the server
//! mapped it (QEMU seals its memfds against that; cloud-hypervisor's are not sealed); the
//! server's next access to a lost page then raises SIGBUS, whose default action kills the
//! process. The handler installed here maps a private zero page over a faulting page that lies
//! in guest memory, counts the fault and returns, so the access is retried and succeeds; the
//! connection notices the count change, fails its requests and is ended. A fault anywhere else
//! keeps the default action. (I/O the kernel does on guest memory gets EFAULT instead: an I/O
//! error for the guest.)

use std::io;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

/// Guest memory ranges seen so far (start, length); append-only, oldest overwritten when full.
/// A range that is no longer mapped is harmless: nothing else in the process raises SIGBUS.
const SLOTS: usize = 256;

struct Slot {
    start: AtomicUsize,
    len: AtomicUsize,
}

static RANGES: [Slot; SLOTS] = [const {
    Slot {
        start: AtomicUsize::new(0),
        len: AtomicUsize::new(0),
    }
}; SLOTS];
static NEXT: AtomicUsize = AtomicUsize::new(0);
static PAGE: AtomicUsize = AtomicUsize::new(4096);
static FAULTS: AtomicU64 = AtomicU64::new(0);

/// Installs the handler (once per process).
pub fn install() -> io::Result<()> {
    // SAFETY: sysconf has no preconditions.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    if page > 0 {
        PAGE.store(page as usize, Ordering::Relaxed);
    }
    // SAFETY: a zeroed sigaction is a valid starting point; the handler only uses
    // async-signal-safe operations (atomics, mmap, signal).
    unsafe {
        let mut sa: libc::sigaction = std::mem::zeroed();
        sa.sa_sigaction = handler as *const () as libc::sighandler_t;
        sa.sa_flags = libc::SA_SIGINFO;
        libc::sigemptyset(&mut sa.sa_mask);
        if libc::sigaction(libc::SIGBUS, &sa, std::ptr::null_mut()) != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

/// Records a guest memory mapping.
pub fn register(start: usize, len: usize) {
    let known = RANGES
        .iter()
        .any(|s| s.start.load(Ordering::Acquire) == start && s.len.load(Ordering::Acquire) == len);
    if known || len == 0 {
        return;
    }
    let slot = &RANGES[NEXT.fetch_add(1, Ordering::Relaxed) % SLOTS];
    // Length first to zero, so a concurrent handler never sees a new start with an old length.
    slot.len.store(0, Ordering::Release);
    slot.start.store(start, Ordering::Release);
    slot.len.store(len, Ordering::Release);
}

/// SIGBUS faults repaired so far in this process.
pub fn faults() -> u64 {
    FAULTS.load(Ordering::Acquire)
}

fn in_guest_memory(addr: usize) -> bool {
    RANGES.iter().any(|s| {
        let start = s.start.load(Ordering::Acquire);
        let len = s.len.load(Ordering::Acquire);
        addr >= start && addr - start < len
    })
}

extern "C" fn handler(_sig: libc::c_int, info: *mut libc::siginfo_t, _ctx: *mut libc::c_void) {
    // SAFETY: the kernel passes a valid siginfo for an SA_SIGINFO handler.
    let addr = unsafe { (*info).si_addr() } as usize;
    if in_guest_memory(addr) {
        let page = PAGE.load(Ordering::Relaxed);
        // SAFETY: replaces one page of a guest memory mapping (never memory Rust owns) with a
        // private zero page; MAP_FIXED keeps the address, so the mapping stays whole.
        let p = unsafe {
            libc::mmap(
                (addr & !(page - 1)) as *mut libc::c_void,
                page,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED,
                -1,
                0,
            )
        };
        if p != libc::MAP_FAILED {
            FAULTS.fetch_add(1, Ordering::AcqRel);
            return;
        }
    }
    // Not guest memory, or not repairable (e.g. a huge page): on return the access faults
    // again and takes the default action.
    // SAFETY: resetting a signal disposition is async-signal-safe.
    unsafe { libc::signal(libc::SIGBUS, libc::SIG_DFL) };
}
