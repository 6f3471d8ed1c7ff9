//! The write path (src/engine/write.rs) in exact interleavings and host I/O counts. Each test
//! kills mutants that survived the randomized suite (docs/TESTING.md lists them).

use super::requests::{finished, Requests};
use fvd::engine::{CreateParams, Image};
use fvd::io::sim::{SimConfig, SimWorld};
use fvd::io::Buf;
use fvd::units::VirtOffset;
use std::sync::Arc;

const BS: u64 = 4096;

/// An image of 16 chunks of `chunk` bytes on a growing simulated file whose storage needs
/// `align`-byte I/O.
fn env(compact: bool, chunk: u64, align: u32) -> Requests {
    let world = SimWorld::new(23, SimConfig::default());
    let file = world.create_disk(0, align);
    let p = CreateParams {
        virtual_size: 16 * chunk,
        block_size: BS,
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
    let second = env
        .spawn(|img, io| async move { img.write(&io, VirtOffset(512), write_buf(512, 3)).await });
    env.run();
    env.world.release_writes();
    env.run();
    finished(&first, "the first write");
    finished(&second, "the second write");
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

/// Host writes and bytes a request caused, and its intent sectors.
fn host_writes_of(env: &mut Requests, off: u64, len: u64, fill: u8) -> (u64, u64, u64) {
    let before = env.img.counters().snapshot();
    env.write(off, len, fill);
    let after = env.img.counters().snapshot();
    (
        after.host_writes - before.host_writes,
        after.host_bytes_written - before.host_bytes_written,
        after.journal_intents - before.journal_intents,
    )
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
