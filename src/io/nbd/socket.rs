//! Non-blocking sockets for the NBD client: connecting without blocking (a unix listener with a
//! full backlog, e.g. a stopped server, would block `connect(2)` forever) and waiting with
//! `poll(2)` on the socket and a wake-up eventfd together, so no wait outlasts a stop request.

use super::NbdAddr;
use std::io::{self, Read, Write};
use std::net::{IpAddr, SocketAddr, TcpStream, ToSocketAddrs};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::time::Instant;

/// A connected, non-blocking socket of either family.
pub enum Stream {
    Tcp(TcpStream),
    Unix(UnixStream),
}

impl AsRawFd for Stream {
    fn as_raw_fd(&self) -> RawFd {
        match self {
            Stream::Tcp(s) => s.as_raw_fd(),
            Stream::Unix(s) => s.as_raw_fd(),
        }
    }
}

impl Read for Stream {
    fn read(&mut self, b: &mut [u8]) -> io::Result<usize> {
        match self {
            Stream::Tcp(s) => s.read(b),
            Stream::Unix(s) => s.read(b),
        }
    }
}

impl Write for Stream {
    fn write(&mut self, b: &[u8]) -> io::Result<usize> {
        match self {
            Stream::Tcp(s) => s.write(b),
            Stream::Unix(s) => s.write(b),
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Readiness of the socket and of the wake-up fd after [`poll`].
pub struct Ready {
    pub socket: i16,
    pub woken: bool,
}

/// Waits until `fd` has one of `events`, `wake` is readable, or `until` passes (`None`: no
/// limit). A negative `fd` is ignored (only `wake` and the time are waited for).
pub fn poll(fd: RawFd, events: i16, wake: RawFd, until: Option<Instant>) -> io::Result<Ready> {
    let mut fds = [
        libc::pollfd {
            fd,
            events,
            revents: 0,
        },
        libc::pollfd {
            fd: wake,
            events: libc::POLLIN,
            revents: 0,
        },
    ];
    loop {
        let ms = match until {
            None => -1,
            Some(t) => {
                // Rounded up: waking a millisecond early would only loop.
                let left = t.saturating_duration_since(Instant::now());
                left.as_micros().div_ceil(1000).min(i32::MAX as u128) as i32
            }
        };
        // SAFETY: `fds` is a valid array of two pollfd structs for the duration of the call.
        let r = unsafe { libc::poll(fds.as_mut_ptr(), 2, ms) };
        if r >= 0 {
            return Ok(Ready {
                socket: fds[0].revents,
                woken: fds[1].revents != 0,
            });
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

fn new_socket(domain: libc::c_int) -> io::Result<OwnedFd> {
    // SAFETY: socket(2) with constant arguments; the result is checked below.
    let fd = unsafe {
        libc::socket(
            domain,
            libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            0,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` is a fresh descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Starts connecting `fd` to the address `sa` (of `len` bytes). True if already connected.
///
/// # Safety
/// `sa` must point to a socket address of `len` bytes.
unsafe fn start_connect(
    fd: &OwnedFd,
    sa: *const libc::sockaddr,
    len: libc::socklen_t,
) -> io::Result<bool> {
    // SAFETY: the caller guarantees `sa`/`len`; `fd` is an open socket.
    if unsafe { libc::connect(fd.as_raw_fd(), sa, len) } == 0 {
        return Ok(true);
    }
    let e = io::Error::last_os_error();
    match e.raw_os_error() {
        Some(libc::EINPROGRESS) => Ok(false),
        _ => Err(e),
    }
}

/// Waits for a started connect to finish and returns its outcome.
fn finish_connect(
    fd: &OwnedFd,
    wait: &mut dyn FnMut(RawFd, i16) -> io::Result<()>,
) -> io::Result<()> {
    wait(fd.as_raw_fd(), libc::POLLOUT)?;
    let mut err: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: SO_ERROR writes one c_int into `err`, whose size `len` states.
    let r = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_ERROR,
            (&mut err as *mut libc::c_int).cast(),
            &mut len,
        )
    };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    if err != 0 {
        return Err(io::Error::from_raw_os_error(err));
    }
    Ok(())
}

fn connect_unix(path: &std::path::Path) -> io::Result<OwnedFd> {
    use std::os::unix::ffi::OsStrExt;
    // SAFETY: sockaddr_un is plain data; all-zero is a valid value.
    let mut sa: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    sa.sun_family = libc::AF_UNIX as libc::sa_family_t;
    let p = path.as_os_str().as_bytes();
    // One byte stays zero: the path is NUL-terminated.
    if p.len() >= sa.sun_path.len() || p.contains(&0) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("socket path {} is too long or invalid", path.display()),
        ));
    }
    for (d, s) in sa.sun_path.iter_mut().zip(p) {
        *d = *s as libc::c_char;
    }
    let len = (std::mem::offset_of!(libc::sockaddr_un, sun_path) + p.len() + 1) as libc::socklen_t;
    let fd = new_socket(libc::AF_UNIX)?;
    // SAFETY: `sa` is a sockaddr_un of at least `len` bytes. A unix connect never returns
    // EINPROGRESS: it succeeds or fails (EAGAIN when the listener's backlog is full).
    unsafe { start_connect(&fd, (&sa as *const libc::sockaddr_un).cast(), len) }?;
    Ok(fd)
}

fn connect_tcp(
    a: SocketAddr,
    wait: &mut dyn FnMut(RawFd, i16) -> io::Result<()>,
) -> io::Result<OwnedFd> {
    let (fd, done) = match a {
        SocketAddr::V4(v4) => {
            // SAFETY: sockaddr_in is plain data; all-zero is a valid value.
            let mut sa: libc::sockaddr_in = unsafe { std::mem::zeroed() };
            sa.sin_family = libc::AF_INET as libc::sa_family_t;
            sa.sin_port = v4.port().to_be();
            sa.sin_addr.s_addr = u32::from_ne_bytes(v4.ip().octets());
            let fd = new_socket(libc::AF_INET)?;
            let len = std::mem::size_of_val(&sa) as libc::socklen_t;
            // SAFETY: `sa` is a sockaddr_in of `len` bytes.
            let done =
                unsafe { start_connect(&fd, (&sa as *const libc::sockaddr_in).cast(), len) }?;
            (fd, done)
        }
        SocketAddr::V6(v6) => {
            // SAFETY: sockaddr_in6 is plain data; all-zero is a valid value.
            let mut sa: libc::sockaddr_in6 = unsafe { std::mem::zeroed() };
            sa.sin6_family = libc::AF_INET6 as libc::sa_family_t;
            sa.sin6_port = v6.port().to_be();
            sa.sin6_flowinfo = v6.flowinfo();
            sa.sin6_addr.s6_addr = v6.ip().octets();
            sa.sin6_scope_id = v6.scope_id();
            let fd = new_socket(libc::AF_INET6)?;
            let len = std::mem::size_of_val(&sa) as libc::socklen_t;
            // SAFETY: `sa` is a sockaddr_in6 of `len` bytes.
            let done =
                unsafe { start_connect(&fd, (&sa as *const libc::sockaddr_in6).cast(), len) }?;
            (fd, done)
        }
    };
    if !done {
        finish_connect(&fd, wait)?;
    }
    Ok(fd)
}

/// Connects to `addr` without ever blocking in `connect(2)`; `wait(fd, events)` waits for
/// readiness (and fails on a deadline or a stop request).
pub fn connect(
    addr: &NbdAddr,
    wait: &mut dyn FnMut(RawFd, i16) -> io::Result<()>,
) -> io::Result<Stream> {
    match addr {
        NbdAddr::Unix(p) => Ok(Stream::Unix(UnixStream::from(connect_unix(p)?))),
        NbdAddr::Tcp { host, port } => {
            let mut last = None;
            // Name resolution blocks, bounded by the resolver's own timeouts.
            let addrs: Vec<SocketAddr> = match host.parse::<IpAddr>() {
                Ok(ip) => vec![SocketAddr::new(ip, *port)],
                Err(_) => (host.as_str(), *port).to_socket_addrs()?.collect(),
            };
            for a in addrs {
                match connect_tcp(a, wait) {
                    Ok(fd) => {
                        let s = TcpStream::from(fd);
                        // Requests are small and latency-bound.
                        s.set_nodelay(true)?;
                        return Ok(Stream::Tcp(s));
                    }
                    // A stop request or the deadline ends the attempt, not just this address.
                    Err(e)
                        if matches!(
                            e.kind(),
                            io::ErrorKind::TimedOut | io::ErrorKind::ConnectionAborted
                        ) =>
                    {
                        return Err(e)
                    }
                    Err(e) => last = Some(e),
                }
            }
            Err(last
                .unwrap_or_else(|| io::Error::new(io::ErrorKind::NotFound, "host has no address")))
        }
    }
}
