//! The process's one listening socket, and signal handling: SIGTERM/SIGINT interrupt both the
//! wait for a frontend and a live connection, and end the process within [`STOP_GRACE`] even if
//! something is stuck; SIGUSR1 logs the counters; SIGHUP and SIGUSR2 are logged and ignored
//! (their default action would kill the server and leave the image unclean).

use parking_lot::Mutex;
use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM, SIGUSR1, SIGUSR2};
use signal_hook::iterator::{Handle, Signals};
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;
use vhost_user_backend::ShutdownHandle;
use vmm_sys_util::eventfd::EventFd;

/// Why the socket could not be bound.
#[derive(Debug, thiserror::Error)]
pub enum ListenerError {
    #[error("{} exists and is not a socket", path.display())]
    NotSocket { path: PathBuf },
    #[error("{} is in use by another server", path.display())]
    InUse { path: PathBuf },
    #[error("cannot {op} {}: {source}", path.display())]
    Io {
        op: SocketOp,
        path: PathBuf,
        source: io::Error,
    },
}

/// The step of [`Listener::bind`] that failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SocketOp {
    RemoveStale,
    Bind,
    Chmod,
    Stat,
}

impl std::fmt::Display for SocketOp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            SocketOp::RemoveStale => "remove stale socket",
            SocketOp::Bind => "bind",
            SocketOp::Chmod => "chmod",
            SocketOp::Stat => "stat",
        })
    }
}

pub struct Listener {
    inner: Mutex<vhost::vhost_user::Listener>,
    fd: RawFd,
    path: PathBuf,
    /// (device, inode) of the socket file we created, so we never delete someone else's; `None`
    /// for a socket the service manager passed, whose file is the manager's to keep.
    id: Option<(u64, u64)>,
}

impl Listener {
    /// Binds `path` with permissions `mode`. A stale socket (nobody accepting) is replaced; a
    /// live one or any other kind of file is an error.
    pub fn bind(path: &Path, mode: u32) -> Result<Listener, ListenerError> {
        let (l, id) = bind_unix(path, mode)?;
        let fd = l.as_raw_fd();
        Ok(Listener {
            inner: Mutex::new(vhost::vhost_user::Listener::from(l)),
            fd,
            path: path.to_path_buf(),
            id: Some(id),
        })
    }

    /// Serves on the listening socket the service manager passed (socket activation). The
    /// socket file is never removed: the manager keeps listening on it between servers.
    pub fn inherited(sock: super::activation::InheritedSocket) -> Listener {
        let l = UnixListener::from(sock.fd);
        Listener {
            fd: l.as_raw_fd(),
            inner: Mutex::new(vhost::vhost_user::Listener::from(l)),
            path: sock.path,
            id: None,
        }
    }

    /// Blocks until a frontend is waiting to be accepted (true) or a stop is requested (false).
    /// The listening socket itself is never shut down to wake a waiting accept: a passed socket
    /// is shared with the service manager and the next server, which would find it dead.
    pub fn wait_for_frontend(&self, stop: &Stop) -> io::Result<bool> {
        loop {
            if stop.requested() {
                return Ok(false);
            }
            let mut fds = [
                libc::pollfd {
                    fd: self.fd,
                    events: libc::POLLIN,
                    revents: 0,
                },
                libc::pollfd {
                    fd: stop.inner.wake.as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                },
            ];
            // SAFETY: poll reads and writes the two pollfd entries of `fds` only.
            let n = unsafe { libc::poll(fds.as_mut_ptr(), 2, -1) };
            if n < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(e);
            }
            if stop.requested() {
                return Ok(false);
            }
            if fds[0].revents & (libc::POLLERR | libc::POLLNVAL) != 0 {
                return Err(io::Error::other(format!(
                    "the listening socket reports poll events {:#x}",
                    fds[0].revents
                )));
            }
            if fds[0].revents & libc::POLLIN != 0 {
                return Ok(true);
            }
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Runs `f` (e.g. `VhostUserDaemon::start`) on the underlying listener.
    pub fn with<R>(&self, f: impl FnOnce(&mut vhost::vhost_user::Listener) -> R) -> R {
        f(&mut self.inner.lock())
    }

    /// Unlinks the socket file if it is still the one we created (never a passed one).
    pub fn remove(&self) {
        if let Some(id) = self.id {
            remove_if_same(&self.path, id);
        }
    }
}

/// Binds a unix stream socket at `path` with permissions `mode`, returning it and the (device,
/// inode) of its file (to remove only that file later). A stale socket (nobody accepting) is
/// replaced; a live one or any other kind of file is an error. Also binds the control socket.
pub fn bind_unix(path: &Path, mode: u32) -> Result<(UnixListener, (u64, u64)), ListenerError> {
    let err = |op| {
        move |source| ListenerError::Io {
            op,
            path: path.to_path_buf(),
            source,
        }
    };
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        if !meta.file_type().is_socket() {
            return Err(ListenerError::NotSocket {
                path: path.to_path_buf(),
            });
        }
        if UnixStream::connect(path).is_ok() {
            return Err(ListenerError::InUse {
                path: path.to_path_buf(),
            });
        }
        std::fs::remove_file(path).map_err(err(SocketOp::RemoveStale))?;
    }
    // Create the socket with no permissions for others, then widen to `mode`: no window in
    // which a more permissive socket exists.
    // SAFETY: umask only swaps the process file-creation mask.
    let old = unsafe { libc::umask(0o177) };
    let bound = UnixListener::bind(path);
    // SAFETY: as above, restoring the previous mask.
    unsafe { libc::umask(old) };
    let l = bound.map_err(err(SocketOp::Bind))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode & 0o777))
        .map_err(err(SocketOp::Chmod))?;
    let meta = std::fs::symlink_metadata(path).map_err(err(SocketOp::Stat))?;
    Ok((l, (meta.dev(), meta.ino())))
}

/// Unlinks `path` if it is still the file `id` names (never someone else's).
pub fn remove_if_same(path: &Path, id: (u64, u64)) {
    if let Ok(m) = std::fs::symlink_metadata(path) {
        if (m.dev(), m.ino()) == id {
            let _ = std::fs::remove_file(path);
        }
    }
}

/// How long a stop request may take before the process exits anyway, abandoning whatever is
/// stuck (the image is then left unclean: its journal is replayed on the next open). A last
/// resort: longer than the grace of NBD base reads (5 s, `NBD_SHUTDOWN_GRACE`), so a stalled NBD
/// server is cut and the image closed cleanly before this fires.
pub const STOP_GRACE: Duration = Duration::from_secs(10);
/// The exit status after an abandoned stop.
pub const EXIT_ABANDONED: i32 = 3;

/// A stop request, from a signal or a test.
pub struct Stop {
    inner: Arc<StopInner>,
    handle: Handle,
    thread: Option<JoinHandle<()>>,
}

/// Finishes a connection's in-flight requests and publishes their used entries (blocking).
pub type Drain = Arc<dyn Fn() + Send + Sync>;

/// The live connection: how to end it, and what must happen before.
#[derive(Clone)]
pub struct Connection {
    pub handle: ShutdownHandle,
    pub drain: Drain,
}

impl Connection {
    /// Drains, then ends the connection: the frontend reads the used index only after every
    /// request taken from the ring is in it (a completion landing after the frontend read it
    /// would leave the next server starting from a stale index).
    fn stop(&self) {
        (self.drain)();
        self.handle.shutdown();
    }
}

struct StopInner {
    requested: AtomicBool,
    /// Readable once a stop is requested: ends [`Listener::wait_for_frontend`].
    wake: EventFd,
    conn: Mutex<Option<Connection>>,
    /// What the server is doing, for the log line of an abandoned stop.
    phase: Mutex<&'static str>,
}

impl StopInner {
    fn request(&self) {
        self.requested.store(true, Ordering::SeqCst);
        // Ends the wait for a frontend. A full counter (EAGAIN) is readable already.
        let _ = self.wake.write(1);
        // Not under the lock: draining waits for the queue threads.
        let conn = self.conn.lock().clone();
        if let Some(c) = conn {
            *self.phase.lock() = "finishing the frontend's in-flight requests";
            c.stop();
        }
    }
}

impl Stop {
    /// Routes SIGTERM and SIGINT to a stop request, SIGUSR1 to a log line with `counters()`,
    /// and ignores SIGHUP and SIGUSR2.
    pub fn install(counters: impl Fn() -> String + Send + 'static) -> io::Result<Stop> {
        let inner = Arc::new(StopInner {
            requested: AtomicBool::new(false),
            wake: EventFd::new(libc::EFD_CLOEXEC | libc::EFD_NONBLOCK)?,
            conn: Mutex::new(None),
            phase: Mutex::new("starting"),
        });
        let mut signals = Signals::new([SIGTERM, SIGINT, SIGHUP, SIGUSR1, SIGUSR2])?;
        let handle = signals.handle();
        let i = inner.clone();
        let thread = std::thread::Builder::new()
            .name("fvd-signals".into())
            .spawn(move || {
                super::seccomp::enter_or_abort(super::seccomp::ThreadKind::Signals);
                for sig in signals.forever() {
                    match sig {
                        SIGUSR1 => tracing::info!("counters: {}", counters()),
                        SIGHUP | SIGUSR2 => tracing::info!("signal {sig} ignored"),
                        _ => StopRequester(i.clone()).request(&format!("signal {sig}")),
                    }
                }
            })?;
        Ok(Stop {
            inner,
            handle,
            thread: Some(thread),
        })
    }

    /// A handle that requests the same stop as SIGTERM (the control socket's `quit`).
    pub fn requester(&self) -> StopRequester {
        StopRequester(self.inner.clone())
    }

    /// Records what the server is doing now (named in the log if a stop has to abandon it).
    pub fn set_phase(&self, phase: &'static str) {
        *self.inner.phase.lock() = phase;
    }

    pub fn requested(&self) -> bool {
        self.inner.requested.load(Ordering::SeqCst)
    }

    /// The live connection a stop request must end (None when it has ended).
    pub fn set_connection(&self, c: Option<Connection>) {
        *self.inner.conn.lock() = c.clone();
        if self.requested() {
            if let Some(c) = c {
                c.stop();
            }
        }
    }

    /// Stops watching for signals (before the listener is closed).
    pub fn uninstall(mut self) {
        self.handle.close();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Requests the orderly stop SIGTERM requests, from any thread.
#[derive(Clone)]
pub struct StopRequester(Arc<StopInner>);

impl StopRequester {
    /// Stops taking requests, finishes those taken and ends the connection (blocking until
    /// the connection's requests are drained); `why` names the cause in the log.
    pub fn request(&self, why: &str) {
        // Claimed atomically: a signal and `quit` at once stop (and start a watchdog) once.
        if self.0.requested.swap(true, Ordering::SeqCst) {
            tracing::info!("{why}: already stopping");
            return;
        }
        tracing::info!("{why}: finishing in-flight requests and closing the disk");
        // First: draining may itself be what never ends.
        start_watchdog(self.0.clone());
        self.0.request();
    }
}

/// Ends the process if the stop has not finished within [`STOP_GRACE`]: a frontend or a disk
/// that never lets a wait end must not keep the server running after SIGTERM.
fn start_watchdog(inner: Arc<StopInner>) {
    let spawned = std::thread::Builder::new()
        .name("fvd-stop-watchdog".into())
        .spawn(move || {
            std::thread::sleep(STOP_GRACE);
            tracing::error!(
                "not stopped {STOP_GRACE:?} after the stop request: abandoning {}; the image is \
                 left unclean (its journal is replayed on the next open)",
                *inner.phase.lock()
            );
            std::process::exit(EXIT_ABANDONED);
        });
    if let Err(e) = spawned {
        tracing::warn!("cannot start the stop watchdog: {e}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bind_reports_each_refusal_as_its_kind() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("file");
        std::fs::write(&file, b"x").unwrap();
        assert!(matches!(
            Listener::bind(&file, 0o600),
            Err(ListenerError::NotSocket { .. })
        ));
        let sock = dir.path().join("sock");
        let live = Listener::bind(&sock, 0o600).unwrap();
        assert!(matches!(
            Listener::bind(&sock, 0o600),
            Err(ListenerError::InUse { .. })
        ));
        drop(live);
        let missing = dir.path().join("no-such-dir/sock");
        assert!(matches!(
            Listener::bind(&missing, 0o600),
            Err(ListenerError::Io {
                op: SocketOp::Bind,
                ..
            })
        ));
    }
}
