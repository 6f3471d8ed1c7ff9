//! `ServerHandle`: what the control plane (the QMP socket's `block_resize`) calls on a running
//! server. Clone + Send + Sync; other parts add their own fields and `impl ServerHandle` blocks.

use super::control::Control;
use crate::engine::{Disk, EngineError};
use crate::io::uring::UringIo;
use parking_lot::Mutex;
use std::io;
use std::sync::Arc;
use vhost::vhost_user::{Backend, VhostUserFrontendReqHandler};

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

/// Handle on a running server for its control plane. It shares the open disk: the image (and
/// its lock) is released only once the server and every handle are gone.
#[derive(Clone)]
pub struct ServerHandle {
    pub(super) disk: Arc<Disk<UringIo>>,
    pub(super) control: Arc<Control>,
    pub(super) frontend: Arc<FrontendChannel>,
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
        match self.frontend.config_changed() {
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
    use super::*;
    use std::io::{Read, Write};
    use std::os::unix::net::UnixStream;

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
            let mut reply = Vec::new();
            for v in [2u32, 0x1 | 0x4, 8] {
                reply.extend_from_slice(&v.to_le_bytes());
            }
            reply.extend_from_slice(&0u64.to_le_bytes());
            fe.write_all(&reply).unwrap();
            fe
        });
        assert!(ch.config_changed().unwrap());
        let mut fe = frontend.join().unwrap();
        // A frontend that answers with an error makes the call fail.
        let t = std::thread::spawn(move || {
            let mut hdr = [0u8; 12];
            fe.read_exact(&mut hdr).unwrap();
            let mut reply = Vec::new();
            for v in [2u32, 0x1 | 0x4, 8] {
                reply.extend_from_slice(&v.to_le_bytes());
            }
            reply.extend_from_slice(&1u64.to_le_bytes());
            fe.write_all(&reply).unwrap();
        });
        assert!(ch.config_changed().is_err());
        t.join().unwrap();
        ch.set(None);
        assert!(!ch.config_changed().unwrap());
    }
}
