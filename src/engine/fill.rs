//! Copying base data into the image: copy-on-read and prefetching both come down to "fill block
//! b from the base", done under the block's fill lock so a guest write to the block waits for
//! the copy and is never overwritten by it.

use super::counters::Counters;
use super::error::Result;
use super::image::Image;
use crate::format::header::{COMPAT_COPY_ON_READ, FLAG_BASE_NOT_NEEDED};
use crate::io::{Buf, Io};
use crate::units::BlockIndex;

pub use super::cor::{CorJob, COR_MAX_INFLIGHT};

/// Progress of prefetching.
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq)]
pub struct PrefetchStep {
    /// Blocks copied by this step.
    pub copied: u64,
    /// Bytes read from the base by this step.
    pub bytes: u64,
    /// True when no block is left to copy.
    pub done: bool,
}

impl<I: Io> Image<I> {
    /// Turns copy-on-read on or off for this open image (the header's setting is the default).
    pub fn set_copy_on_read(&self, on: bool) {
        self.cor
            .set_on(on && self.base.is_some() && !self.read_only);
    }

    pub fn copy_on_read(&self) -> bool {
        self.cor.on()
    }

    pub(super) fn cor_default(&self) -> bool {
        self.journal.header().compat & COMPAT_COPY_ON_READ != 0
    }

    /// Called by the read path for a piece served from the base: queues copies of the blocks
    /// it touched. A block the read covered entirely is copied from the read's own data (one
    /// memory copy instead of a second base read).
    pub(super) fn queue_copy_on_read(&self, vpos: u64, buf: &Buf) {
        let bs = self.geo.block_size;
        let end = vpos + buf.len() as u64;
        let base_end = self.base_end();
        let mut b = vpos / bs;
        while b * bs < end && b * bs < base_end {
            let (s, e) = (b * bs, (b + 1) * bs);
            let queued = self.cor.try_queue(bs, || {
                let data = (s >= vpos && e <= end).then(|| {
                    let copy = Buf::alloc(bs as usize);
                    copy.copy_from_buf(0, buf, (s - vpos) as usize, bs as usize);
                    copy
                });
                CorJob { block: b, data }
            });
            if !queued {
                return;
            }
            b += 1;
        }
    }

    /// Runs queued copy-on-read jobs. The server calls this after it has completed the guest's
    /// read, so the guest never waits for the copy.
    pub async fn run_deferred(&self, io: &I) {
        loop {
            let Some(job) = self.cor.next() else {
                return;
            };
            let r = self.fill_block(io, job.block, job.data).await;
            if matches!(r, Ok(true)) {
                Counters::add(&self.counters.cor_bytes, self.geo.block_size);
            }
            self.cor.done(self.geo.block_size);
            if let Err(e) = r {
                if self.failed() {
                    // Its space recycling flushed, and the flush failed: no longer a detail.
                    tracing::error!(
                        "copy-on-read of block {} failed: {e}; the image refuses writes until reopened",
                        job.block
                    );
                } else {
                    // Copy-on-read is an optimization: the data stays readable from the base.
                    tracing::debug!("copy-on-read of block {} failed: {e}", job.block);
                }
            }
        }
    }

    /// Copies block `b` from the base into the image unless it is already present.
    /// Returns whether it copied.
    pub async fn fill_block(&self, io: &I, b: u64, data: Option<Buf>) -> Result<bool> {
        self.check_writable()?;
        let bs = self.geo.block_size;
        let _refs = self.enter_chunks(b * bs, (b + 1) * bs);
        if self.live.present(BlockIndex(b)) {
            return Ok(false);
        }
        if self.live.compact() {
            self.ensure_chunks_waiting(io, b, b).await?;
        }
        let _lock = self.locks.lock(b).await;
        if self.live.present(BlockIndex(b)) {
            return Ok(false);
        }
        let blk = match data {
            Some(d) => d,
            None => {
                let d = Buf::alloc(bs as usize);
                if self.base.is_some() {
                    self.read_base(io, b * bs, d.clone()).await?;
                }
                d
            }
        };
        self.store
            .write(io, &self.counters, self.live.phys_of(b * bs), blk)
            .await?;
        // Journaled before the bit is set even though losing a copy loses nothing: a guest
        // write that then finds the block present must not depend on an unjournaled record.
        self.mark_present(io, &[b]).await?;
        Ok(true)
    }

    /// Blocks that still read from the base image.
    pub fn base_blocks_remaining(&self) -> u64 {
        if self.base.is_none() {
            return 0;
        }
        let n = self
            .base_end()
            .min(self.virtual_size())
            .div_ceil(self.geo.block_size);
        (0..n)
            .filter(|&b| !self.live.present(BlockIndex(b)))
            .count() as u64
    }

    /// Copies up to `max_blocks` base blocks that are not yet present, continuing where the
    /// previous step stopped.
    pub async fn prefetch_step(&self, io: &I, max_blocks: u64) -> Result<PrefetchStep> {
        if self.base.is_none() {
            return Ok(PrefetchStep {
                done: true,
                ..Default::default()
            });
        }
        let n = self
            .base_end()
            .min(self.virtual_size())
            .div_ceil(self.geo.block_size);
        let mut step = PrefetchStep::default();
        let mut scanned = 0;
        let mut b = self.cor.prefetch_cursor() % n.max(1);
        while scanned < n && step.copied < max_blocks {
            if !self.live.present(BlockIndex(b)) && self.fill_block(io, b, None).await? {
                step.copied += 1;
                step.bytes += self.geo.block_size;
                Counters::add(&self.counters.prefetch_bytes, self.geo.block_size);
            }
            scanned += 1;
            b = (b + 1) % n;
        }
        self.cor.set_prefetch_cursor(b);
        // A full pass filled every block it found missing.
        step.done = scanned >= n;
        Ok(step)
    }

    /// After every base block is present: makes that durable and records in the header that
    /// the base image is no longer needed (`fvd rebase --drop-base` can then detach it).
    pub async fn mark_base_not_needed(&self, io: &I) -> Result<bool> {
        if self.base.is_none() || self.base_blocks_remaining() != 0 {
            return Ok(false);
        }
        self.flush(io).await?;
        let mut fs = self.journal.lock_state().await;
        if fs.header.flags & FLAG_BASE_NOT_NEEDED == 0 {
            self.write_header(io, &mut fs, |h| h.flags |= FLAG_BASE_NOT_NEEDED)
                .await?;
        }
        Ok(true)
    }
}

impl<I: Io> Image<I> {
    /// Changes the header (feature bits, flags, base reference) durably.
    pub async fn update_header(
        &self,
        io: &I,
        change: impl FnOnce(&mut crate::format::Header),
    ) -> Result<()> {
        self.check_writable()?;
        let mut fs = self.journal.lock_state().await;
        self.write_header(io, &mut fs, change).await
    }
}
