//! Engine counters of a running `fvd serve` (guest requests and the host I/O they caused). The
//! server logs them as JSON at info level when a frontend disconnects
//! ("frontend disconnected; counters: {...}"), cumulative since it started.

use std::path::Path;
use std::time::{Duration, Instant};

#[derive(Clone, Copy, Debug, Default)]
pub struct FvdCounters {
    pub guest_writes: u64,
    pub guest_flushes: u64,
    pub host_writes: u64,
    pub host_flushes: u64,
}

/// Waits (up to 10 s) until the server log at `log` holds `n` counter lines; returns the n-th.
pub fn wait_for(log: &Path, n: usize) -> Result<FvdCounters, String> {
    let t0 = Instant::now();
    loop {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        if let Some(json) = text
            .lines()
            .filter_map(|l| l.split_once("counters: ").map(|(_, j)| j))
            .nth(n - 1)
        {
            let v: serde_json::Value =
                serde_json::from_str(json.trim()).map_err(|e| format!("counters json: {e}"))?;
            let g = |k: &str| v[k].as_u64().ok_or(format!("counters json lacks {k}"));
            return Ok(FvdCounters {
                guest_writes: g("guest_writes")?,
                guest_flushes: g("guest_flushes")?,
                host_writes: g("host_writes")?,
                host_flushes: g("host_flushes")?,
            });
        }
        if t0.elapsed() > Duration::from_secs(10) {
            return Err(format!("no counter line {n} in {}", log.display()));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}
