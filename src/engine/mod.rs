//! The FVD image engine, written once against the [`crate::io::Io`] trait.
//!
//! * F1: a bitmap says, per block, whether its data is in this image ([`metadata`]).
//! * F2: a table maps virtual chunks to physical chunks in compact images ([`allocator`]).
//! * F3: a journal records bitmap/table changes at FLUSH ([`flush`]).
//! * Base images: raw or FVD, read-only ([`base`]).

pub mod allocator;
pub mod base;
pub mod block_locks;
pub mod check;
mod cor;
pub mod counters;
pub mod discard;
pub mod disk;
pub mod error;
pub mod fill;
pub mod flush;
pub mod image;
mod journal;
pub mod lock_order;
pub mod map;
pub mod mapping;
pub mod metadata;
pub mod prefetch;
mod problem;
pub mod raw;
pub mod read;
mod replay;
pub mod resize;
pub mod space;
pub mod storage;
pub mod write;

pub use base::Base;
pub use counters::{CounterSnapshot, Counters};
pub use disk::{
    create_image, open_disk, open_disk_waiting, open_disk_with, open_image, open_image_with, probe,
    repair_image, resolve_base, Disk, Format,
};
pub use error::{Corruption, EngineError, InvalidParams, IoOp, NoSpace, ResizeRefused, Result};
pub use image::{CreateParams, Image};
pub use raw::RawDisk;
