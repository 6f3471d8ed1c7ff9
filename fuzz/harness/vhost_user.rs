//! The vhost-user message handling of the real server: `fvd::server::Server` (the same
//! `VhostUserDaemon` + `BlkBackend` that `fvd serve` runs, on io_uring, serving a real image
//! file) listens on a unix socket in a temporary directory, started once per process. Each
//! input is one frontend connection: optionally a well-formed negotiation (owner, features,
//! memory table, vring 0) with the `vhost` crate's frontend, then fuzzer-chosen raw messages
//! with fuzzer-chosen fds (memfds of any size, eventfds, /dev/null, pipes), guest memory writes
//! and descriptor chains kicked to the worker. The connection then closes; the server must
//! close its side within a bound, keep serving the next frontend, and never panic.

use super::Input;
use fvd::server::{ServeConfig, ServeError, Server};
use std::fs::File;
use std::io::Read;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::FileExt;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::atomic::{fence, AtomicBool, Ordering};
use std::sync::{Mutex, OnceLock};
use std::thread::JoinHandle;
use std::time::Duration;
use vhost::vhost_user::message::{VhostUserInflight, VhostUserProtocolFeatures};
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use vm_memory::{Bytes, FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

const MEM: usize = 256 << 10;
const QSIZE: u16 = 16;
const DESC: u64 = 0;
const AVAIL: u64 = 0x100;
const USED: u64 = 0x200;
/// Bound on the server ending a connection whose frontend has gone.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(20);

struct Srv {
    _dir: tempfile::TempDir,
    socket: PathBuf,
    thread: Mutex<Option<JoinHandle<Result<(), ServeError>>>>,
}

static SRV: OnceLock<Srv> = OnceLock::new();
static PANICKED: AtomicBool = AtomicBool::new(false);

fn server() -> &'static Srv {
    SRV.get_or_init(|| {
        // Writes to a socket the server closed must fail with EPIPE, not kill the process (the
        // fuzzer's main is not Rust's, which would ignore SIGPIPE).
        // SAFETY: setting a signal disposition to SIG_IGN has no memory effects.
        unsafe { libc::signal(libc::SIGPIPE, libc::SIG_IGN) };
        // A panic on a server thread must fail the run even where nothing joins that thread.
        let prev = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |p| {
            PANICKED.store(true, Ordering::SeqCst);
            prev(p)
        }));
        let dir = tempfile::tempdir().expect("temporary directory");
        let image = dir.path().join("disk.fvd");
        let file = fvd::io::host_file::HostFile::open(&image, fvd::io::host_file::OpenMode::Create)
            .expect("create the image file");
        let params = fvd::engine::CreateParams {
            virtual_size: 4 << 20,
            journal_size: 64 << 10,
            ..Default::default()
        };
        fvd::io::executor::block_on(fvd::engine::create_image(
            &fvd::io::sync::SyncIo,
            file,
            &params,
        ))
        .expect("create the image");
        let socket = dir.path().join("disk.sock");
        let srv = Server::bind(ServeConfig {
            format: Some(fvd::engine::Format::Fvd),
            queue_size: QSIZE,
            prefetch: Some(false),
            // A filter would bind the whole fuzzer process (libFuzzer, the sanitizer runtime).
            seccomp: fvd::server::seccomp::SeccompMode::Off,
            ..ServeConfig::new(image, Some(socket.clone()))
        })
        .expect("bind the server");
        let thread = std::thread::spawn(move || srv.run());
        Srv {
            _dir: dir,
            socket,
            thread: Mutex::new(Some(thread)),
        }
    })
}

fn assert_server_alive(s: &Srv) {
    assert!(!PANICKED.load(Ordering::SeqCst), "a server thread panicked");
    let mut t = s.thread.lock().unwrap();
    if t.as_ref().is_some_and(|t| t.is_finished()) {
        let r = t.take().unwrap().join();
        panic!("the server stopped serving: {r:?}");
    }
}

fn memfd(size: u64) -> File {
    // SAFETY: memfd_create with a static name; a non-negative result is a new fd we own.
    let fd = unsafe { libc::memfd_create(c"fuzz".as_ptr(), libc::MFD_CLOEXEC) };
    assert!(fd >= 0, "memfd_create");
    // SAFETY: `fd` was just created and is owned by nobody else.
    let f = unsafe { File::from_raw_fd(fd) };
    f.set_len(size).expect("size the memfd");
    f
}

/// An fd of the kind the input picks, to pass with a message.
fn some_fd(inp: &mut Input) -> OwnedFd {
    match inp.below(4) {
        0 => memfd(4096 * inp.below(80)).into(),
        1 => EventFd::new(0)
            .map(|e| {
                // SAFETY: dup of a valid fd; the result is a new fd we own.
                unsafe { OwnedFd::from_raw_fd(libc::dup(e.as_raw_fd())) }
            })
            .expect("eventfd"),
        2 => File::open("/dev/null").expect("/dev/null").into(),
        _ => {
            let mut p = [0 as RawFd; 2];
            // SAFETY: pipe2 writes two new fds into `p` on success.
            assert_eq!(unsafe { libc::pipe2(p.as_mut_ptr(), libc::O_CLOEXEC) }, 0);
            // SAFETY: both fds were just created by pipe2 and are owned by nobody else.
            let (r, _w) = unsafe { (OwnedFd::from_raw_fd(p[0]), OwnedFd::from_raw_fd(p[1])) };
            r
        }
    }
}

/// Sends one message with `fds` attached; false if the server has closed the connection.
fn send(sock: &UnixStream, msg: &[u8], fds: &[OwnedFd]) -> bool {
    let raw: Vec<RawFd> = fds.iter().map(|f| f.as_raw_fd()).collect();
    let mut iov = libc::iovec {
        iov_base: msg.as_ptr() as *mut libc::c_void,
        iov_len: msg.len(),
    };
    // SAFETY: CMSG_SPACE only computes a size.
    let space = unsafe { libc::CMSG_SPACE(std::mem::size_of_val(raw.as_slice()) as u32) } as usize;
    let mut cbuf = vec![0u64; space.div_ceil(8).max(1)];
    // SAFETY: an all-zero msghdr is valid; the fields set below point at live buffers.
    let mut mh: libc::msghdr = unsafe { std::mem::zeroed() };
    mh.msg_iov = &mut iov;
    mh.msg_iovlen = 1;
    if !raw.is_empty() {
        mh.msg_control = cbuf.as_mut_ptr().cast();
        mh.msg_controllen = space as _;
        // SAFETY: msg_control points at `space` bytes, enough for one SCM_RIGHTS header with
        // `raw.len()` fds, so CMSG_FIRSTHDR and CMSG_DATA stay inside `cbuf`.
        unsafe {
            let c = libc::CMSG_FIRSTHDR(&mh);
            (*c).cmsg_level = libc::SOL_SOCKET;
            (*c).cmsg_type = libc::SCM_RIGHTS;
            (*c).cmsg_len = libc::CMSG_LEN(std::mem::size_of_val(raw.as_slice()) as u32) as _;
            std::ptr::copy_nonoverlapping(raw.as_ptr(), libc::CMSG_DATA(c).cast(), raw.len());
        }
    }
    // SAFETY: `mh` and everything it points at are valid for the duration of the call.
    let n = unsafe { libc::sendmsg(sock.as_raw_fd(), &mh, libc::MSG_NOSIGNAL) };
    n == msg.len() as isize
}

/// One guest: memory shared with the server (a memfd) and vring 0, set up through the
/// `vhost` crate's frontend. `level` 1 negotiates features, 2 also sets memory and vring 0.
struct Guest {
    mem: Option<GuestMemoryMmap<()>>,
    kick: EventFd,
    _call: EventFd,
    avail: u16,
}

/// Hands over an inflight region before vring 0 starts, as QEMU does, if the input says so:
/// the server's own (GET_INFLIGHT_FD) or a fuzzer-made memfd, either with fuzzer-written bytes
/// (version, counters, flags, heads) and a fuzzer-chosen description.
fn inflight(fe: &mut Frontend, inp: &mut Input) {
    let (msg, file) = match inp.below(3) {
        0 => return,
        1 => match fe.get_inflight_fd(&VhostUserInflight::new(0, 0, 1, QSIZE)) {
            Ok(r) => r,
            Err(_) => return,
        },
        _ => {
            // SAFETY: memfd_create with a static name; a non-negative result is a new fd we own.
            let fd = unsafe {
                libc::memfd_create(
                    c"fuzz".as_ptr(),
                    libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING,
                )
            };
            assert!(fd >= 0, "memfd_create");
            // SAFETY: `fd` was just created and is owned by nobody else.
            let f = unsafe { File::from_raw_fd(fd) };
            f.set_len(64 * inp.below(40)).expect("size the memfd");
            if inp.bool() {
                // SAFETY: fcntl on our own fd with an integer argument.
                unsafe {
                    libc::fcntl(
                        fd,
                        libc::F_ADD_SEALS,
                        libc::F_SEAL_SHRINK | libc::F_SEAL_GROW,
                    )
                };
            }
            let qs = [4u16, 8, 16, 32, 1][inp.below(5) as usize];
            let msg = VhostUserInflight::new(
                inp.below(4096),
                4096 * inp.below(2),
                1 + inp.below(2) as u16,
                qs,
            );
            (msg, f)
        }
    };
    let len = file.metadata().map_or(0, |m| m.len());
    for _ in 0..inp.below(6) {
        let at = inp.below(len.max(1));
        let n = inp.below(24) as usize;
        let _ = file.write_all_at(inp.bytes(n), at);
    }
    let _ = fe.set_inflight_fd(&msg, file.as_raw_fd());
}

fn negotiate(fe: &mut Frontend, level: u8, inp: &mut Input) -> Option<Guest> {
    let kick = EventFd::new(0).ok()?;
    let call = EventFd::new(0).ok()?;
    let mut g = Guest {
        mem: None,
        kick,
        _call: call,
        avail: 0,
    };
    fe.set_owner().ok()?;
    let features = fe.get_features().ok()?;
    if features & (1 << 30) != 0 {
        let proto = fe.get_protocol_features().ok()?
            & (VhostUserProtocolFeatures::CONFIG
                | VhostUserProtocolFeatures::MQ
                | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS
                | VhostUserProtocolFeatures::INFLIGHT_SHMFD);
        fe.set_protocol_features(proto).ok()?;
    }
    fe.set_features(features).ok()?;
    if level < 2 {
        return Some(g);
    }
    let mem = GuestMemoryMmap::<()>::from_ranges_with_files([(
        GuestAddress(0),
        MEM,
        Some(FileOffset::new(memfd(MEM as u64), 0)),
    )])
    .ok()?;
    let region = VhostUserMemoryRegionInfo::from_guest_region(mem.iter().next()?).ok()?;
    fe.set_mem_table(&[region]).ok()?;
    inflight(fe, inp);
    let va = |gpa: u64| mem.get_host_address(GuestAddress(gpa)).unwrap() as u64;
    fe.set_vring_num(0, QSIZE).ok()?;
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
    .ok()?;
    fe.set_vring_base(0, 0).ok()?;
    fe.set_vring_call(0, &g._call).ok()?;
    fe.set_vring_kick(0, &g.kick).ok()?;
    fe.set_vring_enable(0, true).ok()?;
    g.mem = Some(mem);
    Some(g)
}

/// Puts a fuzzer-made descriptor chain on vring 0 and kicks (without waiting for it).
fn push_chain(g: &mut Guest, inp: &mut Input) {
    let Some(mem) = &g.mem else { return };
    let n = 1 + inp.below(4);
    for i in 0..n {
        let d = DESC + 16 * i;
        let addr = if inp.bool() {
            inp.u64()
        } else {
            0x1000 + inp.below(MEM as u64)
        };
        let len = if inp.bool() {
            inp.u32()
        } else {
            inp.below(0x4000) as u32
        };
        let mut flags = inp.u16() & 0b111;
        if i + 1 < n {
            flags |= 1; // NEXT
        }
        let next = if inp.bool() { inp.u16() } else { i as u16 + 1 };
        let _ = mem.write_obj(addr, GuestAddress(d));
        let _ = mem.write_obj(len, GuestAddress(d + 8));
        let _ = mem.write_obj(flags, GuestAddress(d + 12));
        let _ = mem.write_obj(next, GuestAddress(d + 14));
    }
    let slot = u64::from(g.avail % QSIZE);
    let head = if inp.bool() { inp.u16() } else { 0 };
    let _ = mem.write_obj(head, GuestAddress(AVAIL + 4 + 2 * slot));
    fence(Ordering::SeqCst);
    g.avail = g.avail.wrapping_add(if inp.bool() { inp.u16() } else { 1 });
    let _ = mem.write_obj(g.avail, GuestAddress(AVAIL + 2));
    fence(Ordering::SeqCst);
    let _ = g.kick.write(1);
}

/// Leaves: the server must notice and close its end within [`CLOSE_TIMEOUT`] (replies are
/// discarded on the way).
fn leave(raw: &UnixStream) {
    let _ = raw.shutdown(std::net::Shutdown::Write);
    let mut r = raw;
    let mut sink = [0u8; 4096];
    let start = std::time::Instant::now();
    loop {
        match r.read(&mut sink) {
            Ok(0) => break,
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => break,
            Err(e) => panic!(
                "server did not close the connection after {:?}: {e}",
                start.elapsed()
            ),
        }
    }
}

/// A new frontend is served: the previous connection was torn down completely (the server
/// closes the socket before it joins the connection's threads, so EOF alone does not show it).
fn assert_serves_next(srv: &Srv) {
    let sock = UnixStream::connect(&srv.socket).expect("connect to the server");
    sock.set_read_timeout(Some(CLOSE_TIMEOUT)).unwrap();
    let fe = Frontend::from_stream(sock, 1);
    if let Err(e) = fe.get_features() {
        panic!("the server does not serve the next frontend: {e}");
    }
}

/// SET_VRING_KICK on a running vring, then a kick on the old fd (the frontend still holds it).
/// The vendored vhost-user-backend used to leave the old fd in the vring thread's epoll set,
/// where its kick was never consumed: the thread blocked for good (later, spun for good). The
/// fuzzer found it within minutes; fixed by vendor/README.md patch 5.
/// CPU time (user + system, in clock ticks) of this process's vring threads.
fn vring_thread_ticks() -> u64 {
    let mut ticks = 0;
    for t in std::fs::read_dir("/proc/self/task").expect("/proc/self/task") {
        let t = t.expect("task entry").path();
        let (Ok(comm), Ok(stat)) = (
            std::fs::read_to_string(t.join("comm")),
            std::fs::read_to_string(t.join("stat")),
        ) else {
            continue; // the thread has just ended
        };
        if comm.trim_end() != "vring_worker" {
            continue;
        }
        // The fields after the command name, which ends with the last ')'.
        let f: Vec<&str> = stat[stat.rfind(')').unwrap() + 2..].split(' ').collect();
        ticks += f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap();
    }
    ticks
}

pub fn kick_old_fd_after_set_vring_kick() {
    let srv = server();
    assert_server_alive(srv);
    let sock = UnixStream::connect(&srv.socket).expect("connect to the server");
    sock.set_read_timeout(Some(CLOSE_TIMEOUT)).unwrap();
    let raw = sock.try_clone().unwrap();
    let mut fe = Frontend::from_stream(sock, 1);
    let g = negotiate(&mut fe, 2, &mut Input::new(&[])).expect("negotiation");
    let new_kick = EventFd::new(0).unwrap();
    fe.set_vring_kick(0, &new_kick).expect("SET_VRING_KICK");
    // Let the server apply it before the old fd is kicked.
    std::thread::sleep(Duration::from_millis(200));
    g.kick.write(1).unwrap();
    std::thread::sleep(Duration::from_millis(200));
    // Only this connection's vring threads exist now (the server serves one at a time).
    let t0 = vring_thread_ticks();
    std::thread::sleep(Duration::from_secs(1));
    let used = vring_thread_ticks() - t0;
    assert!(
        used < 30,
        "the vring thread used {used} ticks of CPU in 1 s while idle"
    );
    leave(&raw);
    assert_server_alive(srv);
    assert_serves_next(srv);
}

pub fn run(data: &[u8]) {
    let srv = server();
    assert_server_alive(srv);
    let mut inp = Input::new(data);
    let sock = UnixStream::connect(&srv.socket).expect("connect to the server");
    sock.set_read_timeout(Some(CLOSE_TIMEOUT)).unwrap();
    sock.set_write_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let raw = sock.try_clone().unwrap();
    let level = inp.below(3) as u8;
    let mut fe = Frontend::from_stream(sock, 1);
    let mut guest = if level > 0 {
        negotiate(&mut fe, level, &mut inp)
    } else {
        None
    };
    for _ in 0..24 {
        if inp.is_empty() {
            break;
        }
        match inp.below(8) {
            0 if guest.is_some() => push_chain(guest.as_mut().unwrap(), &mut inp),
            1 if guest.as_ref().is_some_and(|g| g.mem.is_some()) => {
                let mem = guest.as_ref().unwrap().mem.as_ref().unwrap();
                let at = inp.below(MEM as u64);
                let _ = mem.write_slice(inp.bytes(64), GuestAddress(at));
            }
            _ => {
                // A raw message: mostly a known request code with the version flag set.
                let code = if inp.bool() {
                    1 + inp.below(44) as u32
                } else {
                    inp.u32()
                };
                let flags = if inp.u8() < 240 {
                    1 | (inp.u32() & 0x8)
                } else {
                    inp.u32()
                };
                let plen = inp.below(120) as usize;
                let payload = inp.bytes(plen).to_vec();
                let size = if inp.u8() < 240 {
                    payload.len() as u32
                } else {
                    inp.u32()
                };
                let mut msg = Vec::with_capacity(12 + payload.len());
                msg.extend_from_slice(&code.to_le_bytes());
                msg.extend_from_slice(&flags.to_le_bytes());
                msg.extend_from_slice(&size.to_le_bytes());
                msg.extend_from_slice(&payload);
                let fds: Vec<OwnedFd> = (0..inp.below(4)).map(|_| some_fd(&mut inp)).collect();
                if !send(&raw, &msg, &fds) {
                    break;
                }
            }
        }
    }
    leave(&raw);
    drop(fe);
    drop(guest);
    assert_server_alive(srv);
    assert_serves_next(srv);
}
