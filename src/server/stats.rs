//! Live statistics of `fvd serve`: per queue, requests by kind with their bytes, errors and
//! latency histograms; per disk, their sums and the engine's counters.
//!
//! Hot-path cost: each queue's [`QueueStats`] is written only by whoever holds that queue's
//! worker mutex (its vring thread, or the connection thread resubmitting inflight requests as
//! the queue starts), so every update is a relaxed load and store of a plain `AtomicU64`, no
//! locked read-modify-write and no cache line shared with another queue. Readers (a scrape,
//! [`ServerHandle::stats`](super::handle::ServerHandle::stats)) load the same atomics relaxed:
//! each value is exact, a snapshot is not one instant across values.

use super::request::{Bad, BAD_KINDS};
use crate::engine::{CounterSnapshot, Disk};
use crate::io::Io;
use serde::Serialize;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

/// The kinds of request a queue counts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OpKind {
    Read,
    Write,
    Flush,
    Discard,
    WriteZeroes,
    GetId,
}

pub const OP_KINDS: [OpKind; 6] = [
    OpKind::Read,
    OpKind::Write,
    OpKind::Flush,
    OpKind::Discard,
    OpKind::WriteZeroes,
    OpKind::GetId,
];

impl OpKind {
    /// The `op` label of the metrics and the key of the snapshot's maps.
    pub fn name(self) -> &'static str {
        match self {
            OpKind::Read => "read",
            OpKind::Write => "write",
            OpKind::Flush => "flush",
            OpKind::Discard => "discard",
            OpKind::WriteZeroes => "write_zeroes",
            OpKind::GetId => "get_id",
        }
    }

    /// The kind a virtio-blk request type names, if it is one fvd knows.
    pub fn from_virtio(ty: u32) -> Option<OpKind> {
        use virtio_bindings::virtio_blk::*;
        Some(match ty {
            VIRTIO_BLK_T_IN => OpKind::Read,
            VIRTIO_BLK_T_OUT => OpKind::Write,
            VIRTIO_BLK_T_FLUSH => OpKind::Flush,
            VIRTIO_BLK_T_DISCARD => OpKind::Discard,
            VIRTIO_BLK_T_WRITE_ZEROES => OpKind::WriteZeroes,
            VIRTIO_BLK_T_GET_ID => OpKind::GetId,
            _ => return None,
        })
    }
}

/// Latency buckets: bucket 0 holds times under 2^10 ns (1.024 us), bucket `i` (0 < i <
/// BUCKETS - 1) times in [2^(9+i), 2^(10+i)) ns, the last one everything from 2^36 ns (68.7 s).
pub const BUCKETS: usize = 28;
const FIRST_BUCKET_BITS: u32 = 10;

/// The bucket of a latency of `ns` nanoseconds.
pub fn bucket_of(ns: u64) -> usize {
    let i = (64 - (ns >> FIRST_BUCKET_BITS).leading_zeros()) as usize;
    i.min(BUCKETS - 1)
}

/// The upper bound of bucket `i` in nanoseconds (every time in it is below it); `None` for the
/// last, unbounded one.
pub fn bucket_bound_ns(i: usize) -> Option<u64> {
    (i < BUCKETS - 1).then(|| 1u64 << (FIRST_BUCKET_BITS as usize + i))
}

/// A counter with one writer: an update is a load and a store, never a locked instruction.
#[derive(Default)]
struct Cell(AtomicU64);

impl Cell {
    #[inline]
    fn add(&self, v: u64) {
        self.0.store(self.0.load(Relaxed).wrapping_add(v), Relaxed);
    }
    fn get(&self) -> u64 {
        self.0.load(Relaxed)
    }
}

#[derive(Default)]
struct OpCells {
    /// Completed successfully.
    ops: Cell,
    bytes: Cell,
    /// Completed with an I/O error.
    failed: Cell,
    /// Refused at parse time (malformed, past the end, read-only...).
    invalid: Cell,
    /// Time from taken off the ring to published in the used ring, of every completed one.
    time_ns: Cell,
    hist: [Cell; BUCKETS],
}

/// One queue's counters. Aligned so that two queues' counters never share a cache line.
#[derive(Default)]
#[repr(align(128))]
pub struct QueueStats {
    ops: [OpCells; OP_KINDS.len()],
    /// Requests handed to the disk, and those of them completed (the difference is in flight).
    taken: Cell,
    completed: Cell,
    /// Chains refused, by reason (the request type may be unknown: see [`Bad`]).
    rejected: [Cell; BAD_KINDS],
}

/// How one request ended, as its queue records it.
#[derive(Clone, Copy, Debug)]
pub enum Outcome {
    /// Executed: `ok` false for an I/O error.
    Done {
        op: OpKind,
        bytes: u64,
        ok: bool,
        latency: Duration,
    },
    /// Refused at parse time; `op` if its type was readable and known.
    Rejected { op: Option<OpKind>, reason: Bad },
    /// Neither executed nor answered (guest memory was truncated under the server).
    Dropped,
}

impl QueueStats {
    /// A request was handed to the disk. Called only under the queue's worker mutex.
    #[inline]
    pub fn taken(&self) {
        self.taken.add(1);
    }

    /// Records how a request ended. Called only under the queue's worker mutex.
    #[inline]
    pub fn record(&self, o: Outcome) {
        match o {
            Outcome::Done {
                op,
                bytes,
                ok,
                latency,
            } => {
                self.completed.add(1);
                let c = &self.ops[op as usize];
                if ok {
                    c.ops.add(1);
                    c.bytes.add(bytes);
                } else {
                    c.failed.add(1);
                }
                let ns = u64::try_from(latency.as_nanos()).unwrap_or(u64::MAX);
                c.time_ns.add(ns);
                c.hist[bucket_of(ns)].add(1);
            }
            Outcome::Rejected { op, reason } => {
                self.rejected[reason as usize].add(1);
                if let Some(op) = op {
                    self.ops[op as usize].invalid.add(1);
                }
            }
            Outcome::Dropped => {}
        }
    }

    fn snapshot(&self) -> BlockStats {
        let mut s = BlockStats {
            in_flight: self.taken.get().saturating_sub(self.completed.get()),
            ..Default::default()
        };
        for op in OP_KINDS {
            let c = &self.ops[op as usize];
            let mut h = Histogram::default();
            for (i, b) in c.hist.iter().enumerate() {
                h.counts[i] = b.get();
            }
            s.ops.insert(
                op.name(),
                OpStats {
                    operations: c.ops.get(),
                    bytes: c.bytes.get(),
                    failed_operations: c.failed.get(),
                    invalid_operations: c.invalid.get(),
                    total_time_ns: c.time_ns.get(),
                    latency: h,
                },
            );
        }
        for (i, r) in self.rejected.iter().enumerate() {
            let n = r.get();
            if n > 0 {
                if let Some(b) = Bad::from_index(i) {
                    s.rejected.insert(b.name(), n);
                }
            }
        }
        s.fill_qemu_names();
        s
    }
}

/// Every queue's counters, for the life of the server (they survive reconnections).
pub struct Stats {
    queues: Vec<std::sync::Arc<QueueStats>>,
}

impl Stats {
    pub fn new(num_queues: u16) -> Stats {
        Stats {
            queues: (0..num_queues).map(|_| Default::default()).collect(),
        }
    }

    /// Queue `q`'s counters (only its worker writes them).
    pub fn queue(&self, q: usize) -> Option<std::sync::Arc<QueueStats>> {
        self.queues.get(q).cloned()
    }

    /// Per queue and their sum; the engine's part is left empty.
    pub fn requests(&self) -> (BlockStats, Vec<BlockStats>) {
        let queues: Vec<BlockStats> = self.queues.iter().map(|q| q.snapshot()).collect();
        let mut total = BlockStats::default();
        for q in &queues {
            total.merge(q);
        }
        total.fill_qemu_names();
        (total, queues)
    }
}

/// A latency histogram: `counts[i]` requests fell in bucket `i` (see [`bucket_bound_ns`]).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Histogram {
    pub counts: [u64; BUCKETS],
}

impl Histogram {
    pub fn count(&self) -> u64 {
        self.counts.iter().sum()
    }

    /// The upper bound (ns) of the bucket holding quantile `q` (0..=1): the true value is at
    /// most this and at least half of it. `None` when empty or in the last, unbounded bucket.
    pub fn quantile_bound_ns(&self, q: f64) -> Option<u64> {
        let n = self.count();
        if n == 0 {
            return None;
        }
        // The rank of the quantile, 1-based: the smallest r with r >= q * n.
        let rank = ((q.clamp(0.0, 1.0) * n as f64).ceil() as u64).max(1);
        let mut seen = 0;
        for (i, &c) in self.counts.iter().enumerate() {
            seen += c;
            if seen >= rank {
                return bucket_bound_ns(i);
            }
        }
        None
    }

    fn merge(&mut self, o: &Histogram) {
        for (a, b) in self.counts.iter_mut().zip(o.counts.iter()) {
            *a += b;
        }
    }
}

impl Serialize for Histogram {
    /// Cumulative buckets as Prometheus has them (`le` in ns, `null` for +Inf), the count and
    /// the p50/p99/p999 bounds.
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeStruct;
        #[derive(Serialize)]
        struct Bucket {
            le_ns: Option<u64>,
            count: u64,
        }
        let mut cum = 0;
        let buckets: Vec<Bucket> = self
            .counts
            .iter()
            .enumerate()
            .map(|(i, &c)| {
                cum += c;
                Bucket {
                    le_ns: bucket_bound_ns(i),
                    count: cum,
                }
            })
            .collect();
        let mut st = s.serialize_struct("Histogram", 5)?;
        st.serialize_field("count", &cum)?;
        st.serialize_field("p50_ns", &self.quantile_bound_ns(0.5))?;
        st.serialize_field("p99_ns", &self.quantile_bound_ns(0.99))?;
        st.serialize_field("p999_ns", &self.quantile_bound_ns(0.999))?;
        st.serialize_field("buckets", &buckets)?;
        st.end()
    }
}

/// One kind of request on a queue or the disk.
#[derive(Clone, Debug, Default, Serialize, PartialEq, Eq)]
pub struct OpStats {
    pub operations: u64,
    pub bytes: u64,
    pub failed_operations: u64,
    pub invalid_operations: u64,
    pub total_time_ns: u64,
    pub latency: Histogram,
}

/// Requests of a queue or of the whole disk. The first fields carry QEMU's `BlockDeviceStats`
/// names (rd = read, wr = write, unmap = discard; unlike QEMU's virtio-blk, write-zeroes are
/// not counted as writes but under `ops.write_zeroes`); `ops` has every kind in full.
#[derive(Clone, Debug, Default, Serialize, PartialEq, Eq)]
pub struct BlockStats {
    pub rd_bytes: u64,
    pub wr_bytes: u64,
    pub unmap_bytes: u64,
    pub rd_operations: u64,
    pub wr_operations: u64,
    pub flush_operations: u64,
    pub unmap_operations: u64,
    pub rd_total_time_ns: u64,
    pub wr_total_time_ns: u64,
    pub flush_total_time_ns: u64,
    pub unmap_total_time_ns: u64,
    pub failed_rd_operations: u64,
    pub failed_wr_operations: u64,
    pub failed_flush_operations: u64,
    pub failed_unmap_operations: u64,
    pub invalid_rd_operations: u64,
    pub invalid_wr_operations: u64,
    pub invalid_flush_operations: u64,
    pub invalid_unmap_operations: u64,
    /// Requests handed to the disk and not yet completed.
    pub in_flight: u64,
    /// By kind: read, write, flush, discard, write_zeroes, get_id.
    pub ops: BTreeMap<&'static str, OpStats>,
    /// Chains refused at parse time, by reason (see [`Bad::name`]); zero counts left out.
    pub rejected: BTreeMap<&'static str, u64>,
}

impl BlockStats {
    fn fill_qemu_names(&mut self) {
        let get = |k: OpKind| self.ops.get(k.name()).cloned().unwrap_or_default();
        let (r, w, f, d) = (
            get(OpKind::Read),
            get(OpKind::Write),
            get(OpKind::Flush),
            get(OpKind::Discard),
        );
        self.rd_bytes = r.bytes;
        self.wr_bytes = w.bytes;
        self.unmap_bytes = d.bytes;
        self.rd_operations = r.operations;
        self.wr_operations = w.operations;
        self.flush_operations = f.operations;
        self.unmap_operations = d.operations;
        self.rd_total_time_ns = r.total_time_ns;
        self.wr_total_time_ns = w.total_time_ns;
        self.flush_total_time_ns = f.total_time_ns;
        self.unmap_total_time_ns = d.total_time_ns;
        self.failed_rd_operations = r.failed_operations;
        self.failed_wr_operations = w.failed_operations;
        self.failed_flush_operations = f.failed_operations;
        self.failed_unmap_operations = d.failed_operations;
        self.invalid_rd_operations = r.invalid_operations;
        self.invalid_wr_operations = w.invalid_operations;
        self.invalid_flush_operations = f.invalid_operations;
        self.invalid_unmap_operations = d.invalid_operations;
    }

    fn merge(&mut self, o: &BlockStats) {
        self.in_flight += o.in_flight;
        for (k, v) in &o.ops {
            let t = self.ops.entry(k).or_default();
            t.operations += v.operations;
            t.bytes += v.bytes;
            t.failed_operations += v.failed_operations;
            t.invalid_operations += v.invalid_operations;
            t.total_time_ns += v.total_time_ns;
            t.latency.merge(&v.latency);
        }
        for (k, v) in &o.rejected {
            *self.rejected.entry(k).or_default() += v;
        }
    }
}

/// The engine's view: its counters, copy-on-read and prefetch progress, free space.
#[derive(Clone, Debug, Default, Serialize, PartialEq, Eq)]
pub struct EngineStats {
    /// Guest requests and the host I/O they caused (also in the log line at disconnect).
    pub counters: CounterSnapshot,
    pub virtual_size: u64,
    /// Bytes still read from the base image (neither written nor copied yet); `None` without
    /// a base.
    pub base_remaining_bytes: Option<u64>,
    /// Free bytes of a thin image's bounded storage (a block device); `None` when unbounded.
    pub free_bytes: Option<u64>,
}

impl EngineStats {
    pub fn of<I: Io>(disk: &Disk<I>) -> EngineStats {
        let mut e = EngineStats {
            counters: disk.counters().snapshot(),
            virtual_size: disk.virtual_size(),
            ..Default::default()
        };
        if let Disk::Fvd(img) = disk {
            if let Some(base) = img.base() {
                let bs = img.geometry().block_size;
                let left = img.base_blocks_remaining().saturating_mul(bs);
                // Counted in whole blocks, but the last one may extend past the base's end.
                let readable = base.size().min(img.virtual_size());
                e.base_remaining_bytes = Some(left.min(readable));
            }
            e.free_bytes = img.free_bytes();
        }
        e
    }
}

/// What [`ServerHandle::stats`](super::handle::ServerHandle::stats) returns.
#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct StatsSnapshot {
    /// Every queue together.
    pub device: BlockStats,
    /// Queue `i` at index `i`.
    pub queues: Vec<BlockStats>,
    pub engine: EngineStats,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_are_log2_of_nanoseconds() {
        assert_eq!(bucket_of(0), 0);
        assert_eq!(bucket_of(1023), 0);
        assert_eq!(bucket_of(1024), 1);
        assert_eq!(bucket_of(2047), 1);
        assert_eq!(bucket_of(2048), 2);
        assert_eq!(bucket_of((1 << 36) - 1), BUCKETS - 2);
        assert_eq!(bucket_of(1 << 36), BUCKETS - 1);
        assert_eq!(bucket_of(u64::MAX), BUCKETS - 1);
        // Every time lies below its bucket's bound and at or above the previous one's.
        for ns in [0u64, 1, 999, 1024, 5000, 123_456_789, (1 << 36) - 1] {
            let b = bucket_of(ns);
            assert!(ns < bucket_bound_ns(b).unwrap(), "{ns}");
            if b > 0 {
                assert!(ns >= bucket_bound_ns(b - 1).unwrap(), "{ns}");
            }
        }
        assert_eq!(bucket_bound_ns(BUCKETS - 1), None);
    }

    #[test]
    fn quantiles_name_the_bucket_bound() {
        let mut h = Histogram::default();
        assert_eq!(h.quantile_bound_ns(0.5), None);
        // 900 fast (under 1.024 us), 99 at 10 us, 1 at 1 s.
        h.counts[0] = 900;
        h.counts[bucket_of(10_000)] = 99;
        h.counts[bucket_of(1_000_000_000)] = 1;
        assert_eq!(h.quantile_bound_ns(0.5), Some(1024));
        assert_eq!(h.quantile_bound_ns(0.9), Some(1024));
        assert_eq!(h.quantile_bound_ns(0.99), Some(16_384));
        assert_eq!(h.quantile_bound_ns(0.999), Some(16_384));
        assert_eq!(h.quantile_bound_ns(1.0), Some(1 << 30));
        h.counts[BUCKETS - 1] = 10_000;
        assert_eq!(h.quantile_bound_ns(0.99), None, "in the unbounded bucket");
    }

    #[test]
    fn a_queue_counts_outcomes_and_the_sum_covers_all_queues() {
        let s = Stats::new(2);
        let (q0, q1) = (s.queue(0).unwrap(), s.queue(1).unwrap());
        assert!(s.queue(2).is_none());
        let done = |op, bytes, ok, us| Outcome::Done {
            op,
            bytes,
            ok,
            latency: Duration::from_micros(us),
        };
        for _ in 0..3 {
            q0.taken();
        }
        q0.record(done(OpKind::Read, 4096, true, 10));
        q0.record(done(OpKind::Read, 8192, false, 20));
        q0.record(Outcome::Rejected {
            op: Some(OpKind::Write),
            reason: Bad::PastEnd,
        });
        q0.record(Outcome::Rejected {
            op: None,
            reason: Bad::ShortHeader,
        });
        q0.record(Outcome::Dropped);
        q1.taken();
        q1.record(done(OpKind::Discard, 1 << 20, true, 100));
        q1.taken();
        q1.record(done(OpKind::Flush, 0, true, 1000));

        let (total, queues) = s.requests();
        let q = &queues[0];
        assert_eq!(q.rd_operations, 1);
        assert_eq!(q.rd_bytes, 4096, "failed requests add no bytes");
        assert_eq!(q.failed_rd_operations, 1);
        assert_eq!(q.rd_total_time_ns, 30_000);
        assert_eq!(q.invalid_wr_operations, 1);
        assert_eq!(q.in_flight, 1, "three taken, two completed");
        assert_eq!(q.rejected["past_end"], 1);
        assert_eq!(q.rejected["short_header"], 1);
        assert_eq!(q.ops["read"].latency.count(), 2);
        assert_eq!(queues[1].unmap_bytes, 1 << 20);
        assert_eq!(queues[1].in_flight, 0);

        assert_eq!(total.rd_operations, 1);
        assert_eq!(total.unmap_operations, 1);
        assert_eq!(total.flush_operations, 1);
        assert_eq!(total.flush_total_time_ns, 1_000_000);
        assert_eq!(total.in_flight, 1);
        assert_eq!(total.rejected.values().sum::<u64>(), 2);
        assert_eq!(
            total.ops["flush"].latency.quantile_bound_ns(0.5),
            Some(1 << 20)
        );

        let json = serde_json::to_value(&total).unwrap();
        assert_eq!(json["rd_bytes"], 4096);
        assert_eq!(json["ops"]["discard"]["operations"], 1);
        assert_eq!(json["ops"]["read"]["latency"]["count"], 2);
        assert_eq!(
            json["ops"]["read"]["latency"]["buckets"][BUCKETS - 1]["count"],
            2
        );
        assert!(json["ops"]["read"]["latency"]["buckets"][BUCKETS - 1]["le_ns"].is_null());
    }
}
