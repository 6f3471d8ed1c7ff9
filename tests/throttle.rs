//! `fvd serve`'s I/O limits, driven by a real vhost-user-blk frontend (libblkio): limited
//! requests all complete (none lost, none failed) and take at least the time the limits imply;
//! waiting requests do not hold up a leaving frontend or a SIGTERM; bad limits are refused.
//! Only lower bounds on time are asserted: a loaded machine may always be slower.

mod serve_support;

use serve_support::client::{connect, Req};
use serve_support::{check_passes, create_image, dir, fvd, ServerProc};
use std::time::{Duration, Instant};

fn pattern(seed: u64, off: u64, len: usize) -> Vec<u8> {
    (0..len as u64)
        .map(|i| ((off + i).wrapping_mul(0x9e37_79b9).wrapping_add(seed * 131) >> 7) as u8)
        .collect()
}

const K4: usize = 4096;

/// Queues `n` 4 KiB writes on queue `q` at offsets `base + i * 4K`, buffer offsets `boff + i * 4K`.
fn enqueue_writes(
    c: &mut serve_support::client::Client,
    q: usize,
    base: u64,
    boff: usize,
    n: usize,
) {
    for i in 0..n {
        let off = base + (i * K4) as u64;
        let b = boff + i * K4;
        c.buf(b, K4).copy_from_slice(&pattern(7, off, K4));
        c.enqueue(q, &Req::Write, off, b, K4, i);
    }
}

fn all_ok(done: &[(usize, i32)], n: usize) {
    let mut tags: Vec<usize> = done.iter().map(|&(t, _)| t).collect();
    tags.sort_unstable();
    assert_eq!(
        tags,
        (0..n).collect::<Vec<_>>(),
        "every request completes once"
    );
    assert!(done.iter().all(|&(_, r)| r == 0), "{done:?}");
}

/// 100 requests on two queues under --iops-total 50: the total limit is shared by the queues
/// and by reads and writes. The bucket lets 50/10 pass at once, so the last one cannot start
/// before (99 - 5) / 50 = 1.88 s.
#[test]
fn iops_limit_shared_by_queues_and_directions() {
    let d = dir();
    let img = create_image(d.path(), "disk.fvd", "16M");
    let srv = ServerProc::start(
        &img,
        &d.path().join("s.sock"),
        &["--num-queues", "2", "--iops-total", "50"],
    );
    let mut c = connect(&srv.socket, 2, false).unwrap();
    let start = Instant::now();
    enqueue_writes(&mut c, 0, 0, 0, 50);
    for i in 0..50 {
        c.enqueue(
            1,
            &Req::Read,
            (8 << 20) + (i * K4) as u64,
            (1 << 20) + i * K4,
            K4,
            i,
        );
    }
    all_ok(&c.wait(0, 50), 50);
    all_ok(&c.wait(1, 50), 50);
    let took = start.elapsed();
    assert!(took >= Duration::from_millis(1850), "{took:?}");
    // What was written is there (one 200 KiB read: one more request).
    assert_eq!(c.read(1, 0, 50 * K4), pattern(7, 0, 50 * K4));
    drop(c);
    assert!(srv.terminate().success());
}

/// --bps-write 512K: four 256 KiB writes, the last not before (768K - 51.2K) / 512K = 1.4 s;
/// reads are not limited. --iops-read 10 with --iops-size 4K: a 64 KiB read counts as 16, so
/// the next waits (16 - 1) / 10 = 1.5 s.
#[test]
fn bps_limit_and_iops_size() {
    let d = dir();
    let img = create_image(d.path(), "disk.fvd", "16M");
    let srv = ServerProc::start(
        &img,
        &d.path().join("s.sock"),
        &[
            "--num-queues",
            "1",
            "--bps-write",
            "512K",
            "--iops-read",
            "10",
            "--iops-size",
            "4K",
        ],
    );
    let mut c = connect(&srv.socket, 1, false).unwrap();
    let start = Instant::now();
    for i in 0..4 {
        let off = (i << 18) as u64;
        c.buf(i << 18, 1 << 18)
            .copy_from_slice(&pattern(3, off, 1 << 18));
        c.enqueue(0, &Req::Write, off, i << 18, 1 << 18, i);
    }
    all_ok(&c.wait(0, 4), 4);
    let took = start.elapsed();
    assert!(took >= Duration::from_millis(1390), "{took:?}");

    let start = Instant::now();
    assert_eq!(c.read(0, 0, 64 << 10), pattern(3, 0, 64 << 10));
    assert_eq!(
        c.read(0, 64 << 10, 64 << 10),
        pattern(3, 64 << 10, 64 << 10)
    );
    let took = start.elapsed();
    assert!(took >= Duration::from_millis(1490), "{took:?}");
    drop(c);
    assert!(srv.terminate().success());
}

/// Under --iops-write 1, 16 queued writes would take 15 s. A frontend leaving with them waiting
/// does not wait for that: the next one is served at once (reads are not limited) and finds
/// every write done. A SIGTERM with writes waiting stops the server promptly and cleanly, with
/// every write taken from the ring done and on disk.
#[test]
fn waiting_requests_do_not_hold_up_a_leaving_frontend_or_sigterm() {
    let d = dir();
    let img = create_image(d.path(), "disk.fvd", "16M");
    let sock = d.path().join("s.sock");
    let srv = ServerProc::start(&img, &sock, &["--num-queues", "1", "--iops-write", "1"]);
    let _guard = srv.kill_after(Duration::from_secs(120));
    let mut c = connect(&srv.socket, 1, false).unwrap();
    enqueue_writes(&mut c, 0, 0, 0, 16);
    // Submitted; the first goes at once, the rest wait.
    let early = c.wait_for(0, 16, Duration::from_millis(500));
    assert!(early.len() < 16, "{early:?}");
    let start = Instant::now();
    drop(c);
    let mut c = connect(&srv.socket, 1, false).unwrap();
    assert_eq!(c.read(0, 0, 16 * K4), pattern(7, 0, 16 * K4));
    assert!(
        start.elapsed() < Duration::from_secs(12),
        "{:?}",
        start.elapsed()
    );

    enqueue_writes(&mut c, 0, 1 << 20, 0, 16);
    let early = c.wait_for(0, 16, Duration::from_millis(500));
    assert!(early.len() < 16, "{early:?}");
    let start = Instant::now();
    let st = srv
        .terminate_within(Duration::from_secs(12))
        .expect("a throttled server stops without waiting out its limits");
    assert!(st.success(), "{st}");
    assert!(start.elapsed() < Duration::from_secs(12));
    drop(c);
    check_passes(&img, "after SIGTERM with throttled writes");
    let srv = ServerProc::start(&img, &sock, &["--num-queues", "1"]);
    let mut c = connect(&srv.socket, 1, false).unwrap();
    assert_eq!(c.read(0, 1 << 20, 16 * K4), pattern(7, 1 << 20, 16 * K4));
    drop(c);
    assert!(srv.terminate().success());
}

#[test]
fn invalid_limits_are_refused_with_qemus_messages() {
    let d = dir();
    let img = create_image(d.path(), "disk.fvd", "16M");
    let sock = d.path().join("s.sock");
    for (args, msg) in [
        (
            &["--iops-total", "10", "--iops-read", "5"][..],
            "total values and read/write values cannot be used at the same time",
        ),
        (
            &["--bps-total", "1M", "--bps-total-max", "512K"][..],
            "bps_max/iops_max cannot be lower than bps/iops",
        ),
        (
            &["--iops-write-max", "100"][..],
            "bps_max/iops_max require corresponding bps/iops values",
        ),
        (
            &["--iops-size", "4K"][..],
            "iops size requires an iops value",
        ),
        (
            &["--iops-read", "10", "--iops-read-max-length", "5"][..],
            "burst length set without burst rate",
        ),
        (
            &[
                "--iops-read",
                "10",
                "--iops-read-max",
                "20",
                "--iops-read-max-length",
                "0",
            ][..],
            "the burst length cannot be 0",
        ),
        (
            &["--bps-read", "2000000000000000"][..],
            "values must be within [0, 1000000000000000]",
        ),
        (&["--iops-total", "many"][..], "invalid value 'many'"),
    ] {
        let o = fvd()
            .arg("serve")
            .arg(&img)
            .arg("--socket")
            .arg(&sock)
            .args(args)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success(), "{args:?} accepted");
        assert!(err.contains(msg), "{args:?}: {err}");
        assert!(!sock.exists(), "{args:?}: socket left behind");
    }
    check_passes(&img, "after the refused starts");
}

/// A limit changed while requests wait applies to them: an in-process server (the library's
/// `Server`, as `fvd serve` runs it) starts at 20 requests/s; once some requests went, the
/// limit is lowered to 5/s through `ServerHandle::set_throttle`, and the requests still waiting
/// then take at least what 5/s implies. An invalid change is refused and changes nothing.
#[test]
fn a_live_change_applies_to_waiting_requests() {
    use fvd::server::throttle::{Limit, ThrottleConfig, ThrottleError};
    let d = dir();
    let img = create_image(d.path(), "disk.fvd", "16M");
    let sock = d.path().join("live.sock");
    let limit = |avg| ThrottleConfig {
        iops_total: Limit {
            avg,
            ..Limit::default()
        },
        ..ThrottleConfig::default()
    };
    let srv = fvd::server::Server::bind(fvd::server::ServeConfig {
        // Ends with the client: no signal needed in this (shared) test process.
        once: true,
        prefetch: Some(false),
        // Filters would bind the test process's threads.
        seccomp: fvd::server::seccomp::SeccompMode::Off,
        throttle: limit(20),
        ..fvd::server::ServeConfig::new(img.clone(), Some(sock.clone()))
    })
    .unwrap();
    let handle = srv.handle();
    assert_eq!(handle.throttle(), limit(20));
    let thread = std::thread::spawn(move || srv.run());

    let mut c = connect(&sock, 1, false).unwrap();
    let n = 20;
    for i in 0..n {
        c.enqueue(0, &Req::Read, (i * K4) as u64, i * K4, K4, i);
    }
    let mut done = c.wait_for(0, n, Duration::from_millis(250));
    let changed = Instant::now();
    handle.set_throttle(limit(5)).unwrap();
    let mut bad = limit(5);
    bad.iops_read.avg = 1;
    assert_eq!(
        handle.set_throttle(bad),
        Err(ThrottleError::TotalAndReadWrite)
    );
    assert_eq!(handle.throttle(), limit(5));
    // Those still waiting: the first goes at once (the buckets start empty), the second after
    // 0.1 s (a bucket of 0.5), then one every 0.2 s. One may have gone just before the change.
    let waiting = n - done.len();
    assert!(waiting >= 6, "only {waiting} left waiting");
    done.extend(c.wait(0, waiting));
    all_ok(&done, n);
    let took = changed.elapsed().as_secs_f64();
    let least = (waiting as f64 - 2.5) / 5.0;
    assert!(took >= least, "{took} s < {least} s for {waiting} requests");
    drop(c);
    thread.join().unwrap().unwrap();
    // The handle holds the disk (and its lock) until dropped.
    drop(handle);
    check_passes(&img, "after the live change");
}

/// A queue whose reads wait on their limit keeps serving what is not limited: under
/// --iops-read 1, a write and a flush queued behind four reads on the same queue complete while
/// the reads still wait, and the reads all complete afterwards.
#[test]
fn a_waiting_request_does_not_block_its_queue() {
    let d = dir();
    let img = create_image(d.path(), "disk.fvd", "16M");
    let srv = ServerProc::start(
        &img,
        &d.path().join("s.sock"),
        &["--num-queues", "1", "--iops-read", "1"],
    );
    let mut c = connect(&srv.socket, 1, false).unwrap();
    for i in 0..4 {
        c.enqueue(0, &Req::Read, (i * K4) as u64, i * K4, K4, i);
    }
    c.buf(8 * K4, K4).copy_from_slice(&pattern(5, 1 << 20, K4));
    c.enqueue(0, &Req::Write, 1 << 20, 8 * K4, K4, 10);
    c.enqueue(0, &Req::Flush, 0, 0, 0, 11);
    let mut done = Vec::new();
    while !(done.iter().any(|&(t, _)| t == 10) && done.iter().any(|&(t, _)| t == 11)) {
        done.extend(c.wait(0, 1));
    }
    let reads_done = done.iter().filter(|&&(t, _)| t < 4).count();
    assert!(reads_done < 4, "{done:?}");
    done.extend(c.wait(0, 6 - done.len()));
    assert!(done.iter().all(|&(_, r)| r == 0), "{done:?}");
    let mut tags: Vec<usize> = done.iter().map(|&(t, _)| t).collect();
    tags.sort_unstable();
    assert_eq!(tags, [0, 1, 2, 3, 10, 11]);
    drop(c);
    assert!(srv.terminate().success());
}

/// GET_VRING_BASE with a write waiting on its limit (--bps-write 512: after one 64 KiB write,
/// the next would wait two minutes) returns without waiting it out, with the write done and
/// published: the base is the used index, and the next frontend reads the data.
#[test]
fn get_vring_base_does_not_wait_out_the_limit() {
    use serve_support::guest::{attach, DATA, STATUS};
    use vhost::VhostBackend;
    use virtio_bindings::virtio_blk::{VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT};
    let d = dir();
    let img = create_image(d.path(), "disk.fvd", "16M");
    let mut srv = ServerProc::start(
        &img,
        &d.path().join("s.sock"),
        &["--num-queues", "1", "--bps-write", "512"],
    );
    let _guard = srv.kill_after(Duration::from_secs(120));
    let (mut g, _) = attach(&srv.socket);
    let k64 = 64 << 10;
    g.fill(DATA, k64 as usize, 1);
    let h = g.header(VIRTIO_BLK_T_OUT, 0);
    assert_eq!(
        g.submit(&[h, (DATA, k64, false), (STATUS, 1, true)]),
        (1, 0)
    );
    let data = g.fill(DATA, k64 as usize, 2);
    let h = g.header(VIRTIO_BLK_T_OUT, 128);
    g.post(&[h, (DATA, k64, false), (STATUS, 1, true)]);
    assert_eq!(
        g.try_complete(Duration::from_millis(500)),
        None,
        "not limited"
    );
    let start = Instant::now();
    let base = g.fe.get_vring_base(0).unwrap();
    assert!(
        start.elapsed() < Duration::from_secs(12),
        "{:?}",
        start.elapsed()
    );
    assert_eq!(g.used_idx(), 2, "the waiting write was published");
    assert_eq!(base, 2, "the base is the used index");
    assert_eq!(g.try_complete(Duration::ZERO), Some((1, 0)));
    drop(g);
    assert!(srv.alive());
    let (mut g, _) = attach(&srv.socket);
    let h = g.header(VIRTIO_BLK_T_IN, 128);
    assert_eq!(
        g.submit(&[h, (DATA, k64, true), (STATUS, 1, true)]),
        (k64 + 1, 0)
    );
    assert_eq!(g.read_back(DATA, k64 as usize), data);
    drop(g);
    let st = srv.terminate_within(Duration::from_secs(15)).unwrap();
    assert!(st.success(), "{st}");
}
