//! FVD: a vhost-user-blk backend serving Fast Virtual Disk images.
//!
//! Rooms, each depending only on those listed before it:
//! * [`units`]: offset/index newtypes.
//! * [`format`]: the on-disk format (pure encode/decode).
//! * [`io`]: the asynchronous I/O trait and its backends (sync, io_uring, simulated disk).
//! * [`engine`]: the image engine (F1 bitmap, F2 table, F3 journal, base images).
//! * [`server`]: the vhost-user-blk server.
//! * [`cli`]: the `fvd` command-line tool.

pub mod cli;
pub mod engine;
pub mod format;
pub mod io;
pub mod server;
pub mod units;
