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
pub struct Executor {
    tasks: Vec<Option<Task>>,
    free: Vec<usize>,
    ready: Arc<ReadyQueue>,
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
            free: Vec::new(),
            ready: Arc::new(ReadyQueue {
                queue: Mutex::new(VecDeque::new()),
                notify,
            }),
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
                self.tasks.push(Some(Box::pin(fut)));
                self.tasks.len() - 1
            }
        };
        self.live += 1;
        self.ready.queue.lock().push_back(id);
    }

    /// Polls every ready task until none is ready. Returns how many tasks were polled.
    pub fn run_ready(&mut self) -> usize {
        let mut polled = 0;
        loop {
            let batch: Vec<usize> = self.ready.queue.lock().drain(..).collect();
            if batch.is_empty() {
                return polled;
            }
            for id in batch {
                let Some(task) = self.tasks.get_mut(id).and_then(|t| t.as_mut()) else {
                    continue; // stale wake-up of a finished task
                };
                let waker = Waker::from(Arc::new(TaskWaker {
                    id,
                    ready: self.ready.clone(),
                }));
                let mut cx = Context::from_waker(&waker);
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
}
