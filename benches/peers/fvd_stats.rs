//! Engine counters of a running `fvd serve` (guest requests and the host I/O they caused).

use crate::procs::Server;

#[derive(Clone, Copy, Debug, Default)]
pub struct FvdCounters {
    pub guest_writes: u64,
    pub guest_flushes: u64,
    pub host_writes: u64,
    pub host_flushes: u64,
}

/// Not exposed by the server yet.
pub fn read(_s: &Server) -> Option<FvdCounters> {
    None
}
