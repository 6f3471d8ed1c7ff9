//! Physical chunk allocation for compact images. Chunks are handed out lowest-first, so data
//! written together lands together and the data area stays dense.

use super::error::{Corruption, EngineError, IoContext, IoOp, NoSpace, Result};
use super::storage::Storage;
use crate::format::Header;
use crate::io::{Growth, Io, IoFile};
use crate::units::PhysChunk;
use std::collections::BTreeMap;

/// Unused chunks below the allocator's `next`, as runs `start -> end` (exclusive), so memory
/// follows the number of mapped chunks, never the value of a physical chunk number.
#[derive(Default)]
struct FreeRuns {
    runs: BTreeMap<u32, u32>,
    len: u64,
}

impl FreeRuns {
    /// Takes chunk `p` if it is free.
    fn take(&mut self, p: u32) -> bool {
        let Some((&start, &end)) = self.runs.range(..=p).next_back() else {
            return false;
        };
        if p >= end {
            return false;
        }
        self.runs.remove(&start);
        if start < p {
            self.runs.insert(start, p);
        }
        if p + 1 < end {
            self.runs.insert(p + 1, end);
        }
        self.len -= 1;
        true
    }

    fn pop_first(&mut self) -> Option<u32> {
        let (&start, _) = self.runs.first_key_value()?;
        self.take(start).then_some(start)
    }

    /// Adds the free run `[start, end)`, merging it with its neighbours. Chunks already free
    /// are ignored.
    fn insert_run(&mut self, start: u32, end: u32) {
        let mut p = start;
        while p < end {
            // Skip what is already free, then add the gap up to the next free run.
            if let Some((_, &e)) = self.runs.range(..=p).next_back().filter(|(_, &e)| e > p) {
                p = e;
                continue;
            }
            let gap_end = self
                .runs
                .range(p..)
                .next()
                .map_or(end, |(&s, _)| s.min(end));
            let mut lo = p;
            let mut hi = gap_end;
            if let Some((&s, &e)) = self.runs.range(..p).next_back() {
                if e == p {
                    self.runs.remove(&s);
                    lo = s;
                }
            }
            if let Some(e) = self.runs.remove(&gap_end) {
                hi = e;
            }
            self.runs.insert(lo, hi);
            self.len += (gap_end - p) as u64;
            p = hi;
        }
    }

    fn len(&self) -> u64 {
        self.len
    }
}

pub struct Allocator {
    /// Lowest chunk index never handed out.
    next: u32,
    /// Unused chunks below `next`.
    free: FreeRuns,
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
    /// Files: length covered by a completed flush. A table record must never become durable
    /// while the chunk it maps lies past the durable end of the file: a crash could then leave
    /// a mapping past the end, which open reports as a truncated image.
    durable_len: u64,
}

/// Files grow by this much when allocation reaches the end. The new part is reserved where
/// that is cheap ([`Growth::Reserved`]), so this also bounds the space held ahead of need.
const GROW_STEP: u64 = 64 << 20;

impl Allocator {
    /// Rebuilds allocation state from the table, rejecting tables that map two virtual chunks to
    /// one physical chunk (that would let one chunk's data show up in another).
    pub fn from_table<I: Io>(table: &[u32], h: &Header, store: &Storage<I>) -> Result<Allocator> {
        let mut used: Vec<(u32, usize)> = table
            .iter()
            .enumerate()
            .filter(|&(_, &p)| p != PhysChunk::UNALLOCATED.0)
            .map(|(v, &p)| (p, v))
            .collect();
        used.sort_unstable();
        if let Some(w) = used.windows(2).find(|w| w[0].0 == w[1].0) {
            return Err(EngineError::Corrupt(Corruption::ChunkMappedTwice {
                phys: w[0].0,
                first: w[0].1,
                second: w[1].1,
            }));
        }
        let next = used.last().map_or(0, |&(p, _)| p + 1);
        let mut free = FreeRuns::default();
        let mut at = 0;
        for &(p, _) in &used {
            if at < p {
                free.insert_run(at, p);
            }
            at = p + 1;
        }
        let mut a = Allocator {
            next,
            free,
            allocated: used.len() as u64,
            capacity: None,
            data_offset: h.data_offset,
            chunk_size: h.chunk_size as u64,
            fresh_from: None,
            file_len: 0,
            durable_len: 0,
        };
        if store.file.is_block_device() {
            a.refresh_capacity(store)?;
        } else {
            let len = store.file.size().ctx(IoOp::Size, "size of image file")?;
            let past_end = len.saturating_sub(a.data_offset).div_ceil(a.chunk_size);
            a.fresh_from = Some(past_end.min(u32::MAX as u64) as u32);
            a.file_len = len;
            a.durable_len = len;
        }
        Ok(a)
    }

    /// Files: grows the file now over the next chunk to allocate, so that the flush of a
    /// read-write open makes that growth durable and the first allocations need no extra flush
    /// (see [`Allocator::undurable_growth`]).
    pub fn grow_ahead<I: Io>(&mut self, store: &Storage<I>) -> Result<()> {
        if self.next < PhysChunk::UNALLOCATED.0 - 1 {
            self.grow_file(store, self.next)?;
        }
        Ok(())
    }

    /// Files: the length the file was grown to, if a flush has not yet made it durable. A
    /// flush that journals table records must then flush before writing them.
    pub fn undurable_growth(&self) -> Option<u64> {
        (self.fresh_from.is_some() && self.file_len > self.durable_len).then_some(self.file_len)
    }

    /// A flush completed after the file had been grown to `len`.
    pub fn growth_durable(&mut self, len: u64) {
        self.durable_len = self.durable_len.max(len);
    }

    /// Re-reads the size of a block device (after it grew).
    pub fn refresh<I: Io>(&mut self, store: &Storage<I>) -> Result<()> {
        if self.capacity.is_some() {
            self.refresh_capacity(store)?;
        }
        Ok(())
    }

    fn refresh_capacity<I: Io>(&mut self, store: &Storage<I>) -> Result<()> {
        let size = store.file.size().ctx(IoOp::Size, "size of device")?;
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
            if self.free.take(h) {
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
                    return Err(EngineError::NoSpace(NoSpace::DeviceFull {
                        chunks: self.capacity.unwrap_or(0),
                    }));
                }
            }
        }
        if self.next >= PhysChunk::UNALLOCATED.0 - 1 {
            return Err(EngineError::NoSpace(NoSpace::ChunkIndex));
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
            .ctx(IoOp::Grow, "grow image file")?;
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
        for p in chunks {
            self.free.insert_run(p, p + 1);
        }
    }

    /// Chunks free for allocation right now, if the storage is bounded.
    pub fn free_chunks(&self) -> Option<u64> {
        self.capacity
            .map(|cap| cap.saturating_sub(self.next as u64) + self.free.len())
    }

    /// Chunks unmapped but not yet released (their unmap is not durable yet).
    pub fn awaiting_release(&self) -> u64 {
        (self.next as u64).saturating_sub(self.free.len() + self.allocated)
    }

    pub fn allocated(&self) -> u64 {
        self.allocated
    }
}

#[cfg(test)]
mod tests {
    use super::{Allocator, FreeRuns};
    use crate::engine::error::{EngineError, NoSpace};
    use crate::engine::storage::Storage;
    use crate::io::sim::{SimConfig, SimIo, SimWorld};
    use crate::units::PhysChunk;
    use std::collections::BTreeSet;

    /// With every chunk index below 2^32 - 2 in use (none free), allocation fails with "chunk
    /// index space exhausted", again and again: the last index handed out is 2^32 - 3, so
    /// `next` (an exclusive end) stays below the table's unallocated marker. A chunk released
    /// later is handed out again.
    #[test]
    fn allocation_stops_below_the_unallocated_marker() {
        let world = SimWorld::new(1, SimConfig::default());
        let store = Storage::<SimIo>::new(world.create_disk(0, 512));
        let last = PhysChunk::UNALLOCATED.0 - 2;
        // What from_table builds for a file whose table maps chunks 0..last.
        let len = last as u64 * 4096;
        let mut a = Allocator {
            next: last,
            free: FreeRuns::default(),
            allocated: last as u64,
            capacity: None,
            data_offset: 0,
            chunk_size: 4096,
            fresh_from: Some(last),
            file_len: len,
            durable_len: len,
        };
        assert_eq!(a.alloc(&store, None).unwrap().0, PhysChunk(last));
        for _ in 0..2 {
            match a.alloc(&store, None) {
                Err(EngineError::NoSpace(NoSpace::ChunkIndex)) => {}
                r => panic!("allocation past chunk {last}: {r:?}"),
            }
        }
        assert_eq!(a.allocated(), last as u64 + 1);
        a.unmapped();
        a.release([7]);
        assert_eq!(a.alloc(&store, None).unwrap().0, PhysChunk(7));
    }

    /// The runs behave like a set of chunk numbers under every operation the allocator uses.
    #[test]
    fn free_runs_behave_like_a_set() {
        let mut runs = FreeRuns::default();
        let mut set = BTreeSet::new();
        let mut x = 12345u64;
        let mut rnd = |n: u32| {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((x >> 33) % n as u64) as u32
        };
        for _ in 0..20000 {
            match rnd(4) {
                0 => {
                    let s = rnd(200);
                    let e = s + rnd(20);
                    runs.insert_run(s, e);
                    set.extend(s..e);
                }
                1 => {
                    let p = rnd(220);
                    assert_eq!(runs.take(p), set.remove(&p), "take {p}");
                }
                2 => assert_eq!(runs.pop_first(), set.pop_first()),
                _ => {
                    let p = rnd(220);
                    runs.insert_run(p, p + 1);
                    set.insert(p);
                }
            }
            assert_eq!(runs.len(), set.len() as u64);
            let flat: Vec<u32> = runs.runs.iter().flat_map(|(&s, &e)| s..e).collect();
            assert_eq!(flat, set.iter().copied().collect::<Vec<_>>());
            // Runs are maximal: no two touch.
            assert!(runs
                .runs
                .iter()
                .zip(runs.runs.iter().skip(1))
                .all(|((_, &e), (&s, _))| e < s));
        }
    }
}
