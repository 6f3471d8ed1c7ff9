//! The one client every vhost-user target is measured through: libblkio's
//! virtio-blk-vhost-user driver, one queue, a fixed number of requests in flight.

use blkio::{Blkio, Blkioq, Completion, MemoryRegion, ReqFlags};
use rand::rngs::SmallRng;
use rand::{Rng, RngCore, SeedableRng};
use std::mem::MaybeUninit;
use std::path::Path;
use std::time::{Duration, Instant};

#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum Op {
    Read,
    Write,
}

/// Where the i-th request goes.
#[derive(Copy, Clone, Debug)]
pub enum Pattern {
    /// Uniformly random, `bs`-aligned, in `[0, region)`.
    Random,
    /// `(start + i * step) % region`: qemu-img bench's addressing.
    Stride { start: u64, step: u64 },
}

/// One measured run: `count` requests or until `time` runs out, whichever comes first.
#[derive(Clone, Debug)]
pub struct Job {
    pub op: Op,
    pub bs: u64,
    pub depth: usize,
    pub pattern: Pattern,
    pub region: u64,
    pub count: u64,
    pub time: Option<Duration>,
    /// Drain the queue and FLUSH after every this many requests (0: never).
    pub flush_every: u64,
}

#[derive(Clone, Copy, Debug, Default)]
pub struct Outcome {
    pub ops: u64,
    pub bytes: u64,
    pub flushes: u64,
    pub secs: f64,
}

impl Outcome {
    pub fn iops(&self) -> f64 {
        self.ops as f64 / self.secs
    }
    pub fn mib_s(&self) -> f64 {
        self.bytes as f64 / self.secs / (1 << 20) as f64
    }
}

const FLUSH_TAG: usize = usize::MAX;

pub struct Client {
    // Field order matters: the queue must go before the Blkio that owns the mapping.
    q: Blkioq,
    blkio: Blkio,
    region: MemoryRegion,
    slot_len: usize,
    slots: usize,
    pub capacity: u64,
}

impl Client {
    /// Connects to the vhost-user socket with buffers for `slots` requests of up to `max_bs` bytes.
    pub fn connect(sock: &Path, slots: usize, max_bs: usize) -> Result<Client, String> {
        let e = |what: &str| {
            let what = what.to_string();
            move |err: blkio::Error| format!("blkio {what}: {err}")
        };
        let mut b = Blkio::new("virtio-blk-vhost-user").map_err(e("new"))?;
        b.set_str("path", &sock.to_string_lossy())
            .map_err(e("path"))?;
        // The socket file appears at bind(), a moment before the server listens: retry briefly.
        let t0 = Instant::now();
        loop {
            match b.connect() {
                Ok(()) => break,
                Err(_) if t0.elapsed() < Duration::from_secs(5) => {
                    std::thread::sleep(Duration::from_millis(10));
                }
                Err(err) => return Err(format!("blkio connect: {err}")),
            }
        }
        // PEERS_POLL_CLIENT=1: a busy-polling client queue (experiments: takes the client's
        // wake-up latency out of the measurement). The default is interrupt-driven, like a guest.
        let poll = std::env::var_os("PEERS_POLL_CLIENT").is_some();
        b.set_i32("num-queues", if poll { 0 } else { 1 })
            .map_err(e("num-queues"))?;
        b.set_i32("num-poll-queues", if poll { 1 } else { 0 })
            .map_err(e("num-poll-queues"))?;
        b.set_i32("queue-size", 256).map_err(e("queue-size"))?;
        let mut started = b.start().map_err(e("start"))?;
        let q = if poll {
            started.poll_queues.pop()
        } else {
            started.queues.pop()
        }
        .ok_or("blkio: no queue")?;
        let capacity = b.get_u64("capacity").map_err(e("capacity"))?;
        let align = b.get_u64("mem-region-alignment").map_err(e("align"))? as usize;
        let slot_len = max_bs.next_multiple_of(align.max(4096));
        let region = b
            .alloc_mem_region(slot_len * slots)
            .map_err(e("alloc_mem_region"))?;
        b.map_mem_region(&region).map_err(e("map_mem_region"))?;
        let mut c = Client {
            q,
            blkio: b,
            region,
            slot_len,
            slots,
            capacity,
        };
        // Non-zero, incompressible contents so that no target can skip or shortcut written data.
        let mut rng = SmallRng::seed_from_u64(0x5eed);
        rng.fill_bytes(c.mem());
        Ok(c)
    }

    fn mem(&mut self) -> &mut [u8] {
        // SAFETY: the region is mapped read/write for `len` bytes and lives as long as `self`; the
        // device only touches it while requests are in flight, never across calls to `run`.
        unsafe { std::slice::from_raw_parts_mut(self.region.addr as *mut u8, self.region.len) }
    }

    fn slot(&self, i: usize) -> *mut u8 {
        (self.region.addr + i * self.slot_len) as *mut u8
    }

    fn submit(&mut self, op: Op, off: u64, bs: u64, slot: usize) {
        let p = self.slot(slot);
        match op {
            Op::Read => self.q.read(off, p, bs as usize, slot, ReqFlags::empty()),
            Op::Write => self.q.write(off, p, bs as usize, slot, ReqFlags::empty()),
        }
    }

    /// Waits for at least one completion; returns the user_data of each.
    fn reap(&mut self, out: &mut Vec<usize>) -> Result<(), String> {
        let mut comps: [MaybeUninit<Completion>; 64] = [const { MaybeUninit::uninit() }; 64];
        let n = self
            .q
            .do_io(&mut comps, 1, None, None)
            .map_err(|e| format!("blkio do_io: {e}"))?;
        for c in &comps[..n] {
            // SAFETY: do_io initialised the first `n` completions.
            let c = unsafe { c.assume_init_ref() };
            if c.ret != 0 {
                return Err(format!("request failed: errno {}", -c.ret));
            }
            out.push(c.user_data);
        }
        Ok(())
    }

    fn flush(&mut self) -> Result<(), String> {
        self.q.flush(FLUSH_TAG, ReqFlags::empty());
        let mut done = Vec::new();
        while !done.contains(&FLUSH_TAG) {
            self.reap(&mut done)?;
        }
        Ok(())
    }

    /// Runs `job`; `seed` picks the random offsets.
    pub fn run(&mut self, job: &Job, seed: u64) -> Result<Outcome, String> {
        if job.depth > self.slots || job.bs as usize > self.slot_len {
            return Err("job exceeds the client's buffers".into());
        }
        let region = job.region.min(self.capacity);
        let blocks = region / job.bs;
        if blocks == 0 {
            return Err("region smaller than one request".into());
        }
        let mut rng = SmallRng::seed_from_u64(seed);
        let mut free: Vec<usize> = (0..job.depth).rev().collect();
        let mut done = Vec::with_capacity(64);
        let (mut issued, mut completed, mut flushes) = (0u64, 0u64, 0u64);
        let start = Instant::now();
        let deadline = job.time.map(|t| start + t);
        let mut stop = false;
        loop {
            // Requests allowed before the next FLUSH.
            let batch_end = if job.flush_every > 0 {
                (flushes + 1) * job.flush_every
            } else {
                u64::MAX
            };
            while !stop && issued < job.count && issued < batch_end {
                let Some(slot) = free.pop() else { break };
                let off = match job.pattern {
                    Pattern::Random => rng.gen_range(0..blocks) * job.bs,
                    Pattern::Stride { start, step } => {
                        (start + issued * step) % region / job.bs * job.bs
                    }
                };
                self.submit(job.op, off, job.bs, slot);
                issued += 1;
            }
            let inflight = job.depth - free.len();
            if inflight == 0 {
                if issued == batch_end {
                    self.flush()?;
                    flushes += 1;
                }
                if stop || issued >= job.count {
                    break;
                }
                continue;
            }
            done.clear();
            self.reap(&mut done)?;
            for &slot in &done {
                free.push(slot);
                completed += 1;
            }
            if let Some(d) = deadline {
                stop = stop || Instant::now() >= d;
            }
        }
        Ok(Outcome {
            ops: completed,
            bytes: completed * job.bs,
            flushes,
            secs: start.elapsed().as_secs_f64(),
        })
    }
}

impl Drop for Client {
    fn drop(&mut self) {
        self.blkio.unmap_mem_region(&self.region);
    }
}
