//! Creating and opening images (src/engine/image.rs) on a simulated disk. Each test kills
//! mutants that survived the other suites (docs/TESTING.md lists them).

use super::requests::{close, Requests};
use fvd::engine::{Corruption, CreateParams, EngineError, Image, NoSpace};
use fvd::format::{checksum, SECTOR};
use fvd::io::sim::{SimConfig, SimFile, SimWorld};

const BS: u64 = 4096;

/// An image created over an older one on the same device (a reused LV) opens clean: create
/// invalidates only the first journal sector, and a random starting epoch keeps the older
/// image's later journal sectors from ever reading as this image's (one epoch ahead of the
/// header, they would be taken for a lost header).
#[test]
fn an_image_created_over_an_older_one_ignores_its_journal() {
    let world = SimWorld::new(37, SimConfig::default());
    let dev = world.create_block_device(4 << 20);
    let p = small_compact();
    let img = super::create_and_open(&world, &dev, p.clone());
    let mut old = Requests::new(world.clone(), dev.clone(), img);
    for i in 0..3 {
        old.write(i * BS, BS, i as u8 + 1);
        old.now("flush", super::requests::flush());
    }
    drop(old);

    let img = super::create_and_open(&world, &dev, p);
    let new = Requests::new(world.clone(), dev.clone(), img);
    assert!(new.read(0, 4 * BS) == vec![0u8; 4 * BS as usize]);
    super::assert_not_corrupt(&world, &dev, "the new image");
}

/// A compact image of 16 blocks, 4 to a chunk.
fn small_compact() -> CreateParams {
    CreateParams {
        virtual_size: 16 * BS,
        block_size: BS,
        chunk_size: 4 * BS,
        journal_size: 16 * 4096,
        compact: true,
        ..Default::default()
    }
}

/// Creates an image with `p` on a new block device of `size` bytes.
fn create_on_device(size: u64, p: &CreateParams) -> (SimFile, fvd::engine::Result<()>) {
    let world = SimWorld::new(41, SimConfig::default());
    let dev = world.create_block_device(size);
    let (io, f, p) = (world.io(), dev.clone(), p.clone());
    let r = world.block_on(async move { Image::create(&io, f, &p).await });
    (dev, r)
}

/// A block device must hold an image's metadata plus its whole data area (flat) or one chunk
/// (compact) to be created on, and a flat image's whole data area to be opened: exactly that
/// is enough, a sector less is refused with the sizes (ENOSPC at create, corruption at open:
/// the device lost the end of the image).
#[test]
fn a_block_device_must_hold_the_whole_data_area_of_a_flat_image() {
    for compact in [false, true] {
        let p = CreateParams {
            virtual_size: 64 * BS,
            block_size: BS,
            chunk_size: 4 * BS,
            journal_size: 16 * 4096,
            compact,
            ..Default::default()
        };
        let data_offset = p.header().unwrap().data_offset;
        let need = data_offset + if compact { 4 * BS } else { 64 * BS };
        let (dev, r) = create_on_device(need, &p);
        r.unwrap_or_else(|e| panic!("compact={compact}: {e}"));
        match create_on_device(need - 512, &p).1 {
            Err(EngineError::NoSpace(NoSpace::DeviceTooSmall { have, need: n })) => {
                assert_eq!((have, n), (need - 512, need), "compact={compact}")
            }
            r => panic!("compact={compact}: {r:?}"),
        }
        // The same image on a device a sector short of its data area.
        let short = dev.world().create_block_device(need - 512);
        short.write_now(0, &dev.read_now(0, data_offset as usize));
        let open = |f: SimFile| {
            let io = f.world().io();
            f.world()
                .clone()
                .block_on(async move { Image::open(&io, f, None, false).await.map(|_| ()) })
        };
        open(dev.clone()).unwrap();
        match open(short) {
            Err(EngineError::Corrupt(Corruption::DeviceTooSmall { have, need: n })) => {
                assert!(!compact);
                assert_eq!((have, n), (need - 512, need));
            }
            Ok(()) => assert!(compact, "a flat image opened on a device too small"),
            Err(e) => panic!("compact={compact}: {e}"),
        }
    }
}

/// Create writes the image's own regions and nothing else, also when a metadata copy is larger
/// than one write (452 sectors here): on a reused device, the journal past its first sector
/// (which create invalidates) and the data area keep the old bytes.
#[test]
fn create_writes_only_the_header_metadata_and_first_journal_sector() {
    let p = CreateParams {
        virtual_size: 300 << 30,
        block_size: 64 << 10,
        chunk_size: 1 << 20,
        journal_size: 1 << 20,
        compact: true,
        ..Default::default()
    };
    let h = p.header().unwrap();
    assert!(h.bitmap_sectors + h.table_sectors > 256);
    let size = h.data_offset + (1 << 20);
    let world = SimWorld::new(43, SimConfig::default());
    let dev = world.create_block_device(size);
    dev.write_now(0, &vec![0xEE; size as usize]);
    let (io, f, p2) = (world.io(), dev.clone(), p.clone());
    world
        .block_on(async move { Image::create(&io, f, &p2).await })
        .unwrap();
    let j = h.journal_offset;
    let after = dev.read_now(j + 4096, (size - j - 4096) as usize);
    assert!(
        after.iter().all(|&b| b == 0xEE),
        "create wrote past the first journal sector, at {:#x}",
        j + 4096 + after.iter().position(|&b| b != 0xEE).unwrap() as u64
    );
    super::assert_not_corrupt(&world, &dev, "the new image");
}

/// The simulator's corruption oracle (`assert_not_corrupt`) can fail: two chunks mapping one
/// physical chunk (written to both metadata copies, sealed) are corruption to `check` (exit 2),
/// and open refuses the image with the first problem and the number of the others.
#[test]
fn a_duplicate_mapping_is_corruption_to_check_and_to_open() {
    let world = SimWorld::new(43, SimConfig::default());
    let dev = world.create_block_device(4 << 20);
    let p = small_compact();
    let img = super::create_and_open(&world, &dev, p);
    let mut r = Requests::new(world.clone(), dev.clone(), img.clone());
    r.write(0, BS, 1);
    r.write(8 * BS, BS, 2);
    let phys0 = r.phys(0).0;
    r.now("close", close());
    drop(r);
    super::assert_not_corrupt(&world, &dev, "before the damage");

    let (io, f) = (world.io(), dev.clone());
    let h = world
        .block_on(async move { Image::read_header(&io, &f).await })
        .unwrap();
    for m in h.meta_offset {
        let at = m + h.bitmap_sectors * SECTOR as u64;
        let mut s = dev.read_now(at, SECTOR);
        // Chunk 2 names chunk 0's physical chunk.
        s[8..12].copy_from_slice(&phys0.to_le_bytes());
        let crc = checksum(&s[..SECTOR - 4]);
        s[SECTOR - 4..].copy_from_slice(&crc.to_le_bytes());
        dev.write_now(at, &s);
    }
    let report = super::check(&world, &dev);
    assert!(report.corrupt(), "{:?}", report.problems);
    assert_eq!(report.exit_code(), 2);
    let (io, f) = (world.io(), dev.clone());
    match world.block_on(async move { Image::open(&io, f, None, false).await.map(|_| ()) }) {
        Err(EngineError::Corrupt(Corruption::Problems { more, .. })) => assert_eq!(more, 1),
        r => panic!("open of an image with a duplicate mapping: {r:?}"),
    }
}

/// A read-only open says so, refuses writes and writes nothing, also when closed; a second
/// close of a read-write image writes nothing either.
#[test]
fn read_only_images_and_closed_images_write_nothing_on_close() {
    let world = SimWorld::new(47, SimConfig::default());
    let dev = world.create_block_device(4 << 20);
    let p = small_compact();
    let img = super::create_and_open(&world, &dev, p);
    let mut r = Requests::new(world.clone(), dev.clone(), img);
    r.write(0, BS, 1);
    r.now("close", close());
    let closed = dev.read_now(0, 4 << 20);
    r.now("second close", close());
    assert!(dev.read_now(0, 4 << 20) == closed, "a second close wrote");
    drop(r);

    let (io, f) = (world.io(), dev.clone());
    let ro = world
        .block_on(async move { Image::open(&io, f, None, true).await })
        .unwrap();
    assert!(ro.read_only());
    let ro = std::sync::Arc::new(ro);
    let (io, ro2) = (world.io(), ro.clone());
    let w = world.block_on(async move {
        let b = fvd::io::Buf::alloc(BS as usize);
        ro2.write(&io, fvd::units::VirtOffset(0), b).await
    });
    assert!(w.is_err(), "a write to a read-only image: {w:?}");
    let io = world.io();
    world.block_on(async move { ro.close(&io).await }).unwrap();
    assert!(
        dev.read_now(0, 4 << 20) == closed,
        "a read-only image wrote"
    );
}

/// An image reports its storage's logical block size, which the server advertises to guests
/// as the disk's block size: 4096 on 4 KiB-sector storage, and never below 512.
#[test]
fn an_image_reports_the_logical_block_size_of_its_storage() {
    for (align, want) in [(4096, 4096), (512, 512), (1, 512)] {
        let world = SimWorld::new(53, SimConfig::default());
        let file = world.create_disk(0, align);
        let p = small_compact();
        let img = super::create_and_open(&world, &file, p);
        assert_eq!(img.alignment(), want, "storage alignment {align}");
    }
}
