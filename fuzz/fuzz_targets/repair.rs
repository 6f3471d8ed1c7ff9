#![no_main]
//! Fuzz target `repair`: see fuzz/harness/repair.rs.

#[path = "../harness/mod.rs"]
mod harness;

libfuzzer_sys::fuzz_target!(|data: &[u8]| harness::repair::run(data));
