//! `fvd serve` against hostile vhost-user frontends: memory tables the server must not map,
//! file descriptors that are not eventfds, and signals. After each attack the server must still
//! be alive and serve a well-behaved frontend, and SIGTERM must still end it with a clean image.

mod serve_support;

use serve_support::guest::*;
use serve_support::{create_image, dir, fvd, ServerProc};
use std::fs::File;
use std::io::Write;
use std::os::fd::{AsRawFd, FromRawFd};
use std::path::Path;
use std::time::Duration;
use vhost::vhost_user::VhostUserFrontend;
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use vmm_sys_util::eventfd::EventFd;

/// SIGTERM ends the server within a few seconds, successfully, and leaves the image clean.
fn stop_clean(srv: ServerProc, img: &Path) {
    let status = srv
        .terminate_within(Duration::from_secs(15))
        .expect("the server ignored SIGTERM");
    assert!(status.success(), "{status}");
    let o = fvd().arg("info").arg(img).output().unwrap();
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(out.contains("clean shutdown: yes"), "{out}");
}

/// A well-behaved frontend is served: negotiation, a write and a read.
fn still_serves(srv: &mut ServerProc, seed: u8) {
    assert!(srv.alive(), "the server died");
    let (mut g, _) = attach(&srv.socket);
    g.write_read(8, seed);
}

fn region(file: &File, guest: u64, size: u64, offset: u64) -> VhostUserMemoryRegionInfo {
    VhostUserMemoryRegionInfo {
        guest_phys_addr: guest,
        memory_size: size,
        // The frontend's own address: only used to translate vring addresses.
        userspace_addr: 0x7000_0000_0000 + guest,
        mmap_offset: offset,
        mmap_handle: file.as_raw_fd(),
    }
}

/// Points queue 0 at guest address 0 of a region whose frontend address is `ua`, and kicks: the
/// server then reads the rings there.
fn start_ring(fe: &mut vhost::vhost_user::Frontend, ua: u64) -> Vec<EventFd> {
    let _ = fe.set_vring_num(0, QSIZE);
    let _ = fe.set_vring_addr(
        0,
        &VringConfigData {
            queue_max_size: QSIZE,
            queue_size: QSIZE,
            flags: 0,
            desc_table_addr: ua,
            used_ring_addr: ua + 0x200,
            avail_ring_addr: ua + 0x100,
            log_addr: None,
        },
    );
    let _ = fe.set_vring_base(0, 0);
    let (call, kick) = (EventFd::new(0).unwrap(), EventFd::new(0).unwrap());
    let _ = fe.set_vring_call(0, &call);
    let _ = fe.set_vring_kick(0, &kick);
    let _ = fe.set_vring_enable(0, true);
    let _ = kick.write(1);
    vec![call, kick]
}

/// Regions whose file is too small (or that overlap) are refused before anything is mapped:
/// accepted, the first access to their tail would kill the server with SIGBUS.
#[test]
fn memory_regions_beyond_their_file_are_refused() {
    let d = dir();
    let img = create_image(d.path(), "disk.fvd", "8M");
    let mut srv = ServerProc::start(&img, &d.path().join("s.sock"), &[]);
    let _guard = srv.kill_after(Duration::from_secs(60));
    let small = memfd(MEM as u64);
    let big = (2 * MEM) as u64;
    let tail = 0x7000_0000_0000 + MEM as u64;
    type Table = Vec<VhostUserMemoryRegionInfo>;
    let cases: Vec<(&str, Table, u64)> = vec![
        ("size past EOF", vec![region(&small, 0, big, 0)], tail),
        (
            "offset past EOF",
            vec![region(&small, 0, MEM as u64, 4096)],
            tail - 4096,
        ),
        (
            "overlapping guest ranges",
            vec![
                region(&small, 0, MEM as u64, 0),
                region(&small, 4096, MEM as u64 - 4096, 4096),
            ],
            0x7000_0000_0000,
        ),
    ];
    for (name, table, ring) in cases {
        let (mut fe, _raw, _) = negotiate(&srv.socket);
        let r = fe.set_mem_table(&table);
        assert!(r.is_err(), "{name}: SET_MEM_TABLE accepted");
        // Were it accepted, this would make the server read the rings from the region's tail.
        let _fds = start_ring(&mut fe, ring);
        drop(fe);
        still_serves(&mut srv, 1);
    }

    // The same through ADD_MEM_REG.
    let (mut fe, _raw, _) = negotiate(&srv.socket);
    let r = fe.add_mem_region(&region(&small, 0, big, 0));
    assert!(r.is_err(), "ADD_MEM_REG past EOF accepted");
    let _fds = start_ring(&mut fe, tail);
    drop(fe);
    still_serves(&mut srv, 2);

    // An ADD_MEM_REG overlapping a region already there.
    let (mut g, _) = attach(&srv.socket);
    let other = memfd(MEM as u64);
    let r =
        g.fe.add_mem_region(&region(&other, MEM as u64 / 2, MEM as u64, 0));
    assert!(r.is_err(), "overlapping ADD_MEM_REG accepted");
    drop(g);
    still_serves(&mut srv, 3);
    stop_clean(srv, &img);
}

/// A pipe as the kick, call or error fd is refused; before, a pipe kick with unread data left
/// the queue thread blocked in read() for good, and every later frontend hung.
#[test]
fn vring_fds_that_are_not_eventfds_are_refused() {
    let d = dir();
    let img = create_image(d.path(), "disk.fvd", "8M");
    let mut srv = ServerProc::start(&img, &d.path().join("s.sock"), &[]);
    let _guard = srv.kill_after(Duration::from_secs(60));
    for which in ["kick", "call", "err"] {
        let (g, _) = attach(&srv.socket);
        let mut fds = [0; 2];
        // SAFETY: pipe fills the two fds it is given.
        assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
        // SAFETY: both fds were just created and are owned by nobody else.
        let (rd, mut wr) = unsafe { (EventFd::from_raw_fd(fds[0]), File::from_raw_fd(fds[1])) };
        wr.write_all(b"abc").unwrap();
        let r = match which {
            "kick" => g.fe.set_vring_kick(0, &rd),
            "call" => g.fe.set_vring_call(0, &rd),
            _ => g.fe.set_vring_err(0, &rd),
        };
        assert!(r.is_err(), "a pipe accepted as the {which} fd");
        let _ = g.kick.write(1);
        drop(g);
        still_serves(&mut srv, 4);
        drop((rd, wr));
    }
    stop_clean(srv, &img);
}

/// A call eventfd whose counter is at its maximum would block the queue thread's write for
/// good: the server skips that interrupt instead and still ends the connection.
#[test]
fn a_full_call_eventfd_does_not_block_the_queue() {
    let d = dir();
    let img = create_image(d.path(), "disk.fvd", "8M");
    let mut srv = ServerProc::start(&img, &d.path().join("s.sock"), &[]);
    let _guard = srv.kill_after(Duration::from_secs(60));
    let (mut g, _) = attach(&srv.socket);
    let full = EventFd::new(0).unwrap();
    full.write(u64::MAX - 1).unwrap();
    g.fe.set_vring_call(0, &full).unwrap();
    let h = g.header(virtio_bindings::virtio_blk::VIRTIO_BLK_T_FLUSH, 0);
    g.post(&[h, (STATUS, 1, true)]);
    // The request completes (seen in the used ring) even though no interrupt can be sent.
    let deadline = std::time::Instant::now() + TIMEOUT;
    while g.used_idx() == 0 && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(g.used_idx(), 1);
    drop(g);
    still_serves(&mut srv, 5);
    drop(full);
    stop_clean(srv, &img);
}

/// SIGHUP, SIGUSR1 and SIGUSR2 neither kill the server nor stop it serving.
#[test]
fn stray_signals_do_not_kill_the_server() {
    let d = dir();
    let img = create_image(d.path(), "disk.fvd", "8M");
    let mut srv = ServerProc::start(&img, &d.path().join("s.sock"), &[]);
    let _guard = srv.kill_after(Duration::from_secs(60));
    let (mut g, _) = attach(&srv.socket);
    for sig in [libc::SIGHUP, libc::SIGUSR1, libc::SIGUSR2] {
        srv.signal(sig);
        std::thread::sleep(Duration::from_millis(100));
        assert!(srv.alive(), "signal {sig} killed the server");
        g.write_read(16, sig as u8);
    }
    drop(g);
    still_serves(&mut srv, 6);
    stop_clean(srv, &img);
}
