//! The read path: each piece of a request comes from this image, the base image, or zeros.

use super::counters::Counters;
use super::error::Result;
use super::image::Image;
use crate::io::{Buf, Io};
use crate::units::{BlockIndex, PhysOffset, VirtOffset};

/// Where a piece of a read comes from.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
enum Source {
    Here(PhysOffset),
    Base,
    Zero,
}

impl<I: Io> Image<I> {
    /// Physical offset of a virtual byte whose block is present (or about to be written).
    #[inline]
    pub(super) fn phys_of(&self, off: u64) -> PhysOffset {
        if self.live.compact() {
            let c = self.geo.chunk_of(VirtOffset(off));
            let p = self.live.phys(c);
            debug_assert!(p.is_allocated());
            PhysOffset(self.data_offset + p.0 as u64 * self.geo.chunk_size)
                + (off - self.geo.chunk_start(c).0)
        } else {
            PhysOffset(self.data_offset) + off
        }
    }

    /// Reads `buf.len()` bytes at virtual offset `off`.
    pub async fn read(&self, io: &I, off: VirtOffset, buf: Buf) -> Result<()> {
        let off = off.0;
        let len = buf.len() as u64;
        self.check_range(off, len)?;
        Counters::inc(&self.counters.guest_reads);
        if len == 0 {
            return Ok(());
        }
        let _refs = self.enter_chunks(off, off + len);
        // Split into pieces of one source each, merging neighbours that are contiguous.
        let mut pieces: smallvec::SmallVec<[(Source, u64, u64); 4]> = smallvec::SmallVec::new();
        let mut pos = off;
        let end = off + len;
        while pos < end {
            let b = self.geo.block_of(VirtOffset(pos));
            let bend = self.geo.block_start(BlockIndex(b.0 + 1)).0.min(end);
            let src = if self.live.present(b) {
                Source::Here(self.phys_of(pos))
            } else if self.base.is_some() {
                Source::Base
            } else {
                Source::Zero
            };
            let n = bend - pos;
            match (pieces.last_mut(), src) {
                (Some((Source::Here(p), _, l)), Source::Here(q)) if q == *p + *l => *l += n,
                (Some((Source::Base, _, l)), Source::Base)
                | (Some((Source::Zero, _, l)), Source::Zero) => *l += n,
                _ => pieces.push((src, pos, n)),
            }
            pos = bend;
        }
        if pieces.len() == 1 {
            let (src, vpos, n) = pieces[0];
            return self
                .read_piece(io, src, vpos, buf.slice(0, n as usize))
                .await;
        }
        let futs = pieces.iter().map(|&(src, vpos, n)| {
            self.read_piece(io, src, vpos, buf.slice((vpos - off) as usize, n as usize))
        });
        for r in futures::future::join_all(futs).await {
            r?;
        }
        Ok(())
    }

    async fn read_piece(&self, io: &I, src: Source, vpos: u64, buf: Buf) -> Result<()> {
        match src {
            Source::Here(p) => self.store.read(io, &self.counters, p, buf).await,
            Source::Base if self.base.is_some() => {
                self.read_base(io, vpos, buf.clone()).await?;
                if self.copy_on_read() {
                    self.queue_copy_on_read(vpos, &buf);
                }
                Ok(())
            }
            Source::Base | Source::Zero => {
                buf.zero(0, buf.len());
                Ok(())
            }
        }
    }
}
