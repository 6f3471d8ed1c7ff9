//! The engine's lock order, written once and checked.
//!
//! Taken in this order, never the reverse:
//!
//! 1. chunk references (`Image::enter_chunks`, held by a request for its whole run);
//! 2. `resizing` (async: one resize at a time), then block fill locks (`block_locks`, async,
//!    taken in ascending block order);
//! 3. the flush state (`Journal::state`, async: header, committed metadata, journal tail; one
//!    journal write at a time). A write holding fill locks takes it in `persist`;
//! 4. [`Level::Alloc`]: the allocator. `sync_locked` takes it under the flush state, never while
//!    it holds `pending`;
//! 5. [`Level::Pending`]: queued journal records, then [`Level::Freed`]: chunks unmapped since
//!    the last flush. Under the allocator when a chunk is mapped (`write`) or unmapped
//!    (`discard`);
//! 6. [`Level::Leaf`]: the header snapshot, copy-on-read jobs, the space policy and space
//!    waiters: nothing else is taken while one is held, not even another leaf.
//!
//! How it is checked:
//!
//! * The synchronous locks (4 to 6) are [`Ordered`] mutexes. In debug builds (every test, the
//!   simulator suite included) each thread tracks the levels it holds, and taking a lock at a
//!   level equal to or before one held panics, naming both. parking_lot guards are never held
//!   across an `.await` (they are not `Send`, and the request futures must be), so a thread's
//!   held set is exactly the guards of the code running on it. Release builds keep a plain
//!   mutex.
//! * The first three are held across `.await`s (chunk references are waited for by spinning,
//!   the others are async locks), so they cannot be tracked per thread. Their invariant is that
//!   no synchronous lock is held while waiting for one: [`assert_none_held`] checks it (debug
//!   builds) where each is taken (`Image::enter_chunks`, `BlockLocks::lock`, `resize`,
//!   `Journal::lock_state`). Among themselves their order is the one above, kept by the code
//!   that takes them (`resize`, `write`, `discard`, `fill`, `flush`).

#[cfg(debug_assertions)]
use std::cell::RefCell;
use std::ops::{Deref, DerefMut};

/// Levels of the synchronous locks, in the order they are taken.
#[derive(Copy, Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(super) enum Level {
    Alloc = 4,
    Pending = 5,
    Freed = 6,
    Leaf = 7,
}

#[cfg(debug_assertions)]
thread_local! {
    /// Levels of the [`Ordered`] locks this thread holds, in the order taken.
    static HELD: RefCell<Vec<(Level, &'static str)>> = const { RefCell::new(Vec::new()) };
}

/// A parking_lot mutex with a place in the lock order.
pub(super) struct Ordered<T> {
    // Read only by the debug-build checks.
    #[cfg_attr(not(debug_assertions), allow(dead_code))]
    level: Level,
    #[cfg_attr(not(debug_assertions), allow(dead_code))]
    name: &'static str,
    inner: parking_lot::Mutex<T>,
}

impl<T: Default> Ordered<T> {
    pub(super) fn default_at(level: Level, name: &'static str) -> Self {
        Self::new(level, name, T::default())
    }
}

impl<T> Ordered<T> {
    pub(super) fn new(level: Level, name: &'static str, value: T) -> Self {
        Ordered {
            level,
            name,
            inner: parking_lot::Mutex::new(value),
        }
    }

    pub(super) fn lock(&self) -> OrderedGuard<'_, T> {
        #[cfg(debug_assertions)]
        HELD.with(|h| {
            let h = h.borrow();
            if let Some(&(level, name)) = h.iter().find(|(l, _)| *l >= self.level) {
                panic!(
                    "lock order violated: taking `{}` ({:?}) while holding `{name}` ({level:?}); \
                     see src/engine/lock_order.rs",
                    self.name, self.level
                );
            }
        });
        let guard = self.inner.lock();
        #[cfg(debug_assertions)]
        HELD.with(|h| h.borrow_mut().push((self.level, self.name)));
        OrderedGuard { lock: self, guard }
    }
}

/// The guard of an [`Ordered`] mutex (not `Send`, like parking_lot's).
pub(super) struct OrderedGuard<'a, T> {
    #[cfg_attr(not(debug_assertions), allow(dead_code))]
    lock: &'a Ordered<T>,
    guard: parking_lot::MutexGuard<'a, T>,
}

impl<T> Deref for OrderedGuard<'_, T> {
    type Target = T;
    fn deref(&self) -> &T {
        &self.guard
    }
}

impl<T> DerefMut for OrderedGuard<'_, T> {
    fn deref_mut(&mut self) -> &mut T {
        &mut self.guard
    }
}

#[cfg(debug_assertions)]
impl<T> Drop for OrderedGuard<'_, T> {
    fn drop(&mut self) {
        // Guards may be dropped in any order: forget the newest entry of this lock.
        let me = (self.lock.level, self.lock.name);
        HELD.with(|h| {
            let mut h = h.borrow_mut();
            if let Some(i) = h.iter().rposition(|e| *e == me) {
                h.remove(i);
            }
        });
    }
}

/// Before waiting for an asynchronous lock (`what`): no synchronous lock may be held.
#[inline]
pub(super) fn assert_none_held(what: &str) {
    #[cfg(debug_assertions)]
    HELD.with(|h| {
        if let Some((level, name)) = h.borrow().last() {
            panic!(
                "lock order violated: waiting for `{what}` while holding `{name}` ({level:?}); \
                 see src/engine/lock_order.rs"
            );
        }
    });
    #[cfg(not(debug_assertions))]
    let _ = what;
}

#[cfg(all(test, debug_assertions))]
mod tests {
    use super::*;

    #[test]
    fn in_order_is_allowed_and_released_locks_are_forgotten() {
        let alloc = Ordered::new(Level::Alloc, "alloc", 0u32);
        let pending = Ordered::new(Level::Pending, "pending", 0u32);
        let freed = Ordered::new(Level::Freed, "freed", 0u32);
        {
            let _a = alloc.lock();
            let mut p = pending.lock();
            *p += 1;
            let _f = freed.lock();
        }
        // All released: any order works again, and waiting for an async lock is allowed.
        let _f = freed.lock();
        drop(_f);
        let _p = pending.lock();
        drop(_p);
        assert_none_held("flush_state");
        assert_eq!(*pending.lock(), 1);
    }

    /// Holds a lock at `held`, then takes one at `then`.
    fn nest(held: (Level, &'static str), then: (Level, &'static str)) {
        let outer = Ordered::new(held.0, held.1, ());
        let inner = Ordered::new(then.0, then.1, ());
        let _o = outer.lock();
        let _i = inner.lock();
    }

    #[test]
    #[should_panic(expected = "taking `alloc` (Alloc) while holding `pending` (Pending)")]
    fn inversion_is_caught() {
        nest((Level::Pending, "pending"), (Level::Alloc, "alloc"));
    }

    #[test]
    #[should_panic(expected = "taking `space_policy` (Leaf) while holding `cor_jobs` (Leaf)")]
    fn leaves_do_not_nest() {
        nest((Level::Leaf, "cor_jobs"), (Level::Leaf, "space_policy"));
    }

    #[test]
    #[should_panic(expected = "waiting for `flush_state` while holding `freed` (Freed)")]
    fn no_sync_lock_across_an_async_lock() {
        let freed = Ordered::new(Level::Freed, "freed", ());
        let _f = freed.lock();
        assert_none_held("flush_state");
    }

    #[test]
    fn out_of_order_release_keeps_the_rest_tracked() {
        let alloc = Ordered::new(Level::Alloc, "alloc", ());
        let pending = Ordered::new(Level::Pending, "pending", ());
        let a = alloc.lock();
        let p = pending.lock();
        drop(a);
        // `pending` is still held: taking `alloc` now would invert.
        let caught = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            let _a = alloc.lock();
        }));
        assert!(caught.is_err());
        drop(p);
        let _a = alloc.lock();
    }
}
