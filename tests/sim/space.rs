//! The space policy of a thin image (F4) on a simulated block device: asking for space at the
//! watermark before the device is full, writes that find it full waiting for `notify_space`
//! (counted by `space_waiting`), failing with ENOSPC once the policy's wait is over (after one
//! flush, not one per retry), and the free space reported once the device grew.

use fvd::engine::space::SpacePolicy;
use fvd::engine::{CreateParams, EngineError, Image};
use fvd::io::executor::Executor;
use fvd::io::sim::{SimConfig, SimFile, SimIo, SimWorld};
use fvd::io::{Buf, IoFile};
use fvd::units::VirtOffset;
use parking_lot::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

const BS: u64 = 4096;
const CHUNK: u64 = 4 * BS;
const CHUNKS: u64 = 16;

fn params() -> CreateParams {
    CreateParams {
        virtual_size: CHUNKS * CHUNK,
        block_size: BS,
        chunk_size: CHUNK,
        journal_size: 4096,
        compact: true,
        ..Default::default()
    }
}

fn create_and_open(device: u64) -> (Arc<SimWorld>, SimFile, SimIo, Arc<Image<SimIo>>) {
    let world = SimWorld::new(7, SimConfig::default());
    let file = world.create_block_device(device);
    let img = super::create_and_open(&world, &file, params());
    (world.clone(), file, world.io(), img)
}

/// A compact image on a block device with room for exactly `free` chunks of data.
fn thin(free: u64) -> (Arc<SimWorld>, SimFile, SimIo, Arc<Image<SimIo>>) {
    // Where the data area starts: measured on a roomy device.
    let probe = CHUNKS * CHUNK + (1 << 20);
    let (.., img) = create_and_open(probe);
    let data_start = probe - img.free_bytes().expect("a block device is bounded");
    let t = create_and_open(data_start + free * CHUNK);
    assert_eq!(t.3.free_bytes(), Some(free * CHUNK));
    t
}

/// A policy whose `on_low` calls are counted. More than 100 calls means a waiting write spins
/// (asks again without waiting for a change): that fails the test instead of hanging it.
fn counted_policy(img: &Image<SimIo>, watermark: u64, wait: Duration) -> Arc<AtomicUsize> {
    let calls = Arc::new(AtomicUsize::new(0));
    let c = calls.clone();
    img.set_space_policy(SpacePolicy {
        watermark,
        on_low: Box::new(move || {
            let n = c.fetch_add(1, Ordering::SeqCst) + 1;
            assert!(n <= 100, "on_low called {n} times: a waiting write spins");
        }),
        wait,
    });
    calls
}

type Outcome = Arc<Mutex<Option<Result<(), EngineError>>>>;

/// Spawns a write of block 0 of virtual chunk `chunk`, filled with `chunk + 1`.
fn spawn_write(ex: &mut Executor, img: &Arc<Image<SimIo>>, io: &SimIo, chunk: u64) -> Outcome {
    let out: Outcome = Arc::default();
    let (img, io, o) = (img.clone(), io.clone(), out.clone());
    ex.spawn(async move {
        let b = Buf::alloc(BS as usize);
        b.copy_from_slice(0, &[chunk as u8 + 1; BS as usize]);
        let r = img.write(&io, VirtOffset(chunk * CHUNK), b).await;
        *o.lock() = Some(r);
    });
    out
}

fn write_now(world: &SimWorld, img: &Arc<Image<SimIo>>, io: &SimIo, chunk: u64) {
    let mut ex = Executor::default();
    let out = spawn_write(&mut ex, img, io, chunk);
    world.run(&mut ex);
    let r = out.lock().take().expect("the write finished");
    r.unwrap();
}

fn done(o: &Outcome) -> bool {
    o.lock().is_some()
}

fn read_back(world: &SimWorld, img: &Arc<Image<SimIo>>, io: &SimIo, chunk: u64) {
    let (img, io) = (img.clone(), io.clone());
    let got = world.block_on(async move {
        let b = Buf::alloc(BS as usize);
        img.read(&io, VirtOffset(chunk * CHUNK), b.clone())
            .await
            .unwrap();
        b.to_vec()
    });
    assert!(
        got.iter().all(|&x| x == chunk as u8 + 1),
        "chunk {chunk} reads back"
    );
}

/// `on_low` runs after each allocation that leaves less free space than the watermark: before
/// the device is full (so the operator's LV grows in time), never at or above the watermark.
#[test]
fn a_thin_device_asks_for_space_below_the_watermark_before_it_is_full() {
    let (world, _dev, io, img) = thin(6);
    let calls = counted_policy(&img, 2 * CHUNK, Duration::from_secs(60));
    let mut want = 0;
    for c in 0..6 {
        write_now(&world, &img, &io, c);
        let free = img.free_bytes().unwrap();
        assert_eq!(free, (5 - c) * CHUNK, "one chunk taken per new chunk");
        if free < 2 * CHUNK {
            want += 1;
        }
        assert_eq!(
            calls.load(Ordering::SeqCst),
            want,
            "on_low calls after allocation {c} (free {free}, watermark {})",
            2 * CHUNK
        );
    }
    // Asked twice (one and zero chunks left), first while a chunk was still free.
    assert_eq!(want, 2);
    // Rewriting allocated chunks allocates nothing and asks nothing.
    write_now(&world, &img, &io, 5);
    assert_eq!(calls.load(Ordering::SeqCst), 2);
}

/// Writes that find the device full ask for space and wait; a notify without new space (the
/// server's timer) lets them try once more and wait again; space for one lets one through; the
/// waiting count follows.
#[test]
fn writes_on_a_full_device_wait_for_space_and_are_woken_by_notify() {
    let (world, dev, io, img) = thin(1);
    // Watermark 0: every call below is a full device asking.
    let calls = counted_policy(&img, 0, Duration::from_secs(600));
    write_now(&world, &img, &io, 0);
    assert_eq!(img.free_bytes(), Some(0));
    assert_eq!(calls.load(Ordering::SeqCst), 0);
    assert_eq!(img.space_waiting(), 0);

    let mut ex = Executor::default();
    let w1 = spawn_write(&mut ex, &img, &io, 1);
    let w2 = spawn_write(&mut ex, &img, &io, 2);
    world.run(&mut ex);
    assert!(!done(&w1) && !done(&w2), "writes on a full device wait");
    assert_eq!(calls.load(Ordering::SeqCst), 2, "each waiting write asked");
    assert_eq!(img.space_waiting(), 2);

    // A tick without new space: each tries again, asks again, and goes back to waiting.
    img.notify_space();
    world.run(&mut ex);
    assert!(!done(&w1) && !done(&w2));
    assert_eq!(calls.load(Ordering::SeqCst), 4);
    assert_eq!(img.space_waiting(), 2);

    // Room for one chunk: one write goes through, the other asks and waits.
    dev.grow(dev.size().unwrap() + CHUNK);
    img.notify_space();
    world.run(&mut ex);
    assert_eq!(
        done(&w1) as u8 + done(&w2) as u8,
        1,
        "one write got the chunk"
    );
    assert_eq!(calls.load(Ordering::SeqCst), 5);
    assert_eq!(img.space_waiting(), 1);

    dev.grow(dev.size().unwrap() + CHUNK);
    img.notify_space();
    world.run(&mut ex);
    for w in [&w1, &w2] {
        w.lock().take().expect("both writes finished").unwrap();
    }
    assert_eq!(img.space_waiting(), 0);
    assert_eq!(calls.load(Ordering::SeqCst), 5);
    for c in 0..3 {
        read_back(&world, &img, &io, c);
    }
}

/// Without a policy a write on a full device fails at once; with one it fails once the
/// policy's wait has passed (seen at the next notify), having asked; a zero wait fails at once
/// after asking.
#[test]
fn a_write_fails_with_enospc_after_the_policys_wait() {
    let no_space = |o: &Outcome| match o.lock().take() {
        Some(Err(EngineError::NoSpace(_))) => {}
        other => panic!("want ENOSPC, got {other:?}"),
    };

    // A device whose one chunk is taken (an image needs room for one to be created).
    let full = || {
        let (world, dev, io, img) = thin(1);
        write_now(&world, &img, &io, 0);
        (world, dev, io, img)
    };
    let (world, _dev, io, img) = full();
    let mut ex = Executor::default();
    let w = spawn_write(&mut ex, &img, &io, 1);
    world.run(&mut ex);
    no_space(&w);

    let (world, _dev, io, img) = full();
    let calls = counted_policy(&img, 0, Duration::ZERO);
    let mut ex = Executor::default();
    let w = spawn_write(&mut ex, &img, &io, 1);
    world.run(&mut ex);
    no_space(&w);
    assert_eq!(calls.load(Ordering::SeqCst), 1);

    let wait = Duration::from_millis(200);
    let (world, _dev, io, img) = full();
    let calls = counted_policy(&img, 0, wait);
    let mut ex = Executor::default();
    let w = spawn_write(&mut ex, &img, &io, 1);
    world.run(&mut ex);
    // Nothing wakes it but a notify, so it waits however slow this machine is.
    assert!(!done(&w), "the write waits for space");
    assert_eq!(img.space_waiting(), 1);
    std::thread::sleep(wait + Duration::from_millis(50));
    img.notify_space();
    world.run(&mut ex);
    no_space(&w);
    assert_eq!(calls.load(Ordering::SeqCst), 2);
    assert_eq!(img.space_waiting(), 0);
}

/// After the device grew, a notify (what the server does once its grow command succeeded)
/// re-reads its size: the free space reported right away (in the server's STORAGE_GROWN event,
/// and compared with the watermark before it runs the command again) counts the new chunks,
/// before any write needs one.
#[test]
fn a_notify_after_the_device_grew_reports_the_new_free_space() {
    let (world, dev, io, img) = thin(1);
    write_now(&world, &img, &io, 0);
    assert_eq!(img.free_bytes(), Some(0));
    dev.grow(dev.size().unwrap() + 3 * CHUNK);
    img.notify_space();
    assert_eq!(
        img.free_bytes(),
        Some(3 * CHUNK),
        "free space after the notify"
    );
    write_now(&world, &img, &io, 1);
    assert_eq!(img.free_bytes(), Some(2 * CHUNK));
    for c in 0..2 {
        read_back(&world, &img, &io, c);
    }
}

/// A write that finds the device full commits once, so that chunks freed by discards (reusable
/// only once their unmap is durable) can be taken; with none awaiting that, it then fails at
/// once instead of flushing the device again and again.
#[test]
fn a_write_on_a_full_device_flushes_at_most_once_when_no_chunk_awaits_release() {
    let (world, _dev, io, img) = thin(1);
    write_now(&world, &img, &io, 0);
    let (i, o) = (img.clone(), io.clone());
    world.block_on(async move { i.flush(&o).await }).unwrap();
    let before = world.counters().flushes;
    let mut ex = Executor::default();
    let w = spawn_write(&mut ex, &img, &io, 1);
    world.run(&mut ex);
    match w.lock().take() {
        Some(Err(EngineError::NoSpace(_))) => {}
        other => panic!("want ENOSPC, got {other:?}"),
    }
    let flushes = world.counters().flushes - before;
    assert!(
        flushes <= 1,
        "{flushes} device flushes for one failed write"
    );
    read_back(&world, &img, &io, 0);
}
