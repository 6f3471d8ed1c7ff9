//! TEMPORARY stand-in for the io_uring backend (branch `uring`), with its API, so the server
//! builds before it lands: operations run synchronously on first poll. Replaced on merge.

use super::sync::{punch_hole_blocking, rw_all, SyncIo};
use super::{Buf, HostFile, Io};
use crate::units::PhysOffset;
use std::future::Future;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

pub struct UringIo {
    eventfd: OwnedFd,
}

impl UringIo {
    pub fn new(_entries: u32) -> io::Result<UringIo> {
        // SAFETY: eventfd has no memory arguments; a non-negative result is a new fd we own.
        let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` was just created and is owned by nobody else.
        let eventfd = unsafe { OwnedFd::from_raw_fd(fd) };
        Ok(UringIo { eventfd })
    }
    pub fn eventfd(&self) -> RawFd {
        self.eventfd.as_raw_fd()
    }
    pub fn submit(&self) -> io::Result<()> {
        Ok(())
    }
    pub fn reap(&self) -> usize {
        let mut c = 0u64;
        // SAFETY: reads 8 bytes into `c` from our non-blocking eventfd.
        let _ = unsafe { libc::read(self.eventfd(), (&mut c as *mut u64).cast(), 8) };
        0
    }
    pub fn kick(&self) {
        let one = 1u64;
        // SAFETY: writes 8 bytes from `one` to our eventfd.
        let _ = unsafe { libc::write(self.eventfd(), (&one as *const u64).cast(), 8) };
    }
    pub fn in_flight(&self) -> usize {
        0
    }
}

impl Io for UringIo {
    type File = HostFile;
    async fn read(&self, file: &HostFile, off: PhysOffset, buf: Buf) -> io::Result<()> {
        rw_all(file, off.0, &buf, false)
    }
    async fn write(&self, file: &HostFile, off: PhysOffset, buf: Buf) -> io::Result<()> {
        rw_all(file, off.0, &buf, true)
    }
    fn flush(&self, file: &HostFile) -> impl Future<Output = io::Result<()>> + Send {
        SyncIo.flush(file)
    }
    async fn punch_hole(&self, file: &HostFile, off: PhysOffset, len: u64) -> io::Result<()> {
        punch_hole_blocking(file, off.0, len)
    }
}
