//! DISCARD and WRITE ZEROES on a compact image (src/engine/discard.rs) in exact interleavings:
//! a DISCARD whose punch is held in flight (`SimWorld::hold_punches`) while other requests run,
//! and which chunks a DISCARD may unmap. Each test kills mutants that survived the randomized
//! suite (docs/TESTING.md lists them).

use super::requests::{discard, ReqFut, Requests};
use fvd::engine::{CreateParams, Image};
use fvd::io::sim::{SimConfig, SimIo, SimWorld};
use fvd::units::{BlockIndex, PhysChunk, VirtOffset};
use std::ops::{Deref, DerefMut};
use std::sync::Arc;

const BS: u64 = 4096;
const CHUNK: u64 = 4 * BS;

struct Env(Requests);

impl Env {
    /// A compact image of 16 chunks of 4 blocks on a growing simulated file.
    fn new() -> Env {
        Env(compact(11, 16 * CHUNK, CHUNK))
    }
}

/// A compact image of `size` bytes in chunks of `chunk` on a growing simulated file.
fn compact(seed: u64, size: u64, chunk: u64) -> Requests {
    let world = SimWorld::new(seed, SimConfig::default());
    let file = world.create_disk(0, 512);
    let p = CreateParams {
        virtual_size: size,
        block_size: BS,
        chunk_size: chunk,
        journal_size: 16 * 4096,
        compact: true,
        ..Default::default()
    };
    let img = super::create_and_open(&world, &file, p);
    Requests::new(world, file, img)
}

impl Deref for Env {
    type Target = Requests;
    fn deref(&self) -> &Requests {
        &self.0
    }
}

impl DerefMut for Env {
    fn deref_mut(&mut self) -> &mut Requests {
        &mut self.0
    }
}

/// A DISCARD keeps references on every chunk it covers until its punches are done. Here it
/// drops blocks 0..6 (chunk 0 and part of chunk 1): it clears their bits, then punches block 0
/// and block 5 in turn (not physically contiguous). While the first punch is in flight, chunk 1
/// is already empty: a second DISCARD in chunk 1 must not unmap it, or a FLUSH frees its
/// physical chunk, a write to chunk 2 takes it, and the first DISCARD's pending punch of
/// block 5 (placed by the old mapping) lands in the new owner's data.
#[test]
fn a_discard_keeps_its_chunks_mapped_until_its_punches_are_done() {
    let mut env = Env::new();
    env.write(0, BS, 1);
    env.write(5 * BS, BS, 2);
    env.now("flush", |img, io| async move { img.flush(&io).await });
    assert_eq!((env.phys(0), env.phys(1)), (PhysChunk(0), PhysChunk(1)));

    env.world.hold_punches(true);
    let first = env.spawn(discard(0, 6 * BS));
    env.run();
    assert!(
        first.lock().is_none(),
        "the first DISCARD waits for its punch"
    );
    assert_eq!(env.world.pending(), 1, "only its first punch is in flight");
    assert!(
        (4..8).all(|b| !env.img.block_present(BlockIndex(b))),
        "chunk 1's bits are cleared"
    );

    env.now("second discard", discard(7 * BS, BS));
    assert_eq!(
        env.phys(1),
        PhysChunk(1),
        "chunk 1 was unmapped while the first DISCARD still punches in it"
    );
    env.now("flush", |img, io| async move { img.flush(&io).await });
    env.write(2 * CHUNK, CHUNK, 3);

    env.world.hold_punches(false);
    env.run();
    let r = first.lock().take();
    assert!(matches!(r, Some(Ok(()))), "the first DISCARD: {r:?}");
    assert_eq!(
        env.read(2 * CHUNK, CHUNK),
        vec![3; CHUNK as usize],
        "chunk 2 (physical chunk {:?}) lost data to a DISCARD of chunk 1",
        env.phys(2)
    );
    assert!(env.read(0, 2 * CHUNK).iter().all(|&b| b == 0));
    super::assert_not_corrupt(&env.world, &env.file, "after the DISCARDs");
}

fn zero_keeping_space(off: u64, len: u64) -> impl FnOnce(Arc<Image<SimIo>>, SimIo) -> ReqFut {
    move |img, io| Box::pin(async move { img.write_zeroes(&io, VirtOffset(off), len, false).await })
}

/// A DISCARD references only the chunks it covers: one of chunk 2 in flight does not keep a
/// concurrent DISCARD of chunk 0 from unmapping chunk 0 (which it alone would try; nothing
/// would free the chunk afterwards). Chunk 0 is emptied first by a WRITE ZEROES that keeps its
/// space, so that its DISCARD has nothing to punch and completes while punches are held.
#[test]
fn a_discard_in_flight_does_not_keep_other_chunks_mapped() {
    let mut env = Env::new();
    env.write(0, BS, 1);
    env.write(2 * CHUNK, BS, 2);
    env.now("write zeroes", zero_keeping_space(0, CHUNK));
    assert!(
        env.phys(0).is_allocated(),
        "WRITE ZEROES without unmap keeps chunk 0"
    );

    env.world.hold_punches(true);
    let first = env.spawn(discard(2 * CHUNK, CHUNK));
    env.run();
    assert!(
        first.lock().is_none(),
        "the DISCARD of chunk 2 waits for its punch"
    );
    env.now("discard chunk 0", discard(0, CHUNK));
    assert!(
        !env.phys(0).is_allocated(),
        "a DISCARD of chunk 2 in flight kept chunk 0 mapped"
    );

    env.world.hold_punches(false);
    env.run();
    let r = first.lock().take();
    assert!(matches!(r, Some(Ok(()))), "the DISCARD of chunk 2: {r:?}");
    assert!(!env.phys(2).is_allocated());
    assert_eq!(env.img.allocated_chunks(), 0);
}

/// A DISCARD tries to unmap only the chunks it covers: a neighbour that a WRITE ZEROES without
/// unmap emptied keeps its space (the guest asked not to deallocate it), whether the DISCARD
/// ends at its start (chunk 0) or starts at its end (chunk 2).
#[test]
fn write_zeroes_without_unmap_keeps_its_chunk_when_a_neighbour_is_discarded() {
    let mut env = Env::new();
    env.write(0, 3 * CHUNK, 1);
    env.now("write zeroes", zero_keeping_space(CHUNK, CHUNK));
    assert_eq!(env.img.allocated_chunks(), 3);
    env.now("discard chunk 0", discard(0, CHUNK));
    assert!(!env.phys(0).is_allocated());
    assert!(
        env.phys(1).is_allocated(),
        "a DISCARD of chunk 0 unmapped chunk 1"
    );
    env.now("discard chunk 2", discard(2 * CHUNK, CHUNK));
    assert!(!env.phys(2).is_allocated());
    assert!(
        env.phys(1).is_allocated(),
        "a DISCARD of chunk 2 unmapped chunk 1"
    );
    assert_eq!(env.img.allocated_chunks(), 1);
    assert!(env.read(0, 3 * CHUNK).iter().all(|&b| b == 0));
}

/// A DISCARD punches each run of present blocks that is physically contiguous with one punch:
/// here 8 blocks over chunks 0 and 1 (physical chunks 0 and 1), then two blocks apart.
#[test]
fn a_discard_punches_each_contiguous_run_once() {
    let mut env = Env::new();
    env.write(0, 2 * CHUNK, 1);
    assert_eq!((env.phys(0), env.phys(1)), (PhysChunk(0), PhysChunk(1)));
    let before = env.world.counters().punches;
    env.now("discard chunks 0 and 1", discard(0, 2 * CHUNK));
    assert_eq!(
        env.world.counters().punches - before,
        1,
        "one run, one punch"
    );

    env.write(2 * CHUNK, BS, 2);
    env.write(2 * CHUNK + 2 * BS, BS, 3);
    let before = env.world.counters().punches;
    env.now("discard chunk 2", discard(2 * CHUNK, CHUNK));
    assert_eq!(env.world.counters().punches - before, 2, "two runs");
    assert!(env.read(0, 3 * CHUNK).iter().all(|&b| b == 0));
}

/// A DISCARD that ends where a chunk starts leaves that chunk fresh (its storage, new in this
/// session, still reads zeros where no block is present): a later partial first write into it
/// needs no zeroing.
#[test]
fn a_discard_leaves_the_next_chunk_fresh() {
    let mut env = Env::new();
    env.write(0, CHUNK, 1);
    env.write(CHUNK, BS, 2);
    env.now("discard chunk 0", discard(0, CHUNK));
    let before = env.img.counters().snapshot();
    env.write(CHUNK + BS, 512, 3);
    let after = env.img.counters().snapshot();
    assert_eq!(
        after.zeroing_skipped - before.zeroing_skipped,
        1,
        "chunk 1 is no longer fresh after a DISCARD of chunk 0"
    );
    assert_eq!(after.host_zeroes, before.host_zeroes, "no zeroing");
    let mut want = vec![0; BS as usize];
    want[..512].fill(3);
    assert_eq!(env.read(CHUNK + BS, BS), want);
}

/// A DISCARD in the last chunk of an image whose metadata describes a partial last chunk (one
/// bitmap sector: 32640 blocks of 4 KiB, 127.5 chunks of 1 MiB) empties and unmaps that chunk,
/// looking only at the blocks the image has; its block reads zeros, the others keep their data.
#[test]
fn a_discard_unmaps_a_partial_last_chunk() {
    const BIG: u64 = 1 << 20;
    const BLOCKS: u64 = 32640;
    let mut env = compact(12, BLOCKS * BS, BIG);
    assert_eq!(env.img.header().bitmap_sectors, 1);
    let last = (BLOCKS - 1) * BS;
    env.write(0, BS, 1);
    env.write(last, BS, 2);
    let c = last / BIG;
    assert!(env.phys(c).is_allocated());
    env.now("discard the last block", discard(last, BS));
    assert_eq!(
        env.phys(c),
        PhysChunk::UNALLOCATED,
        "the emptied chunk is unmapped"
    );
    assert!(env.read(last, BS).iter().all(|&b| b == 0));
    assert!(env.read(0, BS).iter().all(|&b| b == 1));
}

/// A DISCARD that empties a chunk another request is using (here an overwrite in flight, which
/// takes no block lock) cannot unmap it then; the next FLUSH does, so no empty chunk stays
/// mapped (a leak to `fvd check`) after the requests are done.
#[test]
fn a_chunk_a_discard_found_busy_is_unmapped_by_the_next_flush() {
    let mut env = Env::new();
    env.write(0, BS, 1);
    env.now("flush", |img, io| async move { img.flush(&io).await });
    assert_eq!(env.img.allocated_chunks(), 1);
    env.world.hold_next_write_at(env.img.header().data_offset);
    let write = env.spawn(|img, io| async move {
        let b = fvd::io::Buf::alloc(BS as usize);
        b.copy_from_slice(0, &[2; BS as usize]);
        img.write(&io, VirtOffset(0), b).await
    });
    env.run();
    assert!(write.lock().is_none(), "the overwrite is held");
    env.now("discard", discard(0, CHUNK));
    assert!(env.phys(0).is_allocated(), "chunk 0 is busy: still mapped");
    env.world.release_writes();
    env.run();
    super::requests::finished(&write, "the overwrite");
    env.now("flush", |img, io| async move { img.flush(&io).await });
    assert!(!env.phys(0).is_allocated(), "the flush unmapped chunk 0");
    assert_eq!(env.img.allocated_chunks(), 0);
    assert!(env.read(0, CHUNK).iter().all(|&b| b == 0));
    env.now("close", super::requests::close());
    let report = super::check(&env.world, &env.file);
    assert_eq!(
        (report.corruptions, report.leaks),
        (0, 0),
        "{:?}",
        report.problems
    );
}
