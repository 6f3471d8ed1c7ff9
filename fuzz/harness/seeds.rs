//! The committed seed corpus (fuzz/seeds/<target>/<name>), generated here so that it stays
//! small, explained, and in step with the harnesses' input layout. tests/fuzz_regressions.rs
//! fails if the committed files differ from this; regenerate them with
//! `cargo test --test fuzz_regressions -- --ignored write_seeds`.

use fvd::format::{journal, metadata, JournalEntry, SECTOR};

/// Builds an input in the harnesses' layout (`Input` reads numbers little-endian; `below`
/// reads 8 bytes).
#[derive(Default)]
struct S(Vec<u8>);

impl S {
    fn n(mut self, v: u64) -> Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    fn b(mut self, v: u8) -> Self {
        self.0.push(v);
        self
    }
    fn w16(mut self, v: u16) -> Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    fn w32(mut self, v: u32) -> Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    fn raw(mut self, v: &[u8]) -> Self {
        self.0.extend_from_slice(v);
        self
    }
}

fn format() -> Vec<(&'static str, Vec<u8>)> {
    let mut h = fvd::engine::CreateParams {
        virtual_size: 1 << 20,
        block_size: 4096,
        chunk_size: 1 << 16,
        journal_size: 8192,
        ..Default::default()
    }
    .header()
    .expect("seed header");
    h.journal_epoch = 7; // not the random one: seeds must be reproducible
    let jr = journal::encode(
        &[
            JournalEntry::SetBits { start: 3, count: 2 },
            JournalEntry::Map { chunk: 1, phys: 0 },
            JournalEntry::Unmap { chunk: 2 },
            JournalEntry::ClearBits { start: 0, count: 1 },
        ],
        7,
        0,
    );
    let mut md = vec![0u8; SECTOR];
    md[..8].copy_from_slice(&0x0123_4567_89ab_cdefu64.to_le_bytes());
    metadata::seal(&mut md, 1);
    // Trim trailing zeros: the harness pads the sector with zeros.
    let trim = |v: &[u8]| v[..v.iter().rposition(|&b| b != 0).map_or(0, |p| p + 1)].to_vec();
    vec![
        (
            "header",
            S::default()
                .b(0x80)
                .n(0)
                .raw(&trim(&h.encode()[..SECTOR - 4]))
                .0,
        ),
        (
            "journal",
            S::default().b(0x81).n(0).raw(&trim(&jr[..SECTOR - 4])).0,
        ),
        (
            "metadata",
            S::default()
                .b(0x82)
                .n(1 | (40 << 32))
                .raw(&trim(&md[..SECTOR - 16]))
                .0,
        ),
    ]
}

/// Geometry part of an image input: block size 4K << bs, chunk = block << cs, blocks,
/// compact, journal sectors - 1, base.
fn image(bs: u64, cs: u64, blocks: u64, compact: bool, jsec: u64, base: bool) -> S {
    S::default()
        .n(bs)
        .n(cs)
        .n(blocks - 1)
        .n(0)
        .b(compact as u8)
        .n(jsec - 1)
        .b(base as u8)
}

/// Writes of the listed blocks, then whether to close cleanly.
fn writes(s: S, blocks: &[u64], close: bool) -> S {
    let mut s = s.n(blocks.len() as u64);
    for &b in blocks {
        s = s.n(b);
    }
    s.b(close as u8)
}

fn images() -> Vec<(&'static str, Vec<u8>)> {
    // A journal sector at `seq` of the current epoch holding one record.
    let journal_rec = |s: S, seq: u64, kind: u64, idx: u64, arg: u64| {
        s.b(1).n(seq).n(1).n(1).n(kind - 1).b(0).n(idx).n(arg)
    };
    vec![
        // Compact, with writes left in the journal, no corruption.
        (
            "compact-journal",
            writes(image(0, 2, 64, true, 2, false), &[0, 5, 17, 40], false).0,
        ),
        // Raw-like layout over a base, closed cleanly, one header field changed.
        (
            "flat-base-header",
            writes(image(1, 1, 40, false, 1, true), &[1, 2], true)
                .b(0)
                .n(0)
                .n(4)
                .n(0b11)
                .0,
        ),
        // Compact: a table entry made a duplicate of another chunk's.
        (
            "compact-duplicate",
            writes(image(0, 1, 100, true, 3, true), &[0, 9, 20], true)
                .b(4)
                .n(3)
                .n(0)
                .0,
        ),
        // A journal record mapping a chunk and one setting bits in an unmapped chunk.
        (
            "journal-records",
            journal_rec(
                journal_rec(
                    writes(image(0, 0, 30, true, 4, false), &[2], false),
                    1,
                    3,
                    7,
                    1,
                ),
                2,
                1,
                20,
                3,
            )
            .0,
        ),
        // A metadata word of the active copy changed, trailer resealed.
        (
            "metadata-word",
            writes(image(2, 1, 50, true, 1, false), &[3, 4], true)
                .b(3)
                .n(0)
                .n(0)
                .n(0)
                .w32(0xffff_0000)
                .0,
        ),
    ]
}

fn request() -> Vec<(&'static str, Vec<u8>)> {
    const W: u8 = 1;
    // Limits: capacity (sectors), read_only, seg_max, size_max, discard, max sectors, max segs.
    let lim = || {
        S::default()
            .b(0)
            .n(2048)
            .n(4)
            .n(0x4000)
            .b(1)
            .n(1 << 16)
            .n(2)
    };
    // A descriptor in guest memory: (not raw addr) addr, (not raw len) len, write flag.
    let d = |s: S, addr: u64, len: u64, w: u8| s.b(0).n(addr).b(0).n(len).b(w);
    let hdr = |ty: u32, sector: u64| {
        let mut h = [0u8; 16];
        h[..4].copy_from_slice(&ty.to_le_bytes());
        h[8..].copy_from_slice(&sector.to_le_bytes());
        h
    };
    // Memory from address 0: the header at 0, discard ranges at 16.
    let mut discard = hdr(11, 0).to_vec();
    discard.extend_from_slice(&8u64.to_le_bytes());
    discard.extend_from_slice(&16u32.to_le_bytes());
    discard.extend_from_slice(&0u32.to_le_bytes());
    vec![
        (
            "read",
            d(d(d(lim().n(3), 0, 16, 0), 0x1000, 0x1000, W), 0x3000, 1, W)
                .raw(&hdr(0, 3))
                .0,
        ),
        (
            "write-straddles",
            d(d(d(lim().n(3), 0, 16, 0), 0x3e00, 0x400, 0), 0x5000, 1, W)
                .raw(&hdr(1, 8))
                .0,
        ),
        (
            "discard",
            d(d(lim().n(2), 0, 32, 0), 0x5000, 1, W).raw(&discard).0,
        ),
        (
            "get-id",
            d(d(lim().n(2), 0, 16, 0), 0x2000, 20, W).raw(&hdr(8, 0)).0,
        ),
        (
            "flush",
            d(d(lim().n(2), 0, 16, 0), 0x2000, 1, W).raw(&hdr(4, 0)).0,
        ),
    ]
}

fn vhost_user() -> Vec<(&'static str, Vec<u8>)> {
    // A raw message: known code, version flag, payload, size = payload length, fds.
    let msg = |s: S, code: u64, payload: &[u8], fds: &[(u64, u64)]| {
        let mut s = s
            .n(2)
            .b(1)
            .n(code - 1)
            .b(0)
            .w32(8)
            .n(payload.len() as u64)
            .raw(payload)
            .b(0)
            .n(fds.len() as u64);
        for &(kind, pages) in fds {
            s = s.n(kind);
            if kind == 0 {
                s = s.n(pages);
            }
        }
        s
    };
    // SET_MEM_TABLE: one region of 64 KiB at guest 0, mapped from a 16-page memfd.
    let mut table = Vec::new();
    for v in [1u64, 0, 0x10000, 0x7000_0000_0000, 0] {
        table.extend_from_slice(&v.to_le_bytes());
    }
    // A read of sector 5: the header written to guest 0x1000, then the chain (header, 4 KiB
    // data, status byte) pushed on vring 0 and kicked.
    let mut hdr = [0u8; 64];
    hdr[8..16].copy_from_slice(&5u64.to_le_bytes());
    let desc = |s: S, off: u64, len: u64, flags: u16| s.b(0).n(off).b(0).n(len).w16(flags).b(0);
    let read = desc(
        desc(
            desc(
                S::default().n(2).n(1).n(0x1000).raw(&hdr).n(0).n(2),
                0,
                16,
                0,
            ),
            0x1000,
            4096,
            2,
        ),
        0x2000,
        1,
        2,
    )
    .b(0)
    .b(0);
    let mut config = vec![0u8; 12 + 60];
    config[4] = 60;
    vec![
        ("get-features", msg(S::default().n(0), 1, &[], &[]).0),
        (
            "owner-mem-table",
            msg(msg(S::default().n(0), 3, &[], &[]), 5, &table, &[(0, 16)]).0,
        ),
        ("negotiated-read", read.0),
        (
            "vring-kick-eventfd",
            msg(S::default().n(2), 12, &0u64.to_le_bytes(), &[(1, 0)]).0,
        ),
        ("get-config", msg(S::default().n(1), 24, &config, &[]).0),
    ]
}

/// (target, name, bytes) of every seed.
pub fn all() -> Vec<(&'static str, &'static str, Vec<u8>)> {
    let mut out = Vec::new();
    let mut add = |t: &'static str, v: Vec<(&'static str, Vec<u8>)>| {
        out.extend(v.into_iter().map(|(n, b)| (t, n, b)));
    };
    add("format", format());
    add("open_replay", images());
    add("repair", images());
    add("request", request());
    add("vhost_user", vhost_user());
    out
}
