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

/// How a first write zeroes the rest of its block (`fvd serve --zero-ranges`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum ZeroRanges {
    /// Without writing on files (a hole), by writing zeros on block devices: there a WRITE
    /// ZEROES beside the data write made allocating writes 3.5x slower on a loop-device LV than
    /// writing the block whole with zeros merged in, and halved later sequential reads of it
    /// (docs/PERFORMANCE.md, "Logical volumes").
    #[default]
    Auto,
    /// fallocate(PUNCH_HOLE) on files and block devices alike (devices whose WRITE ZEROES is
    /// cheap).
    Punch,
    /// Zeros merged into the block's one write, on files too.
    Write,
}

impl ZeroRanges {
    fn by_punch(self, block_device: bool) -> bool {
        match self {
            ZeroRanges::Auto => !block_device,
            ZeroRanges::Punch => true,
            ZeroRanges::Write => false,
        }
    }
}

impl<I: Io> Storage<I> {
    pub fn new(file: I::File) -> Self {
        let align = file.alignment().max(1) as u64;
        let mem_align = file.mem_alignment().max(1) as usize;
        let zero_by_punch = ZeroRanges::Auto.by_punch(file.is_block_device());
        Storage {
            file,
            align,
            mem_align,
            zero_by_punch: AtomicBool::new(zero_by_punch),
        }
    }

    fn aligned(&self, off: PhysOffset, len: u64) -> bool {
        off.0 % self.align == 0 && len % self.align == 0
    }

    /// Reads `buf.len()` bytes at `off`.
    pub async fn read(&self, io: &I, c: &Counters, off: PhysOffset, buf: Buf) -> Result<()> {
        Counters::inc(&c.host_reads);
        Counters::add(&c.host_bytes_read, buf.len() as u64);
        let len = buf.len() as u64;
        if self.aligned(off, len) && buf.is_aligned(self.mem_align) {
            return io
                .read(&self.file, off, buf)
                .await
                .ctx(IoOp::Read, "read from image storage");
        }
        Counters::inc(&c.bounced);
        let (start, bounce) = self.read_around(io, off, len).await?;
        buf.copy_from_buf(0, &bounce, off.since(start) as usize, len as usize);
        Ok(())
    }

    /// Reads the aligned range covering `[off, off + len)` into a fresh buffer.
    async fn read_around(&self, io: &I, off: PhysOffset, len: u64) -> Result<(PhysOffset, Buf)> {
        let start = PhysOffset(off.0 / self.align * self.align);
        let end = PhysOffset((off + len).0.div_ceil(self.align) * self.align);
        let bounce = Buf::alloc(end.since(start) as usize);
        io.read(&self.file, start, bounce.clone())
            .await
            .ctx(IoOp::Read, "read from image storage")?;
        Ok((start, bounce))
    }

    /// Writes `buf` at `off`. An offset or length not aligned to the storage's logical block is
    /// done as read-modify-write of the surrounding blocks: the caller must hold the block lock.
    pub async fn write(&self, io: &I, c: &Counters, off: PhysOffset, buf: Buf) -> Result<()> {
        Counters::inc(&c.host_writes);
        Counters::add(&c.host_bytes_written, buf.len() as u64);
        let len = buf.len() as u64;
        if self.aligned(off, len) {
            if buf.is_aligned(self.mem_align) {
                return io
                    .write(&self.file, off, buf)
                    .await
                    .ctx(IoOp::Write, "write to image storage");
            }
            Counters::inc(&c.bounced);
            let bounce = Buf::alloc(len as usize);
            bounce.copy_from_buf(0, &buf, 0, len as usize);
            return io
                .write(&self.file, off, bounce)
                .await
                .ctx(IoOp::Write, "write to image storage");
        }
        Counters::inc(&c.bounced);
        let (start, bounce) = self.read_around(io, off, len).await?;
        bounce.copy_from_buf(off.since(start) as usize, &buf, 0, len as usize);
        io.write(&self.file, start, bounce)
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

    /// Chooses how ranges are zeroed from now on; storage found unable to zero without writing
    /// is asked again.
    pub fn set_zero_ranges(&self, how: ZeroRanges) {
        let punch = how.by_punch(self.file.is_block_device());
        self.zero_by_punch.store(punch, Ordering::Relaxed);
    }

    /// True while [`Storage::write_zeroes`] can still zero without writing.
    pub fn zeroes_cheaply(&self) -> bool {
        self.zero_by_punch.load(Ordering::Relaxed)
    }

    /// Makes `[off, off + len)` read as zeros. Tries fallocate(PUNCH_HOLE): a hole in a file, or
    /// WRITE ZEROES on a block device (the kernel never falls back to writing there). Storage
    /// that cannot do that gets zeros written, and is not asked again. Durable after the next
    /// flush like a write (fdatasync covers extent changes).
    pub async fn write_zeroes(
        &self,
        io: &I,
        c: &Counters,
        off: PhysOffset,
        len: u64,
    ) -> Result<()> {
        let za = self.zero_align();
        if self.zeroes_cheaply() && off.0 % za == 0 && len % za == 0 {
            Counters::inc(&c.host_zeroes);
            match io.punch_hole(&self.file, off, len).await {
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
    pub async fn punch_hole(&self, io: &I, off: PhysOffset, len: u64) -> Result<()> {
        match io.punch_hole(&self.file, off, len).await {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::io::sim::{SimConfig, SimIo, SimWorld};

    #[test]
    fn zero_ranges_choose_punch_or_write_per_storage_kind() {
        let world = SimWorld::new(1, SimConfig::default());
        let file = Storage::<SimIo>::new(world.create_disk(1 << 20, 512));
        let device = Storage::<SimIo>::new(world.create_block_device(1 << 20));
        // The default: holes on files, zeros written on block devices.
        assert!(file.zeroes_cheaply());
        assert!(!device.zeroes_cheaply());
        for (how, on_file, on_device) in [
            (ZeroRanges::Write, false, false),
            (ZeroRanges::Punch, true, true),
            (ZeroRanges::Auto, true, false),
        ] {
            file.set_zero_ranges(how);
            device.set_zero_ranges(how);
            assert_eq!(file.zeroes_cheaply(), on_file, "{how:?} on a file");
            assert_eq!(device.zeroes_cheaply(), on_device, "{how:?} on a device");
        }
    }
}
