//! A small read-only NBD client, for base images on shared storage
//! (`nbd://HOST[:PORT]/EXPORT`, `nbd+unix:///EXPORT?socket=PATH`).
//!
//! Many reads may be in flight from many threads. A read is registered under a cookie and handed
//! to one worker thread per client, which owns the socket: it writes requests, reads replies,
//! copies the data into the request's buffer and completes its future through a oneshot
//! channel. The buffer travels with the pending request, so a cancelled read still has
//! somewhere to land. The socket is non-blocking and every wait is a `poll(2)` that also watches
//! a wake-up eventfd and the next deadline, so the worker is never held by the network:
//!
//! * a request the server does not answer within [`NbdOptions::timeout`] fails (`TimedOut`) and
//!   the connection is dropped as stalled;
//! * after a connection loss the worker reconnects, with exponential backoff, for as long as the
//!   client lives; for [`NbdOptions::reconnect_delay`] after the loss reads wait for it and are
//!   sent again, after that they fail at once until the server is back (QEMU's
//!   `reconnect-delay`);
//! * [`NbdClient::shutdown`] bounds how long anything in flight may still take.

mod handshake;
mod socket;
mod uri;

pub use handshake::Export;
pub use uri::{is_nbd_uri, NbdAddr, NbdUri, DEFAULT_PORT};

use super::Buf;
use futures::channel::oneshot;
use handshake::{reply_error, request, CMD_DISC, CMD_READ};
use handshake::{SIMPLE_REPLY_MAGIC, STRUCTURED_REPLY_MAGIC};
use parking_lot::Mutex;
use socket::Stream;
use std::collections::{HashMap, VecDeque};
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

/// Bounds connecting and the handshake, so a server that accepts but never answers cannot
/// stall opening an image (or a reconnect attempt) forever.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(30);

/// First and longest pause between reconnect attempts (doubling in between).
const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(10);

/// Default for [`NbdOptions::timeout`]: a reply this late means a stalled server, not a slow one.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);

/// Run first on every reader thread, set by [`on_reader_start`].
static READER_START: OnceLock<fn()> = OnceLock::new();

/// Has every reader thread started from now on run `hook` first (the server installs its
/// seccomp filter there). Set once per process; later calls are ignored.
pub fn on_reader_start(hook: fn()) {
    let _ = READER_START.set(hook);
}

/// How the client copes with a slow or lost server.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NbdOptions {
    /// How long a request sent to the server may wait for its reply; then it fails and the
    /// connection is dropped and re-established. `None`: no limit.
    pub timeout: Option<Duration>,
    /// For this long after a connection loss, reads wait for a reconnect (and are then sent
    /// again); after it they fail at once until the server is back. Zero: fail at once.
    pub reconnect_delay: Duration,
}

impl Default for NbdOptions {
    fn default() -> Self {
        NbdOptions {
            timeout: Some(DEFAULT_TIMEOUT),
            reconnect_delay: Duration::ZERO,
        }
    }
}

/// A read waiting for its reply.
struct Pending {
    off: u64,
    buf: Buf,
    tx: oneshot::Sender<io::Result<()>>,
    /// Sent on the current connection (else waiting to be sent).
    sent: bool,
}

enum Link {
    Up,
    Down { since: Instant, why: String },
    Closed,
}

struct State {
    opts: NbdOptions,
    link: Link,
    next_cookie: u64,
    pending: HashMap<u64, Pending>,
    /// Requests for the worker to send, in order.
    outq: Vec<u64>,
    /// (sent at, cookie) in send order: the front is the oldest reply due. Entries of completed
    /// requests are skipped lazily.
    sent: VecDeque<(Instant, u64)>,
    /// Set by a shutdown request: when the worker stops waiting for what is in flight.
    close_at: Option<Instant>,
}

struct Shared {
    uri: String,
    addr: NbdAddr,
    export_name: String,
    state: Mutex<State>,
    /// Wakes the worker out of `poll` (new requests, options, shutdown).
    wake: EventFd,
    /// A wake-up is already signalled and not yet consumed: spares the eventfd write.
    wake_pending: AtomicBool,
    /// The worker is to stop; every read fails from then on.
    closing: AtomicBool,
}

fn failed(p: Vec<Pending>, e: impl Fn() -> io::Error) {
    for p in p {
        let _ = p.tx.send(Err(e()));
    }
}

impl Shared {
    fn lost(&self, why: &str) -> io::Error {
        io::Error::new(
            io::ErrorKind::ConnectionReset,
            format!("NBD connection to {} lost: {why}", self.uri),
        )
    }

    fn closed(&self) -> io::Error {
        io::Error::new(
            io::ErrorKind::ConnectionAborted,
            format!("NBD client for {} is shut down", self.uri),
        )
    }

    fn wake(&self) {
        if !self.wake_pending.swap(true, Ordering::AcqRel) {
            // Fails only if the counter would overflow, and it holds at most a few units.
            let _ = self.wake.write(1);
        }
    }

    /// Consumes a wake-up. Whatever was queued before it is seen by the worker's next round.
    /// The counter is read before the flag is cleared: a `wake` that writes after the clear is
    /// then never swallowed by this read.
    fn take_wake(&self) {
        // EAGAIN only if there was nothing to consume.
        let _ = self.wake.read();
        self.wake_pending.store(false, Ordering::Release);
    }

    /// Runs the timers that are not per request: the end of a shutdown's grace and of the
    /// reconnect window. Returns when the next one is due.
    fn timers(&self) -> Option<Instant> {
        let now = Instant::now();
        let mut next = None;
        let mut expired = Vec::new();
        let mut st = self.state.lock();
        if let Some(t) = st.close_at {
            if now >= t {
                self.closing.store(true, Ordering::Release);
            } else {
                next = Some(t);
            }
        }
        let delay = st.opts.reconnect_delay;
        // An end beyond what `Instant` can hold never comes.
        if let Some((end, why)) = match &st.link {
            Link::Down { since, why } => since.checked_add(delay).map(|e| (e, why)),
            _ => None,
        } {
            if now >= end {
                let why = why.clone();
                expired.extend(st.pending.drain().map(|(_, p)| p));
                drop(st);
                failed(expired, || self.lost(&why));
            } else if !st.pending.is_empty() {
                next = Some(next.map_or(end, |n: Instant| n.min(end)));
            }
        }
        next
    }

    /// Waits until `fd` is ready for `events` (a negative `fd`: just until `deadline`),
    /// running the timers meanwhile. Fails with `TimedOut` at the deadline and with
    /// `ConnectionAborted` when the client is closing.
    fn wait_fd(&self, fd: RawFd, events: i16, deadline: Instant) -> io::Result<()> {
        loop {
            let next = self.timers();
            if self.closing.load(Ordering::Acquire) {
                return Err(self.closed());
            }
            if Instant::now() >= deadline {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("no answer within {} s", HANDSHAKE_TIMEOUT.as_secs()),
                ));
            }
            let until = next.map_or(deadline, |n| n.min(deadline));
            let r = socket::poll(fd, events, self.wake.as_raw_fd(), Some(until))?;
            if r.woken {
                self.take_wake();
            }
            if fd >= 0 && r.socket != 0 {
                return Ok(());
            }
        }
    }

    /// Connects and completes the handshake, interruptibly and within [`HANDSHAKE_TIMEOUT`].
    fn connect_once(&self) -> io::Result<(Stream, Export)> {
        let deadline = Instant::now() + HANDSHAKE_TIMEOUT;
        let mut s = socket::connect(&self.addr, &mut |fd, ev| self.wait_fd(fd, ev, deadline))?;
        let export = handshake::negotiate(
            &mut Timed {
                s: &mut s,
                sh: self,
                deadline,
            },
            &self.export_name,
        )?;
        Ok((s, export))
    }

    /// Back on a connection: everything still pending is sent (again).
    fn up(&self) {
        let mut st = self.state.lock();
        st.link = Link::Up;
        let mut all: Vec<u64> = st.pending.keys().copied().collect();
        all.sort_unstable();
        st.outq = all;
    }

    /// The connection is gone: what was in flight waits for a reconnect, or fails when there is
    /// no reconnect window.
    fn down(&self, why: String) {
        tracing::warn!(uri = %self.uri, "NBD connection lost: {why}");
        let mut st = self.state.lock();
        st.outq.clear();
        st.sent.clear();
        let drained: Vec<Pending> = if st.opts.reconnect_delay.is_zero() {
            st.pending.drain().map(|(_, p)| p).collect()
        } else {
            st.pending.values_mut().for_each(|p| p.sent = false);
            Vec::new()
        };
        st.link = Link::Down {
            since: Instant::now(),
            why: why.clone(),
        };
        drop(st);
        failed(drained, || self.lost(&why));
    }

    /// The worker is gone: every read fails from now on.
    fn close_all(&self) {
        let mut st = self.state.lock();
        st.link = Link::Closed;
        let drained: Vec<Pending> = st.pending.drain().map(|(_, p)| p).collect();
        drop(st);
        failed(drained, || self.closed());
    }

    fn complete(&self, cookie: u64, r: io::Result<()>) {
        let p = self.state.lock().pending.remove(&cookie);
        if let Some(p) = p {
            let _ = p.tx.send(r);
        }
    }
}

/// The stream during the handshake: blocking-style reads and writes with a deadline, which also
/// keep the timers running and give way to a stop request.
struct Timed<'a> {
    s: &'a mut Stream,
    sh: &'a Shared,
    deadline: Instant,
}

impl Read for Timed<'_> {
    fn read(&mut self, b: &mut [u8]) -> io::Result<usize> {
        loop {
            match self.s.read(b) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    self.sh
                        .wait_fd(self.s.as_raw_fd(), libc::POLLIN, self.deadline)?
                }
                r => return r,
            }
        }
    }
}

impl Write for Timed<'_> {
    fn write(&mut self, b: &[u8]) -> io::Result<usize> {
        loop {
            match self.s.write(b) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    self.sh
                        .wait_fd(self.s.as_raw_fd(), libc::POLLOUT, self.deadline)?
                }
                r => return r,
            }
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// A connection to one NBD export, used read-only, kept up by a worker thread that reconnects
/// after a loss. Dropping it disconnects (NBD_CMD_DISC).
pub struct NbdClient {
    shared: Arc<Shared>,
    export: Export,
    worker: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for NbdClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NbdClient")
            .field("uri", &self.shared.uri)
            .field("size", &self.export.size)
            .finish()
    }
}

impl NbdClient {
    /// Connects to the export `uri` names and completes the handshake (blocking), with the
    /// default [`NbdOptions`].
    pub fn connect(uri: &str) -> io::Result<NbdClient> {
        Self::connect_with(uri, NbdOptions::default())
    }

    /// Like [`NbdClient::connect`] with explicit options.
    pub fn connect_with(uri: &str, opts: NbdOptions) -> io::Result<NbdClient> {
        let parsed = NbdUri::parse(uri)?;
        let ctx = |e: io::Error| io::Error::new(e.kind(), format!("NBD server {uri}: {e}"));
        let shared = Arc::new(Shared {
            uri: uri.to_string(),
            addr: parsed.addr,
            export_name: parsed.export,
            state: Mutex::new(State {
                opts,
                link: Link::Up,
                next_cookie: 1,
                pending: HashMap::new(),
                outq: Vec::new(),
                sent: VecDeque::new(),
                close_at: None,
            }),
            wake: EventFd::new(EFD_NONBLOCK).map_err(ctx)?,
            wake_pending: AtomicBool::new(false),
            closing: AtomicBool::new(false),
        });
        let (s, export) = shared.connect_once().map_err(ctx)?;
        let sh = shared.clone();
        let worker = std::thread::Builder::new()
            .name("nbd-client".into())
            .spawn(move || {
                // Should the worker ever panic, reads must fail rather than wait forever.
                let run = std::panic::AssertUnwindSafe(|| worker(&sh, s, export));
                if std::panic::catch_unwind(run).is_err() {
                    sh.close_all();
                }
            })
            .map_err(ctx)?;
        tracing::debug!(uri, size = export.size, "connected to NBD export");
        Ok(NbdClient {
            shared,
            export,
            worker: Some(worker),
        })
    }

    /// The export's size in bytes.
    pub fn size(&self) -> u64 {
        self.export.size
    }

    /// What the handshake established (size, flags, block-size limits).
    pub fn export(&self) -> Export {
        self.export
    }

    pub fn uri(&self) -> &str {
        &self.shared.uri
    }

    /// Changes the timeout and reconnect window; they apply to reads already in flight too.
    pub fn set_options(&self, opts: NbdOptions) {
        self.shared.state.lock().opts = opts;
        self.shared.wake();
    }

    pub fn options(&self) -> NbdOptions {
        self.shared.state.lock().opts
    }

    /// Stops the client within `grace`: reads still in flight then fail, later ones fail at once,
    /// and the connection is closed. For shutting down without waiting on the network.
    pub fn shutdown(&self, grace: Duration) {
        let at = Instant::now() + grace;
        let mut st = self.shared.state.lock();
        st.close_at = Some(st.close_at.map_or(at, |t| t.min(at)));
        drop(st);
        self.shared.wake();
    }

    /// Reads `buf.len()` bytes at `off`, which must lie inside the export.
    pub async fn read(&self, off: u64, buf: Buf) -> io::Result<()> {
        let len = buf.len() as u64;
        let size = self.export.size;
        if off.checked_add(len).is_none_or(|end| end > size) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("read [{off}, +{len}) past the end of NBD export ({size} bytes)"),
            ));
        }
        if len == 0 {
            return Ok(());
        }
        let min = self.export.min_block as u64;
        let start = off / min * min;
        let end = (off + len).div_ceil(min).saturating_mul(min).min(size);
        if start == off && end == off + len {
            return self.read_aligned(off, buf).await;
        }
        // The server wants aligned requests: read the covering blocks and copy out.
        let bounce = Buf::alloc((end - start) as usize);
        self.read_aligned(start, bounce.clone()).await?;
        buf.copy_from_buf(0, &bounce, (off - start) as usize, len as usize);
        Ok(())
    }

    /// Sends the read in pieces the server accepts, then waits for all of them.
    async fn read_aligned(&self, off: u64, buf: Buf) -> io::Result<()> {
        let max = self.export.max_block as usize;
        let mut replies = Vec::with_capacity(buf.len().div_ceil(max));
        let mut result = Ok(());
        let mut pos = 0;
        while pos < buf.len() {
            let n = (buf.len() - pos).min(max);
            match self.submit(off + pos as u64, buf.slice(pos, n)) {
                Ok(rx) => replies.push(rx),
                Err(e) => {
                    result = Err(e);
                    break;
                }
            }
            pos += n;
        }
        // Wait even after a failure: the caller gets `buf` back only once nobody writes to it.
        // Every piece ends: the worker bounds each wait (timeout, reconnect window, shutdown).
        for rx in replies {
            let r = rx
                .await
                .unwrap_or_else(|_| Err(self.shared.lost("request dropped")));
            if result.is_ok() {
                result = r;
            }
        }
        result
    }

    fn submit(&self, off: u64, buf: Buf) -> io::Result<oneshot::Receiver<io::Result<()>>> {
        let (tx, rx) = oneshot::channel();
        let mut st = self.shared.state.lock();
        if self.shared.closing.load(Ordering::Acquire) {
            return Err(self.shared.closed());
        }
        let up = match &st.link {
            Link::Up => true,
            Link::Closed => return Err(self.shared.closed()),
            Link::Down { since, why } => {
                if since.elapsed() >= st.opts.reconnect_delay {
                    return Err(self.shared.lost(why));
                }
                // Sent by the worker once it has reconnected.
                false
            }
        };
        let cookie = st.next_cookie;
        st.next_cookie += 1;
        st.pending.insert(
            cookie,
            Pending {
                off,
                buf,
                tx,
                sent: false,
            },
        );
        if up {
            st.outq.push(cookie);
        }
        drop(st);
        // Down: the worker must still fail the read when the reconnect window closes.
        self.shared.wake();
        Ok(rx)
    }
}

impl Drop for NbdClient {
    fn drop(&mut self) {
        self.shared.closing.store(true, Ordering::Release);
        self.shared.wake();
        // Every wait of the worker also watches the wake-up fd, so this join is prompt; reads
        // still in flight (their futures dropped) are failed, not waited for.
        if let Some(w) = self.worker.take() {
            let _ = w.join();
        }
    }
}

/// The worker thread: serves the connection, and re-establishes it after a loss, until closing.
fn worker(sh: &Shared, first: Stream, export: Export) {
    if let Some(hook) = READER_START.get() {
        hook();
    }
    let mut conn = Some(first);
    let mut backoff = BACKOFF_MIN;
    let mut failures = 0u32;
    while !sh.closing.load(Ordering::Acquire) {
        if let Some(s) = conn.take() {
            let why = transmit(sh, s);
            if sh.closing.load(Ordering::Acquire) {
                break;
            }
            sh.down(why);
            // The first attempt is immediate: the server may only have dropped this connection.
            backoff = BACKOFF_MIN;
            failures = 0;
        }
        let attempt = sh.connect_once().and_then(|(s, new)| {
            same_export(&export, &new)?;
            Ok(s)
        });
        match attempt {
            Ok(s) => {
                tracing::info!(uri = %sh.uri, "reconnected to the NBD server");
                sh.up();
                conn = Some(s);
            }
            Err(_) if sh.closing.load(Ordering::Acquire) => break,
            Err(e) => {
                failures += 1;
                if failures == 1 {
                    tracing::warn!(uri = %sh.uri, "cannot reconnect to the NBD server: {e}; retrying");
                } else {
                    tracing::debug!(uri = %sh.uri, failures, "reconnect failed: {e}");
                }
                // Only a stop request ends the pause early.
                let _ = sh.wait_fd(-1, 0, Instant::now() + backoff);
                backoff = (backoff * 2).min(BACKOFF_MAX);
            }
        }
    }
    sh.close_all();
}

/// A reconnect must find the same export: the same size, and block limits that the requests
/// (split by the first connection's limits) still satisfy.
fn same_export(old: &Export, new: &Export) -> io::Result<()> {
    if new.size != old.size || new.min_block > old.min_block || new.max_block < old.max_block {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!(
                "the export changed (size {} to {}, block sizes {}..{} to {}..{})",
                old.size, new.size, old.min_block, old.max_block, new.min_block, new.max_block
            ),
        ));
    }
    Ok(())
}

/// Reply being received: the header so far, or the data of a read.
#[derive(Default)]
struct Replies {
    header: [u8; 16],
    have: usize,
    data: Option<Incoming>,
}

struct Incoming {
    cookie: u64,
    buf: Buf,
    pos: usize,
}

impl Replies {
    /// Consumes received bytes, completing reads as their data arrives. An error means the
    /// stream cannot be trusted any more.
    fn feed(&mut self, sh: &Shared, mut d: &[u8]) -> Result<(), String> {
        while !d.is_empty() {
            if let Some(inc) = &mut self.data {
                let n = (inc.buf.len() - inc.pos).min(d.len());
                inc.buf.copy_from_slice(inc.pos, &d[..n]);
                inc.pos += n;
                d = &d[n..];
                if inc.pos == inc.buf.len() {
                    let cookie = inc.cookie;
                    self.data = None;
                    sh.complete(cookie, Ok(()));
                }
                continue;
            }
            let n = (16 - self.have).min(d.len());
            self.header[self.have..self.have + n].copy_from_slice(&d[..n]);
            self.have += n;
            d = &d[n..];
            if self.have < 16 {
                break;
            }
            self.have = 0;
            let h = &self.header;
            let magic = u32::from_be_bytes(h[0..4].try_into().expect("4 bytes"));
            let error = u32::from_be_bytes(h[4..8].try_into().expect("4 bytes"));
            let cookie = u64::from_be_bytes(h[8..16].try_into().expect("8 bytes"));
            if magic != SIMPLE_REPLY_MAGIC {
                return Err(if magic == STRUCTURED_REPLY_MAGIC {
                    "structured reply although none was negotiated".to_string()
                } else {
                    format!("bad reply magic {magic:#x}")
                });
            }
            // Stays pending until all its data is in, so the timeout covers a reply cut short.
            let buf = match sh.state.lock().pending.get(&cookie) {
                Some(p) if p.sent => p.buf.clone(),
                _ => return Err(format!("reply for unknown request {cookie}")),
            };
            if error != 0 {
                sh.complete(cookie, Err(reply_error(error)));
            } else if buf.is_empty() {
                sh.complete(cookie, Ok(()));
            } else {
                self.data = Some(Incoming {
                    cookie,
                    buf,
                    pos: 0,
                });
            }
        }
        Ok(())
    }
}

/// Writes as much of `out[*pos..]` as the socket takes now.
fn send_some(s: &mut Stream, out: &mut Vec<u8>, pos: &mut usize) -> io::Result<()> {
    while *pos < out.len() {
        match s.write(&out[*pos..]) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => *pos += n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    out.clear();
    *pos = 0;
    Ok(())
}

/// Serves one connection until it fails, stalls or the client closes; returns why it ended.
fn transmit(sh: &Shared, mut s: Stream) -> String {
    let fd = s.as_raw_fd();
    let mut out = Vec::new();
    let mut out_pos = 0;
    let mut replies = Replies::default();
    let mut inbuf = vec![0u8; 256 << 10];
    loop {
        let next_timer = sh.timers();
        if sh.closing.load(Ordering::Acquire) {
            if out.is_empty() {
                // Best effort: the socket is non-blocking and closed right after.
                let _ = s.write(&request(CMD_DISC, 0, 0, 0));
            }
            return "the client is closing".into();
        }
        // Queue new requests; find the oldest reply due.
        let now = Instant::now();
        let mut guard = sh.state.lock();
        let st = &mut *guard;
        for c in std::mem::take(&mut st.outq) {
            if let Some(p) = st.pending.get_mut(&c).filter(|p| !p.sent) {
                p.sent = true;
                out.extend_from_slice(&request(CMD_READ, c, p.off, p.buf.len() as u32));
                st.sent.push_back((now, c));
            }
        }
        while let Some(&(_, c)) = st.sent.front() {
            if st.pending.get(&c).is_some_and(|p| p.sent) {
                break;
            }
            st.sent.pop_front();
        }
        let mut due = None;
        let oldest = st.sent.front().copied();
        // A deadline beyond what `Instant` can hold never comes.
        let oldest_due = st.opts.timeout.zip(oldest);
        if let Some((t, c, end)) =
            oldest_due.and_then(|(t, (at, c))| at.checked_add(t).map(|end| (t, c, end)))
        {
            if now >= end {
                let p = st.pending.remove(&c);
                drop(guard);
                let why = format!("no reply within {} s", t.as_secs_f64());
                if let Some(p) = p {
                    let _ = p.tx.send(Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        format!("NBD server {}: {why}", sh.uri),
                    )));
                }
                return format!("{why}: the server is not responding");
            }
            due = Some(end);
        }
        drop(guard);
        if let Err(e) = send_some(&mut s, &mut out, &mut out_pos) {
            return format!("sending: {e}");
        }
        let until = match (due, next_timer) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        let events = libc::POLLIN | if out.is_empty() { 0 } else { libc::POLLOUT };
        let r = match socket::poll(fd, events, sh.wake.as_raw_fd(), until) {
            Ok(r) => r,
            Err(e) => return format!("poll: {e}"),
        };
        if r.woken {
            sh.take_wake();
        }
        if r.socket & !libc::POLLOUT != 0 {
            // Readable, hung up or failed: reading tells which.
            loop {
                match s.read(&mut inbuf) {
                    Ok(0) => return "server closed the connection".into(),
                    Ok(n) => {
                        if let Err(why) = replies.feed(sh, &inbuf[..n]) {
                            return why;
                        }
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => return format!("receiving: {e}"),
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn export(size: u64, min_block: u32, max_block: u32) -> Export {
        Export {
            size,
            transmission_flags: 0,
            min_block,
            max_block,
        }
    }

    #[test]
    fn a_reconnect_accepts_only_an_export_that_fits_the_requests() {
        let old = export(1 << 20, 512, 1 << 20);
        for ok in [
            old,
            export(1 << 20, 1, 32 << 20),
            export(1 << 20, 512, 2 << 20),
        ] {
            assert!(same_export(&old, &ok).is_ok(), "{ok:?}");
        }
        for bad in [
            export((1 << 20) + 512, 512, 1 << 20),
            export(1 << 20, 4096, 1 << 20),
            export(1 << 20, 512, 64 << 10),
        ] {
            let e = same_export(&old, &bad).unwrap_err();
            assert_eq!(e.kind(), io::ErrorKind::InvalidData, "{bad:?}");
            assert!(e.to_string().contains("export changed"), "{e}");
        }
    }
}
