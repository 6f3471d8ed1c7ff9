//! Format probing cannot be turned against the host: a guest of a raw image must not be able to
//! make it an FVD image whose base is a host file (QEMU's rule for probed raw images).

mod serve_support;

use fvd::engine::{self, Disk, EngineError, Format};
use fvd::io::executor::block_on;
use fvd::io::host_file::OpenMode;
use fvd::io::sync::SyncIo;
use fvd::io::{Buf, HostFile};
use fvd::units::VirtOffset;
use serve_support::client::{connect, Req};
use serve_support::{dir, fvd, ServerProc};
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::Duration;

const MAGIC: &[u8; 8] = b"FVDIMAGE";

/// Runs `f` on a thread and fails the test if it takes longer than two minutes.
fn guarded<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)));
    });
    match rx.recv_timeout(Duration::from_secs(120)) {
        Ok(Ok(v)) => v,
        Ok(Err(panic)) => std::panic::resume_unwind(panic),
        Err(_) => panic!("hung (guard timeout)"),
    }
}

fn open(path: &Path, format: Option<Format>) -> Result<Disk<SyncIo>, EngineError> {
    block_on(engine::open_disk_with(
        &SyncIo,
        path,
        OpenMode::ReadWrite,
        format,
    ))
}

fn sector_with(at: usize, bytes: &[u8]) -> Buf {
    let mut v = vec![0u8; 512];
    v[at..at + bytes.len()].copy_from_slice(bytes);
    let b = Buf::alloc(512);
    b.copy_from_slice(0, &v);
    b
}

#[test]
fn probed_raw_refuses_the_magic_in_either_header_slot() {
    let d = dir();
    let p = d.path().join("disk.raw");
    std::fs::write(&p, vec![0u8; 1 << 20]).unwrap();
    let disk = open(&p, None).unwrap();
    let Disk::Raw(raw) = &disk else {
        panic!("a zero file probes as raw")
    };
    assert!(raw.probed());
    for off in [0u64, 4096] {
        let e = block_on(disk.write(&SyncIo, VirtOffset(off), sector_with(0, MAGIC))).unwrap_err();
        assert!(matches!(e, EngineError::ProbedRawMagic), "{e}");
        assert_eq!(e.errno(), libc::EPERM);
        // Also inside a larger write that starts before the slot.
        let big = Buf::alloc(16384);
        big.copy_from_slice(4096, MAGIC);
        assert!(block_on(disk.write(&SyncIo, VirtOffset(0), big)).is_err());
    }
    // Other bytes of those sectors, and the magic anywhere else, are ordinary data.
    block_on(disk.write(&SyncIo, VirtOffset(0), sector_with(8, MAGIC))).unwrap();
    block_on(disk.write(&SyncIo, VirtOffset(512), sector_with(0, MAGIC))).unwrap();
    block_on(disk.write(&SyncIo, VirtOffset(8192), sector_with(0, MAGIC))).unwrap();
    block_on(disk.flush(&SyncIo)).unwrap();
    drop(disk);
    let data = std::fs::read(&p).unwrap();
    assert_eq!(&data[..8], &[0u8; 8]);
    assert_eq!(&data[8..16], MAGIC);
    assert_eq!(&data[4096..4104], &[0u8; 8]);
    assert_eq!(&data[512..520], MAGIC);
    assert_eq!(
        block_on(engine::probe(
            &SyncIo,
            &HostFile::open(&p, OpenMode::ReadOnly).unwrap()
        ))
        .unwrap(),
        Format::Raw
    );

    // Named raw: no restriction (the administrator said what the file is).
    let disk = open(&p, Some(Format::Raw)).unwrap();
    let Disk::Raw(raw) = &disk else { panic!() };
    assert!(!raw.probed());
    block_on(disk.write(&SyncIo, VirtOffset(0), sector_with(0, MAGIC))).unwrap();
    block_on(disk.flush(&SyncIo)).unwrap();
    drop(disk);
    assert_eq!(&std::fs::read(&p).unwrap()[..8], MAGIC);
}

#[test]
fn named_fvd_on_a_raw_file_is_a_clear_error() {
    let d = dir();
    let p = d.path().join("disk.raw");
    std::fs::write(&p, vec![7u8; 1 << 20]).unwrap();
    let e = open(&p, Some(Format::Fvd)).err().unwrap();
    assert!(matches!(e, EngineError::NotFvd), "{e}");
    assert!(e.to_string().contains("not an FVD image"), "{e}");
}

#[test]
fn a_short_file_with_the_magic_is_a_truncated_image_not_a_raw_disk() {
    let d = dir();
    for (len, at) in [(8usize, 0usize), (4096, 0), (8191, 0), (5120, 4096)] {
        let p = d.path().join(format!("short{len}-{at}"));
        let mut v = vec![0u8; len];
        v[at..at + 8].copy_from_slice(MAGIC);
        std::fs::write(&p, &v).unwrap();
        let e = open(&p, None).err().unwrap();
        assert!(matches!(e, EngineError::Truncated { .. }), "{len}: {e}");
        assert!(e.to_string().contains("truncated FVD image"), "{e}");
        // Named raw, it is a raw disk like any other.
        assert!(matches!(open(&p, Some(Format::Raw)), Ok(Disk::Raw(_))));
    }
    // Short files without the magic still probe as raw.
    let p = d.path().join("small.raw");
    std::fs::write(&p, vec![1u8; 4096]).unwrap();
    assert!(matches!(open(&p, None), Ok(Disk::Raw(_))));
}

/// Every 8-byte word names its offset: recognisable anywhere it shows up.
fn secret(len: usize) -> Vec<u8> {
    (0..len / 8)
        .flat_map(|i| format!("S{:07}", i % 10_000_000).into_bytes())
        .collect()
}

fn contains_secret(data: &[u8]) -> bool {
    data.windows(8).any(|w| w.starts_with(b"S00000"))
}

/// An FVD image (metadata only: every block reads from the base) whose base is `base`, as a
/// guest would craft it.
fn evil_image(dir: &Path, base: &Path) -> Vec<u8> {
    let p = dir.join("evil.fvd");
    let o = fvd()
        .arg("create")
        .arg(&p)
        .args(["-s", "1M", "--journal-size", "64K", "-F", "raw", "-b"])
        .arg(base)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let v = std::fs::read(&p).unwrap();
    std::fs::remove_file(&p).unwrap();
    v
}

/// The guest writes `img` at the start of its disk; returns each request's result.
fn guest_writes(socket: &Path, img: &[u8]) -> Vec<i32> {
    let mut c = connect(socket, 1, false).unwrap();
    let step = c.max_seg.min(256 << 10);
    let mut rets = Vec::new();
    for (i, piece) in img.chunks(step).enumerate() {
        let n = piece.len().next_multiple_of(512);
        c.buf(0, n).fill(0);
        c.buf(0, piece.len()).copy_from_slice(piece);
        rets.push(c.run(0, Req::Write, (i * step) as u64, 0, n));
    }
    assert_eq!(c.run(0, Req::Flush, 0, 0, 0), 0);
    rets
}

fn guest_reads_all(socket: &Path) -> Vec<u8> {
    let mut c = connect(socket, 1, false).unwrap();
    let mut all = Vec::new();
    let mut off = 0u64;
    // Until the first read past the end fails.
    loop {
        let n = 256 << 10;
        match c.run(0, Req::Read, off, 0, n) {
            0 => all.extend_from_slice(c.buf(0, n)),
            _ => break,
        }
        off += n as u64;
    }
    all
}

struct Scene {
    _d: tempfile::TempDir,
    disk: PathBuf,
    sock: PathBuf,
    evil: Vec<u8>,
}

fn scene() -> Scene {
    let d = dir();
    let secret_path = d.path().join("secret");
    std::fs::write(&secret_path, secret(1 << 20)).unwrap();
    let evil = evil_image(d.path(), &secret_path);
    assert!(evil.len() < (3 << 20), "{}", evil.len());
    let disk = d.path().join("guest.raw");
    std::fs::write(&disk, vec![0u8; 4 << 20]).unwrap();
    Scene {
        disk,
        sock: d.path().join("s.sock"),
        evil,
        _d: d,
    }
}

#[test]
fn guest_of_a_probed_raw_image_cannot_make_it_read_a_host_file() {
    guarded(|| {
        let s = scene();
        let srv = ServerProc::start(&s.disk, &s.sock, &["--num-queues", "1"]);
        let rets = guest_writes(&s.sock, &s.evil);
        // The piece holding the header slots fails with an I/O error; the rest is plain data.
        assert_ne!(rets[0], 0, "writing the FVD magic to sector 0 must fail");
        assert!(rets[1..].iter().all(|&r| r == 0), "{rets:?}");
        srv.terminate();

        // After a restart the image is still raw, and reads only the guest's own bytes.
        assert_eq!(&std::fs::read(&s.disk).unwrap()[..8], &[0u8; 8]);
        let srv = ServerProc::start(&s.disk, &s.sock, &["--num-queues", "1"]);
        let all = guest_reads_all(&s.sock);
        assert!(!contains_secret(&all), "the guest read the host file");
        assert_eq!(all.len(), 4 << 20);
        srv.terminate();
    })
}

#[test]
fn with_format_raw_the_guest_writes_anything_and_still_reads_no_host_file() {
    guarded(|| {
        let s = scene();
        let srv = ServerProc::start(&s.disk, &s.sock, &["-f", "raw", "--num-queues", "1"]);
        let rets = guest_writes(&s.sock, &s.evil);
        assert!(rets.iter().all(|&r| r == 0), "{rets:?}");
        srv.terminate();
        assert_eq!(&std::fs::read(&s.disk).unwrap()[..8], MAGIC);

        let srv = ServerProc::start(&s.disk, &s.sock, &["--format", "raw", "--num-queues", "1"]);
        let all = guest_reads_all(&s.sock);
        assert!(!contains_secret(&all), "the guest read the host file");
        assert_eq!(all.len(), 4 << 20);
        assert_eq!(&all[..s.evil.len()], &s.evil[..]);
        srv.terminate();

        // Named FVD on a raw file is refused at startup.
        std::fs::write(&s.disk, vec![0u8; 1 << 20]).unwrap();
        let o = fvd()
            .arg("serve")
            .arg(&s.disk)
            .args(["-f", "fvd", "--socket"])
            .arg(&s.sock)
            .output()
            .unwrap();
        assert!(!o.status.success());
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(err.contains("not an FVD image"), "{err}");
    })
}

/// Starts `fvd serve IMAGE ARGS` with its log in a file, waits for the socket, stops it and
/// returns the log.
fn serve_log(image: &Path, args: &[&str]) -> String {
    let d = dir();
    let (sock, log) = (d.path().join("s.sock"), d.path().join("log"));
    let mut child = fvd()
        .arg("serve")
        .arg(image)
        .arg("--socket")
        .arg(&sock)
        .args(args)
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let t0 = std::time::Instant::now();
    while !sock.exists() && child.try_wait().unwrap().is_none() {
        assert!(
            t0.elapsed() < Duration::from_secs(20),
            "fvd serve not ready"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    let _ = child.wait();
    std::fs::read_to_string(&log).unwrap()
}

#[test]
fn serving_a_probed_raw_image_writable_warns() {
    let d = dir();
    let p = d.path().join("disk.raw");
    std::fs::write(&p, vec![0u8; 1 << 20]).unwrap();
    let log = serve_log(&p, &[]);
    assert!(log.contains("WARN") && log.contains("-f raw"), "{log}");
    for args in [&["-f", "raw"][..], &["--readonly"]] {
        let log = serve_log(&p, args);
        assert!(!log.contains("probed"), "{args:?}: {log}");
    }
    let img = serve_support::create_image(d.path(), "img.fvd", "1M");
    let log = serve_log(&img, &[]);
    assert!(!log.contains("probed"), "{log}");
}
