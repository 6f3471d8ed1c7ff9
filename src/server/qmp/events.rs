//! Asynchronous QMP events raised by any server thread (queue workers, prefetch, the grower,
//! the main thread) and delivered by the control-plane thread to every negotiated client.
//!
//! Raising an event never blocks: it takes a short leaf lock to queue it and writes the control
//! thread's eventfd. The queue is bounded (the oldest events go first), and events that can
//! repeat at the guest's pace (`BLOCK_IO_ERROR`) are rate-limited.

use parking_lot::Mutex;
use serde_json::{json, Value};
use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use vmm_sys_util::eventfd::EventFd;

/// Events waiting for the control thread; beyond this the oldest are dropped.
pub const MAX_QUEUED: usize = 1024;
/// At most one `BLOCK_IO_ERROR` per this interval (the others are counted, not sent).
pub const IO_ERROR_INTERVAL: Duration = Duration::from_secs(1);

/// Event names. QEMU's where the meaning matches; `X_FVD_` ones are fvd's own.
pub const BLOCK_IO_ERROR: &str = "BLOCK_IO_ERROR";
pub const BLOCK_JOB_COMPLETED: &str = "BLOCK_JOB_COMPLETED";
pub const BLOCK_JOB_CANCELLED: &str = "BLOCK_JOB_CANCELLED";
pub const SHUTDOWN: &str = "SHUTDOWN";
pub const FRONTEND_CONNECTED: &str = "X_FVD_FRONTEND_CONNECTED";
pub const FRONTEND_DISCONNECTED: &str = "X_FVD_FRONTEND_DISCONNECTED";
pub const STORAGE_LOW: &str = "X_FVD_STORAGE_LOW";
pub const STORAGE_GROWN: &str = "X_FVD_STORAGE_GROWN";
pub const STORAGE_GROW_FAILED: &str = "X_FVD_STORAGE_GROW_FAILED";

/// One event, serialized as QMP sends it.
#[derive(Debug, Clone)]
pub struct Event {
    pub name: &'static str,
    pub data: Value,
    pub timestamp: SystemTime,
}

impl Event {
    pub fn to_json(&self) -> Value {
        let t = self
            .timestamp
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        json!({
            "event": self.name,
            "data": self.data,
            "timestamp": {"seconds": t.as_secs(), "microseconds": t.subsec_micros()},
        })
    }
}

/// Where threads raise events. Without a control socket it stays disabled and drops them.
pub struct EventSink {
    enabled: AtomicBool,
    queue: Mutex<Queue>,
    /// Wakes the control thread (also used to ask it to exit).
    wake: EventFd,
}

#[derive(Default)]
struct Queue {
    events: VecDeque<Event>,
    dropped: u64,
    last_io_error: Option<Instant>,
    io_errors_suppressed: u64,
}

impl EventSink {
    pub fn new() -> std::io::Result<EventSink> {
        Ok(EventSink {
            enabled: AtomicBool::new(false),
            queue: Mutex::new(Queue::default()),
            wake: EventFd::new(libc::EFD_CLOEXEC | libc::EFD_NONBLOCK)?,
        })
    }

    /// From now on events are queued (the control thread runs).
    pub fn enable(&self) {
        self.enabled.store(true, Ordering::Release);
    }

    pub fn wake_fd(&self) -> &EventFd {
        &self.wake
    }

    /// Wakes the control thread without an event (e.g. to make it look at its exit flag).
    pub fn wake(&self) {
        // A full counter (EAGAIN) is readable already.
        let _ = self.wake.write(1);
    }

    /// Queues `name` with `data` (a JSON object) for every client.
    pub fn emit(&self, name: &'static str, data: Value) {
        if !self.enabled.load(Ordering::Acquire) {
            return;
        }
        self.push(Event {
            name,
            data,
            timestamp: SystemTime::now(),
        });
    }

    /// A guest request failed with an I/O error: at most one event per
    /// [`IO_ERROR_INTERVAL`]; the count of those left out rides on the next one.
    pub fn io_error(&self, device: &str, operation: &'static str, nospace: bool, reason: &str) {
        if !self.enabled.load(Ordering::Acquire) {
            return;
        }
        let now = Instant::now();
        let suppressed = {
            let mut q = self.queue.lock();
            if q.last_io_error
                .is_some_and(|t| now.duration_since(t) < IO_ERROR_INTERVAL)
            {
                q.io_errors_suppressed += 1;
                return;
            }
            q.last_io_error = Some(now);
            std::mem::take(&mut q.io_errors_suppressed)
        };
        self.push(Event {
            name: BLOCK_IO_ERROR,
            data: json!({
                "device": device,
                "node-name": device,
                "operation": operation,
                "action": "report",
                "nospace": nospace,
                "reason": reason,
                "x-fvd-suppressed": suppressed,
            }),
            timestamp: SystemTime::now(),
        });
    }

    fn push(&self, e: Event) {
        {
            let mut q = self.queue.lock();
            if q.events.len() >= MAX_QUEUED {
                q.events.pop_front();
                q.dropped += 1;
            }
            q.events.push_back(e);
        }
        self.wake();
    }

    /// Takes the queued events (control thread), and how many were dropped since last time.
    pub fn take(&self) -> (Vec<Event>, u64) {
        let _ = self.wake.read();
        let mut q = self.queue.lock();
        let dropped = std::mem::take(&mut q.dropped);
        (q.events.drain(..).collect(), dropped)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn disabled_sink_queues_nothing() {
        let s = EventSink::new().unwrap();
        s.emit(SHUTDOWN, json!({}));
        assert!(s.take().0.is_empty());
    }

    #[test]
    fn queue_is_bounded_and_counts_drops() {
        let s = EventSink::new().unwrap();
        s.enable();
        for i in 0..MAX_QUEUED + 5 {
            s.emit(SHUTDOWN, json!({ "i": i }));
        }
        let (events, dropped) = s.take();
        assert_eq!(events.len(), MAX_QUEUED);
        assert_eq!(dropped, 5);
        assert_eq!(events[0].data["i"], 5);
    }

    #[test]
    fn io_errors_are_rate_limited() {
        let s = EventSink::new().unwrap();
        s.enable();
        for _ in 0..100 {
            s.io_error("fvd0", "write", true, "No space left on device");
        }
        let (events, _) = s.take();
        assert_eq!(events.len(), 1);
        let v = events[0].to_json();
        assert_eq!(v["event"], BLOCK_IO_ERROR);
        assert_eq!(v["data"]["operation"], "write");
        assert_eq!(v["data"]["nospace"], true);
        assert!(v["timestamp"]["seconds"].as_u64().unwrap() > 1_600_000_000);
        assert!(v["timestamp"]["microseconds"].as_u64().unwrap() < 1_000_000);
    }
}
