//! Creating and opening images (src/engine/image.rs) on a simulated disk. Each test kills
//! mutants that survived the other suites (docs/TESTING.md lists them).

use super::requests::Requests;
use fvd::engine::CreateParams;
use fvd::io::sim::{SimConfig, SimWorld};

const BS: u64 = 4096;

/// An image created over an older one on the same device (a reused LV) opens clean: create
/// invalidates only the first journal sector, and a random starting epoch keeps the older
/// image's later journal sectors from ever reading as this image's (one epoch ahead of the
/// header, they would be taken for a lost header).
#[test]
fn an_image_created_over_an_older_one_ignores_its_journal() {
    let world = SimWorld::new(37, SimConfig::default());
    let dev = world.create_block_device(4 << 20);
    let p = CreateParams {
        virtual_size: 16 * BS,
        block_size: BS,
        chunk_size: 4 * BS,
        journal_size: 16 * 4096,
        compact: true,
        ..Default::default()
    };
    let img = super::create_and_open(&world, &dev, p.clone());
    let mut old = Requests::new(world.clone(), dev.clone(), img);
    for i in 0..3 {
        old.write(i * BS, BS, i as u8 + 1);
        old.now("flush", super::requests::flush());
    }
    drop(old);

    let img = super::create_and_open(&world, &dev, p);
    let new = Requests::new(world.clone(), dev.clone(), img);
    assert!(new.read(0, 4 * BS) == vec![0u8; 4 * BS as usize]);
    super::assert_not_corrupt(&world, &dev, "the new image");
}
