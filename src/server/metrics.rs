//! `fvd serve --metrics ADDR`: the statistics ([`super::stats`]) as Prometheus metrics, served
//! over HTTP (`GET /metrics`) on a unix socket or a loopback TCP address.
//!
//! The endpoint is one rust-vmm `event-manager` subscriber ([`MetricsEndpoint`]) on a
//! control-plane thread of its own, never on the data path: it reads the queues' counters
//! (plain loads) and the engine's. Every socket is non-blocking; the subscriber registers the
//! listener, a timer and each connection with its own token, so a slow scraper only ever holds
//! its own connection: a request is at most [`MAX_REQUEST`] bytes, a connection lives at most
//! [`CONN_TIMEOUT`] and at most [`MAX_CONNS`] are open at once (more are closed at accept). One
//! subscriber rather than one per connection: a subscriber added by another cannot learn its
//! own id to remove itself when its connection ends.

use super::handle::ServerHandle;
use super::seccomp::{enter_or_abort, ThreadKind};
use super::stats::{bucket_bound_ns, StatsSnapshot, BUCKETS, OP_KINDS};
use event_manager::{EventManager, EventOps, Events, MutEventSubscriber, SubscriberOps};
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, NoLabelSet};
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::{Registry, Unit};
use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::timerfd::TimerFd;

/// Bytes of an HTTP request (line and headers) read at most; a longer one is answered 431.
pub const MAX_REQUEST: usize = 8192;
/// How long a connection may take from accept to the last byte of the answer.
pub const CONN_TIMEOUT: Duration = Duration::from_secs(10);
/// Scrapers served at once.
pub const MAX_CONNS: usize = 16;
/// How often deadlines are checked.
const SWEEP: Duration = Duration::from_millis(500);
/// How long the thread sleeps in epoll before looking at its stop flag.
const STOP_POLL_MS: i32 = 200;

const TOKEN_LISTENER: u32 = 0;
const TOKEN_TIMER: u32 = 1;
const FIRST_CONN_TOKEN: u32 = 2;

/// Where the endpoint listens.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum MetricsAddr {
    Unix(PathBuf),
    Tcp(SocketAddr),
}

impl std::fmt::Display for MetricsAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            MetricsAddr::Unix(p) => write!(f, "{}", p.display()),
            MetricsAddr::Tcp(a) => write!(f, "{a}"),
        }
    }
}

/// `--metrics`: an IP address with a port is TCP and must be loopback (the metrics are not
/// authenticated); anything with a `/` or without a `:` is a unix socket path.
pub fn parse_addr(s: &str) -> Result<MetricsAddr, String> {
    if s.is_empty() {
        return Err("give a unix socket path or a loopback address such as 127.0.0.1:9100".into());
    }
    if s.contains('/') || !s.contains(':') {
        return Ok(MetricsAddr::Unix(PathBuf::from(s)));
    }
    let addr: SocketAddr = s.parse().map_err(|_| {
        format!(
            "{s:?} is neither an IP address with a port (127.0.0.1:9100, [::1]:9100) nor a unix \
             socket path (give one with a '/', e.g. ./{s})"
        )
    })?;
    if !addr.ip().is_loopback() {
        return Err(format!(
            "{addr} is not a loopback address: the metrics endpoint has no authentication, so it \
             listens only on 127.0.0.0/8 or ::1 (put a proxy in front to export it)"
        ));
    }
    Ok(MetricsAddr::Tcp(addr))
}

#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    #[error("metrics endpoint {addr}: {source}")]
    Socket {
        addr: MetricsAddr,
        source: super::listener::ListenerError,
    },
    #[error("metrics endpoint {addr}: cannot {op}: {source}")]
    Io {
        addr: MetricsAddr,
        op: &'static str,
        source: io::Error,
    },
    #[error("metrics endpoint: cannot start its thread: {0}")]
    Thread(io::Error),
}

enum Listener {
    Unix(UnixListener),
    Tcp(TcpListener),
}

/// A bound endpoint, not yet served.
pub struct Bound {
    listener: Listener,
    addr: MetricsAddr,
    /// (device, inode) of the socket file we created, so that only ours is ever removed.
    file: Option<(u64, u64)>,
}

/// Binds `addr`: a stale unix socket (nobody accepting) is replaced, a live one or another kind
/// of file is an error.
pub fn bind(addr: &MetricsAddr) -> Result<Bound, MetricsError> {
    let io_err = |op| {
        move |source| MetricsError::Io {
            addr: addr.clone(),
            op,
            source,
        }
    };
    let (listener, file) = match addr {
        MetricsAddr::Tcp(a) => (
            Listener::Tcp(TcpListener::bind(a).map_err(io_err("bind"))?),
            None,
        ),
        MetricsAddr::Unix(path) => {
            // As the vhost-user socket: a stale socket replaced, one in use refused, mode 0600
            // from the start.
            let (l, id) =
                super::listener::bind_unix(path, 0o600).map_err(|source| MetricsError::Socket {
                    addr: addr.clone(),
                    source,
                })?;
            (Listener::Unix(l), Some(id))
        }
    };
    match &listener {
        Listener::Unix(l) => l.set_nonblocking(true),
        Listener::Tcp(l) => l.set_nonblocking(true),
    }
    .map_err(io_err("make non-blocking"))?;
    Ok(Bound {
        listener,
        addr: addr.clone(),
        file,
    })
}

impl Bound {
    /// The address actually bound (a TCP port 0 becomes the port the kernel chose).
    pub fn local_addr(&self) -> MetricsAddr {
        match &self.listener {
            Listener::Tcp(l) => l
                .local_addr()
                .map_or_else(|_| self.addr.clone(), MetricsAddr::Tcp),
            Listener::Unix(_) => self.addr.clone(),
        }
    }

    /// Serves on a thread of its own (`fvd-metrics`) until the returned handle is stopped.
    pub fn start(self, server: ServerHandle) -> Result<Running, MetricsError> {
        let stop = Arc::new(AtomicBool::new(false));
        let file = match (&self.addr, self.file) {
            (MetricsAddr::Unix(p), Some(id)) => Some((p.clone(), id)),
            _ => None,
        };
        let addr = self.addr.clone();
        let flag = stop.clone();
        let thread = std::thread::Builder::new()
            .name("fvd-metrics".into())
            .spawn(move || {
                if let Err(e) = serve(self, server, &flag) {
                    tracing::error!("metrics endpoint {addr}: {e}; no longer serving metrics");
                }
            })
            .map_err(MetricsError::Thread)?;
        Ok(Running {
            stop,
            thread: Some(thread),
            file,
        })
    }
}

/// The serving thread: its event loop, set up before its filter (epoll, timer), then filtered.
fn serve(
    bound: Bound,
    server: ServerHandle,
    stop: &AtomicBool,
) -> Result<(), event_manager::Error> {
    let mut mgr: EventManager<Box<dyn MutEventSubscriber + Send>> = EventManager::new()?;
    let endpoint = MetricsEndpoint::new(bound, server)
        .map_err(|e| event_manager::Error::Epoll(vmm_sys_util::errno::Error::from(e)))?;
    mgr.add_subscriber(Box::new(endpoint));
    enter_or_abort(ThreadKind::Metrics);
    while !stop.load(Ordering::Acquire) {
        mgr.run_with_timeout(STOP_POLL_MS)?;
    }
    Ok(())
}

/// The serving thread; [`Running::stop`] ends it and removes the socket file.
pub struct Running {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
    file: Option<(PathBuf, (u64, u64))>,
}

impl Running {
    pub fn stop(mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        if let Some((path, id)) = &self.file {
            super::listener::remove_if_same(path, *id);
        }
    }
}

enum Stream {
    Unix(UnixStream),
    Tcp(TcpStream),
}

impl Stream {
    fn fd(&self) -> RawFd {
        match self {
            Stream::Unix(s) => s.as_raw_fd(),
            Stream::Tcp(s) => s.as_raw_fd(),
        }
    }
    fn read(&mut self, b: &mut [u8]) -> io::Result<usize> {
        match self {
            Stream::Unix(s) => s.read(b),
            Stream::Tcp(s) => s.read(b),
        }
    }
    fn write(&mut self, b: &[u8]) -> io::Result<usize> {
        match self {
            Stream::Unix(s) => s.write(b),
            Stream::Tcp(s) => s.write(b),
        }
    }
}

struct Conn {
    stream: Stream,
    deadline: Instant,
    /// The request so far, then (once answered) empty.
    request: Vec<u8>,
    /// The answer and how much of it was sent.
    answer: Option<(Vec<u8>, usize)>,
}

/// The metrics endpoint as an event-manager subscriber: the listener, a deadline timer and
/// every scraper's connection.
pub struct MetricsEndpoint {
    listener: Listener,
    timer: TimerFd,
    conns: HashMap<u32, Conn>,
    next_token: u32,
    registry: Registry,
    /// The listener is out of the epoll after an accept error (out of descriptors: it would
    /// stay readable and spin the thread); the next sweep puts it back.
    listener_paused: bool,
}

impl MetricsEndpoint {
    fn new(bound: Bound, server: ServerHandle) -> io::Result<MetricsEndpoint> {
        let mut timer = TimerFd::new().map_err(io::Error::from)?;
        timer.reset(SWEEP, Some(SWEEP)).map_err(io::Error::from)?;
        let mut registry = Registry::with_prefix("fvd");
        registry.register_collector(Box::new(Collect(server)));
        Ok(MetricsEndpoint {
            listener: bound.listener,
            timer,
            conns: HashMap::new(),
            next_token: FIRST_CONN_TOKEN,
            registry,
            listener_paused: false,
        })
    }

    fn listener_fd(&self) -> RawFd {
        match &self.listener {
            Listener::Unix(l) => l.as_raw_fd(),
            Listener::Tcp(l) => l.as_raw_fd(),
        }
    }

    fn accept_all(&mut self, ops: &mut EventOps) {
        loop {
            let accepted = match &self.listener {
                Listener::Unix(l) => l.accept().map(|(s, _)| Stream::Unix(s)),
                Listener::Tcp(l) => l.accept().map(|(s, _)| Stream::Tcp(s)),
            };
            let stream = match accepted {
                Ok(s) => s,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                // Out of descriptors or the like: retry at the next sweep.
                Err(e) => {
                    tracing::debug!("metrics: accept failed: {e}");
                    let l = Events::empty_raw(self.listener_fd());
                    self.listener_paused = ops.remove(l).is_ok();
                    return;
                }
            };
            // Dropping the stream closes it: a full house turns further scrapers away.
            if self.conns.len() >= MAX_CONNS {
                continue;
            }
            let nb = match &stream {
                Stream::Unix(s) => s.set_nonblocking(true),
                Stream::Tcp(s) => s.set_nonblocking(true),
            };
            if nb.is_err() {
                continue;
            }
            let token = self.next_token;
            // Tokens wrap past u32::MAX back to the first connection token.
            self.next_token = self.next_token.checked_add(1).unwrap_or(FIRST_CONN_TOKEN);
            if self.conns.contains_key(&token)
                || ops
                    .add(Events::with_data_raw(stream.fd(), token, EventSet::IN))
                    .is_err()
            {
                continue;
            }
            self.conns.insert(
                token,
                Conn {
                    stream,
                    deadline: Instant::now() + CONN_TIMEOUT,
                    request: Vec::new(),
                    answer: None,
                },
            );
        }
    }

    fn close(&mut self, token: u32, ops: &mut EventOps) {
        if let Some(c) = self.conns.remove(&token) {
            let _ = ops.remove(Events::empty_raw(c.stream.fd()));
        }
    }

    /// Reads, answers, writes; returns whether the connection is finished.
    fn serve_conn(&mut self, token: u32, ops: &mut EventOps) -> bool {
        let Some(c) = self.conns.get_mut(&token) else {
            return false;
        };
        if c.answer.is_none() {
            let mut buf = [0u8; 1024];
            loop {
                match c.stream.read(&mut buf) {
                    Ok(0) => return true,
                    Ok(n) => {
                        let room = MAX_REQUEST.saturating_sub(c.request.len());
                        c.request.extend_from_slice(&buf[..n.min(room)]);
                        if c.request.len() >= MAX_REQUEST || head_end(&c.request).is_some() {
                            break;
                        }
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => return false,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(_) => return true,
                }
            }
            let answer = match head_end(&c.request) {
                Some(end) => answer(&c.request[..end], &self.registry),
                None => response(431, "text/plain", "request header too large\n".into()),
            };
            c.request = Vec::new();
            c.answer = Some((answer, 0));
            if ops
                .modify(Events::with_data_raw(c.stream.fd(), token, EventSet::OUT))
                .is_err()
            {
                return true;
            }
        }
        let Some((out, sent)) = &mut c.answer else {
            return true;
        };
        while *sent < out.len() {
            match c.stream.write(&out[*sent..]) {
                Ok(0) => return true,
                Ok(n) => *sent += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return false,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => return true,
            }
        }
        true
    }

    fn sweep(&mut self, ops: &mut EventOps) {
        let now = Instant::now();
        let late: Vec<u32> = self
            .conns
            .iter()
            .filter(|(_, c)| c.deadline <= now)
            .map(|(&t, _)| t)
            .collect();
        for t in late {
            self.close(t, ops);
        }
        if self.listener_paused {
            let l = Events::with_data_raw(self.listener_fd(), TOKEN_LISTENER, EventSet::IN);
            self.listener_paused = ops.add(l).is_err();
        }
    }
}

impl MutEventSubscriber for MetricsEndpoint {
    fn init(&mut self, ops: &mut EventOps) {
        let l = Events::with_data_raw(self.listener_fd(), TOKEN_LISTENER, EventSet::IN);
        let t = Events::with_data(&self.timer, TOKEN_TIMER, EventSet::IN);
        for e in [l, t] {
            if let Err(err) = ops.add(e) {
                tracing::error!("metrics: cannot watch fd {}: {err}", e.fd());
            }
        }
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        match events.data() {
            TOKEN_LISTENER => self.accept_all(ops),
            TOKEN_TIMER => {
                let _ = self.timer.wait();
                self.sweep(ops);
            }
            token => {
                let broken = events.event_set().contains(EventSet::ERROR);
                if broken || self.serve_conn(token, ops) {
                    self.close(token, ops);
                }
            }
        }
    }
}

/// Where the request's head (line and headers) ends, if it is complete.
fn head_end(req: &[u8]) -> Option<usize> {
    req.windows(4).position(|w| w == b"\r\n\r\n")
}

/// The answer to one request head.
fn answer(head: &[u8], registry: &Registry) -> Vec<u8> {
    let head = String::from_utf8_lossy(head);
    let mut lines = head.split("\r\n");
    let mut first = lines.next().unwrap_or("").split(' ');
    let (method, target) = (first.next().unwrap_or(""), first.next().unwrap_or(""));
    let path = target.split('?').next().unwrap_or("");
    if method != "GET" {
        return response(405, "text/plain", "only GET is served\n".into());
    }
    if path != "/metrics" {
        return response(404, "text/plain", "the metrics are at /metrics\n".into());
    }
    let openmetrics = lines.any(|l| {
        l.split_once(':').is_some_and(|(k, v)| {
            k.trim().eq_ignore_ascii_case("accept") && v.contains("application/openmetrics-text")
        })
    });
    let mut body = String::new();
    let (encoded, ctype) = if openmetrics {
        (
            prometheus_client::encoding::text::encode(&mut body, registry),
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )
    } else {
        (
            prometheus_client::encoding::prometheus_text::encode(&mut body, registry),
            prometheus_client::encoding::prometheus_text::CONTENT_TYPE,
        )
    };
    match encoded {
        Ok(()) => response(200, ctype, body),
        Err(_) => response(500, "text/plain", "encoding the metrics failed\n".into()),
    }
}

fn response(code: u16, ctype: &str, body: String) -> Vec<u8> {
    let reason = match code {
        200 => "OK",
        404 => "Not Found",
        405 => "Method Not Allowed",
        431 => "Request Header Fields Too Large",
        _ => "Internal Server Error",
    };
    let mut out = format!(
        "HTTP/1.1 {code} {reason}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\n\
         Connection: close\r\n\r\n",
        body.len()
    )
    .into_bytes();
    out.extend_from_slice(body.as_bytes());
    out
}

/// Renders a fresh [`StatsSnapshot`] at each scrape.
struct Collect(ServerHandle);

impl std::fmt::Debug for Collect {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("fvd statistics")
    }
}

impl Collector for Collect {
    fn encode(&self, enc: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        encode_snapshot(&self.0.stats(), enc)
    }
}

/// Writes every metric of `s`. Per-queue series only: the disk's figure is their sum.
pub fn encode_snapshot(
    s: &StatsSnapshot,
    mut enc: DescriptorEncoder,
) -> Result<(), std::fmt::Error> {
    let queue_op = |q: usize, op: &str| [("queue", q.to_string()), ("op", op.to_string())];
    {
        let mut m = enc.encode_descriptor(
            "requests",
            "Requests completed successfully, by queue and kind",
            None,
            MetricType::Counter,
        )?;
        for (q, qs) in s.queues.iter().enumerate() {
            for op in OP_KINDS {
                let v = qs.ops.get(op.name()).map_or(0, |o| o.operations);
                m.encode_family(&queue_op(q, op.name()))?
                    .encode_counter::<NoLabelSet, _, u64>(&v, None)?;
            }
        }
    }
    {
        let mut m = enc.encode_descriptor(
            "request",
            "Bytes moved by requests completed successfully (discard and write-zeroes: the \
             ranges' length)",
            Some(&Unit::Bytes),
            MetricType::Counter,
        )?;
        for (q, qs) in s.queues.iter().enumerate() {
            for op in OP_KINDS {
                let v = qs.ops.get(op.name()).map_or(0, |o| o.bytes);
                m.encode_family(&queue_op(q, op.name()))?
                    .encode_counter::<NoLabelSet, _, u64>(&v, None)?;
            }
        }
    }
    {
        let mut m = enc.encode_descriptor(
            "request_errors",
            "Requests that failed: kind io_error (the disk failed, the guest got IOERR) or \
             invalid (refused as malformed, out of range or not allowed)",
            None,
            MetricType::Counter,
        )?;
        for (q, qs) in s.queues.iter().enumerate() {
            for op in OP_KINDS {
                let o = qs.ops.get(op.name()).cloned().unwrap_or_default();
                for (kind, v) in [
                    ("io_error", o.failed_operations),
                    ("invalid", o.invalid_operations),
                ] {
                    let l = [
                        ("queue", q.to_string()),
                        ("op", op.name().to_string()),
                        ("kind", kind.to_string()),
                    ];
                    m.encode_family(&l)?
                        .encode_counter::<NoLabelSet, _, u64>(&v, None)?;
                }
            }
        }
    }
    {
        let mut m = enc.encode_descriptor(
            "rejected_requests",
            "Descriptor chains refused at parse time, by reason (including those whose type \
             was unreadable or unknown)",
            None,
            MetricType::Counter,
        )?;
        for (q, qs) in s.queues.iter().enumerate() {
            for (reason, v) in &qs.rejected {
                let l = [("queue", q.to_string()), ("reason", reason.to_string())];
                m.encode_family(&l)?
                    .encode_counter::<NoLabelSet, _, u64>(v, None)?;
            }
        }
    }
    {
        let mut m = enc.encode_descriptor(
            "requests_in_flight",
            "Requests taken off the ring and not yet completed",
            None,
            MetricType::Gauge,
        )?;
        for (q, qs) in s.queues.iter().enumerate() {
            m.encode_family(&[("queue", q.to_string())])?
                .encode_gauge(&qs.in_flight)?;
        }
    }
    {
        let mut m = enc.encode_descriptor(
            "request_duration",
            "Time from taking a request off the ring to publishing it in the used ring",
            Some(&Unit::Seconds),
            MetricType::Histogram,
        )?;
        for (q, qs) in s.queues.iter().enumerate() {
            for op in OP_KINDS {
                let o = qs.ops.get(op.name()).cloned().unwrap_or_default();
                let buckets: Vec<(f64, u64)> = (0..BUCKETS)
                    .map(|i| {
                        let le = bucket_bound_ns(i).map_or(f64::INFINITY, |ns| ns as f64 / 1e9);
                        (le, o.latency.counts[i])
                    })
                    .collect();
                m.encode_family(&queue_op(q, op.name()))?
                    .encode_histogram::<NoLabelSet>(
                        o.total_time_ns as f64 / 1e9,
                        o.latency.count(),
                        &buckets,
                        None,
                    )?;
            }
        }
    }
    let c = &s.engine.counters;
    let counters: [(&str, &str, Option<Unit>, u64); 15] = [
        (
            "host_reads",
            "Reads of the image's storage",
            None,
            c.host_reads,
        ),
        (
            "host_writes",
            "Writes to the image's storage",
            None,
            c.host_writes,
        ),
        (
            "host_flushes",
            "Flushes of the image's storage",
            None,
            c.host_flushes,
        ),
        (
            "host_read",
            "Bytes read from the image's storage",
            Some(Unit::Bytes),
            c.host_bytes_read,
        ),
        (
            "host_written",
            "Bytes written to the image's storage",
            Some(Unit::Bytes),
            c.host_bytes_written,
        ),
        ("base_reads", "Reads of the base image", None, c.base_reads),
        ("journal_writes", "Journal writes", None, c.journal_writes),
        (
            "journal_intents",
            "Intent records journaled before a write or discard completed",
            None,
            c.journal_intents,
        ),
        (
            "journal_unordered",
            "Journal writes made durable by the same flush as their data",
            None,
            c.journal_unordered,
        ),
        ("checkpoints", "Metadata checkpoints", None, c.checkpoints),
        (
            "chunks_allocated",
            "Chunks of storage allocated",
            None,
            c.chunks_allocated,
        ),
        (
            "bounced",
            "Host I/O bounced through an aligned buffer",
            None,
            c.bounced,
        ),
        (
            "zero_ranges",
            "Ranges made to read as zeros without writing them",
            None,
            c.host_zeroes,
        ),
        (
            "copy_on_read",
            "Bytes copied from the base image by copy-on-read",
            Some(Unit::Bytes),
            c.cor_bytes,
        ),
        (
            "prefetch",
            "Bytes copied from the base image by prefetching",
            Some(Unit::Bytes),
            c.prefetch_bytes,
        ),
    ];
    for (name, help, unit, v) in &counters {
        enc.encode_descriptor(name, help, unit.as_ref(), MetricType::Counter)?
            .encode_counter::<NoLabelSet, _, u64>(v, None)?;
    }
    let gauges = [
        (
            "disk_size",
            "The disk's size as the guest sees it",
            Some(s.engine.virtual_size),
        ),
        (
            "base_remaining",
            "Bytes still read from the base image (neither written nor copied yet)",
            s.engine.base_remaining_bytes,
        ),
        (
            "storage_free",
            "Free bytes of a thin image's block device",
            s.engine.free_bytes,
        ),
    ];
    for (name, help, v) in gauges {
        if let Some(v) = v {
            enc.encode_descriptor(name, help, Some(&Unit::Bytes), MetricType::Gauge)?
                .encode_gauge(&v)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_are_unix_paths_or_loopback_tcp() {
        assert_eq!(
            parse_addr("/run/fvd/m.sock"),
            Ok(MetricsAddr::Unix("/run/fvd/m.sock".into()))
        );
        assert_eq!(
            parse_addr("metrics.sock"),
            Ok(MetricsAddr::Unix("metrics.sock".into()))
        );
        assert_eq!(
            parse_addr("127.0.0.1:9100"),
            Ok(MetricsAddr::Tcp("127.0.0.1:9100".parse().unwrap()))
        );
        assert_eq!(
            parse_addr("[::1]:9100"),
            Ok(MetricsAddr::Tcp("[::1]:9100".parse().unwrap()))
        );
        let e = parse_addr("0.0.0.0:9100").unwrap_err();
        assert!(e.contains("not a loopback address"), "{e}");
        let e = parse_addr("192.168.1.2:9100").unwrap_err();
        assert!(e.contains("not a loopback address"), "{e}");
        let e = parse_addr("localhost:9100").unwrap_err();
        assert!(e.contains("neither an IP address"), "{e}");
        assert!(parse_addr("").is_err());
    }

    #[test]
    fn answers_get_metrics_only() {
        let r = Registry::default();
        let text = |head: &str| String::from_utf8(answer(head.as_bytes(), &r)).unwrap();
        let ok = text("GET /metrics HTTP/1.1\r\nHost: x");
        assert!(ok.starts_with("HTTP/1.1 200 OK\r\n"), "{ok}");
        assert!(
            ok.contains("Content-Type: text/plain; version=0.0.4"),
            "{ok}"
        );
        let om =
            text("GET /metrics?x=1 HTTP/1.1\r\nACCEPT: application/openmetrics-text;version=1.0.0");
        assert!(
            om.contains("Content-Type: application/openmetrics-text"),
            "{om}"
        );
        assert!(om.ends_with("# EOF\n"), "{om}");
        assert!(text("GET / HTTP/1.1").starts_with("HTTP/1.1 404 "));
        assert!(text("POST /metrics HTTP/1.1").starts_with("HTTP/1.1 405 "));
        assert!(text("").starts_with("HTTP/1.1 405 "));
        assert_eq!(head_end(b"GET / HTTP/1.1\r\n\r\nrest"), Some(14));
        assert_eq!(head_end(b"GET / HTTP/1.1\r\n"), None);
    }
}
