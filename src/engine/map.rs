//! Where each range of the virtual disk is stored (`fvd map`).

use super::image::Image;
use crate::io::Io;
use crate::units::BlockIndex;
use serde::Serialize;

#[derive(Copy, Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Location {
    /// In this image, at `offset` of its storage.
    Data,
    /// Read from the base image.
    Base,
    /// Reads as zeros (no base image, or past the base image's end).
    Zero,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Extent {
    pub start: u64,
    pub length: u64,
    pub location: Location,
    /// Physical offset in the image's storage (for `data`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub offset: Option<u64>,
}

impl<I: Io> Image<I> {
    /// The virtual disk as a list of extents, neighbours of the same kind merged.
    pub fn extents(&self) -> Vec<Extent> {
        let mut out: Vec<Extent> = Vec::new();
        let base_size = self.base_end();
        let size = self.virtual_size();
        for b in 0..size.div_ceil(self.geo.block_size) {
            let start = b * self.geo.block_size;
            let end = (start + self.geo.block_size).min(size);
            let mut push = |s: u64, e: u64, location, offset: Option<u64>| {
                if let Some(last) = out.last_mut() {
                    let contiguous = match (last.offset, offset) {
                        (Some(a), Some(o)) => a + last.length == o,
                        (None, None) => true,
                        _ => false,
                    };
                    if last.location == location && contiguous && last.start + last.length == s {
                        last.length += e - s;
                        return;
                    }
                }
                out.push(Extent {
                    start: s,
                    length: e - s,
                    location,
                    offset,
                });
            };
            if self.live.present(BlockIndex(b)) {
                push(start, end, Location::Data, Some(self.phys_of(start).0));
            } else if start < base_size {
                let split = end.min(base_size);
                push(start, split, Location::Base, None);
                if split < end {
                    push(split, end, Location::Zero, None);
                }
            } else {
                push(start, end, Location::Zero, None);
            }
        }
        out
    }
}
