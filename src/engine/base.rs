//! The base (backing) image: a raw file/device or another FVD image, opened read-only.

use super::counters::Counters;
use super::error::Result;
use super::image::Image;
use super::storage::Storage;
use crate::io::{Buf, Io};
use std::future::Future;
use std::pin::Pin;

pub enum Base<I: Io> {
    Raw { store: Storage<I>, size: u64 },
    Fvd(Box<Image<I>>),
}

impl<I: Io> Base<I> {
    pub fn size(&self) -> u64 {
        match self {
            Base::Raw { size, .. } => *size,
            Base::Fvd(img) => img.virtual_size(),
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
            }
        })
    }
}
