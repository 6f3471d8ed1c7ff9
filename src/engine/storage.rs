//! The image's storage as the engine uses it: positioned I/O at any 512-byte alignment, bounced
//! only when O_DIRECT requires it, with every host operation counted.

use super::counters::Counters;
use super::error::{IoContext, IoOp, Result};
use crate::io::{Buf, Io, IoFile};
use crate::units::PhysOffset;
use std::sync::atomic::{AtomicBool, Ordering};

pub struct Storage<I: Io> {
    pub file: I::File,
    /// O_DIRECT offset/length alignment.
    pub align: u64,
    mem_align: usize,
    /// False once the storage refused to zero a range without writing it.
    zero_by_punch: AtomicBool,
}

/// Whether first writes zero the rest of their block without writing it. On files a hole is
/// cheap. On a block device it is a WRITE ZEROES request beside the data write: on a loop-device
/// LV that made allocating writes 3.5x slower than writing the block whole with zeros merged in,
/// and halved later sequential reads of it (docs/PERFORMANCE.md, "Logical volumes").
/// FVD_ZERO_BY_WRITING=1 / FVD_ZERO_BY_PUNCH=1 force either way (measurements, devices whose
/// WRITE ZEROES is cheap).
fn zero_by_punch(block_device: bool) -> bool {
    if std::env::var_os("FVD_ZERO_BY_WRITING").is_some() {
        false
    } else if std::env::var_os("FVD_ZERO_BY_PUNCH").is_some() {
        true
    } else {
        !block_device
    }
}

impl<I: Io> Storage<I> {
    pub fn new(file: I::File) -> Self {
        let align = file.alignment().max(1) as u64;
        let mem_align = file.mem_alignment().max(1) as usize;
        let zero_by_punch = zero_by_punch(file.is_block_device());
        Storage {
            file,
            align,
            mem_align,
            zero_by_punch: AtomicBool::new(zero_by_punch),
        }
    }

    fn aligned(&self, off: u64, len: u64) -> bool {
        off % self.align == 0 && len % self.align == 0
    }

    /// Reads `buf.len()` bytes at `off`.
    pub async fn read(&self, io: &I, c: &Counters, off: u64, buf: Buf) -> Result<()> {
        Counters::inc(&c.host_reads);
        Counters::add(&c.host_bytes_read, buf.len() as u64);
        let len = buf.len() as u64;
        if self.aligned(off, len) && buf.is_aligned(self.mem_align) {
            return io
                .read(&self.file, PhysOffset(off), buf)
                .await
                .ctx(IoOp::Read, "read from image storage");
        }
        Counters::inc(&c.bounced);
        let (start, bounce) = self.read_around(io, off, len).await?;
        buf.copy_from_buf(0, &bounce, (off - start) as usize, len as usize);
        Ok(())
    }

    /// Reads the aligned range covering `[off, off + len)` into a fresh buffer.
    async fn read_around(&self, io: &I, off: u64, len: u64) -> Result<(u64, Buf)> {
        let start = off / self.align * self.align;
        let end = (off + len).div_ceil(self.align) * self.align;
        let bounce = Buf::alloc((end - start) as usize);
        io.read(&self.file, PhysOffset(start), bounce.clone())
            .await
            .ctx(IoOp::Read, "read from image storage")?;
        Ok((start, bounce))
    }

    /// Writes `buf` at `off`. An offset or length not aligned to the storage's logical block is
    /// done as read-modify-write of the surrounding blocks: the caller must hold the block lock.
    pub async fn write(&self, io: &I, c: &Counters, off: u64, buf: Buf) -> Result<()> {
        Counters::inc(&c.host_writes);
        Counters::add(&c.host_bytes_written, buf.len() as u64);
        let len = buf.len() as u64;
        if self.aligned(off, len) {
            if buf.is_aligned(self.mem_align) {
                return io
                    .write(&self.file, PhysOffset(off), buf)
                    .await
                    .ctx(IoOp::Write, "write to image storage");
            }
            Counters::inc(&c.bounced);
            let bounce = Buf::alloc(len as usize);
            bounce.copy_from_buf(0, &buf, 0, len as usize);
            return io
                .write(&self.file, PhysOffset(off), bounce)
                .await
                .ctx(IoOp::Write, "write to image storage");
        }
        Counters::inc(&c.bounced);
        let (start, bounce) = self.read_around(io, off, len).await?;
        bounce.copy_from_buf((off - start) as usize, &buf, 0, len as usize);
        io.write(&self.file, PhysOffset(start), bounce)
            .await
            .ctx(IoOp::Write, "write to image storage")
    }

    pub async fn flush(&self, io: &I, c: &Counters) -> Result<()> {
        Counters::inc(&c.host_flushes);
        io.flush(&self.file)
            .await
            .ctx(IoOp::Flush, "flush image storage")
    }

    /// Granularity of [`Storage::write_zeroes`] ranges that can be zeroed without writing: a
    /// page, so a file system never has to zero part of one of its blocks through the page cache.
    pub fn zero_align(&self) -> u64 {
        self.align.max(4096)
    }

    /// True while [`Storage::write_zeroes`] can still zero without writing.
    pub fn zeroes_cheaply(&self) -> bool {
        self.zero_by_punch.load(Ordering::Relaxed)
    }

    /// Makes `[off, off + len)` read as zeros. Tries fallocate(PUNCH_HOLE): a hole in a file, or
    /// WRITE ZEROES on a block device (the kernel never falls back to writing there). Storage
    /// that cannot do that gets zeros written, and is not asked again. Durable after the next
    /// flush like a write (fdatasync covers extent changes).
    pub async fn write_zeroes(&self, io: &I, c: &Counters, off: u64, len: u64) -> Result<()> {
        let za = self.zero_align();
        if self.zeroes_cheaply() && off % za == 0 && len % za == 0 {
            Counters::inc(&c.host_zeroes);
            match io.punch_hole(&self.file, PhysOffset(off), len).await {
                Err(e)
                    if matches!(
                        e.raw_os_error(),
                        Some(libc::EOPNOTSUPP) | Some(libc::ENOTTY) | Some(libc::EINVAL)
                    ) =>
                {
                    tracing::info!(
                        "storage cannot zero ranges without writing ({e}); writing zeros instead"
                    );
                    self.zero_by_punch.store(false, Ordering::Relaxed);
                }
                r => return r.ctx(IoOp::Zero, "zero a range of image storage"),
            }
        }
        self.write(io, c, off, Buf::alloc(len as usize)).await
    }

    /// Returns space to the storage; unsupported storage is not an error (space simply stays used).
    pub async fn punch_hole(&self, io: &I, off: u64, len: u64) -> Result<()> {
        match io.punch_hole(&self.file, PhysOffset(off), len).await {
            Err(e)
                if matches!(
                    e.raw_os_error(),
                    Some(libc::EOPNOTSUPP) | Some(libc::ENOTTY)
                ) =>
            {
                Ok(())
            }
            r => r.ctx(IoOp::Punch, "punch hole in image storage"),
        }
    }
}
