//! A guest for the vhost-user protocol tests: the `vhost` crate's frontend, memfd-backed guest
//! memory shared with the server, and queue 0 driven by hand. Every wait is bounded.

use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{fence, Ordering};
use std::time::Duration;
use vhost::vhost_user::message::{VhostUserHeaderFlag, VhostUserProtocolFeatures};
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use virtio_bindings::virtio_blk::*;
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ring::{
    VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE,
};
use virtio_queue::desc::split::Descriptor;
use vm_memory::{Bytes, FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

pub const MEM: usize = 1 << 20;
pub const QSIZE: u16 = 16;
pub const DESC: u64 = 0;
pub const AVAIL: u64 = 0x100;
pub const USED: u64 = 0x200;
pub const HDR: u64 = 0x1000;
pub const STATUS: u64 = 0x1100;
pub const DATA: u64 = 0x2000;
pub const PROTOCOL_FEATURES: u64 = 1 << 30;
/// How long any single reply or completion may take before the test gives up.
pub const TIMEOUT: Duration = Duration::from_secs(10);

/// One guest: its memory (shared with the server through a memfd) and queue 0.
pub struct Guest {
    pub fe: Frontend,
    /// The frontend's socket, for hand-made messages while the frontend is idle.
    pub raw: UnixStream,
    pub mem: GuestMemoryMmap<()>,
    pub kick: EventFd,
    pub call: EventFd,
    pub next_avail: u16,
    pub next_used: u16,
}

pub fn bit(b: u32) -> u64 {
    1 << b
}

/// Replays cloud-hypervisor's vhost-user-blk negotiation up to SET_FEATURES (REPLY_ACK on):
/// the frontend, a clone of its socket and the features. Replies time out after [`TIMEOUT`].
pub fn negotiate(socket: &std::path::Path) -> (Frontend, UnixStream, u64) {
    let sock = UnixStream::connect(socket).unwrap();
    sock.set_read_timeout(Some(TIMEOUT)).unwrap();
    sock.set_write_timeout(Some(TIMEOUT)).unwrap();
    let raw = sock.try_clone().unwrap();
    let mut fe = Frontend::from_stream(sock, 1);
    fe.set_owner().unwrap();
    // The virtio features cloud-hypervisor offers for vhost-user-blk.
    let avail = bit(VIRTIO_BLK_F_SIZE_MAX)
        | bit(VIRTIO_BLK_F_SEG_MAX)
        | bit(VIRTIO_BLK_F_GEOMETRY)
        | bit(VIRTIO_BLK_F_RO)
        | bit(VIRTIO_BLK_F_BLK_SIZE)
        | bit(VIRTIO_BLK_F_FLUSH)
        | bit(VIRTIO_BLK_F_TOPOLOGY)
        | bit(VIRTIO_BLK_F_CONFIG_WCE)
        | bit(VIRTIO_BLK_F_DISCARD)
        | bit(VIRTIO_BLK_F_WRITE_ZEROES)
        | bit(VIRTIO_BLK_F_MQ)
        | bit(VIRTIO_F_VERSION_1)
        | bit(VIRTIO_RING_F_EVENT_IDX)
        | bit(VIRTIO_RING_F_INDIRECT_DESC)
        | PROTOCOL_FEATURES;
    let features = fe.get_features().unwrap() & avail;
    assert_ne!(features & PROTOCOL_FEATURES, 0);
    let offered = VhostUserProtocolFeatures::CONFIG
        | VhostUserProtocolFeatures::MQ
        | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS
        | VhostUserProtocolFeatures::REPLY_ACK
        | VhostUserProtocolFeatures::INFLIGHT_SHMFD
        | VhostUserProtocolFeatures::LOG_SHMFD
        | VhostUserProtocolFeatures::DEVICE_STATE;
    let proto = fe.get_protocol_features().unwrap() & offered;
    assert_eq!(
        proto,
        VhostUserProtocolFeatures::CONFIG
            | VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS
            | VhostUserProtocolFeatures::REPLY_ACK
            | VhostUserProtocolFeatures::INFLIGHT_SHMFD
    );
    fe.set_protocol_features(proto).unwrap();
    fe.set_hdr_flags(VhostUserHeaderFlag::NEED_REPLY);
    let queues = fe.get_queue_num().unwrap();
    assert!(queues >= 1);
    fe.set_features(features).unwrap();
    (fe, raw, features)
}

/// A memfd named `name`, created with `flags`, of `len` bytes.
fn new_memfd(name: &std::ffi::CStr, flags: libc::c_uint, len: u64) -> File {
    // SAFETY: memfd_create with a NUL-terminated name; a non-negative result is a new fd we own.
    let fd = unsafe { libc::memfd_create(name.as_ptr(), flags) };
    assert!(fd >= 0);
    // SAFETY: `fd` was just created and is owned by nobody else.
    let file = unsafe { File::from_raw_fd(fd) };
    file.set_len(len).unwrap();
    file
}

/// A memfd of `len` bytes.
pub fn memfd(len: u64) -> File {
    new_memfd(c"guest", libc::MFD_CLOEXEC, len)
}

/// A memfd of `len` bytes that [`seal_size`] can seal, as an inflight region must be.
pub fn sealable_memfd(len: u64) -> File {
    new_memfd(
        c"inflight",
        libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING,
        len,
    )
}

/// Seals `f` against shrinking and growing.
pub fn seal_size(f: &File) -> std::io::Result<()> {
    // SAFETY: fcntl on an fd `f` owns, with an integer argument.
    let r = unsafe {
        libc::fcntl(
            f.as_raw_fd(),
            libc::F_ADD_SEALS,
            libc::F_SEAL_SHRINK | libc::F_SEAL_GROW,
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// [`MEM`] bytes of guest memory at guest address 0, in a memfd.
pub fn guest_memory() -> GuestMemoryMmap<()> {
    guest_memory_of(MEM)
}

/// `len` bytes of guest memory at guest address 0, in a memfd.
pub fn guest_memory_of(len: usize) -> GuestMemoryMmap<()> {
    GuestMemoryMmap::<()>::from_ranges_with_files([(
        GuestAddress(0),
        len,
        Some(FileOffset::new(memfd(len as u64), 0)),
    )])
    .unwrap()
}

/// The SET_MEM_TABLE entry describing `mem`'s one region.
pub fn region_of(mem: &GuestMemoryMmap<()>) -> VhostUserMemoryRegionInfo {
    VhostUserMemoryRegionInfo::from_guest_region(mem.iter().next().unwrap()).unwrap()
}

/// [`negotiate`], then the memory table and queue 0: a guest ready to submit requests.
pub fn attach(socket: &std::path::Path) -> (Guest, u64) {
    let (mut fe, raw, features) = negotiate(socket);
    let mem = guest_memory();
    fe.set_mem_table(&[region_of(&mem)]).unwrap();
    let (call, kick) = start_queue0(&mut fe, &mem, (DESC, AVAIL, USED), QSIZE, 0).unwrap();
    let g = Guest {
        fe,
        raw,
        mem,
        kick,
        call,
        next_avail: 0,
        next_used: 0,
    };
    (g, features)
}

/// SET_VRING_NUM to SET_VRING_ENABLE for queue 0: `size` entries, its rings at the guest
/// addresses `(desc, avail, used)` of `mem`, starting at `base`. Returns (call, kick).
pub fn start_queue0(
    fe: &mut Frontend,
    mem: &GuestMemoryMmap<()>,
    (desc, avail, used): (u64, u64, u64),
    size: u16,
    base: u16,
) -> Result<(EventFd, EventFd), vhost::Error> {
    let va = |gpa: u64| mem.get_host_address(GuestAddress(gpa)).unwrap() as u64;
    fe.set_vring_num(0, size)?;
    fe.set_vring_addr(
        0,
        &VringConfigData {
            queue_max_size: size,
            queue_size: size,
            flags: 0,
            desc_table_addr: va(desc),
            used_ring_addr: va(used),
            avail_ring_addr: va(avail),
            log_addr: None,
        },
    )?;
    fe.set_vring_base(0, base)?;
    let call = EventFd::new(0).unwrap();
    let kick = EventFd::new(0).unwrap();
    fe.set_vring_call(0, &call)?;
    fe.set_vring_kick(0, &kick)?;
    fe.set_vring_enable(0, true)?;
    Ok((call, kick))
}

/// A well-behaved frontend is served: negotiation, a write and a read.
pub fn still_serves(srv: &mut super::ServerProc, seed: u8) {
    assert!(srv.alive(), "the server died");
    let (mut g, _) = attach(&srv.socket);
    g.write_read(8, seed);
}

/// A descriptor: guest address, length, device-writable.
pub type D = (u64, u32, bool);

/// Writes `chain` to the descriptor table at `desc` from descriptor `head` on, each linked to
/// the next.
pub fn write_chain(mem: &GuestMemoryMmap<()>, desc: u64, head: u16, chain: &[D]) {
    for (i, &(addr, len, write)) in chain.iter().enumerate() {
        let idx = head + i as u16;
        let mut flags = if write { VRING_DESC_F_WRITE as u16 } else { 0 };
        if i + 1 < chain.len() {
            flags |= VRING_DESC_F_NEXT as u16;
        }
        let d = Descriptor::new(addr, len, flags, idx + 1);
        let at = desc + size_of::<Descriptor>() as u64 * u64::from(idx);
        mem.write_obj(d, GuestAddress(at)).unwrap();
    }
}

/// Puts `head` in entry `*next_avail` of the `size`-entry available ring at `avail`, then
/// publishes it (the index past it), fenced on both sides.
pub fn make_available(
    mem: &GuestMemoryMmap<()>,
    avail: u64,
    size: u16,
    next_avail: &mut u16,
    head: u16,
) {
    let at = avail + 4 + 2 * u64::from(*next_avail % size);
    mem.write_obj(head, GuestAddress(at)).unwrap();
    fence(Ordering::SeqCst);
    *next_avail = next_avail.wrapping_add(1);
    mem.write_obj(*next_avail, GuestAddress(avail + 2)).unwrap();
    fence(Ordering::SeqCst);
}

/// Waits until `fd` is readable; false after `timeout`.
pub fn wait_readable(fd: i32, timeout: Duration) -> bool {
    let mut p = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd for the duration of the call.
    unsafe { libc::poll(&mut p, 1, timeout.as_millis() as i32) == 1 }
}

impl Guest {
    pub fn header(&self, ty: u32, sector: u64) -> D {
        self.mem.write_obj(ty, GuestAddress(HDR)).unwrap();
        self.mem.write_obj(0u32, GuestAddress(HDR + 4)).unwrap();
        self.mem.write_obj(sector, GuestAddress(HDR + 8)).unwrap();
        (HDR, 16, false)
    }

    /// Puts `chain` on the ring and kicks.
    pub fn post(&mut self, chain: &[D]) {
        self.prepare(chain);
        self.kick.write(1).unwrap();
    }

    /// Puts `chain` on the ring without kicking.
    pub fn prepare(&mut self, chain: &[D]) {
        self.mem.write_obj(0xffu8, GuestAddress(STATUS)).unwrap();
        write_chain(&self.mem, DESC, 0, chain);
        // used_event: interrupt me as soon as anything beyond what I have seen is used.
        self.mem
            .write_obj(
                self.next_used,
                GuestAddress(AVAIL + 4 + 2 * u64::from(QSIZE)),
            )
            .unwrap();
        make_available(&self.mem, AVAIL, QSIZE, &mut self.next_avail, 0);
    }

    /// Waits up to `timeout` for the oldest posted chain: (used len, status byte).
    pub fn try_complete(&mut self, timeout: Duration) -> Option<(u32, u8)> {
        let deadline = std::time::Instant::now() + timeout;
        while self.used_idx() == self.next_used {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            if left.is_zero() || !wait_readable(self.call.as_raw_fd(), left) {
                if self.used_idx() == self.next_used {
                    return None;
                }
                break;
            }
            self.call.read().unwrap();
        }
        let elem = USED + 4 + 8 * u64::from(self.next_used % QSIZE);
        let id: u32 = self.mem.read_obj(GuestAddress(elem)).unwrap();
        let len: u32 = self.mem.read_obj(GuestAddress(elem + 4)).unwrap();
        assert_eq!(id, 0, "head index");
        self.next_used = self.next_used.wrapping_add(1);
        Some((len, self.mem.read_obj(GuestAddress(STATUS)).unwrap()))
    }

    /// Puts `chain` on the ring, kicks, and waits for its completion: (used len, status byte).
    pub fn submit(&mut self, chain: &[D]) -> (u32, u8) {
        self.post(chain);
        self.try_complete(TIMEOUT)
            .expect("no completion within the timeout")
    }

    pub fn used_idx(&self) -> u16 {
        fence(Ordering::SeqCst);
        self.mem.read_obj(GuestAddress(USED + 2)).unwrap()
    }

    pub fn fill(&self, addr: u64, len: usize, seed: u8) -> Vec<u8> {
        let v: Vec<u8> = (0..len)
            .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
            .collect();
        self.mem.write_slice(&v, GuestAddress(addr)).unwrap();
        v
    }

    pub fn read_back(&self, addr: u64, len: usize) -> Vec<u8> {
        let mut v = vec![0u8; len];
        self.mem.read_slice(&mut v, GuestAddress(addr)).unwrap();
        v
    }

    /// A 4 KiB write then read back at `sector`, compared: the server serves this guest.
    pub fn write_read(&mut self, sector: u64, seed: u8) {
        let data = self.fill(DATA, 4096, seed);
        let h = self.header(VIRTIO_BLK_T_OUT, sector);
        assert_eq!(
            self.submit(&[h, (DATA, 4096, false), (STATUS, 1, true)]),
            (1, 0)
        );
        self.fill(DATA, 4096, seed.wrapping_add(1));
        let h = self.header(VIRTIO_BLK_T_IN, sector);
        assert_eq!(
            self.submit(&[h, (DATA, 4096, true), (STATUS, 1, true)]),
            (4097, 0)
        );
        assert_eq!(self.read_back(DATA, 4096), data);
    }
}
