//! Support code of the randomized differential tester (tests/sim_engine.rs).

pub mod driver;
mod flush;
pub mod model;
pub mod ops;
pub mod pattern;
mod regress;
mod resize;
pub mod scenario;
mod space;

/// Asserts that `fvd check` finds no corruption in the image `file` as the simulated disk holds
/// it now (after a crash: what the next open would find).
pub fn assert_not_corrupt(
    world: &std::sync::Arc<fvd::io::sim::SimWorld>,
    file: &fvd::io::sim::SimFile,
    what: &str,
) {
    let (io, f) = (world.io(), file.clone());
    let report = world
        .block_on(async move { fvd::engine::check::check(&io, f).await })
        .unwrap();
    assert!(
        !report.corrupt(),
        "{what}: check finds {:?}",
        report.problems
    );
}
