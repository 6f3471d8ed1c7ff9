//! In-memory metadata: the live bitmap and table that the I/O paths consult without locks, and
//! the committed copy (the state the journal and the on-disk metadata describe) that only flush
//! and checkpoint touch.
//!
//! Live state runs ahead of committed state: a bit is set in the live bitmap as soon as the data
//! write completes, but reaches the committed copy (and disk) only through the next flush's
//! journal records. A checkpoint writes the committed copy, never the live one, so it cannot
//! record a block whose data is not yet durable.

use crate::format::metadata::{self as md, BITS_PER_SECTOR, ENTRIES_PER_SECTOR};
use crate::format::{FormatError, JournalEntry, SECTOR};
use crate::units::{BlockIndex, ChunkIndex, Geometry, PhysChunk};
use std::sync::atomic::{AtomicU16, AtomicU32, AtomicU64, Ordering};

/// Word-level helpers shared by the atomic and plain bitmaps.
fn word_masks(start: u64, count: u64) -> impl Iterator<Item = (usize, u64)> {
    let end = start + count;
    let mut b = start;
    std::iter::from_fn(move || {
        if b >= end {
            return None;
        }
        let w = (b / 64) as usize;
        let lo = b % 64;
        let hi = ((w as u64 + 1) * 64).min(end) - w as u64 * 64;
        let mask = if hi - lo == 64 {
            u64::MAX
        } else {
            ((1u64 << (hi - lo)) - 1) << lo
        };
        b = (w as u64 + 1) * 64;
        Some((w, mask))
    })
}

pub struct LiveMetadata {
    pub geo: Geometry,
    /// Where the data area starts in the image's storage (see [`LiveMetadata::phys_of`]).
    pub(super) data_offset: u64,
    bits: Vec<AtomicU64>,
    table: Vec<AtomicU32>,
    /// Requests in flight per virtual chunk (compact images). A chunk is unmapped only when its
    /// count is zero, so no old read or write can reach a physical chunk after it is reused.
    inflight: Vec<AtomicU16>,
    /// Per virtual chunk: its storage lay past the end of the image file when it was opened
    /// (compact images: its physical chunk was created there in this session), and every block
    /// of it that is not present still reads as zeros there. A first write into such a chunk
    /// needs no zeroing, nor a flush before its journal record.
    fresh: Vec<AtomicU64>,
}

/// Flag in a chunk's in-flight count: the chunk is being unmapped.
const FREEING: u16 = 0x8000;

/// Holds in-flight references on a range of chunks; released on drop.
pub struct ChunkRefs<'a> {
    live: &'a LiveMetadata,
    first: u64,
    last: u64,
}

impl Drop for ChunkRefs<'_> {
    fn drop(&mut self) {
        if self.live.compact() {
            for c in self.first..=self.last {
                self.live.inflight[c as usize].fetch_sub(1, Ordering::SeqCst);
            }
        }
    }
}

impl LiveMetadata {
    /// The live state of `c`, covering `geo` (the capacity: at least `c`'s size; blocks and
    /// chunks past `c`'s end absent and unallocated), for a data area at `data_offset`.
    pub fn from_committed(geo: Geometry, data_offset: u64, c: &Committed) -> Self {
        let words = (geo.block_count().div_ceil(64) as usize).max(c.bits.len());
        let chunks = if c.table.is_empty() {
            0
        } else {
            (geo.chunk_count() as usize).max(c.table.len())
        };
        let entry = |i: usize| c.table.get(i).copied().unwrap_or(PhysChunk::UNALLOCATED.0);
        LiveMetadata {
            geo,
            data_offset,
            bits: (0..words)
                .map(|i| AtomicU64::new(c.bits.get(i).copied().unwrap_or(0)))
                .collect(),
            table: (0..chunks).map(|i| AtomicU32::new(entry(i))).collect(),
            inflight: (0..chunks).map(|_| AtomicU16::new(0)).collect(),
            fresh: (0..geo.chunk_count().div_ceil(64))
                .map(|_| AtomicU64::new(0))
                .collect(),
        }
    }

    /// Marks chunks `first..` fresh (flat images: those past the end of the file at open).
    pub fn set_fresh_from(&self, first: ChunkIndex) {
        let n = self.geo.chunk_count();
        for (i, w) in self.fresh.iter().enumerate() {
            let lo = i as u64 * 64;
            let mut m = u64::MAX;
            if first.0 > lo {
                m &= u64::MAX
                    .checked_shl((first.0 - lo).min(64) as u32)
                    .unwrap_or(0);
            }
            if n < lo + 64 {
                m &= (1u64 << (n.saturating_sub(lo))) - 1;
            }
            w.fetch_or(m, Ordering::Release);
        }
    }

    /// See [`LiveMetadata::fresh`]: true if chunk `c`'s absent blocks are known to read zeros.
    #[inline]
    pub fn is_fresh(&self, c: ChunkIndex) -> bool {
        self.fresh
            .get((c.0 / 64) as usize)
            .is_some_and(|w| w.load(Ordering::Acquire) & (1 << (c.0 % 64)) != 0)
    }

    pub fn set_fresh(&self, c: ChunkIndex, fresh: bool) {
        if let Some(w) = self.fresh.get((c.0 / 64) as usize) {
            let m = 1 << (c.0 % 64);
            if fresh {
                w.fetch_or(m, Ordering::Release);
            } else {
                w.fetch_and(!m, Ordering::Release);
            }
        }
    }

    /// Takes in-flight references on the chunks covering virtual bytes `[off, end)`, before the
    /// table is consulted. If a chunk is being unmapped right now, waits for that to finish (a
    /// few instructions under the allocator lock, never across an await).
    pub fn enter(&self, off: u64, end: u64) -> ChunkRefs<'_> {
        let first = off / self.geo.chunk_size;
        let last = (end.max(off + 1) - 1) / self.geo.chunk_size;
        if self.compact() {
            for c in first..=last {
                let n = &self.inflight[c as usize];
                if n.fetch_add(1, Ordering::SeqCst) & FREEING != 0 {
                    while n.load(Ordering::SeqCst) & FREEING != 0 {
                        std::hint::spin_loop();
                    }
                }
            }
        }
        ChunkRefs {
            live: self,
            first,
            last,
        }
    }

    /// Runs `unmap` with chunk `c` marked as being unmapped, if no request references it.
    /// Requests arriving meanwhile wait in [`LiveMetadata::enter`] and then see the new table.
    pub fn with_idle_chunk(&self, c: ChunkIndex, unmap: impl FnOnce()) -> bool {
        let n = &self.inflight[c.0 as usize];
        if n.compare_exchange(0, FREEING, Ordering::SeqCst, Ordering::SeqCst)
            .is_err()
        {
            return false;
        }
        unmap();
        n.fetch_and(!FREEING, Ordering::SeqCst);
        true
    }

    pub fn compact(&self) -> bool {
        !self.table.is_empty()
    }

    #[inline]
    pub fn present(&self, b: BlockIndex) -> bool {
        let w = self.bits[(b.0 / 64) as usize].load(Ordering::Acquire);
        w & (1 << (b.0 % 64)) != 0
    }

    /// Marks blocks present. Release ordering: a reader that sees the bit sees the data write as
    /// completed.
    pub fn set(&self, start: u64, count: u64) {
        for (w, m) in word_masks(start, count) {
            self.bits[w].fetch_or(m, Ordering::Release);
        }
    }

    pub fn clear(&self, start: u64, count: u64) {
        for (w, m) in word_masks(start, count) {
            self.bits[w].fetch_and(!m, Ordering::Release);
        }
    }

    /// Physical chunk of a virtual chunk (compact images only).
    #[inline]
    pub fn phys(&self, c: ChunkIndex) -> PhysChunk {
        PhysChunk(self.table[c.0 as usize].load(Ordering::SeqCst))
    }

    pub fn set_phys(&self, c: ChunkIndex, p: PhysChunk) {
        self.table[c.0 as usize].store(p.0, Ordering::SeqCst);
    }

    /// True if no block of chunk `c` is present.
    pub fn chunk_empty(&self, c: ChunkIndex) -> bool {
        let bpc = self.geo.blocks_per_chunk();
        let start = c.0 * bpc;
        let count = bpc.min(self.geo.block_count() - start);
        word_masks(start, count).all(|(w, m)| self.bits[w].load(Ordering::Acquire) & m == 0)
    }

    /// Number of present blocks.
    pub fn present_blocks(&self) -> u64 {
        self.bits
            .iter()
            .map(|w| w.load(Ordering::Relaxed).count_ones() as u64)
            .sum()
    }
}

/// The committed metadata plus, per on-disk copy, which sectors differ from what that copy holds.
pub struct Committed {
    pub bits: Vec<u64>,
    pub table: Vec<u32>,
    nblocks: u64,
    bitmap_sectors: u64,
    table_sectors: u64,
    dirty: [Vec<bool>; 2],
}

impl Committed {
    /// Fresh metadata: nothing present, nothing allocated. Both copies are "dirty" (unwritten).
    pub fn new(geo: &Geometry, compact: bool, bitmap_sectors: u64, table_sectors: u64) -> Self {
        let n = (bitmap_sectors + table_sectors) as usize;
        Committed {
            bits: vec![0; geo.block_count().div_ceil(64) as usize],
            table: if compact {
                vec![PhysChunk::UNALLOCATED.0; geo.chunk_count() as usize]
            } else {
                Vec::new()
            },
            nblocks: geo.block_count(),
            bitmap_sectors,
            table_sectors,
            dirty: [vec![true; n], vec![true; n]],
        }
    }

    pub fn sectors(&self) -> u64 {
        self.bitmap_sectors + self.table_sectors
    }

    /// Loads one copy from its raw bytes; that copy is then clean and the other fully dirty.
    pub fn load(&mut self, copy: u32, raw: &[u8]) -> Result<(), FormatError> {
        for s in 0..self.sectors() {
            let sec = &raw[s as usize * SECTOR..(s as usize + 1) * SECTOR];
            md::verify(sec, copy, s)?;
            if s < self.bitmap_sectors {
                md::decode_bitmap_sector(sec, s, &mut self.bits);
            } else {
                md::decode_table_sector(sec, s - self.bitmap_sectors, &mut self.table);
            }
        }
        self.dirty[copy as usize].fill(false);
        self.dirty[1 - copy as usize].fill(true);
        Ok(())
    }

    /// Applies journal entries in order, marking touched sectors dirty in both copies.
    pub fn apply(&mut self, entries: &[JournalEntry]) -> Result<(), FormatError> {
        let nblocks = self.nblocks;
        for e in entries {
            match *e {
                JournalEntry::SetBits { start, count }
                | JournalEntry::ClearBits { start, count } => {
                    if start.checked_add(count).is_none_or(|end| end > nblocks) {
                        return Err(FormatError::Journal(format!(
                            "record {e:?} is outside the bitmap ({nblocks} blocks)"
                        )));
                    }
                    let set = matches!(e, JournalEntry::SetBits { .. });
                    for (w, m) in word_masks(start, count) {
                        if set {
                            self.bits[w] |= m;
                        } else {
                            self.bits[w] &= !m;
                        }
                    }
                    if count > 0 {
                        let first = start / BITS_PER_SECTOR as u64;
                        let last = (start + count - 1) / BITS_PER_SECTOR as u64;
                        for s in first..=last {
                            self.mark(s);
                        }
                    }
                }
                JournalEntry::Map { chunk, phys } => {
                    self.set_entry(chunk, phys)?;
                }
                JournalEntry::Unmap { chunk } => {
                    self.set_entry(chunk, PhysChunk::UNALLOCATED.0)?;
                }
            }
        }
        Ok(())
    }

    fn set_entry(&mut self, chunk: u64, phys: u32) -> Result<(), FormatError> {
        let Some(slot) = self.table.get_mut(chunk as usize) else {
            return Err(FormatError::Journal(format!(
                "record for chunk {chunk} is outside the table ({} chunks)",
                self.table.len()
            )));
        };
        *slot = phys;
        self.mark(self.bitmap_sectors + chunk / ENTRIES_PER_SECTOR as u64);
        Ok(())
    }

    fn mark(&mut self, s: u64) {
        self.dirty[0][s as usize] = true;
        self.dirty[1][s as usize] = true;
    }

    /// Encodes sector `s` of a copy.
    pub fn encode_sector(&self, s: u64, out: &mut [u8]) {
        if s < self.bitmap_sectors {
            md::encode_bitmap_sector(&self.bits, s, out);
        } else {
            md::encode_table_sector(&self.table, s - self.bitmap_sectors, s, out);
        }
    }

    /// Runs `[first, end)` of sectors that `copy` must rewrite to match this state.
    pub fn dirty_runs(&self, copy: u32) -> Vec<(u64, u64)> {
        let d = &self.dirty[copy as usize];
        let mut runs = Vec::new();
        let mut s = 0;
        while s < d.len() {
            if d[s] {
                let start = s;
                while s < d.len() && d[s] {
                    s += 1;
                }
                runs.push((start as u64, s as u64));
            } else {
                s += 1;
            }
        }
        runs
    }

    pub fn mark_written(&mut self, copy: u32) {
        self.dirty[copy as usize].fill(false);
    }

    /// The same state for virtual size `geo` (same sector counts): blocks and chunks past the
    /// new end dropped, new ones absent and unallocated. Every sector is dirty in both copies,
    /// so no bit or entry past the end survives in either.
    pub fn resized(&self, geo: &Geometry) -> Committed {
        let nblocks = geo.block_count();
        let mut bits = self.bits.clone();
        bits.resize(nblocks.div_ceil(64) as usize, 0);
        if nblocks % 64 != 0 {
            if let Some(last) = bits.last_mut() {
                *last &= (1u64 << (nblocks % 64)) - 1;
            }
        }
        let mut table = self.table.clone();
        if !table.is_empty() {
            table.resize(geo.chunk_count() as usize, PhysChunk::UNALLOCATED.0);
        }
        let n = self.dirty[0].len();
        Committed {
            bits,
            table,
            nblocks,
            bitmap_sectors: self.bitmap_sectors,
            table_sectors: self.table_sectors,
            dirty: [vec![true; n], vec![true; n]],
        }
    }

    /// The first virtual byte at or past `end` that holds data: a present block wholly past
    /// it, or (compact) a chunk wholly past it that is mapped.
    pub fn first_allocated_past(&self, geo: &Geometry, end: u64) -> Option<u64> {
        let first_block = end.div_ceil(geo.block_size);
        let block = (first_block..self.nblocks)
            .find(|&b| self.bits[(b / 64) as usize] & (1 << (b % 64)) != 0)
            .map(|b| b * geo.block_size);
        let first_chunk = end.div_ceil(geo.chunk_size);
        let chunk = (first_chunk..self.table.len() as u64)
            .find(|&c| self.table[c as usize] != PhysChunk::UNALLOCATED.0)
            .map(|c| c * geo.chunk_size);
        match (block, chunk) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn masks_cover_ranges_exactly() {
        let geo = Geometry {
            virtual_size: 300 * 4096,
            block_size: 4096,
            chunk_size: 65536,
        };
        let c = Committed::new(&geo, true, 1, 1);
        let live = LiveMetadata::from_committed(geo, 0, &c);
        live.set(60, 70);
        assert!(!live.present(BlockIndex(59)));
        assert!(live.present(BlockIndex(60)) && live.present(BlockIndex(129)));
        assert!(!live.present(BlockIndex(130)));
        assert_eq!(live.present_blocks(), 70);
        live.clear(64, 64);
        assert_eq!(live.present_blocks(), 6);
        assert!(live.chunk_empty(ChunkIndex(5)));
        assert!(!live.chunk_empty(ChunkIndex(3)));
    }

    #[test]
    fn fresh_from_marks_exactly_the_chunks_at_and_after_it() {
        let geo = Geometry {
            virtual_size: 130 * 65536 - 4096,
            block_size: 4096,
            chunk_size: 65536,
        };
        let c = Committed::new(&geo, false, 1, 1);
        for first in [0, 1, 63, 64, 70, 129, 130, 500] {
            let live = LiveMetadata::from_committed(geo, 0, &c);
            live.set_fresh_from(ChunkIndex(first));
            for ch in 0..200 {
                let want = ch >= first && ch < 130;
                assert_eq!(
                    live.is_fresh(ChunkIndex(ch)),
                    want,
                    "first {first} chunk {ch}"
                );
            }
        }
    }

    #[test]
    fn apply_marks_dirty_and_rejects_out_of_range() {
        let geo = Geometry {
            virtual_size: 1 << 30,
            block_size: 4096,
            chunk_size: 1 << 20,
        };
        let mut c = Committed::new(&geo, true, 9, 2);
        c.mark_written(0);
        c.mark_written(1);
        c.apply(&[
            JournalEntry::SetBits {
                start: 40000,
                count: 3,
            },
            JournalEntry::Map {
                chunk: 1023,
                phys: 5,
            },
        ])
        .unwrap();
        assert_eq!(c.dirty_runs(0), vec![(1, 2), (10, 11)]);
        assert_eq!(c.table[1023], 5);
        assert!(c
            .apply(&[JournalEntry::SetBits {
                start: u64::MAX - 1,
                count: 5
            }])
            .is_err());
        assert!(c
            .apply(&[JournalEntry::Map {
                chunk: 5000,
                phys: 1
            }])
            .is_err());
    }

    /// A request arriving while its chunk is being unmapped (another queue's thread) waits in
    /// `enter` until the unmap is done, and then sees the new table, never the physical chunk
    /// being freed (which may at once be reused for another virtual chunk).
    #[test]
    fn a_request_arriving_during_an_unmap_waits_and_sees_the_new_table() {
        use std::sync::atomic::AtomicBool;
        use std::sync::{mpsc, Arc};
        use std::time::Duration;
        let cs = 65536;
        let geo = Geometry {
            virtual_size: 4 * cs,
            block_size: 4096,
            chunk_size: cs,
        };
        let c = Committed::new(&geo, true, 1, 1);
        let live = Arc::new(LiveMetadata::from_committed(geo, 0, &c));
        let chunk = ChunkIndex(1);
        live.set_phys(chunk, PhysChunk(5));
        let (tx, rx) = mpsc::channel();
        let entered = Arc::new(AtomicBool::new(false));
        let unmapped = live.with_idle_chunk(chunk, || {
            let (l, e) = (live.clone(), entered.clone());
            std::thread::spawn(move || {
                let _refs = l.enter(cs, 2 * cs);
                e.store(true, Ordering::SeqCst);
                let _ = tx.send(l.phys(chunk));
            });
            // Until the request has taken its reference (or, not waiting, is through), then
            // time for it to run ahead if it did not wait.
            while live.inflight[1].load(Ordering::SeqCst) != FREEING | 1
                && !entered.load(Ordering::SeqCst)
            {
                std::thread::yield_now();
            }
            std::thread::sleep(Duration::from_millis(100));
            live.set_phys(chunk, PhysChunk::UNALLOCATED);
        });
        assert!(unmapped);
        let seen = rx
            .recv_timeout(Duration::from_secs(10))
            .expect("the request goes on once the unmap is done");
        assert_eq!(seen, PhysChunk::UNALLOCATED);
    }
}
