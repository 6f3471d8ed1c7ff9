//! What is measured (workloads), on what (targets), and the image files each needs.

use crate::client::{Job, Op, Pattern};
use std::time::Duration;

/// How a workload treats the image it runs on.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum Kind {
    /// Overwrites/reads of the fully written dataset image; time-based after a warm-up.
    Steady,
    /// A fresh image; 4 KiB writes, one per MiB, FLUSH every 32 writes.
    Alloc,
    /// A fresh image; even 4 KiB pages, then odd ones, then 1 MiB sequential reads (measured).
    Locality,
    /// A fresh overlay on a raw base; 4 KiB first writes, one per 64 KiB block (copy-on-write).
    Cow,
}

#[derive(Clone, Debug)]
pub struct Workload {
    pub name: &'static str,
    pub kind: Kind,
    pub op: Op,
    pub bs: u64,
    pub depth: usize,
    pub random: bool,
    /// Whether the figure is MiB/s (else IOPS).
    pub bandwidth: bool,
    /// Drain and FLUSH after every this many requests (0: never).
    pub flush_every: u64,
}

pub const K4: u64 = 4096;
pub const M1: u64 = 1 << 20;

pub fn all() -> Vec<Workload> {
    let w = |name, kind, op, bs, depth, random, bandwidth| Workload {
        name,
        kind,
        op,
        bs,
        depth,
        random,
        bandwidth,
        flush_every: if kind == Kind::Alloc { 32 } else { 0 },
    };
    use Kind::*;
    use Op::*;
    vec![
        w("randread-4k-qd1", Steady, Read, K4, 1, true, false),
        w("randread-4k-qd32", Steady, Read, K4, 32, true, false),
        w("randwrite-4k-qd1", Steady, Write, K4, 1, true, false),
        w("randwrite-4k-qd32", Steady, Write, K4, 32, true, false),
        Workload {
            flush_every: 32,
            ..w("randwrite-4k-flush32", Steady, Write, K4, 32, true, false)
        },
        w("seqread-1m-qd4", Steady, Read, M1, 4, false, true),
        w("seqwrite-1m-qd4", Steady, Write, M1, 4, false, true),
        w("alloc-4k-flush32", Alloc, Write, K4, 32, false, false),
        w("locality-seqread-1m", Locality, Read, M1, 4, false, true),
        w("cow-first-write-4k", Cow, Write, K4, 32, false, false),
    ]
}

/// Every target is started, measured and stopped by the harness.
#[derive(Copy, Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Target {
    /// `fvd serve` on a compact FVD image.
    Fvd,
    /// `fvd serve` on a raw-layout FVD image (`--no-compact`).
    FvdFlat,
    /// qemu-storage-daemon vhost-user-blk export of a raw file.
    QsdRaw,
    /// qemu-storage-daemon vhost-user-blk export of a qcow2 file.
    QsdQcow2,
    /// `qemu-img bench` (QEMU block layer in-process) on the raw file.
    ImgRaw,
    /// `qemu-img bench` on the qcow2 file.
    ImgQcow2,
    /// fio, io_uring, O_DIRECT, on the raw file: the storage limit.
    Fio,
}

impl Target {
    pub const ALL: [Target; 7] = [
        Target::Fvd,
        Target::FvdFlat,
        Target::QsdRaw,
        Target::QsdQcow2,
        Target::ImgRaw,
        Target::ImgQcow2,
        Target::Fio,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Target::Fvd => "fvd",
            Target::FvdFlat => "fvd-flat",
            Target::QsdRaw => "qsd-raw",
            Target::QsdQcow2 => "qsd-qcow2",
            Target::ImgRaw => "img-raw",
            Target::ImgQcow2 => "img-qcow2",
            Target::Fio => "fio-raw",
        }
    }

    pub fn format(self) -> Format {
        match self {
            Target::Fvd => Format::Fvd { compact: true },
            Target::FvdFlat => Format::Fvd { compact: false },
            Target::QsdRaw | Target::ImgRaw | Target::Fio => Format::Raw,
            Target::QsdQcow2 | Target::ImgQcow2 => Format::Qcow2,
        }
    }

    /// A vhost-user server measured through the blkio client.
    pub fn is_server(self) -> bool {
        matches!(
            self,
            Target::Fvd | Target::FvdFlat | Target::QsdRaw | Target::QsdQcow2
        )
    }

    /// Whether this target can run `kind` (copy-on-write needs an image format with a base).
    pub fn runs(self, kind: Kind) -> bool {
        kind != Kind::Cow || !matches!(self.format(), Format::Raw)
    }
}

#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum Format {
    Raw,
    Qcow2,
    Fvd { compact: bool },
}

impl Format {
    pub fn ext(self) -> &'static str {
        match self {
            Format::Raw => "raw",
            Format::Qcow2 => "qcow2",
            Format::Fvd { compact: true } => "fvd",
            Format::Fvd { compact: false } => "flat.fvd",
        }
    }
}

/// Sizes and durations of one harness run.
#[derive(Clone, Debug)]
pub struct Sizes {
    /// Dataset image (steady workloads, copy-on-write base).
    pub data: u64,
    /// Fresh image of the allocation test: one 4 KiB write per MiB.
    pub alloc: u64,
    /// Range of the locality test.
    pub locality: u64,
    /// Bytes the locality test's measured job reads (passes over its range).
    pub locality_read: u64,
    pub reps: usize,
    pub time: Duration,
    pub warmup: Duration,
    /// Random 4 KiB writes, then seconds of random reads, in the 1 TiB RSS probe.
    pub big_writes: u64,
    pub big_read_time: Duration,
}

impl Sizes {
    pub fn new(quick: bool) -> Sizes {
        Sizes {
            data: 1 << 30,
            alloc: if quick { 2 << 30 } else { 4 << 30 },
            locality: if quick { 256 << 20 } else { 1 << 30 },
            // Several passes so that the figure is not dominated by start-up on fast storage.
            locality_read: 4 << 30,
            reps: if quick { 3 } else { 5 },
            time: Duration::from_secs(if quick { 2 } else { 5 }),
            warmup: Duration::from_millis(300),
            big_writes: 20_000,
            big_read_time: Duration::from_secs(2),
        }
    }

    /// The smallest run that still exercises every target, workload and report: a check that
    /// the harness works (`cargo test`), not a measurement.
    pub fn smoke() -> Sizes {
        Sizes {
            data: 64 << 20,
            alloc: 128 << 20,
            locality: 16 << 20,
            locality_read: 64 << 20,
            reps: 1,
            time: Duration::from_millis(200),
            warmup: Duration::from_millis(50),
            big_writes: 512,
            big_read_time: Duration::from_millis(200),
        }
    }

    /// Size of the image `w` runs on.
    pub fn image(&self, kind: Kind) -> u64 {
        match kind {
            Kind::Steady | Kind::Cow => self.data,
            Kind::Alloc => self.alloc,
            Kind::Locality => self.locality,
        }
    }
}

/// The measured jobs of `w` (a locality test has a preparation phase before its measured job).
pub struct Plan {
    pub prepare: Vec<Job>,
    pub measure: Job,
}

/// qemu-img bench can only stride; this odd step visits every 4 KiB block of a power-of-two
/// sized image once per cycle, in an order without locality (used for the "random" 4 KiB tests).
pub const IMG_RANDOM_STEP: u64 = 104_729 * K4;

pub fn plan(w: &Workload, s: &Sizes) -> Plan {
    let job = |op, bs, depth, pattern, region, count, time, flush_every| Job {
        op,
        bs,
        depth,
        pattern,
        region,
        count,
        time,
        flush_every,
    };
    let seq = |step| Pattern::Stride { start: 0, step };
    match w.kind {
        Kind::Steady => {
            let pattern = if w.random { Pattern::Random } else { seq(w.bs) };
            Plan {
                prepare: vec![],
                measure: job(
                    w.op,
                    w.bs,
                    w.depth,
                    pattern,
                    s.data,
                    u64::MAX,
                    Some(s.time),
                    w.flush_every,
                ),
            }
        }
        Kind::Alloc => Plan {
            prepare: vec![],
            measure: job(
                Op::Write,
                K4,
                w.depth,
                seq(M1),
                s.alloc,
                s.alloc / M1,
                None,
                w.flush_every,
            ),
        },
        Kind::Locality => {
            let half = s.locality / (2 * K4);
            let phase = |start| Job {
                pattern: Pattern::Stride {
                    start,
                    step: 2 * K4,
                },
                ..job(Op::Write, K4, 32, seq(0), s.locality, half, None, 0)
            };
            let passes = (s.locality_read / s.locality).max(1);
            Plan {
                prepare: vec![phase(0), phase(K4)],
                measure: job(
                    Op::Read,
                    M1,
                    w.depth,
                    seq(M1),
                    s.locality,
                    passes * s.locality / M1,
                    None,
                    0,
                ),
            }
        }
        Kind::Cow => Plan {
            prepare: vec![],
            measure: job(
                Op::Write,
                K4,
                w.depth,
                Pattern::Stride {
                    start: 32 << 10,
                    step: 64 << 10,
                },
                s.data,
                s.data / (64 << 10),
                None,
                0,
            ),
        },
    }
}
