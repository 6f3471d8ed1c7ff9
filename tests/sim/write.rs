//! The write path (src/engine/write.rs) in exact interleavings and host I/O counts. Each test
//! kills mutants that survived the randomized suite (docs/TESTING.md lists them).

use super::requests::{finished, Requests};
use fvd::engine::{CreateParams, Image};
use fvd::io::sim::{SimConfig, SimFile, SimWorld};
use fvd::io::Buf;
use fvd::units::VirtOffset;
use std::sync::Arc;

const BS: u64 = 4096;

/// An image of 16 chunks of `chunk` bytes on a growing simulated file whose storage needs
/// `align`-byte I/O.
fn env(compact: bool, chunk: u64, align: u32) -> Requests {
    env_with(compact, chunk, align, SimConfig::default())
}

fn env_with(compact: bool, chunk: u64, align: u32, cfg: SimConfig) -> Requests {
    let world = SimWorld::new(23, cfg);
    let file = world.create_disk(0, align);
    env_on(world, file, compact, BS, chunk)
}

/// An image of 16 chunks of `chunk` bytes, blocks of `block` bytes, on `file`.
fn env_on(world: Arc<SimWorld>, file: SimFile, compact: bool, block: u64, chunk: u64) -> Requests {
    let p = CreateParams {
        virtual_size: 16 * chunk,
        block_size: block,
        chunk_size: chunk,
        journal_size: 16 * 4096,
        compact,
        ..Default::default()
    };
    let (io, f) = (world.io(), file.clone());
    world
        .block_on(async move { Image::create(&io, f, &p).await })
        .unwrap();
    let (io, f) = (world.io(), file.clone());
    let img = world
        .block_on(async move { Image::open(&io, f, None, false).await })
        .unwrap();
    Requests::new(world, file, Arc::new(img))
}

/// Cuts the power and opens the image again, as the next start would.
fn power_loss_and_reopen(env: &mut Requests) {
    env.world.power_loss();
    open_again(env);
}

/// Opens the image again, as the next start would.
fn open_again(env: &mut Requests) {
    env.io = env.world.io();
    let (io, f) = (env.world.io(), env.file.clone());
    let img = env
        .world
        .block_on(async move { Image::open(&io, f, None, false).await })
        .unwrap();
    env.img = Arc::new(img);
}

fn write_buf(len: u64, fill: u8) -> Buf {
    let b = Buf::alloc(len as usize);
    b.copy_from_slice(0, &vec![fill; len as usize]);
    b
}

/// On storage with 4 KiB logical blocks a 512-byte write is a read-modify-write of its 4 KiB.
/// Two such writes to different sectors of one present block must not interleave, or the one
/// that writes last puts back the sector the other wrote: a completed write lost. The first
/// write is held at its data write while the second runs.
#[test]
fn sub_sector_writes_into_one_block_on_4k_storage_do_not_undo_each_other() {
    let mut env = env(false, 4 * BS, 4096);
    env.write(0, BS, 1);
    let at = env.img.header().data_offset;
    env.world.hold_next_write_at(at);
    let first =
        env.spawn(|img, io| async move { img.write(&io, VirtOffset(0), write_buf(512, 2)).await });
    env.run();
    assert!(
        first.lock().is_none(),
        "the first write waits at its data write"
    );
    // It holds block 0's lock (what the idle checks expect to be 0 again).
    assert_eq!(env.img.locked_blocks(), 1);
    let second = env
        .spawn(|img, io| async move { img.write(&io, VirtOffset(512), write_buf(512, 3)).await });
    env.run();
    env.world.release_writes();
    env.run();
    finished(&first, "the first write");
    finished(&second, "the second write");
    assert_eq!(env.img.locked_blocks(), 0);
    let got = env.read(0, BS);
    let mut want = vec![1u8; BS as usize];
    want[..512].fill(2);
    want[512..1024].fill(3);
    assert!(
        got == want,
        "sector 0 reads {}, sector 1 reads {}",
        got[0],
        got[512]
    );
}

/// What one write of `len` bytes of `fill` at `off` cost: host writes, bytes written, intent
/// sectors, ranges zeroed without writing.
fn io_of(env: &mut Requests, off: u64, len: u64, fill: u8) -> [u64; 4] {
    let before = env.img.counters().snapshot();
    env.write(off, len, fill);
    let after = env.img.counters().snapshot();
    [
        after.host_writes - before.host_writes,
        after.host_bytes_written - before.host_bytes_written,
        after.journal_intents - before.journal_intents,
        after.host_zeroes - before.host_zeroes,
    ]
}

/// Host writes and bytes a request caused, and its intent sectors.
fn host_writes_of(env: &mut Requests, off: u64, len: u64, fill: u8) -> (u64, u64, u64) {
    let [writes, bytes, intents, _] = io_of(env, off, len, fill);
    (writes, bytes, intents)
}

/// A guest write over storage that is contiguous on the host is one host write, whether its
/// blocks are new (one write of the data beside the intent sector) or present, and across
/// chunks placed one after the other.
#[test]
fn a_write_over_contiguous_storage_is_one_host_write() {
    for compact in [false, true] {
        let mut env = env(compact, 4 * BS, 512);
        // Blocks 0..8: chunks 0 and 1, new. The data and one intent sector.
        assert_eq!(
            host_writes_of(&mut env, 0, 8 * BS, 1),
            (2, 8 * BS + 4096, 1),
            "new blocks, compact={compact}"
        );
        if compact {
            assert_eq!(env.phys(0).0 + 1, env.phys(1).0, "chunks placed in order");
        }
        // Present blocks: the data only.
        assert_eq!(
            host_writes_of(&mut env, 512, 8 * BS - 1024, 2),
            (1, 8 * BS - 1024, 0),
            "present blocks, compact={compact}"
        );
        let mut want = vec![2u8; 8 * BS as usize];
        want[..512].fill(1);
        want[8 * BS as usize - 512..].fill(1);
        assert!(env.read(0, 8 * BS) == want, "compact={compact}");
    }
}

/// A chunk allocated after the one before it takes the physical chunk that follows that one
/// when it is free, even if a lower one is free too, so a write across the two stays one host
/// write.
#[test]
fn a_new_chunk_goes_right_after_its_predecessor_when_that_place_is_free() {
    let mut env = env(true, 4 * BS, 512);
    let chunk = 4 * BS;
    env.write(0, 4 * chunk, 1);
    assert_eq!(
        (0..4).map(|c| env.phys(c).0).collect::<Vec<_>>(),
        [0, 1, 2, 3]
    );
    env.now("discard chunks 0 and 2", |img, io| async move {
        img.discard(&io, VirtOffset(0), chunk).await?;
        img.discard(&io, VirtOffset(2 * chunk), chunk).await
    });
    env.now("flush", super::requests::flush());
    assert!(!env.phys(0).is_allocated() && !env.phys(2).is_allocated());
    // Physical chunks 0 and 2 are free; chunk 2 follows chunk 1 (physical 1).
    env.write(2 * chunk, BS, 2);
    assert_eq!(env.phys(2).0, 2, "chunk 2 placed after chunk 1");
    assert_eq!(
        host_writes_of(&mut env, chunk, chunk + BS, 3),
        (1, chunk + BS, 0),
        "one write across chunks 1 and 2"
    );
    let mut want = vec![3u8; (chunk + BS) as usize];
    want.extend(vec![0u8; (3 * BS) as usize]);
    assert!(env.read(chunk, 2 * chunk) == want);
}

/// A DISCARD on storage that cannot punch leaves the block's old bytes in place, and its chunk
/// no longer reads as zeros. A later first write of part of that block must make the rest of
/// it read as zeros, even while another chunk (chunk 0 here) is still fresh.
#[test]
fn a_partial_first_write_after_a_discard_that_could_not_punch_reads_zeros_around_it() {
    let cfg = SimConfig {
        no_punch: true,
        ..Default::default()
    };
    let mut env = env_with(true, 4 * BS, 512, cfg);
    env.write(0, BS, 1);
    env.write(4 * BS, 4 * BS, 0xAA);
    env.now("discard block 5", super::requests::discard(5 * BS, BS));
    assert_eq!(env.read(5 * BS, BS), vec![0; BS as usize]);
    env.write(5 * BS, 512, 2);
    let mut want = vec![0u8; BS as usize];
    want[..512].fill(2);
    let got = env.read(5 * BS, BS);
    assert!(got == want, "block 5 reads {} after the write", got[512]);
    env.now("flush", super::requests::flush());
    power_loss_and_reopen(&mut env);
    assert!(env.read(5 * BS, BS) == want, "after a power loss");
}

/// Closes the image and opens it again: chunks below the end of the storage at open are no
/// longer known to read as zeros.
fn reopen(env: &mut Requests) {
    let (img, io) = (env.img.clone(), env.io.clone());
    env.world
        .block_on(async move { img.close(&io).await })
        .unwrap();
    open_again(env);
}

/// Host writes, bytes written and ranges zeroed without writing by one write.
fn host_io_of(env: &mut Requests, off: u64, len: u64, fill: u8) -> (u64, u64, u64) {
    let [writes, bytes, _, zeroes] = io_of(env, off, len, fill);
    (writes, bytes, zeroes)
}

/// A first write of part of a 16 KiB block whose storage may hold old bytes: on a file, the
/// rest of the block is zeroed without writing it where its edges fall on 4 KiB (the zeroing
/// granularity), and the block is written whole (guest bytes merged into zeros) where they do
/// not; on a block device, which cannot zero cheaply, always written whole. Either way the
/// rest of the block reads as zeros, and each costs one intent sector besides.
#[test]
fn a_partial_first_write_zeroes_what_it_can_without_writing_and_merges_the_rest() {
    const B: u64 = 16 << 10;
    const INTENT: u64 = 4096;
    for device in [false, true] {
        let world = SimWorld::new(29, SimConfig::default());
        let file = if device {
            world.create_block_device(64 * B + (1 << 20))
        } else {
            world.create_disk(0, 512)
        };
        let mut env = env_on(world, file, false, B, 4 * B);
        reopen(&mut env);
        let cases: [(u64, u64, (u64, u64, u64)); 5] = [
            // Aligned edges: the head and the tail zeroed.
            (B + 4096, 4096, (2, 4096 + INTENT, 2)),
            // The last sector: its start is not on 4 KiB.
            (3 * B - 512, 512, (2, B + INTENT, 0)),
            // The second half, aligned: the head zeroed, no tail.
            (3 * B + 8192, 8192, (2, 8192 + INTENT, 1)),
            // The first sector: its end is not on 4 KiB.
            (4 * B, 512, (2, B + INTENT, 0)),
            // The first half, aligned: the tail zeroed, no head.
            (5 * B, 8192, (2, 8192 + INTENT, 1)),
        ];
        for (i, &(off, len, want)) in cases.iter().enumerate() {
            let want = if device { (2, B + INTENT, 0) } else { want };
            let got = host_io_of(&mut env, off, len, i as u8 + 1);
            assert_eq!(got, want, "write {off}+{len}, device={device}");
        }
        for (i, &(off, len, _)) in cases.iter().enumerate() {
            let b = off / B * B;
            let mut want = vec![0u8; B as usize];
            want[(off - b) as usize..(off - b + len) as usize].fill(i as u8 + 1);
            assert!(env.read(b, B) == want, "block of {off}, device={device}");
        }
    }
}

/// A first write of consecutive blocks is one journal record, however many blocks: 256 new
/// blocks take one intent sector (a sector holds 254 records), and survive a crash of the
/// process.
#[test]
fn a_first_write_of_many_consecutive_blocks_is_one_journal_record() {
    let mut env = env(false, 16 * BS, 512);
    assert_eq!(
        host_writes_of(&mut env, 0, 256 * BS, 7),
        (2, 256 * BS + 4096, 1),
        "the data and one intent sector"
    );
    env.world.process_crash();
    open_again(&mut env);
    assert!(env.read(0, 256 * BS) == vec![7u8; 256 * BS as usize]);
}

/// On storage with 512-byte logical blocks an overwrite of a present block is a plain write:
/// it takes no lock, so a second overwrite of the same block completes while the first is
/// still in flight.
#[test]
fn overwrites_of_one_block_on_512_byte_storage_do_not_wait_for_each_other() {
    for compact in [false, true] {
        let mut env = env(compact, 4 * BS, 512);
        env.write(0, BS, 1);
        let at = env.img.header().data_offset;
        env.world.hold_next_write_at(at);
        let first = env
            .spawn(|img, io| async move { img.write(&io, VirtOffset(0), write_buf(512, 2)).await });
        env.run();
        assert!(first.lock().is_none(), "the first write is held");
        let second =
            env.spawn(
                |img, io| async move { img.write(&io, VirtOffset(512), write_buf(512, 3)).await },
            );
        env.run();
        finished(&second, "the second write, the first still in flight");
        assert_eq!(env.img.locked_blocks(), 0, "compact={compact}");
        env.world.release_writes();
        env.run();
        finished(&first, "the first write");
        let mut want = vec![1u8; BS as usize];
        want[..512].fill(2);
        want[512..1024].fill(3);
        assert!(env.read(0, BS) == want, "compact={compact}");
    }
}

/// A compact image of 16 chunks of 4 blocks on a simulated block device with room for exactly
/// `free` chunks of data.
fn thin(free: u64) -> Requests {
    let chunk = 4 * BS;
    let on_device = |size: u64| {
        let world = SimWorld::new(31, SimConfig::default());
        let dev = world.create_block_device(size);
        env_on(world, dev, true, BS, chunk)
    };
    // Where the data area starts: measured on a roomy device.
    let probe = 16 * chunk + (1 << 20);
    let data_start = probe - on_device(probe).img.free_bytes().unwrap();
    let env = on_device(data_start + free * chunk);
    assert_eq!(env.img.free_bytes(), Some(free * chunk));
    env
}

/// A write that finds the device full first flushes: chunks whose DISCARD is not durable yet
/// become reusable then, and the write goes through. With nothing to release it flushes once,
/// not again and again, then fails with ENOSPC (no space policy here).
#[test]
fn a_write_on_a_full_device_reuses_chunks_discarded_before_the_last_flush() {
    let chunk = 4 * BS;
    let mut env = thin(2);
    env.write(0, chunk, 1);
    env.write(chunk, chunk, 2);
    env.now("discard chunk 0", super::requests::discard(0, chunk));
    assert!(!env.phys(0).is_allocated());
    env.write(2 * chunk, BS, 3);
    assert!(env.read(2 * chunk, BS) == vec![3u8; BS as usize]);
    assert!(env.read(0, chunk) == vec![0u8; chunk as usize]);

    env.now("flush", super::requests::flush());
    let flushes = env.img.counters().snapshot().host_flushes;
    let w = env.spawn(|img, io| async move {
        img.write(&io, VirtOffset(3 * chunk), write_buf(BS, 4))
            .await
    });
    env.run();
    let r = w.lock().take();
    assert!(
        matches!(r, Some(Err(fvd::engine::EngineError::NoSpace(_)))),
        "{r:?}"
    );
    assert_eq!(env.img.counters().snapshot().host_flushes - flushes, 1);
}
