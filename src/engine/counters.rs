//! Counters of guest requests and the host I/O they caused, for measuring amplification.

use serde::Serialize;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

#[derive(Default, Debug)]
pub struct Counters {
    pub guest_reads: AtomicU64,
    pub guest_writes: AtomicU64,
    pub guest_flushes: AtomicU64,
    pub guest_discards: AtomicU64,
    pub host_reads: AtomicU64,
    pub host_writes: AtomicU64,
    pub host_flushes: AtomicU64,
    pub host_bytes_read: AtomicU64,
    pub host_bytes_written: AtomicU64,
    pub base_reads: AtomicU64,
    pub journal_writes: AtomicU64,
    pub checkpoints: AtomicU64,
    pub chunks_allocated: AtomicU64,
    pub bounced: AtomicU64,
    /// Ranges made to read as zeros without writing them (fallocate), by first writes.
    pub host_zeroes: AtomicU64,
    /// Partial first writes whose block needed no zeroing (its chunk or range reads zeros).
    pub zeroing_skipped: AtomicU64,
    /// Journal writes made durable by the same flush as the data they describe (no flush first).
    pub journal_unordered: AtomicU64,
    /// Intent writes: records journaled (not flushed) before a write or discard completed.
    pub journal_intents: AtomicU64,
    /// Bytes copied from the base into the image by copy-on-read.
    pub cor_bytes: AtomicU64,
    /// Bytes copied from the base into the image by prefetching.
    pub prefetch_bytes: AtomicU64,
}

/// A plain copy of [`Counters`] for printing.
#[derive(Default, Debug, Clone, Copy, Serialize, PartialEq, Eq)]
pub struct CounterSnapshot {
    pub guest_reads: u64,
    pub guest_writes: u64,
    pub guest_flushes: u64,
    pub guest_discards: u64,
    pub host_reads: u64,
    pub host_writes: u64,
    pub host_flushes: u64,
    pub host_bytes_read: u64,
    pub host_bytes_written: u64,
    pub base_reads: u64,
    pub journal_writes: u64,
    pub checkpoints: u64,
    pub chunks_allocated: u64,
    pub bounced: u64,
    pub host_zeroes: u64,
    pub zeroing_skipped: u64,
    pub journal_unordered: u64,
    pub journal_intents: u64,
    pub cor_bytes: u64,
    pub prefetch_bytes: u64,
}

impl Counters {
    pub(crate) fn inc(c: &AtomicU64) {
        c.fetch_add(1, Relaxed);
    }
    pub(crate) fn add(c: &AtomicU64, v: u64) {
        c.fetch_add(v, Relaxed);
    }
    pub fn snapshot(&self) -> CounterSnapshot {
        CounterSnapshot {
            guest_reads: self.guest_reads.load(Relaxed),
            guest_writes: self.guest_writes.load(Relaxed),
            guest_flushes: self.guest_flushes.load(Relaxed),
            guest_discards: self.guest_discards.load(Relaxed),
            host_reads: self.host_reads.load(Relaxed),
            host_writes: self.host_writes.load(Relaxed),
            host_flushes: self.host_flushes.load(Relaxed),
            host_bytes_read: self.host_bytes_read.load(Relaxed),
            host_bytes_written: self.host_bytes_written.load(Relaxed),
            base_reads: self.base_reads.load(Relaxed),
            journal_writes: self.journal_writes.load(Relaxed),
            checkpoints: self.checkpoints.load(Relaxed),
            chunks_allocated: self.chunks_allocated.load(Relaxed),
            bounced: self.bounced.load(Relaxed),
            host_zeroes: self.host_zeroes.load(Relaxed),
            zeroing_skipped: self.zeroing_skipped.load(Relaxed),
            journal_unordered: self.journal_unordered.load(Relaxed),
            journal_intents: self.journal_intents.load(Relaxed),
            cor_bytes: self.cor_bytes.load(Relaxed),
            prefetch_bytes: self.prefetch_bytes.load(Relaxed),
        }
    }
}
