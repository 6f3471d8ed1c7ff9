//! A small read-only NBD client, for base images on shared storage
//! (`nbd://HOST[:PORT]/EXPORT`, `nbd+unix:///EXPORT?socket=PATH`).
//!
//! Many reads may be in flight from many threads: a request is registered under a cookie and
//! written under a short mutex; one reader thread per connection reads the simple replies,
//! copies the data into the request's buffer and completes its future through a oneshot channel.
//! The buffer travels with the pending request, so a cancelled read still has somewhere to land.
//! When the connection dies every pending and later read fails; nothing waits for a reply that
//! cannot come.

mod handshake;
mod uri;

pub use handshake::Export;
pub use uri::{is_nbd_uri, NbdAddr, NbdUri, DEFAULT_PORT};

use super::Buf;
use futures::channel::oneshot;
use handshake::{reply_error, request, CMD_DISC, CMD_READ};
use handshake::{SIMPLE_REPLY_MAGIC, STRUCTURED_REPLY_MAGIC};
use parking_lot::Mutex;
use std::collections::HashMap;
use std::io::{self, BufReader, Read, Write};
use std::net::{Shutdown, TcpStream, ToSocketAddrs};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

/// Bounds connecting and the handshake, so a server that accepts but never answers cannot
/// stall opening an image forever. Transmission has no timeout (a slow server is not dead).
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(30);

/// A connected socket of either family.
enum Stream {
    Tcp(TcpStream),
    Unix(UnixStream),
}

impl Stream {
    fn connect(addr: &NbdAddr) -> io::Result<Stream> {
        match addr {
            NbdAddr::Unix(p) => Ok(Stream::Unix(UnixStream::connect(p)?)),
            NbdAddr::Tcp { host, port } => {
                let mut last = None;
                for a in (host.as_str(), *port).to_socket_addrs()? {
                    match TcpStream::connect_timeout(&a, HANDSHAKE_TIMEOUT) {
                        Ok(s) => {
                            // Requests are small and latency-bound.
                            s.set_nodelay(true)?;
                            return Ok(Stream::Tcp(s));
                        }
                        Err(e) => last = Some(e),
                    }
                }
                Err(last.unwrap_or_else(|| {
                    io::Error::new(io::ErrorKind::NotFound, "host has no address")
                }))
            }
        }
    }

    fn try_clone(&self) -> io::Result<Stream> {
        Ok(match self {
            Stream::Tcp(s) => Stream::Tcp(s.try_clone()?),
            Stream::Unix(s) => Stream::Unix(s.try_clone()?),
        })
    }

    fn shutdown(&self) {
        // Errors mean the socket is already shut down or dead: the goal is reached either way.
        let _ = match self {
            Stream::Tcp(s) => s.shutdown(Shutdown::Both),
            Stream::Unix(s) => s.shutdown(Shutdown::Both),
        };
    }

    fn set_timeouts(&self, t: Option<Duration>) -> io::Result<()> {
        match self {
            Stream::Tcp(s) => {
                s.set_read_timeout(t)?;
                s.set_write_timeout(t)
            }
            Stream::Unix(s) => {
                s.set_read_timeout(t)?;
                s.set_write_timeout(t)
            }
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

/// A read waiting for its reply.
struct Pending {
    buf: Buf,
    tx: oneshot::Sender<io::Result<()>>,
}

struct State {
    next_cookie: u64,
    pending: HashMap<u64, Pending>,
    /// Why the connection is unusable, once it is.
    dead: Option<String>,
}

struct Shared {
    uri: String,
    /// Requests are written whole under this lock so they never interleave.
    writer: Mutex<Stream>,
    /// For shutting the socket down without waiting for the writer lock.
    control: Stream,
    state: Mutex<State>,
    /// Set when we hang up ourselves: the reader then exits quietly.
    closing: AtomicBool,
}

impl Shared {
    fn lost(&self, why: &str) -> io::Error {
        io::Error::new(
            io::ErrorKind::ConnectionReset,
            format!("NBD connection to {} lost: {why}", self.uri),
        )
    }

    /// Marks the connection dead, fails every pending read and wakes the reader thread.
    fn fail(&self, why: String) {
        let (why, drained): (String, Vec<Pending>) = {
            let mut st = self.state.lock();
            if st.dead.is_none() {
                if !self.closing.load(Ordering::Relaxed) {
                    tracing::warn!(uri = %self.uri, "NBD connection lost: {why}");
                }
                st.dead = Some(why);
            }
            let why = st.dead.clone().unwrap_or_default();
            (why, st.pending.drain().map(|(_, p)| p).collect())
        };
        for p in drained {
            let _ = p.tx.send(Err(self.lost(&why)));
        }
        self.control.shutdown();
    }
}

/// A connection to one NBD export, used read-only. Dropping it disconnects (NBD_CMD_DISC).
pub struct NbdClient {
    shared: Arc<Shared>,
    export: Export,
    reader: Option<JoinHandle<()>>,
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
    /// Connects to the export `uri` names and completes the handshake (blocking).
    pub fn connect(uri: &str) -> io::Result<NbdClient> {
        let parsed = NbdUri::parse(uri)?;
        let ctx = |e: io::Error| io::Error::new(e.kind(), format!("NBD server {uri}: {e}"));
        let mut s = Stream::connect(&parsed.addr).map_err(ctx)?;
        s.set_timeouts(Some(HANDSHAKE_TIMEOUT)).map_err(ctx)?;
        let export = handshake::negotiate(&mut s, &parsed.export).map_err(ctx)?;
        s.set_timeouts(None).map_err(ctx)?;
        let shared = Arc::new(Shared {
            uri: uri.to_string(),
            writer: Mutex::new(s.try_clone().map_err(ctx)?),
            control: s.try_clone().map_err(ctx)?,
            state: Mutex::new(State {
                next_cookie: 1,
                pending: HashMap::new(),
                dead: None,
            }),
            closing: AtomicBool::new(false),
        });
        let sh = shared.clone();
        let reader = std::thread::Builder::new()
            .name("nbd-reader".into())
            .spawn(move || reader_loop(&sh, BufReader::with_capacity(64 << 10, s)))
            .map_err(ctx)?;
        tracing::debug!(uri, size = export.size, "connected to NBD export");
        Ok(NbdClient {
            shared,
            export,
            reader: Some(reader),
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
        let len = buf.len() as u32;
        let cookie = {
            let mut st = self.shared.state.lock();
            if let Some(why) = &st.dead {
                return Err(self.shared.lost(why));
            }
            let c = st.next_cookie;
            st.next_cookie += 1;
            st.pending.insert(c, Pending { buf, tx });
            c
        };
        let req = request(CMD_READ, cookie, off, len);
        if let Err(e) = self.shared.writer.lock().write_all(&req) {
            // A partly written request desynchronises the stream: the connection is done.
            self.shared.fail(format!("sending a request: {e}"));
        }
        // On failure `fail` has completed the receiver with the error.
        Ok(rx)
    }
}

impl Drop for NbdClient {
    fn drop(&mut self) {
        self.shared.closing.store(true, Ordering::Relaxed);
        if self.shared.state.lock().dead.is_none() {
            let mut w = self.shared.writer.lock();
            // A server that stopped reading must not block the drop.
            let _ = self
                .shared
                .control
                .set_timeouts(Some(Duration::from_secs(1)));
            let _ = w.write_all(&request(CMD_DISC, 0, 0, 0));
        }
        // Shutting the socket down ends the reader's blocking read; replies to reads still in
        // flight (their futures dropped) are not waited for.
        self.shared.control.shutdown();
        if let Some(r) = self.reader.take() {
            let _ = r.join();
        }
    }
}

fn reader_loop(shared: &Shared, mut rd: BufReader<Stream>) {
    crate::server::seccomp::enter_or_abort(crate::server::seccomp::ThreadKind::NbdReader);
    let mut scratch = vec![0u8; 64 << 10];
    let why = loop {
        let mut h = [0u8; 16];
        if let Err(e) = rd.read_exact(&mut h) {
            break match e.kind() {
                io::ErrorKind::UnexpectedEof => "server closed the connection".to_string(),
                _ => format!("receiving: {e}"),
            };
        }
        let magic = u32::from_be_bytes(h[0..4].try_into().expect("4 bytes"));
        let error = u32::from_be_bytes(h[4..8].try_into().expect("4 bytes"));
        let cookie = u64::from_be_bytes(h[8..16].try_into().expect("8 bytes"));
        if magic != SIMPLE_REPLY_MAGIC {
            break if magic == STRUCTURED_REPLY_MAGIC {
                "structured reply although none was negotiated".to_string()
            } else {
                format!("bad reply magic {magic:#x}")
            };
        }
        let Some(p) = shared.state.lock().pending.remove(&cookie) else {
            break format!("reply for unknown request {cookie}");
        };
        if error != 0 {
            let _ = p.tx.send(Err(reply_error(error)));
            continue;
        }
        // The data follows the header; copy it into the request's buffer piece by piece.
        let mut pos = 0;
        let mut failed = None;
        while pos < p.buf.len() {
            let n = (p.buf.len() - pos).min(scratch.len());
            if let Err(e) = rd.read_exact(&mut scratch[..n]) {
                failed = Some(format!("receiving read data: {e}"));
                break;
            }
            p.buf.copy_from_slice(pos, &scratch[..n]);
            pos += n;
        }
        if let Some(why) = failed {
            let _ = p.tx.send(Err(shared.lost(&why)));
            break why;
        }
        let _ = p.tx.send(Ok(()));
    };
    shared.fail(why);
}
