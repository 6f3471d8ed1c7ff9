//! Copying base data into a compact image (src/engine/fill.rs) in exact interleavings: a fill
//! whose data write is held in flight (`SimWorld::hold_next_write_at`) while other requests
//! run, copy-on-read of a read that reaches past the base's end, and prefetching without a
//! base. Each test kills mutants that survived the randomized suite (docs/TESTING.md lists
//! them).

use super::pattern::base_image;
use super::requests::{discard, finished, flush, Outcome, Requests};
use fvd::engine::base::Base;
use fvd::engine::fill::PrefetchStep;
use fvd::engine::storage::Storage;
use fvd::engine::{CreateParams, Image};
use fvd::format::{BaseFormat, BaseRef};
use fvd::io::sim::{SimConfig, SimWorld};
use fvd::units::{BlockIndex, PhysChunk};
use std::ops::{Deref, DerefMut};
use std::sync::Arc;

const BS: u64 = 4096;

struct Env {
    req: Requests,
    /// What the base image holds (`base_blocks` blocks of it).
    base: Vec<u8>,
    chunk: u64,
}

impl Deref for Env {
    type Target = Requests;
    fn deref(&self) -> &Requests {
        &self.req
    }
}

impl DerefMut for Env {
    fn deref_mut(&mut self) -> &mut Requests {
        &mut self.req
    }
}

impl Env {
    /// A compact image of 16 chunks of `chunk` bytes on a growing simulated file, over a raw
    /// base of `base_blocks` blocks (none: no base).
    fn new(chunk: u64, base_blocks: u64) -> Env {
        let world = SimWorld::new(17, SimConfig::default());
        let file = world.create_disk(0, 512);
        let bytes = base_image(base_blocks * BS / 512);
        let base_file = (base_blocks > 0).then(|| {
            let f = world.create_disk(0, 512);
            f.write_now(0, &bytes);
            f.read_only()
        });
        let p = CreateParams {
            virtual_size: 16 * chunk,
            block_size: BS,
            chunk_size: chunk,
            journal_size: 16 * 4096,
            compact: true,
            base: base_file.as_ref().map(|_| BaseRef {
                path: "sim-base.raw".into(),
                format: BaseFormat::Raw,
                size: base_blocks * BS,
            }),
            ..Default::default()
        };
        let (io, f) = (world.io(), file.clone());
        world
            .block_on(async move { Image::create(&io, f, &p).await })
            .unwrap();
        let base = base_file.map(|f| Base::Raw {
            store: Storage::new(f),
            size: base_blocks * BS,
        });
        let (io, f) = (world.io(), file.clone());
        let img = world
            .block_on(async move { Image::open(&io, f, base, false).await })
            .unwrap();
        Env {
            req: Requests::new(world, file, Arc::new(img)),
            base: bytes,
            chunk,
        }
    }

    /// One prefetch step of at most `max` blocks, run to its end.
    fn prefetch(&self, max: u64) -> PrefetchStep {
        let (img, io) = (self.img.clone(), self.io.clone());
        self.world
            .block_on(async move { img.prefetch_step(&io, max).await })
            .unwrap()
    }

    /// File offset of block `b` of physical chunk `p`.
    fn file_offset(&self, p: u32, b: u64) -> u64 {
        self.img.header().data_offset + p as u64 * self.chunk + b * BS
    }

    /// Base data of block `b`.
    fn base_block(&self, b: u64) -> Vec<u8> {
        self.base[(b * BS) as usize..((b + 1) * BS) as usize].to_vec()
    }

    /// Starts a copy of block `b` from the base whose data write is held in flight (it lands at
    /// block `pb` of physical chunk `p`), and runs it up to that write.
    fn held_fill(&mut self, b: u64, p: u32, pb: u64) -> Outcome {
        let at = self.file_offset(p, pb);
        self.world.hold_next_write_at(at);
        let out = self.spawn(move |img, io| {
            Box::pin(async move { img.fill_block(&io, b, None).await.map(|_| ()) })
        });
        self.run();
        assert!(out.lock().is_none(), "the fill of block {b} waits");
        assert!(
            self.world.pending_writes().contains(&(at, BS)),
            "the fill of block {b} writes at {at}: {:?}",
            self.world.pending_writes()
        );
        out
    }
}

/// A fill keeps a reference on its block's chunk until the block is present. Block 0 is being
/// copied from the base: its chunk is mapped but still empty (the bit is set only after the
/// data write, held here). A DISCARD of block 2, in the same chunk, must not unmap the chunk,
/// or a FLUSH frees its physical chunk, a write to chunk 2 takes it, and the fill's data write
/// (placed by the old mapping) lands in the new owner's data, while block 0's bit is set over
/// an unmapped chunk.
#[test]
fn a_fill_keeps_its_chunk_mapped_until_its_block_is_present() {
    let mut env = Env::new(4 * BS, 64);
    let fill = env.held_fill(0, 0, 0);
    assert_eq!(env.phys(0), PhysChunk(0));
    assert!(!env.img.block_present(BlockIndex(0)));

    env.now("discard block 2", discard(2 * BS, BS));
    assert_eq!(
        env.phys(0),
        PhysChunk(0),
        "chunk 0 was unmapped while a fill writes into it"
    );
    env.now("flush", flush());
    let chunk = env.chunk;
    env.write(2 * chunk, chunk, 3);

    env.world.release_writes();
    env.run();
    finished(&fill, "the fill");
    assert_eq!(
        env.read(2 * env.chunk, env.chunk),
        vec![3; env.chunk as usize],
        "chunk 2 (physical chunk {:?}) lost data to a fill of chunk 0",
        env.phys(2)
    );
    assert!(env.img.block_present(BlockIndex(0)));
    assert_eq!(env.read(0, BS), env.base_block(0));
    super::assert_not_corrupt(&env.world, &env.file, "after the fill");
}

/// A fill references only its own block's chunk. With chunks of one block, fills of blocks 0
/// and 2 are in flight (held at their data writes) when a DISCARD empties chunk 1: nothing
/// else uses chunk 1, so the DISCARD unmaps it (nothing would free it later).
#[test]
fn a_fill_in_flight_does_not_keep_other_chunks_mapped() {
    let mut env = Env::new(BS, 16);
    let fill0 = env.held_fill(0, 0, 0);
    let fill2 = env.held_fill(2, 1, 0);
    assert_eq!((env.phys(0), env.phys(2)), (PhysChunk(0), PhysChunk(1)));
    env.write(BS, BS, 5);
    assert!(env.phys(1).is_allocated());

    env.now("discard block 1", discard(BS, BS));
    assert!(
        !env.phys(1).is_allocated(),
        "a fill in flight kept chunk 1 mapped"
    );

    env.world.release_writes();
    env.run();
    finished(&fill0, "the fill of block 0");
    finished(&fill2, "the fill of block 2");
    assert_eq!(env.img.allocated_chunks(), 2);
    assert_eq!(env.read(0, 3 * BS), env.base[..3 * BS as usize]);
    super::assert_not_corrupt(&env.world, &env.file, "after the fills");
}

/// Copy-on-read copies only blocks the base holds: a read of blocks 0..4 over a base of two
/// blocks (its end block-aligned) reads blocks 2 and 3 as zeros, and copying those would only
/// allocate space for zeros.
#[test]
fn copy_on_read_stops_at_the_base_end() {
    let mut env = Env::new(4 * BS, 2);
    env.img.set_copy_on_read(true);
    assert!(env.img.copy_on_read());
    let mut want = env.base[..2 * BS as usize].to_vec();
    want.resize(4 * BS as usize, 0);
    assert_eq!(env.read(0, 4 * BS), want);
    assert_eq!(env.img.present_blocks(), 0, "copies wait for run_deferred");

    env.now("copy-on-read", |img, io| {
        Box::pin(async move {
            img.run_deferred(&io).await;
            Ok(())
        })
    });
    let present: Vec<u64> = (0..4)
        .filter(|&b| env.img.block_present(BlockIndex(b)))
        .collect();
    assert_eq!(present, [0, 1], "copied past the base's end");
    assert_eq!(env.img.counters().snapshot().cor_bytes, 2 * BS);
    assert_eq!(env.read(0, 4 * BS), want);
}

/// Prefetching an image without a base has nothing to copy and says it is done (a prefetcher
/// stops on `done`).
#[test]
fn prefetch_without_a_base_is_done_at_once() {
    let env = Env::new(4 * BS, 0);
    let step = env.prefetch(4);
    assert_eq!(
        step,
        PrefetchStep {
            copied: 0,
            bytes: 0,
            done: true
        }
    );
}

/// The header says the base is no longer needed only once every block the base holds is
/// present here, and never for an image without a base.
#[test]
fn the_base_is_needed_until_every_base_block_is_present() {
    let not_needed = |env: &Env| {
        let (img, io) = (env.img.clone(), env.io.clone());
        let r = env
            .world
            .block_on(async move { img.mark_base_not_needed(&io).await })
            .unwrap();
        let flag = env.img.header().flags & fvd::format::header::FLAG_BASE_NOT_NEEDED != 0;
        assert_eq!(r, flag, "the answer and the header agree");
        r
    };
    let env = Env::new(4 * BS, 0);
    assert!(!not_needed(&env), "an image without a base");

    let env = Env::new(4 * BS, 2);
    assert_eq!(env.img.base_blocks_remaining(), 2);
    assert!(!not_needed(&env), "no base block is present yet");
    let step = env.prefetch(1);
    assert_eq!((step.copied, step.done), (1, false));
    assert_eq!(env.img.base_blocks_remaining(), 1);
    assert!(!not_needed(&env), "one base block is still missing");
    let step = env.prefetch(4);
    assert_eq!((step.copied, step.bytes, step.done), (1, BS, true));
    assert_eq!(env.img.base_blocks_remaining(), 0);
    assert!(not_needed(&env));
    assert_eq!(env.read(0, 2 * BS), env.base);
}

/// Each prefetch step goes on where the last one stopped; a full pass stops where it started
/// (block 0 here), so after blocks are dropped the next pass starts at block 0 again.
#[test]
fn prefetch_goes_on_where_the_last_pass_stopped() {
    let mut env = Env::new(4 * BS, 4);
    let s = env.prefetch(16);
    assert_eq!((s.copied, s.bytes, s.done), (4, 4 * BS, true));
    env.now("discard", discard(0, 4 * BS));
    assert_eq!(env.img.present_blocks(), 0);
    let s = env.prefetch(1);
    assert_eq!((s.copied, s.done), (1, false));
    let present: Vec<u64> = (0..4)
        .filter(|&b| env.img.block_present(BlockIndex(b)))
        .collect();
    assert_eq!(
        present,
        [0],
        "the second pass starts where the first stopped"
    );
}
