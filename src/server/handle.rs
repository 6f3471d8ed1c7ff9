//! What operations on a running server (the control socket's commands) reach: shared handles
//! only, never the queue workers' state, so no command waits on the data path.

use super::background::PrefetchJob;
use super::config::DeviceConfig;
use super::control::Control;
use super::listener::StopRequester;
use super::qmp::events::EventSink;
use super::stats::{EngineStats, Stats, StatsSnapshot};
use super::throttle::{Throttle, ThrottleConfig, ThrottleError};
use crate::engine::Disk;
use crate::io::uring::UringIo;
use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

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

#[cfg(test)]
mod tests {
    /// Control-plane threads clone and share it.
    #[test]
    fn the_handle_is_clone_send_and_sync() {
        fn shareable<T: Clone + Send + Sync + 'static>() {}
        shareable::<super::ServerHandle>();
    }
}
