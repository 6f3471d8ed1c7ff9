#![no_main]
//! Fuzz target `open_replay`: see fuzz/harness/open_replay.rs.

#[path = "../harness/mod.rs"]
mod harness;

libfuzzer_sys::fuzz_target!(|data: &[u8]| harness::open_replay::run(data));
