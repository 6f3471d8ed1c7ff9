//! Thin provisioning on a loop device standing in for a logical volume: the image asks for
//! space at the watermark, the "LV" is grown (backing file extended, `losetup -c`), and writes
//! that find the device full wait for it instead of failing.

use fvd::engine::space::SpacePolicy;
use fvd::engine::{CreateParams, Image};
use fvd::io::executor::block_on;
use fvd::io::host_file::OpenMode;
use fvd::io::sync::SyncIo;
use fvd::io::{Buf, HostFile};
use fvd::units::VirtOffset;

use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{mpsc, Arc};
use std::time::Duration;

mod serve_support;
use serve_support::Loop;

/// An FVD image of `virtual_size` on the device, with a 1 MiB journal.
fn create_image(lv: &Loop, virtual_size: u64) -> CreateParams {
    let f = HostFile::open(&lv.0, OpenMode::Create).unwrap();
    let p = CreateParams {
        virtual_size,
        journal_size: MIB,
        ..Default::default()
    };
    block_on(Image::create(&SyncIo, f, &p)).unwrap();
    p
}

const MIB: u64 = 1 << 20;

#[test]
fn image_on_a_growing_loop_device_fills_past_its_initial_size() {
    let dir = tempfile::tempdir_in("/var/tmp").unwrap();
    let backing = dir.path().join("lv.img");
    // Metadata + journal take ~2.3 MiB for this geometry; start with room for a few chunks.
    let initial = 8 * MIB;
    std::fs::File::create(&backing)
        .unwrap()
        .set_len(initial)
        .unwrap();
    let Some(lv) = Loop::attach(&backing) else {
        return;
    };

    create_image(&lv, 256 * MIB);
    let img = Arc::new(block_on(fvd::engine::open_image(&SyncIo, &lv.0, false)).unwrap());
    assert!(img.free_bytes().unwrap() < 8 * MIB);

    // The grower: what `fvd serve --grow-cmd` does, with `losetup -c` as the LV resize.
    let (tx, rx) = mpsc::channel::<()>();
    let grows = Arc::new(AtomicUsize::new(0));
    img.set_space_policy(SpacePolicy {
        watermark: 2 * MIB,
        on_low: Box::new(move || {
            let _ = tx.send(());
        }),
        wait: Duration::from_secs(60),
    });
    let grower = {
        // Weak: the image owns the sender, so a strong reference here would keep both alive.
        let img = Arc::downgrade(&img);
        let grows = grows.clone();
        let backing = backing.clone();
        let dev = lv.0.clone();
        std::thread::spawn(move || {
            while let Ok(()) = rx.recv() {
                // Coalesce a burst of requests into one grow.
                while rx.try_recv().is_ok() {}
                let Some(img) = img.upgrade() else { return };
                if grows.load(Ordering::SeqCst) >= 8 {
                    img.notify_space();
                    continue;
                }
                let f = std::fs::OpenOptions::new()
                    .write(true)
                    .open(&backing)
                    .unwrap();
                let len = f.metadata().unwrap().len();
                f.set_len(len + 8 * MIB).unwrap();
                assert!(Command::new("losetup")
                    .arg("-c")
                    .arg(&dev)
                    .status()
                    .unwrap()
                    .success());
                grows.fetch_add(1, Ordering::SeqCst);
                img.notify_space();
            }
        })
    };

    // Write 40 MiB of distinct data: five times the initial device.
    let pattern = |i: u64| vec![(i % 251) as u8 + 1; MIB as usize];
    for i in 0..40u64 {
        let b = Buf::alloc(MIB as usize);
        b.copy_from_slice(0, &pattern(i));
        block_on(img.write(&SyncIo, VirtOffset(i * 3 * MIB), b))
            .unwrap_or_else(|e| panic!("write {i} failed: {e}"));
        if i % 8 == 7 {
            block_on(img.flush(&SyncIo)).unwrap();
        }
    }
    block_on(img.close(&SyncIo)).unwrap();
    assert!(
        grows.load(Ordering::SeqCst) >= 4,
        "the device should have been grown several times"
    );
    drop(img);
    let _ = grower.join();
    let img = block_on(fvd::engine::open_image(&SyncIo, &lv.0, true)).unwrap();
    for i in 0..40u64 {
        let b = Buf::alloc(MIB as usize);
        block_on(img.read(&SyncIo, VirtOffset(i * 3 * MIB), b.clone())).unwrap();
        assert_eq!(b.to_vec(), pattern(i), "chunk {i} after reopen");
    }
}

/// On a block device a first partial write fills its block in one write, zeros merged around
/// the guest's bytes, instead of asking the device for WRITE ZEROES beside it (slower on an LV,
/// docs/PERFORMANCE.md "Logical volumes"); the stale bytes the LV held never show.
#[test]
fn first_partial_write_on_an_lv_writes_the_block_whole_and_hides_stale_bytes() {
    let dir = tempfile::tempdir_in("/var/tmp").unwrap();
    let backing = dir.path().join("lv.img");
    // A used LV: every byte stale.
    std::fs::write(&backing, vec![0xAAu8; 32 * MIB as usize]).unwrap();
    let Some(lv) = Loop::attach(&backing) else {
        return;
    };
    let bs = create_image(&lv, 16 * MIB).block_size;
    let img = block_on(fvd::engine::open_image(&SyncIo, &lv.0, false)).unwrap();
    let before = img.counters().snapshot();
    let data = Buf::alloc(4096);
    data.copy_from_slice(0, &[0x5A; 4096]);
    block_on(img.write(&SyncIo, VirtOffset(bs + 8192), data)).unwrap();
    let after = img.counters().snapshot();
    assert_eq!(after.host_zeroes - before.host_zeroes, 0, "no WRITE ZEROES");
    // One write of the block, plus one intent sector (its bit's record, journaled before the
    // write completes).
    assert_eq!(after.journal_intents - before.journal_intents, 1);
    assert_eq!(
        after.host_writes - before.host_writes,
        2,
        "one write and the intent"
    );
    assert_eq!(
        after.host_bytes_written - before.host_bytes_written,
        bs + 4096
    );
    block_on(img.close(&SyncIo)).unwrap();
    drop(img);

    let img = block_on(fvd::engine::open_image(&SyncIo, &lv.0, true)).unwrap();
    let b = Buf::alloc(bs as usize);
    block_on(img.read(&SyncIo, VirtOffset(bs), b.clone())).unwrap();
    let mut want = vec![0u8; bs as usize];
    want[8192..8192 + 4096].fill(0x5A);
    assert!(
        b.to_vec() == want,
        "block must hold zeros around the guest's bytes"
    );
}
