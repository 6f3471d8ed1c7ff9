//! `Image::resize` on real files (docs/FORMAT.md, "Resizing"): data kept, the grown range
//! reads zeros (over a longer base and past a partial last block too), shrinking only over
//! unallocated space, the reserved capacity, images made without room to grow, and flat and
//! compact images on a block device (a loop device).

use fvd::engine::{CreateParams, EngineError, Image, ResizeRefused};
use fvd::format::header::INCOMPAT_CAPACITY;
use fvd::format::{BaseFormat, BaseRef};
use fvd::io::executor::block_on;
use fvd::io::host_file::OpenMode;
use fvd::io::sync::SyncIo;
use fvd::io::HostFile;
use fvd::units::VirtOffset;
use std::path::Path;

mod engine_support;
mod serve_support;
use engine_support::{small, write, BS, CS};

fn tmpdir() -> tempfile::TempDir {
    // O_DIRECT needs a real filesystem; /var/tmp is on disk.
    tempfile::tempdir_in("/var/tmp").unwrap()
}

fn create(path: &Path, size: u64, max: Option<u64>, compact: bool, base: Option<BaseRef>) {
    let p = CreateParams {
        compact,
        base,
        max_size: max,
        ..small(size)
    };
    engine_support::create(path, p);
}

fn open(path: &Path) -> Image<SyncIo> {
    block_on(fvd::engine::open_image(&SyncIo, path, false)).unwrap()
}

/// Closes cleanly and releases the lock.
fn close(img: Image<SyncIo>) {
    block_on(img.close(&SyncIo)).unwrap();
    drop(img);
}

fn pattern(seed: u64, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| ((i as u64).wrapping_mul(31).wrapping_add(seed * 7919) % 251) as u8 | 1)
        .collect()
}

fn read(img: &Image<SyncIo>, off: u64, len: u64) -> Vec<u8> {
    engine_support::read(img, off, len as usize)
}

/// A raw base `base.raw` of `len` bytes of `pattern(9, ..)` in `dir`.
fn raw_base(dir: &Path, len: u64) -> BaseRef {
    std::fs::write(dir.join("base.raw"), pattern(9, len as usize)).unwrap();
    BaseRef {
        path: "base.raw".into(),
        format: BaseFormat::Raw,
        size: len,
    }
}

fn check_clean(path: &Path) {
    let f = HostFile::open(path, OpenMode::ReadOnly).unwrap();
    let r = block_on(fvd::engine::check::check(&SyncIo, f)).unwrap();
    assert_eq!(r.exit_code(), 0, "{:?}", r.problems);
}

/// Resizing to a whole number of bitmap words (128 blocks: grown from 100, shrunk from 150)
/// keeps the blocks of the last word, flat and compact, across a reopen.
#[test]
fn resize_to_a_multiple_of_64_blocks_keeps_the_last_blocks() {
    for old in [100 * BS, 150 * BS] {
        for compact in [true, false] {
            let d = tmpdir();
            let path = d.path().join("img.fvd");
            create(&path, old, Some(256 * BS), compact, None);
            let img = open(&path);
            write(&img, 64 * BS, &pattern(1, BS as usize));
            write(&img, 99 * BS, &pattern(2, BS as usize));
            close(img);
            let mut img = open(&path);
            block_on(img.resize(&SyncIo, 128 * BS, old > 128 * BS)).unwrap();
            for _ in 0..2 {
                assert_eq!(
                    read(&img, 64 * BS, BS),
                    pattern(1, BS as usize),
                    "{old} {compact}"
                );
                assert_eq!(
                    read(&img, 99 * BS, BS),
                    pattern(2, BS as usize),
                    "{old} {compact}"
                );
                close(img);
                img = open(&path);
            }
            close(img);
        }
    }
}

/// Grows every layout, with and without a base longer than the image, from a size that ends
/// inside a block whose data (base data merged by the first write, or a copy-on-read) reaches
/// past that end: afterwards the old data is kept, the new range reads zeros and takes writes,
/// all of it across a reopen.
#[test]
fn grow_keeps_data_and_the_new_range_reads_zeros() {
    for compact in [true, false] {
        for with_base in [false, true] {
            let d = tmpdir();
            let path = d.path().join("img.fvd");
            let old = 20 * BS + 1536;
            let new = 50 * BS + 512;
            let base = with_base.then(|| raw_base(d.path(), 64 * BS));
            create(&path, old, Some(64 * BS), compact, base);
            let img = open(&path);
            let data = pattern(1, 512);
            // Into the last, partial block: its first write fills the whole block.
            write(&img, 20 * BS, &data);
            write(&img, 3 * BS, &pattern(2, BS as usize));
            let before = read(&img, 0, old);
            close(img);

            let mut img = open(&path);
            block_on(img.resize(&SyncIo, new, false)).unwrap();
            assert_eq!(img.virtual_size(), new);
            assert_eq!(
                read(&img, 0, old),
                before,
                "compact {compact} base {with_base}"
            );
            assert!(
                read(&img, old, new - old).iter().all(|&b| b == 0),
                "compact {compact} base {with_base}: the grown range is not zeros"
            );
            write(&img, 40 * BS, &pattern(3, BS as usize));
            write(&img, new - 512, &data);
            close(img);
            check_clean(&path);

            let img = open(&path);
            assert_eq!(img.virtual_size(), new);
            assert_eq!(read(&img, 0, old), before);
            assert_eq!(read(&img, 40 * BS, BS), pattern(3, BS as usize));
            assert_eq!(read(&img, new - 512, 512), data);
            assert!(read(&img, old, 40 * BS - old).iter().all(|&b| b == 0));
            close(img);
        }
    }
}

/// Shrinking needs the flag and nothing allocated past the new end (the error names the first
/// allocated offset); once that is discarded it works, and the cut-off range stays zeros when
/// the image grows again.
#[test]
fn shrink_only_over_unallocated_space() {
    for compact in [true, false] {
        let d = tmpdir();
        let path = d.path().join("img.fvd");
        create(&path, 40 * BS, Some(64 * BS), compact, None);
        let mut img = open(&path);
        write(&img, 2 * BS, &pattern(1, BS as usize));
        write(&img, 30 * BS, &pattern(2, BS as usize));
        match block_on(img.resize(&SyncIo, 10 * BS, false)) {
            Err(EngineError::Resize(ResizeRefused::ShrinkNeeded { .. })) => {}
            r => panic!("shrink without the flag: {:?}", r.err()),
        }
        match block_on(img.resize(&SyncIo, 10 * BS, true)) {
            Err(e @ EngineError::Resize(ResizeRefused::Allocated { .. })) => {
                let want = if compact { 28 * BS } else { 30 * BS };
                assert!(e.to_string().contains(&want.to_string()), "{e}");
            }
            r => panic!("shrink over data: {:?}", r.err()),
        }
        assert_eq!(img.virtual_size(), 40 * BS);
        block_on(img.discard(&SyncIo, VirtOffset(28 * BS), 4 * BS)).unwrap();
        block_on(img.flush(&SyncIo)).unwrap();
        block_on(img.resize(&SyncIo, 10 * BS, true)).unwrap();
        assert_eq!(img.virtual_size(), 10 * BS);
        assert_eq!(read(&img, 2 * BS, BS), pattern(1, BS as usize));
        close(img);
        check_clean(&path);

        let mut img = open(&path);
        assert_eq!(img.virtual_size(), 10 * BS);
        block_on(img.resize(&SyncIo, 40 * BS, false)).unwrap();
        assert!(read(&img, 10 * BS, 30 * BS).iter().all(|&b| b == 0));
        assert_eq!(read(&img, 2 * BS, BS), pattern(1, BS as usize));
        close(img);
        check_clean(&path);
    }
}

/// The capacity reserved at create bounds growth; an image made without room (as every image
/// made before `--max-size`) grows only within its last metadata sector, says so otherwise, and
/// carries no capacity feature bit, so older readers still open it.
#[test]
fn capacity_is_reserved_at_create_and_old_images_say_how_far_they_grow() {
    let d = tmpdir();
    let path = d.path().join("img.fvd");
    // Two table sectors where one would do: the capacity feature bit says so.
    create(&path, 8 * BS, Some(100 << 20), true, None);
    let mut img = open(&path);
    let h = img.header();
    assert_ne!(h.incompat & INCOMPAT_CAPACITY, 0);
    assert_eq!(h.capacity(), 2 * 1020 * CS);
    let cap = h.capacity();
    match block_on(img.resize(&SyncIo, cap + 512, false)) {
        Err(EngineError::Resize(ResizeRefused::Capacity { capacity, .. })) => {
            assert_eq!(capacity, cap)
        }
        r => panic!("growth past the capacity: {:?}", r.err()),
    }
    block_on(img.resize(&SyncIo, cap, false)).unwrap();
    assert_eq!(img.header().incompat & INCOMPAT_CAPACITY, 0);
    close(img);

    let old = d.path().join("old.fvd");
    create(&old, 8 * BS, None, true, None);
    let mut img = open(&old);
    let h = img.header();
    assert_eq!(h.incompat & INCOMPAT_CAPACITY, 0);
    // One table sector holds 1020 chunks: the most this image can describe.
    assert_eq!(h.capacity(), 1020 * CS);
    block_on(img.resize(&SyncIo, 1020 * CS, false)).unwrap();
    let e = block_on(img.resize(&SyncIo, 1020 * CS + 512, false)).unwrap_err();
    assert!(e.to_string().contains("--max-size"), "{e}");
    close(img);
    check_clean(&old);
}

/// A served disk's grow: to its own size it changes nothing, to a smaller size it is refused
/// as a shrink of a disk in use, and to a size that is not a multiple of 512 it is refused;
/// none of them moves the size.
#[test]
fn grow_refuses_shrinking_and_odd_sizes_and_accepts_its_own_size() {
    let d = tmpdir();
    let path = d.path().join("g.fvd");
    create(&path, 4 << 20, Some(16 << 20), true, None);
    let img = open(&path);
    let size = img.virtual_size();
    block_on(img.grow(&SyncIo, size)).unwrap();
    assert_eq!(img.virtual_size(), size);
    match block_on(img.grow(&SyncIo, size - 512)) {
        Err(EngineError::Resize(ResizeRefused::ShrinkInUse { size: s, current })) => {
            assert_eq!((s, current), (size - 512, size));
        }
        r => panic!("grow to a smaller size: {r:?}"),
    }
    match block_on(img.grow(&SyncIo, size + 100)) {
        Err(EngineError::Resize(ResizeRefused::BadSize(s))) => assert_eq!(s, size + 100),
        r => panic!("grow to an odd size: {r:?}"),
    }
    assert_eq!(img.virtual_size(), size);
    close(img);
    check_clean(&path);
}

/// The tail of a partial last block is zeroed only where that block holds data: a grow whose
/// last block was never written leaves the compact image's other chunks alone (its block has no
/// storage to zero), and an image smaller than one block, whose only block holds base data past
/// its end, reads zeros there after the grow.
#[test]
fn grow_zeroes_the_tail_of_a_partial_last_block_only_where_it_is_stored() {
    // Never written: nothing to zero, and nothing else touched.
    let d = tmpdir();
    let path = d.path().join("unwritten.fvd");
    let old = 20 * BS + 1536;
    create(&path, old, Some(64 * BS), true, None);
    let img = open(&path);
    // The data sits at the same place in its chunk as the old end does in its own.
    write(&img, 4 * BS, &pattern(4, BS as usize));
    let mut img = {
        close(img);
        open(&path)
    };
    block_on(img.resize(&SyncIo, 40 * BS, false)).unwrap();
    assert_eq!(read(&img, 4 * BS, BS), pattern(4, BS as usize));
    assert!(read(&img, old, 40 * BS - old).iter().all(|&b| b == 0));
    close(img);
    check_clean(&path);

    // Smaller than one block, over a longer base: the first write copies the base into the
    // whole block, past the old end.
    for compact in [true, false] {
        let d = tmpdir();
        let path = d.path().join("tiny.fvd");
        let base = raw_base(d.path(), 4 * BS);
        let old = 1536;
        create(&path, old, Some(64 * BS), compact, Some(base));
        let img = open(&path);
        write(&img, 0, &pattern(5, 512));
        close(img);
        let mut img = open(&path);
        block_on(img.resize(&SyncIo, 2 * BS, false)).unwrap();
        assert_eq!(read(&img, 0, 512), pattern(5, 512));
        assert_eq!(
            read(&img, 512, 1024),
            pattern(9, 4 * BS as usize)[512..1536]
        );
        assert!(
            read(&img, old, 2 * BS - old).iter().all(|&b| b == 0),
            "compact {compact}: base data past the old end shows"
        );
        close(img);
        check_clean(&path);
    }
}

/// On a block device a flat image's grow checks the device first: it needs the data area of
/// the new size, to the byte (the error says how much it has and needs), and the size does not
/// move when refused. A compact image's grow needs no room (its chunks are allocated as written).
#[test]
fn grow_on_a_block_device_needs_room_for_a_flat_image_only() {
    let d = tmpdir();
    let old = 16 * BS;
    // Flat: the device holds exactly the data area of 32 blocks.
    let backing = d.path().join("flat.lv");
    let f = std::fs::File::create(&backing).unwrap();
    f.set_len(8 << 20).unwrap();
    let Some(lv) = serve_support::Loop::attach(&backing) else {
        return;
    };
    create(&lv.0, old, Some(256 * BS), false, None);
    let data_offset = open(&lv.0).header().data_offset;
    drop(lv);
    let have = data_offset + 32 * BS;
    f.set_len(have).unwrap();
    let lv = serve_support::Loop::attach(&backing).unwrap();
    let mut img = open(&lv.0);
    write(&img, 3 * BS, &pattern(6, BS as usize));
    match block_on(img.resize(&SyncIo, 32 * BS + 512, false)) {
        Err(EngineError::Resize(ResizeRefused::DeviceTooSmall { have: h, need })) => {
            assert_eq!((h, need), (have, data_offset + 33 * BS));
        }
        r => panic!("grow past the device: {r:?}"),
    }
    assert_eq!(img.virtual_size(), old);
    block_on(img.resize(&SyncIo, 32 * BS, false)).unwrap();
    assert_eq!(img.virtual_size(), 32 * BS);
    write(&img, 31 * BS, &pattern(7, BS as usize));
    assert_eq!(read(&img, 3 * BS, BS), pattern(6, BS as usize));
    close(img);
    let img = open(&lv.0);
    assert_eq!(img.virtual_size(), 32 * BS);
    assert_eq!(read(&img, 31 * BS, BS), pattern(7, BS as usize));
    close(img);
    drop(lv);

    // Compact: a device with room for a few chunks grows to far more.
    let backing = d.path().join("compact.lv");
    std::fs::File::create(&backing)
        .unwrap()
        .set_len(8 << 20)
        .unwrap();
    let lv = serve_support::Loop::attach(&backing).unwrap();
    create(&lv.0, old, Some(4096 * BS), true, None);
    let mut img = open(&lv.0);
    write(&img, 0, &pattern(8, BS as usize));
    block_on(img.resize(&SyncIo, 4096 * BS, false)).unwrap();
    assert_eq!(img.virtual_size(), 4096 * BS);
    assert_eq!(read(&img, 0, BS), pattern(8, BS as usize));
    close(img);
}
