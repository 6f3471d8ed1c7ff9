//! Helpers shared by the engine-level tests (tests/engine.rs, corruption.rs, features.rs,
//! resize.rs): data patterns, and whole-buffer reads and writes of an `Image` with `SyncIo`.

#![allow(dead_code)]

use fvd::engine::Image;
use fvd::io::executor::block_on;
use fvd::io::sync::SyncIo;
use fvd::io::Buf;
use fvd::units::VirtOffset;

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
