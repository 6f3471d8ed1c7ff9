//! The mapping: where each range of the virtual disk is read from, as the live metadata says
//! now. The read path and `fvd map` act on the pieces it returns instead of walking the bitmap
//! and the table themselves; the write path takes physical offsets from `phys_of` (its fast
//! path maps by chunk: a racing DISCARD may clear a bit the bitmap-based mapping would see).
//!
//! The answer holds while the caller holds what keeps it true: chunk references
//! ([`LiveMetadata::enter`], so a chunk is not unmapped and reused) and, for blocks that are not
//! present, whatever orders it against a fill (the write path's block locks; a read racing a
//! fill may read the base, which is what the block held before).

use super::metadata::LiveMetadata;
use crate::units::{BlockIndex, PhysOffset, VirtOffset};

/// Where a range of the virtual disk is read from.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum Source {
    /// This image's storage, from this physical offset.
    Here(PhysOffset),
    /// The base image.
    Base,
    /// Zeros (no base image).
    Zero,
}

/// Virtual bytes `[off, off + len)`, all from one source (contiguous when `Here`).
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct Mapped {
    pub off: u64,
    pub len: u64,
    pub source: Source,
}

/// The pieces of a range, in order, neighbours of one source merged; see [`LiveMetadata::map`].
pub struct Mapping<'a> {
    live: &'a LiveMetadata,
    pos: u64,
    end: u64,
    has_base: bool,
}

impl LiveMetadata {
    /// Physical offset of virtual byte `off`, whose block is present (or about to be written,
    /// its chunk allocated).
    #[inline]
    pub fn phys_of(&self, off: u64) -> PhysOffset {
        if self.compact() {
            let c = self.geo.chunk_of(VirtOffset(off));
            let p = self.phys(c);
            debug_assert!(p.is_allocated());
            PhysOffset(self.data_offset + p.0 as u64 * self.geo.chunk_size)
                + (off - self.geo.chunk_start(c).0)
        } else {
            PhysOffset(self.data_offset) + off
        }
    }

    /// Where virtual bytes `[off, end)` are read from: blocks present here, the rest from the
    /// base image if there is one (`has_base`), else zeros.
    #[inline]
    pub fn map(&self, off: u64, end: u64, has_base: bool) -> Mapping<'_> {
        Mapping {
            live: self,
            pos: off,
            end,
            has_base,
        }
    }

    #[inline]
    fn source_of(&self, pos: u64, has_base: bool) -> Source {
        if self.present(self.geo.block_of(VirtOffset(pos))) {
            Source::Here(self.phys_of(pos))
        } else if has_base {
            Source::Base
        } else {
            Source::Zero
        }
    }
}

impl Iterator for Mapping<'_> {
    type Item = Mapped;

    #[inline]
    fn next(&mut self) -> Option<Mapped> {
        if self.pos >= self.end {
            return None;
        }
        let geo = &self.live.geo;
        let start = self.pos;
        let source = self.live.source_of(start, self.has_base);
        let mut len = 0;
        while self.pos < self.end {
            let b = geo.block_of(VirtOffset(self.pos));
            let bend = geo.block_start(BlockIndex(b.0 + 1)).0.min(self.end);
            if self.pos != start {
                let next = self.live.source_of(self.pos, self.has_base);
                let joins = match (source, next) {
                    (Source::Here(p), Source::Here(q)) => q == p + len,
                    (a, b) => a == b,
                };
                if !joins {
                    break;
                }
            }
            len += bend - self.pos;
            self.pos = bend;
        }
        Some(Mapped {
            off: start,
            len,
            source,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::metadata::Committed;
    use crate::units::{ChunkIndex, Geometry, PhysChunk};

    const BS: u64 = 4096;
    const CS: u64 = 4 * BS;
    const DATA: u64 = 1 << 20;

    fn live(compact: bool) -> LiveMetadata {
        let geo = Geometry {
            virtual_size: 8 * CS,
            block_size: BS,
            chunk_size: CS,
        };
        LiveMetadata::from_committed(geo, DATA, &Committed::new(&geo, compact, 1, 1))
    }

    fn pieces(l: &LiveMetadata, off: u64, end: u64, base: bool) -> Vec<(u64, u64, Source)> {
        l.map(off, end, base)
            .map(|m| (m.off, m.len, m.source))
            .collect()
    }

    #[test]
    fn a_flat_image_maps_present_blocks_in_place_and_the_rest_to_base_or_zeros() {
        let l = live(false);
        l.set(1, 2); // blocks 1 and 2
        let here = |v: u64| Source::Here(PhysOffset(DATA + v));
        assert_eq!(
            pieces(&l, 512, 4 * BS - 512, true),
            [
                (512, BS - 512, Source::Base),
                (BS, 2 * BS, here(BS)),
                (3 * BS, BS - 512, Source::Base),
            ]
        );
        assert_eq!(
            pieces(&l, 0, 4 * BS, false),
            [
                (0, BS, Source::Zero),
                (BS, 2 * BS, here(BS)),
                (3 * BS, BS, Source::Zero),
            ]
        );
        assert_eq!(
            pieces(&l, BS + 8, BS + 16, false),
            [(BS + 8, 8, here(BS + 8))]
        );
        assert!(pieces(&l, BS, BS, false).is_empty());
    }

    #[test]
    fn a_compact_image_merges_only_physically_contiguous_chunks() {
        let l = live(true);
        // Virtual chunks 0, 1, 2 at physical 5, 6, 2: 0 and 1 are contiguous, 2 is not.
        for (v, p) in [(0, 5), (1, 6), (2, 2)] {
            l.set_phys(ChunkIndex(v), PhysChunk(p));
        }
        l.set(0, 12);
        let at = |p: u64, o: u64| Source::Here(PhysOffset(DATA + p * CS + o));
        assert_eq!(
            pieces(&l, BS, 3 * CS - BS, false),
            [(BS, 2 * CS - BS, at(5, BS)), (2 * CS, CS - BS, at(2, 0))]
        );
        assert_eq!(l.phys_of(CS + 100), PhysOffset(DATA + 6 * CS + 100));
        // A block not present in the middle of a chunk splits it.
        l.clear(5, 1);
        assert_eq!(
            pieces(&l, CS, 2 * CS, true),
            [
                (CS, BS, at(6, 0)),
                (CS + BS, BS, Source::Base),
                (CS + 2 * BS, 2 * BS, at(6, 2 * BS)),
            ]
        );
    }
}
