#![no_main]
//! Fuzz target `format`: see fuzz/harness/format.rs.

#[path = "../harness/mod.rs"]
mod harness;

libfuzzer_sys::fuzz_target!(|data: &[u8]| harness::format::run(data));
