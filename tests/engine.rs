//! Engine tests on real files through the synchronous backend: every feature combination,
//! recovery after an unclean stop, checkpoints, base chains, locking and corruption.

use fvd::engine::{CreateParams, EngineError, Image};
use fvd::format::{BaseFormat, BaseRef};
use fvd::io::executor::block_on;
use fvd::io::host_file::OpenMode;
use fvd::io::sync::SyncIo;
use fvd::io::{Buf, HostFile};
use fvd::units::VirtOffset;
use std::path::{Path, PathBuf};

mod engine_support;
use engine_support::{create, pattern, read, small, write};

fn tmpdir() -> tempfile::TempDir {
    // O_DIRECT needs a real filesystem; /var/tmp is on disk.
    tempfile::tempdir_in("/var/tmp").unwrap()
}

fn params(size: u64, compact: bool, base: Option<BaseRef>) -> CreateParams {
    CreateParams {
        compact,
        base,
        ..small(size)
    }
}

fn open_image(io: &SyncIo, path: &Path, ro: bool) -> fvd::engine::Result<Image<SyncIo>> {
    block_on(fvd::engine::open_image(io, path, ro))
}

/// A raw base file with a known pattern.
/// A block of `bs` zeros with `data` at `at`: what a block reads after one partial first write.
fn block_with(bs: u64, at: usize, data: &[u8]) -> Vec<u8> {
    let mut b = vec![0u8; bs as usize];
    b[at..at + data.len()].copy_from_slice(data);
    b
}

/// A new compact image without a base in a scratch directory, opened read-write.
fn new_compact() -> (tempfile::TempDir, PathBuf, Image<SyncIo>, u64) {
    let dir = tmpdir();
    let path = dir.path().join("img.fvd");
    let p = params(1 << 20, true, None);
    create(&path, p.clone());
    let img = open_image(&SyncIo, &path, false).unwrap();
    (dir, path, img, p.block_size)
}

fn raw_base(dir: &Path, size: u64) -> (PathBuf, Vec<u8>) {
    let p = dir.join("base.raw");
    let data = pattern(99, size as usize);
    std::fs::write(&p, &data).unwrap();
    (p, data)
}

/// With `with_base`, a [`raw_base`] (named by its absolute path) and its data; without, no
/// base and the zeros an image reads then.
fn raw_base_or_zeros(dir: &Path, size: u64, with_base: bool) -> (Option<BaseRef>, Vec<u8>) {
    if !with_base {
        return (None, vec![0u8; size as usize]);
    }
    let (p, d) = raw_base(dir, size);
    let base = BaseRef {
        path: p.to_string_lossy().into(),
        format: BaseFormat::Raw,
        size,
    };
    (Some(base), d)
}

#[test]
fn all_feature_combinations_read_back_and_survive_reopen() {
    for compact in [false, true] {
        for with_base in [false, true] {
            let dir = tmpdir();
            let size = 1 << 20;
            let (base, mut model) = raw_base_or_zeros(dir.path(), size, with_base);
            let path = dir.path().join("img.fvd");
            create(&path, params(size, compact, base));
            let img = open_image(&SyncIo, &path, false).unwrap_or_else(|e| panic!("{e}"));
            // Unaligned, sub-block, cross-block and cross-chunk writes.
            for (i, &(off, len)) in [
                (512u64, 512usize),
                (4096 * 3 + 1024, 9000 / 512 * 512),
                (65536 - 1024, 4096),
                (200_000 / 512 * 512, 70_000 / 512 * 512),
            ]
            .iter()
            .enumerate()
            {
                let d = pattern(i as u64 + 1, len);
                write(&img, off, &d);
                model[off as usize..off as usize + len].copy_from_slice(&d);
            }
            assert_eq!(
                read(&img, 0, size as usize),
                model,
                "compact={compact} base={with_base}"
            );
            block_on(img.flush(&SyncIo)).unwrap();
            // Unclean stop: drop without close, then reopen (journal replay).
            drop(img);
            let img = open_image(&SyncIo, &path, false).unwrap();
            assert_eq!(
                read(&img, 0, size as usize),
                model,
                "after replay compact={compact} base={with_base}"
            );
            block_on(img.close(&SyncIo)).unwrap();
            drop(img);
            let img = open_image(&SyncIo, &path, true).unwrap();
            assert!(img.header().clean());
            assert_eq!(read(&img, 0, size as usize), model);
        }
    }
}

#[test]
fn journal_wraps_through_checkpoints() {
    let dir = tmpdir();
    let path = dir.path().join("img.fvd");
    let size = 8 << 20;
    create(&path, params(size, true, None));
    let img = open_image(&SyncIo, &path, false).unwrap();
    let mut model = vec![0u8; size as usize];
    // Each first write to a block queues a record; flush after each so the small journal fills.
    for i in 0..200u64 {
        let off = (i * 7919 * 4096) % size;
        let d = pattern(i, 4096);
        write(&img, off, &d);
        model[off as usize..off as usize + 4096].copy_from_slice(&d);
        block_on(img.flush(&SyncIo)).unwrap();
    }
    assert!(
        img.counters().snapshot().checkpoints >= 1,
        "journal never filled"
    );
    drop(img);
    let img = open_image(&SyncIo, &path, false).unwrap();
    assert_eq!(read(&img, 0, size as usize), model);
}

#[test]
fn second_writer_is_refused_and_fvd_base_chain_reads_through() {
    let dir = tmpdir();
    let (raw, raw_data) = raw_base(dir.path(), 1 << 20);
    let mid = dir.path().join("mid.fvd");
    create(
        &mid,
        params(
            1 << 20,
            true,
            Some(BaseRef {
                path: "base.raw".into(),
                format: BaseFormat::Raw,
                size: 1 << 20,
            }),
        ),
    );
    {
        let m = open_image(&SyncIo, &mid, false).unwrap();
        write(&m, 8192, &[7u8; 4096]);
        let err = open_image(&SyncIo, &mid, false)
            .err()
            .expect("second read-write open must fail");
        assert!(err.to_string().contains("in use"), "{err}");
        block_on(m.close(&SyncIo)).unwrap();
    }
    let top = dir.path().join("top.fvd");
    create(
        &top,
        params(
            2 << 20,
            false,
            Some(BaseRef {
                path: "mid.fvd".into(),
                format: BaseFormat::Fvd,
                size: 1 << 20,
            }),
        ),
    );
    let t = open_image(&SyncIo, &top, false).unwrap();
    write(&t, 0, &[1u8; 512]);
    let got = read(&t, 0, 2 << 20);
    assert_eq!(got[..512], [1u8; 512]);
    assert_eq!(got[512..8192], raw_data[512..8192]);
    assert_eq!(got[8192..12288], [7u8; 4096]);
    assert_eq!(got[12288..1 << 20], raw_data[12288..]);
    assert!(
        got[1 << 20..].iter().all(|&b| b == 0),
        "past the base's end reads zeros"
    );
    let _ = raw;
}

#[test]
fn discard_and_write_zeroes() {
    for with_base in [false, true] {
        let dir = tmpdir();
        let size = 1u64 << 20;
        let (base, base_data) = raw_base_or_zeros(dir.path(), size, with_base);
        let path = dir.path().join("img.fvd");
        create(&path, params(size, true, base));
        let img = open_image(&SyncIo, &path, false).unwrap();
        write(&img, 0, &pattern(5, 256 << 10));
        block_on(img.write_zeroes(&SyncIo, VirtOffset(1024), 100_000 / 512 * 512, true)).unwrap();
        let got = read(&img, 0, 256 << 10);
        assert!(
            got[1024..1024 + 100_000 / 512 * 512]
                .iter()
                .all(|&b| b == 0),
            "write zeroes must read zeros"
        );
        assert_eq!(got[..1024], pattern(5, 1024)[..]);
        block_on(img.discard(&SyncIo, VirtOffset(128 << 10), 64 << 10)).unwrap();
        let got = read(&img, 128 << 10, 64 << 10);
        assert_eq!(
            got,
            base_data[128 << 10..192 << 10],
            "discarded blocks read base/zeros"
        );
        block_on(img.flush(&SyncIo)).unwrap();
        drop(img);
        let img = open_image(&SyncIo, &path, false).unwrap();
        assert_eq!(
            read(&img, 128 << 10, 64 << 10),
            base_data[128 << 10..192 << 10]
        );
    }
}

#[test]
fn corrupt_header_and_out_of_range_are_errors() {
    let dir = tmpdir();
    let path = dir.path().join("img.fvd");
    create(&path, params(1 << 20, true, None));
    let img = open_image(&SyncIo, &path, false).unwrap();
    assert!(block_on(img.read(&SyncIo, VirtOffset(1 << 20), Buf::alloc(512))).is_err());
    assert!(block_on(img.write(&SyncIo, VirtOffset(100), Buf::alloc(512))).is_err());
    drop(img);
    // Destroy both header slots' checksums.
    let mut raw = std::fs::read(&path).unwrap();
    raw[100] ^= 0xff;
    raw[4096 + 100] ^= 0xff;
    std::fs::write(&path, &raw).unwrap();
    let err = open_image(&SyncIo, &path, false)
        .err()
        .expect("corrupt header must be refused");
    assert!(err.to_string().contains("checksum"), "{err}");
}

/// A first write of part of a block on storage full of stale bytes (an LV's previous contents):
/// the rest of the block must read as zeros, now and after reopening, and it is zeroed without
/// writing it (only the guest's 4 KiB are written).
#[test]
fn first_partial_write_zeroes_the_rest_of_the_block_without_writing_it() {
    use fvd::format::layout::Layout;
    use std::os::unix::fs::FileExt;
    for compact in [false, true] {
        let dir = tmpdir();
        let path = dir.path().join("img.fvd");
        let p = params(1 << 20, compact, None);
        create(&path, p.clone());
        let geo = fvd::units::Geometry {
            virtual_size: p.virtual_size,
            block_size: p.block_size,
            chunk_size: p.chunk_size,
        };
        let data_off = Layout::compute(&geo, compact, p.journal_size).data_offset;
        let f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
        f.write_all_at(&vec![0xAA; 1 << 20], data_off).unwrap();
        drop(f);

        let img = open_image(&SyncIo, &path, false).unwrap();
        let bs = p.block_size;
        let before = img.counters().snapshot();
        write(&img, bs + 4096, &pattern(1, 4096));
        let after = img.counters().snapshot();
        // The guest's 4 KiB and one intent sector (its bit's record, journaled before the
        // write completes).
        assert_eq!(after.journal_intents - before.journal_intents, 1);
        assert_eq!(
            after.host_bytes_written - before.host_bytes_written,
            2 * 4096
        );
        assert_eq!(after.host_zeroes - before.host_zeroes, 2, "head and tail");
        let want = block_with(bs, 4096, &pattern(1, 4096));
        assert!(read(&img, bs, bs as usize) == want, "compact={compact}");
        block_on(img.close(&SyncIo)).unwrap();
        drop(img);

        let img = open_image(&SyncIo, &path, true).unwrap();
        assert!(
            read(&img, bs, bs as usize) == want,
            "after reopen, compact={compact}"
        );
        // Blocks never written still read as zeros, whatever the storage holds there.
        assert!(read(&img, 0, bs as usize).iter().all(|&b| b == 0));
    }
}

/// New chunks of a compact image on a file lie past its end at open, which reads as zeros: a
/// first partial write there needs no zeroing at all (the file is grown ahead of them).
#[test]
fn first_partial_write_past_end_of_file_needs_no_zeroing() {
    let (_dir, _path, img, bs) = new_compact();
    let before = img.counters().snapshot();
    write(&img, 3 * bs + 8192, &pattern(2, 4096));
    let after = img.counters().snapshot();
    assert_eq!(after.host_zeroes - before.host_zeroes, 0);
    // The guest's 4 KiB and one intent sector.
    assert_eq!(after.journal_intents - before.journal_intents, 1);
    assert_eq!(
        after.host_bytes_written - before.host_bytes_written,
        2 * 4096
    );
    let want = block_with(bs, 8192, &pattern(2, 4096));
    assert!(read(&img, 3 * bs, bs as usize) == want);

    // Once a block of the chunk was discarded the chunk no longer counts as reading zeros
    // (a discard need not punch): the next partial first write zeroes the rest again. Block 2
    // keeps the chunk mapped.
    write(&img, 2 * bs, &pattern(4, bs as usize));
    block_on(img.discard(&SyncIo, VirtOffset(3 * bs), bs)).unwrap();
    let before = img.counters().snapshot();
    write(&img, 3 * bs, &pattern(3, 4096));
    let after = img.counters().snapshot();
    assert_eq!(after.host_zeroes - before.host_zeroes, 1, "tail zeroed");
    let want = block_with(bs, 0, &pattern(3, 4096));
    assert!(read(&img, 3 * bs, bs as usize) == want);
    block_on(img.close(&SyncIo)).unwrap();
}

#[test]
fn allocating_flush_skips_the_data_flush_only_where_lost_data_would_read_as_before() {
    let (dir, path, img, bs) = new_compact();
    let flush = |img: &Image<SyncIo>| {
        let before = img.counters().snapshot();
        block_on(img.flush(&SyncIo)).unwrap();
        let after = img.counters().snapshot();
        (
            after.host_flushes - before.host_flushes,
            after.journal_unordered - before.journal_unordered,
        )
    };
    // A new chunk past the end of the file: its blocks read zeros before and after a lost write.
    write(&img, 3 * bs + 8192, &pattern(5, 4096));
    assert_eq!(flush(&img), (1, 1), "fresh chunk, no base: one flush");
    // Overwrites change no metadata.
    write(&img, 3 * bs + 8192, &pattern(6, 4096));
    assert_eq!(flush(&img), (1, 0));
    // A discard only clears bits (block 2, written while the chunk was fresh, needs no order),
    // but leaves the chunk not fresh: the next first write there must reach the storage first.
    write(&img, 2 * bs, &pattern(7, bs as usize));
    block_on(img.discard(&SyncIo, VirtOffset(3 * bs), bs)).unwrap();
    assert_eq!(flush(&img), (1, 1));
    write(&img, 3 * bs, &pattern(8, 4096));
    assert_eq!(flush(&img), (2, 0), "discarded chunk: data first");
    block_on(img.close(&SyncIo)).unwrap();
    drop(img);
    let img = open_image(&SyncIo, &path, false).unwrap();
    let want = block_with(bs, 0, &pattern(8, 4096));
    assert!(read(&img, 3 * bs, bs as usize) == want);
    assert!(read(&img, 2 * bs, bs as usize) == pattern(7, bs as usize));
    // Chunks below the end of the file at open are not fresh.
    write(&img, 0, &pattern(9, 4096));
    assert_eq!(flush(&img), (2, 0), "chunk reused after reopen: data first");
    block_on(img.close(&SyncIo)).unwrap();

    // With a base image an absent block reads base data, which a lost write would not restore.
    let (_, base_data) = raw_base(dir.path(), 1 << 20);
    let top = dir.path().join("top.fvd");
    let base = BaseRef {
        path: "base.raw".into(),
        format: BaseFormat::Raw,
        size: 1 << 20,
    };
    create(&top, params(1 << 20, true, Some(base)));
    let img = open_image(&SyncIo, &top, false).unwrap();
    write(&img, 5 * bs, &pattern(10, bs as usize));
    assert_eq!(flush(&img), (2, 0), "base image: data first");
    assert!(read(&img, 6 * bs, bs as usize) == base_data[6 * bs as usize..7 * bs as usize]);
    block_on(img.close(&SyncIo)).unwrap();
}

#[test]
fn flat_image_file_is_grown_at_open_and_its_new_chunks_need_neither_zeroing_nor_a_data_flush() {
    let dir = tmpdir();
    let path = dir.path().join("flat.fvd");
    let p = params(1 << 20, false, None);
    create(&path, p.clone());
    let created_len = std::fs::metadata(&path).unwrap().len();
    let img = open_image(&SyncIo, &path, false).unwrap();
    let data_offset = img.header().data_offset;
    assert!(
        created_len < data_offset + (1 << 20),
        "created without its data area"
    );
    assert_eq!(
        std::fs::metadata(&path).unwrap().len(),
        data_offset + (1 << 20),
        "grown to full size at open"
    );
    let bs = p.block_size;
    let before = img.counters().snapshot();
    write(&img, 5 * bs + 4096, &pattern(1, 4096));
    block_on(img.flush(&SyncIo)).unwrap();
    let after = img.counters().snapshot();
    assert_eq!(after.host_zeroes - before.host_zeroes, 0, "no zeroing");
    assert_eq!(after.zeroing_skipped - before.zeroing_skipped, 1);
    assert_eq!(after.host_flushes - before.host_flushes, 1, "one flush");
    assert_eq!(after.journal_unordered - before.journal_unordered, 1);
    block_on(img.close(&SyncIo)).unwrap();
    drop(img);

    // Stale bytes under a block below the end of file at open: that chunk is not fresh, so a
    // first write zeroes the rest of the block and orders its data before the record.
    let img = open_image(&SyncIo, &path, false).unwrap();
    let phys = data_offset + 9 * bs;
    std::fs::OpenOptions::new()
        .write(true)
        .open(&path)
        .and_then(|f| {
            use std::os::unix::fs::FileExt;
            f.write_all_at(&vec![0xAA; bs as usize], phys)
        })
        .unwrap();
    let before = img.counters().snapshot();
    write(&img, 9 * bs, &pattern(2, 4096));
    block_on(img.flush(&SyncIo)).unwrap();
    let after = img.counters().snapshot();
    assert_eq!(
        after.host_zeroes - before.host_zeroes,
        1,
        "rest of the block zeroed"
    );
    assert_eq!(after.host_flushes - before.host_flushes, 2, "data first");
    let want = block_with(bs, 0, &pattern(2, 4096));
    assert!(read(&img, 9 * bs, bs as usize) == want);
    let want = block_with(bs, 4096, &pattern(1, 4096));
    assert!(read(&img, 5 * bs, bs as usize) == want);
    block_on(img.close(&SyncIo)).unwrap();
}

/// Parameters that make an invalid header are the caller's mistake (EINVAL, saying what is
/// wrong), not a corrupt image; a closed image refuses requests as closed.
#[test]
fn invalid_parameters_and_a_closed_image_are_their_own_kinds() {
    let dir = tmpdir();
    let path = dir.path().join("bad.fvd");
    let f = HostFile::open(&path, OpenMode::Create).unwrap();
    let mut p = params(1 << 20, false, None);
    p.block_size = 3000;
    match block_on(Image::create(&SyncIo, f, &p)) {
        Err(e @ EngineError::Invalid(fvd::engine::InvalidParams::Header { .. })) => {
            assert_eq!(e.errno(), libc::EINVAL);
            assert!(e.to_string().contains("block size"), "{e}");
        }
        Err(e) => panic!("block size 3000: {e:?}, not Invalid"),
        Ok(_) => panic!("block size 3000 accepted"),
    }
    let path = dir.path().join("good.fvd");
    create(&path, params(1 << 20, false, None));
    let img = open_image(&SyncIo, &path, false).unwrap();
    block_on(img.close(&SyncIo)).unwrap();
    let buf = Buf::alloc(4096);
    let e = block_on(img.write(&SyncIo, VirtOffset(0), buf)).unwrap_err();
    assert!(matches!(e, EngineError::Closed), "{e:?}");
}

/// Parameters a header cannot hold are refused as the caller's mistake (EINVAL) before
/// anything is written, and each limit itself is accepted: a block or chunk size past 32 bits
/// (which would otherwise be cut to a valid but different size), a block size of 0, a base path
/// longer than the header's room, a maximum size below the size or above 64 PiB.
#[test]
fn create_parameters_are_checked_at_each_limit() {
    use fvd::engine::InvalidParams;
    use fvd::format::header::{MAX_BASE_PATH, MAX_VIRTUAL_SIZE};
    let base = |len: usize| {
        Some(BaseRef {
            path: "b".repeat(len),
            format: BaseFormat::Raw,
            size: 1 << 20,
        })
    };
    let p = |f: &dyn Fn(&mut CreateParams)| {
        let mut p = params(1 << 20, true, None);
        f(&mut p);
        p.header()
    };
    let refused = |what: &str, r: fvd::engine::Result<fvd::format::Header>| match r {
        Err(e @ EngineError::Invalid(_)) => {
            assert_eq!(e.errno(), libc::EINVAL, "{what}");
            e
        }
        other => panic!("{what}: {other:?}, not refused as invalid"),
    };
    let too_large = |what: &str, r| {
        let e = refused(what, r);
        assert!(
            matches!(e, EngineError::Invalid(InvalidParams::SizeTooLarge)),
            "{what}: {e:?}"
        );
    };
    too_large(
        "block 4 GiB + 64 KiB",
        p(&|p| p.block_size = (1 << 32) + (64 << 10)),
    );
    too_large(
        "chunk 4 GiB + 1 MiB",
        p(&|p| p.chunk_size = (1 << 32) + (1 << 20)),
    );
    too_large("block 0", p(&|p| p.block_size = 0));
    // At 2^32 - 1 the sizes fit in the header: the format says what a size must be.
    for (what, r) in [
        ("block 2^32 - 1", p(&|p| p.block_size = u32::MAX as u64)),
        ("chunk 2^32 - 1", p(&|p| p.chunk_size = u32::MAX as u64)),
    ] {
        let e = refused(what, r);
        assert!(
            matches!(e, EngineError::Invalid(InvalidParams::Header { .. })),
            "{what}: {e:?}"
        );
    }

    let h = p(&|p| p.base = base(MAX_BASE_PATH)).expect("the longest base path");
    assert_eq!(h.base.unwrap().path.len(), MAX_BASE_PATH);
    let e = refused(
        "base path one byte too long",
        p(&|p| p.base = base(MAX_BASE_PATH + 1)),
    );
    assert!(
        matches!(
            e,
            EngineError::Invalid(InvalidParams::BasePathTooLong { max: MAX_BASE_PATH })
        ),
        "{e:?}"
    );

    for max in [1 << 20, 2 << 20, MAX_VIRTUAL_SIZE] {
        let h = p(&|p| p.max_size = Some(max)).unwrap_or_else(|e| panic!("max size {max}: {e}"));
        // The metadata describes at least the maximum size (rounded up to whole sectors of it).
        assert_eq!(h.virtual_size, 1 << 20);
        assert!(
            h.capacity() >= max,
            "max size {max}: capacity {}",
            h.capacity()
        );
    }
    for max in [(1 << 20) - 512, MAX_VIRTUAL_SIZE + 512] {
        let e = refused("max size", p(&|p| p.max_size = Some(max)));
        assert!(
            matches!(e, EngineError::Invalid(InvalidParams::MaxSize { max_size, .. }) if max_size == max),
            "max size {max}: {e:?}"
        );
    }
}

/// A new image is a cleanly closed one: its header says so before any open, and `fvd check`
/// finds a clean shutdown, an empty journal and nothing present.
#[test]
fn a_new_image_is_marked_cleanly_closed() {
    for compact in [false, true] {
        let dir = tmpdir();
        let path = dir.path().join("new.fvd");
        create(&path, params(1 << 20, compact, None));
        let f = HostFile::open(&path, OpenMode::ReadOnly).unwrap();
        let h = block_on(Image::<SyncIo>::read_header(&SyncIo, &f)).unwrap();
        assert!(h.clean(), "compact={compact}");
        let r = block_on(fvd::engine::check::check(&SyncIo, f)).unwrap();
        assert_eq!(r.clean_shutdown, Some(true), "compact={compact}");
        assert_eq!((r.journal_records, r.present_blocks), (0, 0));
        assert!(r.problems.is_empty(), "{:?}", r.problems);
    }
}
