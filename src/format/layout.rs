//! Where each region goes for a given geometry.

use super::{metadata, SECTOR};
use crate::units::Geometry;

/// Region sizes and offsets for a new image.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Layout {
    pub bitmap_sectors: u64,
    pub table_sectors: u64,
    pub meta_offset: [u64; 2],
    pub meta_len: u64,
    pub journal_offset: u64,
    pub journal_len: u64,
    pub data_offset: u64,
}

impl Layout {
    pub fn compute(geo: &Geometry, compact: bool, journal_len: u64) -> Layout {
        let bitmap_sectors = geo.block_count().div_ceil(metadata::BITS_PER_SECTOR as u64);
        let table_sectors = if compact {
            geo.chunk_count()
                .div_ceil(metadata::ENTRIES_PER_SECTOR as u64)
        } else {
            0
        };
        let meta_len = (bitmap_sectors + table_sectors) * SECTOR as u64;
        let meta0 = 2 * SECTOR as u64;
        let meta1 = meta0 + meta_len;
        let journal_offset = meta1 + meta_len;
        let journal_len = journal_len.next_multiple_of(SECTOR as u64);
        let data_offset = (journal_offset + journal_len).next_multiple_of(geo.chunk_size);
        Layout {
            bitmap_sectors,
            table_sectors,
            meta_offset: [meta0, meta1],
            meta_len,
            journal_offset,
            journal_len,
            data_offset,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn regions_follow_each_other_as_documented() {
        // 100 GiB, 64 KiB blocks, 1 MiB chunks: 1638400 blocks, 102400 chunks.
        let geo = Geometry {
            virtual_size: 100 << 30,
            block_size: 64 << 10,
            chunk_size: 1 << 20,
        };
        let l = Layout::compute(&geo, true, (16 << 20) + 1);
        // ceil(1638400 / 32640) = 51, ceil(102400 / 1020) = 101.
        assert_eq!((l.bitmap_sectors, l.table_sectors), (51, 101));
        assert_eq!(l.meta_len, 152 * 4096);
        assert_eq!(l.meta_offset, [8192, 8192 + 152 * 4096]);
        assert_eq!(l.journal_offset, 8192 + 2 * 152 * 4096);
        // The journal is rounded up to whole sectors, the data area to a whole chunk.
        assert_eq!(l.journal_len, (16 << 20) + 4096);
        assert_eq!(l.data_offset, 18 << 20);
        // Without compact there is no table.
        let flat = Layout::compute(&geo, false, 16 << 20);
        assert_eq!((flat.bitmap_sectors, flat.table_sectors), (51, 0));
        assert_eq!(flat.journal_offset, 8192 + 2 * 51 * 4096);
        assert_eq!(flat.data_offset, 17 << 20);
    }
}
