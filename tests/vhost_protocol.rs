//! `fvd serve` at the vhost-user protocol level, with the `vhost` crate's frontend: the
//! cloud-hypervisor negotiation, a hand-made vring in memfd memory, and malformed requests.

mod serve_support;

use serve_support::{create_image, dir, ServerProc};
use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::FromRawFd;
use std::os::unix::net::UnixStream;
use std::sync::atomic::{fence, Ordering};
use vhost::vhost_user::message::{
    VhostUserConfigFlags, VhostUserHeaderFlag, VhostUserProtocolFeatures,
};
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use virtio_bindings::virtio_blk::*;
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ring::{
    VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE,
};
use vm_memory::{Bytes, FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

const MEM: usize = 1 << 20;
const QSIZE: u16 = 16;
const DESC: u64 = 0;
const AVAIL: u64 = 0x100;
const USED: u64 = 0x200;
const HDR: u64 = 0x1000;
const STATUS: u64 = 0x1100;
const DATA: u64 = 0x2000;
const PROTOCOL_FEATURES: u64 = 1 << 30;

/// One guest: its memory (shared with the server through a memfd) and queue 0.
struct Guest {
    fe: Frontend,
    /// The frontend's socket, for hand-made messages while the frontend is idle.
    raw: UnixStream,
    mem: GuestMemoryMmap<()>,
    kick: EventFd,
    call: EventFd,
    next_avail: u16,
    next_used: u16,
}

fn bit(b: u32) -> u64 {
    1 << b
}

/// Replays cloud-hypervisor's vhost-user-blk negotiation; returns the guest and the features.
fn attach(socket: &std::path::Path) -> (Guest, u64) {
    let sock = UnixStream::connect(socket).unwrap();
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
    );
    fe.set_protocol_features(proto).unwrap();
    fe.set_hdr_flags(VhostUserHeaderFlag::NEED_REPLY);
    let queues = fe.get_queue_num().unwrap();
    assert!(queues >= 1);
    fe.set_features(features).unwrap();

    // SAFETY: memfd_create with a static name; a non-negative result is a new fd we own.
    let fd = unsafe { libc::memfd_create(c"guest".as_ptr(), libc::MFD_CLOEXEC) };
    assert!(fd >= 0);
    // SAFETY: `fd` was just created and is owned by nobody else.
    let file = unsafe { File::from_raw_fd(fd) };
    file.set_len(MEM as u64).unwrap();
    let mem = GuestMemoryMmap::<()>::from_ranges_with_files([(
        GuestAddress(0),
        MEM,
        Some(FileOffset::new(file, 0)),
    )])
    .unwrap();
    let region = VhostUserMemoryRegionInfo::from_guest_region(mem.iter().next().unwrap()).unwrap();
    fe.set_mem_table(&[region]).unwrap();

    let va = |gpa: u64| mem.get_host_address(GuestAddress(gpa)).unwrap() as u64;
    fe.set_vring_num(0, QSIZE).unwrap();
    fe.set_vring_addr(
        0,
        &VringConfigData {
            queue_max_size: QSIZE,
            queue_size: QSIZE,
            flags: 0,
            desc_table_addr: va(DESC),
            used_ring_addr: va(USED),
            avail_ring_addr: va(AVAIL),
            log_addr: None,
        },
    )
    .unwrap();
    fe.set_vring_base(0, 0).unwrap();
    let call = EventFd::new(0).unwrap();
    let kick = EventFd::new(0).unwrap();
    fe.set_vring_call(0, &call).unwrap();
    fe.set_vring_kick(0, &kick).unwrap();
    fe.set_vring_enable(0, true).unwrap();
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

/// A descriptor: guest address, length, device-writable.
type D = (u64, u32, bool);

impl Guest {
    fn header(&self, ty: u32, sector: u64) -> D {
        self.mem.write_obj(ty, GuestAddress(HDR)).unwrap();
        self.mem.write_obj(0u32, GuestAddress(HDR + 4)).unwrap();
        self.mem.write_obj(sector, GuestAddress(HDR + 8)).unwrap();
        (HDR, 16, false)
    }

    /// Puts `chain` on the ring, kicks, and waits for its completion: (used len, status byte).
    fn submit(&mut self, chain: &[D]) -> (u32, u8) {
        self.mem.write_obj(0xffu8, GuestAddress(STATUS)).unwrap();
        for (i, &(addr, len, write)) in chain.iter().enumerate() {
            let mut flags = if write { VRING_DESC_F_WRITE } else { 0 } as u16;
            if i + 1 < chain.len() {
                flags |= VRING_DESC_F_NEXT as u16;
            }
            let d = DESC + 16 * i as u64;
            self.mem.write_obj(addr, GuestAddress(d)).unwrap();
            self.mem.write_obj(len, GuestAddress(d + 8)).unwrap();
            self.mem.write_obj(flags, GuestAddress(d + 12)).unwrap();
            self.mem
                .write_obj(i as u16 + 1, GuestAddress(d + 14))
                .unwrap();
        }
        let slot = u64::from(self.next_avail % QSIZE);
        self.mem
            .write_obj(0u16, GuestAddress(AVAIL + 4 + 2 * slot))
            .unwrap();
        // used_event: interrupt me as soon as anything beyond what I have seen is used.
        self.mem
            .write_obj(
                self.next_used,
                GuestAddress(AVAIL + 4 + 2 * u64::from(QSIZE)),
            )
            .unwrap();
        fence(Ordering::SeqCst);
        self.next_avail = self.next_avail.wrapping_add(1);
        self.mem
            .write_obj(self.next_avail, GuestAddress(AVAIL + 2))
            .unwrap();
        fence(Ordering::SeqCst);
        self.kick.write(1).unwrap();
        while self.used_idx() == self.next_used {
            self.call.read().unwrap();
        }
        let elem = USED + 4 + 8 * u64::from(self.next_used % QSIZE);
        let id: u32 = self.mem.read_obj(GuestAddress(elem)).unwrap();
        let len: u32 = self.mem.read_obj(GuestAddress(elem + 4)).unwrap();
        assert_eq!(id, 0, "head index");
        self.next_used = self.next_used.wrapping_add(1);
        (len, self.mem.read_obj(GuestAddress(STATUS)).unwrap())
    }

    fn used_idx(&self) -> u16 {
        fence(Ordering::SeqCst);
        self.mem.read_obj(GuestAddress(USED + 2)).unwrap()
    }

    fn fill(&self, addr: u64, len: usize, seed: u8) -> Vec<u8> {
        let v: Vec<u8> = (0..len)
            .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
            .collect();
        self.mem.write_slice(&v, GuestAddress(addr)).unwrap();
        v
    }

    fn read_back(&self, addr: u64, len: usize) -> Vec<u8> {
        let mut v = vec![0u8; len];
        self.mem.read_slice(&mut v, GuestAddress(addr)).unwrap();
        v
    }
}

/// GET_CONFIG by hand: Some(payload) on success, None for the empty (error) reply.
fn raw_get_config(s: &mut UnixStream, offset: u32, size: u32) -> Option<Vec<u8>> {
    const GET_CONFIG: u32 = 24;
    let mut msg = Vec::new();
    for v in [GET_CONFIG, 1, 12 + size, offset, size, 0] {
        msg.extend_from_slice(&v.to_le_bytes());
    }
    msg.resize(msg.len() + size as usize, 0);
    s.write_all(&msg).unwrap();
    let mut hdr = [0u8; 24];
    s.read_exact(&mut hdr).unwrap();
    let word = |i: usize| u32::from_le_bytes(hdr[i * 4..i * 4 + 4].try_into().unwrap());
    assert_eq!(word(0), GET_CONFIG);
    assert_eq!(word(3), offset);
    let n = word(4);
    assert_eq!(word(2), 12 + n);
    if n == 0 {
        return None;
    }
    assert_eq!(n, size, "a reply is either empty or exactly the size asked");
    let mut payload = vec![0u8; n as usize];
    s.read_exact(&mut payload).unwrap();
    Some(payload)
}

const OK: u8 = VIRTIO_BLK_S_OK as u8;
const IOERR: u8 = VIRTIO_BLK_S_IOERR as u8;
const UNSUPP: u8 = VIRTIO_BLK_S_UNSUPP as u8;
const ST: D = (STATUS, 1, true);

#[test]
fn negotiation_config_and_malformed_requests() {
    let d = dir();
    let img = create_image(d.path(), "disk.fvd", "8M");
    let mut srv = ServerProc::start(
        &img,
        &d.path().join("s.sock"),
        &["--serial", "fvd-test-serial", "--num-queues", "2"],
    );
    let (mut g, features) = attach(&srv.socket);
    for b in [
        VIRTIO_BLK_F_FLUSH,
        VIRTIO_BLK_F_CONFIG_WCE,
        VIRTIO_BLK_F_DISCARD,
        VIRTIO_RING_F_EVENT_IDX,
    ] {
        assert_ne!(features & bit(b), 0, "feature {b}");
    }
    assert_eq!(features & bit(VIRTIO_BLK_F_RO), 0);

    // GET_CONFIG as cloud-hypervisor/libblkio (60 bytes) and QEMU (57) ask for it.
    let (_, cfg) =
        g.fe.get_config(0, 60, VhostUserConfigFlags::WRITABLE, &[0; 60])
            .unwrap();
    assert_eq!(
        u64::from_le_bytes(cfg[0..8].try_into().unwrap()),
        (8 << 20) / 512
    );
    assert_eq!(cfg[32], 1, "write-back cache");
    assert_eq!(u16::from_le_bytes([cfg[34], cfg[35]]), 2);
    let (_, short) =
        g.fe.get_config(0, 57, VhostUserConfigFlags::WRITABLE, &[0; 57])
            .unwrap();
    assert_eq!(short[..], cfg[..57]);
    // Other in-range windows; out of range gets an empty (error) reply and the connection
    // carries on. (Raw messages: the vhost crate's frontend waits forever for a payload after
    // an error reply.)
    assert_eq!(raw_get_config(&mut g.raw, 32, 1), Some(vec![1]));
    assert_eq!(raw_get_config(&mut g.raw, 8, 52), Some(cfg[8..60].to_vec()));
    for (off, size) in [(0, 61), (59, 2), (0x100, 60), (0, 0xf00)] {
        assert_eq!(
            raw_get_config(&mut g.raw, off, size),
            None,
            "offset {off} size {size}"
        );
    }

    // A valid write and read.
    let data = g.fill(DATA, 4096, 1);
    let h = g.header(VIRTIO_BLK_T_OUT, 8);
    assert_eq!(g.submit(&[h, (DATA, 4096, false), ST]), (1, OK));
    g.fill(DATA, 4096, 2);
    let h = g.header(VIRTIO_BLK_T_IN, 8);
    assert_eq!(g.submit(&[h, (DATA, 4096, true), ST]), (4097, OK));
    assert_eq!(g.read_back(DATA, 4096), data);

    // Malformed chains get IOERR / UNSUPP in the status byte.
    let far = 64 << 20;
    // Discard ranges: sector 0, 8 sectors, flags = UNMAP (refused for discard); then a range
    // ending past the disk.
    g.mem.write_obj(0u64, GuestAddress(DATA)).unwrap();
    g.mem.write_obj(8u32, GuestAddress(DATA + 8)).unwrap();
    g.mem
        .write_obj(VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP, GuestAddress(DATA + 12))
        .unwrap();
    g.mem
        .write_obj((8u64 << 20) / 512 - 4, GuestAddress(DATA + 16))
        .unwrap();
    g.mem.write_obj(8u32, GuestAddress(DATA + 24)).unwrap();
    g.mem.write_obj(0u32, GuestAddress(DATA + 28)).unwrap();
    let mut case = |name: &str, first: Option<(u32, u64)>, rest: &[D], want: u8| {
        let mut chain = match first {
            Some((ty, sector)) => vec![g.header(ty, sector)],
            None => vec![],
        };
        chain.extend_from_slice(rest);
        assert_eq!(g.submit(&chain), (1, want), "{name}");
    };
    let (t_in, t_out, t_discard) = (VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT, VIRTIO_BLK_T_DISCARD);
    let end = (8 << 20) / 512;
    case("header too short", None, &[(HDR, 8, false), ST], IOERR);
    case(
        "header after the status",
        None,
        &[ST, (HDR, 16, false)],
        IOERR,
    );
    case(
        "header outside guest memory",
        None,
        &[(far, 16, false), ST],
        IOERR,
    );
    case(
        "read into a readable buffer",
        Some((t_in, 0)),
        &[(DATA, 512, false), ST],
        IOERR,
    );
    case(
        "write from a writable buffer",
        Some((t_out, 0)),
        &[(DATA, 512, true), ST],
        IOERR,
    );
    case(
        "buffer outside guest memory",
        Some((t_in, 0)),
        &[(far, 512, true), ST],
        IOERR,
    );
    case(
        "sector past the end",
        Some((t_in, end)),
        &[(DATA, 512, true), ST],
        IOERR,
    );
    case(
        "sector overflow",
        Some((t_out, u64::MAX / 2)),
        &[(DATA, 512, false), ST],
        IOERR,
    );
    case(
        "length not a multiple of 512",
        Some((t_out, 0)),
        &[(DATA, 700, false), ST],
        IOERR,
    );
    case("unknown type", Some((0x77, 0)), &[ST], UNSUPP);
    case(
        "discard with the unmap flag",
        Some((t_discard, 0)),
        &[(DATA, 16, false), ST],
        UNSUPP,
    );
    case(
        "discard past the end",
        Some((t_discard, 0)),
        &[(DATA + 16, 16, false), ST],
        IOERR,
    );
    // No writable byte at all: returned with length 0, nothing written.
    let h = g.header(VIRTIO_BLK_T_FLUSH, 0);
    assert_eq!(g.submit(&[h, (STATUS, 1, false)]), (0, 0xff));
    // A status byte outside guest memory: also length 0.
    let h = g.header(VIRTIO_BLK_T_FLUSH, 0);
    assert_eq!(g.submit(&[h, (far, 1, true)]).0, 0);

    // Still serving: GET_ID, flush and the data written before.
    let h = g.header(VIRTIO_BLK_T_GET_ID, 0);
    assert_eq!(g.submit(&[h, (DATA, 20, true), ST]), (21, OK));
    assert_eq!(&g.read_back(DATA, 20)[..15], b"fvd-test-serial");
    let h = g.header(VIRTIO_BLK_T_FLUSH, 0);
    assert_eq!(g.submit(&[h, ST]), (1, OK));
    let h = g.header(VIRTIO_BLK_T_IN, 8);
    assert_eq!(g.submit(&[h, (DATA, 4096, true), ST]), (4097, OK));
    assert_eq!(g.read_back(DATA, 4096), data);

    // Stopping the ring reports where the device got to.
    assert_eq!(g.fe.get_vring_base(0).unwrap(), u32::from(g.next_avail));
    drop(g);
    assert!(srv.alive());
    // And the next frontend is served.
    let (mut g, _) = attach(&srv.socket);
    let h = g.header(VIRTIO_BLK_T_IN, 8);
    assert_eq!(g.submit(&[h, (DATA, 4096, true), ST]), (4097, OK));
    assert_eq!(g.read_back(DATA, 4096), data);
    drop(g);
    assert!(srv.terminate().success());
}

#[test]
fn readonly_device_refuses_writes_at_the_protocol_level() {
    let d = dir();
    let img = create_image(d.path(), "disk.fvd", "8M");
    let mut srv = ServerProc::start(&img, &d.path().join("s.sock"), &["--readonly"]);
    let (mut g, features) = attach(&srv.socket);
    assert_ne!(features & bit(VIRTIO_BLK_F_RO), 0);
    assert_eq!(features & bit(VIRTIO_BLK_F_DISCARD), 0);
    g.fill(DATA, 512, 3);
    let h = g.header(VIRTIO_BLK_T_OUT, 0);
    assert_eq!(g.submit(&[h, (DATA, 512, false), ST]), (1, IOERR));
    let h = g.header(VIRTIO_BLK_T_WRITE_ZEROES, 0);
    assert_eq!(g.submit(&[h, (DATA, 16, false), ST]).1, IOERR);
    let h = g.header(VIRTIO_BLK_T_IN, 0);
    assert_eq!(g.submit(&[h, (DATA, 512, true), ST]), (513, OK));
    assert_eq!(g.read_back(DATA, 512), vec![0; 512]);
    drop(g);
    assert!(srv.alive());
}
