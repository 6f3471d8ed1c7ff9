//! Base images on NBD exports served by a real `qemu-nbd`, over a unix socket and loopback TCP:
//! reads come from the export, writes stay in the image, many reads run at once, and a server
//! that dies makes reads fail instead of hang. A stalled server (SIGSTOP) and a restarted one,
//! through a real `fvd serve` and libblkio: reads time out, reconnect, and SIGTERM still ends
//! the server promptly.

mod serve_support;

use fvd::engine::{self, CreateParams, Disk, Image};
use fvd::format::{BaseFormat, BaseRef};
use fvd::io::executor::{block_on, Executor};
use fvd::io::host_file::OpenMode;
use fvd::io::nbd::{NbdClient, NbdOptions};
use fvd::io::sync::SyncIo;
use fvd::io::{Buf, HostFile};
use fvd::units::VirtOffset;
use serve_support::client::{connect, Req};
use serve_support::{fvd_in as fvd, ServerProc};
use std::fs::File;
use std::io::ErrorKind;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

/// A `qemu-nbd` serving one raw file read-only; killed and reaped when dropped.
struct QemuNbd {
    child: Child,
    uri: String,
}

impl QemuNbd {
    /// Starts the server and waits until it listens (it writes its pid file after that).
    /// `None` if it exited during startup (e.g. the TCP port was taken meanwhile).
    fn start(
        dir: &Path,
        image: &[String],
        export: &str,
        listen: &[String],
        uri: String,
    ) -> Option<Self> {
        static N: AtomicUsize = AtomicUsize::new(0);
        let n = N.fetch_add(1, Ordering::Relaxed);
        let pid_file = dir.join(format!("qemu-nbd-{n}.pid"));
        let log = dir.join(format!("qemu-nbd-{n}.log"));
        let mut child = Command::new("qemu-nbd")
            .args(["--read-only", "--persistent", "--shared=0"])
            .arg(format!("--export-name={export}"))
            .arg(format!("--pid-file={}", pid_file.display()))
            .args(listen)
            .args(image)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(File::create(&log).unwrap())
            .spawn()
            .expect("qemu-nbd (qemu-utils) must be installed: run integration/setup-host.sh");
        let t0 = Instant::now();
        loop {
            if std::fs::metadata(&pid_file).is_ok_and(|m| m.len() > 0) {
                return Some(QemuNbd { child, uri });
            }
            if child.try_wait().unwrap().is_some() {
                eprintln!("qemu-nbd: {}", std::fs::read_to_string(&log).unwrap());
                return None;
            }
            // A guard against a wedged server, not a speed requirement.
            assert!(
                t0.elapsed() < Duration::from_secs(60),
                "qemu-nbd never started"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    fn unix(dir: &Path, file: &Path, export: &str) -> Self {
        Self::unix_image(dir, &raw_image(file), export)
    }

    fn unix_image(dir: &Path, image: &[String], export: &str) -> Self {
        let sock = dir.join(format!("{export}.sock"));
        let uri = format!("nbd+unix:///{export}?socket={}", sock.display());
        let listen = [format!("--socket={}", sock.display())];
        Self::start(dir, image, export, &listen, uri).expect("qemu-nbd failed to start")
    }

    fn tcp(dir: &Path, file: &Path, export: &str) -> Self {
        for _ in 0..10 {
            let port = std::net::TcpListener::bind("127.0.0.1:0")
                .unwrap()
                .local_addr()
                .unwrap()
                .port();
            let listen = ["--bind=127.0.0.1".into(), format!("--port={port}")];
            let uri = format!("nbd://127.0.0.1:{port}/{export}");
            if let Some(s) = Self::start(dir, &raw_image(file), export, &listen, uri) {
                return s;
            }
        }
        panic!("qemu-nbd failed to start on TCP");
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }
}

fn raw_image(file: &Path) -> Vec<String> {
    vec!["--format=raw".into(), file.display().to_string()]
}

impl Drop for QemuNbd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs `f` on its own thread; a hang fails the test instead of blocking the suite.
fn guarded<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    within(Duration::from_secs(300), f)
}

/// Runs `f` on its own thread and fails the test if it takes longer than `limit`.
fn within<T: Send + 'static>(limit: Duration, f: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)));
    });
    match rx.recv_timeout(limit) {
        Ok(Ok(v)) => v,
        Ok(Err(panic)) => std::panic::resume_unwind(panic),
        Err(_) => panic!("hung (guard timeout of {limit:?})"),
    }
}

fn tmpdir() -> tempfile::TempDir {
    // O_DIRECT needs a real filesystem; /var/tmp is on disk.
    tempfile::tempdir_in("/var/tmp").unwrap()
}

/// Every 8-byte word holds its own offset (scrambled), so any misplaced byte range shows.
fn base_file(dir: &Path, len: usize) -> (PathBuf, Vec<u8>) {
    let data: Vec<u8> = (0..len)
        .map(|i| ((i as u64 / 8).wrapping_mul(0x9e37_79b9) >> (i % 8 * 3)) as u8 ^ i as u8)
        .collect();
    let p = dir.join("base.raw");
    std::fs::write(&p, &data).unwrap();
    (p, data)
}

fn fvd_ok(dir: &Path, args: &[&str]) -> String {
    let o = fvd(dir, args);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "fvd {args:?}: {err}");
    String::from_utf8(o.stdout).unwrap()
}

/// Fails with one line on stderr, which is returned.
fn fvd_fails(dir: &Path, args: &[&str]) -> String {
    let o = fvd(dir, args);
    assert!(!o.status.success(), "fvd {args:?} should fail");
    let err = String::from_utf8(o.stderr).unwrap();
    assert_eq!(err.trim_end().lines().count(), 1, "{err}");
    err
}

fn open(path: &Path, read_only: bool) -> Disk<SyncIo> {
    block_on(engine::open_disk(&SyncIo, path, read_only)).unwrap_or_else(|e| panic!("{e}"))
}

fn disk_read(d: &Disk<SyncIo>, off: u64, len: usize) -> engine::Result<Vec<u8>> {
    let b = Buf::alloc(len);
    block_on(d.read(&SyncIo, VirtOffset(off), b.clone()))?;
    Ok(b.to_vec())
}

fn nbd_read(c: &NbdClient, off: u64, len: usize) -> std::io::Result<Vec<u8>> {
    let b = Buf::alloc(len);
    block_on(c.read(off, b.clone()))?;
    Ok(b.to_vec())
}

#[test]
fn unix_socket_base_serves_reads_and_keeps_writes_in_the_image() {
    let dir = tmpdir();
    let p = dir.path();
    let base_len = (4 << 20) + 3584;
    let (base_path, base) = base_file(p, base_len);
    let srv = QemuNbd::unix(p, &base_path, "base");
    let uri = srv.uri.clone();
    let img = p.join("img.fvd");
    let out = fvd_ok(p, &["create", "img.fvd", "-b", &uri, "-s", "5M"]);
    assert!(out.contains("base_fmt=raw"), "{out}");
    let info: serde_json::Value =
        serde_json::from_str(&fvd_ok(p, &["info", "img.fvd", "--output", "json"])).unwrap();
    assert_eq!(info["fvd"]["base"]["format"], "raw");
    assert_eq!(info["fvd"]["base"]["filename"], uri.as_str());
    assert_eq!(info["fvd"]["base"]["size"], base_len);

    let model = guarded(move || {
        let size = 5 << 20;
        let mut model = base.clone();
        model.resize(size, 0); // past the export's end: zeros
        let d = open(&img, false);
        assert_eq!(disk_read(&d, 0, size).unwrap(), model);
        assert!(d.counters().snapshot().base_reads > 0);
        // Sub-block, block-crossing, and straddling the end of the export.
        for (i, (off, len)) in [
            (512usize, 512usize),
            (60 << 10, 8 << 10),
            (base_len - 1024, 3072),
            ((4 << 20) + 65536, 4096),
        ]
        .into_iter()
        .enumerate()
        {
            let data: Vec<u8> = (0..len).map(|j| (j * 7 + i * 13 + 1) as u8).collect();
            let b = Buf::alloc(len);
            b.copy_from_slice(0, &data);
            block_on(d.write(&SyncIo, VirtOffset(off as u64), b)).unwrap();
            model[off..off + len].copy_from_slice(&data);
        }
        assert_eq!(disk_read(&d, 0, size).unwrap(), model);
        block_on(d.close(&SyncIo)).unwrap();
        drop(d);
        for read_only in [true, false] {
            let d = open(&img, read_only);
            assert_eq!(disk_read(&d, 0, size).unwrap(), model, "ro={read_only}");
            block_on(d.close(&SyncIo)).unwrap();
        }
        model
    });
    // The export was only read.
    assert_eq!(std::fs::read(&base_path).unwrap().len(), base_len);
    assert_ne!(model[..base_len], std::fs::read(&base_path).unwrap()[..]);
    drop(srv);
}

#[test]
fn tcp_base_with_concurrent_reads_from_tasks_and_threads() {
    let dir = tmpdir();
    let p = dir.path();
    // Larger than the 32 MiB request limit, so one read is split.
    let len = 40 << 20;
    let (base_path, base) = base_file(p, len);
    let srv = QemuNbd::tcp(p, &base_path, "");
    let uri = srv.uri.clone();
    assert!(uri.ends_with('/'), "{uri}");
    fvd_ok(p, &["create", "img.fvd", "-b", &uri]);
    let img = p.join("img.fvd");
    let base = Arc::new(base);
    guarded(move || {
        let c = Arc::new(NbdClient::connect(&uri).unwrap());
        assert_eq!(c.size(), len as u64);

        // Many reads in flight on one executor, driven like an I/O worker: park until woken.
        let me = std::thread::current();
        let mut ex = Executor::new(Some(Box::new(move || me.unpark())));
        let done = Arc::new(AtomicUsize::new(0));
        let bad = Arc::new(Mutex::new(Vec::new()));
        for i in 0..200u64 {
            let (c, base, done, bad) = (c.clone(), base.clone(), done.clone(), bad.clone());
            let off = (i * 7_919_993 + i * i * 31) % (len as u64 - (1 << 20));
            let n = 1 + ((i * 104_729) % (1 << 20)) as usize;
            ex.spawn(async move {
                let b = Buf::alloc(n);
                let r = c.read(off, b.clone()).await;
                let want = &base[off as usize..off as usize + n];
                if r.is_err() || b.to_vec() != want {
                    bad.lock()
                        .unwrap()
                        .push((off, n, r.err().map(|e| e.to_string())));
                }
                done.fetch_add(1, Ordering::Relaxed);
            });
        }
        while ex.live_tasks() > 0 {
            if ex.run_ready() == 0 {
                std::thread::park();
            }
        }
        assert_eq!(done.load(Ordering::Relaxed), 200);
        assert_eq!(*bad.lock().unwrap(), vec![]);

        // Several threads sharing the connection.
        let threads: Vec<_> = (0..4u64)
            .map(|t| {
                let (c, base) = (c.clone(), base.clone());
                std::thread::spawn(move || {
                    for i in 0..50u64 {
                        let off = ((t * 50 + i) * 1_000_003) % (len as u64 - 70_000);
                        let n = 512 + ((i * 977) % 65536) as usize;
                        let got = nbd_read(&c, off, n).unwrap();
                        assert!(got == base[off as usize..off as usize + n], "{off}+{n}");
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }

        // One read split into several requests, and the edges.
        let off = (1 << 20) + 3;
        let n = 36 << 20;
        assert!(nbd_read(&c, off, n).unwrap() == base[off as usize..off as usize + n]);
        assert_eq!(nbd_read(&c, len as u64, 0).unwrap(), Vec::<u8>::new());
        let e = nbd_read(&c, len as u64 - 512, 1024).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::InvalidInput, "{e}");
        assert!(
            nbd_read(&c, 0, 4096).is_ok(),
            "still usable after a refused read"
        );

        // The same export as the base of an image, through the engine.
        let d = open(&img, true);
        assert_eq!(d.virtual_size(), len as u64);
        for (off, n) in [(0usize, 4096usize), (12_345 * 512, 300_000 / 512 * 512)] {
            assert!(disk_read(&d, off as u64, n).unwrap() == base[off..off + n]);
        }
        assert!(disk_read(&d, len as u64 - 8192, 8192).unwrap() == base[len - 8192..]);
    });
    drop(srv);
}

#[test]
fn stream_copies_the_export_and_drop_base_detaches_it() {
    let dir = tmpdir();
    let p = dir.path();
    let len = 3 << 20;
    let (base_path, base) = base_file(p, len);
    let srv = QemuNbd::tcp(p, &base_path, "shared");
    fvd_ok(p, &["create", "img.fvd", "-b", &srv.uri]);
    let img = p.join("img.fvd");
    let pp = p.to_path_buf();
    guarded(move || fvd_ok(&pp, &["stream", "img.fvd", "-q", "--drop-base"]));
    // The image no longer needs the server.
    drop(srv);
    let info: serde_json::Value =
        serde_json::from_str(&fvd_ok(p, &["info", "img.fvd", "--output", "json"])).unwrap();
    assert!(info["fvd"]["base"].is_null(), "{info}");
    let got = guarded(move || disk_read(&open(&img, true), 0, len).unwrap());
    assert!(got == base);
}

#[test]
fn bad_uris_and_unreachable_exports_fail_clearly() {
    let dir = tmpdir();
    let p = dir.path();
    let (base_path, _) = base_file(p, 1 << 20);
    let srv = QemuNbd::unix(p, &base_path, "base");
    let sock = p.join("base.sock").display().to_string();
    let uri = srv.uri.clone();
    let gone = p.join("gone.sock").display().to_string();
    let closed_port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let dirp = p.to_path_buf();
    guarded(move || {
        let p = dirp.as_path();
        for bad in [
            "nbd+unix:///base",
            "nbd://:10809/x",
            "nbds://h/x",
            "nbd:h:1",
        ] {
            let e = NbdClient::connect(bad).unwrap_err();
            assert_eq!(e.kind(), ErrorKind::InvalidInput, "{bad}: {e}");
            assert!(e.to_string().contains("bad NBD URI"), "{e}");
        }
        let e = NbdClient::connect(&format!("nbd+unix:///base?socket={gone}")).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::NotFound, "{e}");
        assert!(e.to_string().contains("gone.sock"), "{e}");
        let e = NbdClient::connect(&format!("nbd://127.0.0.1:{closed_port}/")).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::ConnectionRefused, "{e}");
        let e = NbdClient::connect(&format!("nbd+unix:///nope?socket={sock}")).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::NotFound, "{e}");
        assert!(e.to_string().contains("'nope'"), "{e}");
        // The server survives a refused client.
        assert!(NbdClient::connect(&uri).is_ok());

        // `fvd create` refuses before creating anything.
        let e = fvd_fails(p, &["create", "a.fvd", "-b", "nbd+unix:///base"]);
        assert!(e.contains("needs ?socket=PATH"), "{e}");
        let e = fvd_fails(p, &["create", "a.fvd", "-b", &uri, "-F", "fvd"]);
        assert!(e.contains("FVD images over NBD are not supported"), "{e}");
        let no_export = format!("nbd+unix:///nope?socket={sock}");
        let e = fvd_fails(p, &["create", "a.fvd", "-b", &no_export]);
        assert!(e.contains("no such export 'nope'"), "{e}");
        assert!(!p.join("a.fvd").exists());
        fvd_ok(p, &["create", "a.fvd", "-b", &uri, "-F", "raw"]);

        // A header naming an FVD image over NBD is refused at open.
        let f = HostFile::open(&p.join("b.fvd"), OpenMode::Create).unwrap();
        let params = CreateParams {
            virtual_size: 1 << 20,
            base: Some(BaseRef {
                path: uri.clone(),
                format: BaseFormat::Fvd,
                size: 1 << 20,
            }),
            ..Default::default()
        };
        block_on(Image::create(&SyncIo, f, &params)).unwrap();
        let e = block_on(engine::open_disk(&SyncIo, &p.join("b.fvd"), true)).err();
        let e = e.expect("open should fail").to_string();
        assert!(e.contains("only raw images can be used over NBD"), "{e}");
    });
    // With the server gone, opening the image fails (and says why) instead of hanging.
    drop(srv);
    let img = p.join("a.fvd");
    let e = guarded(move || block_on(engine::open_disk(&SyncIo, &img, true)).err());
    let e = e.expect("open should fail").to_string();
    assert!(e.contains("connect to NBD base"), "{e}");
}

#[test]
fn unaligned_reads_from_a_server_with_a_minimum_block_size() {
    let dir = tmpdir();
    let p = dir.path();
    let (base_path, base) = base_file(p, 1 << 20);
    // blkdebug's request alignment is what qemu-nbd advertises as the minimum block size.
    let image = [
        "--image-opts".to_string(),
        format!(
            "driver=blkdebug,align=4096,image.driver=file,image.filename={}",
            base_path.display()
        ),
    ];
    let srv = QemuNbd::unix_image(p, &image, "aligned");
    let uri = srv.uri.clone();
    guarded(move || {
        let c = NbdClient::connect(&uri).unwrap();
        assert_eq!(c.export().min_block, 4096, "{:?}", c.export());
        for (off, n) in [
            (1usize, 1usize),
            (4095, 2),
            (1000, 9000),
            ((1 << 20) - 3, 3),
        ] {
            assert!(
                nbd_read(&c, off as u64, n).unwrap() == base[off..off + n],
                "{off}+{n}"
            );
        }
    });
    drop(srv);
}

/// Waits until `pid` (our child, not yet reaped) has exited.
fn wait_exited(pid: u32) {
    loop {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        // The state follows the parenthesised command name.
        match stat.rsplit_once(") ").and_then(|(_, s)| s.chars().next()) {
            None | Some('Z') | Some('X') => return,
            _ => std::thread::sleep(Duration::from_millis(10)),
        }
    }
}

#[test]
fn killed_server_fails_pending_and_later_reads() {
    let dir = tmpdir();
    let p = dir.path();
    let len = 8 << 20;
    let (base_path, base) = base_file(p, len);
    let srv = QemuNbd::unix(p, &base_path, "base");
    fvd_ok(p, &["create", "img.fvd", "-b", &srv.uri]);
    let (uri, pid, img) = (srv.uri.clone(), srv.pid(), p.join("img.fvd"));
    let base = Arc::new(base);
    guarded(move || {
        let c = Arc::new(NbdClient::connect(&uri).unwrap());
        let d = open(&img, false);
        let reads = Arc::new(AtomicUsize::new(0));
        // Readers that keep reading until the connection fails.
        let threads: Vec<_> = (0..4u64)
            .map(|t| {
                let (c, base, reads) = (c.clone(), base.clone(), reads.clone());
                std::thread::spawn(move || {
                    let mut i = t;
                    loop {
                        let off = (i * 65536 * 7) % (len as u64 - 65536);
                        match nbd_read(&c, off, 65536) {
                            Ok(got) => {
                                assert!(got == base[off as usize..off as usize + 65536]);
                                reads.fetch_add(1, Ordering::Relaxed);
                            }
                            Err(e) => return e,
                        }
                        i += 4;
                    }
                })
            })
            .collect();
        while reads.load(Ordering::Relaxed) < 100 {
            std::thread::yield_now();
        }
        assert_eq!(sigkill(pid), 0);
        wait_exited(pid);
        for t in threads {
            let e = t.join().unwrap();
            assert!(
                matches!(e.kind(), ErrorKind::ConnectionReset) || e.raw_os_error().is_some(),
                "{e}"
            );
        }
        let e = nbd_read(&c, 0, 4096).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::ConnectionReset, "{e}");
        assert!(e.to_string().contains("lost"), "{e}");
        // The engine's own connection died too: base reads fail with an errno, repeatedly.
        for _ in 0..2 {
            let e = disk_read(&d, 65536, 4096).unwrap_err();
            assert!([libc::EIO, libc::ECONNRESET].contains(&e.errno()), "{e}");
        }
        // A write that must merge base data fails; a whole-block write does not need the base.
        let b = Buf::alloc(512);
        assert!(block_on(d.write(&SyncIo, VirtOffset(1 << 20), b)).is_err());
        let b = Buf::alloc(64 << 10);
        b.copy_from_slice(0, &[9u8; 64 << 10]);
        block_on(d.write(&SyncIo, VirtOffset(2 << 20), b)).unwrap();
        assert_eq!(disk_read(&d, 2 << 20, 512).unwrap(), vec![9u8; 512]);
        drop(d);
        drop(c);
    });
    drop(srv);
}

/// Sends `sig` to a child process we started and have not reaped.
fn signal(pid: u32, sig: i32) {
    // SAFETY: kill(2) with plain integer arguments, on our unreaped child (no pid reuse).
    assert_eq!(unsafe { libc::kill(pid as i32, sig) }, 0);
}

/// A 4 MiB base exported by qemu-nbd on a unix socket, and `img.fvd` (8 MiB) on top of it.
fn image_on_nbd(p: &Path) -> (QemuNbd, PathBuf, Vec<u8>) {
    let (base_path, base) = base_file(p, 4 << 20);
    let srv = QemuNbd::unix(p, &base_path, "base");
    fvd_ok(p, &["create", "img.fvd", "-b", &srv.uri, "-s", "8M"]);
    (srv, base_path, base)
}

fn serve(img: &Path, sock: &Path, args: &[&str]) -> ServerProc {
    let mut all = vec!["--num-queues", "1", "--no-prefetch"];
    all.extend_from_slice(args);
    ServerProc::start(img, sock, &all)
}

fn assert_clean(p: &Path) {
    let o = fvd(p, &["check", "img.fvd"]);
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(
        o.status.success(),
        "{out}{}",
        String::from_utf8_lossy(&o.stderr)
    );
}

const K64: usize = 64 << 10;

#[test]
fn stalled_server_fails_reads_within_the_timeout_and_blocks_nothing_else() {
    let dir = tmpdir();
    let p = dir.path();
    let (srv, _, base) = image_on_nbd(p);
    let nbd = srv.pid();
    let mut fvd_srv = serve(
        &p.join("img.fvd"),
        &p.join("v.sock"),
        &["--base-timeout", "2"],
    );
    let sock = fvd_srv.socket.clone();
    within(Duration::from_secs(150), move || {
        let mut c = connect(&sock, 1, false).unwrap();
        c.write(0, 6 << 20, &[0x5a; K64]);
        assert!(c.read(0, 0, K64) == base[..K64]);
        signal(nbd, libc::SIGSTOP);
        // A base read waits for the stalled server; a read of the image's own data does not.
        let t0 = Instant::now();
        c.enqueue(0, &Req::Read, 1 << 20, 0, K64, 1);
        c.enqueue(0, &Req::Read, 6 << 20, 1 << 20, K64, 2);
        assert_eq!(c.wait(0, 1), vec![(2, 0)]);
        assert!(c.buf(1 << 20, K64).iter().all(|&b| b == 0x5a));
        // The base read fails with an I/O error once the timeout has passed, not before.
        assert_eq!(c.wait(0, 1), vec![(1, -libc::EIO)]);
        let waited = t0.elapsed();
        assert!(waited >= Duration::from_millis(1900), "{waited:?}");
        assert!(waited < Duration::from_secs(20), "{waited:?}");

        // The server resumes: base reads succeed again, over a new connection.
        signal(nbd, libc::SIGCONT);
        let read_base_until_ok = |c: &mut serve_support::client::Client, off: u64| {
            let t = Instant::now();
            loop {
                match c.run(0, Req::Read, off, 0, K64) {
                    0 => break,
                    r => assert_eq!(r, -libc::EIO),
                }
                assert!(t.elapsed() < Duration::from_secs(60), "never reconnected");
                std::thread::sleep(Duration::from_millis(100));
            }
            assert!(c.buf(0, K64) == &base[off as usize..off as usize + K64]);
        };
        read_base_until_ok(&mut c, 3 << 20);

        // A frontend leaves with a base read in flight on a stalled server: the next one is
        // served all the same (once that read has timed out).
        signal(nbd, libc::SIGSTOP);
        c.enqueue(0, &Req::Read, 2 << 20, 0, K64, 3);
        assert_eq!(c.wait_for(0, 1, Duration::from_millis(300)), vec![]);
        drop(c);
        let mut c = connect(&sock, 1, false).unwrap();
        assert_eq!(c.read(0, 6 << 20, K64), vec![0x5a; K64]);
        signal(nbd, libc::SIGCONT);
        read_base_until_ok(&mut c, 2 << 20);
    });
    assert!(fvd_srv.alive());
    assert!(fvd_srv.terminate().success());
    assert_clean(p);
    drop(srv);
}

#[test]
fn server_restarted_on_the_same_socket_serves_reads_again() {
    let dir = tmpdir();
    let p = dir.path().to_path_buf();
    let (srv, base_path, base) = image_on_nbd(&p);
    let img = p.join("img.fvd");
    let base = Arc::new(base);

    // By default there is no reconnect window: reads fail at once while the server is gone,
    // and succeed again once it is back, without restarting fvd.
    let fvd_srv = serve(&img, &p.join("v.sock"), &[]);
    let sock = fvd_srv.socket.clone();
    let (pp, bp, b) = (p.clone(), base_path.clone(), base.clone());
    let srv = within(Duration::from_secs(150), move || {
        let mut c = connect(&sock, 1, false).unwrap();
        assert!(c.read(0, 0, K64) == b[..K64]);
        assert_eq!(sigkill(srv.pid()), 0);
        wait_exited(srv.pid());
        drop(srv);
        let t0 = Instant::now();
        assert_eq!(c.run(0, Req::Read, 1 << 20, 0, K64), -libc::EIO);
        assert!(t0.elapsed() < Duration::from_secs(10), "{:?}", t0.elapsed());
        let srv = QemuNbd::unix(&pp, &bp, "base");
        let t1 = Instant::now();
        while c.run(0, Req::Read, 1 << 20, 0, K64) != 0 {
            assert!(t1.elapsed() < Duration::from_secs(60), "never reconnected");
            std::thread::sleep(Duration::from_millis(100));
        }
        assert!(c.buf(0, K64) == &b[1 << 20..(1 << 20) + K64]);
        srv
    });
    assert!(fvd_srv.terminate().success());

    // With a reconnect window, a read issued while the server is gone waits for it.
    let fvd_srv = serve(&img, &p.join("v.sock"), &["--base-reconnect-delay", "60"]);
    let sock = fvd_srv.socket.clone();
    let srv = within(Duration::from_secs(150), move || {
        let mut c = connect(&sock, 1, false).unwrap();
        assert!(c.read(0, 0, K64) == base[..K64]);
        assert_eq!(sigkill(srv.pid()), 0);
        wait_exited(srv.pid());
        drop(srv);
        c.buf(0, K64).fill(0xee);
        c.enqueue(0, &Req::Read, 2 << 20, 0, K64, 1);
        assert_eq!(c.wait_for(0, 1, Duration::from_secs(1)), vec![]);
        let srv = QemuNbd::unix(&p, &base_path, "base");
        assert_eq!(c.wait_for(0, 1, Duration::from_secs(60)), vec![(1, 0)]);
        assert!(c.buf(0, K64) == &base[2 << 20..(2 << 20) + K64]);
        srv
    });
    assert!(fvd_srv.terminate().success());
    assert_clean(dir.path());
    drop(srv);
}

#[test]
fn sigterm_with_a_stalled_server_exits_promptly_and_closes_cleanly() {
    let dir = tmpdir();
    let p = dir.path();
    let (srv, _, base) = image_on_nbd(p);
    let nbd = srv.pid();
    // Default options: the 30 s read timeout is not what ends the wait.
    let fvd_srv = serve(&p.join("img.fvd"), &p.join("v.sock"), &[]);
    let mut c = connect(&fvd_srv.socket, 1, false).unwrap();
    c.write(0, 6 << 20, &[0x77; K64]);
    assert!(c.read(0, 0, K64) == base[..K64]);
    signal(nbd, libc::SIGSTOP);
    c.enqueue(0, &Req::Read, 1 << 20, 0, K64, 1);
    assert_eq!(c.wait_for(0, 1, Duration::from_millis(300)), vec![]);
    let t0 = Instant::now();
    signal(fvd_srv.pid() as u32, libc::SIGTERM);
    let st = within(Duration::from_secs(60), move || fvd_srv.wait());
    let took = t0.elapsed();
    assert!(st.success(), "{st}");
    assert!(took < Duration::from_secs(15), "{took:?}");
    drop(c);
    // Checking opens the base too, so let the server go on first.
    signal(nbd, libc::SIGCONT);
    assert_clean(p);
    let img = p.join("img.fvd");
    let got = guarded(move || disk_read(&open(&img, true), 6 << 20, K64).unwrap());
    assert_eq!(got, vec![0x77; K64], "the write before SIGTERM was kept");
    drop(srv);
}

#[test]
fn client_read_timeout_reconnect_and_shutdown_on_a_stalled_server() {
    let dir = tmpdir();
    let p = dir.path();
    let (base_path, base) = base_file(p, 1 << 20);
    let srv = QemuNbd::unix(p, &base_path, "base");
    let (uri, nbd) = (srv.uri.clone(), srv.pid());
    within(Duration::from_secs(150), move || {
        let opts = NbdOptions {
            timeout: Some(Duration::from_secs(1)),
            reconnect_delay: Duration::ZERO,
        };
        let c = Arc::new(NbdClient::connect_with(&uri, opts).unwrap());
        assert!(nbd_read(&c, 4096, 4096).unwrap() == base[4096..8192]);
        signal(nbd, libc::SIGSTOP);
        let t0 = Instant::now();
        let e = nbd_read(&c, 0, 4096).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::TimedOut, "{e}");
        let waited = t0.elapsed();
        assert!(waited >= Duration::from_millis(900), "{waited:?}");
        assert!(waited < Duration::from_secs(20), "{waited:?}");
        // The connection was dropped as stalled: without a reconnect window, reads fail at once.
        let e = nbd_read(&c, 0, 4096).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::ConnectionReset, "{e}");
        signal(nbd, libc::SIGCONT);
        let t1 = Instant::now();
        while nbd_read(&c, 0, 4096).is_err() {
            assert!(t1.elapsed() < Duration::from_secs(60), "never reconnected");
            std::thread::sleep(Duration::from_millis(50));
        }
        assert!(nbd_read(&c, 8192, 100).unwrap() == base[8192..8292]);
        // Limits past what a clock can hold mean "never", not a crash of the worker.
        c.set_options(NbdOptions {
            timeout: Some(Duration::MAX),
            reconnect_delay: Duration::MAX,
        });
        assert!(nbd_read(&c, 100, 100).unwrap() == base[100..200]);

        // No timeout at all: a shutdown still ends a read the stalled server never answers.
        c.set_options(NbdOptions {
            timeout: None,
            ..opts
        });
        signal(nbd, libc::SIGSTOP);
        let c2 = c.clone();
        let reader = std::thread::spawn(move || nbd_read(&c2, 0, 4096));
        std::thread::sleep(Duration::from_millis(300));
        assert!(!reader.is_finished());
        let t2 = Instant::now();
        c.shutdown(Duration::from_millis(200));
        let e = reader.join().unwrap().unwrap_err();
        assert_eq!(e.kind(), ErrorKind::ConnectionAborted, "{e}");
        assert!(t2.elapsed() < Duration::from_secs(10), "{:?}", t2.elapsed());
        assert!(nbd_read(&c, 0, 4096).is_err());
        // Dropping does not wait on the stalled server either.
        let t3 = Instant::now();
        drop(Arc::into_inner(c).expect("the reader thread has ended"));
        assert!(t3.elapsed() < Duration::from_secs(10), "{:?}", t3.elapsed());
        signal(nbd, libc::SIGCONT);
    });
    drop(srv);
}

#[test]
fn many_small_reads_from_many_threads_never_stall() {
    let dir = tmpdir();
    let p = dir.path();
    let (base_path, base) = base_file(p, 1 << 20);
    let srv = QemuNbd::unix(p, &base_path, "base");
    let uri = srv.uri.clone();
    let base = Arc::new(base);
    // Without a read timeout a lost wake-up of the client's worker would hang a read forever.
    within(Duration::from_secs(60), move || {
        let opts = NbdOptions {
            timeout: None,
            ..Default::default()
        };
        let c = Arc::new(NbdClient::connect_with(&uri, opts).unwrap());
        let threads: Vec<_> = (0..8u64)
            .map(|t| {
                let (c, base) = (c.clone(), base.clone());
                std::thread::spawn(move || {
                    for i in 0..8000u64 {
                        let off = ((t * 8000 + i) * 4099) % ((1 << 20) - 512);
                        let got = nbd_read(&c, off, 512).unwrap();
                        assert!(got == base[off as usize..off as usize + 512], "{off}");
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
    });
    drop(srv);
}

fn sigkill(pid: u32) -> i32 {
    // SAFETY: kill(2) with plain integer arguments, on a child process we started and have not
    // reaped (so the pid cannot have been reused).
    unsafe { libc::kill(pid as i32, libc::SIGKILL) }
}

/// The NBD client's reader thread is started by the io layer inside the image's open; it
/// still enters its own filter (its allow-list and the no-open filter), through the hook the
/// server sets (`io::nbd::on_reader_start`), and none with `--seccomp off`.
#[test]
fn the_nbd_reader_thread_enters_its_seccomp_filter() {
    let dir = tmpdir();
    let p = dir.path();
    let (_nbd, _, _) = image_on_nbd(p);
    let img = p.join("img.fvd");
    for (args, want) in [(&[][..], 2), (&["--seccomp", "off"][..], 0)] {
        let srv = serve(&img, &p.join("s.sock"), args);
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let f = serve_support::thread_filters(srv.pid()).remove("nbd-client");
            if f.as_deref() == Some(&[want][..]) {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "{args:?}: nbd-client filters {f:?}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        assert!(srv.terminate().success(), "{args:?}");
    }
}
