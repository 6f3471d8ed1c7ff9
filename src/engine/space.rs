//! Thin provisioning (F4): a compact image on a block device smaller than its virtual size asks
//! for more space before it runs out, and writes that find no free chunk wait for the device to
//! grow instead of failing (up to a timeout).

use super::error::{EngineError, Result};
use super::image::Image;
use super::lock_order::{Level, Ordered};
use crate::io::{Io, IoFile};
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

/// What the image does when space runs low. Installed by the server.
pub struct SpacePolicy {
    /// Free bytes in the data area below which `on_low` is called.
    pub watermark: u64,
    /// Asks for more space; must not block (the server hands the request to a thread).
    pub on_low: Box<dyn Fn() + Send + Sync>,
    /// How long a write waits for space before failing with ENOSPC.
    pub wait: Duration,
}

pub struct SpaceWaiters {
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

impl<I: Io> Image<I> {
    pub fn set_space_policy(&self, policy: SpacePolicy) {
        *self.space_policy.lock() = Some(policy);
    }

    /// Something changed (the device grew, or a timer ticked): re-read the device size and let
    /// waiting writes try again.
    pub fn notify_space(&self) {
        if self.store.file.is_block_device() {
            let _ = self.alloc.lock().refresh(&self.store);
        }
        let w = &self.space_waiters;
        let wakers = {
            let mut g = w.wakers.lock();
            w.generation.fetch_add(1, Ordering::AcqRel);
            std::mem::take(&mut *g)
        };
        for k in wakers {
            k.wake();
        }
    }

    /// Number of writes waiting for space (the server ticks `notify_space` while non-zero).
    pub fn space_waiting(&self) -> usize {
        self.space_waiters.wakers.lock().len()
    }

    /// Free bytes in the data area, if the storage is bounded (a block device).
    pub fn free_bytes(&self) -> Option<u64> {
        self.alloc
            .lock()
            .free_chunks()
            .map(|c| c * self.geo.chunk_size)
    }

    /// After an allocation: asks for space when below the watermark.
    pub(super) fn check_watermark(&self) {
        let Some(free) = self.free_bytes() else {
            return;
        };
        if let Some(p) = &*self.space_policy.lock() {
            if free < p.watermark {
                (p.on_low)();
            }
        }
    }

    /// Allocates chunks for blocks `first..=last`, waiting for space if the device is full and a
    /// policy allows it.
    pub(super) async fn ensure_chunks_waiting(&self, io: &I, first: u64, last: u64) -> Result<()> {
        let mut deadline: Option<Instant> = None;
        // Bounds the retries when other writers keep taking the chunks our syncs release.
        let mut syncs = 0;
        loop {
            let seen = self.space_waiters.generation.load(Ordering::Acquire);
            match self.ensure_chunks(first, last) {
                Err(EngineError::NoSpace(_))
                    if syncs < 16 && (syncs == 0 || self.alloc.lock().awaiting_release() > 0) =>
                {
                    // Chunks freed by discards become reusable once their unmap is durable;
                    // a flush may be committing some right now. Wait for it and commit the rest
                    // rather than fail (an extra flush never breaks a promise).
                    syncs += 1;
                    self.sync(io).await?;
                }
                Err(EngineError::NoSpace(msg)) => {
                    let wait = {
                        let p = self.space_policy.lock();
                        let Some(p) = &*p else {
                            return Err(EngineError::NoSpace(msg));
                        };
                        (p.on_low)();
                        p.wait
                    };
                    let d = *deadline.get_or_insert_with(|| Instant::now() + wait);
                    if Instant::now() >= d {
                        tracing::error!("no space for new chunks after waiting {wait:?}: {msg}; failing the write");
                        return Err(EngineError::NoSpace(msg));
                    }
                    SpaceChanged {
                        w: &self.space_waiters,
                        seen,
                    }
                    .await;
                }
                Err(e) => return Err(e),
                Ok(allocated) => {
                    // Free space only shrinks when we allocate: no locks on the common path.
                    if allocated {
                        self.check_watermark();
                    }
                    return Ok(());
                }
            }
        }
    }
}
