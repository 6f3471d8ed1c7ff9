//! Copy-on-read and prefetch bookkeeping: whether copy-on-read is on, the copies queued by reads
//! (bounded in bytes) and where prefetching continues. The copies themselves are fill.rs's.

use super::lock_order::{Level, Ordered};
use crate::io::Buf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

/// Copy-on-read bytes allowed in flight; beyond this, reads are served without copying.
pub const COR_MAX_INFLIGHT: u64 = 16 << 20;

/// A block to copy from the base, with its data if the guest's read already fetched it all.
pub struct CorJob {
    pub(super) block: u64,
    pub(super) data: Option<Buf>,
}

pub(super) struct Cor {
    /// Copy-on-read on for this open image.
    on: AtomicBool,
    jobs: Ordered<Vec<CorJob>>,
    /// Bytes of queued or running copies.
    inflight: AtomicU64,
    /// Block where the next prefetch step starts.
    prefetch_cursor: AtomicU64,
}

impl Default for Cor {
    fn default() -> Self {
        Cor {
            on: AtomicBool::new(false),
            jobs: Ordered::default_at(Level::Leaf, "cor_jobs"),
            inflight: AtomicU64::new(0),
            prefetch_cursor: AtomicU64::new(0),
        }
    }
}

impl Cor {
    pub(super) fn set_on(&self, on: bool) {
        self.on.store(on, Ordering::Release);
    }

    pub(super) fn on(&self) -> bool {
        self.on.load(Ordering::Acquire)
    }

    /// Queues a copy of `bytes` bytes, unless that would pass [`COR_MAX_INFLIGHT`]; false then.
    pub(super) fn try_queue(&self, bytes: u64, job: impl FnOnce() -> CorJob) -> bool {
        if self.inflight.fetch_add(bytes, Ordering::AcqRel) + bytes > COR_MAX_INFLIGHT {
            self.inflight.fetch_sub(bytes, Ordering::AcqRel);
            return false;
        }
        let job = job();
        self.jobs.lock().push(job);
        true
    }

    /// The next queued copy.
    pub(super) fn next(&self) -> Option<CorJob> {
        self.jobs.lock().pop()
    }

    /// A copy of `bytes` bytes taken by [`Cor::next`] is done (or failed).
    pub(super) fn done(&self, bytes: u64) {
        self.inflight.fetch_sub(bytes, Ordering::AcqRel);
    }

    pub(super) fn prefetch_cursor(&self) -> u64 {
        self.prefetch_cursor.load(Ordering::Acquire)
    }

    pub(super) fn set_prefetch_cursor(&self, b: u64) {
        self.prefetch_cursor.store(b, Ordering::Release);
    }
}
