//! Changing the virtual size of an image (docs/FORMAT.md, "Resizing").
//!
//! The metadata copies are sized at create for the largest size (`--max-size`), so a resize
//! moves no region: it is a checkpoint whose header also carries the new size. The committed
//! metadata, cut or extended to the new size, goes to the inactive copy; one flush; then the
//! header names that copy, the new size and a new journal epoch in one slot write; a flush. A
//! crash before that header write is durable leaves the old header, whose copy and journal
//! were not touched; after it, the new size with its own copy and an empty journal. So a crash
//! leaves the old size or the new one, never a mix, and no journal record of one size is ever
//! replayed against the other.

use super::error::{EngineError, IoContext, IoOp, ResizeRefused, Result};
use super::image::Image;
use super::metadata::LiveMetadata;
use crate::io::{Io, IoFile};
use crate::units::{BlockIndex, Geometry};
use std::sync::atomic::Ordering;

impl<I: Io> Image<I> {
    /// Sets the virtual size to `size` bytes. Growing needs room in the metadata
    /// ([`crate::format::Header::capacity`]); shrinking needs `shrink` and nothing allocated
    /// past the new end. The range past the old end reads zeros afterwards, with or without a
    /// base image. Takes the image exclusively: no request may be in flight.
    pub async fn resize(&mut self, io: &I, size: u64, shrink: bool) -> Result<()> {
        self.check_writable()?;
        let old = self.geo.virtual_size;
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
        let capacity = self.header_snapshot.lock().capacity();
        if size > capacity {
            return Err(EngineError::Resize(ResizeRefused::Capacity {
                size,
                capacity,
            }));
        }
        let compact = self.live.compact();
        if !compact && self.store.file.is_block_device() {
            let need = self.data_offset + geo.block_count() * geo.block_size;
            let have = self.store.file.size().ctx(IoOp::Size, "size of device")?;
            if have < need {
                return Err(EngineError::Resize(ResizeRefused::DeviceTooSmall {
                    have,
                    need,
                }));
            }
        }
        let mut fs = self.flush_state.lock().await;
        // Every completed write into the committed state, so the copy written below holds it.
        self.sync_locked(io, &mut fs).await?;
        if size < old {
            if let Some(offset) = fs.committed.first_allocated_past(&self.geo, size) {
                return Err(EngineError::Resize(ResizeRefused::Allocated {
                    offset,
                    size,
                }));
            }
        } else {
            // The old last block may be present and partial: what its storage holds past the
            // old end (zeros of a first write, or base data merged or copied into it) must read
            // as zeros once that range is part of the disk. Durable with the checkpoint's flush
            // before the header; until then those bytes are past the end.
            let bs = self.geo.block_size;
            let last = BlockIndex(old / bs);
            if old % bs != 0 && self.live.present(last) {
                let len = (last.0 + 1) * bs - old;
                self.store
                    .write_zeroes(io, &self.counters, self.phys_of(old), len)
                    .await?;
            }
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
        let live = LiveMetadata::from_committed(geo, &fs.committed);
        let base_end = fs.header.base.as_ref().map_or(0, |b| b.size);
        drop(fs);
        self.geo = geo;
        self.live = live;
        self.base_end = self.base_end.min(base_end);
        if !compact && !self.store.file.is_block_device() && size > old {
            super::image::prepare_flat_file(&self.store, &self.live, self.data_offset)?;
        }
        Ok(())
    }
}
