//! Inflight I/O tracking (VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD) and the orderly stop, at the
//! vhost-user protocol level with the `vhost` crate's frontend, as QEMU drives them: requests in
//! flight when the server is killed are resubmitted by the next one (oldest first) and complete
//! exactly once; hostile regions are refused without harm; GET_VRING_BASE and SIGTERM publish
//! every request taken before the ring position is reported or the socket closes. Requests are
//! held in flight for real by a base image on a stopped (SIGSTOP) `qemu-nbd`.

mod serve_support;

use serve_support::guest::{
    guest_memory_of, make_available, negotiate, region_of, seal_size, sealable_memfd, start_queue0,
    still_serves, wait_readable, write_chain, D, TIMEOUT,
};
use serve_support::{create_image, dir, fvd, KillGuard, ServerProc};
use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{fence, Ordering};
use std::time::{Duration, Instant};
use vhost::vhost_user::message::VhostUserInflight;
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::VhostBackend;
use virtio_bindings::virtio_blk::*;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

const MEM: usize = 4 << 20;
/// Queue size; request slot `s` uses descriptors 3s..3s+2 (head 3s).
const Q: u16 = 32;
const DESC: u64 = 0;
const AVAIL: u64 = 0x1000;
const USED: u64 = 0x2000;
const HDRS: u64 = 0x3000;
const STATS: u64 = 0x4000;
const DATA: u64 = 0x10000;
const SLOT: u64 = 64 << 10;
/// Bytes of one queue's part of the region (libvhost-user's layout).
const PART: u64 = (16 + 16 * Q as u64).div_ceil(64) * 64;

/// Guest memory with queue 0 laid out by hand; it outlives connections and servers, as a
/// guest's does.
struct Guest {
    mem: GuestMemoryMmap<()>,
    next_avail: u16,
}

impl Guest {
    fn new() -> Guest {
        Guest {
            mem: guest_memory_of(MEM),
            next_avail: 0,
        }
    }

    /// Puts request `slot` (head 3 * slot) on the available ring without a kick. `len` bytes of
    /// data at `DATA + slot * SLOT`, none for a flush.
    fn post(&mut self, slot: u16, ty: u32, sector: u64, len: u32) {
        let s = u64::from(slot);
        let hdr = HDRS + 16 * s;
        self.mem.write_obj(ty, GuestAddress(hdr)).unwrap();
        self.mem.write_obj(0u32, GuestAddress(hdr + 4)).unwrap();
        self.mem.write_obj(sector, GuestAddress(hdr + 8)).unwrap();
        self.mem.write_obj(0xffu8, GuestAddress(STATS + s)).unwrap();
        let writes = ty == VIRTIO_BLK_T_IN || ty == VIRTIO_BLK_T_GET_ID;
        let mut chain: Vec<D> = vec![(hdr, 16, false)];
        if len > 0 {
            chain.push((DATA + s * SLOT, len, writes));
        }
        chain.push((STATS + s, 1, true));
        let head = 3 * slot;
        write_chain(&self.mem, DESC, head, &chain);
        make_available(&self.mem, AVAIL, Q, &mut self.next_avail, head);
    }

    fn used_idx(&self) -> u16 {
        fence(Ordering::SeqCst);
        self.mem.read_obj(GuestAddress(USED + 2)).unwrap()
    }

    /// Used ring entry `i`: (head, length).
    fn used(&self, i: u16) -> (u32, u32) {
        let e = USED + 4 + 8 * u64::from(i % Q);
        (
            self.mem.read_obj(GuestAddress(e)).unwrap(),
            self.mem.read_obj(GuestAddress(e + 4)).unwrap(),
        )
    }

    fn status(&self, slot: u16) -> u8 {
        self.mem
            .read_obj(GuestAddress(STATS + u64::from(slot)))
            .unwrap()
    }

    fn data(&self, slot: u16, len: usize) -> Vec<u8> {
        let mut v = vec![0u8; len];
        self.mem
            .read_slice(&mut v, GuestAddress(DATA + u64::from(slot) * SLOT))
            .unwrap();
        v
    }

    fn fill(&self, slot: u16, data: &[u8]) {
        self.mem
            .write_slice(data, GuestAddress(DATA + u64::from(slot) * SLOT))
            .unwrap();
    }

    /// Waits until the used index reaches `n`.
    fn wait_used(&self, n: u16, limit: Duration) {
        let t0 = Instant::now();
        while self.used_idx() != n {
            assert!(
                t0.elapsed() < limit,
                "used index {} after {limit:?}, expected {n}",
                self.used_idx()
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

/// A connected frontend, queue 0 set up as QEMU does it.
struct Conn {
    fe: Frontend,
    raw: UnixStream,
    kick: EventFd,
    _call: EventFd,
}

/// The inflight region the frontend keeps across servers: its description and fd.
type Inflight = (VhostUserInflight, File);

/// Negotiates (INFLIGHT_SHMFD included), maps `g`'s memory, hands over the inflight region
/// (asking the server for one first if there is none yet) and starts queue 0 at `base`.
fn connect(socket: &Path, g: &Guest, inflight: &mut Option<Inflight>, base: u16) -> Conn {
    let (mut fe, raw, _) = negotiate(socket);
    fe.set_mem_table(&[region_of(&g.mem)]).unwrap();
    if inflight.is_none() {
        let asked = VhostUserInflight::new(0, 0, 1, Q);
        let (msg, file) = fe.get_inflight_fd(&asked).unwrap();
        assert_eq!((msg.num_queues, msg.queue_size), (1, Q));
        assert_eq!(msg.mmap_size, PART);
        assert_eq!(file.metadata().unwrap().len(), PART);
        *inflight = Some((msg, file));
    }
    let (msg, file) = inflight.as_ref().unwrap();
    fe.set_inflight_fd(msg, file.as_raw_fd()).unwrap();
    start_queue(fe, raw, g, base, Q).unwrap()
}

/// SET_VRING_NUM to SET_VRING_ENABLE for queue 0 (`size` descriptors, starting at `base`).
fn start_queue(
    mut fe: Frontend,
    raw: UnixStream,
    g: &Guest,
    base: u16,
    size: u16,
) -> Result<Conn, vhost::Error> {
    let (call, kick) = start_queue0(&mut fe, &g.mem, (DESC, AVAIL, USED), size, base)?;
    Ok(Conn {
        fe,
        raw,
        kick,
        _call: call,
    })
}

/// The region's inflight flag of descriptor `head` (queue 0).
fn flag(f: &File, head: u16) -> u8 {
    let mut b = [0u8];
    f.read_exact_at(&mut b, 16 + 16 * u64::from(head)).unwrap();
    b[0]
}

fn put(f: &File, off: u64, bytes: &[u8]) {
    f.write_all_at(bytes, off).unwrap();
}

/// Heads flagged in flight in queue 0's part.
fn flagged(f: &File) -> Vec<u16> {
    (0..Q).filter(|&h| flag(f, h) != 0).collect()
}

/// A memfd of `len` bytes, sealed against shrinking and growing if `sealed`.
fn region_file(len: u64, sealed: bool) -> File {
    let f = sealable_memfd(len);
    if sealed {
        seal_size(&f).unwrap();
    }
    f
}

/// Writes a valid header for queue 0: version 1, [`Q`] descriptors.
fn valid_header(f: &File) {
    put(f, 8, &1u16.to_le_bytes()); // version
    put(f, 10, &Q.to_le_bytes()); // desc_num
}

/// A `qemu-nbd` exporting a 4 MiB raw base read-only on a unix socket; killed when dropped.
struct Nbd {
    child: Child,
    uri: String,
}

impl Nbd {
    fn start(dir: &Path) -> (Nbd, Vec<u8>) {
        let data: Vec<u8> = (0..4usize << 20)
            .map(|i| ((i / 8) as u32).wrapping_mul(0x9e37_79b9).to_le_bytes()[i % 4] ^ i as u8)
            .collect();
        let base = dir.join("base.raw");
        std::fs::write(&base, &data).unwrap();
        let sock = dir.join("nbd.sock");
        let pid_file = dir.join("nbd.pid");
        let child = Command::new("qemu-nbd")
            .args(["--read-only", "--persistent", "--shared=0", "--format=raw"])
            .arg("--export-name=base")
            .arg(format!("--pid-file={}", pid_file.display()))
            .arg(format!("--socket={}", sock.display()))
            .arg(&base)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .spawn()
            .expect("qemu-nbd (qemu-utils) must be installed: run integration/setup-host.sh");
        let t0 = Instant::now();
        while !std::fs::metadata(&pid_file).is_ok_and(|m| m.len() > 0) {
            assert!(
                t0.elapsed() < Duration::from_secs(60),
                "qemu-nbd never started"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        let uri = format!("nbd+unix:///base?socket={}", sock.display());
        (Nbd { child, uri }, data)
    }

    fn signal(&self, sig: i32) {
        // SAFETY: kill(2) on our own unreaped child.
        assert_eq!(unsafe { libc::kill(self.child.id() as i32, sig) }, 0);
    }
}

impl Drop for Nbd {
    fn drop(&mut self) {
        self.signal(libc::SIGCONT);
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// An 8 MiB FVD image over the NBD base, and a server for it with one queue.
fn image_on_nbd(d: &Path, nbd: &Nbd) -> PathBuf {
    let img = d.join("img.fvd");
    let o = fvd()
        .arg("create")
        .arg(&img)
        .args(["-b", &nbd.uri, "-s", "8M"])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    img
}

fn serve(img: &Path, sock: &Path) -> ServerProc {
    ServerProc::start(img, sock, &["--num-queues", "1", "--no-prefetch"])
}

const K64: u32 = 64 << 10;
const MIB: u64 = (1 << 20) / 512;

/// SIGKILLs the server and waits until it is gone (its connection's socket still open).
fn kill(mut srv: ServerProc) {
    srv.signal(libc::SIGKILL);
    let t0 = Instant::now();
    while srv.alive() {
        assert!(t0.elapsed() < TIMEOUT);
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Waits until the region flags at least `n` requests in flight.
fn wait_flagged(f: &File, n: usize) {
    let t0 = Instant::now();
    while flagged(f).len() < n {
        assert!(
            t0.elapsed() < TIMEOUT,
            "only {:?} flagged in flight",
            flagged(f)
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Reads are taken from the base while `qemu-nbd` is stopped and the server is killed with
/// SIGKILL. The next server, given the same region and the used index as VRING_BASE (what
/// QEMU does after a crash), resubmits exactly the requests in flight: each completes once,
/// with the right data, and writes made before and after are all there.
#[test]
fn requests_in_flight_survive_a_killed_server() {
    let d = dir();
    let OnNbd {
        nbd,
        base,
        img,
        sock,
        srv,
        guard: _guard,
        mut g,
        c,
        mut inflight,
    } = on_nbd(d.path());
    let region = &inflight.as_ref().unwrap().1;

    // A write past the base, and a base read that opens the NBD connection.
    let w0: Vec<u8> = (0..K64).map(|i| (i % 251) as u8).collect();
    g.fill(0, &w0);
    g.post(0, VIRTIO_BLK_T_OUT, 6 * MIB, K64);
    g.post(1, VIRTIO_BLK_T_IN, 0, K64);
    c.kick.write(1).unwrap();
    g.wait_used(2, TIMEOUT);
    g.post(7, VIRTIO_BLK_T_FLUSH, 0, 0);
    c.kick.write(1).unwrap();
    g.wait_used(3, TIMEOUT);
    assert_eq!(flagged(region), Vec::<u16>::new());

    nbd.signal(libc::SIGSTOP);
    // Base reads (held by the stopped qemu-nbd), a write past the base and a flush.
    let reads = [(2u16, MIB), (3, 2 * MIB), (4, 3 * MIB), (5, 3 * MIB + 128)];
    for &(slot, sector) in &reads {
        g.post(slot, VIRTIO_BLK_T_IN, sector, K64);
    }
    // A request that completes at once.
    g.post(6, VIRTIO_BLK_T_GET_ID, 0, 20);
    c.kick.write(1).unwrap();
    wait_flagged(region, reads.len());
    std::thread::sleep(Duration::from_millis(200));
    kill(srv);
    drop(c);
    // The region names exactly the requests taken and not in the used ring.
    let posted: Vec<u16> = (0..8).map(|s| 3 * s).collect();
    assert_eq!(g.next_avail, 8);
    let used_before = g.used_idx();
    let done: Vec<u16> = (0..used_before).map(|i| g.used(i).0 as u16).collect();
    let mut expect: Vec<u16> = posted
        .iter()
        .copied()
        .filter(|h| !done.contains(h))
        .collect();
    expect.sort();
    assert_eq!(flagged(region), expect, "used so far: {done:?}");
    for &(slot, _) in &reads {
        assert!(
            expect.contains(&(3 * slot)),
            "read {slot} was not in flight"
        );
    }

    nbd.signal(libc::SIGCONT);
    let srv = serve(&img, &sock);
    let _guard = srv.kill_after(Duration::from_secs(120));
    // No kick: the new server looks at the ring by itself.
    let c = connect(&sock, &g, &mut inflight, used_before);
    let region = &inflight.as_ref().unwrap().1;
    g.wait_used(8, Duration::from_secs(30));
    let mut heads: Vec<u16> = (0..8).map(|i| g.used(i).0 as u16).collect();
    heads.sort();
    assert_eq!(heads, posted, "every request completes exactly once");
    for s in 0..8 {
        assert_eq!(g.status(s), 0, "slot {s}");
    }
    for &(slot, sector) in &reads {
        let at = (sector * 512) as usize;
        assert!(
            g.data(slot, K64 as usize) == base[at..at + K64 as usize],
            "read {slot}"
        );
        let len = (0..8)
            .map(|i| g.used(i))
            .find(|u| u.0 == 3 * u32::from(slot));
        assert_eq!(len.unwrap().1, K64 + 1);
    }
    assert_eq!(flagged(region), Vec::<u16>::new());
    // Nothing more arrives (no second completion of anything).
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(g.used_idx(), 8);

    // The flushed write is on the disk.
    g.post(8, VIRTIO_BLK_T_IN, 6 * MIB, K64);
    c.kick.write(1).unwrap();
    g.wait_used(9, TIMEOUT);
    assert!(g.data(8, K64 as usize) == w0);
    drop(c);
    let st = srv.terminate_within(Duration::from_secs(15)).unwrap();
    assert!(st.success(), "{st}");
}

/// Requests a crashed server left in flight are resubmitted oldest (lowest counter) first,
/// before anything new on the ring, and without a kick. GET_ID completes as soon as it runs,
/// so the used ring shows the order.
#[test]
fn resubmission_follows_the_counters() {
    let d = dir();
    let img = create_image(d.path(), "disk.fvd", "8M");
    let srv = ServerProc::start(
        &img,
        &d.path().join("s.sock"),
        &["--num-queues", "1", "--serial", "inflight-order"],
    );
    let _guard = srv.kill_after(Duration::from_secs(60));
    let mut g = Guest::new();
    // What a crashed server leaves: heads 0, 3, 6 taken (counters 20, 30, 10), none used.
    for slot in 0..3 {
        g.post(slot, VIRTIO_BLK_T_GET_ID, 0, 20);
    }
    // And one the guest added afterwards.
    g.post(3, VIRTIO_BLK_T_GET_ID, 0, 20);
    let (mut fe, raw, _) = negotiate(&srv.socket);
    fe.set_mem_table(&[region_of(&g.mem)]).unwrap();
    let (msg, file) = fe
        .get_inflight_fd(&VhostUserInflight::new(0, 0, 1, Q))
        .unwrap();
    valid_header(&file);
    for (head, counter) in [(0u16, 20u64), (3, 30), (6, 10)] {
        let at = 16 + 16 * u64::from(head);
        put(&file, at, &[1]);
        put(&file, at + 8, &counter.to_le_bytes());
    }
    fe.set_inflight_fd(&msg, file.as_raw_fd()).unwrap();
    let c = start_queue(fe, raw, &g, 0, Q).unwrap();
    g.wait_used(4, TIMEOUT);
    let order: Vec<u32> = (0..4).map(|i| g.used(i).0).collect();
    assert_eq!(order, vec![6, 0, 3, 9]);
    for s in 0..4 {
        assert_eq!(g.status(s), 0);
        assert_eq!(&g.data(s, 14), b"inflight-order");
    }
    assert_eq!(flagged(&file), Vec::<u16>::new());
    let mut used = [0u8; 2];
    file.read_exact_at(&mut used, 14).unwrap();
    assert_eq!(u16::from_le_bytes(used), 4, "the region's used index");
    drop(c);
    let st = srv.terminate_within(Duration::from_secs(15)).unwrap();
    assert!(st.success(), "{st}");
}

/// A region handed over with SET_INFLIGHT_FD that must be refused.
struct Bad {
    name: &'static str,
    file_len: u64,
    /// The size SET_INFLIGHT_FD says the region has.
    size: u64,
    queues: u16,
    queue_size: u16,
    sealed: bool,
    /// Starts with [`valid_header`], then `puts`.
    valid_header: bool,
    /// (offset, bytes) written to the region.
    puts: Vec<(u64, Vec<u8>)>,
}

impl Bad {
    /// A sealed region of the right size for one queue of [`Q`] descriptors, holding `puts`.
    fn new(name: &'static str, puts: &[(u64, &[u8])]) -> Bad {
        Bad {
            name,
            file_len: PART,
            size: PART,
            queues: 1,
            queue_size: Q,
            sealed: true,
            valid_header: false,
            puts: puts.iter().map(|&(at, b)| (at, b.to_vec())).collect(),
        }
    }

    /// As [`Bad::new`], over a valid header.
    fn valid_but(name: &'static str, puts: &[(u64, &[u8])]) -> Bad {
        Bad {
            valid_header: true,
            ..Bad::new(name, puts)
        }
    }
}

/// Inflight regions that lie about their size, offset, geometry or contents fail the message
/// that hands them over (or the vring start that reads them); the server neither crashes nor
/// reads outside the file, and serves the next frontend.
#[test]
fn hostile_inflight_regions_are_refused() {
    let d = dir();
    let img = create_image(d.path(), "disk.fvd", "8M");
    let mut srv = ServerProc::start(&img, &d.path().join("s.sock"), &["--num-queues", "1"]);
    let _guard = srv.kill_after(Duration::from_secs(120));
    let g = Guest::new();
    let cases = [
        Bad {
            file_len: 100,
            ..Bad::new("file too small", &[])
        },
        Bad {
            size: PART - 64,
            ..Bad::new("size below the geometry", &[])
        },
        Bad {
            file_len: 2 * PART,
            size: 2 * PART,
            queues: 2,
            ..Bad::new("more queues than the device", &[])
        },
        Bad {
            file_len: 4 * PART * 16,
            size: 4 * PART * 16,
            queue_size: 512,
            ..Bad::new("queues larger than the device's", &[])
        },
        Bad {
            sealed: false,
            ..Bad::new("not sealed", &[])
        },
        Bad::new("unknown version", &[(8, &9u16.to_le_bytes())]),
        Bad::valid_but("descriptor count mismatch", &[(10, &7u16.to_le_bytes())]),
        Bad::valid_but("garbage flag", &[(16 + 16 * 2, &[0x80])]),
        Bad::valid_but("head beyond the ring", &[(16 + 16 * 20, &[1])]),
        Bad::valid_but(
            "last batch head out of range",
            &[(12, &999u16.to_le_bytes()), (14, &5u16.to_le_bytes())],
        ),
    ];
    for (i, bad) in cases.into_iter().enumerate() {
        let f = region_file(bad.file_len, bad.sealed);
        if bad.valid_header {
            valid_header(&f);
        }
        for (at, bytes) in &bad.puts {
            put(&f, *at, bytes);
        }
        let (mut fe, raw, _) = negotiate(&srv.socket);
        fe.set_mem_table(&[region_of(&g.mem)]).unwrap();
        let msg = VhostUserInflight::new(bad.size, 0, bad.queues, bad.queue_size);
        // The ring has 16 descriptors: heads 16 and up are beyond it.
        let r = match fe.set_inflight_fd(&msg, f.as_raw_fd()) {
            Ok(()) => start_queue(fe, raw, &g, 0, 16).map(drop),
            Err(e) => Err(e),
        };
        assert!(r.is_err(), "{}: accepted", bad.name);
        still_serves(&mut srv, i as u8);
    }
    // Offsets: past the end, unaligned, overflowing.
    for (off, size) in [(4096, PART), (1, PART), (u64::MAX - 4095, PART)] {
        let f = region_file(PART, true);
        let (mut fe, _raw, _) = negotiate(&srv.socket);
        let msg = VhostUserInflight::new(size, off, 1, Q);
        assert!(
            fe.set_inflight_fd(&msg, f.as_raw_fd()).is_err(),
            "offset {off:#x}"
        );
        drop(fe);
        still_serves(&mut srv, 40);
    }
    let st = srv.terminate_within(Duration::from_secs(15)).unwrap();
    assert!(st.success(), "{st}");
}

/// A server (bounded to 120 s) on an FVD image over a `qemu-nbd` base, and a guest connected to
/// it with an inflight region.
struct OnNbd {
    nbd: Nbd,
    /// The base's contents.
    base: Vec<u8>,
    img: PathBuf,
    sock: PathBuf,
    srv: ServerProc,
    guard: KillGuard,
    g: Guest,
    c: Conn,
    inflight: Option<Inflight>,
}

fn on_nbd(d: &Path) -> OnNbd {
    let (nbd, base) = Nbd::start(d);
    let img = image_on_nbd(d, &nbd);
    let sock = d.join("s.sock");
    let srv = serve(&img, &sock);
    let guard = srv.kill_after(Duration::from_secs(120));
    let g = Guest::new();
    let mut inflight = None;
    let c = connect(&sock, &g, &mut inflight, 0);
    OnNbd {
        nbd,
        base,
        img,
        sock,
        srv,
        guard,
        g,
        c,
        inflight,
    }
}

/// [`on_nbd`], then one read of the base completed (slot 0), `qemu-nbd` stopped and three
/// 64 KiB reads of it at 1, 2 and 3 MiB (slots 1 to 3) taken by the server and held in flight.
fn three_reads_held(d: &Path) -> OnNbd {
    let mut t = on_nbd(d);
    let (g, c) = (&mut t.g, &t.c);
    g.post(0, VIRTIO_BLK_T_IN, 0, K64);
    c.kick.write(1).unwrap();
    g.wait_used(1, TIMEOUT);
    t.nbd.signal(libc::SIGSTOP);
    for slot in 1..4 {
        g.post(slot, VIRTIO_BLK_T_IN, u64::from(slot) * MIB, K64);
    }
    c.kick.write(1).unwrap();
    wait_flagged(&t.inflight.as_ref().unwrap().1, 3);
    t
}

/// Resumes the stopped `qemu-nbd` after a second, from another thread (which hands it back).
fn resume_later(nbd: Nbd) -> std::thread::JoinHandle<Nbd> {
    std::thread::spawn(move || {
        std::thread::sleep(Duration::from_secs(1));
        nbd.signal(libc::SIGCONT);
        nbd
    })
}

/// The three reads [`three_reads_held`] held completed with the base's data, and the region
/// flags nothing in flight.
fn assert_reads_done(g: &Guest, base: &[u8], region: &File) {
    for slot in 1..4u16 {
        assert_eq!(g.status(slot), 0);
        let at = (u64::from(slot) << 20) as usize;
        assert!(g.data(slot, K64 as usize) == base[at..at + K64 as usize]);
    }
    assert_eq!(flagged(region), Vec::<u16>::new());
}

/// GET_VRING_BASE with requests in flight returns once they are in the used ring, and the base
/// it returns is the used index.
#[test]
fn get_vring_base_waits_for_requests_in_flight() {
    let d = dir();
    let OnNbd {
        nbd,
        base,
        srv,
        guard: _guard,
        g,
        c,
        inflight,
        ..
    } = three_reads_held(d.path());
    let resume = resume_later(nbd);
    let t0 = Instant::now();
    let got = c.fe.get_vring_base(0).unwrap();
    let took = t0.elapsed();
    let used = g.used_idx();
    assert!(
        took >= Duration::from_millis(800),
        "returned after {took:?}"
    );
    assert_eq!(used, 4, "all requests published");
    assert_eq!(got as u16, used, "the base is the used index");
    assert_reads_done(&g, &base, &inflight.unwrap().1);
    let _nbd = resume.join().unwrap();
    drop(c);
    let st = srv.terminate_within(Duration::from_secs(15)).unwrap();
    assert!(st.success(), "{st}");
}

/// SIGTERM with requests in flight: they complete and reach the used ring before the socket
/// closes, and the server exits 0.
#[test]
fn sigterm_publishes_requests_in_flight_before_closing() {
    let d = dir();
    let OnNbd {
        nbd,
        base,
        srv,
        guard: _guard,
        g,
        c,
        inflight,
        ..
    } = three_reads_held(d.path());
    srv.signal(libc::SIGTERM);
    let resume = resume_later(nbd);
    // The socket closes (EOF) only after the used ring has all four.
    assert!(
        wait_readable(c.raw.as_raw_fd(), Duration::from_secs(15)),
        "the socket never closed"
    );
    let used = g.used_idx();
    let mut b = [0u8; 1];
    assert_eq!(
        std::io::Read::read(&mut &c.raw, &mut b).unwrap_or(0),
        0,
        "EOF"
    );
    assert_eq!(
        used, 4,
        "requests in flight were published before the socket closed"
    );
    assert_reads_done(&g, &base, &inflight.unwrap().1);
    let st = srv.wait();
    assert!(st.success(), "{st}");
    let _nbd = resume.join().unwrap();
}

/// A write, then a flush, both completed while a base read is held in flight; the server is
/// killed. The next server has the flushed write, and resubmits the read (with the base's data).
#[test]
fn a_flushed_write_survives_a_kill_with_a_read_in_flight() {
    let d = dir();
    let OnNbd {
        nbd,
        base,
        img,
        sock,
        srv,
        guard: _guard,
        mut g,
        c,
        mut inflight,
    } = on_nbd(d.path());
    g.post(1, VIRTIO_BLK_T_IN, 0, K64);
    c.kick.write(1).unwrap();
    g.wait_used(1, TIMEOUT);
    nbd.signal(libc::SIGSTOP);
    g.post(2, VIRTIO_BLK_T_IN, MIB, K64);
    let w: Vec<u8> = (0..K64).map(|i| (i % 241) as u8 ^ 0x5a).collect();
    g.fill(6, &w);
    g.post(6, VIRTIO_BLK_T_OUT, 7 * MIB, K64);
    c.kick.write(1).unwrap();
    g.wait_used(2, TIMEOUT);
    // A flush covers the writes completed before it was submitted.
    g.post(7, VIRTIO_BLK_T_FLUSH, 0, 0);
    c.kick.write(1).unwrap();
    g.wait_used(3, TIMEOUT);
    assert_eq!((g.used(1).0, g.used(2).0), (18, 21), "write and flush done");
    assert_eq!(
        flagged(&inflight.as_ref().unwrap().1),
        vec![6],
        "the read in flight"
    );
    kill(srv);
    drop(c);
    nbd.signal(libc::SIGCONT);
    let srv = serve(&img, &sock);
    let _guard = srv.kill_after(Duration::from_secs(60));
    let c = connect(&sock, &g, &mut inflight, 3);
    g.wait_used(4, TIMEOUT);
    assert_eq!(g.used(3), (6, K64 + 1), "the read resubmitted");
    assert!(g.data(2, K64 as usize) == base[1 << 20..(1 << 20) + K64 as usize]);
    g.post(9, VIRTIO_BLK_T_IN, 7 * MIB, K64);
    c.kick.write(1).unwrap();
    g.wait_used(5, TIMEOUT);
    assert!(g.data(9, K64 as usize) == w, "the flushed write was lost");
    drop(c);
    let st = srv.terminate_within(Duration::from_secs(15)).unwrap();
    assert!(st.success(), "{st}");
}
