#![no_main]
//! Fuzz target `request`: see fuzz/harness/request.rs.

#[path = "../harness/mod.rs"]
mod harness;

libfuzzer_sys::fuzz_target!(|data: &[u8]| harness::request::run(data));
