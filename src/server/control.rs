//! Disk operations from threads that are not queue workers (opening, the flush after a vring
//! stops or the frontend leaves, the final close): a ring of their own, driven to completion
//! by blocking on its eventfd.

use crate::io::uring::UringIo;
use parking_lot::Mutex;
use std::future::Future;
use std::io;
use std::sync::Arc;
use std::task::{Context, Poll, Wake, Waker};

pub struct Control {
    io: Arc<UringIo>,
    /// One driver at a time: two threads reaping the same ring would each sleep on the other's
    /// completions.
    busy: Mutex<()>,
}

struct KickWaker(Arc<UringIo>);

impl Wake for KickWaker {
    fn wake(self: Arc<Self>) {
        self.0.kick();
    }
    fn wake_by_ref(self: &Arc<Self>) {
        self.0.kick();
    }
}

impl Control {
    pub fn new() -> io::Result<Control> {
        Ok(Control {
            io: Arc::new(UringIo::new(64)?),
            busy: Mutex::new(()),
        })
    }

    /// The ring futures passed to [`Control::block_on`] must use.
    pub fn io(&self) -> &UringIo {
        &self.io
    }

    /// Runs `fut` (which does its I/O on [`Control::io`]) to completion on this thread.
    pub fn block_on<T>(&self, fut: impl Future<Output = T>) -> T {
        let _one = self.busy.lock();
        let waker = Waker::from(Arc::new(KickWaker(self.io.clone())));
        let mut cx = Context::from_waker(&waker);
        let mut fut = std::pin::pin!(fut);
        loop {
            if let Poll::Ready(v) = fut.as_mut().poll(&mut cx) {
                return v;
            }
            if let Err(e) = self.io.submit() {
                tracing::error!("io_uring submit failed: {e}");
            }
            wait_readable(self.io.eventfd());
            self.io.reap();
        }
    }
}

fn wait_readable(fd: i32) {
    let mut p = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    loop {
        // SAFETY: one valid pollfd, no timeout.
        let r = unsafe { libc::poll(&mut p, 1, -1) };
        if r >= 0 || io::Error::last_os_error().kind() != io::ErrorKind::Interrupted {
            return;
        }
    }
}
