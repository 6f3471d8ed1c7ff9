//! What operations on a running server (the control socket's commands) reach: shared handles
//! only, never the queue workers' state, so no command waits on the data path.

use super::background::PrefetchJob;
use super::config::DeviceConfig;
use super::control::Control;
use super::listener::StopRequester;
use super::qmp::events::EventSink;
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
