//! A raw base that is smaller than when the image was made, or that shrinks while in use, is an
//! error, never zeros (which copy-on-read would make permanent).

mod serve_support;

use fvd::engine::{self, CreateParams, EngineError, Image};
use fvd::format::header::COMPAT_COPY_ON_READ;
use fvd::format::{BaseFormat, BaseRef};
use fvd::io::executor::block_on;
use fvd::io::host_file::OpenMode;
use fvd::io::sync::SyncIo;
use fvd::io::{Buf, HostFile};
use fvd::units::VirtOffset;
use serve_support::client::{connect, Req};
use serve_support::{dir, fvd, ServerProc};
use std::path::Path;
use std::sync::mpsc;
use std::time::Duration;

const MIB: u64 = 1 << 20;
const BS: u64 = 64 << 10;

/// Base data: a pattern with an all-zero range at [128 KiB, 256 KiB), which must still read
/// as the zeros it is.
fn base_data(len: u64) -> Vec<u8> {
    (0..len)
        .map(|i| {
            if (128 << 10..256 << 10).contains(&i) {
                0
            } else {
                (i % 251) as u8 + 1
            }
        })
        .collect()
}

/// `img.fvd` (1 MiB, copy-on-read) over a 1 MiB raw `base.raw`.
fn setup(d: &Path) -> Vec<u8> {
    let data = base_data(MIB);
    std::fs::write(d.join("base.raw"), &data).unwrap();
    let f = HostFile::open(&d.join("img.fvd"), OpenMode::Create).unwrap();
    let p = CreateParams {
        virtual_size: MIB,
        block_size: BS,
        chunk_size: MIB,
        journal_size: 64 << 10,
        compact: true,
        base: Some(BaseRef {
            path: "base.raw".into(),
            format: BaseFormat::Raw,
            size: MIB,
        }),
        compat: COMPAT_COPY_ON_READ,
        max_size: None,
    };
    block_on(Image::create(&SyncIo, f, &p)).unwrap();
    data
}

fn truncate(path: &Path, len: u64) {
    std::fs::OpenOptions::new()
        .write(true)
        .open(path)
        .unwrap()
        .set_len(len)
        .unwrap();
}

fn read(img: &Image<SyncIo>, off: u64, len: usize) -> Result<Vec<u8>, EngineError> {
    let b = Buf::alloc(len);
    block_on(img.read(&SyncIo, VirtOffset(off), b.clone()))?;
    Ok(b.to_vec())
}

#[test]
fn a_base_smaller_than_recorded_is_refused_at_open() {
    let d = dir();
    setup(d.path());
    truncate(&d.path().join("base.raw"), MIB - 512);
    let e = block_on(engine::open_image(&SyncIo, &d.path().join("img.fvd"), true))
        .err()
        .expect("open must fail");
    assert!(matches!(e, EngineError::BaseTooSmall { .. }), "{e}");
    let msg = e.to_string();
    assert!(msg.contains("base.raw") && msg.contains("smaller"), "{msg}");
    // The tools and the server say so in one line.
    let o = fvd()
        .args(["info", "img.fvd"])
        .current_dir(d.path())
        .output()
        .unwrap();
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("smaller than the 1048576 bytes recorded"),
        "{err}"
    );
    assert_eq!(err.trim_end().lines().count(), 1, "{err}");
    let o = fvd()
        .arg("serve")
        .arg(d.path().join("img.fvd"))
        .arg("--socket")
        .arg(d.path().join("s.sock"))
        .output()
        .unwrap();
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("smaller than"));
    // A base that grew is fine: the image reads its first MiB.
    truncate(&d.path().join("base.raw"), 2 * MIB);
    block_on(engine::open_image(&SyncIo, &d.path().join("img.fvd"), true)).unwrap();
}

#[test]
fn a_base_that_shrinks_while_open_fails_reads_past_its_end() {
    let d = dir();
    let data = setup(d.path());
    let img = block_on(engine::open_image(
        &SyncIo,
        &d.path().join("img.fvd"),
        false,
    ))
    .unwrap();
    assert_eq!(read(&img, 0, 4096).unwrap(), data[..4096]);
    truncate(&d.path().join("base.raw"), 512 << 10);
    // Within what is left: the data, including the range that is really zeros.
    assert_eq!(
        read(&img, 64 << 10, 256 << 10).unwrap(),
        data[64 << 10..320 << 10]
    );
    // Past the new end: EIO, not zeros.
    for (off, len) in [
        (512 << 10, 4096),
        (MIB - 4096, 4096),
        (448 << 10, 128 << 10),
    ] {
        let e = read(&img, off, len).unwrap_err();
        assert!(matches!(e, EngineError::BaseShrank { .. }), "{off}: {e}");
        assert_eq!(e.errno(), libc::EIO);
    }
    // Copy-on-read and prefetch do not copy zeros into the image either.
    block_on(img.run_deferred(&SyncIo));
    let before = img.base_blocks_remaining();
    assert!(block_on(img.fill_block(&SyncIo, 12, None)).is_err());
    assert!(block_on(img.prefetch_step(&SyncIo, 16)).is_err());
    assert!(
        img.base_blocks_remaining() >= before - 8,
        "only blocks before the end were copied"
    );
    let e = read(&img, 12 * BS, 4096).unwrap_err();
    assert!(matches!(e, EngineError::BaseShrank { .. }), "{e}");
    block_on(img.close(&SyncIo)).unwrap();
}

#[test]
fn a_served_image_whose_base_shrinks_gives_the_guest_io_errors() {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let r = std::panic::catch_unwind(|| {
            let d = dir();
            let data = setup(d.path());
            let srv = ServerProc::start(
                &d.path().join("img.fvd"),
                &d.path().join("s.sock"),
                &["--num-queues", "1", "--copy-on-read", "off"],
            );
            let mut c = connect(&srv.socket, 1, false).unwrap();
            truncate(&d.path().join("base.raw"), 512 << 10);
            assert_eq!(c.run(0, Req::Read, 0, 0, 4096), 0);
            assert_eq!(c.buf(0, 4096), &data[..4096]);
            assert_eq!(c.run(0, Req::Read, 768 << 10, 0, 4096), -libc::EIO);
            drop(c);
            srv.terminate();
        });
        let _ = tx.send(r);
    });
    match rx.recv_timeout(Duration::from_secs(120)) {
        Ok(Ok(())) => {}
        Ok(Err(p)) => std::panic::resume_unwind(p),
        Err(_) => panic!("hung (guard timeout)"),
    }
}

/// `fvd serve` with its log (stderr) in `log`; ready once the socket exists.
struct LoggedServer(std::process::Child);

impl LoggedServer {
    fn start(image: &Path, socket: &Path, log: &Path, args: &[&str]) -> LoggedServer {
        let child = fvd()
            .arg("serve")
            .arg(image)
            .arg("--socket")
            .arg(socket)
            .args(args)
            .stdout(std::process::Stdio::null())
            .stderr(std::fs::File::create(log).unwrap())
            .spawn()
            .unwrap();
        let mut s = LoggedServer(child);
        let t0 = std::time::Instant::now();
        while !socket.exists() {
            assert!(s.0.try_wait().unwrap().is_none(), "fvd serve exited");
            assert!(
                t0.elapsed() < Duration::from_secs(20),
                "fvd serve not ready"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        s
    }
}

impl Drop for LoggedServer {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn a_shrunk_base_is_logged_as_an_error_once() {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let r = std::panic::catch_unwind(|| {
            let d = dir();
            setup(d.path());
            let log = d.path().join("serve.log");
            let sock = d.path().join("s.sock");
            let srv = LoggedServer::start(
                &d.path().join("img.fvd"),
                &sock,
                &log,
                &["--num-queues", "1", "--log-level", "error"],
            );
            let mut c = connect(&sock, 1, false).unwrap();
            truncate(&d.path().join("base.raw"), 512 << 10);
            for i in 0..4 {
                assert_eq!(
                    c.run(0, Req::Read, (768 << 10) + i * 4096, 0, 4096),
                    -libc::EIO
                );
            }
            drop(c);
            drop(srv);
            let text = std::fs::read_to_string(&log).unwrap();
            assert_eq!(text.matches("shrank").count(), 1, "{text}");
            assert!(text.contains("ERROR"), "{text}");
        });
        let _ = tx.send(r);
    });
    match rx.recv_timeout(Duration::from_secs(120)) {
        Ok(Ok(())) => {}
        Ok(Err(p)) => std::panic::resume_unwind(p),
        Err(_) => panic!("hung (guard timeout)"),
    }
}
