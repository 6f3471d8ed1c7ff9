//! Minimal reproductions of engine bugs the randomized tester found.

use super::pattern::{decode, fill, Decoded};
use fvd::engine::{CreateParams, Image};
use fvd::io::executor::Executor;
use fvd::io::sim::{SimConfig, SimFile, SimIo, SimWorld};
use fvd::io::Buf;
use fvd::units::VirtOffset;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

const BS: u64 = 4096;

fn setup(
    seed: u64,
    compact: bool,
    device: Option<u64>,
) -> (Arc<SimWorld>, SimFile, SimIo, Arc<Image<SimIo>>) {
    let world = SimWorld::new(seed, SimConfig::default());
    let file = match device {
        Some(size) => world.create_block_device(size),
        None => world.create_disk(0, 512),
    };
    let p = CreateParams {
        virtual_size: 16 * BS,
        block_size: BS,
        chunk_size: 4 * BS,
        journal_size: 4096,
        compact,
        ..Default::default()
    };
    let img = super::create_and_open(&world, &file, p);
    (world.clone(), file, world.io(), img)
}

fn data(id: u64, lba: u64, n: u64) -> Buf {
    let b = Buf::alloc(n as usize * 512);
    let mut s = [0u8; 512];
    for i in 0..n {
        fill(id, lba + i, &mut s);
        b.copy_from_slice(i as usize * 512, &s);
    }
    b
}

/// Spawns a write of sectors `[lba, lba + n)` with value `id`; the flag is set when it returns.
fn spawn_write(
    ex: &mut Executor,
    img: &Arc<Image<SimIo>>,
    io: &SimIo,
    id: u64,
    lba: u64,
    n: u64,
) -> Arc<AtomicBool> {
    let done = Arc::new(AtomicBool::new(false));
    let (img, io, d) = (img.clone(), io.clone(), done.clone());
    ex.spawn(async move {
        img.write(&io, VirtOffset(lba * 512), data(id, lba, n))
            .await
            .unwrap();
        d.store(true, Ordering::SeqCst);
    });
    done
}

/// Drives the world until `flag` is set.
fn run_until(world: &SimWorld, ex: &mut Executor, flag: &AtomicBool) {
    while !flag.load(Ordering::SeqCst) {
        ex.run_ready();
        if !world.complete_one() && !ex.has_ready() && !flag.load(Ordering::SeqCst) {
            panic!("stalled");
        }
    }
}

/// A write that finds block 5 present takes no fill lock for it, then waits for block 6's lock.
/// Meanwhile a DISCARD drops block 5 and a later write W fills it and completes. When the first
/// write resumes, it sees block 5 not present and merges it (zeros + its bytes) WITHOUT the
/// lock, overwriting part of W's acknowledged data with zeros.
#[test]
fn write_waiting_for_a_lock_does_not_merge_a_block_it_did_not_lock() {
    let mut hits = 0;
    for seed in 0..64 {
        let (world, _file, io, img) = setup(seed, seed % 2 == 0, None);
        let mut ex = Executor::default();
        // Block 5 (sectors 40..48) present.
        let d = spawn_write(&mut ex, &img, &io, 10, 40, 8);
        run_until(&world, &mut ex, &d);
        // H holds block 6's fill lock while its merge is in flight.
        spawn_write(&mut ex, &img, &io, 11, 48, 1);
        ex.run_ready();
        // X: sectors 43..55, block 5 present (no lock), waits for block 6.
        spawn_write(&mut ex, &img, &io, 12, 43, 12);
        ex.run_ready();
        // DISCARD block 5 and let it complete.
        let dd = Arc::new(AtomicBool::new(false));
        let (i2, io2, f2) = (img.clone(), io.clone(), dd.clone());
        ex.spawn(async move {
            i2.discard(&io2, VirtOffset(40 * 512), 8 * 512)
                .await
                .unwrap();
            f2.store(true, Ordering::SeqCst);
        });
        run_until(&world, &mut ex, &dd);
        // W starts after the discard returned; sectors 40..43 are W's alone (X never writes them).
        spawn_write(&mut ex, &img, &io, 13, 40, 8);
        world.run(&mut ex);
        let (i3, io3) = (img.clone(), io.clone());
        let got = world.block_on(async move {
            let b = Buf::alloc(3 * 512);
            i3.read(&io3, VirtOffset(40 * 512), b.clone())
                .await
                .unwrap();
            b.to_vec()
        });
        for (i, sec) in got.chunks(512).enumerate() {
            let lba = 40 + i as u64;
            match decode(lba, sec) {
                Decoded::Value(13) => {}
                Decoded::Value(v) => {
                    panic!("seed {seed}: sector {lba} lost write 13, holds value {v}")
                }
                _ => panic!("seed {seed}: sector {lba} holds garbage"),
            }
        }
        hits += 1;
    }
    assert_eq!(hits, 64);
}

/// A compact image on a block device that fits every virtual chunk: after a whole chunk is
/// discarded (unmapped, its physical chunk held back until the unmap is durable), rewriting it
/// fails with ENOSPC although the virtual disk fits the device.
#[test]
fn rewrite_after_discard_on_a_full_device_does_not_fail() {
    let layout = fvd::format::layout::Layout::compute(
        &fvd::units::Geometry {
            virtual_size: 16 * BS,
            block_size: BS,
            chunk_size: 4 * BS,
        },
        true,
        4096,
    );
    let (world, _file, io, img) = setup(1, true, Some(layout.data_offset + 16 * BS));
    let (i, io2) = (img.clone(), io.clone());
    let r = world.block_on(async move {
        i.write(&io2, VirtOffset(0), data(20, 0, 128)).await?;
        i.discard(&io2, VirtOffset(0), 4 * BS).await?;
        i.write(&io2, VirtOffset(0), data(21, 0, 8)).await
    });
    assert!(r.is_ok(), "{:?}", r.err().map(|e| e.to_string()));
}

/// Block 5 holds data. W (sector 41, fast path: block present, no lock) is in flight when a
/// DISCARD drops block 5 and X (sectors 44..52) starts filling blocks 5 and 6 (zeros + X under
/// the fill locks). W lands after X's fill of block 5 and returns. A second DISCARD, issued after W returned, clears block
/// 5 before X's task marks it present; X then sets the bit and the block exposes W's data,
/// which the second DISCARD had removed.
#[test]
fn fill_finishing_after_a_discard_does_not_resurrect_older_data() {
    for seed in 0..200 {
        let (world, _file, io, img) = setup(seed, seed % 2 == 1, None);
        let mut ex = Executor::default();
        let d = spawn_write(&mut ex, &img, &io, 30, 40, 8);
        run_until(&world, &mut ex, &d);
        let w = spawn_write(&mut ex, &img, &io, 31, 41, 1);
        ex.run_ready();
        let discard = |ex: &mut Executor| {
            let flag = Arc::new(AtomicBool::new(false));
            let (i, io2, f) = (img.clone(), io.clone(), flag.clone());
            ex.spawn(async move {
                i.discard(&io2, VirtOffset(40 * 512), 8 * 512)
                    .await
                    .unwrap();
                f.store(true, Ordering::SeqCst);
            });
            flag
        };
        let d1 = discard(&mut ex);
        ex.run_ready();
        // X also fills block 6, so its task (and its marking of block 5) may wait for that.
        spawn_write(&mut ex, &img, &io, 32, 44, 56);
        ex.run_ready();
        run_until(&world, &mut ex, &d1);
        run_until(&world, &mut ex, &w);
        let d2 = discard(&mut ex);
        run_until(&world, &mut ex, &d2);
        world.run(&mut ex);
        let (i3, io3) = (img.clone(), io.clone());
        let sec = world.block_on(async move {
            let b = Buf::alloc(512);
            i3.read(&io3, VirtOffset(41 * 512), b.clone())
                .await
                .unwrap();
            b.to_vec()
        });
        // X never wrote sector 41; the second discard, issued after W returned, leaves zero.
        match decode(41, &sec) {
            Decoded::Value(0) => {}
            Decoded::Value(v) => panic!("seed {seed}: sector 41 holds value {v} after a discard"),
            _ => panic!("seed {seed}: sector 41 holds garbage"),
        }
    }
}
