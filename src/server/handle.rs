//! [`ServerHandle`]: what other threads (a control socket) use to look at and change a running
//! server. Each feature adds its fields and its own `impl ServerHandle` block.

use super::throttle::{Throttle, ThrottleConfig, ThrottleError};
use std::sync::Arc;

/// Cheap to clone; shared with the server for its whole life.
#[derive(Clone)]
pub struct ServerHandle {
    pub(crate) throttle: Arc<Throttle>,
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
