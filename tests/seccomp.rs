//! `fvd serve --seccomp`: every serving thread runs under its own filter (on by default), and
//! the filters allow every path the server takes: a compact image on tmpfs that grows with
//! ftruncate, FVD and raw images on a loop device (block device ioctls, discard, write zeroes),
//! reconnects and a clean stop. A call outside the lists kills the process, so these tests
//! fail if a list misses one.

mod serve_support;

use serve_support::client::{connect, Req};
use serve_support::{fvd, thread_filters, Loop, ServerProc};
use std::path::Path;

const MIB: usize = 1 << 20;

fn pattern(seed: usize, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| (i.wrapping_mul(31) ^ seed.wrapping_mul(131) ^ (i >> 9)) as u8)
        .collect()
}

/// Runs `f` on its own thread, bounded in time: a server killed by its filter leaves the
/// client waiting for completions forever.
fn bounded(srv: &mut ServerProc, f: impl FnOnce() + Send + 'static) {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        f();
        let _ = tx.send(());
    });
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    loop {
        match rx.recv_timeout(std::time::Duration::from_millis(100)) {
            Ok(()) => return,
            // The thread panicked: its message is printed already.
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => panic!("the client failed"),
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
        }
        assert!(
            srv.alive(),
            "the server died (killed by its seccomp filter? see the kernel log for audit \
             type=1326)"
        );
        assert!(
            std::time::Instant::now() < deadline,
            "no answer from the server in 60 s"
        );
    }
}

/// Writes, reads back, discards, writes zeroes and flushes through a libblkio client; checks
/// that every thread kind runs filtered while connected; then stops the server cleanly.
fn exercise(mut srv: ServerProc, span: usize, chunks: usize) {
    let (sock, pid) = (srv.socket.clone(), srv.pid());
    bounded(&mut srv, move || io_and_checks(&sock, pid, span, chunks));
    assert!(
        srv.alive(),
        "the server died (a system call outside its list?)"
    );
    let st = srv.terminate();
    assert!(st.success(), "SIGTERM: {st}");
}

fn io_and_checks(sock: &Path, pid: i32, span: usize, chunks: usize) {
    let mut c = connect(sock, 2, false).unwrap();
    let step = span / chunks;
    for i in 0..chunks {
        let data = pattern(i, MIB);
        c.write(i % 2, (i * step) as u64, &data);
    }
    for i in 0..chunks {
        assert!(
            c.read((i + 1) % 2, (i * step) as u64, MIB) == pattern(i, MIB),
            "chunk {i} read back wrong"
        );
    }
    assert_eq!(c.run(0, Req::Discard, 0, 0, MIB), 0, "discard");
    assert_eq!(
        c.run(
            1,
            Req::WriteZeroes(blkio::ReqFlags::empty()),
            step as u64,
            0,
            MIB
        ),
        0,
        "write zeroes"
    );
    assert_eq!(c.run(0, Req::Flush, 0, 0, 0), 0, "flush");
    assert!(c.read(1, step as u64, MIB).iter().all(|&b| b == 0));

    let threads = thread_filters(pid);
    // Main: its allow-list plus the no-open filter; the threads it started for this connection
    // stack their own two on the two they inherited.
    assert_eq!(threads["fvd"], [2], "{threads:?}");
    assert_eq!(threads["fvd-signals"], [2], "{threads:?}");
    assert_eq!(threads["fvd-vhost-user"], [4], "{threads:?}");
    assert_eq!(threads["vring_worker"], [4, 4], "{threads:?}");
    drop(c);

    // A second connection gets fresh threads, equally filtered.
    let mut c = connect(sock, 2, false).unwrap();
    assert!(c.read(0, (2 * step) as u64, MIB) == pattern(2, MIB));
    assert_eq!(thread_filters(pid)["vring_worker"], [4, 4]);
}

fn check_clean(image: &Path) {
    let o = fvd().arg("check").arg(image).output().unwrap();
    assert!(
        o.status.success(),
        "fvd check: {}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
}

#[test]
fn compact_image_on_tmpfs_grows_under_seccomp_on() {
    let shm = Path::new("/dev/shm");
    // SAFETY: an all-zero statfs is a valid out-parameter.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    let c = std::ffi::CString::new("/dev/shm").unwrap();
    // SAFETY: a NUL-terminated path and a statfs to fill.
    if unsafe { libc::statfs(c.as_ptr(), &mut st) } != 0 || st.f_type != libc::TMPFS_MAGIC {
        eprintln!("SKIP: /dev/shm is not a tmpfs");
        return;
    }
    let d = tempfile::tempdir_in(shm).unwrap();
    let image = serve_support::create_image(d.path(), "disk.fvd", "512M");
    let before = std::fs::metadata(&image).unwrap().len();
    let sock = d.path().join("s.sock");
    // Default: --seccomp on.
    let srv = ServerProc::start(&image, &sock, &["--num-queues", "2"]);
    // 96 MiB of data: more than one 64 MiB growth step of the file.
    exercise(srv, 480 * MIB, 96);
    let after = std::fs::metadata(&image).unwrap().len();
    assert!(
        after >= before + 96 * MIB as u64,
        "the image file did not grow: {before} -> {after}"
    );
    check_clean(&image);
}

#[test]
fn fvd_and_raw_images_on_a_loop_device_under_seccomp_on() {
    let d = serve_support::dir();
    for (name, create) in [("fvd", true), ("raw", false)] {
        let backing = d.path().join(format!("{name}.img"));
        std::fs::File::create(&backing)
            .unwrap()
            .set_len(64 * MIB as u64)
            .unwrap();
        let Some(dev) = Loop::attach(&backing) else {
            return;
        };
        if create {
            let o = fvd()
                .arg("create")
                .arg(&dev.0)
                .args(["--size", "32M", "--no-compact"])
                .output()
                .unwrap();
            assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        }
        let sock = d.path().join(format!("{name}.sock"));
        let srv = ServerProc::start(&dev.0, &sock, &["--num-queues", "2", "--seccomp", "on"]);
        exercise(srv, 24 * MIB, 8);
        if create {
            check_clean(&dev.0);
        }
    }
}

#[test]
fn off_installs_no_filter_and_log_installs_them() {
    let d = serve_support::dir();
    let image = serve_support::create_image(d.path(), "disk.fvd", "64M");
    let sock = d.path().join("s.sock");
    let srv = ServerProc::start(&image, &sock, &["--seccomp", "off"]);
    let t = thread_filters(srv.pid());
    assert!(t.values().flatten().all(|&n| n == 0), "{t:?}");
    let st = srv.terminate();
    assert!(st.success(), "SIGTERM: {st}");

    let mut srv = ServerProc::start(&image, &sock, &["--seccomp", "log", "--num-queues", "1"]);
    let pid = srv.pid();
    bounded(&mut srv, move || {
        let mut c = connect(&sock, 1, false).unwrap();
        c.write(0, 0, &pattern(1, MIB));
        assert!(c.read(0, 0, MIB) == pattern(1, MIB));
        let t = thread_filters(pid);
        assert_eq!(t["fvd"], [2], "{t:?}");
        assert_eq!(t["fvd-signals"], [2], "{t:?}");
        assert_eq!(t["vring_worker"], [4], "{t:?}");
    });
    let st = srv.terminate();
    assert!(st.success(), "SIGTERM: {st}");

    let o = fvd()
        .arg("serve")
        .arg(&image)
        .args(["--socket", "x.sock", "--seccomp", "strict"])
        .output()
        .unwrap();
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("--seccomp"));
}
