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

/// SIGTERM while a request cannot finish: a write waits for space on a full block device (a
/// loop device standing in for a logical volume whose grow command does nothing). The server
/// waits its stop grace for it, then exits with status 3 instead of hanging; the image is left
/// unclean for the journal to replay. (A stalled NBD base is cut sooner, and cleanly:
/// tests/nbd_base.rs.)
#[test]
fn sigterm_ends_a_server_stuck_on_a_request() {
    let d = tempfile::tempdir_in("/var/tmp").unwrap();
    let backing = d.path().join("lv.img");
    // Header, metadata and a 1 MiB journal, and room for a few 1 MiB chunks only.
    File::create(&backing).unwrap().set_len(6 << 20).unwrap();
    let o = std::process::Command::new("losetup")
        .args(["--direct-io=on", "-f", "--show"])
        .arg(&backing)
        .output()
        .expect("losetup");
    if !o.status.success() {
        eprintln!("skipping: losetup: {}", String::from_utf8_lossy(&o.stderr));
        return;
    }
    struct Detach(String);
    impl Drop for Detach {
        fn drop(&mut self) {
            let _ = std::process::Command::new("losetup")
                .args(["-d", &self.0])
                .status();
        }
    }
    let dev = Detach(String::from_utf8(o.stdout).unwrap().trim().to_string());
    let o = fvd()
        .args(["create", &dev.0, "--size", "256M", "--journal-size", "1M"])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let srv = ServerProc::start(
        std::path::Path::new(&dev.0),
        &d.path().join("s.sock"),
        &["-f", "fvd", "--grow-cmd", "true", "--grow-timeout", "600"],
    );
    let _guard = srv.kill_after(Duration::from_secs(60));
    let (mut g, _) = attach(&srv.socket);
    // First writes to new chunks until one finds the device full and waits for space.
    let mut waiting = false;
    for chunk in 0..16u64 {
        let h = g.header(virtio_bindings::virtio_blk::VIRTIO_BLK_T_OUT, chunk * 2048);
        g.post(&[h, (DATA, 4096, false), (STATUS, 1, true)]);
        if g.try_complete(Duration::from_millis(500)).is_none() {
            waiting = true;
            break;
        }
    }
    assert!(waiting, "no write ever waited for space");
    let t = std::time::Instant::now();
    let status = srv.terminate_within(Duration::from_secs(30));
    let status = status.expect("SIGTERM did not end a server stuck on a request");
    assert_eq!(status.code(), Some(3), "{status}");
    assert!(t.elapsed() < Duration::from_secs(20), "{:?}", t.elapsed());
    drop(g);
}

/// A frontend that shrinks its memfd after the server mapped it: the server's next access to
/// the lost pages raised SIGBUS and killed it. Now that connection is ended and its requests are
/// not executed, and the server carries on.
#[test]
fn guest_memory_shrunk_after_mapping_ends_the_connection_not_the_server() {
    use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};
    let d = dir();
    let img = create_image(d.path(), "disk.fvd", "8M");
    let mut srv = ServerProc::start(&img, &d.path().join("s.sock"), &[]);
    let _guard = srv.kill_after(Duration::from_secs(60));
    let (mut g, _) = attach(&srv.socket);
    g.write_read(8, 10);
    let h = g.header(virtio_bindings::virtio_blk::VIRTIO_BLK_T_GET_ID, 0);
    g.prepare(&[h, (DATA, 20, true), (STATUS, 1, true)]);
    // Keep only the page holding the rings: the request header, data and status are gone.
    let file = g.mem.iter().next().unwrap().file_offset().unwrap().file();
    file.set_len(4096).unwrap();
    g.kick.write(1).unwrap();
    std::thread::sleep(Duration::from_millis(500));
    assert!(srv.alive(), "SIGBUS killed the server");
    assert!(g.fe.get_features().is_err(), "the connection was not ended");
    drop(g);
    still_serves(&mut srv, 11);
    stop_clean(srv, &img);
}

/// Connections, complete or not, leave no fd behind: each used to leak one eventfd per queue
/// thread, so enough connects (no negotiation needed) exhausted the server's fds.
#[test]
fn connections_do_not_leak_fds() {
    let d = dir();
    let img = create_image(d.path(), "disk.fvd", "8M");
    let mut srv = ServerProc::start(&img, &d.path().join("s.sock"), &["--num-queues", "2"]);
    let _guard = srv.kill_after(Duration::from_secs(60));
    let fds = |pid: i32| {
        std::fs::read_dir(format!("/proc/{pid}/fd"))
            .unwrap()
            .count()
    };
    // The first connection may allocate for good (e.g. the control ring's buffers).
    still_serves(&mut srv, 12);
    let before = fds(srv.pid());
    for i in 0..20 {
        drop(std::os::unix::net::UnixStream::connect(&srv.socket).unwrap());
        still_serves(&mut srv, i);
    }
    // The last connection's teardown may still be under way.
    let deadline = std::time::Instant::now() + TIMEOUT;
    while fds(srv.pid()) > before && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(
        fds(srv.pid()) <= before,
        "{} fds after 40 connections, {before} before",
        fds(srv.pid())
    );
    stop_clean(srv, &img);
}

/// Threads and fds of the server process.
fn threads_and_fds(pid: i32) -> (usize, usize) {
    let count = |d: String| std::fs::read_dir(d).unwrap().count();
    (
        count(format!("/proc/{pid}/task")),
        count(format!("/proc/{pid}/fd")),
    )
}

/// Connections that end on a request error while their queue runs (here SET_BACKEND_REQ_FD,
/// whose protocol feature was not negotiated; the fuzzer's input
/// fuzz/regressions/vhost_user/handler-thread-leak, where LeakSanitizer once reported a vring
/// thread's state left behind) leave no thread or fd behind.
#[test]
fn connections_ending_on_an_error_do_not_leak() {
    let d = dir();
    let img = create_image(d.path(), "disk.fvd", "8M");
    let mut srv = ServerProc::start(&img, &d.path().join("s.sock"), &["--num-queues", "2"]);
    let _guard = srv.kill_after(Duration::from_secs(90));
    still_serves(&mut srv, 1);
    let before = threads_and_fds(srv.pid());
    for i in 0..20 {
        let (mut g, _) = attach(&srv.socket);
        g.write_read(8, i);
        // SET_BACKEND_REQ_FD (21), version 1, no payload, no fd.
        let mut msg = Vec::new();
        for w in [21u32, 1, 0] {
            msg.extend_from_slice(&w.to_le_bytes());
        }
        (&g.raw).write_all(&msg).unwrap();
        drop(g);
        still_serves(&mut srv, i);
    }
    // The last connection's teardown may still be under way.
    let deadline = std::time::Instant::now() + TIMEOUT;
    let within = |now: (usize, usize)| now.0 <= before.0 && now.1 <= before.1;
    while !within(threads_and_fds(srv.pid())) && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    let after = threads_and_fds(srv.pid());
    assert!(
        within(after),
        "(threads, fds): {after:?} after 40 connections, {before:?} before"
    );
    stop_clean(srv, &img);
}

/// CPU time (user + system, in clock ticks) the process has used so far.
fn cpu_ticks(pid: i32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // The fields after the command name, which ends with the last ')'.
    let f: Vec<&str> = stat[stat.rfind(')').unwrap() + 2..].split(' ').collect();
    f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap()
}

/// SET_VRING_KICK on a running queue: the queue thread stops watching the old kick eventfd. It
/// used to stay in the thread's epoll set while the thread read the new one, so a kick on the old
/// fd (which the frontend still holds) was never consumed: the thread spun on it for good (or,
/// before the kick was read without waiting, blocked on the new one and wedged the server).
#[test]
fn a_kick_on_a_replaced_kick_fd_is_ignored() {
    let d = dir();
    let img = create_image(d.path(), "disk.fvd", "8M");
    let mut srv = ServerProc::start(&img, &d.path().join("s.sock"), &[]);
    let _guard = srv.kill_after(Duration::from_secs(60));
    let (mut g, _) = attach(&srv.socket);
    g.write_read(8, 1);
    let b = EventFd::new(0).unwrap();
    g.fe.set_vring_kick(0, &b).unwrap();
    let a = std::mem::replace(&mut g.kick, b);
    a.write(1).unwrap();
    std::thread::sleep(Duration::from_millis(200));
    let t0 = cpu_ticks(srv.pid());
    std::thread::sleep(Duration::from_secs(1));
    let used = cpu_ticks(srv.pid()) - t0;
    assert!(
        used < 30,
        "the server used {used} ticks of CPU in 1 s while idle"
    );
    // The queue still works through the new kick fd.
    g.write_read(16, 2);
    drop(g);
    still_serves(&mut srv, 3);
    stop_clean(srv, &img);
}
