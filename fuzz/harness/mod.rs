//! Fuzz harnesses, shared by the cargo-fuzz targets (fuzz/fuzz_targets/) and by the stable
//! regression test (tests/fuzz_regressions.rs), which replays committed inputs through exactly
//! this code. Each `run` must never panic on any input: a panic is a finding.
//!
//! Only fvd's public API and crates fvd itself depends on are used here, so the regression test
//! builds without nightly or extra dependencies.
#![allow(dead_code)]

pub mod format;
pub mod image;
pub mod open_replay;
pub mod repair;
pub mod request;
pub mod seeds;
pub mod vhost_user;

/// Reads fuzzer bytes as little-endian numbers; past the end everything reads as zero, so every
/// input is valid and a shorter input is a simpler case.
pub struct Input<'a> {
    d: &'a [u8],
}

impl<'a> Input<'a> {
    pub fn new(d: &'a [u8]) -> Self {
        Input { d }
    }
    pub fn is_empty(&self) -> bool {
        self.d.is_empty()
    }
    pub fn bytes(&mut self, n: usize) -> &'a [u8] {
        let n = n.min(self.d.len());
        let (a, b) = self.d.split_at(n);
        self.d = b;
        a
    }
    fn fixed<const N: usize>(&mut self) -> [u8; N] {
        let mut out = [0u8; N];
        let b = self.bytes(N);
        out[..b.len()].copy_from_slice(b);
        out
    }
    pub fn u8(&mut self) -> u8 {
        self.fixed::<1>()[0]
    }
    pub fn bool(&mut self) -> bool {
        self.u8() & 1 != 0
    }
    pub fn u16(&mut self) -> u16 {
        u16::from_le_bytes(self.fixed())
    }
    pub fn u32(&mut self) -> u32 {
        u32::from_le_bytes(self.fixed())
    }
    pub fn u64(&mut self) -> u64 {
        u64::from_le_bytes(self.fixed())
    }
    /// A number below `n` (n > 0).
    pub fn below(&mut self, n: u64) -> u64 {
        self.u64() % n
    }
    pub fn rest(&mut self) -> &'a [u8] {
        self.bytes(usize::MAX)
    }
}
