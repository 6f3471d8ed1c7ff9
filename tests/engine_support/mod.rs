//! Helpers shared by the engine-level tests (tests/engine.rs, corruption.rs, features.rs,
//! resize.rs): small images, data patterns, and whole-buffer reads and writes of an `Image`
//! with `SyncIo`.

#![allow(dead_code)]

use fvd::engine::{CreateParams, Image};
use fvd::io::executor::block_on;
use fvd::io::host_file::OpenMode;
use fvd::io::sync::SyncIo;
use fvd::io::{Buf, HostFile};
use fvd::units::VirtOffset;
use std::path::Path;

/// Block and chunk sizes of the small test images: a few MiB span many chunks.
pub const BS: u64 = 16 << 10;
pub const CS: u64 = 64 << 10;

/// A compact image of `size` bytes without a base: `BS` blocks, `CS` chunks, a 64 KiB journal.
pub fn small(size: u64) -> CreateParams {
    CreateParams {
        virtual_size: size,
        block_size: BS,
        chunk_size: CS,
        journal_size: 64 << 10,
        ..Default::default()
    }
}

/// Writes a new image made with `p` at `path`.
pub fn create(path: &Path, p: CreateParams) {
    let f = HostFile::open(path, OpenMode::Create).unwrap();
    block_on(Image::create(&SyncIo, f, &p)).unwrap();
}

/// `len` bytes that differ with `seed` and along the buffer (period 251, prime to every block
/// and sector size).
pub fn pattern(seed: u64, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| ((i as u64).wrapping_mul(31).wrapping_add(seed * 7919) % 251) as u8)
        .collect()
}

pub fn write(img: &Image<SyncIo>, off: u64, data: &[u8]) {
    let b = Buf::alloc(data.len());
    b.copy_from_slice(0, data);
    block_on(img.write(&SyncIo, VirtOffset(off), b)).unwrap();
}

pub fn read(img: &Image<SyncIo>, off: u64, len: usize) -> Vec<u8> {
    let b = Buf::alloc(len);
    block_on(img.read(&SyncIo, VirtOffset(off), b.clone())).unwrap();
    b.to_vec()
}
