//! Unit newtypes for the different kinds of offsets the engine juggles.
//!
//! Mixing a virtual byte offset with a physical one, or a block index with a chunk index, is the
//! classic bug of image formats. Each kind gets its own type and only the arithmetic that means
//! something: an offset plus a length is an offset, two offsets give a length, an index times the
//! unit size gives an offset.
//!
//! Where they are enforced: every request entry point of the engine (`Disk`, `Image` and
//! `RawDisk` `read`/`write`/`discard`/`write_zeroes`) takes a [`VirtOffset`], which the server
//! makes once from the guest's sector; everything that touches storage (`Storage`, the `Io`
//! backends) takes a [`PhysOffset`], which only the mapping (`LiveMetadata::phys_of`), the format
//! layer's region offsets and a raw disk's identity mapping produce. Inside one request path the
//! engine works on the plain byte count it unwrapped at the entry. The inner integer stays public
//! (as in `std::num::Wrapping`): the types name what a number means, they do not hide it.

use std::fmt;

/// Size of a virtio-blk sector; the guest addresses the disk in these.
pub const SECTOR_SIZE: u64 = 512;

macro_rules! offset_type {
    ($(#[$m:meta])* $name:ident) => {
        $(#[$m])*
        #[derive(Copy, Clone, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
        pub struct $name(pub u64);

        /// Offset `len` bytes further on.
        impl std::ops::Add<u64> for $name {
            type Output = Self;
            #[inline]
            fn add(self, len: u64) -> Self {
                Self(self.0 + len)
            }
        }

        impl $name {
            /// Bytes from `earlier` to `self`.
            #[inline]
            pub fn since(self, earlier: Self) -> u64 {
                debug_assert!(self.0 >= earlier.0);
                self.0 - earlier.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{:#x}", self.0)
            }
        }
    };
}

offset_type!(
    /// Byte offset in the guest-visible (virtual) disk.
    VirtOffset
);
offset_type!(
    /// Byte offset in the image's storage (file or block device).
    PhysOffset
);

macro_rules! index_type {
    ($(#[$m:meta])* $name:ident, $int:ty) => {
        $(#[$m])*
        #[derive(Copy, Clone, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
        pub struct $name(pub $int);

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{}", self.0)
            }
        }
    };
}

index_type!(
    /// Index of a virtual block (the F1 bitmap's unit, default 64 KiB).
    BlockIndex,
    u64
);
index_type!(
    /// Index of a virtual chunk (the F2 table's unit, default 1 MiB).
    ChunkIndex,
    u64
);
index_type!(
    /// Index of a physical chunk slot in the data area of a compact image.
    PhysChunk,
    u32
);

impl PhysChunk {
    /// Table marker for "no physical chunk allocated".
    pub const UNALLOCATED: PhysChunk = PhysChunk(u32::MAX);

    pub fn is_allocated(self) -> bool {
        self != Self::UNALLOCATED
    }
}

/// Block and chunk sizes of an image and the conversions between the unit types.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct Geometry {
    pub virtual_size: u64,
    pub block_size: u64,
    pub chunk_size: u64,
}

impl Geometry {
    /// Block containing a virtual byte.
    #[inline]
    pub fn block_of(&self, off: VirtOffset) -> BlockIndex {
        BlockIndex(off.0 / self.block_size)
    }
    /// First virtual byte of a block.
    #[inline]
    pub fn block_start(&self, b: BlockIndex) -> VirtOffset {
        VirtOffset(b.0 * self.block_size)
    }
    /// Chunk containing a virtual byte.
    #[inline]
    pub fn chunk_of(&self, off: VirtOffset) -> ChunkIndex {
        ChunkIndex(off.0 / self.chunk_size)
    }
    /// First virtual byte of a chunk.
    #[inline]
    pub fn chunk_start(&self, c: ChunkIndex) -> VirtOffset {
        VirtOffset(c.0 * self.chunk_size)
    }
    /// Chunk a block belongs to.
    #[inline]
    pub fn chunk_of_block(&self, b: BlockIndex) -> ChunkIndex {
        ChunkIndex(b.0 * self.block_size / self.chunk_size)
    }
    /// Blocks per chunk.
    #[inline]
    pub fn blocks_per_chunk(&self) -> u64 {
        self.chunk_size / self.block_size
    }
    /// Number of blocks covering the virtual disk (the last one may be partial).
    pub fn block_count(&self) -> u64 {
        self.virtual_size.div_ceil(self.block_size)
    }
    /// Number of chunks covering the virtual disk (the last one may be partial).
    pub fn chunk_count(&self) -> u64 {
        self.virtual_size.div_ceil(self.chunk_size)
    }
}

/// Parses a size the way qemu-img does: a number with an optional K/M/G/T/P/E suffix (powers of
/// 1024, `B` for bytes), e.g. `64K`, `1G`, `512`.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    if t.is_empty() {
        return Err("empty size".into());
    }
    let (num, mult) = match t.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => {
            let m: u64 = match c.to_ascii_uppercase() {
                'B' => 1,
                'K' => 1 << 10,
                'M' => 1 << 20,
                'G' => 1 << 30,
                'T' => 1 << 40,
                'P' => 1 << 50,
                'E' => 1 << 60,
                _ => {
                    return Err(format!(
                        "invalid size suffix in '{s}' (use K, M, G, T, P, E)"
                    ))
                }
            };
            (&t[..i], m)
        }
        _ => (t, 1),
    };
    if num.contains('.') {
        let v: f64 = num.parse().map_err(|_| format!("invalid size '{s}'"))?;
        if !(v.is_finite() && v >= 0.0) {
            return Err(format!("invalid size '{s}'"));
        }
        let bytes = v * mult as f64;
        if bytes > u64::MAX as f64 {
            return Err(format!("size '{s}' is too large"));
        }
        return Ok(bytes as u64);
    }
    let v: u64 = num.parse().map_err(|_| format!("invalid size '{s}'"))?;
    v.checked_mul(mult)
        .ok_or_else(|| format!("size '{s}' is too large"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_like_qemu_img() {
        assert_eq!(parse_size("512").unwrap(), 512);
        assert_eq!(parse_size("64K").unwrap(), 65536);
        assert_eq!(parse_size("1g").unwrap(), 1 << 30);
        assert_eq!(parse_size("1.5M").unwrap(), 3 << 19);
        assert_eq!(parse_size("2T").unwrap(), 2 << 40);
        assert!(parse_size("").is_err());
        assert!(parse_size("12Q").is_err());
        assert!(parse_size("abc").is_err());
        assert!(parse_size("-1").is_err());
        assert!(parse_size("99999999999E").is_err());
    }

    #[test]
    fn geometry_maps_offsets() {
        let g = Geometry {
            virtual_size: (10 << 20) + 512,
            block_size: 65536,
            chunk_size: 1 << 20,
        };
        assert_eq!(g.block_of(VirtOffset(65535)), BlockIndex(0));
        assert_eq!(g.block_of(VirtOffset(65536)), BlockIndex(1));
        assert_eq!(g.chunk_of_block(BlockIndex(16)), ChunkIndex(1));
        assert_eq!(g.block_count(), 161);
        assert_eq!(g.chunk_count(), 11);
        assert_eq!(g.block_start(BlockIndex(3)).since(VirtOffset(0)), 3 * 65536);
    }
}
