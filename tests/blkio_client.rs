//! `fvd serve` driven by a real vhost-user-blk frontend: libblkio's virtio-blk-vhost-user driver.
//! (libblkio never sends SET_MEM_TABLE: it adds memory regions one by one, identity-mapped.)

mod serve_support;

use blkio::ReqFlags;
use serve_support::client::{connect, connect_with, Req};
use serve_support::{check_passes, create_image, dir, ServerProc};

/// Deterministic bytes that differ per offset and per `seed`.
fn pattern(seed: u64, off: u64, len: usize) -> Vec<u8> {
    (0..len as u64)
        .map(|i| ((off + i).wrapping_mul(0x9e37_79b9).wrapping_add(seed * 131) >> 7) as u8)
        .collect()
}

#[test]
fn write_read_verify_across_offsets_and_sizes() {
    let d = dir();
    let img = create_image(d.path(), "disk.fvd", "64M");
    let srv = ServerProc::start(&img, &d.path().join("s.sock"), &["--num-queues", "1"]);
    let mut c = connect(&srv.socket, 1, false).unwrap();
    assert_eq!(c.max_seg, 1 << 20);

    // Never written: zeros.
    assert!(c.read(0, 0, 128 << 10).iter().all(|&b| b == 0));
    // Sizes in 512-byte steps (unaligned to pages and blocks), at offsets that straddle
    // 4 KiB pages, 64 KiB blocks and 1 MiB chunks.
    let mut cases = Vec::new();
    for (i, len) in [
        512usize,
        1024,
        1536,
        3584,
        4096,
        4608,
        65536 - 512,
        65536 + 512,
        300 << 10,
        1 << 20,
    ]
    .into_iter()
    .enumerate()
    {
        for base in [
            0u64,
            512 * 7,
            (64 << 10) - 1024,
            (1 << 20) - 512,
            33 << 20,
            (64 << 20) - (1 << 20),
        ] {
            let off = base + (i as u64) * (3 << 20) % (30 << 20);
            let off = off.min((64 << 20) - len as u64);
            cases.push((off, len));
        }
    }
    for (n, &(off, len)) in cases.iter().enumerate() {
        c.write(0, off, &pattern(n as u64, off, len));
        assert_eq!(
            c.read(0, off, len),
            pattern(n as u64, off, len),
            "case {n}: {off} +{len}"
        );
    }
    // Many requests in flight at once, then verified.
    let n = 32;
    for i in 0..n {
        let off = (40 << 20) + i as u64 * 8192;
        let data = pattern(1000 + i as u64, off, 4096 + 512);
        c.buf(i * 8192, data.len()).copy_from_slice(&data);
        c.enqueue(0, &Req::Write, off, i * 8192, data.len(), i);
    }
    let mut done = c.wait(0, n);
    done.sort();
    assert_eq!(done, (0..n).map(|i| (i, 0)).collect::<Vec<_>>());
    assert_eq!(c.run(0, Req::Flush, 0, 0, 0), 0);
    for i in 0..n {
        let off = (40 << 20) + i as u64 * 8192;
        assert_eq!(
            c.read(0, off, 4096 + 512),
            pattern(1000 + i as u64, off, 4096 + 512)
        );
    }
    // Past the end of the disk, or a buffer over size_max: refused, and the device goes on.
    assert_ne!(c.run(0, Req::Read, 64 << 20, 0, 512), 0);
    let off = 62 << 20;
    c.write(0, off, &pattern(77, off, 4096));
    c.buf(0, 2 << 20).fill(0x55);
    assert_ne!(c.run(0, Req::Write, off, 0, 2 << 20), 0);
    assert_eq!(c.read(0, off, 4096), pattern(77, off, 4096));
}

#[test]
fn flush_discard_and_write_zeroes() {
    let d = dir();
    let img = create_image(d.path(), "disk.fvd", "32M");
    let srv = ServerProc::start(&img, &d.path().join("s.sock"), &[]);
    let mut c = connect(&srv.socket, 1, false).unwrap();
    let mb = 1u64 << 20;

    for (i, flags) in [ReqFlags::empty(), ReqFlags::NO_UNMAP]
        .into_iter()
        .enumerate()
    {
        let off = (i as u64 + 1) * 4 * mb;
        c.write(0, off, &pattern(9, off, 2 * mb as usize));
        assert_eq!(c.run(0, Req::Flush, 0, 0, 0), 0);
        // Zero a middle part (unaligned to blocks) and check both the zeros and the edges.
        let z = off + 64 * 1024 + 512;
        assert_eq!(c.run(0, Req::WriteZeroes(flags), z, 0, 512 * 1000), 0);
        let back = c.read(0, off, 2 * mb as usize);
        let zs = (z - off) as usize;
        assert!(
            back[zs..zs + 512 * 1000].iter().all(|&b| b == 0),
            "flags {flags:?}"
        );
        assert_eq!(back[..zs], pattern(9, off, zs)[..]);
        assert_eq!(
            back[zs + 512 * 1000..],
            pattern(9, off, 2 * mb as usize)[zs + 512 * 1000..]
        );
    }
    // Discard succeeds; the rest of the disk is unaffected.
    let off = 16 * mb;
    c.write(0, off, &pattern(3, off, mb as usize));
    c.write(0, off + 2 * mb, &pattern(4, off + 2 * mb, 4096));
    assert_eq!(c.run(0, Req::Discard, off, 0, mb as usize), 0);
    assert_eq!(
        c.read(0, off + 2 * mb, 4096),
        pattern(4, off + 2 * mb, 4096)
    );
    assert_eq!(c.run(0, Req::Flush, 0, 0, 0), 0);
}

#[test]
fn multiqueue_io_on_both_queues() {
    let d = dir();
    let img = create_image(d.path(), "disk.fvd", "32M");
    let srv = ServerProc::start(&img, &d.path().join("s.sock"), &["--num-queues", "2"]);
    let mut c = connect(&srv.socket, 2, false).unwrap();
    assert_eq!(c.queues.len(), 2);
    // Both queues busy at the same time, each with several requests in flight.
    let per = 16;
    for q in 0..2 {
        for i in 0..per {
            let off = (q * per + i) as u64 * 65536;
            let boff = (q * per + i) * 65536;
            let data = pattern(q as u64, off, 65536);
            c.buf(boff, 65536).copy_from_slice(&data);
            c.enqueue(q, &Req::Write, off, boff, 65536, i);
        }
    }
    for q in 0..2 {
        assert!(c.wait(q, per).iter().all(|&(_, r)| r == 0));
    }
    // Read each queue's data back through the other queue.
    for q in 0..2 {
        for i in 0..per {
            let off = (q * per + i) as u64 * 65536;
            assert_eq!(c.read(1 - q, off, 65536), pattern(q as u64, off, 65536));
        }
        assert_eq!(c.run(q, Req::Flush, 0, 0, 0), 0);
    }
}

#[test]
fn readonly_server_refuses_writes() {
    let d = dir();
    let img = create_image(d.path(), "disk.fvd", "16M");
    {
        let srv = ServerProc::start(&img, &d.path().join("w.sock"), &[]);
        let mut c = connect(&srv.socket, 1, false).unwrap();
        c.write(0, 4096, &pattern(5, 4096, 8192));
        drop(c);
        assert!(srv.terminate().success());
    }
    let mut srv = ServerProc::start(&img, &d.path().join("r.sock"), &["--readonly"]);
    // The device says RO: a read-write client is refused at start.
    let e = connect(&srv.socket, 1, false)
        .err()
        .expect("read-write start must fail");
    assert_eq!(e.errno().raw_os_error(), libc::EROFS, "{}", e.message());
    // A read-only client reads, and writes fail.
    let mut c = connect(&srv.socket, 1, true).unwrap();
    assert_eq!(c.read(0, 4096, 8192), pattern(5, 4096, 8192));
    c.buf(0, 512).fill(1);
    assert_ne!(c.run(0, Req::Write, 0, 0, 512), 0);
    assert_eq!(c.read(0, 0, 512), vec![0; 512]);
    drop(c);
    assert!(srv.alive());
}

#[test]
fn reconnect_right_after_client_exit() {
    let d = dir();
    let img = create_image(d.path(), "disk.fvd", "16M");
    let mut srv = ServerProc::start(&img, &d.path().join("s.sock"), &[]);
    for round in 0..4u64 {
        // Connects the instant the previous client is gone.
        let mut c = connect(&srv.socket, 1, false).unwrap();
        if round > 0 {
            let off = (round - 1) * 65536;
            assert_eq!(
                c.read(0, off, 65536),
                pattern(round - 1, off, 65536),
                "round {round}"
            );
        }
        let off = round * 65536;
        c.write(0, off, &pattern(round, off, 65536));
    }
    assert!(srv.alive());
    assert!(srv.terminate().success());
}

#[test]
fn data_persists_across_server_restart() {
    let d = dir();
    let img = create_image(d.path(), "disk.fvd", "16M");
    let sock = d.path().join("s.sock");
    let srv = ServerProc::start(&img, &sock, &["--num-queues", "2"]);
    let mut c = connect(&srv.socket, 2, false).unwrap();
    c.write(0, 1 << 20, &pattern(11, 1 << 20, 256 << 10));
    c.write(1, 5 << 20, &pattern(12, 5 << 20, 4096));
    // No FLUSH from the guest: the SIGTERM path must drain and close the disk.
    drop(c);
    let st = srv.terminate();
    assert!(st.success(), "{st}");
    assert!(!sock.exists(), "socket removed on exit");

    let srv = ServerProc::start(&img, &sock, &[]);
    let mut c = connect(&srv.socket, 1, false).unwrap();
    assert_eq!(
        c.read(0, 1 << 20, 256 << 10),
        pattern(11, 1 << 20, 256 << 10)
    );
    assert_eq!(c.read(0, 5 << 20, 4096), pattern(12, 5 << 20, 4096));
    drop(c);
    assert!(srv.terminate().success());
    // The image was closed cleanly: the checker finds nothing to repair.
    check_passes(&img, "after the restart");
}

#[test]
fn terminate_while_client_connected_and_once() {
    let d = dir();
    let img = create_image(d.path(), "disk.fvd", "16M");
    let srv = ServerProc::start(&img, &d.path().join("s.sock"), &[]);
    let mut c = connect(&srv.socket, 1, false).unwrap();
    c.write(0, 0, &pattern(1, 0, 4096));
    // SIGTERM with the client still attached ends the connection and exits cleanly.
    assert!(srv.terminate().success());
    drop(c);

    let srv = ServerProc::start(&img, &d.path().join("s.sock"), &["--once"]);
    let mut c = connect(&srv.socket, 1, false).unwrap();
    assert_eq!(c.read(0, 0, 4096), pattern(1, 0, 4096));
    drop(c);
    assert!(srv.wait().success(), "--once exits after the first client");
}

#[test]
fn socket_mode_banner_and_a_second_server_refused() {
    use std::os::unix::fs::PermissionsExt;
    let d = dir();
    let img = create_image(d.path(), "disk.fvd", "16M");
    let other = create_image(d.path(), "other.fvd", "16M");
    let sock = d.path().join("s.sock");
    let mut srv = ServerProc::start(&img, &sock, &["--num-queues", "3", "--queue-size", "128"]);
    let mode = std::fs::metadata(&sock).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    let hint = format!("path={}", sock.display());
    assert!(srv.banner.contains(&hint), "{}", srv.banner);
    assert!(srv
        .banner
        .contains("vhost-user-blk-pci,chardev=fvd0,num-queues=3,queue-size=128"));
    assert!(srv.banner.contains(&format!(
        "--disk vhost_user=true,socket={},num_queues=3,queue_size=128",
        sock.display()
    )));
    assert!(srv.banner.contains("share=on") && srv.banner.contains("shared=on"));

    // Another server on the live socket, or on the image in use: one error line, exit non-zero
    // (without waiting for the lock: a server that keeps it is not about to let it go).
    for (image, socket) in [(&other, sock.clone()), (&img, d.path().join("t.sock"))] {
        let o = serve_support::fvd()
            .arg("serve")
            .arg(image)
            .arg("--socket")
            .arg(&socket)
            .args(["--lock-wait", "0"])
            .output()
            .unwrap();
        assert!(!o.status.success());
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(err.trim_end().lines().count(), 1, "{err}");
        assert!(err.contains("in use"), "{err}");
    }
    assert!(srv.alive());
    let mut c = connect_with(&sock, 3, false, 128).unwrap();
    c.write(2, 0, &pattern(2, 0, 512));
    assert_eq!(c.read(0, 0, 512), pattern(2, 0, 512));
    drop(c);

    let g = d.path().join("g.sock");
    let srv2 = ServerProc::start(&other, &g, &["--socket-mode", "0660"]);
    assert_eq!(
        std::fs::metadata(&g).unwrap().permissions().mode() & 0o777,
        0o660
    );
    assert!(srv2.terminate().success());
    assert!(srv.terminate().success());
}

#[test]
fn restart_after_sigkill_replaces_the_stale_socket() {
    let d = dir();
    let img = create_image(d.path(), "disk.fvd", "16M");
    let sock = d.path().join("s.sock");
    let srv = ServerProc::start(&img, &sock, &[]);
    let mut c = connect(&sock, 1, false).unwrap();
    c.write(0, 3 << 20, &pattern(8, 3 << 20, 65536));
    assert_eq!(c.run(0, Req::Flush, 0, 0, 0), 0);
    // SAFETY: kill with a pid we spawned and have not reaped.
    unsafe { libc::kill(srv.pid(), libc::SIGKILL) };
    assert!(!srv.wait().success());
    drop(c);
    assert!(sock.exists(), "a killed server leaves its socket behind");

    let srv = ServerProc::start(&img, &sock, &[]);
    let mut c = connect(&sock, 1, false).unwrap();
    assert_eq!(
        c.read(0, 3 << 20, 65536),
        pattern(8, 3 << 20, 65536),
        "flushed data survives SIGKILL"
    );
    drop(c);
    assert!(srv.terminate().success());
}

/// A crash of the server process (SIGKILL) while the host stays up loses no completed request,
/// FLUSH or not: writes (first writes into new blocks and chunks, partial blocks, rewrites),
/// WRITE ZEROES and DISCARD all read back after a restart. Compact and flat images, with and
/// without a raw base image.
#[test]
fn completed_requests_survive_sigkill_without_flush() {
    let mb = 1u64 << 20;
    for (layout, with_base) in [
        ("--compact", false),
        ("--no-compact", false),
        ("--compact", true),
        ("--no-compact", true),
    ] {
        let what = format!("{layout}, base {with_base}");
        let d = dir();
        let img = d.path().join("disk.fvd");
        let mut create = serve_support::fvd();
        create.arg("create").arg(&img).args(["-s", "32M", layout]);
        let base = pattern(500, 0, 32 * mb as usize);
        if with_base {
            std::fs::write(d.path().join("base.raw"), &base).unwrap();
            create.args(["-b", "base.raw", "-F", "raw"]);
        }
        let o = create.output().unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let before = |off: u64, len: usize| {
            if with_base {
                base[off as usize..off as usize + len].to_vec()
            } else {
                vec![0u8; len]
            }
        };
        let sock = d.path().join("s.sock");
        let srv = ServerProc::start(&img, &sock, &["--num-queues", "2"]);
        let mut c = connect(&sock, 2, false).unwrap();
        // What the disk must read afterwards: (offset, bytes).
        let mut expect: Vec<(u64, Vec<u8>)> = Vec::new();
        // One FLUSH early on, so later records land on a journal that already holds some.
        c.write(0, 0, &pattern(1, 0, 4096));
        assert_eq!(c.run(0, Req::Flush, 0, 0, 0), 0);
        expect.push((0, pattern(1, 0, 4096)));
        // First writes: whole blocks, a partial block, across a chunk boundary, on both queues.
        for (i, (off, len)) in [
            (mb, 64 << 10),
            (3 * mb + 4096, 4096),
            (6 * mb - 8192, 16384),
            (9 * mb + 512, 3584),
            (20 * mb, mb as usize),
        ]
        .into_iter()
        .enumerate()
        {
            let data = pattern(10 + i as u64, off, len);
            c.write(i % 2, off, &data);
            expect.push((off, data));
        }
        // Many first writes in flight at once (group commit of their records).
        let n = 32;
        for i in 0..n {
            let off = 12 * mb + i as u64 * 65536;
            let data = pattern(100 + i as u64, off, 4096);
            c.buf(i * 8192, 4096).copy_from_slice(&data);
            c.enqueue(0, &Req::Write, off, i * 8192, 4096, i);
            expect.push((off, data));
        }
        assert!(c.wait(0, n).iter().all(|&(_, r)| r == 0), "{what}");
        // A rewrite of a block that is present.
        let data = pattern(7, mb + 4096, 8192);
        c.write(1, mb + 4096, &data);
        expect[1].1[4096..4096 + 8192].copy_from_slice(&data);
        // WRITE ZEROES over the 1 MiB write (whole blocks dropped, edges written) and DISCARD
        // of whole blocks, which then read as the base (or zeros).
        let z = 20 * mb + 4096;
        assert_eq!(
            c.run(0, Req::WriteZeroes(ReqFlags::empty()), z, 0, 512 << 10),
            0
        );
        let last = expect.len() - 1 - n;
        expect[last].1[4096..4096 + (512 << 10)].fill(0);
        let (doff, dlen) = (12 * mb, 4 * 65536);
        assert_eq!(c.run(1, Req::Discard, doff, 0, dlen), 0);
        expect.retain(|(off, _)| !(doff..doff + dlen as u64).contains(off));
        expect.push((doff, before(doff, dlen)));

        // SAFETY: kill with a pid we spawned and have not reaped.
        unsafe { libc::kill(srv.pid(), libc::SIGKILL) };
        assert!(!srv.wait().success());
        drop(c);
        // The checker reads the intents (same boot) as journal records to replay, not damage.
        let out = check_passes(&img, &what);
        assert!(out.contains("will be replayed"), "{what}: {out}");

        let srv = ServerProc::start(&img, &sock, &[]);
        let mut c = connect(&sock, 1, false).unwrap();
        for (off, data) in &expect {
            assert!(
                c.read(0, *off, data.len()) == *data,
                "{what}: {} bytes at {off} differ after SIGKILL",
                data.len()
            );
        }
        // Never written: as before.
        assert_eq!(c.read(0, 30 * mb, 4096), before(30 * mb, 4096), "{what}");
        drop(c);
        assert!(srv.terminate().success());
        check_passes(&img, &what);
    }
}
