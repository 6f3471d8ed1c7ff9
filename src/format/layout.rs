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
