//! A minimal task executor: `block_on` for the tools and a run queue for I/O worker threads and
//! the simulator. Tasks are woken through std wakers, so cross-thread wake-ups (a task waiting
//! for another queue's copy-on-write fill) are safe.

use parking_lot::Mutex;
use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, Wake, Waker};
use std::thread::{self, Thread};

/// Runs a future to completion on the current thread, parking while it is pending.
pub fn block_on<F: Future>(fut: F) -> F::Output {
    struct ThreadWaker(Thread);
    impl Wake for ThreadWaker {
        fn wake(self: Arc<Self>) {
            self.0.unpark();
        }
        fn wake_by_ref(self: &Arc<Self>) {
            self.0.unpark();
        }
    }
    let waker = Waker::from(Arc::new(ThreadWaker(thread::current())));
    let mut cx = Context::from_waker(&waker);
    let mut fut = std::pin::pin!(fut);
    loop {
        if let Poll::Ready(v) = fut.as_mut().poll(&mut cx) {
            return v;
        }
        thread::park();
    }
}

type Task = Pin<Box<dyn Future<Output = ()> + Send>>;

/// A set of tasks polled when woken. Deterministic: tasks run in wake order.
///
/// Nothing is allocated per poll: each task slot has one waker, made with the slot and reused by
/// every task that occupies it, and the ready list is drained into a buffer kept across calls.
/// Removing these allocations, and io_uring's per-operation one, saved a sixth of the server's
/// instructions per 4 KiB read (callgrind; docs/PERFORMANCE.md, "Instructions per request").
pub struct Executor {
    tasks: Vec<Option<Task>>,
    /// `wakers[id]` wakes slot `id`. A wake-up that outlives its task finds the slot empty, or
    /// polls the slot's next task once for nothing, which futures allow.
    wakers: Vec<Waker>,
    free: Vec<usize>,
    ready: Arc<ReadyQueue>,
    /// The batch being run, kept to reuse its allocation.
    batch: VecDeque<usize>,
    live: usize,
}

/// Wake-ups land here; the owner of the executor drains it with [`Executor::run_ready`].
pub struct ReadyQueue {
    queue: Mutex<VecDeque<usize>>,
    notify: Option<Box<dyn Fn() + Send + Sync>>,
}

struct TaskWaker {
    id: usize,
    ready: Arc<ReadyQueue>,
}

impl Wake for TaskWaker {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }
    fn wake_by_ref(self: &Arc<Self>) {
        self.ready.queue.lock().push_back(self.id);
        if let Some(n) = &self.ready.notify {
            n();
        }
    }
}

impl Default for Executor {
    fn default() -> Self {
        Self::new(None)
    }
}

impl Executor {
    /// `notify` is called (from any thread) whenever a task becomes ready; an I/O worker uses it
    /// to kick its event loop when a wake-up comes from another thread.
    pub fn new(notify: Option<Box<dyn Fn() + Send + Sync>>) -> Self {
        Executor {
            tasks: Vec::new(),
            wakers: Vec::new(),
            free: Vec::new(),
            ready: Arc::new(ReadyQueue {
                queue: Mutex::new(VecDeque::new()),
                notify,
            }),
            batch: VecDeque::new(),
            live: 0,
        }
    }

    /// Adds a task; it is first polled by the next [`Executor::run_ready`].
    pub fn spawn(&mut self, fut: impl Future<Output = ()> + Send + 'static) {
        let id = match self.free.pop() {
            Some(id) => {
                self.tasks[id] = Some(Box::pin(fut));
                id
            }
            None => {
                let id = self.tasks.len();
                self.tasks.push(Some(Box::pin(fut)));
                self.wakers.push(Waker::from(Arc::new(TaskWaker {
                    id,
                    ready: self.ready.clone(),
                })));
                id
            }
        };
        self.live += 1;
        self.ready.queue.lock().push_back(id);
    }

    /// Polls every ready task until none is ready. Returns how many tasks were polled.
    pub fn run_ready(&mut self) -> usize {
        let mut polled = 0;
        loop {
            // Swap the (empty) batch buffer in: wakers push to the other one meanwhile.
            std::mem::swap(&mut *self.ready.queue.lock(), &mut self.batch);
            if self.batch.is_empty() {
                return polled;
            }
            while let Some(id) = self.batch.pop_front() {
                let Some(task) = self.tasks.get_mut(id).and_then(|t| t.as_mut()) else {
                    continue; // stale wake-up of a finished task
                };
                let mut cx = Context::from_waker(&self.wakers[id]);
                polled += 1;
                if task.as_mut().poll(&mut cx).is_ready() {
                    self.tasks[id] = None;
                    self.free.push(id);
                    self.live -= 1;
                }
            }
        }
    }

    /// Number of tasks not yet finished.
    pub fn live_tasks(&self) -> usize {
        self.live
    }

    /// True if some task is waiting to be polled.
    pub fn has_ready(&self) -> bool {
        !self.ready.queue.lock().is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[test]
    fn runs_tasks_and_reuses_slots() {
        let mut ex = Executor::default();
        let n = Arc::new(AtomicUsize::new(0));
        for _ in 0..3 {
            let n = n.clone();
            ex.spawn(async move {
                n.fetch_add(1, Ordering::SeqCst);
            });
        }
        assert_eq!(ex.live_tasks(), 3);
        ex.run_ready();
        assert_eq!(ex.live_tasks(), 0);
        assert_eq!(n.load(Ordering::SeqCst), 3);
        assert_eq!(block_on(async { 7 }), 7);
    }

    /// Resolves on its second poll, counting polls; keeps the waker it was first polled with.
    struct TwoPolls {
        polls: Arc<AtomicUsize>,
        waker: Arc<Mutex<Option<Waker>>>,
    }

    impl Future for TwoPolls {
        type Output = ();
        fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
            let n = self.polls.fetch_add(1, Ordering::SeqCst);
            self.waker.lock().get_or_insert_with(|| cx.waker().clone());
            if n == 0 {
                Poll::Pending
            } else {
                Poll::Ready(())
            }
        }
    }

    #[test]
    fn a_slot_keeps_its_waker_and_a_stale_wake_only_polls_the_next_task() {
        let mut ex = Executor::default();
        let (polls, waker) = (Arc::new(AtomicUsize::new(0)), Arc::new(Mutex::new(None)));
        ex.spawn(TwoPolls {
            polls: polls.clone(),
            waker: waker.clone(),
        });
        assert_eq!(ex.run_ready(), 1);
        let first: Waker = waker.lock().clone().expect("polled with a waker");
        first.wake_by_ref();
        assert!(ex.has_ready());
        assert_eq!(ex.run_ready(), 1);
        assert_eq!((ex.live_tasks(), polls.load(Ordering::SeqCst)), (0, 2));

        // The next task takes the same slot and is polled with the same waker.
        let (polls2, waker2) = (Arc::new(AtomicUsize::new(0)), Arc::new(Mutex::new(None)));
        ex.spawn(TwoPolls {
            polls: polls2.clone(),
            waker: waker2.clone(),
        });
        ex.run_ready();
        assert!(waker2.lock().as_ref().is_some_and(|w| w.will_wake(&first)));
        // A wake-up left over from the first task polls the second once; it must then be done
        // exactly as if it had been woken itself, and nothing else runs.
        first.wake();
        assert_eq!(ex.run_ready(), 1);
        assert_eq!((ex.live_tasks(), polls2.load(Ordering::SeqCst)), (0, 2));
        assert_eq!(ex.run_ready(), 0);
    }
}
