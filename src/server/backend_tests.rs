//! `BlkBackend` over virtio-queue's mock split queue (as the rust-vmm vhost-device crates test
//! theirs): requests built in guest memory, completed against a raw image through the real
//! io_uring worker, answered in the used ring, and the guest signalled as it asked.

use super::*;
use crate::engine::{self, Format};
use crate::io::host_file::OpenMode;
use crate::server::request::ID_LEN;
use crate::server::sigbus;
use std::fs::File;
use std::io::Read;
use std::os::fd::FromRawFd;
use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::time::Instant;
use vhost_user_backend::VringT;
use virtio_bindings::virtio_blk::*;
use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::desc::split::Descriptor as SplitDescriptor;
use virtio_queue::desc::RawDescriptor;
use virtio_queue::mock::MockSplitQueue;
use vm_memory::{Bytes, GuestAddress};

const QSIZE: u16 = 16;
const CAPACITY: u64 = 1 << 20;
/// Request headers, data and status bytes live from here on; the rings below it.
const DATA: u64 = 0x1_0000;
const SERIAL: &[u8] = b"unit-test-serial";
/// The used ring, away from the mock's: `MockSplitQueue` (virtio-queue 0.18) puts its used ring
/// right after the available ring's first `len` bytes rather than its `4 + 2 * len + 2`, so the
/// two overlap from entry `len / 2` on (and the used ring's entries overwrite `used_event`).
const USED_RING: u64 = 0x8000;

/// One queue of a backend serving a raw image, with the guest's memory and call eventfd.
struct Rig {
    _dir: tempfile::TempDir,
    image: PathBuf,
    mem: GuestMemory,
    backend: BlkBackend,
    vring: Vring,
    /// Read side of the queue's call eventfd.
    call: File,
}

impl Rig {
    fn new() -> Rig {
        let dir = tempfile::tempdir().unwrap();
        let image = dir.path().join("disk.raw");
        std::fs::write(&image, vec![0u8; CAPACITY as usize]).unwrap();
        let control = Arc::new(Control::new().unwrap());
        let disk = control
            .block_on(engine::open_disk_with(
                control.io(),
                &image,
                OpenMode::ReadWrite,
                Some(Format::Raw),
            ))
            .unwrap();
        let device = DeviceConfig {
            capacity: CAPACITY,
            block_size: 512,
            optimal_io: 0,
            read_only: false,
            discard: true,
            num_queues: 1,
            queue_size: QSIZE,
            writeback: true,
        };
        let mut serial = [0u8; ID_LEN];
        serial[..SERIAL.len()].copy_from_slice(SERIAL);
        let ctx = Arc::new(Ctx {
            disk: Arc::new(disk),
            serial,
            write_through: AtomicBool::new(false),
            limits: device.limits(),
            signal_each: false,
            sigbus_base: sigbus::faults(),
            conn: Mutex::new(None),
            stopping: AtomicBool::new(false),
            log: Default::default(),
            events: Arc::new(crate::server::qmp::events::EventSink::new().unwrap()),
            stats: Arc::new(crate::server::stats::Stats::new(1)),
            backend_req: Default::default(),
            throttle: Arc::new(crate::server::throttle::Throttle::new(
                Default::default(),
                Box::<crate::server::throttle::MonotonicClock>::default(),
            )),
        });
        let backend = BlkBackend::new(ctx, device, control).unwrap();
        let mem = GuestMemory::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        // What the daemon does on SET_MEM_TABLE: the backend's map is replaced in place.
        backend.memory().lock().unwrap().replace(mem.clone());
        let vring = Vring::new(backend.memory(), QSIZE).unwrap();
        // SAFETY: a fresh eventfd, owned by nothing else; `File` takes ownership of it.
        let fd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
        assert!(fd >= 0, "eventfd: {}", io::Error::last_os_error());
        // SAFETY: `fd` is a valid descriptor that only this `File` owns.
        let call = unsafe { File::from_raw_fd(fd) };
        vring.set_call(Some(call.try_clone().unwrap()));
        Rig {
            _dir: dir,
            image,
            mem,
            backend,
            vring,
            call,
        }
    }

    /// A mock queue in guest memory, the vring pointed at its rings as SET_VRING_ADDR and
    /// friends do.
    fn queue(&self, event_idx: bool) -> MockSplitQueue<'_, GuestMemory> {
        let mq = MockSplitQueue::new(&self.mem, QSIZE);
        self.vring.set_queue_size(QSIZE);
        self.vring
            .set_queue_info(mq.desc_table_addr().0, mq.avail_addr().0, USED_RING)
            .unwrap();
        self.vring.set_queue_event_idx(event_idx);
        self.vring.set_queue_ready(true);
        mq
    }

    /// A kick: the backend takes what is available, then runs its worker until the used ring
    /// holds `used` entries.
    fn kick_and_wait(&self, used: u16) {
        let vrings = std::slice::from_ref(&self.vring);
        self.backend
            .handle_event(0, EventSet::IN, vrings, 0)
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        let token = self.backend.uring_token() as u16;
        while self.used_idx() != used {
            assert!(
                Instant::now() < deadline,
                "used index {} after 10 s, want {used}",
                self.used_idx()
            );
            std::thread::sleep(Duration::from_millis(1));
            self.backend
                .handle_event(token, EventSet::IN, vrings, 0)
                .unwrap();
        }
        assert_eq!(self.backend.workers[0].worker.lock().inflight(), 0);
    }

    fn used_idx(&self) -> u16 {
        self.mem.read_obj(GuestAddress(USED_RING + 2)).unwrap()
    }

    /// Used ring entry `i`: (head, length written).
    fn used(&self, i: u16) -> (u32, u32) {
        let at = USED_RING + 4 + 8 * u64::from(i % QSIZE);
        let id = self.mem.read_obj(GuestAddress(at)).unwrap();
        let len = self.mem.read_obj(GuestAddress(at + 4)).unwrap();
        (id, len)
    }

    fn status(&self, addr: u64) -> u8 {
        self.mem.read_obj(GuestAddress(addr)).unwrap()
    }

    /// Signals the guest received since the last call.
    fn signals(&self) -> u64 {
        let mut v = [0u8; 8];
        match (&self.call).read(&mut v) {
            Ok(_) => u64::from_ne_bytes(v),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => 0,
            Err(e) => panic!("call eventfd: {e}"),
        }
    }
}

/// Where request `n`'s parts go in guest memory: header, data, status.
struct Slot3 {
    hdr: u64,
    data: u64,
    status: u64,
}

/// Writes request `n`'s header (type, sector) and a status byte the device must overwrite.
fn prepare(mem: &GuestMemory, n: u64, ty: u32, sector: u64) -> Slot3 {
    let base = DATA + n * 0x2000;
    let s = Slot3 {
        hdr: base,
        data: base + 0x1000,
        status: base + 0x100,
    };
    let mut h = [0u8; 16];
    h[0..4].copy_from_slice(&ty.to_le_bytes());
    h[8..16].copy_from_slice(&sector.to_le_bytes());
    mem.write_slice(&h, GuestAddress(s.hdr)).unwrap();
    mem.write_obj(0xffu8, GuestAddress(s.status)).unwrap();
    s
}

impl Slot3 {
    /// The usual chain: header, `data` bytes of data (device-writable or not), status.
    fn chain(&self, data: u32, writable: bool) -> Vec<(u64, u32, bool)> {
        let mut c = vec![(self.hdr, 16, false)];
        if data > 0 {
            c.push((self.data, data, writable));
        }
        c.push((self.status, 1, true));
        c
    }
}

/// Puts a chain of (address, length, device-writable) descriptors at table index `first` and
/// makes it available (the driver's part of the split ring protocol).
fn offer(mq: &MockSplitQueue<GuestMemory>, first: u16, descs: &[(u64, u32, bool)]) {
    let raw: Vec<RawDescriptor> = descs
        .iter()
        .enumerate()
        .map(|(i, &(addr, len, write))| {
            let mut flags = if write { VRING_DESC_F_WRITE as u16 } else { 0 };
            if i + 1 < descs.len() {
                flags |= VRING_DESC_F_NEXT as u16;
            }
            let next = first + i as u16 + 1;
            RawDescriptor::from(SplitDescriptor::new(addr, len, flags, next))
        })
        .collect();
    mq.add_desc_chains(&raw, first).unwrap();
}

fn pattern(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i * 7 + i / 512) as u8).collect()
}

#[test]
fn write_read_flush_get_id_complete_with_status_and_used_length() {
    let rig = Rig::new();
    let mq = rig.queue(false);
    let m = &rig.mem;
    let data = pattern(4096);

    let w = prepare(m, 0, VIRTIO_BLK_T_OUT, 8);
    m.write_slice(&data, GuestAddress(w.data)).unwrap();
    offer(&mq, 0, &w.chain(4096, false));
    rig.kick_and_wait(1);
    assert_eq!(rig.used(0), (0, 1), "a write returns only its status byte");
    assert_eq!(rig.status(w.status), VIRTIO_BLK_S_OK as u8);
    let on_disk = std::fs::read(&rig.image).unwrap();
    assert_eq!(on_disk[8 * 512..8 * 512 + 4096], data[..]);

    let r = prepare(m, 1, VIRTIO_BLK_T_IN, 8);
    offer(&mq, 3, &r.chain(4096, true));
    rig.kick_and_wait(2);
    assert_eq!(rig.used(1), (3, 4097), "a read returns its data and status");
    assert_eq!(rig.status(r.status), VIRTIO_BLK_S_OK as u8);
    let mut back = vec![0u8; 4096];
    m.read_slice(&mut back, GuestAddress(r.data)).unwrap();
    assert_eq!(back, data);

    let f = prepare(m, 2, VIRTIO_BLK_T_FLUSH, 0);
    let g = prepare(m, 3, VIRTIO_BLK_T_GET_ID, 0);
    offer(&mq, 6, &f.chain(0, false));
    offer(&mq, 8, &g.chain(ID_LEN as u32, true));
    rig.kick_and_wait(4);
    // Both run at once: either may finish first.
    let mut done = [rig.used(2), rig.used(3)];
    done.sort();
    assert_eq!(done, [(6, 1), (8, ID_LEN as u32 + 1)]);
    assert_eq!(rig.status(f.status), VIRTIO_BLK_S_OK as u8);
    assert_eq!(rig.status(g.status), VIRTIO_BLK_S_OK as u8);
    let mut id = [0u8; ID_LEN];
    m.read_slice(&mut id, GuestAddress(g.data)).unwrap();
    assert_eq!(&id[..SERIAL.len()], SERIAL);
    assert!(id[SERIAL.len()..].iter().all(|&b| b == 0));
}

#[test]
fn bad_chains_are_answered_without_touching_the_disk() {
    let rig = Rig::new();
    let mq = rig.queue(false);
    let m = &rig.mem;
    std::fs::write(&rig.image, pattern(CAPACITY as usize)).unwrap();

    // A write whose data the device would have to write into (wrong direction).
    let a = prepare(m, 0, VIRTIO_BLK_T_OUT, 0);
    offer(&mq, 0, &a.chain(512, true));
    // An unknown request type.
    let b = prepare(m, 1, 0x7777, 0);
    offer(&mq, 3, &b.chain(0, false));
    // A read past the end of the disk.
    let c = prepare(m, 2, VIRTIO_BLK_T_IN, CAPACITY / 512);
    offer(&mq, 5, &c.chain(512, true));
    // No writable status byte: nothing can be said, the chain is returned with length 0.
    let d = prepare(m, 3, VIRTIO_BLK_T_FLUSH, 0);
    offer(&mq, 8, &[(d.hdr, 16, false), (d.status, 1, false)]);
    // A data descriptor outside guest memory.
    let e = prepare(m, 4, VIRTIO_BLK_T_OUT, 0);
    offer(
        &mq,
        10,
        &[
            (e.hdr, 16, false),
            (1 << 40, 512, false),
            (e.status, 1, true),
        ],
    );

    rig.kick_and_wait(5);
    let used: Vec<(u32, u32)> = (0..5).map(|i| rig.used(i)).collect();
    assert_eq!(used, [(0, 1), (3, 1), (5, 1), (8, 0), (10, 1)]);
    assert_eq!(rig.status(a.status), VIRTIO_BLK_S_IOERR as u8);
    assert_eq!(rig.status(b.status), VIRTIO_BLK_S_UNSUPP as u8);
    assert_eq!(rig.status(c.status), VIRTIO_BLK_S_IOERR as u8);
    assert_eq!(
        rig.status(d.status),
        0xff,
        "a read-only status byte is left alone"
    );
    assert_eq!(rig.status(e.status), VIRTIO_BLK_S_IOERR as u8);
    assert_eq!(
        std::fs::read(&rig.image).unwrap(),
        pattern(CAPACITY as usize),
        "a rejected write reached the disk"
    );
}

/// Without EVENT_IDX the guest is signalled once per batch; with it, only when the used index
/// passes the `used_event` the guest wrote, and the device publishes in `avail_event` where it
/// wants the next kick.
#[test]
fn signals_follow_the_guests_suppression() {
    let request = |rig: &Rig, mq: &MockSplitQueue<GuestMemory>, n: u16, ty: u32| {
        let s = prepare(&rig.mem, u64::from(n), ty, 0);
        offer(mq, 2 * (n % 8), &s.chain(0, false));
    };
    let flush = |rig: &Rig, mq: &MockSplitQueue<GuestMemory>, n: u16| {
        request(rig, mq, n, VIRTIO_BLK_T_FLUSH)
    };
    let rig = Rig::new();
    let mq = rig.queue(false);
    // Unknown types are answered as they are taken, so both are published in one batch (two
    // flushes may finish in two).
    request(&rig, &mq, 0, 0x7777);
    request(&rig, &mq, 1, 0x7777);
    rig.kick_and_wait(2);
    assert_eq!(rig.signals(), 1, "one signal for the batch");
    // VRING_AVAIL_F_NO_INTERRUPT is only a hint, which virtio-queue does not follow: the
    // guest is still signalled.
    rig.mem
        .write_obj(1u16, GuestAddress(mq.avail_addr().0))
        .unwrap();
    flush(&rig, &mq, 2);
    rig.kick_and_wait(3);
    assert_eq!(rig.signals(), 1);

    let rig = Rig::new();
    let mq = rig.queue(true);
    let used_event = GuestAddress(mq.avail_addr().0 + 4 + 2 * u64::from(QSIZE));
    let avail_event = GuestAddress(USED_RING + 4 + 8 * u64::from(QSIZE));
    // Signal when the used index moves past 0.
    rig.mem.write_obj(0u16, used_event).unwrap();
    flush(&rig, &mq, 0);
    rig.kick_and_wait(1);
    assert_eq!(rig.signals(), 1);
    assert_eq!(
        rig.mem.read_obj::<u16>(avail_event).unwrap(),
        1,
        "the next kick is wanted for available entry 1"
    );
    // Only once the used index passes 3.
    rig.mem.write_obj(3u16, used_event).unwrap();
    flush(&rig, &mq, 1);
    rig.kick_and_wait(2);
    flush(&rig, &mq, 2);
    rig.kick_and_wait(3);
    assert_eq!(rig.signals(), 0, "used_event 3 not reached");
    flush(&rig, &mq, 3);
    rig.kick_and_wait(4);
    assert_eq!(rig.signals(), 1, "used index passed used_event");
}
