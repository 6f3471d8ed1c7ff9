//! virtio-blk requests: parsing and validating a descriptor chain into an [`Op`] on host memory.
//!
//! Transport-independent: the input is the chain's descriptors and the guest memory map, the
//! output either a [`Request`] whose data segments are host addresses inside that map, or a
//! [`Rejected`] saying which status to report and where. Nothing outside the chain's descriptors
//! is ever read or written, and no guest input can make this panic.
//!
//! The chain is treated as a byte stream (virtio 1.x "any layout"): the device-readable bytes
//! are the 16-byte header followed by any out-data, the device-writable bytes are any in-data
//! followed by the status byte.

use crate::io::buf::{window, Piece};
use crate::io::Segment;
use crate::units::VirtOffset;
use smallvec::SmallVec;
use std::sync::atomic::{AtomicBool, Ordering};
use virtio_bindings::virtio_blk::*;
use virtio_queue::desc::split::Descriptor;
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryBackend};

pub const SECTOR: u64 = 512;
const HEADER_LEN: u64 = 16;
const DISCARD_SEG_LEN: u64 = 16;
/// Bytes of the GET_ID answer.
pub const ID_LEN: usize = VIRTIO_BLK_ID_BYTES as usize;

pub const STATUS_OK: u8 = VIRTIO_BLK_S_OK as u8;
pub const STATUS_IOERR: u8 = VIRTIO_BLK_S_IOERR as u8;
pub const STATUS_UNSUPP: u8 = VIRTIO_BLK_S_UNSUPP as u8;

/// What requests are checked against (derived from the device configuration).
#[derive(Clone, Debug)]
pub struct Limits {
    /// Disk size in bytes, a multiple of 512.
    pub capacity: u64,
    pub read_only: bool,
    pub seg_max: u32,
    pub size_max: u32,
    /// DISCARD and WRITE_ZEROES are offered.
    pub discard: bool,
    /// Per range, for both discard and write-zeroes.
    pub max_discard_sectors: u32,
    /// Ranges per request, for both discard and write-zeroes.
    pub max_discard_seg: u32,
}

/// Host memory segments of a request's data, inside the guest memory snapshot it was parsed with.
pub type Segs = SmallVec<[Segment; 4]>;

/// A byte range of the virtual disk for discard / write-zeroes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Range {
    pub offset: VirtOffset,
    pub len: u64,
    /// Write-zeroes only: the guest allows deallocating the range.
    pub unmap: bool,
}

/// A validated request.
#[derive(Debug)]
pub enum Op {
    Read {
        offset: VirtOffset,
        data: Segs,
    },
    Write {
        offset: VirtOffset,
        data: Segs,
    },
    Flush,
    /// `data` is at most [`ID_LEN`] bytes of the guest's buffer.
    GetId {
        data: Segs,
    },
    Discard {
        ranges: SmallVec<[Range; 1]>,
    },
    WriteZeroes {
        ranges: SmallVec<[Range; 1]>,
    },
}

#[derive(Debug)]
pub struct Request {
    pub op: Op,
    /// Guest address of the status byte (checked to be inside guest memory).
    pub status: GuestAddress,
}

impl Request {
    /// Bytes the device wrote into the chain on success (reported in the used ring).
    pub fn written_len(&self) -> u32 {
        let data = match &self.op {
            Op::Read { data, .. } | Op::GetId { data } => data.iter().map(|s| s.len).sum(),
            _ => 0,
        };
        u32::try_from(data + 1).unwrap_or(u32::MAX)
    }
}

/// Why a chain was rejected. Each kind is logged once per process (guests can repeat bad
/// requests at line rate).
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum Bad {
    /// No device-writable byte for the status: the chain is returned with length 0.
    NoStatus,
    /// The status byte lies outside guest memory: returned with length 0.
    StatusOutsideMemory,
    /// A device-readable descriptor after a device-writable one.
    Misordered,
    /// Fewer than 16 readable bytes for the header.
    ShortHeader,
    /// A descriptor points outside guest memory.
    OutsideMemory,
    /// Data buffers in the wrong direction for the request type (or missing).
    WrongDirection,
    /// The sector range ends past the end of the disk (or overflows).
    PastEnd,
    /// Data length not a multiple of 512.
    BadLength,
    /// More data descriptors than `seg_max`.
    TooManySegments,
    /// A data descriptor larger than `size_max`.
    SegmentTooLarge,
    /// A write-type request on a read-only device.
    ReadOnly,
    /// Unknown or not offered request type.
    Unsupported,
    /// Discard / write-zeroes range with unknown or disallowed flags.
    DiscardFlags,
    /// Discard / write-zeroes payload malformed, too many ranges, or a range too large.
    BadDiscard,
}

pub const BAD_KINDS: usize = Bad::BadDiscard as usize + 1;

/// Every kind, in discriminant order.
const ALL_BAD: [Bad; BAD_KINDS] = [
    Bad::NoStatus,
    Bad::StatusOutsideMemory,
    Bad::Misordered,
    Bad::ShortHeader,
    Bad::OutsideMemory,
    Bad::WrongDirection,
    Bad::PastEnd,
    Bad::BadLength,
    Bad::TooManySegments,
    Bad::SegmentTooLarge,
    Bad::ReadOnly,
    Bad::Unsupported,
    Bad::DiscardFlags,
    Bad::BadDiscard,
];

/// Which kinds of bad request were logged already (per connection: see `worker::ConnLog`).
pub struct BadLog([AtomicBool; BAD_KINDS]);

impl Default for BadLog {
    fn default() -> Self {
        BadLog([const { AtomicBool::new(false) }; BAD_KINDS])
    }
}

impl Bad {
    /// The status byte the guest gets.
    pub fn status(self) -> u8 {
        match self {
            Bad::Unsupported | Bad::DiscardFlags => STATUS_UNSUPP,
            _ => STATUS_IOERR,
        }
    }

    /// The kind whose discriminant is `i`.
    pub fn from_index(i: usize) -> Option<Bad> {
        ALL_BAD.get(i).copied()
    }

    /// A short name for statistics (the `reason` label of the metrics).
    pub fn name(self) -> &'static str {
        match self {
            Bad::NoStatus => "no_status",
            Bad::StatusOutsideMemory => "status_outside_memory",
            Bad::Misordered => "misordered",
            Bad::ShortHeader => "short_header",
            Bad::OutsideMemory => "outside_memory",
            Bad::WrongDirection => "wrong_direction",
            Bad::PastEnd => "past_end",
            Bad::BadLength => "bad_length",
            Bad::TooManySegments => "too_many_segments",
            Bad::SegmentTooLarge => "segment_too_large",
            Bad::ReadOnly => "read_only",
            Bad::Unsupported => "unsupported",
            Bad::DiscardFlags => "discard_flags",
            Bad::BadDiscard => "bad_discard",
        }
    }

    pub fn describe(self) -> &'static str {
        match self {
            Bad::NoStatus => "no writable status byte",
            Bad::StatusOutsideMemory => "status byte outside guest memory",
            Bad::Misordered => "readable descriptor after writable one",
            Bad::ShortHeader => "request header shorter than 16 bytes",
            Bad::OutsideMemory => "descriptor outside guest memory",
            Bad::WrongDirection => "data buffer in the wrong direction",
            Bad::PastEnd => "sector range past the end of the disk",
            Bad::BadLength => "data length not a multiple of 512",
            Bad::TooManySegments => "more data segments than seg_max",
            Bad::SegmentTooLarge => "data segment larger than size_max",
            Bad::ReadOnly => "write to a read-only disk",
            Bad::Unsupported => "unsupported request type",
            Bad::DiscardFlags => "discard/write-zeroes range with bad flags",
            Bad::BadDiscard => "malformed discard/write-zeroes ranges",
        }
    }

    /// Logs this kind of bad request the first time `log` sees it; later ones only at trace
    /// level. Returns whether it was logged at warning level.
    pub fn log_once(self, log: &BadLog, detail: &dyn std::fmt::Display) -> bool {
        let first = !log.0[self as usize].swap(true, Ordering::Relaxed);
        if first {
            tracing::warn!(
                "bad guest request: {} ({detail}); further ones of this kind are not logged",
                self.describe()
            );
        } else {
            tracing::trace!("bad guest request: {} ({detail})", self.describe());
        }
        first
    }
}

/// A chain that cannot be executed.
#[derive(Debug, PartialEq, Eq)]
pub struct Rejected {
    pub reason: Bad,
    /// Where to write `reason.status()`; `None` if no status byte can be written.
    pub status: Option<GuestAddress>,
    /// The request type from the header, if it was readable (for logging).
    pub req_type: Option<u32>,
}

/// A piece of the chain in guest-physical addresses.
#[derive(Copy, Clone, Debug)]
struct GSeg {
    addr: u64,
    len: u64,
}

impl Piece for GSeg {
    fn size(&self) -> u64 {
        self.len
    }

    fn sub(&self, skip: u64, len: u64) -> Self {
        // Wrapping: a bogus address just fails the guest memory lookup later.
        GSeg {
            addr: self.addr.wrapping_add(skip),
            len,
        }
    }
}

type GSegs = SmallVec<[GSeg; 8]>;

/// Parses and validates one descriptor chain.
pub fn parse<M: GuestMemoryBackend>(
    descs: impl IntoIterator<Item = Descriptor>,
    mem: &M,
    lim: &Limits,
) -> Result<Request, Rejected> {
    let mut readable = GSegs::new();
    let mut writable = GSegs::new();
    let mut misordered = false;
    for d in descs {
        if d.len() == 0 {
            continue;
        }
        let s = GSeg {
            addr: d.addr().0,
            len: u64::from(d.len()),
        };
        if d.is_write_only() {
            writable.push(s);
        } else {
            misordered |= !writable.is_empty();
            readable.push(s);
        }
    }

    // The status byte is the last writable byte of the chain.
    let reject_early = |reason| Rejected {
        reason,
        status: None,
        req_type: None,
    };
    let Some(last) = writable.last_mut() else {
        return Err(reject_early(Bad::NoStatus));
    };
    let status = match last.addr.checked_add(last.len - 1) {
        Some(a) if GuestMemoryBackend::check_range(mem, GuestAddress(a), 1) => GuestAddress(a),
        _ => return Err(reject_early(Bad::StatusOutsideMemory)),
    };
    last.len -= 1;
    if last.len == 0 {
        writable.pop();
    }
    let reject = |reason, req_type| Rejected {
        reason,
        status: Some(status),
        req_type,
    };
    if misordered {
        return Err(reject(Bad::Misordered, None));
    }
    let rlen: u64 = readable.iter().map(|s| s.len).sum();
    if rlen < HEADER_LEN {
        return Err(reject(Bad::ShortHeader, None));
    }
    let mut hdr = [0u8; HEADER_LEN as usize];
    if read_stream(mem, &readable, 0, &mut hdr).is_err() {
        return Err(reject(Bad::OutsideMemory, None));
    }
    let ty = u32::from_le_bytes(hdr[0..4].try_into().expect("4 bytes"));
    let sector = u64::from_le_bytes(hdr[8..16].try_into().expect("8 bytes"));
    let chain = Chain {
        readable,
        writable,
        rlen,
    };
    let op = parse_op(ty, sector, &chain, mem, lim).map_err(|b| reject(b, Some(ty)))?;
    Ok(Request { op, status })
}

/// The chain without its status byte.
struct Chain {
    readable: GSegs,
    writable: GSegs,
    rlen: u64,
}

fn parse_op<M: GuestMemoryBackend>(
    ty: u32,
    sector: u64,
    c: &Chain,
    mem: &M,
    lim: &Limits,
) -> Result<Op, Bad> {
    let wlen: u64 = c.writable.iter().map(|s| s.len).sum();
    let rlen = c.rlen;
    Ok(match ty {
        VIRTIO_BLK_T_IN => {
            if rlen != HEADER_LEN {
                return Err(Bad::WrongDirection);
            }
            let offset = check_range(sector, wlen, lim)?;
            Op::Read {
                offset,
                data: host_segs(mem, &c.writable, 0, wlen, Some(lim))?,
            }
        }
        VIRTIO_BLK_T_OUT => {
            if lim.read_only {
                return Err(Bad::ReadOnly);
            }
            if wlen != 0 {
                return Err(Bad::WrongDirection);
            }
            let len = rlen - HEADER_LEN;
            let offset = check_range(sector, len, lim)?;
            Op::Write {
                offset,
                data: host_segs(mem, &c.readable, HEADER_LEN, len, Some(lim))?,
            }
        }
        // Any data buffers of a flush are meaningless and ignored.
        VIRTIO_BLK_T_FLUSH => Op::Flush,
        VIRTIO_BLK_T_GET_ID => {
            if rlen != HEADER_LEN || wlen == 0 {
                return Err(Bad::WrongDirection);
            }
            let len = wlen.min(ID_LEN as u64);
            Op::GetId {
                data: host_segs(mem, &c.writable, 0, len, None)?,
            }
        }
        VIRTIO_BLK_T_DISCARD | VIRTIO_BLK_T_WRITE_ZEROES if lim.discard => {
            if wlen != 0 {
                return Err(Bad::WrongDirection);
            }
            let discard = ty == VIRTIO_BLK_T_DISCARD;
            let ranges = parse_ranges(mem, &c.readable, rlen, discard, lim)?;
            if discard {
                Op::Discard { ranges }
            } else {
                Op::WriteZeroes { ranges }
            }
        }
        // Writes of any kind to a read-only disk fail as I/O errors, like QEMU does.
        VIRTIO_BLK_T_DISCARD | VIRTIO_BLK_T_WRITE_ZEROES if lim.read_only => {
            return Err(Bad::ReadOnly)
        }
        _ => return Err(Bad::Unsupported),
    })
}

/// Byte offset of `sector`, if `[sector * 512, + len)` lies inside the disk and `len` is whole
/// sectors.
fn check_range(sector: u64, len: u64, lim: &Limits) -> Result<VirtOffset, Bad> {
    if len % SECTOR != 0 {
        return Err(Bad::BadLength);
    }
    let offset = sector.checked_mul(SECTOR).ok_or(Bad::PastEnd)?;
    match offset.checked_add(len) {
        Some(end) if end <= lim.capacity => Ok(VirtOffset(offset)),
        _ => Err(Bad::PastEnd),
    }
}

/// Discard / write-zeroes ranges (`struct virtio_blk_discard_write_zeroes`) after the header.
fn parse_ranges<M: GuestMemoryBackend>(
    mem: &M,
    readable: &[GSeg],
    rlen: u64,
    discard: bool,
    lim: &Limits,
) -> Result<SmallVec<[Range; 1]>, Bad> {
    let n = rlen - HEADER_LEN;
    if n == 0 || n % DISCARD_SEG_LEN != 0 || n / DISCARD_SEG_LEN > u64::from(lim.max_discard_seg) {
        return Err(Bad::BadDiscard);
    }
    let mut raw = vec![0u8; n as usize];
    read_stream(mem, readable, HEADER_LEN, &mut raw).map_err(|_| Bad::OutsideMemory)?;
    let mut ranges = SmallVec::new();
    for seg in raw.chunks_exact(DISCARD_SEG_LEN as usize) {
        let sector = u64::from_le_bytes(seg[0..8].try_into().expect("8 bytes"));
        let num = u32::from_le_bytes(seg[8..12].try_into().expect("4 bytes"));
        let flags = u32::from_le_bytes(seg[12..16].try_into().expect("4 bytes"));
        let unmap = flags & VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP != 0;
        // Unknown flags, or "unmap" on a discard, must be refused (virtio 1.2, 5.2.6.2).
        if flags & !VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP != 0 || (discard && unmap) {
            return Err(Bad::DiscardFlags);
        }
        if num > lim.max_discard_sectors {
            return Err(Bad::BadDiscard);
        }
        let len = u64::from(num) * SECTOR;
        let offset = check_range(sector, len, lim)?;
        ranges.push(Range { offset, len, unmap });
    }
    Ok(ranges)
}

/// Copies stream bytes starting at `off` out of guest memory.
fn read_stream<M: GuestMemoryBackend>(
    mem: &M,
    segs: &[GSeg],
    off: u64,
    out: &mut [u8],
) -> Result<(), ()> {
    let mut done = 0usize;
    for p in window(segs, off, out.len() as u64) {
        let n = p.len as usize;
        mem.read_slice(&mut out[done..done + n], GuestAddress(p.addr))
            .map_err(|_| ())?;
        done += n;
    }
    if done == out.len() {
        Ok(())
    } else {
        Err(())
    }
}

/// Host segments for stream bytes `[off, off + len)`, checking each guest piece against
/// `seg_max`/`size_max` when `lim` is given.
fn host_segs<M: GuestMemoryBackend>(
    mem: &M,
    segs: &[GSeg],
    off: u64,
    len: u64,
    lim: Option<&Limits>,
) -> Result<Segs, Bad> {
    let mut out = Segs::new();
    let mut pieces = 0u32;
    for p in window(segs, off, len) {
        pieces += 1;
        if let Some(lim) = lim {
            if pieces > lim.seg_max {
                return Err(Bad::TooManySegments);
            }
            if p.len > u64::from(lim.size_max) {
                return Err(Bad::SegmentTooLarge);
            }
        }
        if p.addr.checked_add(p.len).is_none() {
            return Err(Bad::OutsideMemory);
        }
        let plen = usize::try_from(p.len).map_err(|_| Bad::OutsideMemory)?;
        let mut got = 0usize;
        for slice in GuestMemoryBackend::get_slices(mem, GuestAddress(p.addr), plen) {
            let slice = slice.map_err(|_| Bad::OutsideMemory)?;
            let addr = slice.ptr_guard_mut().as_ptr() as usize;
            // Regions that happen to be adjacent in host memory too become one segment.
            match out.last_mut() {
                Some(last) if last.addr + last.len == addr => last.len += slice.len(),
                _ => out.push(Segment {
                    addr,
                    len: slice.len(),
                }),
            }
            got += slice.len();
        }
        if got != plen {
            return Err(Bad::OutsideMemory);
        }
    }
    Ok(out)
}

/// The descriptor chain whose head is descriptor `head` of the table at `table` (`size`
/// entries), as `virtio_queue`'s `DescriptorChain` walks it from the available ring (whose
/// constructor is not public): indirect tables followed once, at most one pass over a table,
/// at most 4 GiB in all. Used to resubmit requests by head (inflight I/O tracking); a chain
/// that cannot be read simply ends, and `parse` rejects what it got.
pub fn chain_at<M: GuestMemoryBackend>(
    mem: &M,
    table: GuestAddress,
    size: u16,
    head: u16,
) -> impl Iterator<Item = Descriptor> + '_ {
    let mut table = table;
    let mut size = size;
    let mut next = head;
    let mut ttl = size;
    let mut indirect = false;
    let mut bytes: u32 = 0;
    std::iter::from_fn(move || loop {
        if ttl == 0 || next >= size {
            return None;
        }
        let at = table.checked_add(u64::from(next) * 16)?;
        let desc: Descriptor = mem.read_obj(at).ok()?;
        if desc.refers_to_indirect_table() {
            if indirect || desc.len() % 16 != 0 || desc.len() / 16 > u32::from(u16::MAX) {
                return None;
            }
            indirect = true;
            table = desc.addr();
            size = (desc.len() / 16) as u16;
            next = 0;
            ttl = size;
            continue;
        }
        bytes = bytes.checked_add(desc.len())?;
        if desc.has_next() {
            next = desc.next();
            ttl -= 1;
        } else {
            ttl = 0;
        }
        return Some(desc);
    })
}

#[cfg(test)]
#[path = "request_tests.rs"]
mod tests;
