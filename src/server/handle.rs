//! What operations on a running server (the control socket's commands) reach: shared handles
//! only, never the queue workers' state, so no command waits on the data path.

use super::background::PrefetchJob;
use super::config::DeviceConfig;
use super::control::Control;
use super::listener::StopRequester;
use super::qmp::events::EventSink;
use super::stats::{EngineStats, Stats, StatsSnapshot};
use super::throttle::{Throttle, ThrottleConfig, ThrottleError};
use crate::engine::{Disk, EngineError};
use crate::io::uring::UringIo;
use parking_lot::Mutex;
use std::io;
use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use vhost::vhost_user::{Backend, VhostUserFrontendReqHandler};

/// A handle on the running server for its control plane.
#[derive(Clone)]
pub struct ServerHandle {
    pub disk: Arc<Disk<UringIo>>,
    /// Disk operations from a non-queue thread (`x-fvd-flush`); shared with the main thread,
    /// one driver at a time.
    pub control: Arc<Control>,
    pub events: Arc<EventSink>,
    pub prefetch: Arc<PrefetchJob>,
    pub stop: StopRequester,
    pub info: Arc<DiskInfo>,
    /// A frontend is connected.
    pub frontend: Arc<AtomicBool>,
    /// Per-queue request statistics, kept across connections.
    pub stats: Arc<Stats>,
    /// The disk's I/O limits, shared by every queue.
    pub throttle: Arc<Throttle>,
    /// The connected frontend's backend request channel (CONFIG_CHANGE_MSG after a resize).
    pub backend_req: Arc<FrontendChannel>,
}

/// How long sending CONFIG_CHANGE_MSG and waiting for the frontend's ack may take (QEMU answers
/// from its main loop at once); past it the resize is reported as not told, and the channel
/// fails (a late ack would answer the next message).
pub const BACKEND_REQ_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// The backend request channel of the connected frontend (SET_BACKEND_REQ_FD), if it set one
/// up: how the server tells it that the configuration space changed.
#[derive(Default)]
pub struct FrontendChannel {
    backend: Mutex<Option<Backend>>,
}

impl FrontendChannel {
    /// The channel of a new connection, or `None` once it ended.
    pub fn set(&self, backend: Option<Backend>) {
        *self.backend.lock() = backend;
    }

    /// Sends VHOST_USER_BACKEND_CONFIG_CHANGE_MSG (and waits for its ack when REPLY_ACK was
    /// negotiated). `Ok(false)`: no frontend has a channel; the next one reads the new
    /// configuration when it connects.
    pub fn config_changed(&self) -> io::Result<bool> {
        // Cloned out of the lock: the ack wait must not block a new connection's `set`.
        let Some(b) = self.backend.lock().clone() else {
            return Ok(false);
        };
        b.handle_config_change().map(|_| true)
    }
}

/// Why a control call failed.
#[derive(Debug, thiserror::Error)]
pub enum HandleError {
    #[error("resize to {size} bytes: {source}")]
    Resize {
        size: u64,
        #[source]
        source: EngineError,
    },
    #[error("disk resized to {size} bytes, but telling the frontend failed: {source}")]
    Notify {
        size: u64,
        #[source]
        source: io::Error,
    },
}

/// What the server serves, fixed at start.
#[derive(Debug, Clone)]
pub struct DiskInfo {
    pub image: PathBuf,
    /// "fvd" or "raw".
    pub format: &'static str,
    pub device: DeviceConfig,
    /// The base image as the header names it (FVD images with a base).
    pub base: Option<String>,
}

impl ServerHandle {
    /// Requests per queue and for the whole disk since the server started (across
    /// connections), and the engine's counters.
    pub fn stats(&self) -> StatsSnapshot {
        let (device, queues) = self.stats.requests();
        StatsSnapshot {
            device,
            queues,
            engine: EngineStats::of(&self.disk),
        }
    }
}

impl ServerHandle {
    /// Replaces the disk's I/O limits (QEMU's `block_set_io_throttle`). Requests already
    /// waiting are measured against the new limits at once; an invalid configuration is
    /// refused and changes nothing.
    pub fn set_throttle(&self, cfg: ThrottleConfig) -> Result<(), ThrottleError> {
        self.throttle.set_config(cfg)?;
        tracing::info!("I/O limits set: {cfg:?}");
        Ok(())
    }

    /// The disk's I/O limits now.
    pub fn throttle(&self) -> ThrottleConfig {
        self.throttle.config()
    }
}

impl ServerHandle {
    /// Grows the disk to `new_bytes` while it is served (QMP `block_resize`): the new size is
    /// durable in the image before the guest is told (the virtio-blk capacity in the
    /// configuration space, then CONFIG_CHANGE_MSG); requests past the old end fail until then.
    /// Shrinking a served disk is refused. Blocks the calling thread, which does the I/O on
    /// the server's control ring.
    pub fn resize(&self, new_bytes: u64) -> Result<(), HandleError> {
        let size = new_bytes;
        self.control
            .block_on(self.disk.grow(self.control.io(), size))
            .map_err(|source| HandleError::Resize { size, source })?;
        match self.backend_req.config_changed() {
            Ok(told) => {
                tracing::info!(
                    "disk resized to {size} bytes{}",
                    if told {
                        "; the frontend was told"
                    } else {
                        " (no frontend connected)"
                    }
                );
                Ok(())
            }
            Err(source) => Err(HandleError::Notify { size, source }),
        }
    }
}

#[cfg(test)]
mod tests {
    /// Control-plane threads clone and share it.
    #[test]
    fn the_handle_is_clone_send_and_sync() {
        fn shareable<T: Clone + Send + Sync + 'static>() {}
        shareable::<super::ServerHandle>();
    }

    use super::*;
    use std::io::{Read, Write};
    use std::os::unix::net::UnixStream;

    /// The frontend's reply to CONFIG_CHANGE_MSG: code 2, version 1 with the reply flag, a u64
    /// body (0: done).
    fn ack(value: u64) -> Vec<u8> {
        let mut reply = Vec::new();
        for v in [2u32, 0x1 | 0x4, 8] {
            reply.extend_from_slice(&v.to_le_bytes());
        }
        reply.extend_from_slice(&value.to_le_bytes());
        reply
    }

    /// The message on the wire, as QEMU's backend-channel reader takes it: code 2, no body,
    /// need-reply with REPLY_ACK; the frontend's ack (u64 0) completes the call.
    #[test]
    fn config_change_goes_to_the_frontend_and_waits_for_its_ack() {
        let ch = FrontendChannel::default();
        assert!(!ch.config_changed().unwrap(), "no frontend: nothing sent");
        let (a, mut fe) = UnixStream::pair().unwrap();
        let b = Backend::from_stream(a);
        b.set_reply_ack_flag(true);
        ch.set(Some(b));
        let frontend = std::thread::spawn(move || {
            let mut hdr = [0u8; 12];
            fe.read_exact(&mut hdr).unwrap();
            let w = |i: usize| u32::from_le_bytes(hdr[i * 4..i * 4 + 4].try_into().unwrap());
            assert_eq!(w(0), 2, "VHOST_USER_BACKEND_CONFIG_CHANGE_MSG");
            assert_eq!(w(1), 0x1 | 0x8, "version 1, need reply");
            assert_eq!(w(2), 0, "no body");
            fe.write_all(&ack(0)).unwrap();
            fe
        });
        assert!(ch.config_changed().unwrap());
        let mut fe = frontend.join().unwrap();
        // A frontend that answers with an error makes the call fail.
        let t = std::thread::spawn(move || {
            let mut hdr = [0u8; 12];
            fe.read_exact(&mut hdr).unwrap();
            fe.write_all(&ack(1)).unwrap();
        });
        assert!(ch.config_changed().is_err());
        t.join().unwrap();
        ch.set(None);
        assert!(!ch.config_changed().unwrap());
    }

    /// A frontend that reads the message but never acks: the wait ends at the timeout with an
    /// error, and the channel is failed from then on (an ack arriving late would otherwise
    /// answer the next message), so the next call fails at once without sending.
    #[test]
    fn a_frontend_that_never_acks_times_out_and_fails_the_channel() {
        let ch = FrontendChannel::default();
        let (a, mut fe) = UnixStream::pair().unwrap();
        let b = Backend::from_stream(a);
        b.set_reply_ack_flag(true);
        b.set_timeout(Some(std::time::Duration::from_millis(200)));
        ch.set(Some(b));
        let start = std::time::Instant::now();
        assert!(ch.config_changed().is_err());
        assert!(start.elapsed() >= std::time::Duration::from_millis(200));
        let mut hdr = [0u8; 12];
        fe.read_exact(&mut hdr).unwrap();
        assert_eq!(u32::from_le_bytes(hdr[..4].try_into().unwrap()), 2);
        // The late ack is never read as the answer to another message.
        fe.write_all(&ack(0)).unwrap();
        assert!(ch.config_changed().is_err());
        fe.set_nonblocking(true).unwrap();
        assert!(
            fe.read(&mut hdr).is_err(),
            "a failed channel sent another message"
        );
    }
}
