//! The base (backing) image: a raw file/device, another FVD image, or a raw NBD export,
//! opened read-only.

use super::counters::Counters;
use super::error::{IoContext, Result};
use super::image::Image;
use super::storage::Storage;
use crate::io::nbd::NbdClient;
use crate::io::{Buf, Io};
use std::future::Future;
use std::pin::Pin;

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
                Base::Raw { store, .. } => store.read(io, c, off, part).await,
                Base::Fvd(img) => img.read(io, off, part).await,
                Base::Nbd(c) => c.read(off, part).await.ctx("read from NBD base"),
            }
        })
    }
}
