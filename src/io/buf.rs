//! I/O buffers: a scatter/gather list of memory segments plus an owner that keeps them alive.
//!
//! A `Buf` is moved into an I/O operation at submission and handed back (or dropped) only when
//! the operation has completed; the owner (an aligned heap allocation, or a snapshot of the guest
//! memory mapping) therefore outlives every access the kernel makes. That is the whole
//! buffer-safety argument for asynchronous I/O straight from/to guest memory.
//!
//! The memory may be shared with a running guest, so contents are only ever copied with raw
//! pointer copies (like DMA), never handed out as Rust references.

use smallvec::SmallVec;
use std::alloc::{self, Layout};
use std::any::Any;
use std::sync::Arc;

/// Alignment of buffers we allocate ourselves: enough for O_DIRECT on any device.
pub const BUF_ALIGN: usize = 4096;

/// One contiguous piece of memory.
#[derive(Copy, Clone, Debug)]
pub struct Segment {
    pub addr: usize,
    pub len: usize,
}

/// A contiguous piece of a scatter/gather list (host memory here, guest memory in the server).
pub trait Piece: Copy {
    fn size(&self) -> u64;
    /// The `len` bytes starting `skip` bytes into this piece (`skip + len <= self.size()`).
    fn sub(&self, skip: u64, len: u64) -> Self;
}

impl Piece for Segment {
    fn size(&self) -> u64 {
        self.len as u64
    }

    fn sub(&self, skip: u64, len: u64) -> Self {
        // Both fit in usize: they are at most `self.len`.
        Segment {
            addr: self.addr + skip as usize,
            len: len as usize,
        }
    }
}

/// The pieces of `segs` covering bytes `[off, off + len)` of their concatenation, in order and
/// none empty; they cover fewer bytes when the list ends first.
pub fn window<P: Piece>(segs: &[P], off: u64, len: u64) -> impl Iterator<Item = P> + '_ {
    let mut rest = segs.iter();
    let (mut skip, mut want) = (off, len);
    std::iter::from_fn(move || {
        while want > 0 {
            let s = rest.next()?;
            if skip >= s.size() {
                skip -= s.size();
                continue;
            }
            let take = (s.size() - skip).min(want);
            want -= take;
            let piece = s.sub(skip, take);
            skip = 0;
            return Some(piece);
        }
        None
    })
}

/// A heap allocation with `BUF_ALIGN` alignment, zero-initialised.
struct AlignedAlloc {
    ptr: *mut u8,
    layout: Layout,
}

// SAFETY: the allocation is plain bytes owned by this value; access goes through `Buf`'s copy
// helpers which have DMA semantics (no references are created), so sharing across threads is sound.
unsafe impl Send for AlignedAlloc {}
// SAFETY: as above.
unsafe impl Sync for AlignedAlloc {}

impl Drop for AlignedAlloc {
    fn drop(&mut self) {
        // SAFETY: `ptr` came from `alloc_zeroed` with exactly this layout and is freed once.
        unsafe { alloc::dealloc(self.ptr, self.layout) }
    }
}

/// A scatter/gather buffer. Cloning is cheap and aliases the same memory.
#[derive(Clone)]
pub struct Buf {
    segs: SmallVec<[Segment; 4]>,
    len: usize,
    _owner: Arc<dyn Any + Send + Sync>,
}

impl std::fmt::Debug for Buf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Buf")
            .field("len", &self.len)
            .field("segs", &self.segs.len())
            .finish()
    }
}

impl Buf {
    /// A zero-filled, `BUF_ALIGN`-aligned buffer of `len` bytes.
    pub fn alloc(len: usize) -> Buf {
        let size = len.max(1).next_multiple_of(BUF_ALIGN);
        let layout = Layout::from_size_align(size, BUF_ALIGN).expect("buffer layout");
        // SAFETY: layout has non-zero size.
        let ptr = unsafe { alloc::alloc_zeroed(layout) };
        if ptr.is_null() {
            alloc::handle_alloc_error(layout);
        }
        let owner = Arc::new(AlignedAlloc { ptr, layout });
        Buf {
            segs: smallvec::smallvec![Segment {
                addr: ptr as usize,
                len
            }],
            len,
            _owner: owner,
        }
    }

    /// A buffer over memory that `owner` keeps mapped.
    ///
    /// # Safety
    /// Every segment must be valid for reads and writes for as long as `owner` is alive, and
    /// nothing may free or unmap it while any clone of the returned `Buf` exists.
    pub unsafe fn from_segments(
        segs: impl IntoIterator<Item = Segment>,
        owner: Arc<dyn Any + Send + Sync>,
    ) -> Buf {
        let segs: SmallVec<[Segment; 4]> = segs.into_iter().filter(|s| s.len > 0).collect();
        let len = segs.iter().map(|s| s.len).sum();
        Buf {
            segs,
            len,
            _owner: owner,
        }
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn segments(&self) -> &[Segment] {
        &self.segs
    }

    /// True if every segment starts and ends on a multiple of `align` (O_DIRECT-ready).
    pub fn is_aligned(&self, align: usize) -> bool {
        self.segs
            .iter()
            .all(|s| s.addr % align == 0 && s.len % align == 0)
    }

    /// The bytes `[off, off + len)` of this buffer, aliasing the same memory.
    pub fn slice(&self, off: usize, len: usize) -> Buf {
        assert!(
            off + len <= self.len,
            "slice {off}+{len} outside buffer of {}",
            self.len
        );
        let segs = self.window(off, len).collect();
        Buf {
            segs,
            len,
            _owner: self._owner.clone(),
        }
    }

    /// Copies `src` into this buffer starting at byte `off`.
    pub fn copy_from_slice(&self, off: usize, src: &[u8]) {
        assert!(off + src.len() <= self.len);
        let mut done = 0;
        for Segment { addr, len: n } in self.window(off, src.len()) {
            // SAFETY: `window` yields in-bounds ranges of segments the owner keeps valid; `src`
            // is a distinct Rust slice, so the ranges cannot overlap.
            unsafe { std::ptr::copy_nonoverlapping(src.as_ptr().add(done), addr as *mut u8, n) };
            done += n;
        }
    }

    /// Copies bytes starting at `off` of this buffer into `dst`.
    pub fn copy_to_slice(&self, off: usize, dst: &mut [u8]) {
        assert!(off + dst.len() <= self.len);
        let mut done = 0;
        for Segment { addr, len: n } in self.window(off, dst.len()) {
            // SAFETY: as in `copy_from_slice`, with source and destination swapped.
            unsafe {
                std::ptr::copy_nonoverlapping(addr as *const u8, dst.as_mut_ptr().add(done), n)
            };
            done += n;
        }
    }

    /// Copies `len` bytes from `src[src_off..]` into `self[dst_off..]`.
    pub fn copy_from_buf(&self, dst_off: usize, src: &Buf, src_off: usize, len: usize) {
        assert!(dst_off + len <= self.len && src_off + len <= src.len);
        let mut pos = 0;
        for Segment {
            addr: daddr,
            len: n,
        } in self.window(dst_off, len)
        {
            let mut inner = 0;
            for Segment {
                addr: saddr,
                len: m,
            } in src.window(src_off + pos, n)
            {
                // SAFETY: both ranges are in bounds of live segments; `std::ptr::copy` tolerates
                // overlap should the two buffers alias.
                unsafe { std::ptr::copy(saddr as *const u8, (daddr + inner) as *mut u8, m) };
                inner += m;
            }
            pos += n;
        }
    }

    /// Fills `[off, off + len)` with zeros.
    pub fn zero(&self, off: usize, len: usize) {
        for Segment { addr, len: n } in self.window(off, len) {
            // SAFETY: in-bounds range of a live segment.
            unsafe { std::ptr::write_bytes(addr as *mut u8, 0, n) };
        }
    }

    /// Copies the whole buffer into a new Vec (tests and tools).
    pub fn to_vec(&self) -> Vec<u8> {
        let mut v = vec![0u8; self.len];
        self.copy_to_slice(0, &mut v);
        v
    }

    /// The memory ranges backing `[off, off + len)`.
    fn window(&self, off: usize, len: usize) -> impl Iterator<Item = Segment> + '_ {
        window(&self.segs, off as u64, len as u64)
    }

    /// The segments as `iovec`s for vectored system calls. Valid while `self` lives.
    pub fn iovecs(&self) -> SmallVec<[libc::iovec; 4]> {
        self.segs
            .iter()
            .map(|s| libc::iovec {
                iov_base: s.addr as *mut libc::c_void,
                iov_len: s.len,
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        /// Byte for byte, the window is the stretch `[off, off + len)` of the list's bytes, cut
        /// short where the list ends, in pieces none of them empty.
        #[test]
        fn window_is_the_stretch_of_the_concatenation(
            lens in proptest::collection::vec(0usize..40, 0..8),
            off in 0u64..200,
            len in 0u64..200,
        ) {
            // Segment i at i << 20: every byte has its own address.
            let segs: Vec<Segment> = lens
                .iter()
                .enumerate()
                .map(|(i, &len)| Segment { addr: i << 20, len })
                .collect();
            let bytes: Vec<usize> = segs.iter().flat_map(|s| s.addr..s.addr + s.len).collect();
            let start = (off as usize).min(bytes.len());
            let end = (off + len).min(bytes.len() as u64) as usize;
            let pieces: Vec<Segment> = window(&segs, off, len).collect();
            prop_assert!(pieces.iter().all(|p| p.len > 0));
            let got: Vec<usize> = pieces.iter().flat_map(|p| p.addr..p.addr + p.len).collect();
            prop_assert_eq!(&got[..], &bytes[start..end.max(start)]);
        }
    }

    #[test]
    fn slices_and_copies_cross_segments() {
        let a = Buf::alloc(8192);
        // Build a two-segment buffer over `a`'s memory: [4096..8192) then [0..4096).
        let segs = a.segments()[0];
        // SAFETY: both segments lie inside `a`'s allocation, which the owner `a` keeps alive.
        let b = unsafe {
            Buf::from_segments(
                [
                    Segment {
                        addr: segs.addr + 4096,
                        len: 4096,
                    },
                    Segment {
                        addr: segs.addr,
                        len: 4096,
                    },
                ],
                Arc::new(a.clone()),
            )
        };
        let data: Vec<u8> = (0..6000u32).map(|i| (i % 251) as u8).collect();
        b.copy_from_slice(1000, &data);
        let mut back = vec![0u8; 6000];
        b.copy_to_slice(1000, &mut back);
        assert_eq!(back, data);
        let s = b.slice(3000, 2000);
        assert_eq!(s.segments().len(), 2);
        assert_eq!(s.to_vec(), data[2000..4000]);
        assert!(a.is_aligned(4096));
        assert!(!s.is_aligned(512));
        s.zero(0, 2000);
        assert!(b.slice(3000, 2000).to_vec().iter().all(|&x| x == 0));
        let c = Buf::alloc(100);
        c.copy_from_buf(10, &b, 1000, 50);
        assert_eq!(c.to_vec()[10..60], data[..50]);
    }
}
