//! A raw file or block device served as is (no FVD metadata).
//!
//! A raw image whose format was probed (no `-f raw`) is probed again when next opened, from
//! what the guest wrote into it. As QEMU's raw driver does for probed images, writes that would make it probe as FVD
//! (the magic in a header slot) are refused with EPERM: otherwise, after a restart, the guest's
//! header could name any host file as its base image and the guest would read that file.

use super::counters::Counters;
use super::disk::{has_magic, PROBE_LEN, PROBE_MAGIC_AT};
use super::error::{EngineError, IoContext, IoOp, Result};
use super::storage::Storage;
use crate::io::{Buf, Io, IoFile};
use crate::units::{PhysOffset, VirtOffset};

pub struct RawDisk<I: Io> {
    store: Storage<I>,
    size: u64,
    read_only: bool,
    /// The format was probed: refuse writes that would change what probing finds.
    probed: bool,
    counters: Counters,
}

impl<I: Io> RawDisk<I> {
    /// `probed`: the caller guessed the format (see the module documentation).
    pub fn open(file: I::File, read_only: bool, probed: bool) -> Result<Self> {
        let size = file.size().ctx(IoOp::Size, "size of raw image")? / 512 * 512;
        if !read_only && file.is_read_only() {
            return Err(EngineError::ReadOnly);
        }
        Ok(RawDisk {
            store: Storage::new(file),
            size,
            read_only,
            probed,
            counters: Counters::default(),
        })
    }

    fn check(&self, off: u64, len: u64, write: bool) -> Result<()> {
        if write && self.read_only {
            return Err(EngineError::ReadOnly);
        }
        if off % 512 != 0 || len % 512 != 0 || off.checked_add(len).is_none_or(|e| e > self.size) {
            return Err(EngineError::OutOfRange {
                offset: off,
                len,
                size: self.size,
            });
        }
        Ok(())
    }

    pub fn virtual_size(&self) -> u64 {
        self.size
    }
    pub fn read_only(&self) -> bool {
        self.read_only
    }
    /// True when the format was probed rather than named.
    pub fn probed(&self) -> bool {
        self.probed
    }
    pub fn counters(&self) -> &Counters {
        &self.counters
    }
    pub fn file(&self) -> &I::File {
        &self.store.file
    }
    pub fn alignment(&self) -> u32 {
        self.store.align.max(512) as u32
    }

    pub async fn read(&self, io: &I, off: VirtOffset, buf: Buf) -> Result<()> {
        let off = off.0;
        self.check(off, buf.len() as u64, false)?;
        Counters::inc(&self.counters.guest_reads);
        self.store.read(io, &self.counters, phys(off), buf).await
    }
    pub async fn write(&self, io: &I, off: VirtOffset, buf: Buf) -> Result<()> {
        let off = off.0;
        self.check(off, buf.len() as u64, true)?;
        Counters::inc(&self.counters.guest_writes);
        let buf = if self.probed {
            probe_safe(off, buf)?
        } else {
            buf
        };
        self.store.write(io, &self.counters, phys(off), buf).await
    }
    pub async fn flush(&self, io: &I) -> Result<()> {
        Counters::inc(&self.counters.guest_flushes);
        if self.read_only {
            return Ok(());
        }
        self.store.flush(io, &self.counters).await
    }
    pub async fn discard(&self, io: &I, off: VirtOffset, len: u64) -> Result<()> {
        let off = off.0;
        self.check(off, len, true)?;
        Counters::inc(&self.counters.guest_discards);
        self.store.punch_hole(io, phys(off), len).await
    }
    /// Punching reads back as zeros on files and block devices alike; where the storage cannot
    /// punch, zeros are written.
    pub async fn write_zeroes(
        &self,
        io: &I,
        off: VirtOffset,
        len: u64,
        _unmap: bool,
    ) -> Result<()> {
        let off = off.0;
        self.check(off, len, true)?;
        match io.punch_hole(&self.store.file, phys(off), len).await {
            Ok(()) => Ok(()),
            Err(_) => {
                let chunk = 1u64 << 20;
                let zeros = Buf::alloc(chunk.min(len) as usize);
                let mut pos = off;
                while pos < off + len {
                    let n = (off + len - pos).min(chunk);
                    self.store
                        .write(io, &self.counters, phys(pos), zeros.slice(0, n as usize))
                        .await?;
                    pos += n;
                }
                Ok(())
            }
        }
    }
}

/// A raw disk stores virtual byte `v` at byte `v` of its storage.
fn phys(v: u64) -> PhysOffset {
    PhysOffset(v)
}

/// For a probed raw image: the data to write at `off` in place of `buf`, or an error if it would
/// put the FVD magic where probing looks. Writes that reach a probed offset are copied first and
/// the copy is checked and written: `buf` is guest memory the guest can change meanwhile.
fn probe_safe(off: u64, buf: Buf) -> Result<Buf> {
    let end = off + buf.len() as u64;
    if !PROBE_MAGIC_AT.iter().any(|&at| at < end && at + 8 > off) {
        return Ok(buf);
    }
    // Requests are 512-byte aligned: a write touching a probed offset holds its whole sector,
    // so the check below sees every byte probing will see.
    let (at, len) = (off.min(PROBE_LEN), end.min(PROBE_LEN) - off.min(PROBE_LEN));
    let head = Buf::alloc(PROBE_LEN as usize);
    head.copy_from_buf(at as usize, &buf, 0, len as usize);
    if has_magic(&head) {
        return Err(EngineError::ProbedRawMagic);
    }
    let copy = Buf::alloc(buf.len());
    copy.copy_from_buf(0, &head, at as usize, len as usize);
    copy.copy_from_buf(len as usize, &buf, len as usize, buf.len() - len as usize);
    Ok(copy)
}
