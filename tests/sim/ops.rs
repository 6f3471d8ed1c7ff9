//! Random guest requests, each spawned as a task that tells the model when it starts and ends.

use super::driver::{Run, Shared};
use super::pattern::{fill, ZERO};
use fvd::engine::{EngineError, Image};
use fvd::io::executor::Executor;
use fvd::io::sim::SimIo;
use fvd::io::{Buf, Segment};
use fvd::units::VirtOffset;
use rand::rngs::SmallRng;
use rand::Rng;
use std::sync::atomic::Ordering;
use std::sync::Arc;

/// A buffer of `len` bytes laid out like guest memory might be: aligned, shifted, or split into
/// a few segments at arbitrary byte addresses.
pub fn scattered(rng: &mut SmallRng, len: usize) -> Buf {
    let mode = rng.gen_range(0..4);
    if mode == 0 || len == 0 {
        return Buf::alloc(len);
    }
    let granule = if mode == 1 { 512 } else { 1 };
    let parts = rng.gen_range(1..=3usize);
    let backing = Buf::alloc(len + 4096 * (parts + 1));
    let base = backing.segments()[0].addr;
    let mut segs = Vec::new();
    let mut pos = rng.gen_range(0..4096 / granule) * granule;
    let mut left = len;
    for i in 0..parts {
        let n = if i + 1 == parts {
            left
        } else {
            rng.gen_range(0..=left / granule) * granule
        };
        segs.push(Segment {
            addr: base + pos,
            len: n,
        });
        pos += n + rng.gen_range(0..512 / granule) * granule;
        left -= n;
    }
    // SAFETY: every segment lies inside `backing`'s allocation (total length plus gaps stays
    // below its size), and `backing` is the owner that keeps it alive.
    unsafe { Buf::from_segments(segs, Arc::new(backing.clone())) }
}

impl Shared {
    fn engine_error(&self, what: &str, e: &EngineError) {
        self.engine_errors.fetch_add(1, Ordering::Relaxed);
        if !self.errors_allowed {
            self.fail(format!("{what} failed without injected faults: {e}"));
        } else if e.errno() == 0 {
            self.fail(format!("{what} failed with errno 0: {e}"));
        }
    }
}

impl Run {
    /// A range of sectors: often block-aligned whole blocks, often arbitrary.
    fn range(&mut self, max_blocks: u64) -> (u64, u64) {
        let vs = self.sc.sectors();
        let bsec = self.sc.block_size / 512;
        let (lba, n) = match self.rng.gen_range(0..10) {
            0..=2 => {
                let b = self.rng.gen_range(0..vs.div_ceil(bsec));
                (b * bsec, bsec * self.rng.gen_range(1..=max_blocks))
            }
            3 => (
                self.rng.gen_range(0..vs),
                self.rng.gen_range(1..=bsec * max_blocks * 2),
            ),
            _ => (
                self.rng.gen_range(0..vs),
                self.rng.gen_range(1..=bsec + bsec / 2),
            ),
        };
        (lba, n.min(vs - lba))
    }

    /// Spawns one random request.
    pub fn spawn_op(&mut self, ex: &mut Executor) {
        let (img, io, sh) = (self.img.clone(), self.io.clone(), self.shared.clone());
        match self.rng.gen_range(0..100) {
            0..=34 => {
                let (lba, n) = self.range(3);
                let buf = scattered(&mut self.rng, n as usize * 512);
                ex.spawn(read_task(img, io, sh, lba, n, buf));
            }
            35..=74 => {
                let (lba, n) = self.range(3);
                let id = self.next_id;
                self.next_id += 1;
                let buf = scattered(&mut self.rng, n as usize * 512);
                let mut sec = [0u8; 512];
                for i in 0..n {
                    fill(id, lba + i, &mut sec);
                    buf.copy_from_slice(i as usize * 512, &sec);
                }
                ex.spawn(async move {
                    let tk = sh.model.lock().write_begin(lba, n, id);
                    let r = img.write(&io, VirtOffset(lba * 512), buf).await;
                    sh.model.lock().end(tk, r.is_ok());
                    if let Err(e) = r {
                        sh.engine_error("write", &e);
                    }
                });
            }
            75..=76 if self.sc.base => ex.spawn(async move {
                // Background prefetch: copies base blocks, never changes what reads return.
                if let Err(e) = img.prefetch_step(&io, 4).await {
                    sh.engine_error("prefetch_step", &e);
                }
            }),
            75..=82 => ex.spawn(async move {
                let t = sh.model.lock().flush_begin();
                let r = img.flush(&io).await;
                sh.model.lock().flush_end(t, r.is_ok());
                if let Err(e) = r {
                    sh.flush_failed.store(true, Ordering::Relaxed);
                    sh.engine_error("flush", &e);
                }
            }),
            83..=89 => {
                let (lba, n) = self.range(6);
                ex.spawn(async move {
                    let tk = sh.model.lock().discard_begin(lba, n);
                    let r = img.discard(&io, VirtOffset(lba * 512), n * 512).await;
                    sh.model.lock().end(tk, false);
                    if let Err(e) = r {
                        sh.engine_error("discard", &e);
                    }
                });
            }
            _ => {
                let (lba, n) = self.range(6);
                let unmap = self.rng.gen_bool(0.5);
                ex.spawn(async move {
                    let tk = sh.model.lock().write_begin(lba, n, ZERO);
                    let r = img
                        .write_zeroes(&io, VirtOffset(lba * 512), n * 512, unmap)
                        .await;
                    sh.model.lock().end(tk, r.is_ok());
                    if let Err(e) = r {
                        sh.engine_error("write_zeroes", &e);
                    }
                });
            }
        }
    }
}

async fn read_task(img: Arc<Image<SimIo>>, io: SimIo, sh: Arc<Shared>, lba: u64, n: u64, buf: Buf) {
    let tk = sh.model.lock().read_begin(lba, n);
    let r = img.read(&io, VirtOffset(lba * 512), buf.clone()).await;
    let data = r.as_ref().ok().map(|_| buf.to_vec());
    if let Err(e) = sh.model.lock().read_end(tk, data.as_deref()) {
        sh.fail(e);
    }
    if let Err(e) = r {
        sh.engine_error("read", &e);
    }
    // As the server does after completing the guest's read.
    img.run_deferred(&io).await;
}
