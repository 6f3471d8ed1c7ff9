//! Per-block fill locks. A write that has to fill a block that is not yet present (merging base
//! data or zeros around the guest's bytes) holds the block's lock from planning until its bit is
//! set, so a concurrent write to other bytes of the same block cannot be overwritten by the
//! merge. Only first writes to a block take a lock; writes to present blocks never do.

use parking_lot::Mutex;
use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, Waker};

#[derive(Default)]
pub struct BlockLocks {
    held: Mutex<HashMap<u64, Vec<Waker>>>,
}

/// Releases its block on drop (also when the owning future is cancelled).
pub struct BlockGuard<'a> {
    locks: &'a BlockLocks,
    block: u64,
}

impl Drop for BlockGuard<'_> {
    fn drop(&mut self) {
        let waiters = self.locks.held.lock().remove(&self.block);
        for w in waiters.into_iter().flatten() {
            w.wake();
        }
    }
}

impl BlockLocks {
    /// Waits until `block` is free, then holds it.
    pub fn lock(&self, block: u64) -> impl Future<Output = BlockGuard<'_>> + Send {
        super::lock_order::assert_none_held("a block fill lock");
        LockFuture { locks: self, block }
    }

    /// Number of blocks currently held (diagnostics and tests).
    pub fn held(&self) -> usize {
        self.held.lock().len()
    }
}

struct LockFuture<'a> {
    locks: &'a BlockLocks,
    block: u64,
}

impl<'a> Future for LockFuture<'a> {
    type Output = BlockGuard<'a>;
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<BlockGuard<'a>> {
        let mut held = self.locks.held.lock();
        match held.get_mut(&self.block) {
            Some(waiters) => {
                if !waiters.iter().any(|w| w.will_wake(cx.waker())) {
                    waiters.push(cx.waker().clone());
                }
                Poll::Pending
            }
            None => {
                held.insert(self.block, Vec::new());
                Poll::Ready(BlockGuard {
                    locks: self.locks,
                    block: self.block,
                })
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::io::executor::Executor;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    #[test]
    fn second_locker_waits_for_release() {
        // Shared, not leaked: LeakSanitizer (integration/sanitizers.sh) reports leaks in tests.
        let locks = Arc::new(BlockLocks::default());
        let order = Arc::new(Mutex::new(Vec::new()));
        let gate = Arc::new(AtomicUsize::new(0));
        let mut ex = Executor::default();
        for id in 0..3 {
            let order = order.clone();
            let gate = gate.clone();
            let locks = locks.clone();
            ex.spawn(async move {
                let _g = locks.lock(7).await;
                order.lock().push(id);
                // Yield once while holding the lock so the others must queue.
                futures::pending!();
                gate.fetch_add(1, Ordering::SeqCst);
            });
        }
        ex.run_ready();
        assert_eq!(order.lock().len(), 1, "only one task may hold the block");
        assert_eq!(locks.held(), 1);
    }
}
