//! A malformed-vhost-user campaign against a real `fvd serve`: seeded random sequences of
//! protocol messages (valid, out of order, truncated, oversized, with bogus fields, memory
//! tables and fds), ending in a clean or a mid-message disconnect. After every case the server
//! must be alive and serve a well-behaved frontend (negotiation, a write and a read back), and
//! no case may take longer than [`CASE_LIMIT`].
//!
//! One seed derives every knob of a case; a failure prints it. Environment (test-only):
//! `FVD_CAMPAIGN_CASES` (default 200) and `FVD_CAMPAIGN_SEED` (first case seed, default fixed),
//! e.g. `FVD_CAMPAIGN_SEED=1234 FVD_CAMPAIGN_CASES=1 cargo test --test vhost_campaign` replays
//! one case (seeds map to the same cases on 64-bit hosts with rand 0.8's `SmallRng`). The
//! default 200 cases take a few seconds; a long run, e.g.
//! `FVD_CAMPAIGN_CASES=5000 FVD_CAMPAIGN_SEED=7000000 cargo test --test vhost_campaign
//! malformed`, also catches slow leaks: one server serves every case.

mod serve_support;

use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use serve_support::guest::{attach, memfd, negotiate, seal_size, sealable_memfd};
use serve_support::{create_image, dir, ServerProc};
use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::sock_ctrl_msg::ScmSocket;

const CASE_LIMIT: Duration = Duration::from_secs(20);
const DEFAULT_SEED: u64 = 0x5eed_f00d;

// vhost-user request codes.
const GET_FEATURES: u32 = 1;
const SET_FEATURES: u32 = 2;
const SET_OWNER: u32 = 3;
const SET_MEM_TABLE: u32 = 5;
const SET_LOG_BASE: u32 = 6;
const SET_VRING_NUM: u32 = 8;
const SET_VRING_ADDR: u32 = 9;
const SET_VRING_BASE: u32 = 10;
const GET_VRING_BASE: u32 = 11;
const SET_VRING_KICK: u32 = 12;
const SET_VRING_CALL: u32 = 13;
const SET_VRING_ERR: u32 = 14;
const GET_PROTOCOL_FEATURES: u32 = 15;
const SET_PROTOCOL_FEATURES: u32 = 16;
const SET_VRING_ENABLE: u32 = 18;
const GET_CONFIG: u32 = 24;
const SET_CONFIG: u32 = 25;
const GET_INFLIGHT_FD: u32 = 31;
const SET_INFLIGHT_FD: u32 = 32;
const ADD_MEM_REG: u32 = 37;
const REM_MEM_REG: u32 = 38;

const VERSION: u32 = 0x1;
const NEED_REPLY: u32 = 0x8;
/// The frontend address of the guest memory (only used for vring address translation).
const UA: u64 = 0x1000_0000;
const MEM_LEN: u64 = 256 << 10;

/// One hostile connection and what it owns.
struct Case {
    rng: SmallRng,
    sock: UnixStream,
    /// Guest memory: random bytes, so a started ring parses garbage.
    mem: File,
    kick: EventFd,
    /// The virtio features a well-behaved frontend acks.
    features: u64,
    /// Everything handed to the server stays open until the case ends.
    keep: Vec<OwnedFd>,
}

fn u32s(v: &[u32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

fn u64s(v: &[u64]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

impl Case {
    /// A value that is usually sensible and sometimes extreme.
    fn pick(&mut self, sensible: u64) -> u64 {
        match self.rng.gen_range(0..10) {
            0 => 0,
            1 => u64::MAX,
            2 => self.rng.gen(),
            3 => sensible.wrapping_add(self.rng.gen_range(1..4096)),
            4 => 1u64 << self.rng.gen_range(0..64),
            _ => sensible,
        }
    }

    fn queue(&mut self) -> u64 {
        if self.rng.gen_ratio(1, 6) {
            self.rng.gen_range(0..300)
        } else {
            self.rng.gen_range(0..2)
        }
    }

    /// GET_INFLIGHT_FD or SET_INFLIGHT_FD with a well-formed body whose values are mostly
    /// plausible, and for SET a sealed memfd whose contents are mostly a valid header with
    /// random flags, counters and heads (or an fd of another kind).
    fn inflight_message(&mut self) -> (u32, Vec<u8>, Vec<RawFd>) {
        let qs = [16u16, 32, 256, 512, 0, 1][self.rng.gen_range(0..6)];
        let nq = [1u16, 2, 0, 65][self.rng.gen_range(0..4)];
        let part = (16 + 16 * u64::from(qs)).div_ceil(64) * 64;
        let size = self.pick(part * u64::from(nq));
        let offset = if self.rng.gen_ratio(1, 4) {
            self.pick(0)
        } else {
            0
        };
        let mut p = u64s(&[size, offset]);
        p.extend_from_slice(&nq.to_le_bytes());
        p.extend_from_slice(&qs.to_le_bytes());
        // The struct's tail padding (repr(C): 24 bytes).
        p.extend_from_slice(&[0; 4]);
        if self.rng.gen_ratio(1, 3) {
            return (GET_INFLIGHT_FD, p, vec![]);
        }
        if self.rng.gen_ratio(1, 5) {
            return (SET_INFLIGHT_FD, p, vec![self.fd(true)]);
        }
        let len = if self.rng.gen_ratio(1, 4) {
            self.rng
                .gen_range(0..2 * part.max(64) * u64::from(nq.max(1)))
        } else {
            part * u64::from(nq)
        };
        let f = sealable_memfd(len);
        use std::os::unix::fs::FileExt;
        for q in 0..u64::from(nq.min(2)) {
            let base = q * part;
            let version = [1u16, 1, 1, 0, 2][self.rng.gen_range(0..5)];
            let _ = f.write_all_at(&version.to_le_bytes(), base + 8);
            let _ = f.write_all_at(&qs.to_le_bytes(), base + 10);
            for _ in 0..self.rng.gen_range(0..6) {
                let (at, v) = match self.rng.gen_range(0..4) {
                    0 => (12, self.rng.gen_range(0..600u16).to_le_bytes().to_vec()),
                    1 => (14, self.rng.gen::<u16>().to_le_bytes().to_vec()),
                    2 => (
                        16 + 16 * self.rng.gen_range(0..u64::from(qs).max(1)),
                        vec![[1u8, 1, 0, 0x80][self.rng.gen_range(0..4)]],
                    ),
                    _ => (
                        24 + 16 * self.rng.gen_range(0..u64::from(qs).max(1)),
                        self.rng.gen::<u64>().to_le_bytes().to_vec(),
                    ),
                };
                let _ = f.write_all_at(&v, base + at);
            }
        }
        if self.rng.gen_ratio(4, 5) {
            let _ = seal_size(&f);
        }
        let raw = f.as_raw_fd();
        self.keep.push(f.into());
        (SET_INFLIGHT_FD, p, vec![raw])
    }

    /// An fd of a random kind: mostly the right kind (eventfd or memfd), sometimes not.
    fn fd(&mut self, want_memory: bool) -> RawFd {
        let f: OwnedFd = match self.rng.gen_range(0..10) {
            0 => {
                let mut p = [0; 2];
                // SAFETY: pipe fills the two fds it is given.
                assert_eq!(unsafe { libc::pipe(p.as_mut_ptr()) }, 0);
                // SAFETY: both fds were just created and are ours.
                let (r, w) = unsafe { (OwnedFd::from_raw_fd(p[0]), File::from_raw_fd(p[1])) };
                let _ = (&w).write_all(b"garbage");
                self.keep.push(w.into());
                r
            }
            1 => File::open("/dev/null").unwrap().into(),
            2 => memfd(self.rng.gen_range(0..3) * 4096).into(),
            3 => UnixStream::pair().unwrap().0.into(),
            4 => File::open("/proc/self/exe").unwrap().into(),
            _ if want_memory => self.mem.try_clone().unwrap().into(),
            _ if self.rng.gen_ratio(1, 3) => {
                let k = self.kick.try_clone().unwrap();
                // SAFETY: the clone is a new fd owned by nobody else.
                unsafe { OwnedFd::from_raw_fd(std::os::fd::IntoRawFd::into_raw_fd(k)) }
            }
            _ => {
                let e = EventFd::new(0).unwrap();
                // SAFETY: as above.
                unsafe { OwnedFd::from_raw_fd(std::os::fd::IntoRawFd::into_raw_fd(e)) }
            }
        };
        let raw = f.as_raw_fd();
        self.keep.push(f);
        raw
    }

    /// A memory region: (gpa, size, ua, offset).
    fn region(&mut self) -> [u64; 4] {
        let size = self.pick(MEM_LEN);
        let gpa = self.pick(0);
        let ua = self.pick(UA);
        let off = self.pick(0);
        [gpa, size, ua, off]
    }

    /// One message: request, payload, fds.
    fn message(&mut self) -> (u32, Vec<u8>, Vec<RawFd>) {
        let q = self.queue();
        match self.rng.gen_range(0..20) {
            0 => (GET_FEATURES, vec![], vec![]),
            1 => {
                let f = self.pick(self.features);
                (SET_FEATURES, u64s(&[f]), vec![])
            }
            2 => (SET_OWNER, vec![], vec![]),
            3 => (GET_PROTOCOL_FEATURES, vec![], vec![]),
            4 => {
                let f = self.pick(0x1 | 0x8 | 0x200 | 0x1000 | 0x8000);
                (SET_PROTOCOL_FEATURES, u64s(&[f]), vec![])
            }
            5 => {
                let n = match self.rng.gen_range(0..6) {
                    0 => self.rng.gen_range(0..12),
                    1 => 2,
                    _ => 1,
                };
                let mut p = u32s(&[n, 0]);
                let mut fds = vec![];
                for _ in 0..n.min(9) {
                    let r = if self.rng.gen_ratio(1, 2) {
                        [0, MEM_LEN, UA, 0]
                    } else {
                        self.region()
                    };
                    p.extend(u64s(&r));
                    fds.push(self.fd(true));
                }
                if self.rng.gen_ratio(1, 8) {
                    fds.pop();
                }
                (SET_MEM_TABLE, p, fds)
            }
            6 => {
                let r = if self.rng.gen_ratio(1, 2) {
                    [0, MEM_LEN, UA, 0]
                } else {
                    self.region()
                };
                let mut p = u64s(&[0]);
                p.extend(u64s(&r));
                let code = if self.rng.gen_ratio(1, 3) {
                    REM_MEM_REG
                } else {
                    ADD_MEM_REG
                };
                let fd = self.fd(true);
                (code, p, vec![fd])
            }
            7 => {
                let num = match self.rng.gen_range(0..4) {
                    0 => self.rng.gen::<u32>() as u64,
                    1 => self.rng.gen_range(0..40),
                    _ => 16,
                };
                (SET_VRING_NUM, u32s(&[q as u32, num as u32]), vec![])
            }
            8 => {
                let base = if self.rng.gen_ratio(1, 2) {
                    UA
                } else {
                    self.pick(UA)
                };
                let d = self.pick(base);
                let a = self.pick(base.wrapping_add(0x100));
                let u = self.pick(base.wrapping_add(0x200));
                let mut p = u32s(&[q as u32, self.rng.gen_range(0..3)]);
                p.extend(u64s(&[d, u, a, self.pick(0)]));
                (SET_VRING_ADDR, p, vec![])
            }
            9 => {
                let b = self.pick(0) as u32;
                (SET_VRING_BASE, u32s(&[q as u32, b]), vec![])
            }
            10 => (GET_VRING_BASE, u32s(&[q as u32, 0]), vec![]),
            11..=13 => {
                let code =
                    [SET_VRING_KICK, SET_VRING_CALL, SET_VRING_ERR][self.rng.gen_range(0..3)];
                let nofd = self.rng.gen_ratio(1, 8);
                let v = q | if nofd { 0x100 } else { 0 };
                let fds = if nofd ^ self.rng.gen_ratio(1, 10) {
                    vec![]
                } else {
                    vec![self.fd(false)]
                };
                (code, u64s(&[v]), fds)
            }
            14 => {
                let on = self.pick(1) as u32;
                (SET_VRING_ENABLE, u32s(&[q as u32, on]), vec![])
            }
            15 => {
                let (off, size) = (self.pick(0) as u32, self.pick(60) as u32);
                let mut p = u32s(&[off, size, self.rng.gen_range(0..3)]);
                p.resize(12 + (size as usize).min(256), 0);
                let code = if self.rng.gen_ratio(1, 2) {
                    GET_CONFIG
                } else {
                    SET_CONFIG
                };
                (code, p, vec![])
            }
            16 if self.rng.gen_ratio(1, 2) => self.inflight_message(),
            16 => {
                let code =
                    [SET_LOG_BASE, GET_INFLIGHT_FD, SET_INFLIGHT_FD][self.rng.gen_range(0..3)];
                let len = self.rng.gen_range(0..64);
                let p = (0..len).map(|_| self.rng.gen()).collect();
                let fds = if self.rng.gen_ratio(1, 2) {
                    vec![self.fd(true)]
                } else {
                    vec![]
                };
                (code, p, fds)
            }
            17 => {
                // Kick whatever ring may be running.
                let _ = self.kick.write(1);
                (GET_FEATURES, vec![], vec![])
            }
            _ => {
                // Any request code, random payload and fds.
                let code = self.rng.gen_range(0..64);
                let len = self.rng.gen_range(0..80);
                let p = (0..len).map(|_| self.rng.gen()).collect();
                let fds = (0..self.rng.gen_range(0..3))
                    .map(|_| self.fd(false))
                    .collect();
                (code, p, fds)
            }
        }
    }

    /// Sends one message, possibly damaged: bad flags, a size field that lies, or cut short.
    /// Returns false if the connection is gone (or was cut on purpose).
    fn send(&mut self) -> bool {
        let (code, mut payload, fds) = self.message();
        let mut flags = VERSION;
        if self.rng.gen_ratio(1, 2) {
            flags |= NEED_REPLY;
        }
        let mut size = payload.len() as u32;
        let mut cut = None;
        match self.rng.gen_range(0..30) {
            0 => flags = self.rng.gen(),
            1 => size = self.rng.gen(),
            2 => size = size.wrapping_add(self.rng.gen_range(1..64)),
            3 => size = size.saturating_sub(self.rng.gen_range(1..8)),
            4 => payload.truncate(payload.len() / 2),
            5 => cut = Some(self.rng.gen_range(0..12 + payload.len())),
            6 => payload.extend((0..self.rng.gen_range(1..5000)).map(|_| 0xa5u8)),
            _ => {}
        }
        let mut msg = u32s(&[code, flags, size]);
        msg.extend(payload);
        if let Some(n) = cut {
            let _ = self.sock.send_with_fds(&[&msg[..n.min(msg.len())]], &fds);
            return false;
        }
        if self.sock.send_with_fds(&[&msg[..]], &fds).is_err() {
            return false;
        }
        self.drain();
        true
    }

    /// Reads whatever the server replied, so it never blocks on a full socket.
    fn drain(&mut self) {
        let mut buf = [0u8; 4096];
        let deadline = Instant::now() + Duration::from_millis(2);
        while Instant::now() < deadline {
            match self.sock.read(&mut buf) {
                Ok(0) => return,
                Ok(_) => {}
                Err(_) => std::thread::sleep(Duration::from_micros(200)),
            }
        }
    }
}

/// The well-behaved negotiation in order, so random cases reach the deeper states too.
fn prefix(c: &mut Case, steps: usize) {
    let mem = c.mem.try_clone().unwrap();
    let call = EventFd::new(0).unwrap();
    let kick = c.kick.try_clone().unwrap();
    let mut table = u32s(&[1, 0]);
    table.extend(u64s(&[0, MEM_LEN, UA, 0]));
    let mut addr = u32s(&[0, 0]);
    addr.extend(u64s(&[UA, UA + 0x200, UA + 0x100, 0]));
    let mut msgs: Vec<(u32, Vec<u8>, Vec<RawFd>)> = vec![
        (SET_OWNER, vec![], vec![]),
        (GET_FEATURES, vec![], vec![]),
        (
            SET_PROTOCOL_FEATURES,
            u64s(&[0x1 | 0x8 | 0x200 | 0x1000 | 0x8000]),
            vec![],
        ),
        (SET_FEATURES, u64s(&[c.features]), vec![]),
        (SET_MEM_TABLE, table, vec![mem.as_raw_fd()]),
        (SET_VRING_NUM, u32s(&[0, 16]), vec![]),
        (SET_VRING_ADDR, addr, vec![]),
        (SET_VRING_BASE, u32s(&[0, 0]), vec![]),
        (SET_VRING_CALL, u64s(&[0]), vec![call.as_raw_fd()]),
        (SET_VRING_KICK, u64s(&[0]), vec![kick.as_raw_fd()]),
        (SET_VRING_ENABLE, u32s(&[0, 1]), vec![]),
    ];
    // An inflight region before the queue starts, as QEMU sends it, for the start to check.
    let mut steps = steps;
    if c.rng.gen_ratio(1, 2) {
        let m = c.inflight_message();
        msgs.insert(4, m);
        steps += usize::from(steps > 4);
        // Mostly up to the queue start, which is what reads the region.
        if c.rng.gen_ratio(2, 3) {
            steps = msgs.len();
        }
    }
    for (code, payload, fds) in msgs.into_iter().take(steps) {
        let mut msg = u32s(&[code, VERSION, payload.len() as u32]);
        msg.extend(payload);
        if c.sock.send_with_fds(&[&msg[..]], &fds).is_err() {
            return;
        }
        c.drain();
    }
    let _ = c.kick.write(1);
    for f in [mem.into(), OwnedFd::from(call_into(call))] {
        c.keep.push(f);
    }
}

fn call_into(e: EventFd) -> File {
    // SAFETY: the EventFd's fd becomes the File's; nobody else owns it.
    unsafe { File::from_raw_fd(std::os::fd::IntoRawFd::into_raw_fd(e)) }
}

fn run_case(srv: &ServerProc, seed: u64, features: u64) {
    let mut rng = SmallRng::seed_from_u64(seed);
    let mem = memfd(MEM_LEN);
    let garbage: Vec<u8> = (0..MEM_LEN).map(|_| rng.gen()).collect();
    (&mem).write_all(&garbage).unwrap();
    let sock = UnixStream::connect(&srv.socket).unwrap();
    sock.set_nonblocking(true).unwrap();
    let mut c = Case {
        rng,
        sock,
        mem,
        kick: EventFd::new(0).unwrap(),
        features,
        keep: vec![],
    };
    let steps = c.rng.gen_range(0..12);
    prefix(&mut c, steps);
    for _ in 0..c.rng.gen_range(1..16) {
        if !c.send() {
            break;
        }
    }
    let _ = c.kick.write(1);
    if c.rng.gen_ratio(1, 4) {
        std::thread::sleep(Duration::from_millis(c.rng.gen_range(0..20)));
    }
}

/// Runs `cases` cases, seeds `first..`, against one server; panics with the seed of a failure.
fn campaign(first: u64, cases: u64) {
    let d = dir();
    let img = create_image(d.path(), "disk.fvd", "8M");
    let mut srv = ServerProc::start(&img, &d.path().join("s.sock"), &["--num-queues", "2"]);
    let features = negotiate(&srv.socket).2;
    let start = Instant::now();
    for seed in first..first + cases {
        let guard = srv.kill_after(CASE_LIMIT);
        let t = Instant::now();
        let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            run_case(&srv, seed, features);
            assert!(srv.alive(), "the server died");
            let (mut g, _) = attach(&srv.socket);
            g.write_read(8 + (seed % 64) * 8, seed as u8);
        }));
        drop(guard);
        if outcome.is_err() || !srv.alive() || t.elapsed() > CASE_LIMIT {
            panic!(
                "case failed: replay with FVD_CAMPAIGN_SEED={seed} FVD_CAMPAIGN_CASES=1 \
                 (took {:?}, server alive: {})",
                t.elapsed(),
                srv.alive()
            );
        }
    }
    eprintln!("{cases} cases from seed {first} in {:?}", start.elapsed());
    let status = srv
        .terminate_within(Duration::from_secs(15))
        .expect("SIGTERM did not end the server");
    assert!(status.success(), "{status}");
}

#[test]
fn malformed_vhost_user_campaign() {
    let cases: u64 = std::env::var("FVD_CAMPAIGN_CASES")
        .map(|v| v.parse().unwrap())
        .unwrap_or(200);
    let first: u64 = std::env::var("FVD_CAMPAIGN_SEED")
        .map(|v| v.parse().unwrap())
        .unwrap_or(DEFAULT_SEED);
    campaign(first, cases);
}

/// Found by the campaign: the valid negotiation and a kick, then SET_VRING_KICK again with the
/// same eventfd, then a message that ends the connection. epoll reported the kick twice and the
/// queue thread blocked for good in its second read of the emptied eventfd, so the connection
/// never ended and the next frontend hung.
#[test]
fn campaign_case_kick_set_twice() {
    campaign(1_000_946, 1);
}

/// Found by the campaign: GPU_SET_SOCKET (or SET_BACKEND_REQ_FD) with a unix socket fd. The
/// vhost crate checks the fd with getsockopt, which the connection thread's seccomp filter did
/// not allow: the server died of SIGSYS.
#[test]
fn socket_fd_messages_do_not_kill_the_server() {
    const SET_BACKEND_REQ_FD: u32 = 21;
    const GPU_SET_SOCKET: u32 = 33;
    let d = dir();
    let img = create_image(d.path(), "disk.fvd", "8M");
    let mut srv = ServerProc::start(&img, &d.path().join("s.sock"), &[]);
    let _guard = srv.kill_after(Duration::from_secs(60));
    for code in [GPU_SET_SOCKET, SET_BACKEND_REQ_FD] {
        let (fe, raw, _) = negotiate(&srv.socket);
        let (a, _b) = UnixStream::pair().unwrap();
        let msg = u32s(&[code, VERSION | NEED_REPLY, 0]);
        raw.send_with_fds(&[&msg[..]], &[a.as_raw_fd()]).unwrap();
        let mut reply = [0u8; 12];
        let _ = (&raw).read(&mut reply);
        drop((fe, raw));
        assert!(srv.alive(), "message {code} killed the server");
        let (mut g, _) = attach(&srv.socket);
        g.write_read(8, code as u8);
    }
}
