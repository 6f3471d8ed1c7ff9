//! DISCARD and WRITE ZEROES.
//!
//! Whole blocks are dropped from the image by clearing their bits: afterwards they read from the
//! base image, or as zeros without one, and their storage is punched out. Partial blocks are left
//! alone by DISCARD (its contents are unspecified anyway) and written with zeros by WRITE ZEROES.
//! With a base image, WRITE ZEROES must not expose base data, so it writes zeros.

use super::counters::Counters;
use super::error::Result;
use super::image::Image;
use crate::format::JournalEntry;
use crate::io::{Buf, Io};
use crate::units::{BlockIndex, ChunkIndex, PhysChunk, PhysOffset, VirtOffset};

/// Zero buffer size for WRITE ZEROES done as writes.
const ZERO_CHUNK: u64 = 1 << 20;

impl<I: Io> Image<I> {
    /// Drops whole blocks of `[off, off + len)` from the image.
    pub async fn discard(&self, io: &I, off: VirtOffset, len: u64) -> Result<()> {
        let off = off.0;
        self.check_range(off, len)?;
        self.check_writable()?;
        Counters::inc(&self.counters.guest_discards);
        self.drop_blocks(io, off, len).await?;
        self.persist_queued(io).await
    }

    /// Makes `[off, off + len)` read as zeros. `unmap` allows freeing the space.
    pub async fn write_zeroes(&self, io: &I, off: VirtOffset, len: u64, unmap: bool) -> Result<()> {
        let off = off.0;
        self.check_range(off, len)?;
        self.check_writable()?;
        let end = off + len;
        let bs = self.geo.block_size;
        let (head_end, tail_start) = if self.base.is_none() {
            // Without a base, a cleared bit reads as zeros: drop the whole blocks.
            let first_full = off.next_multiple_of(bs);
            let last_full = end / bs * bs;
            if first_full < last_full {
                if unmap {
                    self.drop_blocks(io, first_full, last_full - first_full)
                        .await?;
                } else {
                    self.drop_blocks_inner(io, first_full / bs, last_full / bs, false)
                        .await?;
                }
                (first_full, last_full)
            } else {
                (end, end)
            }
        } else {
            (end, end)
        };
        self.write_zero_range(io, off, head_end).await?;
        self.write_zero_range(io, tail_start.max(head_end), end)
            .await?;
        self.persist_queued(io).await
    }

    /// Journals every record queued so far (see `persist`): a DISCARD or WRITE ZEROES does not
    /// complete before its records survive a crash of this process.
    async fn persist_queued(&self, io: &I) -> Result<()> {
        let upto = self.journal.end();
        self.persist(io, upto).await
    }

    async fn write_zero_range(&self, io: &I, mut off: u64, end: u64) -> Result<()> {
        if off >= end {
            return Ok(());
        }
        let zeros = Buf::alloc(ZERO_CHUNK.min(end - off) as usize);
        while off < end {
            let n = (end - off).min(ZERO_CHUNK);
            self.write(io, VirtOffset(off), zeros.slice(0, n as usize))
                .await?;
            off += n;
        }
        Ok(())
    }

    /// Clears the bits of the whole blocks in the range, punches their storage and unmaps
    /// chunks left empty (compact images).
    async fn drop_blocks(&self, io: &I, off: u64, len: u64) -> Result<()> {
        let bs = self.geo.block_size;
        let first = off.div_ceil(bs);
        let end = (off + len) / bs;
        if first >= end {
            return Ok(());
        }
        {
            let _refs = self.enter_chunks(first * bs, end * bs);
            self.drop_blocks_inner(io, first, end, true).await?;
        }
        // Our own references are gone: unmap what is now empty and idle.
        if self.live.compact() {
            let c0 = first * bs / self.geo.chunk_size;
            let c1 = (end * bs - 1) / self.geo.chunk_size;
            for c in c0..=c1 {
                self.try_unmap(ChunkIndex(c));
            }
        }
        Ok(())
    }

    /// Clears the bits of blocks `[first, end)` and, with `punch`, punches the storage of those
    /// that were present. Works a batch at a time under the blocks' fill locks: a fill in
    /// progress (which sets its bit when its data is written) must finish before we clear, or
    /// it would set the bit afterwards over a block whose contents this request removed.
    async fn drop_blocks_inner(&self, io: &I, first: u64, end: u64, punch: bool) -> Result<()> {
        const BATCH: u64 = 64;
        let bs = self.geo.block_size;
        let mut b0 = first;
        while b0 < end {
            let b1 = (b0 + BATCH).min(end);
            let mut guards = Vec::with_capacity((b1 - b0) as usize);
            for b in b0..b1 {
                guards.push(self.locks.lock(b).await);
            }
            // Punch runs of present blocks that are physically contiguous.
            let mut runs: Vec<(PhysOffset, u64)> = Vec::new();
            for b in (b0..b1).filter(|&b| punch && self.live.present(BlockIndex(b))) {
                let p = self.live.phys_of(b * bs);
                match runs.last_mut() {
                    Some((s, l)) if *s + *l == p => *l += bs,
                    _ => runs.push((p, bs)),
                }
            }
            // Dropped blocks keep their old bytes where a punch is not done or not supported.
            let c0 = self.geo.chunk_of_block(BlockIndex(b0)).0;
            let c1 = self.geo.chunk_of_block(BlockIndex(b1 - 1)).0;
            for c in c0..=c1 {
                self.live.set_fresh(ChunkIndex(c), false);
            }
            self.clear_blocks(b0, b1 - b0);
            for (p, l) in runs {
                self.store.punch_hole(io, p, l).await?;
            }
            b0 = b1;
        }
        Ok(())
    }

    /// Unmaps chunk `c` if no block of it is present and no request is using it. The physical
    /// chunk is reusable after the next flush makes the unmap durable: reusing it earlier could
    /// let a crash map the old virtual chunk onto the new owner's data.
    fn try_unmap(&self, c: ChunkIndex) {
        let mut alloc = self.space.alloc();
        let p = self.live.phys(c);
        if !p.is_allocated() || !self.live.chunk_empty(c) {
            return;
        }
        let idle = self.live.with_idle_chunk(c, || {
            // No request holds the chunk and new ones wait, so its bits cannot change now.
            if !self.live.chunk_empty(c) {
                return;
            }
            self.live.set_phys(c, PhysChunk::UNALLOCATED);
            alloc.unmapped();
            self.journal.queue_unmap(c.0, p.0);
        });
        if !idle {
            self.space.unmap_later(c.0);
        }
    }

    /// Tries again the unmaps a DISCARD left for later because a request was using the chunk.
    pub(super) fn retry_unmaps(&self) {
        for c in self.space.take_unmap_later() {
            self.try_unmap(ChunkIndex(c));
        }
    }

    fn clear_blocks(&self, first: u64, count: u64) {
        self.journal.queue_with(
            JournalEntry::ClearBits {
                start: first,
                count,
            },
            || self.live.clear(first, count),
        );
    }
}
