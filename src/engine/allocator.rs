//! Physical chunk allocation for compact images. Chunks are handed out lowest-first, so data
//! written together lands together and the data area stays dense.

use super::error::{EngineError, Result};
use super::storage::Storage;
use crate::format::Header;
use crate::io::{Growth, Io, IoFile};
use crate::units::PhysChunk;
use std::collections::BTreeSet;

pub struct Allocator {
    /// Lowest chunk index never handed out.
    next: u32,
    /// Unused chunks below `next`.
    free: BTreeSet<u32>,
    allocated: u64,
    /// Chunks that fit the storage (block devices); `None` for files, which grow.
    capacity: Option<u64>,
    data_offset: u64,
    chunk_size: u64,
    /// Files: chunks from this index up lay past the end of the file when it was opened, so
    /// they read as zeros until this session writes them.
    fresh_from: Option<u32>,
    /// Files: length the file has been grown to (ahead of allocation, so that data writes never
    /// extend the file: file systems serialize extending direct writes).
    file_len: u64,
}

/// Files grow by this much when allocation reaches the end. The new part is reserved where
/// that is cheap ([`Growth::Reserved`]), so this also bounds the space held ahead of need.
const GROW_STEP: u64 = 64 << 20;

impl Allocator {
    /// Rebuilds allocation state from the table, rejecting tables that map two virtual chunks to
    /// one physical chunk (that would let one chunk's data show up in another).
    pub fn from_table<I: Io>(table: &[u32], h: &Header, store: &Storage<I>) -> Result<Allocator> {
        let mut used = BTreeSet::new();
        for (v, &p) in table.iter().enumerate() {
            if p == PhysChunk::UNALLOCATED.0 {
                continue;
            }
            if !used.insert(p) {
                return Err(EngineError::Corrupt(format!(
                    "physical chunk {p} is mapped twice (second time by virtual chunk {v})"
                )));
            }
        }
        let next = used.last().map_or(0, |&p| p + 1);
        let free = (0..next).filter(|p| !used.contains(p)).collect();
        let mut a = Allocator {
            next,
            free,
            allocated: used.len() as u64,
            capacity: None,
            data_offset: h.data_offset,
            chunk_size: h.chunk_size as u64,
            fresh_from: None,
            file_len: 0,
        };
        if store.file.is_block_device() {
            a.refresh_capacity(store)?;
        } else {
            let len = store.file.size().map_err(|error| EngineError::Io {
                context: "size of image file",
                error,
            })?;
            let past_end = len.saturating_sub(a.data_offset).div_ceil(a.chunk_size);
            a.fresh_from = Some(past_end.min(u32::MAX as u64) as u32);
            a.file_len = len;
        }
        Ok(a)
    }

    /// Re-reads the size of a block device (after it grew).
    pub fn refresh<I: Io>(&mut self, store: &Storage<I>) -> Result<()> {
        if self.capacity.is_some() {
            self.refresh_capacity(store)?;
        }
        Ok(())
    }

    fn refresh_capacity<I: Io>(&mut self, store: &Storage<I>) -> Result<()> {
        let size = store.file.size().map_err(|error| EngineError::Io {
            context: "size of device",
            error,
        })?;
        self.capacity = Some(size.saturating_sub(self.data_offset) / self.chunk_size);
        Ok(())
    }

    /// Takes a free chunk, preferring `hint` (the chunk after the previous virtual chunk's, so
    /// data near in the guest stays near on the device). On a block device that is full,
    /// re-reads its size first (it may have been grown). Also says whether the chunk is fresh:
    /// never used before and past the end of the file at open, so it reads as zeros.
    pub fn alloc<I: Io>(
        &mut self,
        store: &Storage<I>,
        hint: Option<u32>,
    ) -> Result<(PhysChunk, bool)> {
        if let Some(h) = hint {
            if self.free.remove(&h) {
                self.allocated += 1;
                return Ok((PhysChunk(h), false));
            }
        }
        if let Some(p) = self.free.pop_first() {
            self.allocated += 1;
            return Ok((PhysChunk(p), false));
        }
        if let Some(cap) = self.capacity {
            if self.next as u64 >= cap {
                self.refresh_capacity(store)?;
                if self.next as u64 >= self.capacity.unwrap_or(0) {
                    return Err(EngineError::NoSpace(format!(
                        "all {} chunks of the device are in use",
                        self.capacity.unwrap_or(0)
                    )));
                }
            }
        }
        if self.next >= PhysChunk::UNALLOCATED.0 - 1 {
            return Err(EngineError::NoSpace("chunk index space exhausted".into()));
        }
        let p = self.next;
        self.grow_file(store, p)?;
        self.next += 1;
        self.allocated += 1;
        Ok((PhysChunk(p), self.fresh_from.is_some_and(|f| p >= f)))
    }

    /// Files: makes sure chunk `p` lies inside the file, growing it well ahead.
    fn grow_file<I: Io>(&mut self, store: &Storage<I>, p: u32) -> Result<()> {
        if self.fresh_from.is_none() {
            return Ok(());
        }
        let end = self.data_offset + (p as u64 + 1) * self.chunk_size;
        if end <= self.file_len {
            return Ok(());
        }
        let step = GROW_STEP.next_multiple_of(self.chunk_size);
        let len = end.max(self.file_len + step);
        // Reserved: on ext4 the alloc benchmark ran at 27.5k IOPS into holes against 31.5k into
        // reserved space (docs/PERFORMANCE.md, "Reserving ahead").
        store
            .file
            .grow(len, Growth::Reserved)
            .map_err(|error| EngineError::Io {
                context: "grow image file",
                error,
            })?;
        self.file_len = len;
        Ok(())
    }

    /// A chunk was unmapped; it becomes allocatable only through [`Allocator::release`], once
    /// its unmap record is durable.
    pub fn unmapped(&mut self) {
        self.allocated -= 1;
    }

    /// Makes chunks allocatable again.
    pub fn release(&mut self, chunks: impl IntoIterator<Item = u32>) {
        self.free.extend(chunks);
    }

    /// Chunks free for allocation right now, if the storage is bounded.
    pub fn free_chunks(&self) -> Option<u64> {
        self.capacity
            .map(|cap| cap.saturating_sub(self.next as u64) + self.free.len() as u64)
    }

    /// Chunks unmapped but not yet released (their unmap is not durable yet).
    pub fn awaiting_release(&self) -> u64 {
        (self.next as u64).saturating_sub(self.free.len() as u64 + self.allocated)
    }

    pub fn allocated(&self) -> u64 {
        self.allocated
    }

    /// Chunks the storage can hold, if bounded.
    pub fn capacity(&self) -> Option<u64> {
        self.capacity
    }
}
