//! Resize under crashes (src/engine/resize.rs, docs/FORMAT.md "Resizing"): a power loss or a
//! process crash after every I/O step of a resize leaves the old size or the new one, never a
//! mix; every flushed write survives (and, after a process crash, every completed one); a grown
//! range reads zeros even over a longer base image and after a partial last block; and the
//! image checks clean. One seed derives every knob: layout, base, grow or shrink, partial end,
//! kind of crash.

use super::pattern::{decode, fill, Decoded, BASE, ZERO};
use fvd::engine::base::Base;
use fvd::engine::storage::Storage;
use fvd::engine::{CreateParams, Image};
use fvd::format::{BaseFormat, BaseRef};
use fvd::io::executor::Executor;
use fvd::io::sim::{SimConfig, SimFile, SimIo, SimWorld};
use fvd::io::Buf;
use fvd::units::VirtOffset;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

const BS: u64 = 4096;

#[derive(Copy, Clone, Debug)]
struct Case {
    compact: bool,
    base: bool,
    grow: bool,
    /// The old size ends 1.5 KiB into a block.
    partial: bool,
    power_loss: bool,
}

impl Case {
    fn of(seed: u64) -> Case {
        Case {
            compact: seed & 1 != 0,
            base: seed & 2 != 0,
            grow: seed & 4 != 0,
            partial: seed & 8 != 0,
            power_loss: seed & 16 != 0,
        }
    }
    fn old_size(&self) -> u64 {
        24 * BS + if self.partial { 3 * 512 } else { 0 }
    }
    fn new_size(&self) -> u64 {
        if self.grow {
            40 * BS
        } else {
            12 * BS + if self.partial { 512 } else { 0 }
        }
    }
    /// Blocks written (and flushed) before the resize: all below the smaller size, the last
    /// partial block of a grown image included.
    fn written(&self) -> Vec<u64> {
        let end = self.old_size().min(self.new_size());
        (0..end.div_ceil(BS))
            .step_by(3)
            .chain([end.div_ceil(BS) - 1])
            .collect()
    }
}

struct Env {
    world: Arc<SimWorld>,
    file: SimFile,
    base: Option<SimFile>,
}

fn make_base(base: &Option<SimFile>) -> Option<Base<SimIo>> {
    base.as_ref().map(|f| Base::Raw {
        store: Storage::new(f.clone()),
        size: fvd::io::IoFile::size(f).unwrap(),
    })
}

impl Env {
    /// A new image (room for 64 blocks) with the case's writes flushed and one more write
    /// (block 1, value 3) completed but not flushed.
    fn new(seed: u64, c: Case) -> (Env, Image<SimIo>) {
        let world = SimWorld::new(seed, SimConfig::default());
        let file = world.create_disk(0, 512);
        // Longer than every size: without the base limit, a grown range would show it.
        let base = c.base.then(|| {
            let f = world.create_disk(0, 512);
            f.write_now(0, &super::pattern::base_image(64 * BS / 512));
            f.read_only()
        });
        let p = CreateParams {
            virtual_size: c.old_size(),
            block_size: BS,
            chunk_size: 4 * BS,
            journal_size: 16 * 4096,
            compact: c.compact,
            base: c.base.then(|| BaseRef {
                path: "sim-base.raw".into(),
                format: BaseFormat::Raw,
                size: 64 * BS,
            }),
            max_size: Some(64 * BS),
            ..Default::default()
        };
        let (io, f) = (world.io(), file.clone());
        world
            .block_on(async move { Image::create(&io, f, &p).await })
            .unwrap();
        let env = Env { world, file, base };
        let img = env.open();
        let img = Arc::new(img);
        let blocks = c.written();
        let (i2, io) = (img.clone(), env.world.io());
        let size = c.old_size();
        env.world
            .block_on(async move {
                for b in blocks {
                    i2.write(&io, VirtOffset(b * BS), data(2, b, size)).await?;
                }
                i2.flush(&io).await?;
                i2.write(&io, VirtOffset(BS), data(3, 1, size)).await
            })
            .unwrap();
        let img = Arc::try_unwrap(img).unwrap_or_else(|_| panic!("image still shared"));
        (env, img)
    }

    fn open(&self) -> Image<SimIo> {
        let (io, f, b) = (self.world.io(), self.file.clone(), make_base(&self.base));
        self.world
            .block_on(async move { Image::open(&io, f, b, false).await })
            .unwrap()
    }

    /// Value of each 512-byte sector of `[off, off + len)`.
    fn sectors(&self, img: &Arc<Image<SimIo>>, off: u64, len: u64) -> Vec<(u64, Decoded)> {
        let (img, io) = (img.clone(), self.world.io());
        let bytes = self.world.block_on(async move {
            let buf = Buf::alloc(len as usize);
            img.read(&io, VirtOffset(off), buf.clone()).await.unwrap();
            buf.to_vec()
        });
        bytes
            .chunks_exact(512)
            .enumerate()
            .map(|(i, s)| {
                let lba = off / 512 + i as u64;
                (lba, decode(lba, s))
            })
            .collect()
    }
}

/// Block `b` of value `id`, cut at the image's `size`.
fn data(id: u64, b: u64, size: u64) -> Buf {
    let len = BS.min(size - b * BS);
    let buf = Buf::alloc(len as usize);
    let mut s = [0u8; 512];
    for i in 0..len / 512 {
        fill(id, b * BS / 512 + i, &mut s);
        buf.copy_from_slice(i as usize * 512, &s);
    }
    buf
}

/// Runs the resize, completing at most `steps` I/O operations, then crashes. Returns whether
/// the resize returned Ok before the crash, and the number of steps it took.
fn resize_then_crash(env: &Env, img: Image<SimIo>, c: Case, steps: u64) -> (bool, u64) {
    let done = Arc::new(AtomicBool::new(false));
    let mut ex = Executor::default();
    let (io, d) = (env.world.io(), done.clone());
    let (size, grow) = (c.new_size(), c.grow);
    ex.spawn(async move {
        let mut img = img;
        img.resize(&io, size, !grow).await.unwrap();
        d.store(true, Ordering::SeqCst);
    });
    let mut taken = 0;
    loop {
        ex.run_ready();
        if done.load(Ordering::SeqCst) || taken == steps {
            break;
        }
        assert!(env.world.complete_one(), "resize stalled");
        taken += 1;
    }
    if c.power_loss {
        env.world.power_loss();
    } else {
        env.world.process_crash();
    }
    drop(ex);
    (done.load(Ordering::SeqCst), taken)
}

fn check_after_crash(seed: u64, env: &Env, c: Case, finished: bool) {
    let img = Arc::new(env.open());
    let size = img.virtual_size();
    let what = format!("seed {seed} {c:?} finished {finished}");
    assert!(
        size == c.old_size() || size == c.new_size(),
        "{what}: size {size} is neither old nor new"
    );
    if finished {
        assert_eq!(size, c.new_size(), "{what}: a finished resize was lost");
    }
    let keep = c.old_size().min(c.new_size());
    let written = c.written();
    for (lba, v) in env.sectors(&img, 0, keep) {
        let b = lba * 512 / BS;
        let ok = match v {
            Decoded::Value(3) if b == 1 => true,
            // The write of block 1 was not flushed: a power loss may lose it.
            Decoded::Value(2) if b == 1 => c.power_loss,
            Decoded::Value(2) => written.contains(&b),
            Decoded::Value(ZERO) => !c.base && !written.contains(&b),
            Decoded::Value(BASE) => c.base && !written.contains(&b),
            _ => false,
        };
        assert!(ok, "{what}: sector {lba} of block {b} lost its data");
    }
    if size > keep {
        // Grown: zeros, over the longer base too. A shrink that did not happen: the range as
        // it was (nothing was written there).
        let want = if c.base && !c.grow { BASE } else { ZERO };
        for (lba, v) in env.sectors(&img, keep, size - keep) {
            // The block the new end cuts was written whole.
            let want = if !c.grow && written.contains(&(lba * 512 / BS)) {
                2
            } else {
                want
            };
            assert!(
                matches!(v, Decoded::Value(x) if x == want),
                "{what}: sector {lba} past {keep} does not read {want}"
            );
        }
    }
    drop(img);
    super::assert_not_corrupt(&env.world, &env.file, &what);
}

#[test]
fn a_crash_at_every_step_of_a_resize_leaves_the_old_or_the_new_size() {
    for seed in 0..32 {
        let c = Case::of(seed);
        let (env, img) = Env::new(seed, c);
        let (finished, total) = resize_then_crash(&env, img, c, u64::MAX);
        assert!(finished, "seed {seed}: the resize did not finish");
        // At least the copy, a flush, the header and a flush: every one a crash point.
        assert!(total >= 4, "seed {seed}: {total} steps");
        check_after_crash(seed, &env, c, true);
        for steps in 0..total {
            let (env, img) = Env::new(seed, c);
            let (finished, _) = resize_then_crash(&env, img, c, steps);
            check_after_crash(seed, &env, c, finished);
        }
    }
}

/// After a resize the image keeps working at the new size: writes into the grown range
/// survive a power loss once flushed, and a second resize (back) works as well.
#[test]
fn a_resized_image_takes_writes_in_the_new_range() {
    for seed in 0..8 {
        let mut c = Case::of(seed);
        c.grow = true;
        let (env, mut img) = Env::new(seed, c);
        let io = env.world.io();
        let size = c.new_size();
        img = env.world.block_on(async move {
            img.resize(&io, size, false).await.unwrap();
            img
        });
        let img = Arc::new(img);
        let (i2, io) = (img.clone(), env.world.io());
        env.world
            .block_on(async move {
                i2.write(&io, VirtOffset(30 * BS), data(4, 30, size))
                    .await?;
                i2.flush(&io).await
            })
            .unwrap();
        drop(img);
        env.world.power_loss();
        let img = Arc::new(env.open());
        assert_eq!(img.virtual_size(), size);
        for (lba, v) in env.sectors(&img, 30 * BS, BS) {
            assert!(matches!(v, Decoded::Value(4)), "seed {seed}: sector {lba}");
        }
    }
}

/// Growing while requests run (`Image::grow`, what a server calls): writes into the old range
/// complete as usual; a request past the old end fails until the new size is in place and is
/// served once it is; the resize and the writes both survive a power loss after a FLUSH.
#[test]
fn grow_while_requests_run() {
    for seed in 0..16 {
        let mut c = Case::of(seed);
        c.grow = true;
        let (env, img) = Env::new(seed, c);
        let img = Arc::new(img);
        let done = Arc::new(AtomicBool::new(false));
        let mut ex = Executor::default();
        let (i2, io, d) = (img.clone(), env.world.io(), done.clone());
        let size = c.new_size();
        ex.spawn(async move {
            i2.grow(&io, size).await.unwrap();
            d.store(true, Ordering::SeqCst);
        });
        let early_ok = Arc::new(AtomicBool::new(false));
        for (i, b) in [2u64, 5, 8].into_iter().enumerate() {
            let (i2, io) = (img.clone(), env.world.io());
            ex.spawn(async move {
                i2.write(&io, VirtOffset(b * BS), data(5 + i as u64, b, c.old_size()))
                    .await
                    .unwrap();
            });
        }
        let mut steps = 0;
        while !done.load(Ordering::SeqCst) {
            ex.run_ready();
            // A write past the old end, tried at every step: refused until the grow is done.
            if steps % 3 == 0 && !done.load(Ordering::SeqCst) {
                let (i2, io, e) = (img.clone(), env.world.io(), early_ok.clone());
                let was_done = done.clone();
                ex.spawn(async move {
                    // Read in the same poll as the write's range check.
                    let before = was_done.load(Ordering::SeqCst);
                    let r = i2
                        .write(&io, VirtOffset(30 * BS), data(9, 30, 40 * BS))
                        .await;
                    if r.is_ok() && !before {
                        e.store(true, Ordering::SeqCst);
                    }
                });
            }
            ex.run_ready();
            if done.load(Ordering::SeqCst) {
                break;
            }
            assert!(env.world.complete_one(), "seed {seed}: stalled");
            steps += 1;
        }
        env.world.run(&mut ex);
        assert!(
            !early_ok.load(Ordering::SeqCst),
            "seed {seed}: a write past the old end succeeded before the grow finished"
        );
        assert_eq!(img.virtual_size(), size);
        let (i2, io) = (img.clone(), env.world.io());
        env.world
            .block_on(async move {
                i2.write(&io, VirtOffset(30 * BS), data(9, 30, 40 * BS))
                    .await?;
                i2.flush(&io).await
            })
            .unwrap();
        drop(ex);
        drop(img);
        env.world.power_loss();
        let img = Arc::new(env.open());
        assert_eq!(img.virtual_size(), size, "seed {seed}");
        for (i, b) in [2u64, 5, 8].into_iter().enumerate() {
            for (lba, v) in env.sectors(&img, b * BS, BS) {
                assert!(
                    matches!(v, Decoded::Value(x) if x == 5 + i as u64),
                    "seed {seed}: sector {lba} lost a write made during the grow"
                );
            }
        }
        for (lba, v) in env.sectors(&img, 30 * BS, BS) {
            assert!(matches!(v, Decoded::Value(9)), "seed {seed}: sector {lba}");
        }
    }
}
