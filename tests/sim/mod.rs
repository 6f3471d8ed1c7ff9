//! Support code of the randomized differential tester (tests/sim_engine.rs).

pub mod driver;
mod flush;
pub mod model;
pub mod ops;
pub mod pattern;
mod regress;
mod resize;
pub mod scenario;
