//! The FVD on-disk format (version 1). Pure encoding/decoding: no I/O happens here.
//! docs/FORMAT.md is the prose version of this module.
//!
//! ```text
//! 0        header slot 0 (4 KiB)   } two slots, the valid one with the highest generation wins,
//! 4 KiB    header slot 1 (4 KiB)   } so a torn header write never loses the image
//! 8 KiB    metadata copy 0: bitmap sectors, then table sectors (each 4 KiB sector ends in a CRC)
//! ...      metadata copy 1 (a checkpoint writes the inactive copy, then flips the header)
//! ...      journal (default 16 MiB of 4 KiB self-checking sectors)
//! ...      data area, aligned to the chunk size
//! ```

pub mod header;
pub mod journal;
pub mod layout;
pub mod metadata;

pub use header::{BaseFormat, BaseRef, Header};
pub use journal::JournalEntry;

/// Every metadata structure is written in units of this size.
pub const SECTOR: usize = 4096;

/// Errors found while decoding on-disk structures.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FormatError {
    #[error("not an FVD image (bad magic)")]
    BadMagic,
    #[error("both header copies are corrupt (checksum mismatch)")]
    HeaderChecksum,
    #[error("unsupported FVD format version {0} (this program supports version 1)")]
    UnsupportedVersion(u32),
    #[error("image uses unknown incompatible features {0:#x}; refusing to open it")]
    UnknownIncompatFeatures(u64),
    #[error("invalid header: {0}")]
    InvalidHeader(String),
    #[error("corrupt journal: {0}")]
    Journal(String),
    #[error("metadata sector {index} of copy {copy} is corrupt ({what})")]
    MetadataSector {
        copy: u32,
        index: u64,
        what: &'static str,
    },
}

/// crc32c over `data`, as stored in every trailer.
pub fn checksum(data: &[u8]) -> u32 {
    crc32c::crc32c(data)
}

pub(crate) fn get_u16(b: &[u8], off: usize) -> u16 {
    u16::from_le_bytes(b[off..off + 2].try_into().unwrap())
}
pub(crate) fn get_u32(b: &[u8], off: usize) -> u32 {
    u32::from_le_bytes(b[off..off + 4].try_into().unwrap())
}
pub(crate) fn get_u64(b: &[u8], off: usize) -> u64 {
    u64::from_le_bytes(b[off..off + 8].try_into().unwrap())
}
pub(crate) fn put_u16(b: &mut [u8], off: usize, v: u16) {
    b[off..off + 2].copy_from_slice(&v.to_le_bytes());
}
pub(crate) fn put_u32(b: &mut [u8], off: usize, v: u32) {
    b[off..off + 4].copy_from_slice(&v.to_le_bytes());
}
pub(crate) fn put_u64(b: &mut [u8], off: usize, v: u64) {
    b[off..off + 8].copy_from_slice(&v.to_le_bytes());
}
