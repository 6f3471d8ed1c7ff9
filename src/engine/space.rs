//! Thin provisioning (F4): a compact image on a block device smaller than its virtual size asks
//! for more space before it runs out, and writes that find no free chunk wait for the device to
//! grow instead of failing (up to a timeout).

use super::allocator::Allocator;
use super::lock_order::{Level, Ordered, OrderedGuard};
use super::storage::Storage;
use crate::io::{Io, IoFile};
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

/// What the image does when space runs low. Installed by the server.
pub struct SpacePolicy {
    /// Free bytes in the data area below which `on_low` is called.
    pub watermark: u64,
    /// Asks for more space; must not block (the server hands the request to a thread).
    pub on_low: Box<dyn Fn() + Send + Sync>,
    /// How long a write waits for space before failing with ENOSPC.
    pub wait: Duration,
}

struct SpaceWaiters {
    generation: AtomicU64,
    wakers: Ordered<Vec<Waker>>,
}

impl Default for SpaceWaiters {
    fn default() -> Self {
        SpaceWaiters {
            generation: AtomicU64::new(0),
            wakers: Ordered::default_at(Level::Leaf, "space_waiters"),
        }
    }
}

struct SpaceChanged<'a> {
    w: &'a SpaceWaiters,
    seen: u64,
}

impl Future for SpaceChanged<'_> {
    type Output = ();
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let mut wakers = self.w.wakers.lock();
        if self.w.generation.load(Ordering::Acquire) != self.seen {
            return Poll::Ready(());
        }
        wakers.push(cx.waker().clone());
        Poll::Pending
    }
}

/// Physical space of a compact image: the allocator, and what writes do when it runs out.
pub(super) struct Space {
    alloc: Ordered<Allocator>,
    policy: Ordered<Option<SpacePolicy>>,
    waiters: SpaceWaiters,
    /// Virtual chunks a DISCARD emptied while another request referenced them: the next flush
    /// tries their unmap again (without it the chunk stays mapped, empty, until a repair).
    unmap_later: Ordered<Vec<u64>>,
}

impl Space {
    pub(super) fn new(alloc: Allocator) -> Space {
        Space {
            alloc: Ordered::new(Level::Alloc, "alloc", alloc),
            policy: Ordered::default_at(Level::Leaf, "space_policy"),
            waiters: SpaceWaiters::default(),
            unmap_later: Ordered::default_at(Level::Leaf, "unmap_later"),
        }
    }

    /// Remembers that chunk `c` was left mapped, empty, because a request was using it.
    pub(super) fn unmap_later(&self, c: u64) {
        let mut l = self.unmap_later.lock();
        if !l.contains(&c) {
            l.push(c);
        }
    }

    /// The chunks [`Space::unmap_later`] remembered, forgotten here.
    pub(super) fn take_unmap_later(&self) -> Vec<u64> {
        std::mem::take(&mut *self.unmap_later.lock())
    }

    /// The allocator, locked (level `Alloc` in the lock order).
    pub(super) fn alloc(&self) -> OrderedGuard<'_, Allocator> {
        self.alloc.lock()
    }

    pub(super) fn set_policy(&self, policy: SpacePolicy) {
        *self.policy.lock() = Some(policy);
    }

    /// Something changed (the device grew, or a timer ticked): re-read the device size and let
    /// waiting writes try again.
    pub(super) fn notify<I: Io>(&self, store: &Storage<I>) {
        if store.file.is_block_device() {
            let _ = self.alloc.lock().refresh(store);
        }
        let w = &self.waiters;
        let wakers = {
            let mut g = w.wakers.lock();
            w.generation.fetch_add(1, Ordering::AcqRel);
            std::mem::take(&mut *g)
        };
        for k in wakers {
            k.wake();
        }
    }

    /// Number of writes waiting for space.
    pub(super) fn waiting(&self) -> usize {
        self.waiters.wakers.lock().len()
    }

    /// Free bytes in the data area, if the storage is bounded (a block device).
    pub(super) fn free_bytes(&self, chunk_size: u64) -> Option<u64> {
        self.alloc.lock().free_chunks().map(|c| c * chunk_size)
    }

    /// After an allocation: asks for space when below the watermark.
    pub(super) fn check_watermark(&self, chunk_size: u64) {
        let Some(free) = self.free_bytes(chunk_size) else {
            return;
        };
        if let Some(p) = &*self.policy.lock() {
            if free < p.watermark {
                (p.on_low)();
            }
        }
    }

    /// The current generation of space changes, for [`Space::changed`].
    pub(super) fn generation(&self) -> u64 {
        self.waiters.generation.load(Ordering::Acquire)
    }

    /// No space: asks for more and returns how long to wait for it, or None without a policy.
    pub(super) fn ask(&self) -> Option<Duration> {
        let p = self.policy.lock();
        let p = p.as_ref()?;
        (p.on_low)();
        Some(p.wait)
    }

    /// Resolves once the space changed after generation `seen`.
    pub(super) fn changed(&self, seen: u64) -> impl Future<Output = ()> + '_ {
        SpaceChanged {
            w: &self.waiters,
            seen,
        }
    }
}
