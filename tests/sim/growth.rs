//! How a compact image on a growing file grows (src/engine/allocator.rs): ahead of allocation in
//! 64 MiB steps, so data writes never extend the file, and never for a chunk that will not be
//! handed out.

use fvd::engine::{CreateParams, EngineError, Image};
use fvd::format::header::pick_header;
use fvd::format::{metadata, Header, SECTOR};
use fvd::io::sim::{SimConfig, SimFile, SimIo, SimWorld};
use fvd::io::{Buf, IoFile};
use fvd::units::VirtOffset;
use std::sync::Arc;

const BS: u64 = 4096;
const STEP: u64 = 64 << 20;

fn compact(chunk: u64, chunks: u64) -> CreateParams {
    CreateParams {
        virtual_size: chunks * chunk,
        block_size: BS,
        chunk_size: chunk,
        journal_size: 4096,
        compact: true,
        ..Default::default()
    }
}

fn open(world: &Arc<SimWorld>, file: &SimFile) -> Arc<Image<SimIo>> {
    let (io, f) = (world.io(), file.clone());
    Arc::new(
        world
            .block_on(async move { Image::open(&io, f, None, false).await })
            .unwrap(),
    )
}

/// Writes one block of `value` bytes at `off`.
fn write(
    world: &Arc<SimWorld>,
    img: &Arc<Image<SimIo>>,
    off: u64,
    value: u8,
) -> Result<(), EngineError> {
    let (img, io) = (img.clone(), world.io());
    world.block_on(async move {
        let b = Buf::alloc(BS as usize);
        b.copy_from_slice(0, &[value; BS as usize]);
        img.write(&io, VirtOffset(off), b).await
    })
}

/// Reads the block at `off`.
fn read(world: &Arc<SimWorld>, img: &Arc<Image<SimIo>>, off: u64) -> Vec<u8> {
    let (img, io) = (img.clone(), world.io());
    world.block_on(async move {
        let b = Buf::alloc(BS as usize);
        img.read(&io, VirtOffset(off), b.clone()).await.unwrap();
        b.to_vec()
    })
}

fn header(file: &SimFile) -> Header {
    let raw = file.read_now(0, 2 * SECTOR);
    pick_header(&raw[..SECTOR], &raw[SECTOR..]).unwrap()
}

/// Opening a compact image read-write grows its file one step (64 MiB) past the data area,
/// before any allocation; allocations inside that step leave the length alone, and the first
/// one past it grows the file by another step. Everything written reads back.
#[test]
fn a_compact_file_grows_in_64_mib_steps_ahead_of_allocation() {
    const CHUNK: u64 = 1 << 20;
    let world = SimWorld::new(1, SimConfig::default());
    let file = world.create_disk(0, 512);
    let img = super::create_and_open(&world, &file, compact(CHUNK, 3 * STEP / CHUNK));
    let data = img.header().data_offset;
    assert_eq!(file.size().unwrap(), data + STEP, "length after open");
    let in_step = STEP / CHUNK;
    for c in 0..in_step {
        write(&world, &img, c * CHUNK, c as u8 + 1).unwrap();
        assert_eq!(
            file.size().unwrap(),
            data + STEP,
            "length after allocating chunk {c}"
        );
    }
    write(&world, &img, in_step * CHUNK, 0xEE).unwrap();
    assert_eq!(
        file.size().unwrap(),
        data + 2 * STEP,
        "length after the first allocation past the step"
    );
    for c in 0..in_step {
        assert!(read(&world, &img, c * CHUNK) == vec![c as u8 + 1; BS as usize]);
    }
    assert!(read(&world, &img, in_step * CHUNK) == vec![0xEE; BS as usize]);
}

/// An image whose table maps the last physical chunk an allocation may hand out (index
/// 2^32 - 3; 2^32 - 1 means unallocated) is not grown at open: no chunk past it will ever be
/// allocated. Allocations then take the free chunks below it, inside the file, which keeps its
/// length; the data of both chunks reads back.
#[test]
fn an_image_using_the_last_chunk_index_is_not_grown_past_it() {
    const LAST: u32 = u32::MAX - 2;
    let world = SimWorld::new(2, SimConfig::default());
    let file = world.create_disk(0, 512);
    let img = super::create_and_open(&world, &file, compact(BS, 4));
    write(&world, &img, 0, 0x11).unwrap();
    let io = world.io();
    let i = img.clone();
    world.block_on(async move { i.close(&io).await }).unwrap();
    drop(img);

    // Move virtual chunk 0 from physical chunk 0 to LAST: its table entry (resealed) and data.
    let h = header(&file);
    let sector = h.bitmap_sectors;
    let off = h.meta_offset[h.active_meta as usize] + sector * SECTOR as u64;
    let mut s = file.read_now(off, SECTOR);
    assert_eq!(
        &s[..4],
        &0u32.to_le_bytes(),
        "chunk 0 maps physical chunk 0"
    );
    s[..4].copy_from_slice(&LAST.to_le_bytes());
    metadata::seal(&mut s, sector);
    file.write_now(off, &s);
    let block = file.read_now(h.data_offset, BS as usize);
    file.write_now(h.data_offset, &[0; BS as usize]);
    let end = h.data_offset + (LAST as u64 + 1) * BS;
    file.write_now(end - BS, &block);
    assert_eq!(file.size().unwrap(), end);

    let img = open(&world, &file);
    assert_eq!(file.size().unwrap(), end, "length after open");
    assert!(read(&world, &img, 0) == vec![0x11; BS as usize]);
    write(&world, &img, BS, 0x22).unwrap();
    assert_eq!(file.size().unwrap(), end, "length after an allocation");
    assert!(read(&world, &img, 0) == vec![0x11; BS as usize]);
    assert!(read(&world, &img, BS) == vec![0x22; BS as usize]);
}
