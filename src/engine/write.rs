//! The write path.
//!
//! Writes to blocks already present in the image go straight to their physical location with no
//! lock and no metadata change: the steady state costs exactly one host write per guest write.
//! A first write to a block takes the block's fill lock and makes the whole block hold what the
//! guest must read there, then queues a journal record for the next flush, writes it to the
//! journal as an intent (see flush.rs) and sets the block's bit. Without a base image, on a file, that is the guest's bytes plus the rest of the block
//! zeroed without writing (fallocate, concurrently with the data write); with a base image, on a
//! block device, or on storage that cannot zero cheaply, it is one write of the block with the
//! guest's bytes merged into base data or zeros (never a read-modify-write loop).

use super::counters::Counters;
use super::error::{EngineError, Result};
use super::image::Image;
use crate::format::JournalEntry;
use crate::io::{Buf, Io};
use crate::units::{BlockIndex, ChunkIndex, PhysOffset, VirtOffset};
use smallvec::SmallVec;
use std::time::Instant;

/// One host write of a guest write.
enum Piece {
    /// Guest bytes `[buf_off, buf_off + len)` to physical `phys`.
    Direct {
        phys: PhysOffset,
        buf_off: usize,
        len: usize,
    },
    /// Block `block` is filled: base data (or zeros) merged with the guest's bytes.
    Merge { block: u64 },
    /// Physical `[phys, phys + len)`, part of a block being filled, is made to read as zeros.
    Zero { phys: PhysOffset, len: u64 },
}

impl<I: Io> Image<I> {
    /// Writes `buf` at virtual offset `off`.
    pub async fn write(&self, io: &I, off: VirtOffset, buf: Buf) -> Result<()> {
        let off = off.0;
        let len = buf.len() as u64;
        self.check_range(off, len)?;
        self.check_writable()?;
        Counters::inc(&self.counters.guest_writes);
        if len == 0 {
            return Ok(());
        }
        let end = off + len;
        let _refs = self.enter_chunks(off, end);
        let first = off / self.geo.block_size;
        let last = (end - 1) / self.geo.block_size;
        if self.live.compact() {
            self.ensure_chunks_waiting(io, first, last).await?;
        }
        let needs_fill = |b: u64| self.lock_all_writes || !self.live.present(BlockIndex(b));
        if !(first..=last).any(needs_fill) {
            return self.write_present(io, off, &buf).await;
        }
        // Lock in ascending order (deadlock-free), then plan: the bits may have changed while we
        // waited. A block that was present when we chose what to lock may have been discarded
        // meanwhile; filling it without its lock could overwrite a concurrent fill, so start over
        // with it locked too.
        let mut guards = SmallVec::<[_; 4]>::new();
        loop {
            let want: SmallVec<[u64; 4]> = (first..=last).filter(|&b| needs_fill(b)).collect();
            for &b in &want {
                guards.push(self.locks.lock(b).await);
            }
            if (first..=last).all(|b| self.live.present(BlockIndex(b)) || want.contains(&b)) {
                break;
            }
            guards.clear();
        }
        let mut pieces: SmallVec<[Piece; 4]> = SmallVec::new();
        let mut newly: SmallVec<[u64; 4]> = SmallVec::new();
        let mut zeros: SmallVec<[Piece; 2]> = SmallVec::new();
        for b in first..=last {
            let bs = b * self.geo.block_size;
            let be = bs + self.geo.block_size;
            let (s, e) = (bs.max(off), be.min(end));
            if !self.live.present(BlockIndex(b)) {
                newly.push(b);
                if s != bs || e != be {
                    match self.zero_pieces(bs, be, s, e) {
                        // Kept apart so the guest's bytes still coalesce into one write.
                        Some(z) => zeros.extend(z),
                        None => {
                            pieces.push(Piece::Merge { block: b });
                            continue;
                        }
                    }
                }
            }
            let phys = self.live.phys_of(s);
            let buf_off = (s - off) as usize;
            let n = (e - s) as usize;
            match pieces.last_mut() {
                Some(Piece::Direct {
                    phys: p,
                    buf_off: o,
                    len: l,
                }) if *p + *l as u64 == phys && *o + *l == buf_off => *l += n,
                _ => pieces.push(Piece::Direct {
                    phys,
                    buf_off,
                    len: n,
                }),
            }
        }
        pieces.extend(zeros);
        // Where a lost data write exposes nothing (the block read zeros and its storage reads
        // zeros until written), the intent need not wait for the data: queue it now so its
        // journal write overlaps the data write. The bits are still set only after both.
        let early = !newly.is_empty() && self.zeros_before(&newly);
        let upto = early.then(|| self.queue_present(&newly));
        let data =
            futures::future::join_all(pieces.iter().map(|p| self.write_piece(io, p, off, &buf)));
        let journal = async {
            match upto {
                Some(u) => self.persist(io, u).await,
                None => Ok(()),
            }
        };
        let (results, journaled) = futures::future::join(data, journal).await;
        let failed = results.into_iter().find_map(|r| r.err());
        if let Some(e) = failed.or(journaled.err()) {
            // Part of the write may have landed in blocks that stay absent: their chunks no
            // longer read as zeros there.
            for &b in &newly {
                self.live
                    .set_fresh(self.geo.chunk_of_block(BlockIndex(b)), false);
            }
            if early {
                // The blocks stay absent: a later FLUSH must not commit their queued bits, and
                // a process crash must not adopt their journaled intent. If this journal write
                // fails too, the request's error is still the one to report.
                let upto = self.unqueue_present(&newly);
                let _ = self.persist(io, upto).await;
            }
            return Err(e);
        }
        if early {
            self.set_present(&newly);
        } else if !newly.is_empty() {
            if let Err(e) = self.mark_present(io, &newly).await {
                for &b in &newly {
                    self.live
                        .set_fresh(self.geo.chunk_of_block(BlockIndex(b)), false);
                }
                return Err(e);
            }
        }
        drop(guards);
        Ok(())
    }

    /// The zeroing that completes a first write of guest bytes `[s, e)` into block `[bs, be)`,
    /// or None if the block must be merged instead (base data to bring in, storage that cannot
    /// zero without writing, or edges not on the storage's zeroing granularity).
    fn zero_pieces(&self, bs: u64, be: u64, s: u64, e: u64) -> Option<SmallVec<[Piece; 2]>> {
        if self.base.is_none()
            && self.live.is_fresh(
                self.geo
                    .chunk_of_block(BlockIndex(bs / self.geo.block_size)),
            )
        {
            Counters::inc(&self.counters.zeroing_skipped);
            return Some(SmallVec::new());
        }
        if self.base.is_some() || !self.store.zeroes_cheaply() {
            return None;
        }
        let za = self.store.zero_align();
        let (pbs, ps, pe) = (
            self.live.phys_of(bs),
            self.live.phys_of(s),
            self.live.phys_of(e - 1) + 1,
        );
        if pbs.0 % za != 0 || ps.0 % za != 0 || pe.0 % za != 0 {
            return None;
        }
        let mut z = SmallVec::new();
        if s > bs {
            z.push(Piece::Zero {
                phys: pbs,
                len: s - bs,
            });
        }
        if e < be {
            z.push(Piece::Zero {
                phys: pe,
                len: be - e,
            });
        }
        Some(z)
    }

    /// Fast path: every block is present, so bytes go to their physical place unchanged.
    async fn write_present(&self, io: &I, off: u64, buf: &Buf) -> Result<()> {
        let len = buf.len() as u64;
        if !self.live.compact() {
            return self
                .store
                .write(
                    io,
                    &self.counters,
                    PhysOffset(self.live.data_offset) + off,
                    buf.clone(),
                )
                .await;
        }
        // Compact: one host write per physically contiguous run of chunks. By chunk, not by
        // the bitmap: a DISCARD racing this write may clear a bit meanwhile, while the chunk
        // references keep the chunk mapped.
        let mut runs: SmallVec<[(PhysOffset, usize, usize); 2]> = SmallVec::new();
        let mut pos = off;
        while pos < off + len {
            let cend = ((pos / self.geo.chunk_size) + 1) * self.geo.chunk_size;
            let e = cend.min(off + len);
            let phys = self.live.phys_of(pos);
            let (bo, n) = ((pos - off) as usize, (e - pos) as usize);
            match runs.last_mut() {
                Some((p, _, l)) if *p + *l as u64 == phys => *l += n,
                _ => runs.push((phys, bo, n)),
            }
            pos = e;
        }
        if runs.len() == 1 {
            return self
                .store
                .write(io, &self.counters, runs[0].0, buf.clone())
                .await;
        }
        let futs = runs
            .iter()
            .map(|&(p, bo, n)| self.store.write(io, &self.counters, p, buf.slice(bo, n)));
        futures::future::join_all(futs)
            .await
            .into_iter()
            .collect::<Result<Vec<()>>>()?;
        Ok(())
    }

    async fn write_piece(&self, io: &I, piece: &Piece, off: u64, buf: &Buf) -> Result<()> {
        match *piece {
            Piece::Direct { phys, buf_off, len } => {
                self.store
                    .write(io, &self.counters, phys, buf.slice(buf_off, len))
                    .await
            }
            Piece::Merge { block } => {
                let bsize = self.geo.block_size;
                let bs = block * bsize;
                let blk = Buf::alloc(bsize as usize);
                if self.base.is_some() {
                    self.read_base(io, bs, blk.clone()).await?;
                }
                let end = off + buf.len() as u64;
                let (s, e) = (bs.max(off), (bs + bsize).min(end));
                blk.copy_from_buf((s - bs) as usize, buf, (s - off) as usize, (e - s) as usize);
                self.store
                    .write(io, &self.counters, self.live.phys_of(bs), blk)
                    .await
            }
            Piece::Zero { phys, len } => {
                self.store.write_zeroes(io, &self.counters, phys, len).await
            }
        }
    }

    /// Queues the journal records of blocks whose data is now written, journals them (so a
    /// crash of this process keeps them), then sets their bits. Only then may another request
    /// see the blocks present and complete a write into them without a journal write of its own.
    /// The caller holds the blocks' fill locks.
    pub(super) async fn mark_present(&self, io: &I, blocks: &[u64]) -> Result<()> {
        let upto = self.queue_present(blocks);
        if let Err(e) = self.persist(io, upto).await {
            self.unqueue_present(blocks);
            return Err(e);
        }
        self.set_present(blocks);
        Ok(())
    }

    fn set_present(&self, blocks: &[u64]) {
        for (start, count) in runs(blocks) {
            self.live.set(start, count);
        }
    }

    /// Queues records clearing the bits of `blocks`, whose request failed after their set
    /// records were queued: they stay absent, so a later FLUSH must not commit those bits, or
    /// the blocks would read differently after a reopen.
    /// Returns the queue number after them.
    fn unqueue_present(&self, blocks: &[u64]) -> u64 {
        self.journal.queue(
            false,
            runs(blocks).map(|(start, count)| JournalEntry::ClearBits { start, count }),
        )
    }

    /// Without a base an absent block reads zeros, and in a fresh chunk its storage reads zeros
    /// until written: if the record became durable before the data, the block would read as it
    /// did before the write.
    fn zeros_before(&self, blocks: &[u64]) -> bool {
        self.base.is_none()
            && blocks
                .iter()
                .all(|&b| self.live.is_fresh(self.geo.chunk_of_block(BlockIndex(b))))
    }

    /// Queues the journal records of `blocks`; returns the queue number after them.
    fn queue_present(&self, blocks: &[u64]) -> u64 {
        // Anywhere but where zeros_before holds, the data must be durable first.
        let zeros_before = self.zeros_before(blocks);
        self.journal.queue(
            !zeros_before,
            runs(blocks).map(|(start, count)| JournalEntry::SetBits { start, count }),
        )
    }

    /// Allocates chunks for blocks `first..=last`, waiting for space if the device is full and a
    /// policy allows it.
    pub(super) async fn ensure_chunks_waiting(&self, io: &I, first: u64, last: u64) -> Result<()> {
        let mut deadline: Option<Instant> = None;
        let mut syncs = ReleaseSyncs::default();
        loop {
            let seen = self.space.generation();
            match self.ensure_chunks(first, last) {
                Err(EngineError::NoSpace(_))
                    if syncs.another(self.space.alloc().awaiting_release()) =>
                {
                    // Chunks freed by discards become reusable once their unmap is durable;
                    // a flush may be committing some right now. Wait for it and commit the rest
                    // rather than fail (an extra flush never breaks a promise).
                    self.sync(io).await?;
                }
                Err(EngineError::NoSpace(msg)) => {
                    let Some(wait) = self.space.ask() else {
                        return Err(EngineError::NoSpace(msg));
                    };
                    let d = *deadline.get_or_insert_with(|| Instant::now() + wait);
                    if Instant::now() >= d {
                        tracing::error!("no space for new chunks after waiting {wait:?}: {msg}; failing the write");
                        return Err(EngineError::NoSpace(msg));
                    }
                    self.space.changed(seen).await;
                }
                Err(e) => return Err(e),
                Ok(allocated) => {
                    // Free space only shrinks when we allocate: no locks on the common path.
                    if allocated {
                        self.space.check_watermark(self.geo.chunk_size);
                    }
                    return Ok(());
                }
            }
        }
    }

    /// Gives every chunk touched by blocks `first..=last` a physical chunk; true if it allocated.
    pub(super) fn ensure_chunks(&self, first: u64, last: u64) -> Result<bool> {
        let mut allocated = false;
        let c0 = self.geo.chunk_of_block(BlockIndex(first)).0;
        let c1 = self.geo.chunk_of_block(BlockIndex(last)).0;
        for c in c0..=c1 {
            if self.live.phys(ChunkIndex(c)).is_allocated() {
                continue;
            }
            let mut alloc = self.space.alloc();
            if self.live.phys(ChunkIndex(c)).is_allocated() {
                continue; // another queue won the race
            }
            let hint = c
                .checked_sub(1)
                .map(|prev| self.live.phys(ChunkIndex(prev)))
                .filter(|p| p.is_allocated())
                .map(|p| p.0 + 1);
            let (p, fresh) = alloc.alloc(&self.store, hint)?;
            // Before the mapping is visible: a writer that sees the chunk must see this too
            // (seeing "not fresh" would only cost it a needless zeroing).
            self.live.set_fresh(ChunkIndex(c), fresh);
            self.live.set_phys(ChunkIndex(c), p);
            self.journal.queue(
                false,
                [JournalEntry::Map {
                    chunk: c,
                    phys: p.0,
                }],
            );
            Counters::inc(&self.counters.chunks_allocated);
            allocated = true;
        }
        Ok(allocated)
    }
}

/// Runs `(start, count)` of consecutive blocks in an ascending list.
fn runs(blocks: &[u64]) -> impl Iterator<Item = (u64, u64)> + '_ {
    let mut i = 0;
    std::iter::from_fn(move || {
        let start = *blocks.get(i)?;
        let mut j = i + 1;
        while j < blocks.len() && blocks[j] == blocks[j - 1] + 1 {
            j += 1;
        }
        let count = (j - i) as u64;
        i = j;
        Some((start, count))
    })
}

/// The flushes a write that found no free chunk makes before it turns to the space policy:
/// one always (it may make chunks freed by discards reusable), more only while chunks still
/// await release (other writers took what the last one released), at most [`Self::MAX`] so
/// writers racing for chunks cannot keep each other flushing forever.
#[derive(Default)]
struct ReleaseSyncs {
    done: u32,
}

impl ReleaseSyncs {
    const MAX: u32 = 16;

    /// Whether to flush once more, given the chunks now awaiting release.
    fn another(&mut self, awaiting_release: u64) -> bool {
        if self.done >= Self::MAX || (self.done > 0 && awaiting_release == 0) {
            return false;
        }
        self.done += 1;
        true
    }
}

#[cfg(test)]
mod tests {
    use super::ReleaseSyncs;

    #[test]
    fn a_write_without_space_flushes_once_when_nothing_awaits_release() {
        let mut s = ReleaseSyncs::default();
        assert!(s.another(0));
        assert!(!s.another(0));
        let mut s = ReleaseSyncs::default();
        assert!(s.another(3));
        assert!(
            !s.another(0),
            "nothing left to release after the first flush"
        );
    }

    #[test]
    fn flushes_while_chunks_await_release_are_bounded() {
        let mut s = ReleaseSyncs::default();
        let n = (0..100).take_while(|_| s.another(1)).count();
        assert_eq!(n, ReleaseSyncs::MAX as usize);
        assert!(!s.another(1), "the bound holds on later calls too");
    }
}
