//! Where each range of the virtual disk is stored (`fvd map`).

use super::image::Image;
use super::mapping::Source;
use crate::io::Io;
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
        let mut push = |start: u64, end: u64, location, offset: Option<u64>| {
            if start == end {
                return;
            }
            if let Some(last) = out.last_mut() {
                let contiguous = match (last.offset, offset) {
                    (Some(a), Some(o)) => a + last.length == o,
                    (None, None) => true,
                    _ => false,
                };
                if last.location == location && contiguous {
                    last.length += end - start;
                    return;
                }
            }
            out.push(Extent {
                start,
                length: end - start,
                location,
                offset,
            });
        };
        let base_end = self.base_end();
        let size = self.virtual_size();
        for m in self.live.map(0, size, self.base.is_some()) {
            let end = m.off + m.len;
            match m.source {
                Source::Here(p) => push(m.off, end, Location::Data, Some(p.0)),
                // Past the base image's end, reads give zeros.
                Source::Base => {
                    let split = end.min(base_end).max(m.off);
                    push(m.off, split, Location::Base, None);
                    push(split, end, Location::Zero, None);
                }
                Source::Zero => push(m.off, end, Location::Zero, None),
            }
        }
        out
    }
}
