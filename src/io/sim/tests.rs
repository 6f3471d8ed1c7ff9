use super::*;
use crate::io::{Buf, Segment};

fn filled(len: usize, byte: u8) -> Buf {
    let b = Buf::alloc(len);
    b.copy_from_slice(0, &vec![byte; len]);
    b
}

fn errno(r: io::Result<()>) -> Option<i32> {
    r.err().map(|e| e.raw_os_error().unwrap_or(-1))
}

/// Order in which 30 concurrent writes complete under `seed`.
fn completion_order(seed: u64) -> Vec<usize> {
    let world = SimWorld::new(seed, SimConfig::default());
    let disk = world.create_disk(1 << 20, 512);
    let io = world.io();
    let order = Arc::new(Mutex::new(Vec::new()));
    let mut ex = Executor::default();
    for i in 0..30 {
        let (io, disk, order) = (io.clone(), disk.clone(), order.clone());
        ex.spawn(async move {
            io.write(&disk, PhysOffset(i as u64 * 512), filled(512, i as u8))
                .await
                .unwrap();
            order.lock().push(i);
        });
    }
    ex.run_ready();
    assert_eq!(world.pending(), 30, "ops must not complete on submission");
    world.run(&mut ex);
    assert_eq!(world.counters().writes, 30);
    let v = order.lock().clone();
    v
}

#[test]
fn completion_order_is_seeded() {
    assert_eq!(completion_order(7), completion_order(7));
    assert_ne!(completion_order(7), completion_order(8));
    let mut sorted = completion_order(9);
    sorted.sort();
    assert_eq!(sorted, (0..30).collect::<Vec<_>>());
}

#[test]
fn reads_see_completed_writes_and_zeros_past_end() {
    let world = SimWorld::new(1, SimConfig::default());
    let disk = world.create_disk(4096, 512);
    let io = world.io();
    let (io2, d2) = (io.clone(), disk.clone());
    let back = world.block_on(async move {
        io2.write(&d2, PhysOffset(512), filled(1024, 0xab))
            .await
            .unwrap();
        // Past the end: a regular file grows.
        io2.write(&d2, PhysOffset(8192), filled(512, 0xcd))
            .await
            .unwrap();
        let b = Buf::alloc(9216);
        io2.read(&d2, PhysOffset(0), b.clone()).await.unwrap();
        let tail = filled(1024, 0xff);
        io2.read(&d2, PhysOffset(8192), tail.clone()).await.unwrap();
        (b.to_vec(), tail.to_vec())
    });
    assert_eq!(disk.size().unwrap(), 8704);
    assert!(back.0[..512].iter().all(|&x| x == 0));
    assert!(back.0[512..1536].iter().all(|&x| x == 0xab));
    assert!(back.0[1536..8192].iter().all(|&x| x == 0));
    assert!(back.0[8192..8704].iter().all(|&x| x == 0xcd));
    assert!(back.0[8704..].iter().all(|&x| x == 0));
    assert!(back.1[..512].iter().all(|&x| x == 0xcd));
    assert!(
        back.1[512..].iter().all(|&x| x == 0),
        "short read past the end zero-fills"
    );
}

#[test]
fn alignment_read_only_and_block_device_limits() {
    let world = SimWorld::new(2, SimConfig::default());
    let disk = world.create_disk(1 << 20, 4096);
    let bdev = world.create_block_device(8192);
    let ro = disk.read_only();
    assert_eq!(disk.alignment(), 4096);
    assert!(bdev.is_block_device() && !disk.is_block_device() && ro.is_read_only());
    let io = world.io();
    let r = world.block_on(async move {
        let a = Buf::alloc(8192);
        let seg = a.segments()[0];
        // SAFETY: the segment lies inside `a`, which the owner keeps alive.
        let misaligned_mem = unsafe {
            Buf::from_segments(
                [Segment {
                    addr: seg.addr + 512,
                    len: 4096,
                }],
                Arc::new(a.clone()),
            )
        };
        vec![
            errno(io.write(&disk, PhysOffset(512), Buf::alloc(4096)).await),
            errno(io.write(&disk, PhysOffset(0), Buf::alloc(512)).await),
            errno(io.read(&disk, PhysOffset(0), misaligned_mem).await),
            errno(io.punch_hole(&disk, PhysOffset(0), 512).await),
            errno(io.read(&disk, PhysOffset(4096), Buf::alloc(4096)).await),
            errno(io.write(&ro, PhysOffset(0), Buf::alloc(4096)).await),
            errno(io.write(&bdev, PhysOffset(4096), Buf::alloc(8192)).await),
            errno(io.write(&bdev, PhysOffset(4096), Buf::alloc(4096)).await),
        ]
    });
    let e = Some(libc::EINVAL);
    assert_eq!(
        r,
        vec![
            e,
            e,
            e,
            e,
            None,
            Some(libc::EBADF),
            Some(libc::ENOSPC),
            None
        ]
    );
}

/// Writes A (completed, then flushed) and B (completed, unflushed), then loses power.
/// Returns (A survived, B survived).
fn flush_then_crash(seed: u64) -> (bool, bool) {
    let world = SimWorld::new(seed, SimConfig::default());
    let disk = world.create_disk(1 << 16, 512);
    let io = world.io();
    let (io2, d2) = (io.clone(), disk.clone());
    world.block_on(async move {
        io2.write(&d2, PhysOffset(0), filled(512, 0xaa))
            .await
            .unwrap();
        io2.flush(&d2).await.unwrap();
        io2.write(&d2, PhysOffset(4096), filled(512, 0xbb))
            .await
            .unwrap();
    });
    assert_eq!(disk.dirty_sectors(), 1);
    world.power_loss();
    assert_eq!(disk.dirty_sectors(), 0);
    let a = disk.read_now(0, 512);
    let b = disk.read_now(4096, 512);
    assert!(
        b.iter().all(|&x| x == 0) || b.iter().all(|&x| x == 0xbb),
        "no garbage"
    );
    (a.iter().all(|&x| x == 0xaa), b[0] == 0xbb)
}

#[test]
fn flushed_writes_survive_power_loss_unflushed_may_not() {
    let runs: Vec<_> = (0..64).map(flush_then_crash).collect();
    assert!(
        runs.iter().all(|r| r.0),
        "a write completed before a completed flush must survive"
    );
    assert!(
        runs.iter().any(|r| r.1) && runs.iter().any(|r| !r.1),
        "unflushed writes sometimes survive"
    );
}

#[test]
fn flush_covers_only_writes_completed_before_its_submission() {
    // Write and flush are in flight together; whichever completes first, the flush was
    // submitted before the write completed, so the write is never made durable by it.
    let mut lost_after_flush = false;
    for seed in 0..64 {
        let world = SimWorld::new(seed, SimConfig::default());
        let disk = world.create_disk(1 << 16, 512);
        let io = world.io();
        let order = Arc::new(Mutex::new(Vec::new()));
        let mut ex = Executor::default();
        let (i1, d1, o1) = (io.clone(), disk.clone(), order.clone());
        ex.spawn(async move {
            i1.write(&d1, PhysOffset(0), filled(512, 0x11))
                .await
                .unwrap();
            o1.lock().push("w");
        });
        let (i2, d2, o2) = (io.clone(), disk.clone(), order.clone());
        ex.spawn(async move {
            i2.flush(&d2).await.unwrap();
            o2.lock().push("f");
        });
        world.run(&mut ex);
        let write_first = order.lock()[0] == "w";
        world.power_loss();
        if write_first && disk.read_now(0, 512)[0] == 0 {
            lost_after_flush = true;
        }
    }
    assert!(lost_after_flush);
}

#[test]
fn power_loss_tears_multi_sector_writes_and_drops_pending_ops() {
    let mut torn = false;
    for seed in 0..64 {
        let world = SimWorld::new(seed, SimConfig::default());
        let disk = world.create_disk(1 << 16, 512);
        let io = world.io();
        let (io2, d2) = (io.clone(), disk.clone());
        world.block_on(async move {
            io2.write(&d2, PhysOffset(0), filled(8 * 512, 0x5a))
                .await
                .unwrap()
        });
        // A write left pending at the power loss never happens and its future fails.
        let res = Arc::new(Mutex::new(None));
        let mut ex = Executor::default();
        let (io3, d3, r3) = (io.clone(), disk.clone(), res.clone());
        ex.spawn(async move {
            *r3.lock() = Some(errno(
                io3.write(&d3, PhysOffset(8192), filled(512, 1)).await,
            ))
        });
        ex.run_ready();
        assert_eq!(world.pending(), 1);
        world.power_loss();
        assert_eq!(world.pending(), 0);
        ex.run_ready();
        assert_eq!(*res.lock(), Some(Some(libc::EIO)));
        assert_eq!(disk.read_now(8192, 512), vec![0; 512]);
        let new: Vec<bool> = (0..8)
            .map(|s| disk.read_now(s * 512, 512)[0] == 0x5a)
            .collect();
        torn |= new.iter().any(|&x| x) && new.iter().any(|&x| !x);
        // The old channel is dead; a fresh one works on the surviving contents.
        let (old, d4) = (io.clone(), disk.clone());
        assert_eq!(
            world.block_on(async move { errno(old.flush(&d4).await) }),
            Some(libc::EIO)
        );
        let (new_io, d5) = (world.io(), disk.clone());
        assert_eq!(
            world.block_on(async move { errno(new_io.flush(&d5).await) }),
            None
        );
    }
    assert!(
        torn,
        "some power loss should keep part of a multi-sector write"
    );
}

#[test]
fn injected_errors_fail_ops_and_tear_writes() {
    let cfg = SimConfig {
        read_error_prob: 1.0,
        write_error_prob: 1.0,
        flush_error_prob: 1.0,
        ..SimConfig::default()
    };
    // How much of a failed 64-sector write reached the disk, per seed: none, all, or part.
    let mut outcomes = [false; 3];
    for seed in 0..24 {
        let world = SimWorld::new(seed, cfg.clone());
        let disk = world.create_disk(1 << 20, 512);
        let io = world.io();
        let (io2, d2) = (io.clone(), disk.clone());
        let r = world.block_on(async move {
            vec![
                errno(io2.write(&d2, PhysOffset(0), filled(64 * 512, 0x77)).await),
                errno(io2.read(&d2, PhysOffset(0), Buf::alloc(512)).await),
                errno(io2.flush(&d2).await),
                errno(io2.punch_hole(&d2, PhysOffset(1 << 16), 512).await),
            ]
        });
        assert_eq!(r, vec![Some(libc::EIO); 4]);
        assert_eq!(world.counters().injected_errors, 4);
        let applied = (0..64)
            .filter(|&s| disk.read_now(s * 512, 1)[0] == 0x77)
            .count();
        outcomes[match applied {
            0 => 0,
            64 => 1,
            _ => 2,
        }] = true;

        world.set_config(SimConfig::default());
        let (io3, d3) = (io.clone(), disk.clone());
        assert_eq!(
            world.block_on(async move { errno(io3.flush(&d3).await) }),
            None
        );
        let before = disk.read_now(0, 64 * 512);
        world.power_loss();
        assert_eq!(
            disk.read_now(0, 64 * 512),
            before,
            "a successful flush after errors makes state durable"
        );
    }
    assert_eq!(
        outcomes, [true; 3],
        "none / all / part of a failed write applied"
    );
}

#[test]
fn unflushed_growth_may_be_lost() {
    let mut shrunk = false;
    for seed in 0..16 {
        let world = SimWorld::new(seed, SimConfig::default());
        let disk = world.create_disk(4096, 512);
        let (io, d) = (world.io(), disk.clone());
        world.block_on(async move {
            io.write(&d, PhysOffset(1 << 16), filled(512, 9))
                .await
                .unwrap()
        });
        world.power_loss();
        let size = disk.size().unwrap();
        assert!(size == 4096 || size == (1 << 16) + 512);
        shrunk |= size == 4096;
    }
    assert!(shrunk);
}

#[test]
fn held_punches_wait_while_other_ops_complete() {
    let world = SimWorld::new(3, SimConfig::default());
    let disk = world.create_disk(1 << 16, 512);
    let io = world.io();
    disk.write_now(0, &[7; 4096]);
    let mut ex = Executor::default();
    let done = Arc::new(Mutex::new(Vec::new()));
    for (i, punch) in [(0u64, true), (1, false), (2, false)] {
        let (io, disk, done) = (io.clone(), disk.clone(), done.clone());
        ex.spawn(async move {
            let r = if punch {
                io.punch_hole(&disk, PhysOffset(0), 1024).await
            } else {
                io.write(&disk, PhysOffset(8192 + i * 512), filled(512, 1))
                    .await
            };
            r.unwrap();
            done.lock().push(i);
        });
    }
    world.hold_punches(true);
    assert_eq!(world.run(&mut ex), 2, "only the writes complete");
    assert_eq!(world.pending(), 1);
    assert_eq!(
        disk.read_now(0, 1024),
        vec![7; 1024],
        "the punch is not applied"
    );
    world.hold_punches(false);
    assert_eq!(world.run(&mut ex), 1);
    assert_eq!(disk.read_now(0, 1024), vec![0; 1024]);
    assert_eq!(done.lock().last(), Some(&0));
}

#[test]
fn a_held_write_waits_while_other_ops_complete() {
    let world = SimWorld::new(5, SimConfig::default());
    let disk = world.create_disk(1 << 16, 512);
    let io = world.io();
    let mut ex = Executor::default();
    let done = Arc::new(Mutex::new(Vec::new()));
    // Two writes at 0: only the first one submitted is held.
    for i in 0..3u64 {
        let (io, disk, done) = (io.clone(), disk.clone(), done.clone());
        let off = if i < 2 { 0 } else { 4096 };
        ex.spawn(async move {
            io.write(&disk, PhysOffset(off), filled(512, i as u8 + 1))
                .await
                .unwrap();
            done.lock().push(i);
        });
    }
    world.hold_next_write_at(0);
    assert_eq!(world.run(&mut ex), 2, "only the writes not held complete");
    assert_eq!(world.pending_writes(), [(0, 512)]);
    assert_eq!(
        disk.read_now(0, 512),
        vec![2; 512],
        "the held write is not applied"
    );
    world.release_writes();
    assert_eq!(world.run(&mut ex), 1);
    assert_eq!(disk.read_now(0, 512), vec![1; 512]);
    assert_eq!(done.lock().last(), Some(&0));
}
