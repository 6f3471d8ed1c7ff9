//! Support code of the randomized differential tester (tests/sim_engine.rs).

mod discard;
pub mod driver;
mod fill;
mod flush;
mod growth;
mod image;
pub mod model;
pub mod ops;
pub mod pattern;
mod regress;
mod requests;
mod resize;
pub mod scenario;
mod space;
mod write;

/// What `fvd check` reports on the image `file` as the simulated disk holds it now.
pub fn check(
    world: &std::sync::Arc<fvd::io::sim::SimWorld>,
    file: &fvd::io::sim::SimFile,
) -> fvd::engine::check::CheckReport {
    let (io, f) = (world.io(), file.clone());
    world
        .block_on(async move { fvd::engine::check::check(&io, f).await })
        .unwrap()
}

/// Asserts that `fvd check` finds no corruption in the image `file` as the simulated disk holds
/// it now (after a crash: what the next open would find).
pub fn assert_not_corrupt(
    world: &std::sync::Arc<fvd::io::sim::SimWorld>,
    file: &fvd::io::sim::SimFile,
    what: &str,
) {
    let report = check(world, file);
    assert!(
        !report.corrupt(),
        "{what}: check finds {:?}",
        report.problems
    );
}

/// Creates an image with `p` on `file` and opens it (no base image).
pub fn create_and_open(
    world: &std::sync::Arc<fvd::io::sim::SimWorld>,
    file: &fvd::io::sim::SimFile,
    p: fvd::engine::CreateParams,
) -> std::sync::Arc<fvd::engine::Image<fvd::io::sim::SimIo>> {
    let (io, f) = (world.io(), file.clone());
    world
        .block_on(async move { fvd::engine::Image::create(&io, f, &p).await })
        .unwrap();
    let (io, f) = (world.io(), file.clone());
    std::sync::Arc::new(
        world
            .block_on(async move { fvd::engine::Image::open(&io, f, None, false).await })
            .unwrap(),
    )
}
