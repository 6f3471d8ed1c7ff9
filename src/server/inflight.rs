//! Inflight I/O tracking (vhost-user `VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD`, split rings): a
//! shared memory region in which the backend marks each request it took from the available ring
//! until its used entry is published. The frontend keeps the region across a backend crash and
//! hands it to the next backend, which resubmits what was marked, so no request is lost.
//!
//! The layout is libvhost-user's, per queue, each queue's part 64-byte aligned:
//! a 16-byte header (`features: u64, version: u16, desc_num: u16, last_batch_head: u16,
//! used_idx: u16`) and `desc_num` 16-byte descriptor states (`inflight: u8, padding: [u8; 5],
//! next: u16, counter: u64`).
//!
//! The region comes from the frontend and is untrusted: its size, offset, seals and geometry are
//! checked before it is mapped, its contents when a vring starts, and every access is bounded by
//! the checked geometry, whatever the region says afterwards.

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd};
use std::ptr::NonNull;
use std::sync::atomic::{fence, AtomicU16, AtomicU64, AtomicU8, Ordering};
use std::sync::Arc;
use vhost::vhost_user::message::VhostUserInflight;

/// The only layout version there is.
pub const VERSION: u16 = 1;
const HEADER: u64 = 16;
const DESC_STATE: u64 = 16;
const ALIGN: u64 = 64;
// Header field offsets.
const VERSION_AT: usize = 8;
const DESC_NUM_AT: usize = 10;
const LAST_BATCH_HEAD_AT: usize = 12;
const USED_IDX_AT: usize = 14;
// Descriptor state field offsets.
const INFLIGHT_AT: usize = 0;
const COUNTER_AT: usize = 8;

/// Bytes of one queue's part for queues of `queue_size` (libvhost-user's
/// `vu_inflight_queue_size`, which rounds `16 * queue_size + 2` up to 64: the same value).
pub fn queue_region_size(queue_size: u16) -> u64 {
    (HEADER + DESC_STATE * u64::from(queue_size)).div_ceil(ALIGN) * ALIGN
}

/// Why a region (or a vring start with it) was refused.
#[derive(Debug, thiserror::Error)]
pub enum InflightError {
    #[error("inflight region: {0}")]
    Invalid(String),
    #[error("inflight region: {op}: {source}")]
    Os {
        op: &'static str,
        #[source]
        source: io::Error,
    },
}

impl From<InflightError> for io::Error {
    fn from(e: InflightError) -> io::Error {
        let kind = match e {
            InflightError::Invalid(_) => io::ErrorKind::InvalidInput,
            InflightError::Os { ref source, .. } => source.kind(),
        };
        io::Error::new(kind, e)
    }
}

fn invalid(msg: impl Into<String>) -> InflightError {
    InflightError::Invalid(msg.into())
}

fn os(op: &'static str) -> InflightError {
    InflightError::Os {
        op,
        source: io::Error::last_os_error(),
    }
}

/// A mapped inflight region: `num_queues` parts for queues of up to `queue_size` descriptors.
pub struct Region {
    ptr: NonNull<u8>,
    len: usize,
    num_queues: u16,
    queue_size: u16,
}

// SAFETY: the mapping is shared memory accessed only through atomics; it is unmapped once, on
// drop, when no reference remains.
unsafe impl Send for Region {}
// SAFETY: as above.
unsafe impl Sync for Region {}

impl Drop for Region {
    fn drop(&mut self) {
        // SAFETY: `ptr`/`len` are the mapping made in `map`, unmapped nowhere else.
        unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.len) };
    }
}

impl Region {
    /// GET_INFLIGHT_FD: a fresh, zeroed region in a memfd sealed against resizing (so neither
    /// side can make the other's accesses fault), with its description for the frontend.
    pub fn create(
        num_queues: u16,
        queue_size: u16,
    ) -> Result<(Region, File, VhostUserInflight), InflightError> {
        if num_queues == 0 || queue_size == 0 {
            return Err(invalid("no queues or empty queues asked for"));
        }
        let len = queue_region_size(queue_size) * u64::from(num_queues);
        // SAFETY: memfd_create with a static NUL-terminated name; the result is checked.
        let fd = unsafe {
            libc::memfd_create(
                c"fvd-inflight".as_ptr(),
                libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING,
            )
        };
        if fd < 0 {
            return Err(os("memfd_create"));
        }
        // SAFETY: `fd` is a new descriptor owned by nobody else.
        let file = unsafe { File::from_raw_fd(fd) };
        file.set_len(len).map_err(|source| InflightError::Os {
            op: "ftruncate",
            source,
        })?;
        let seals = libc::F_SEAL_GROW | libc::F_SEAL_SHRINK | libc::F_SEAL_SEAL;
        // SAFETY: fcntl on a descriptor we own, with an integer argument.
        if unsafe { libc::fcntl(file.as_raw_fd(), libc::F_ADD_SEALS, seals) } < 0 {
            return Err(os("seal"));
        }
        let region = Region::map(&file, 0, len, num_queues, queue_size)?;
        Ok((
            region,
            file,
            VhostUserInflight::new(len, 0, num_queues, queue_size),
        ))
    }

    /// SET_INFLIGHT_FD: maps the frontend's region after checking it against the device
    /// (`max_queues` queues of at most `max_queue_size`) and against the file itself.
    pub fn open(
        msg: &VhostUserInflight,
        file: &File,
        max_queues: u16,
        max_queue_size: u16,
    ) -> Result<Region, InflightError> {
        let (nq, qs) = (msg.num_queues, msg.queue_size);
        if nq == 0 || nq > max_queues {
            return Err(invalid(format!("{nq} queues; the device has {max_queues}")));
        }
        if qs == 0 || qs > max_queue_size {
            return Err(invalid(format!(
                "queue size {qs}; the device allows up to {max_queue_size}"
            )));
        }
        let need = queue_region_size(qs) * u64::from(nq);
        if msg.mmap_size < need {
            return Err(invalid(format!(
                "{} bytes for {nq} queues of {qs} (needs {need})",
                msg.mmap_size
            )));
        }
        // SAFETY: sysconf has no memory arguments.
        let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) }.max(4096) as u64;
        if msg.mmap_offset % page != 0 {
            return Err(invalid(format!(
                "offset {:#x} not page-aligned",
                msg.mmap_offset
            )));
        }
        let meta = file.metadata().map_err(|source| InflightError::Os {
            op: "fstat",
            source,
        })?;
        if !meta.file_type().is_file() {
            return Err(invalid("not a regular file (memfd)"));
        }
        let end = msg
            .mmap_offset
            .checked_add(msg.mmap_size)
            .ok_or_else(|| invalid("offset + size overflows"))?;
        if end > meta.len() {
            return Err(invalid(format!(
                "offset {:#x} + size {:#x} past the end of the {}-byte file",
                msg.mmap_offset,
                msg.mmap_size,
                meta.len()
            )));
        }
        // A file that can still shrink could fault every later access (SIGBUS).
        // SAFETY: fcntl on a descriptor we own, no pointer arguments.
        let seals = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_GET_SEALS) };
        if seals < 0 || seals & libc::F_SEAL_SHRINK == 0 {
            return Err(invalid("the file is not sealed against shrinking"));
        }
        let region = Region::map(file, msg.mmap_offset, need, nq, qs)?;
        for q in 0..nq {
            let part = region.queue_part(q);
            match part.version() {
                0 => {}
                VERSION if part.desc_num() == qs => {}
                VERSION => {
                    return Err(invalid(format!(
                        "queue {q}: {} descriptors recorded, {qs} announced",
                        part.desc_num()
                    )))
                }
                v => return Err(invalid(format!("queue {q}: unknown version {v}"))),
            }
        }
        Ok(region)
    }

    fn map(
        file: &File,
        offset: u64,
        len: u64,
        num_queues: u16,
        queue_size: u16,
    ) -> Result<Region, InflightError> {
        let len = usize::try_from(len).map_err(|_| invalid("too large"))?;
        let off = libc::off_t::try_from(offset).map_err(|_| invalid("offset too large"))?;
        // SAFETY: a new shared mapping of a file we hold; the result is checked. The file is
        // sealed against shrinking and at least `offset + len` bytes long (checked by callers),
        // so no access inside the mapping can fault.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                off,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(os("mmap"));
        }
        let ptr = NonNull::new(p.cast()).ok_or_else(|| invalid("mapped at address 0"))?;
        Ok(Region {
            ptr,
            len,
            num_queues,
            queue_size,
        })
    }

    pub fn num_queues(&self) -> u16 {
        self.num_queues
    }

    pub fn queue_size(&self) -> u16 {
        self.queue_size
    }

    /// Queue `q`'s part (`q` < `num_queues`).
    fn queue_part(&self, q: u16) -> Part<'_> {
        let q = q.min(self.num_queues - 1);
        let off = queue_region_size(self.queue_size) as usize * usize::from(q);
        // SAFETY: `off` + the part's size is within the mapping (`len` covers `num_queues`
        // parts).
        let base = unsafe { self.ptr.as_ptr().add(off) };
        Part {
            base,
            size: self.queue_size,
            _region: std::marker::PhantomData,
        }
    }
}

/// One queue's part of a region. Every index is checked against the size the region was
/// mapped with, never against what the region itself says.
struct Part<'a> {
    base: *mut u8,
    size: u16,
    _region: std::marker::PhantomData<&'a Region>,
}

impl Part<'_> {
    fn u16_at(&self, off: usize) -> &AtomicU16 {
        // SAFETY: `off` is a header field offset (< 16, 2-aligned) inside this part, whose base
        // is 64-aligned within a page-aligned mapping that outlives `self`.
        unsafe { &*self.base.add(off).cast::<AtomicU16>() }
    }

    fn desc(&self, i: u16) -> Option<*mut u8> {
        (i < self.size).then(|| {
            // SAFETY: descriptor `i` < `size` lies inside this part.
            unsafe { self.base.add((HEADER + DESC_STATE * u64::from(i)) as usize) }
        })
    }

    fn version(&self) -> u16 {
        self.u16_at(VERSION_AT).load(Ordering::Acquire)
    }

    fn desc_num(&self) -> u16 {
        self.u16_at(DESC_NUM_AT).load(Ordering::Acquire)
    }

    /// Descriptor state `i`'s inflight flag; None beyond the part.
    fn flag_of(&self, i: u16) -> Option<&AtomicU8> {
        // SAFETY: a byte inside descriptor state `i` (see `desc`).
        self.desc(i)
            .map(|d| unsafe { &*d.add(INFLIGHT_AT).cast::<AtomicU8>() })
    }

    /// Descriptor state `i`'s counter; None beyond the part.
    fn counter_of(&self, i: u16) -> Option<&AtomicU64> {
        // SAFETY: 8 bytes at offset 8 of descriptor state `i`, 8-aligned (see `desc`).
        self.desc(i)
            .map(|d| unsafe { &*d.add(COUNTER_AT).cast::<AtomicU64>() })
    }

    fn inflight(&self, i: u16) -> u8 {
        self.flag_of(i).map_or(0, |f| f.load(Ordering::Acquire))
    }

    fn set_inflight(&self, i: u16, v: u8) {
        if let Some(f) = self.flag_of(i) {
            f.store(v, Ordering::Release);
        }
    }

    fn counter(&self, i: u16) -> u64 {
        self.counter_of(i).map_or(0, |c| c.load(Ordering::Acquire))
    }

    fn set_counter(&self, i: u16, v: u64) {
        if let Some(c) = self.counter_of(i) {
            c.store(v, Ordering::Release);
        }
    }
}

/// What a vring start found in its part of the region.
#[derive(Debug, PartialEq, Eq)]
pub struct Recovered {
    /// Where the available ring is to be read from next: the used index plus the requests in
    /// flight. None for a fresh region (the frontend's VRING_BASE stands).
    pub next_avail: Option<u16>,
    /// Heads of the requests in flight, oldest (lowest counter) first.
    pub resubmit: Vec<u16>,
}

/// One running queue's bookkeeping in the region (libvhost-user's `vu_queue_inflight_get`,
/// `_pre_put` and `_post_put`).
pub struct Tracker {
    region: Arc<Region>,
    queue: u16,
    /// The vring's size: heads are below it.
    ring_size: u16,
    counter: u64,
}

impl Tracker {
    /// Starts queue `queue` (of `ring_size` descriptors, whose used ring says `used_idx`) with
    /// `region`: initialises a fresh part, or repairs the used index and finds the requests in
    /// flight ("Inflight I/O tracking" in the vhost-user spec). A part that contradicts itself
    /// or the vring is refused.
    pub fn start(
        region: Arc<Region>,
        queue: u16,
        ring_size: u16,
        used_idx: u16,
    ) -> Result<(Tracker, Recovered), InflightError> {
        if queue >= region.num_queues() {
            return Err(invalid(format!(
                "queue {queue} started; the region has {} queues",
                region.num_queues()
            )));
        }
        if ring_size == 0 || ring_size > region.queue_size() {
            return Err(invalid(format!(
                "queue {queue} has {ring_size} descriptors; the region tracks {}",
                region.queue_size()
            )));
        }
        let part = region.queue_part(queue);
        let qs = region.queue_size();
        let mut recovered = Recovered {
            next_avail: None,
            resubmit: Vec::new(),
        };
        let mut counter = 0;
        match part.version() {
            0 => {
                // A fresh region: nothing in flight, the frontend's VRING_BASE stands.
                part.u16_at(DESC_NUM_AT).store(qs, Ordering::Release);
                part.u16_at(USED_IDX_AT).store(used_idx, Ordering::Release);
                part.u16_at(VERSION_AT).store(VERSION, Ordering::Release);
            }
            VERSION => {
                if part.desc_num() != qs {
                    return Err(invalid(format!(
                        "queue {queue}: {} descriptors recorded, {qs} announced",
                        part.desc_num()
                    )));
                }
                // The used entry of the last completion may be published without its
                // descriptor cleared: the used index tells.
                if part.u16_at(USED_IDX_AT).load(Ordering::Acquire) != used_idx {
                    let last = part.u16_at(LAST_BATCH_HEAD_AT).load(Ordering::Acquire);
                    if last >= ring_size {
                        return Err(invalid(format!(
                            "queue {queue}: last batch head {last} out of range"
                        )));
                    }
                    part.set_inflight(last, 0);
                    fence(Ordering::SeqCst);
                    part.u16_at(USED_IDX_AT).store(used_idx, Ordering::Release);
                }
                let mut found = Vec::new();
                for i in 0..qs {
                    match part.inflight(i) {
                        0 => {}
                        1 if i < ring_size => found.push((part.counter(i), i)),
                        1 => {
                            return Err(invalid(format!(
                                "queue {queue}: head {i} in flight, beyond the ring's \
                                 {ring_size} descriptors"
                            )))
                        }
                        v => {
                            return Err(invalid(format!(
                                "queue {queue}: descriptor {i} has inflight flag {v}"
                            )))
                        }
                    }
                }
                found.sort_unstable();
                counter = found.last().map_or(0, |&(c, _)| c.wrapping_add(1));
                recovered.next_avail = Some(used_idx.wrapping_add(found.len() as u16));
                recovered.resubmit = found.into_iter().map(|(_, i)| i).collect();
            }
            v => return Err(invalid(format!("queue {queue}: unknown version {v}"))),
        }
        Ok((
            Tracker {
                region,
                queue,
                ring_size,
                counter,
            },
            recovered,
        ))
    }

    /// Before a request taken from the ring (or resubmitted) is processed.
    pub fn get(&mut self, head: u16) {
        if head >= self.ring_size {
            return;
        }
        let part = self.region.queue_part(self.queue);
        part.set_counter(head, self.counter);
        self.counter = self.counter.wrapping_add(1);
        fence(Ordering::SeqCst);
        part.set_inflight(head, 1);
    }

    /// Before the used entry of `head` is written.
    pub fn pre_put(&self, head: u16) {
        if head >= self.ring_size {
            return;
        }
        let part = self.region.queue_part(self.queue);
        part.u16_at(LAST_BATCH_HEAD_AT)
            .store(head, Ordering::Release);
        fence(Ordering::SeqCst);
    }

    /// After the used entry of `head` and the used index `used_idx` were published.
    pub fn post_put(&self, head: u16, used_idx: u16) {
        let part = self.region.queue_part(self.queue);
        fence(Ordering::SeqCst);
        part.set_inflight(head, 0);
        fence(Ordering::SeqCst);
        part.u16_at(USED_IDX_AT).store(used_idx, Ordering::Release);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write_at(f: &File, off: u64, bytes: &[u8]) {
        use std::os::unix::fs::FileExt;
        f.write_all_at(bytes, off).unwrap();
    }

    #[test]
    fn sizes_match_libvhost_user() {
        for qs in [1u16, 2, 3, 4, 127, 128, 256, 1024, 32768] {
            let lvu = (16 * u64::from(qs) + 2).div_ceil(64) * 64;
            assert_eq!(queue_region_size(qs), lvu, "queue size {qs}");
        }
    }

    #[test]
    fn fresh_region_then_crash_recovery_order() {
        let (region, file, msg) = Region::create(2, 8).unwrap();
        assert_eq!(msg.mmap_size, 2 * 192);
        drop(region);
        let region = Arc::new(Region::open(&msg, &file, 2, 8).unwrap());
        let (mut t, rec) = Tracker::start(region.clone(), 1, 8, 5).unwrap();
        assert_eq!(
            rec,
            Recovered {
                next_avail: None,
                resubmit: vec![]
            }
        );
        // Three requests taken, one completed (used index 5 -> 6): heads 4, 2 stay in flight.
        for h in [4, 7, 2] {
            t.get(h);
        }
        t.pre_put(7);
        t.post_put(7, 6);
        // A crash after the used index of head 2's completion was published, before its flag
        // was cleared: the used index (7) tells.
        t.pre_put(2);
        drop(t);
        let (t2, rec) = Tracker::start(region.clone(), 1, 8, 7).unwrap();
        assert_eq!(
            rec,
            Recovered {
                next_avail: Some(8),
                resubmit: vec![4]
            }
        );
        assert_eq!(t2.counter, 1);
        // Queue 0 was untouched.
        let (_, rec) = Tracker::start(region, 0, 8, 0).unwrap();
        assert_eq!(rec.resubmit, Vec::<u16>::new());
    }

    #[test]
    fn hostile_regions_are_refused() {
        let (_, file, msg) = Region::create(1, 8).unwrap();
        let bad = |m: VhostUserInflight| Region::open(&m, &file, 1, 8).err().unwrap();
        bad(VhostUserInflight::new(msg.mmap_size, 0, 2, 8));
        bad(VhostUserInflight::new(msg.mmap_size, 0, 1, 16));
        bad(VhostUserInflight::new(msg.mmap_size - 1, 0, 1, 8));
        bad(VhostUserInflight::new(msg.mmap_size, 4096, 1, 8));
        bad(VhostUserInflight::new(msg.mmap_size, 1, 1, 8));
        bad(VhostUserInflight::new(u64::MAX, 4096, 1, 8));
        // An unsealed file of the right size.
        let plain = tempfile::tempfile().unwrap();
        plain.set_len(msg.mmap_size).unwrap();
        assert!(Region::open(&msg, &plain, 1, 8).is_err());

        // Contents: unknown version, wrong desc_num, bad flags, heads out of range.
        let start = |f: &dyn Fn(&File)| {
            let (_, file, msg) = Region::create(1, 8).unwrap();
            let r = Arc::new(Region::open(&msg, &file, 1, 8).unwrap());
            drop(Tracker::start(r.clone(), 0, 8, 0).unwrap());
            f(&file);
            Region::open(&msg, &file, 1, 8)
                .map(Arc::new)
                .and_then(|r| Tracker::start(r, 0, 4, 0).map(|_| ()))
        };
        assert!(start(&|_| {}).is_ok());
        assert!(start(&|f| write_at(f, 8, &2u16.to_le_bytes())).is_err());
        assert!(start(&|f| write_at(f, 10, &9u16.to_le_bytes())).is_err());
        assert!(start(&|f| write_at(f, 16 + 16 * 3, &[7])).is_err());
        // Head 5 in flight on a ring of 4.
        assert!(start(&|f| write_at(f, 16 + 16 * 5, &[1])).is_err());
        // Used index mismatch with the last batch head out of range.
        assert!(start(&|f| {
            write_at(f, 12, &60000u16.to_le_bytes());
            write_at(f, 14, &3u16.to_le_bytes());
        })
        .is_err());
        // Head 3 in flight on a ring of 4: fine.
        assert!(start(&|f| write_at(f, 16 + 16 * 3, &[1])).is_ok());
    }
}
