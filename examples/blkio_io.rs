//! Drives an `fvd serve` socket with the real libblkio client (virtio-blk-vhost-user), for the
//! package test (integration/package.sh), which serves an image with the installed binary:
//!
//!     blkio_io SOCKET write    # writes a pattern at a few offsets of a 64 MiB device, flushes
//!     blkio_io SOCKET verify   # reads it back; exits 1 on a mismatch
//!
//! Two steps so the test can restart the server in between. Not installed by the package.

#[path = "../tests/serve_support/client.rs"]
mod client;

use std::path::PathBuf;

/// (offset, length): the first sector, unaligned spans across block and chunk boundaries, and
/// the last MiB of a 64 MiB device.
const SPANS: [(u64, usize); 4] = [
    (0, 512),
    ((64 << 10) - 1024, 8192),
    ((1 << 20) - 512, 300 << 10),
    (63 << 20, 1 << 20),
];

fn pattern(off: u64, len: usize) -> Vec<u8> {
    (0..len as u64)
        .map(|i| ((off + i).wrapping_mul(0x9e37_79b9) >> 7) as u8)
        .collect()
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let (socket, mode) = match args.as_slice() {
        [_, s, m] if m == "write" || m == "verify" => (PathBuf::from(s), m.as_str()),
        _ => {
            eprintln!("usage: blkio_io SOCKET write|verify");
            std::process::exit(2);
        }
    };
    let mut c = match client::connect(&socket, 1, false) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("blkio_io: cannot connect to {}: {e}", socket.display());
            std::process::exit(1);
        }
    };
    let mut bad = 0;
    for (off, len) in SPANS {
        if mode == "write" {
            c.write(0, off, &pattern(off, len));
        } else if c.read(0, off, len) != pattern(off, len) {
            eprintln!("blkio_io: wrong data at {off} +{len}");
            bad += 1;
        }
    }
    if mode == "write" {
        assert_eq!(c.run(0, client::Req::Flush, 0, 0, 0), 0, "flush");
    }
    println!("blkio_io: {mode}: {} spans, {bad} wrong", SPANS.len());
    std::process::exit(if bad == 0 { 0 } else { 1 });
}
