#![no_main]
//! Fuzz target `vhost_user`: see fuzz/harness/vhost_user.rs.

#[path = "../harness/mod.rs"]
mod harness;

libfuzzer_sys::fuzz_target!(|data: &[u8]| harness::vhost_user::run(data));
