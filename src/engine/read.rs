//! The read path: each piece of a request comes from this image, the base image, or zeros.

use super::counters::Counters;
use super::error::Result;
use super::image::Image;
use super::mapping::{Mapped, Source};
use crate::io::{Buf, Io};
use crate::units::VirtOffset;
use smallvec::SmallVec;

impl<I: Io> Image<I> {
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
        let mut map = self.live.map(off, off + len, self.base.is_some());
        let Some(first) = map.next() else {
            return Ok(());
        };
        if first.len == len {
            // One source (most reads): no list.
            return self.read_piece(io, first, buf).await;
        }
        let pieces: SmallVec<[Mapped; 4]> = std::iter::once(first).chain(map).collect();
        let futs = pieces
            .iter()
            .map(|&m| self.read_piece(io, m, buf.slice((m.off - off) as usize, m.len as usize)));
        for r in futures::future::join_all(futs).await {
            r?;
        }
        Ok(())
    }

    /// Reads piece `m` into `buf` (exactly its length).
    async fn read_piece(&self, io: &I, m: Mapped, buf: Buf) -> Result<()> {
        match m.source {
            Source::Here(p) => self.store.read(io, &self.counters, p, buf).await,
            Source::Base if self.base.is_some() => {
                self.read_base(io, m.off, buf.clone()).await?;
                if self.copy_on_read() {
                    self.queue_copy_on_read(m.off, &buf);
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
