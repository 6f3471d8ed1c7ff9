//! Blocking I/O with plain system calls, for the command-line tools. Futures complete on first poll.

use super::{Buf, HostFile, Io, IoFile};
use crate::units::PhysOffset;
use std::io;

/// Synchronous backend over [`HostFile`]s.
#[derive(Default, Debug, Clone, Copy)]
pub struct SyncIo;

impl Io for SyncIo {
    type File = HostFile;

    async fn read(&self, file: &HostFile, off: PhysOffset, buf: Buf) -> io::Result<()> {
        rw_all(file, off.0, &buf, false)
    }

    async fn write(&self, file: &HostFile, off: PhysOffset, buf: Buf) -> io::Result<()> {
        rw_all(file, off.0, &buf, true)
    }

    async fn flush(&self, file: &HostFile) -> io::Result<()> {
        // SAFETY: fdatasync on a file descriptor we own.
        let r = unsafe { libc::fdatasync(file.fd()) };
        if r != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    async fn punch_hole(&self, file: &HostFile, off: PhysOffset, len: u64) -> io::Result<()> {
        punch_hole_blocking(file, off.0, len)
    }
}

/// fallocate(PUNCH_HOLE | KEEP_SIZE): frees file space, or discards/zeroes a block device range.
pub fn punch_hole_blocking(file: &HostFile, off: u64, len: u64) -> io::Result<()> {
    // SAFETY: fallocate on an fd we own with plain integer arguments.
    let r = unsafe {
        libc::fallocate(
            file.fd(),
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            off as libc::off_t,
            len as libc::off_t,
        )
    };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// preadv/pwritev until the whole buffer is transferred. Reads past end of file yield zeros.
pub fn rw_all(file: &HostFile, mut off: u64, buf: &Buf, write: bool) -> io::Result<()> {
    let mut done = 0usize;
    while done < buf.len() {
        let rest = buf.slice(done, buf.len() - done);
        let iov = rest.iovecs();
        let n = iov.len().min(libc::UIO_MAXIOV as usize) as libc::c_int;
        // SAFETY: the iovecs describe memory kept alive by `buf` for the duration of the call.
        let r = unsafe {
            if write {
                libc::pwritev(file.fd(), iov.as_ptr(), n, off as libc::off_t)
            } else {
                libc::preadv(file.fd(), iov.as_ptr(), n, off as libc::off_t)
            }
        };
        if r < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        if r == 0 {
            if write {
                return Err(io::Error::new(io::ErrorKind::WriteZero, "write returned 0"));
            }
            // End of file: the rest reads as zeros.
            rest.zero(0, rest.len());
            return Ok(());
        }
        done += r as usize;
        off += r as u64;
        if !write && done < buf.len() && file.size().is_ok_and(|s| s <= off) {
            // End of file after a short read: the rest reads as zeros. Checking the size first
            // avoids an O_DIRECT read at an unaligned offset past EOF (EINVAL on some file
            // systems), as the io_uring backend does.
            let rest = buf.slice(done, buf.len() - done);
            rest.zero(0, rest.len());
            return Ok(());
        }
    }
    Ok(())
}
