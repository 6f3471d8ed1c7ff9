//! The base (backing) image: a raw file/device, another FVD image, or a raw NBD export,
//! opened read-only.

use super::counters::Counters;
use super::error::{EngineError, IoContext, IoOp, Result};
use super::image::Image;
use super::storage::Storage;
use crate::io::nbd::NbdClient;
use crate::io::{Buf, Io, IoFile};
use crate::units::{PhysOffset, VirtOffset};
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};

pub enum Base<I: Io> {
    Raw {
        store: Storage<I>,
        size: u64,
    },
    Fvd(Box<Image<I>>),
    /// A raw image exported over NBD (shared storage); `io` is not used for it.
    Nbd(NbdClient),
}

impl<I: Io> Base<I> {
    pub fn size(&self) -> u64 {
        match self {
            Base::Raw { size, .. } => *size,
            Base::Fvd(img) => img.virtual_size(),
            Base::Nbd(c) => c.size(),
        }
    }

    /// The NBD connections of this base and of its own base chain.
    pub fn nbd_clients(&self) -> Vec<&NbdClient> {
        match self {
            Base::Raw { .. } => Vec::new(),
            Base::Fvd(img) => img.base().map_or_else(Vec::new, Base::nbd_clients),
            Base::Nbd(c) => vec![c],
        }
    }

    /// Reads `[off, off + buf.len())` of the base image; bytes past its end read as zeros.
    pub fn read<'a>(
        &'a self,
        io: &'a I,
        c: &'a Counters,
        off: u64,
        buf: Buf,
    ) -> Pin<Box<dyn Future<Output = Result<()>> + Send + 'a>> {
        // Boxed: an FVD base reads through Image::read, which may read its own base (a chain).
        Box::pin(async move {
            Counters::inc(&c.base_reads);
            let size = self.size();
            let len = buf.len() as u64;
            let inside = size.saturating_sub(off).min(len);
            if inside < len {
                buf.zero(inside as usize, (len - inside) as usize);
            }
            if inside == 0 {
                return Ok(());
            }
            let part = buf.slice(0, inside as usize);
            match self {
                Base::Raw { store, .. } => {
                    store.read(io, c, PhysOffset(off), part.clone()).await?;
                    check_not_shrunk(store, off, &part)
                }
                Base::Fvd(img) => img.read(io, VirtOffset(off), part).await,
                Base::Nbd(c) => c
                    .read(off, part)
                    .await
                    .ctx(IoOp::Read, "read from NBD base"),
            }
        })
    }
}

/// A raw base file or device read past its end yields zeros. If the base shrank after it was
/// opened, the zeros that `part` may hold are not its data: fail the read instead (and the
/// copy-on-read or prefetch that would keep them). A read whose last sector holds data reached
/// its end, so the size is only looked up when that sector is all zeros.
fn check_not_shrunk<I: Io>(store: &Storage<I>, off: u64, part: &Buf) -> Result<()> {
    let len = part.len();
    let mut tail = [0u8; 512];
    let n = len.min(tail.len());
    part.copy_to_slice(len - n, &mut tail[..n]);
    if tail[..n].iter().any(|&b| b != 0) {
        return Ok(());
    }
    let size = store.file.size().ctx(IoOp::Size, "size of base image")?;
    if size >= off + len as u64 {
        return Ok(());
    }
    static LOGGED: AtomicBool = AtomicBool::new(false);
    if !LOGGED.swap(true, Ordering::Relaxed) {
        tracing::error!(
            "the raw base image shrank to {size} bytes while in use; reads past its end fail \
             with EIO (further ones are not logged)"
        );
    }
    Err(EngineError::BaseShrank {
        size,
        offset: off,
        len: len as u64,
    })
}

impl<I: Io> Image<I> {
    /// Bytes of the base this image reads (see [`Image::base_end`]'s field).
    pub(super) fn base_end(&self) -> u64 {
        self.base_end.load(Ordering::Acquire)
    }

    /// Reads `[off, off + buf.len())` of the base image as this image sees it: bytes past
    /// [`Image::base_end`] read as zeros.
    pub(super) async fn read_base(&self, io: &I, off: u64, buf: Buf) -> Result<()> {
        let len = buf.len() as u64;
        let inside = self.base_end().saturating_sub(off).min(len);
        if inside < len {
            buf.zero(inside as usize, (len - inside) as usize);
        }
        match &self.base {
            Some(base) if inside > 0 => {
                base.read(io, &self.counters, off, buf.slice(0, inside as usize))
                    .await
            }
            _ => Ok(()),
        }
    }
}
