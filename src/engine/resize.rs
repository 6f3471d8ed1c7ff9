//! Changing the virtual size of an image (docs/FORMAT.md, "Resizing").
//!
//! The metadata copies are sized at create for the largest size (`--max-size`), and the live
//! metadata covers all of it from open, so a resize moves and reallocates nothing: it is a
//! checkpoint whose header also carries the new size. The committed metadata, cut or extended
//! to the new size, goes to the inactive copy; one flush; then the header names that copy, the
//! new size and a new journal epoch in one slot write; a flush. A crash before that header is
//! durable leaves the old header, whose copy and journal were not touched; after it, the new
//! size with its own copy and an empty journal. So a crash leaves the old size or the new one,
//! never a mix, and no journal record of one size is ever replayed against the other.
//!
//! While requests run ([`Image::grow`]), the new size is published only after that header is
//! durable: until then requests past the old end fail. Records queued meanwhile name blocks
//! below the old end and go into the new epoch's journal as usual.

use super::error::{EngineError, IoContext, IoOp, ResizeRefused, Result};
use super::image::Image;
use crate::io::{Io, IoFile};
use crate::units::{BlockIndex, Geometry};
use std::sync::atomic::Ordering;

impl<I: Io> Image<I> {
    /// Sets the virtual size to `size` bytes with the image held exclusively (`fvd resize`):
    /// grows as [`Image::grow`] does, or, with `shrink`, shrinks when nothing is allocated past
    /// the new end.
    pub async fn resize(&mut self, io: &I, size: u64, shrink: bool) -> Result<()> {
        self.change_size(io, size, shrink).await
    }

    /// Grows the virtual disk to `size` bytes while requests run: they fail past the old end
    /// until the new size is durable, and then see it. Growing needs room in the metadata
    /// ([`crate::format::Header::capacity`]); the range past the old end reads zeros, with or
    /// without a base image. Shrinking is refused here: a request that passed the range check
    /// before could still land past the new end (see [`Image::resize`]).
    pub async fn grow(&self, io: &I, size: u64) -> Result<()> {
        if size < self.virtual_size() {
            return Err(EngineError::Resize(ResizeRefused::ShrinkInUse {
                size,
                current: self.virtual_size(),
            }));
        }
        self.change_size(io, size, false).await
    }

    /// The work of both; shrinking only through [`Image::resize`] (exclusive).
    async fn change_size(&self, io: &I, size: u64, shrink: bool) -> Result<()> {
        self.check_writable()?;
        super::lock_order::assert_none_held("resizing");
        let _one = self.resizing.lock().await;
        let old = self.virtual_size();
        if size == 0 || size % 512 != 0 {
            return Err(EngineError::Resize(ResizeRefused::BadSize(size)));
        }
        if size == old {
            return Ok(());
        }
        if size < old && !shrink {
            return Err(EngineError::Resize(ResizeRefused::ShrinkNeeded {
                size,
                current: old,
            }));
        }
        let geo = Geometry {
            virtual_size: size,
            ..self.geo
        };
        let capacity = self.journal.header().capacity();
        if size > capacity {
            return Err(EngineError::Resize(ResizeRefused::Capacity {
                size,
                capacity,
            }));
        }
        let compact = self.live.compact();
        if !compact && size > old {
            let need = self.live.data_offset + geo.block_count() * geo.block_size;
            if self.store.file.is_block_device() {
                let have = self.store.file.size().ctx(IoOp::Size, "size of device")?;
                if have < need {
                    return Err(EngineError::Resize(ResizeRefused::DeviceTooSmall {
                        have,
                        need,
                    }));
                }
            } else {
                // The file covers the whole virtual disk before any record can name a block
                // of the new range; the checkpoint's flush makes the length durable first.
                super::image::prepare_flat_file(&self.store, &self.live, size)?;
            }
        }
        // The old last block, if partial, is locked (fill locks come before the flush state)
        // so no first write or fill of it runs while its tail is zeroed.
        let bs = self.geo.block_size;
        let last = BlockIndex(old / bs);
        let _tail = if size > old && old % bs != 0 {
            Some(self.locks.lock(last.0).await)
        } else {
            None
        };
        let mut fs = self.journal.lock_state().await;
        // Every completed write into the committed state, so the copy written below holds it.
        self.sync_locked(io, &mut fs).await?;
        if size < old {
            let geo_old = Geometry {
                virtual_size: old,
                ..self.geo
            };
            if let Some(offset) = fs.committed.first_allocated_past(&geo_old, size) {
                return Err(EngineError::Resize(ResizeRefused::Allocated {
                    offset,
                    size,
                }));
            }
        } else if _tail.is_some() && self.live.present(last) {
            // What its storage holds past the old end (zeros of a first write, or base data
            // merged or copied into it) must read as zeros once that range is part of the
            // disk. Durable with the checkpoint's flush, before the header; until then those
            // bytes are past the end.
            let len = (last.0 + 1) * bs - old;
            self.store
                .write_zeroes(io, &self.counters, self.live.phys_of(old), len)
                .await?;
        }
        let resized = fs.committed.resized(&geo);
        fs.committed = resized;
        // The base's bytes past the smaller of the two sizes stay hidden for good: a later
        // grow must read zeros there.
        let base_limit = old.min(size);
        let r = self
            .checkpoint_changing(io, &mut fs, false, |h| {
                h.set_virtual_size(size);
                if let Some(b) = &mut h.base {
                    b.size = b.size.min(base_limit);
                }
            })
            .await;
        if let Err(e) = r {
            // The committed state in memory is the new size's, the header on disk may be the
            // old one: nothing more may be written until the image is reopened.
            self.failed.store(true, Ordering::Release);
            return Err(e);
        }
        let base_end = fs.header.base.as_ref().map_or(0, |b| b.size);
        self.base_end.fetch_min(base_end, Ordering::AcqRel);
        // Only now may requests reach the new range.
        self.size.store(size, Ordering::Release);
        Ok(())
    }
}
