//! I/O backends. The image engine is written once against [`Io`]; three implementations exist:
//!
//! * [`sync::SyncIo`]: plain blocking system calls, for the command-line tools.
//! * [`uring::UringIo`]: one io_uring per worker thread, completions through an eventfd, for the
//!   server.
//! * [`sim::SimIo`]: a deterministic simulated disk for tests (seeded completion order, injected
//!   errors, power loss).
//!
//! Every operation takes its buffer by value and holds it until the operation completes, so the
//! memory stays valid while the kernel (or the simulator) may touch it.

pub mod buf;
pub mod executor;
pub mod host_file;
pub mod nbd;
#[cfg(any(test, feature = "sim"))]
pub mod sim;
pub mod sync;
pub mod uring;

pub use buf::{Buf, Segment, BUF_ALIGN};
pub use host_file::HostFile;

use crate::units::PhysOffset;
use std::future::Future;
use std::io;

/// A storage object (file, block device, simulated disk) as seen by an [`Io`] backend.
pub trait IoFile: Clone + Send + Sync + 'static {
    /// Current size in bytes (a block device or file may grow while open).
    fn size(&self) -> io::Result<u64>;
    /// Offset/length alignment O_DIRECT requires (the logical block size).
    fn alignment(&self) -> u32;
    /// Alignment O_DIRECT requires of memory addresses.
    fn mem_alignment(&self) -> u32;
    /// True for block devices (size fixed until the device is grown).
    fn is_block_device(&self) -> bool;
    /// True if opened read-only.
    fn is_read_only(&self) -> bool;
    /// Extends a file to at least `len` bytes (the new part reads as zeros); durable with the
    /// next flush. Block devices are left alone.
    fn grow(&self, len: u64, how: Growth) -> io::Result<()>;
    /// Identifies the lifetime of the storage's volatile state: while it stays the same, every
    /// write that completed is still there (flushed or not), even after this process died.
    /// For host storage, the host's boot (Linux boot_id). `None` if unknown.
    fn boot_id(&self) -> Option<[u8; 16]>;
}

/// How the part a file grows by is backed.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum Growth {
    /// A hole: no space is used until written.
    Sparse,
    /// Space is reserved now where the file system can do that without writing (unwritten
    /// extents on ext4 and XFS), so later direct writes there overwrite rather than allocate:
    /// those file systems run aligned overwrites under a shared inode lock, but serialize
    /// allocating direct writes under the exclusive one. Elsewhere (tmpfs, where reserving
    /// means allocating memory) it is [`Growth::Sparse`].
    Reserved,
}

/// Asynchronous positioned I/O on [`IoFile`]s. A value of this type is one I/O channel (one
/// thread's ring); it is cheap to share by reference within that thread's tasks.
pub trait Io: Send + Sync + 'static {
    type File: IoFile;

    /// Reads exactly `buf.len()` bytes at `off` (a short read past end of file reads zeros).
    fn read(
        &self,
        file: &Self::File,
        off: PhysOffset,
        buf: Buf,
    ) -> impl Future<Output = io::Result<()>> + Send;

    /// Writes all of `buf` at `off`.
    fn write(
        &self,
        file: &Self::File,
        off: PhysOffset,
        buf: Buf,
    ) -> impl Future<Output = io::Result<()>> + Send;

    /// Makes every write completed before this call durable (fdatasync / device cache flush).
    fn flush(&self, file: &Self::File) -> impl Future<Output = io::Result<()>> + Send;

    /// Gives `[off, off + len)` back to the storage: afterwards it reads as zeros
    /// (fallocate PUNCH_HOLE on files, discard/zero-out on block devices).
    fn punch_hole(
        &self,
        file: &Self::File,
        off: PhysOffset,
        len: u64,
    ) -> impl Future<Output = io::Result<()>> + Send;
}
