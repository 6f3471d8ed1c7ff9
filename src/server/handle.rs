//! [`ServerHandle`]: what the control plane (metrics, a control socket) holds of a running
//! server. Cheap to clone, shareable across threads; each feature adds its fields and an
//! `impl ServerHandle` block of its own.

use super::stats::{EngineStats, Stats, StatsSnapshot};
use crate::engine::Disk;
use crate::io::uring::UringIo;
use std::sync::Arc;

#[derive(Clone)]
pub struct ServerHandle {
    pub(crate) disk: Arc<Disk<UringIo>>,
    pub(crate) stats: Arc<Stats>,
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

#[cfg(test)]
mod tests {
    /// Control-plane threads clone and share it.
    #[test]
    fn the_handle_is_clone_send_and_sync() {
        fn shareable<T: Clone + Send + Sync + 'static>() {}
        shareable::<super::ServerHandle>();
    }
}
