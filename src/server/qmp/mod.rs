//! The QMP control socket (`fvd serve --control PATH`): one control-plane thread running a
//! rust-vmm `EventManager` with a subscriber for the listening socket, one per client, and one
//! for the eventfd other threads write when they raise an event ([`events::EventSink`]).
//!
//! Nothing here is on the data path: queue threads only ever queue an event (a leaf lock and an
//! eventfd write) and never wait for this thread. Everything a client sends is bounded
//! ([`protocol::MAX_MESSAGE`] per message, [`MAX_PENDING_OUTPUT`] of replies and events it has
//! not read: past that it is disconnected), and at most [`MAX_CLIENTS`] are connected at once.
//!
//! Between two `EventManager::run` calls the thread does its housekeeping: it adds the clients
//! the listener accepted, hands queued events to every negotiated client, writes what each
//! client has pending (watching for EPOLLOUT only while something is), and removes the clients
//! that left or were disconnected.

pub mod commands;
pub mod events;
pub mod protocol;

use crate::server::handle::ServerHandle;
use crate::server::listener::{self, ListenerError};
use event_manager::{EventManager, EventOps, EventSet, Events, MutEventSubscriber, SubscriberOps};
use protocol::{Frame, Framer, QmpError};
use serde_json::{json, Value};
use std::cell::RefCell;
use std::io::{self, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

/// The device and node name of the one disk a server serves, in replies and events.
pub const DEVICE_NAME: &str = "fvd0";
/// Clients connected at once; more are closed at once.
pub const MAX_CLIENTS: usize = 16;
/// Replies and events a client has not read yet; a client over it is disconnected.
pub const MAX_PENDING_OUTPUT: usize = 1 << 20;
/// Bytes read from one client per wakeup, so one busy client cannot starve the others.
const READ_BUDGET: usize = 64 * 1024;

/// Where the control socket listens (from `--control`, `--control-mode`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ControlConfig {
    pub path: PathBuf,
    /// Permission bits of the socket file.
    pub mode: u32,
}

/// The bound control socket, before its thread starts.
pub struct ControlSocket {
    listener: UnixListener,
    path: PathBuf,
    id: (u64, u64),
}

impl ControlSocket {
    /// Binds the socket (a stale one is replaced, a live one is refused, as for `--socket`).
    pub fn bind(cfg: &ControlConfig) -> Result<ControlSocket, ListenerError> {
        let (listener, id) = listener::bind_unix(&cfg.path, cfg.mode)?;
        Ok(ControlSocket {
            listener,
            path: cfg.path.clone(),
            id,
        })
    }

    /// Removes the socket file (when the server does not start after all).
    pub fn remove(self) {
        listener::remove_if_same(&self.path, self.id);
    }

    /// Starts the control-plane thread serving `handle`.
    pub fn start(self, handle: ServerHandle) -> io::Result<ControlThread> {
        let (path, id) = (self.path, self.id);
        let fail = |e| {
            listener::remove_if_same(&path, id);
            e
        };
        self.listener.set_nonblocking(true).map_err(fail)?;
        let exit = Arc::new(AtomicBool::new(false));
        let quit = Arc::new(AtomicBool::new(false));
        let events = handle.events.clone();
        let thread = std::thread::Builder::new()
            .name("fvd-qmp".into())
            .spawn({
                let (exit, quit) = (exit.clone(), quit.clone());
                let listener = self.listener;
                move || run(listener, handle, &exit, &quit)
            })
            .map_err(fail)?;
        events.enable();
        Ok(ControlThread {
            thread,
            exit,
            quit,
            events,
            path,
            id,
        })
    }
}

/// The running control-plane thread.
pub struct ControlThread {
    thread: JoinHandle<()>,
    exit: Arc<AtomicBool>,
    quit: Arc<AtomicBool>,
    events: Arc<events::EventSink>,
    path: PathBuf,
    id: (u64, u64),
}

impl ControlThread {
    /// Whether a client's `quit` asked for the stop.
    pub fn quit_requested(&self) -> bool {
        self.quit.load(Ordering::Acquire)
    }

    /// Delivers the events still queued, ends the thread (closing every client) and removes
    /// the socket file.
    pub fn stop(self) {
        self.exit.store(true, Ordering::Release);
        self.events.wake();
        if self.thread.join().is_err() {
            tracing::error!("the control socket's thread panicked");
        }
        listener::remove_if_same(&self.path, self.id);
    }
}

type Sub = Rc<RefCell<dyn MutEventSubscriber>>;

/// What the subscribers hand to the housekeeping between two runs.
#[derive(Default)]
struct Hub {
    accepted: Vec<UnixStream>,
}

/// Accepts clients on the listening socket.
struct Acceptor {
    listener: UnixListener,
    hub: Rc<RefCell<Hub>>,
    /// The last accept failed (logged once per streak).
    failing: bool,
}

impl MutEventSubscriber for Acceptor {
    fn process(&mut self, _events: Events, _ops: &mut EventOps) {
        loop {
            match self.listener.accept() {
                Ok((s, _)) => {
                    self.failing = false;
                    self.hub.borrow_mut().accepted.push(s);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    // E.g. EMFILE: the client waits in the backlog and the socket stays
                    // readable; pause briefly rather than spin, and log once per streak.
                    if !std::mem::replace(&mut self.failing, true) {
                        tracing::warn!("control socket: cannot accept a client: {e}");
                    }
                    std::thread::sleep(std::time::Duration::from_millis(50));
                    return;
                }
            }
        }
    }

    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(&self.listener, EventSet::IN)) {
            tracing::error!("control socket: cannot watch the listening socket: {e}");
        }
    }
}

/// Drains the event sink's eventfd; the housekeeping then takes the events.
struct Waker {
    events: Arc<events::EventSink>,
}

impl MutEventSubscriber for Waker {
    fn process(&mut self, _events: Events, _ops: &mut EventOps) {
        // Reading is left to `EventSink::take` in the housekeeping, which always follows.
    }

    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(self.events.wake_fd(), EventSet::IN)) {
            tracing::error!("control socket: cannot watch the event queue: {e}");
        }
    }
}

/// One connected client.
struct Client {
    stream: UnixStream,
    handle: ServerHandle,
    framer: Framer,
    out: Vec<u8>,
    /// Bytes of `out` already written.
    sent: usize,
    /// `qmp_capabilities` done: commands and events flow.
    negotiated: bool,
    /// Left, failed, or disconnected for not reading: removed by the housekeeping.
    closed: bool,
    /// It asked for `quit` (its reply is queued).
    quit: bool,
    /// It has sent all it will (end of file): its replies are still written, as QEMU does for
    /// `socat` and `echo ... | nc -U`, then it is closed.
    eof: bool,
    /// What epoll watches for it.
    interest: EventSet,
}

impl Client {
    fn new(stream: UnixStream, handle: ServerHandle) -> Client {
        let mut c = Client {
            stream,
            handle,
            framer: Framer::default(),
            out: Vec::new(),
            sent: 0,
            negotiated: false,
            closed: false,
            quit: false,
            eof: false,
            interest: EventSet::IN,
        };
        c.send(&protocol::greeting());
        c
    }

    fn pending(&self) -> usize {
        self.out.len() - self.sent
    }

    /// Queues a reply or event; a client that has let too much pile up is disconnected.
    fn send(&mut self, v: &Value) {
        if self.closed {
            return;
        }
        let bytes = protocol::encode(v);
        if self.pending() + bytes.len() > MAX_PENDING_OUTPUT {
            tracing::warn!(
                "control socket: a client left over {MAX_PENDING_OUTPUT} bytes unread; \
                 disconnecting it"
            );
            self.close();
            return;
        }
        if self.sent > 0 && self.sent == self.out.len() {
            self.out.clear();
            self.sent = 0;
        }
        self.out.extend_from_slice(&bytes);
    }

    fn close(&mut self) {
        self.closed = true;
        self.out = Vec::new();
        self.sent = 0;
    }

    /// Writes what the socket takes without blocking.
    fn flush(&mut self) {
        while !self.closed && self.pending() > 0 {
            match self.stream.write(&self.out[self.sent..]) {
                Ok(0) => self.close(),
                Ok(n) => self.sent += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => self.close(),
            }
        }
        if self.sent == self.out.len() {
            self.out.clear();
            self.sent = 0;
        }
    }

    fn read(&mut self) {
        let mut buf = [0u8; 16 * 1024];
        let mut budget = READ_BUDGET;
        while budget > 0 && !self.closed && !self.quit && !self.eof {
            match self.stream.read(&mut buf) {
                Ok(0) => {
                    self.eof = true;
                    return;
                }
                Ok(n) => {
                    budget = budget.saturating_sub(n);
                    let mut frames = Vec::new();
                    self.framer.feed(&buf[..n], &mut frames);
                    for f in frames {
                        if self.closed || self.quit {
                            break;
                        }
                        let reply = self.handle_frame(f);
                        self.send(&reply);
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => {
                    self.closed = true;
                    return;
                }
            }
        }
    }

    fn handle_frame(&mut self, f: Frame) -> Value {
        let msg = match f {
            Frame::TooLong => {
                let e = QmpError::generic(format!(
                    "QMP input is longer than {} bytes",
                    protocol::MAX_MESSAGE
                ));
                return protocol::error_reply(&e, None);
            }
            Frame::Message(m) => m,
        };
        let cmd = match protocol::parse(&msg) {
            Ok(c) => c,
            Err((e, id)) => return protocol::error_reply(&e, id),
        };
        let r = if cmd.name == "qmp_capabilities" {
            self.capabilities(&cmd.arguments)
        } else if !self.negotiated {
            Err(QmpError::not_found(
                "Expecting capabilities negotiation with 'qmp_capabilities'",
            ))
        } else {
            let r = commands::execute(&self.handle, &cmd.name, &cmd.arguments);
            if r.is_ok() && cmd.name == "quit" {
                self.quit = true;
            }
            r
        };
        match r {
            Ok(v) => protocol::ok_reply(v, cmd.id),
            Err(e) => protocol::error_reply(&e, cmd.id),
        }
    }

    fn capabilities(&mut self, args: &serde_json::Map<String, Value>) -> Result<Value, QmpError> {
        if self.negotiated {
            return Err(QmpError::not_found(
                "Capabilities negotiation is already complete, command ignored",
            ));
        }
        if let Some(k) = args.keys().find(|k| k.as_str() != "enable") {
            return Err(QmpError::generic(format!("Parameter '{k}' is unexpected")));
        }
        match args.get("enable") {
            None => {}
            Some(Value::Array(caps)) => {
                // No capability (such as oob) is offered.
                if let Some(c) = caps.first() {
                    let name = c.as_str().map_or_else(|| c.to_string(), str::to_string);
                    return Err(QmpError::generic(format!(
                        "Capability '{name}' not available"
                    )));
                }
            }
            Some(_) => {
                return Err(QmpError::generic(
                    "Invalid parameter type for 'enable', expected: array",
                ))
            }
        }
        self.negotiated = true;
        Ok(json!({}))
    }
}

impl MutEventSubscriber for Client {
    fn process(&mut self, events: Events, _ops: &mut EventOps) {
        let set = events.event_set();
        if set.intersects(EventSet::IN | EventSet::READ_HANG_UP | EventSet::HANG_UP) {
            self.read();
        }
        if set.intersects(EventSet::ERROR | EventSet::HANG_UP) {
            self.closed = true;
        }
        // Writing is the housekeeping's, for every client at once.
    }

    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(&self.stream, EventSet::IN)) {
            tracing::warn!("control socket: cannot watch a client: {e}");
            self.closed = true;
        }
    }
}

/// The control-plane thread.
fn run(listener: UnixListener, handle: ServerHandle, exit: &AtomicBool, quit: &AtomicBool) {
    let mut mgr = match EventManager::<Sub>::new() {
        Ok(m) => m,
        Err(e) => {
            tracing::error!("control socket: cannot create its event loop: {e}");
            return;
        }
    };
    let hub = Rc::new(RefCell::new(Hub::default()));
    mgr.add_subscriber(Rc::new(RefCell::new(Acceptor {
        listener,
        hub: hub.clone(),
        failing: false,
    })));
    mgr.add_subscriber(Rc::new(RefCell::new(Waker {
        events: handle.events.clone(),
    })));
    // After the epoll and eventfd exist: the filter has no epoll_create1.
    crate::server::seccomp::enter_or_abort(crate::server::seccomp::ThreadKind::Qmp);
    let mut clients: Vec<(event_manager::SubscriberId, Rc<RefCell<Client>>)> = Vec::new();
    loop {
        if let Err(e) = mgr.run() {
            tracing::error!("control socket: its event loop failed: {e}; closing it");
            break;
        }
        let exiting = exit.load(Ordering::Acquire);
        // New clients.
        let accepted = std::mem::take(&mut hub.borrow_mut().accepted);
        for s in accepted {
            if clients.len() >= MAX_CLIENTS {
                tracing::warn!("control socket: {MAX_CLIENTS} clients already; closing a new one");
                continue;
            }
            if s.set_nonblocking(true).is_err() {
                continue;
            }
            tracing::debug!("control socket: client connected");
            let c = Rc::new(RefCell::new(Client::new(s, handle.clone())));
            let id = mgr.add_subscriber(c.clone());
            clients.push((id, c));
        }
        // Events for every negotiated client.
        let (queued, dropped) = handle.events.take();
        if dropped > 0 {
            tracing::warn!("control socket: {dropped} events dropped (queue full)");
        }
        for e in &queued {
            let v = e.to_json();
            for (_, c) in &clients {
                let mut c = c.borrow_mut();
                if c.negotiated {
                    c.send(&v);
                }
            }
        }
        // Write, watch for EPOLLOUT only while output waits, drop the clients that are gone.
        let mut quit_asked = false;
        clients.retain(|(id, c)| {
            let mut c = c.borrow_mut();
            c.flush();
            quit_asked |= c.quit;
            if c.closed {
                tracing::debug!("control socket: client gone");
                drop(c);
                let _ = mgr.remove_subscriber(*id);
                return false;
            }
            let mut want = EventSet::empty();
            if !c.eof && !c.quit {
                want |= EventSet::IN;
            }
            if c.pending() > 0 {
                want |= EventSet::OUT;
            }
            // A client that asked for `quit` stays to read SHUTDOWN before the thread ends.
            if want.is_empty() && !c.quit {
                // Nothing more to read or write.
                drop(c);
                let _ = mgr.remove_subscriber(*id);
                return false;
            }
            if want != c.interest {
                if let Ok(ops) = mgr.event_ops(*id) {
                    if ops.modify(Events::new(&c.stream, want)).is_ok() {
                        c.interest = want;
                    }
                }
            }
            true
        });
        if exiting {
            break;
        }
        if quit_asked && !quit.swap(true, Ordering::AcqRel) {
            // Blocks until the frontend's requests are drained; the main thread then stops
            // this thread, after it has raised SHUTDOWN.
            handle.stop.request("QMP quit");
        }
    }
}
