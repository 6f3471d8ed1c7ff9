//! The vhost-user-blk server: serves one [`Disk`] on a unix socket, one frontend at a time.
//!
//! The socket is bound once for the life of the process; each connection gets a fresh
//! `VhostUserDaemon` (with fresh queue worker threads) started on that same listener, so a
//! frontend can reconnect the moment the previous one has left. When a frontend leaves, its
//! in-flight requests finish and the disk is flushed before the next one is accepted. SIGTERM or
//! SIGINT first stops taking requests, lets those taken finish and publishes them to the used
//! rings, and only then ends the connection; then the disk is closed (flushed, marked clean) and
//! the socket removed (unless the service manager passed it: socket activation, see
//! [`activation`]); if that takes longer than [`listener::STOP_GRACE`], the
//! process exits anyway with status [`listener::EXIT_ABANDONED`].

pub mod activation;
pub mod backend;
pub mod background;
pub mod config;
pub mod control;
pub mod handle;
pub mod inflight;
pub mod listener;
pub mod metrics;
pub mod qmp;
pub mod request;
pub mod seccomp;
pub mod sigbus;
pub mod stats;
pub mod throttle;
pub mod worker;

use crate::engine::{self, Disk, EngineError};
use crate::io::host_file::OpenMode;
use crate::io::uring::UringIo;
use backend::BlkBackend;
use config::DeviceConfig;
use control::Control;
use listener::{Listener, Stop};
use request::ID_LEN;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use vhost::vhost_user::Error as VhostUserError;
use vhost_user_backend::VhostUserDaemon;
use worker::Ctx;

/// What to serve and how.
#[derive(Clone, Debug)]
pub struct ServeConfig {
    pub image: PathBuf,
    /// The image's format; probed when `None`.
    pub format: Option<engine::Format>,
    /// Socket to bind; `None` when a service manager passes the listening socket (see
    /// [`Server::start`]).
    pub socket: Option<PathBuf>,
    pub num_queues: u16,
    pub queue_size: u16,
    pub read_only: bool,
    /// GET_ID answer (at most 20 bytes); derived from the image when absent.
    pub serial: Option<String>,
    /// Permission bits of the socket file.
    pub socket_mode: u32,
    /// Exit after the first frontend disconnects.
    pub once: bool,
    /// Prefetch the base image: `None` follows the image's setting.
    pub prefetch: Option<bool>,
    pub prefetch_config: crate::engine::prefetch::PrefetchConfig,
    /// Copy-on-read: `None` follows the image's setting.
    pub copy_on_read: Option<bool>,
    /// Grow the storage of a thin image on a block device.
    pub grow: Option<background::GrowConfig>,
    /// Signal the used ring per completion rather than per batch (benchmarks).
    pub signal_each_completion: bool,
    /// Timeout and reconnect window of an NBD base.
    pub nbd: crate::io::nbd::NbdOptions,
    /// Per-thread system call filters.
    pub seccomp: seccomp::SeccompMode,
    /// How first writes zero the rest of their block.
    pub zero_ranges: engine::storage::ZeroRanges,
    /// The QMP control socket, if any.
    pub control: Option<qmp::ControlConfig>,
    /// Where to serve Prometheus metrics, if anywhere.
    pub metrics: Option<metrics::MetricsAddr>,
    /// I/O limits at start (changed later through [`handle::ServerHandle::set_throttle`]).
    pub throttle: throttle::ThrottleConfig,
    /// How long to wait for the image's lock when another process holds it: a server started
    /// right after its predecessor was killed finds the lock held until the I/O that process
    /// left in flight has completed.
    pub lock_wait: std::time::Duration,
}

/// `ServeConfig::lock_wait` unless set: long enough for a killed server's I/O to drain on a
/// busy device, short enough that a second server started by mistake soon says why it fails.
pub const DEFAULT_LOCK_WAIT: std::time::Duration = std::time::Duration::from_secs(30);

/// How long base reads over NBD still in flight may take once the server is stopping: a
/// stalled NBD server must not hold the exit (and the clean close of the image) hostage.
const NBD_SHUTDOWN_GRACE: std::time::Duration = std::time::Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("cannot open {path}: {error}")]
    Open { path: PathBuf, error: EngineError },
    #[error(
        "--socket PATH is required (unless a service manager passes the listening socket: \
         LISTEN_FDS)"
    )]
    NoSocket,
    #[error("num-queues must be 1..=64, not {0}")]
    NumQueues(u16),
    #[error("queue-size must be a power of two in 4..=32768, not {0}")]
    QueueSize(u16),
    #[error(transparent)]
    Listener(#[from] listener::ListenerError),
    #[error("control socket: {0}")]
    ControlSocket(listener::ListenerError),
    /// Setting up the process (signal handlers) failed.
    #[error("{what}: {source}")]
    Setup {
        what: &'static str,
        source: std::io::Error,
    },
    #[error("waiting for a frontend on {}: {source}", path.display())]
    WaitFrontend {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("io_uring: {0}")]
    Ring(std::io::Error),
    #[error("serial is {0} bytes; virtio-blk allows at most 20")]
    Serial(usize),
    /// The daemon's error is kept as text: vhost_user_backend::Error may hold a thread's panic
    /// payload, which is not Sync, so it cannot be a source of this (Sync) error.
    #[error("vhost-user: cannot {op}: {error}")]
    Daemon { op: &'static str, error: String },
    #[error("vhost-user: cannot register the io_uring eventfd: {0}")]
    RegisterEventfd(std::io::Error),
    #[error("closing the disk failed: {0}")]
    Close(EngineError),
    #[error(transparent)]
    Seccomp(#[from] seccomp::SeccompError),
    #[error(transparent)]
    Activation(#[from] activation::ActivationError),
    #[error(transparent)]
    Metrics(#[from] metrics::MetricsError),
    #[error("I/O limits: {0}")]
    Throttle(#[from] throttle::ThrottleError),
}

impl ServeConfig {
    /// Serving `image` on `socket` with one queue of 256 and every option at its default (the
    /// image's own prefetch and copy-on-read settings, system call filters on, no limits, no
    /// control socket or metrics): what code that embeds the server starts from.
    pub fn new(image: PathBuf, socket: Option<PathBuf>) -> ServeConfig {
        ServeConfig {
            image,
            format: None,
            socket,
            num_queues: 1,
            queue_size: 256,
            read_only: false,
            serial: None,
            socket_mode: 0o600,
            once: false,
            prefetch: None,
            prefetch_config: Default::default(),
            copy_on_read: None,
            grow: None,
            signal_each_completion: false,
            lock_wait: DEFAULT_LOCK_WAIT,
            nbd: Default::default(),
            seccomp: seccomp::SeccompMode::On,
            zero_ranges: Default::default(),
            control: None,
            metrics: None,
            throttle: Default::default(),
        }
    }

    /// Checks what the types allow but the device does not.
    pub fn validate(&self) -> Result<(), ServeError> {
        if let Some(s) = self.serial.as_ref().filter(|s| s.len() > ID_LEN) {
            return Err(ServeError::Serial(s.len()));
        }
        if self.num_queues == 0 || self.num_queues > 64 {
            return Err(ServeError::NumQueues(self.num_queues));
        }
        if !self.queue_size.is_power_of_two() || self.queue_size < 4 || self.queue_size > 32768 {
            return Err(ServeError::QueueSize(self.queue_size));
        }
        Ok(())
    }
}

/// Where [`Server::open`] listens.
enum Socket {
    /// The listening socket a service manager passed.
    Passed(activation::InheritedSocket),
    /// A path to bind.
    Bind(PathBuf),
}

/// An opened disk and a bound socket, ready to [`Server::run`].
pub struct Server {
    cfg: ServeConfig,
    disk: Arc<Disk<UringIo>>,
    control: Arc<Control>,
    device: DeviceConfig,
    serial: [u8; ID_LEN],
    listener: Listener,
    stop: Stop,
    handle: handle::ServerHandle,
    control_socket: Option<qmp::ControlSocket>,
    /// The metrics endpoint, bound at open so that a bad address fails the start.
    metrics: Option<metrics::Bound>,
}

impl Server {
    /// Serves on the listening socket a service manager passed (socket activation), which
    /// `cfg.socket` may then only name, else binds `cfg.socket`. Call it while the process has
    /// one thread: taking a passed socket edits the environment.
    pub fn start(cfg: ServeConfig) -> Result<Server, ServeError> {
        match activation::take()? {
            Some(sock) => {
                activation::check_socket_arg(cfg.socket.as_deref(), &sock.path)?;
                tracing::info!(
                    "serving on the socket passed by the service manager: {}{}",
                    sock.path.display(),
                    sock.name
                        .as_deref()
                        .map_or(String::new(), |n| format!(" (name {n})"))
                );
                Self::bind_inherited(cfg, sock)
            }
            None => Self::bind(cfg),
        }
    }

    /// Opens the disk and binds the socket `cfg.socket`.
    pub fn bind(cfg: ServeConfig) -> Result<Server, ServeError> {
        let Some(path) = cfg.socket.clone() else {
            return Err(ServeError::NoSocket);
        };
        Self::open(cfg, Socket::Bind(path))
    }

    /// Opens the disk and serves on a listening socket the service manager passed (socket
    /// activation); `cfg.socket` and `cfg.socket_mode` are not used.
    pub fn bind_inherited(
        mut cfg: ServeConfig,
        sock: activation::InheritedSocket,
    ) -> Result<Server, ServeError> {
        cfg.socket = Some(sock.path.clone());
        Self::open(cfg, Socket::Passed(sock))
    }

    fn open(cfg: ServeConfig, socket: Socket) -> Result<Server, ServeError> {
        cfg.validate()?;
        cfg.throttle.validate()?;
        let throttle = Arc::new(throttle::Throttle::new(
            cfg.throttle,
            Box::<throttle::MonotonicClock>::default(),
        ));
        // Before any filter: installing a signal handler is not on the lists.
        sigbus::install().map_err(|source| ServeError::Setup {
            what: "SIGBUS handler",
            source,
        })?;
        // Before any thread that handles input starts (an NBD base's reader starts at open).
        seccomp::init(cfg.seccomp)?;
        let control = Arc::new(Control::new().map_err(ServeError::Ring)?);
        let disk = control
            .block_on(engine::open_disk_waiting(
                control.io(),
                &cfg.image,
                OpenMode::for_read_only(cfg.read_only),
                cfg.format,
                cfg.lock_wait,
            ))
            .map_err(|error| ServeError::Open {
                path: cfg.image.clone(),
                error,
            })?;
        if matches!(&disk, Disk::Raw(r) if r.probed() && !r.read_only()) {
            tracing::warn!(
                "{}: the format was probed and guessed raw; probing raw images is dangerous, so \
                 guest writes that would make it look like an FVD image are refused. Give -f raw \
                 to lift that restriction.",
                cfg.image.display()
            );
        }
        for c in disk.nbd_clients() {
            c.set_options(cfg.nbd);
        }
        disk.set_zero_ranges(cfg.zero_ranges);
        let serial = serial_bytes(&cfg.serial.clone().unwrap_or_else(|| disk.id()));
        let device = DeviceConfig {
            capacity: disk.virtual_size(),
            block_size: disk.alignment().clamp(512, 4096),
            optimal_io: disk.preferred_write_size(),
            read_only: cfg.read_only || disk.read_only(),
            // Every disk takes DISCARD and WRITE ZEROES: a discard the storage cannot honour
            // leaves the space used, zeros it cannot make without writing are written.
            discard: true,
            num_queues: cfg.num_queues,
            queue_size: cfg.queue_size,
            writeback: true,
        };
        let disk = Arc::new(disk);
        let bound = match socket {
            Socket::Passed(sock) => Ok(Listener::inherited(sock)),
            Socket::Bind(path) => Listener::bind(&path, cfg.socket_mode),
        };
        let listener = match bound {
            Ok(l) => l,
            Err(e) => {
                // Leave the image clean: nothing was written, but an FVD open may have replayed
                // its journal.
                let _ = control.block_on(disk.close(control.io()));
                return Err(e.into());
            }
        };
        let control_socket = match cfg.control.as_ref().map(qmp::ControlSocket::bind) {
            None => None,
            Some(Ok(c)) => Some(c),
            Some(Err(e)) => {
                let _ = control.block_on(disk.close(control.io()));
                listener.remove();
                return Err(ServeError::ControlSocket(e));
            }
        };
        let metrics = match cfg.metrics.as_ref().map(metrics::bind).transpose() {
            Ok(m) => m,
            Err(e) => {
                let _ = control.block_on(disk.close(control.io()));
                listener.remove();
                if let Some(c) = control_socket {
                    c.remove();
                }
                return Err(e.into());
            }
        };
        let events = match qmp::events::EventSink::new() {
            Ok(e) => Arc::new(e),
            Err(source) => {
                let _ = control.block_on(disk.close(control.io()));
                listener.remove();
                if let Some(c) = control_socket {
                    c.remove();
                }
                return Err(ServeError::Setup {
                    what: "event queue",
                    source,
                });
            }
        };
        // Signals are handled from here on, before anyone is told the server is ready.
        let counters = {
            let disk = disk.clone();
            move || serde_json::to_string(&disk.counters().snapshot()).unwrap_or_default()
        };
        let stop = match Stop::install(counters) {
            Ok(s) => s,
            Err(e) => {
                let _ = control.block_on(disk.close(control.io()));
                listener.remove();
                if let Some(c) = control_socket {
                    c.remove();
                }
                return Err(ServeError::Setup {
                    what: "signals",
                    source: e,
                });
            }
        };
        let handle = handle::ServerHandle {
            disk: disk.clone(),
            control: control.clone(),
            events,
            prefetch: Default::default(),
            stop: stop.requester(),
            info: Arc::new(handle::DiskInfo {
                image: cfg.image.clone(),
                format: match &*disk {
                    Disk::Fvd(_) => "fvd",
                    Disk::Raw(_) => "raw",
                },
                device: device.clone(),
                base: match &*disk {
                    Disk::Fvd(img) => img.header().base.map(|b| b.path),
                    Disk::Raw(_) => None,
                },
            }),
            frontend: Default::default(),
            stats: Arc::new(stats::Stats::new(cfg.num_queues)),
            throttle,
            backend_req: Default::default(),
        };
        Ok(Server {
            cfg,
            disk,
            control,
            device,
            serial,
            listener,
            stop,
            handle,
            control_socket,
            metrics,
        })
    }

    /// What the control plane needs of this server.
    pub fn handle(&self) -> handle::ServerHandle {
        self.handle.clone()
    }

    pub fn device(&self) -> &DeviceConfig {
        &self.device
    }

    pub fn config(&self) -> &ServeConfig {
        &self.cfg
    }

    /// The listening socket's path.
    pub fn socket(&self) -> &std::path::Path {
        self.listener.path()
    }

    /// Where the metrics endpoint listens (a TCP port 0 resolved), if there is one.
    pub fn metrics_addr(&self) -> Option<metrics::MetricsAddr> {
        self.metrics.as_ref().map(metrics::Bound::local_addr)
    }

    /// Serves frontends until SIGTERM/SIGINT (or the first disconnect with `once`), then
    /// closes the disk and removes the socket.
    pub fn run(mut self) -> Result<(), ServeError> {
        let bg_stop = Arc::new(background::StopFlag::default());
        let workers = self.start_background(&bg_stop);
        // Before the main thread's filter, which their own replace (filters stack on threads
        // started later).
        let metrics = match self.metrics.take().map(|m| m.start(self.handle())) {
            Some(Err(e)) => {
                self.stop.uninstall();
                bg_stop.stop();
                for w in workers {
                    let _ = w.join();
                }
                let _ = self.control.block_on(self.disk.close(self.control.io()));
                self.listener.remove();
                if let Some(c) = self.control_socket.take() {
                    c.remove();
                }
                return Err(e.into());
            }
            Some(Ok(m)) => Some(m),
            None => None,
        };
        let qmp = match self.control_socket.take() {
            None => None,
            Some(c) => match c.start(self.handle.clone()) {
                Ok(t) => Some(t),
                Err(source) => {
                    if let Some(m) = metrics {
                        m.stop();
                    }
                    bg_stop.stop();
                    for w in workers {
                        let _ = w.join();
                    }
                    let _ = self.control.block_on(self.disk.close(self.control.io()));
                    self.listener.remove();
                    self.stop.uninstall();
                    return Err(ServeError::Setup {
                        what: "control socket thread",
                        source,
                    });
                }
            },
        };
        // After the grower started (it stays unfiltered, see `seccomp`).
        let served = seccomp::enter(seccomp::ThreadKind::Main)
            .map_err(ServeError::from)
            .and_then(|()| self.serve_loop(&self.stop));
        self.cut_nbd_reads();
        if let Some(q) = qmp {
            let reason = if q.quit_requested() {
                "host-qmp-quit"
            } else {
                "host-signal"
            };
            self.handle.events.emit(
                qmp::events::SHUTDOWN,
                serde_json::json!({"guest": false, "reason": reason}),
            );
            self.stop.set_phase("closing the control socket");
            q.stop();
        }
        let counters = self.counters_json();
        self.stop
            .set_phase("stopping the background threads and closing the disk");
        self.stop.uninstall();
        bg_stop.stop();
        for w in workers {
            let _ = w.join();
        }
        if let Some(m) = metrics {
            m.stop();
        }
        let closed = self.control.block_on(self.disk.close(self.control.io()));
        self.listener.remove();
        served?;
        closed.map_err(ServeError::Close)?;
        tracing::info!("disk closed cleanly; counters: {counters}");
        Ok(())
    }

    /// Bounds what NBD base reads (guest requests being drained, prefetch, closing) may still
    /// take, so that stopping never waits on the network for long.
    fn cut_nbd_reads(&self) {
        for c in self.disk.nbd_clients() {
            c.shutdown(NBD_SHUTDOWN_GRACE);
        }
    }

    /// Guest requests and the host I/O they caused so far, as one JSON line (amplification).
    fn counters_json(&self) -> String {
        serde_json::to_string(&self.disk.counters().snapshot()).unwrap_or_default()
    }

    /// Copy-on-read setting, prefetch thread and grower, as configured.
    fn start_background(
        &self,
        stop: &Arc<background::StopFlag>,
    ) -> Vec<std::thread::JoinHandle<()>> {
        let mut threads = Vec::new();
        let Disk::Fvd(img) = &*self.disk else {
            return threads;
        };
        if let Some(on) = self.cfg.copy_on_read {
            img.set_copy_on_read(on);
        }
        let header = img.header();
        let prefetch = self
            .cfg
            .prefetch
            .unwrap_or(header.compat & crate::format::header::COMPAT_PREFETCH != 0);
        if prefetch {
            match background::start_prefetch(
                self.disk.clone(),
                self.cfg.prefetch_config.clone(),
                stop.clone(),
                self.handle.prefetch.clone(),
                self.handle.events.clone(),
            ) {
                Ok(t) => threads.extend(t),
                // The guest is served without it, as before; the log says why.
                Err(e) => tracing::error!("{e}; serving without prefetching"),
            }
        }
        if let Some(g) = &self.cfg.grow {
            match background::start_grower(
                self.disk.clone(),
                &self.cfg.image,
                g.clone(),
                stop.clone(),
                self.handle.events.clone(),
            ) {
                Ok(Some(t)) => threads.push(t),
                Ok(None) => tracing::warn!(
                    "--grow-cmd ignored: the image is not a compact image on a block device"
                ),
                Err(e) => tracing::error!("{e}; the storage will not be grown"),
            }
        }
        threads
    }

    fn serve_loop(&self, stop: &Stop) -> Result<(), ServeError> {
        let daemon_err = |op| {
            move |e: vhost_user_backend::Error| ServeError::Daemon {
                op,
                error: e.to_string(),
            }
        };
        while !stop.requested() {
            let ctx = Arc::new(Ctx {
                disk: self.disk.clone(),
                serial: self.serial,
                write_through: AtomicBool::new(false),
                // The capacity here is the size at start; each request is checked against the
                // current one (`Worker::take`), which a resize changes.
                limits: self.device.limits(),
                backend_req: self.handle.backend_req.clone(),
                signal_each: self.cfg.signal_each_completion,
                sigbus_base: sigbus::faults(),
                conn: parking_lot::Mutex::new(None),
                stopping: AtomicBool::new(false),
                log: Default::default(),
                events: self.handle.events.clone(),
                stats: self.handle.stats.clone(),
                throttle: self.handle.throttle.clone(),
            });
            let backend = Arc::new(
                BlkBackend::new(ctx.clone(), self.device.clone(), self.control.clone())
                    .map_err(ServeError::Ring)?,
            );
            let mut daemon =
                VhostUserDaemon::new("fvd-vhost-user".into(), backend.clone(), backend.memory())
                    .map_err(daemon_err("create the daemon"))?;
            backend
                .register(&daemon.get_epoll_handlers())
                .map_err(ServeError::RegisterEventfd)?;

            stop.set_phase("waiting for a frontend");
            match self.listener.wait_for_frontend(stop) {
                Ok(true) => {}
                Ok(false) => break,
                Err(source) => {
                    return Err(ServeError::WaitFrontend {
                        path: self.listener.path().to_path_buf(),
                        source,
                    })
                }
            }
            // A frontend is waiting, so the accept inside does not block.
            let accepted = self.listener.with(|l| daemon.start(l));
            if let Err(e) = accepted {
                if stop.requested() {
                    break;
                }
                return Err(daemon_err("accept a frontend")(e));
            }
            tracing::info!("frontend connected");
            self.handle.frontend.store(true, Ordering::Relaxed);
            self.handle
                .events
                .emit(qmp::events::FRONTEND_CONNECTED, serde_json::json!({}));
            if let Some(handle) = daemon.shutdown_handle() {
                let (b, disk) = (backend.clone(), self.disk.clone());
                let drain: listener::Drain = Arc::new(move || {
                    // Bound what base reads still in flight may take, then let everything taken
                    // from the rings finish and reach the used rings before the socket closes.
                    for c in disk.nbd_clients() {
                        c.shutdown(NBD_SHUTDOWN_GRACE);
                    }
                    b.quiesce();
                    b.drain_all();
                });
                stop.set_connection(Some(listener::Connection { handle, drain }));
            }
            *ctx.conn.lock() = daemon.shutdown_handle();
            stop.set_phase("waiting for the frontend's connection to end");
            match daemon.wait() {
                Ok(())
                | Err(vhost_user_backend::Error::HandleRequest(
                    VhostUserError::Disconnected | VhostUserError::PartialMessage,
                )) => tracing::info!("frontend disconnected; counters: {}", self.counters_json()),
                Err(e) => tracing::warn!("frontend connection ended: {e}"),
            }
            stop.set_connection(None);
            self.handle.frontend.store(false, Ordering::Relaxed);
            self.handle
                .events
                .emit(qmp::events::FRONTEND_DISCONNECTED, serde_json::json!({}));
            // The next frontend reads the size when it connects; nobody to tell meanwhile.
            self.handle.backend_req.set(None);
            if stop.requested() {
                self.cut_nbd_reads();
            }
            *ctx.conn.lock() = None;
            // Finish what the guest submitted and make it durable before anyone else connects.
            stop.set_phase("draining the frontend's in-flight requests");
            backend.drain_all();
            stop.set_phase("flushing the disk");
            backend.flush();
            stop.set_phase("ending the queue threads");
            for h in daemon.get_epoll_handlers() {
                h.send_exit_event();
            }
            drop(daemon); // joins the queue worker threads
            if self.cfg.once {
                break;
            }
        }
        Ok(())
    }
}

/// The GET_ID answer: printable ASCII, NUL-padded to 20 bytes.
fn serial_bytes(s: &str) -> [u8; ID_LEN] {
    let mut out = [0u8; ID_LEN];
    for (o, c) in out.iter_mut().zip(s.bytes()) {
        *o = if c.is_ascii_graphic() { c } else { b'_' };
    }
    out
}

/// Command-line arguments that attach QEMU and cloud-hypervisor to this server.
pub fn attach_hints(socket: &std::path::Path, num_queues: u16, queue_size: u16) -> String {
    let s = socket.display();
    format!(
        "QEMU (guest RAM must be shared; SIZE = the -m size):\n  \
         -object memory-backend-memfd,id=mem0,size=SIZE,share=on -machine memory-backend=mem0 \
         -chardev socket,id=fvd0,path={s} \
         -device vhost-user-blk-pci,chardev=fvd0,num-queues={num_queues},queue-size={queue_size}\n\
         cloud-hypervisor:\n  \
         --memory size=SIZE,shared=on \
         --disk vhost_user=true,socket={s},num_queues={num_queues},queue_size={queue_size}\n"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn serial_is_printable_and_padded() {
        assert_eq!(&serial_bytes("disk.fvd")[..9], b"disk.fvd\0");
        assert_eq!(
            serial_bytes("a b\u{e9}"),
            *b"a_b__\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0"
        );
        assert_eq!(
            serial_bytes("0123456789abcdefghijXYZ"),
            *b"0123456789abcdefghij"
        );
    }

    #[test]
    fn hints_name_the_socket_and_queues() {
        let h = attach_hints(std::path::Path::new("/run/x.sock"), 2, 128);
        assert!(h.contains("share=on"));
        assert!(h.contains("-chardev socket,id=fvd0,path=/run/x.sock"));
        assert!(h.contains("vhost-user-blk-pci,chardev=fvd0,num-queues=2,queue-size=128"));
        assert!(h.contains("--disk vhost_user=true,socket=/run/x.sock,num_queues=2,queue_size=128"));
        assert!(h.contains("shared=on"));
    }
}
