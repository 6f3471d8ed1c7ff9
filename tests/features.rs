//! Storage features on real files: chunk reuse after discard, locality of allocation,
//! copy-on-read, streaming/prefetch steps, amend and rebase.

use fvd::engine::{CreateParams, Image};
use fvd::format::{BaseFormat, BaseRef};
use fvd::io::executor::block_on;
use fvd::io::sync::SyncIo;
use fvd::units::{BlockIndex, ChunkIndex, VirtOffset};
use std::path::{Path, PathBuf};
use std::process::Command;

mod engine_support;
use engine_support::{read, small, write, BS, CS};

fn create(path: &Path, size: u64, base: Option<BaseRef>, compat: u64) {
    let p = CreateParams {
        compact: true,
        base,
        compat,
        max_size: None,
        ..small(size)
    };
    engine_support::create(path, p);
}

fn open(path: &Path) -> Image<SyncIo> {
    block_on(fvd::engine::open_image(&SyncIo, path, false)).unwrap()
}

fn raw_base(dir: &Path, size: usize, seed: u8) -> BaseRef {
    let data: Vec<u8> = (0..size)
        .map(|i| (i as u8).wrapping_mul(seed).wrapping_add(i as u8 >> 3))
        .collect();
    std::fs::write(dir.join("base.raw"), data).unwrap();
    BaseRef {
        path: "base.raw".into(),
        format: BaseFormat::Raw,
        size: size as u64,
    }
}

/// An image of `size` in `dir` over a raw base of its size (seeded by `seed`), opened; also
/// returns the base's bytes and the image's path.
fn over_raw_base(
    dir: &Path,
    size: u64,
    seed: u8,
    compat: u64,
) -> (Image<SyncIo>, Vec<u8>, PathBuf) {
    let base = raw_base(dir, size as usize, seed);
    let orig = std::fs::read(dir.join("base.raw")).unwrap();
    let path = dir.join("img.fvd");
    create(&path, size, Some(base), compat);
    (open(&path), orig, path)
}

#[test]
fn discarded_chunks_are_reused_after_flush_and_allocation_keeps_locality() {
    let d = tempfile::tempdir_in("/var/tmp").unwrap();
    let path = d.path().join("img.fvd");
    create(&path, 64 * CS, None, 0);
    let img = open(&path);
    for c in 0..4u64 {
        write(&img, c * CS, &vec![c as u8 + 1; CS as usize]);
    }
    // Sequential virtual chunks get sequential physical chunks.
    for c in 0..4u64 {
        assert_eq!(img.chunk_phys(ChunkIndex(c)).0 as u64, c);
    }
    assert_eq!(img.allocated_chunks(), 4);
    block_on(img.discard(&SyncIo, VirtOffset(CS), CS)).unwrap();
    assert!(
        !img.chunk_phys(ChunkIndex(1)).is_allocated(),
        "an empty chunk must be unmapped"
    );
    assert_eq!(img.allocated_chunks(), 3);
    // Not reusable before the unmap is durable.
    write(&img, 10 * CS, &[9u8; 4096]);
    assert_eq!(img.chunk_phys(ChunkIndex(10)).0, 4);
    block_on(img.flush(&SyncIo)).unwrap();
    write(&img, 20 * CS, &[7u8; 4096]);
    assert_eq!(
        img.chunk_phys(ChunkIndex(20)).0,
        1,
        "the freed chunk is reused after the flush"
    );
    assert!(read(&img, CS, CS as usize).iter().all(|&b| b == 0));
    assert_eq!(read(&img, 20 * CS, 4096), vec![7u8; 4096]);
    assert!(
        read(&img, 20 * CS + 4096, (CS - 4096) as usize)
            .iter()
            .all(|&b| b == 0),
        "no old data from the reused chunk"
    );
    block_on(img.flush(&SyncIo)).unwrap();
    drop(img);
    let img = open(&path);
    assert!(read(&img, CS, CS as usize).iter().all(|&b| b == 0));
    assert_eq!(read(&img, 20 * CS, 4096), vec![7u8; 4096]);
    assert_eq!(read(&img, 2 * CS, 512), vec![3u8; 512]);
}

/// WRITE ZEROES without a base image drops the whole blocks it covers (their bits cleared,
/// with unmap their chunk freed) and writes zeros only into the partial blocks at its edges.
#[test]
fn write_zeroes_drops_whole_blocks_and_writes_only_the_edges() {
    let d = tempfile::tempdir_in("/var/tmp").unwrap();
    let path = d.path().join("img.fvd");
    create(&path, 8 * CS, None, 0);
    let img = open(&path);
    write(&img, 0, &vec![7u8; 2 * CS as usize]);
    assert_eq!(img.present_blocks(), 2 * CS / BS);
    let present = |img: &Image<SyncIo>| -> Vec<u64> {
        (0..2 * CS / BS)
            .filter(|&b| img.block_present(BlockIndex(b)))
            .collect()
    };
    // From the middle of block 1 to the middle of block 6: blocks 2..=5 whole.
    let (off, end) = (BS + 512, 6 * BS + 1024);
    block_on(img.write_zeroes(&SyncIo, VirtOffset(off), end - off, false)).unwrap();
    assert_eq!(
        present(&img),
        [0, 1, 6, 7],
        "whole blocks dropped, edges kept"
    );
    let all = read(&img, 0, 2 * CS as usize);
    for (i, &b) in all.iter().enumerate() {
        let want = if (off..end).contains(&(i as u64)) {
            0
        } else {
            7
        };
        assert_eq!(b, want, "byte {i}");
    }
    // With unmap, a whole chunk's worth frees the chunk.
    assert_eq!(img.allocated_chunks(), 2);
    block_on(img.write_zeroes(&SyncIo, VirtOffset(CS), CS, true)).unwrap();
    assert_eq!(img.allocated_chunks(), 1);
    assert!(read(&img, CS, CS as usize).iter().all(|&b| b == 0));
}

/// A prefetch step continues where the previous one stopped: a block a DISCARD dropped behind
/// the cursor (it reads from the base again) is copied when the pass wraps around, not first.
#[test]
fn prefetch_continues_where_it_stopped_and_copies_a_discarded_block_on_wrapping() {
    let d = tempfile::tempdir_in("/var/tmp").unwrap();
    let size = 2 * CS;
    let (img, orig, _) = over_raw_base(d.path(), size, 5, 0);
    let present = |img: &Image<SyncIo>| -> Vec<u64> {
        (0..size / BS)
            .filter(|&b| img.block_present(BlockIndex(b)))
            .collect()
    };
    let step = |img: &Image<SyncIo>| block_on(img.prefetch_step(&SyncIo, 2)).unwrap();
    assert_eq!(step(&img).copied, 2);
    assert_eq!(present(&img), [0, 1]);
    block_on(img.discard(&SyncIo, VirtOffset(0), BS)).unwrap();
    assert_eq!(present(&img), [1], "the discard dropped block 0");
    let s = step(&img);
    assert_eq!((s.copied, s.done), (2, false));
    assert_eq!(present(&img), [1, 2, 3], "block 0 waits for the wrap");
    let s = step(&img);
    assert_eq!((s.copied, s.done), (2, false));
    assert_eq!(present(&img), [1, 2, 3, 4, 5]);
    let s = step(&img);
    assert_eq!((s.copied, s.done), (2, false));
    assert_eq!(present(&img), [1, 2, 3, 4, 5, 6, 7]);
    // The wrap: block 0, then a whole pass finds nothing missing.
    let s = step(&img);
    assert_eq!((s.copied, s.done), (1, true));
    assert_eq!(present(&img), (0..size / BS).collect::<Vec<_>>());
    assert_eq!(read(&img, 0, size as usize), orig);
}

#[test]
fn copy_on_read_copies_after_the_read_and_prefetch_streams_everything() {
    let d = tempfile::tempdir_in("/var/tmp").unwrap();
    let size = 8 * CS;
    let (img, orig, path) =
        over_raw_base(d.path(), size, 7, fvd::format::header::COMPAT_COPY_ON_READ);
    assert!(img.copy_on_read());
    // A read covering one whole block and part of the next.
    assert_eq!(
        read(&img, BS, (BS + 512) as usize),
        orig[BS as usize..(2 * BS + 512) as usize]
    );
    assert_eq!(
        img.present_blocks(),
        0,
        "the guest's read does not wait for the copy"
    );
    block_on(img.run_deferred(&SyncIo));
    assert_eq!(img.present_blocks(), 2);
    // The statistics count what each path copied.
    assert_eq!(img.counters().snapshot().cor_bytes, 2 * BS);
    assert_eq!(img.counters().snapshot().prefetch_bytes, 0);
    // Prove the data now comes from the image: change the base behind its back.
    std::fs::write(d.path().join("base.raw"), vec![0xEEu8; size as usize]).unwrap();
    assert_eq!(
        read(&img, BS, (2 * BS) as usize),
        orig[BS as usize..(3 * BS) as usize]
    );
    block_on(img.flush(&SyncIo)).unwrap();
    drop(img);
    std::fs::write(d.path().join("base.raw"), &orig).unwrap();
    // Streaming copies the rest; then the base can be dropped.
    let img = open(&path);
    img.set_copy_on_read(false);
    // Each step copies the next three missing blocks, in order from where the last one
    // stopped (blocks 1 and 2 are present already).
    let order: Vec<u64> = (0..size / BS).filter(|b| ![1, 2].contains(b)).collect();
    let mut steps = 0;
    loop {
        let s = block_on(img.prefetch_step(&SyncIo, 3)).unwrap();
        steps += 1;
        let copied = &order[..(3 * steps).min(order.len())];
        for b in 0..size / BS {
            assert_eq!(
                img.block_present(BlockIndex(b)),
                b == 1 || b == 2 || copied.contains(&b),
                "block {b} after step {steps}"
            );
        }
        if s.done {
            break;
        }
        assert!(steps < 100);
    }
    assert_eq!(img.base_blocks_remaining(), 0);
    let c = img.counters().snapshot();
    assert_eq!(
        c.prefetch_bytes,
        size - 2 * BS,
        "all but the two blocks read before"
    );
    assert_eq!(c.cor_bytes, 0);
    assert!(block_on(img.mark_base_not_needed(&SyncIo)).unwrap());
    assert_ne!(
        img.header().flags & fvd::format::header::FLAG_BASE_NOT_NEEDED,
        0
    );
    block_on(img.close(&SyncIo)).unwrap();
    drop(img);
    let fvd = env!("CARGO_BIN_EXE_fvd");
    let st = Command::new(fvd)
        .args(["rebase", "--drop-base"])
        .arg(&path)
        .status()
        .unwrap();
    assert!(st.success());
    std::fs::remove_file(d.path().join("base.raw")).unwrap();
    let img = open(&path);
    assert!(img.base().is_none());
    assert_eq!(
        read(&img, 0, size as usize),
        orig,
        "all data survived detaching the base"
    );
}

/// Copy-on-read off (the header's default without the flag) copies nothing; on, the copies a
/// read queues are bounded by `COR_MAX_INFLIGHT` bytes (the rest of the read is served without
/// copying), and the bound frees up as the copies finish, so later reads copy again.
#[test]
fn copy_on_read_off_copies_nothing_and_queued_copies_are_bounded() {
    use fvd::engine::fill::COR_MAX_INFLIGHT;
    let d = tempfile::tempdir_in("/var/tmp").unwrap();
    let size = COR_MAX_INFLIGHT + 8 * CS;
    let (img, ..) = over_raw_base(d.path(), size, 5, 0);
    assert!(!img.copy_on_read());
    read(&img, 0, BS as usize);
    block_on(img.run_deferred(&SyncIo));
    assert_eq!(img.present_blocks(), 0, "copy-on-read is off");
    assert_eq!(img.counters().snapshot().cor_bytes, 0);

    img.set_copy_on_read(true);
    // One read past the bound: exactly the bound is queued and copied.
    read(&img, 0, (COR_MAX_INFLIGHT + 2 * BS) as usize);
    block_on(img.run_deferred(&SyncIo));
    assert_eq!(img.counters().snapshot().cor_bytes, COR_MAX_INFLIGHT);
    assert_eq!(img.present_blocks(), COR_MAX_INFLIGHT / BS);
    // The copies finished: a later read past them copies again.
    read(&img, COR_MAX_INFLIGHT + 4 * BS, BS as usize);
    block_on(img.run_deferred(&SyncIo));
    assert_eq!(img.counters().snapshot().cor_bytes, COR_MAX_INFLIGHT + BS);
    block_on(img.close(&SyncIo)).unwrap();
}

#[test]
fn cli_stream_amend_and_rebase_refusal() {
    let d = tempfile::tempdir_in("/var/tmp").unwrap();
    let fvd = env!("CARGO_BIN_EXE_fvd");
    let size = 4 * CS;
    raw_base(d.path(), size as usize, 3);
    let orig = std::fs::read(d.path().join("base.raw")).unwrap();
    let run = |args: &[&str]| {
        Command::new(fvd)
            .args(args)
            .current_dir(d.path())
            .output()
            .unwrap()
    };
    assert!(run(&["create", "a.fvd", "-b", "base.raw"]).status.success());
    let o = run(&["rebase", "--drop-base", "a.fvd"]);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("fvd stream"));
    assert!(
        run(&["amend", "a.fvd", "--copy-on-read", "on", "--prefetch", "on"])
            .status
            .success()
    );
    let info: serde_json::Value =
        serde_json::from_slice(&run(&["info", "a.fvd", "--output", "json"]).stdout).unwrap();
    assert_eq!(info["fvd"]["copy_on_read"], true);
    assert_eq!(info["fvd"]["prefetch"], true);
    assert_eq!(info["fvd"]["base"]["bytes_remaining"], size);
    assert!(run(&["stream", "a.fvd", "--drop-base", "-q"])
        .status
        .success());
    let info: serde_json::Value =
        serde_json::from_slice(&run(&["info", "a.fvd", "--output", "json"]).stdout).unwrap();
    assert!(info["fvd"]["base"].is_null(), "{info}");
    std::fs::remove_file(d.path().join("base.raw")).unwrap();
    assert!(run(&["convert", "a.fvd", "out.raw", "-O", "raw", "-q"])
        .status
        .success());
    assert_eq!(std::fs::read(d.path().join("out.raw")).unwrap(), orig);
}
