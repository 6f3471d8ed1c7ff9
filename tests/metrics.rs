//! `fvd serve --metrics`: a real server, real I/O through libblkio, real scrapes over a unix
//! socket and loopback TCP; the counters move by exactly the requests issued, and the output
//! passes `promtool check metrics` (the Debian `prometheus` package; under CI=true its absence
//! fails the test).

mod serve_support;

use serve_support::client::{connect, Req};
use serve_support::{create_image, dir, fvd, fvd_create, Loop, ServerProc};
use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

const SIZE: u64 = 64 << 20;

enum Addr<'a> {
    Unix(&'a Path),
    Tcp(String),
}

/// One HTTP exchange; returns (status line, body).
fn http(addr: &Addr, request: &str) -> (String, String) {
    let mut raw = Vec::new();
    match addr {
        Addr::Unix(p) => {
            let mut s = UnixStream::connect(p).unwrap();
            s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
            s.write_all(request.as_bytes()).unwrap();
            s.read_to_end(&mut raw).unwrap();
        }
        Addr::Tcp(a) => {
            let mut s = TcpStream::connect(a).unwrap();
            s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
            s.write_all(request.as_bytes()).unwrap();
            s.read_to_end(&mut raw).unwrap();
        }
    }
    let text = String::from_utf8(raw).unwrap();
    let (head, body) = text.split_once("\r\n\r\n").expect("an HTTP answer");
    let len: usize = head
        .lines()
        .find_map(|l| l.strip_prefix("Content-Length: "))
        .expect("Content-Length")
        .parse()
        .unwrap();
    assert_eq!(body.len(), len, "{head}");
    (head.lines().next().unwrap().to_string(), body.to_string())
}

fn scrape_text(addr: &Addr) -> String {
    let (status, body) = http(addr, "GET /metrics HTTP/1.1\r\nHost: fvd\r\n\r\n");
    assert_eq!(status, "HTTP/1.1 200 OK", "{body}");
    body
}

/// `name{labels}` -> value, every sample of a scrape.
fn scrape(addr: &Addr) -> BTreeMap<String, f64> {
    parse(&scrape_text(addr))
}

fn parse(body: &str) -> BTreeMap<String, f64> {
    body.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .map(|l| {
            let (k, v) = l.rsplit_once(' ').unwrap();
            (k.to_string(), v.parse().unwrap())
        })
        .collect()
}

fn get(m: &BTreeMap<String, f64>, key: &str) -> f64 {
    *m.get(key)
        .unwrap_or_else(|| panic!("no sample {key}; {} samples", m.len()))
}

/// The change of `key` between two scrapes (a series only shown once non-zero, like the
/// rejections by reason, may be missing from the first).
fn delta(a: &BTreeMap<String, f64>, b: &BTreeMap<String, f64>, key: &str) -> f64 {
    get(b, key) - a.get(key).copied().unwrap_or(0.0)
}

/// `promtool check metrics` on a scrape: the names and types follow Prometheus conventions.
fn promtool_check(body: &str) {
    let child = std::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn();
    let mut child = match child {
        Ok(c) => c,
        Err(e) if std::env::var_os("CI").is_some_and(|v| v == "true") => {
            panic!("promtool is needed under CI (apt-get install prometheus): {e}")
        }
        Err(e) => {
            eprintln!("SKIPPED promtool check: {e} (apt-get install prometheus)");
            return;
        }
    };
    child
        .stdin
        .take()
        .unwrap()
        .write_all(body.as_bytes())
        .unwrap();
    let o = child.wait_with_output().unwrap();
    assert!(
        o.status.success(),
        "promtool check metrics: {}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
}

/// Seccomp filter count of the server's thread named `name`.
fn filters_of(pid: i32, name: &str) -> Option<u32> {
    for t in std::fs::read_dir(format!("/proc/{pid}/task")).unwrap() {
        let t = t.unwrap().path();
        let comm = std::fs::read_to_string(t.join("comm")).unwrap_or_default();
        if comm.trim() == name {
            let status = std::fs::read_to_string(t.join("status")).unwrap();
            return status
                .lines()
                .find_map(|l| l.strip_prefix("Seccomp_filters:"))
                .map(|v| v.trim().parse().unwrap());
        }
    }
    None
}

/// Issues a known set of requests on two queues and checks that each counter moved by exactly
/// that much, then checks the output with promtool.
fn counts_exactly(srv: &ServerProc, addr: &Addr) {
    let before = scrape(addr);
    let mut c = connect(&srv.socket, 2, false).unwrap();
    for i in 0..5u64 {
        assert_eq!(c.run(0, Req::Write, i * 65536, 0, 65536), 0);
    }
    for i in 0..3u64 {
        assert_eq!(c.run(1, Req::Read, i * 4096, 0, 4096), 0);
    }
    assert_eq!(c.run(0, Req::Flush, 0, 0, 0), 0);
    assert_eq!(c.run(1, Req::Discard, 1 << 20, 0, 1 << 20), 0);
    assert_eq!(
        c.run(
            1,
            Req::WriteZeroes(blkio::ReqFlags::empty()),
            2 << 20,
            0,
            65536
        ),
        0
    );
    // Past the end of the disk: the server refuses it (IOERR).
    assert_ne!(c.run(0, Req::Read, SIZE, 0, 4096), 0);
    let after = scrape(addr);

    let q = |queue: u32, op: &str| format!("{{queue=\"{queue}\",op=\"{op}\"}}");
    let d = |name: &str, labels: &str| delta(&before, &after, &format!("{name}{labels}"));
    assert_eq!(d("fvd_requests_total", &q(0, "write")), 5.0);
    assert_eq!(d("fvd_request_bytes_total", &q(0, "write")), 5.0 * 65536.0);
    assert_eq!(d("fvd_requests_total", &q(1, "read")), 3.0);
    assert_eq!(d("fvd_request_bytes_total", &q(1, "read")), 3.0 * 4096.0);
    assert_eq!(d("fvd_requests_total", &q(0, "read")), 0.0);
    assert_eq!(d("fvd_requests_total", &q(1, "write")), 0.0);
    assert_eq!(d("fvd_requests_total", &q(0, "flush")), 1.0);
    assert_eq!(d("fvd_requests_total", &q(1, "discard")), 1.0);
    assert_eq!(d("fvd_request_bytes_total", &q(1, "discard")), 1048576.0);
    assert_eq!(d("fvd_requests_total", &q(1, "write_zeroes")), 1.0);
    assert_eq!(d("fvd_request_bytes_total", &q(1, "write_zeroes")), 65536.0);
    assert_eq!(
        d(
            "fvd_request_errors_total",
            "{queue=\"0\",op=\"read\",kind=\"invalid\"}"
        ),
        1.0
    );
    assert_eq!(
        d(
            "fvd_rejected_requests_total",
            "{queue=\"0\",reason=\"past_end\"}"
        ),
        1.0
    );
    assert_eq!(
        d(
            "fvd_request_errors_total",
            "{queue=\"0\",op=\"write\",kind=\"io_error\"}"
        ),
        0.0
    );
    // Every completed request is in its histogram, none past +Inf's count.
    let h = |op: &str, queue: u32, suffix: &str| {
        format!("fvd_request_duration_seconds_{suffix}{{queue=\"{queue}\",op=\"{op}\"")
    };
    assert_eq!(
        delta(&before, &after, &format!("{}}}", h("write", 0, "count"))),
        5.0
    );
    assert_eq!(
        delta(
            &before,
            &after,
            &format!("{},le=\"+Inf\"}}", h("write", 0, "bucket"))
        ),
        5.0
    );
    assert!(delta(&before, &after, &format!("{}}}", h("write", 0, "sum"))) > 0.0);
    assert_eq!(get(&after, "fvd_requests_in_flight{queue=\"0\"}"), 0.0);
    assert_eq!(get(&after, "fvd_requests_in_flight{queue=\"1\"}"), 0.0);
    // The engine's side: the writes reached the image, which allocated for them.
    assert!(delta(&before, &after, "fvd_host_writes_total") >= 5.0);
    assert!(delta(&before, &after, "fvd_host_written_bytes_total") >= 5.0 * 65536.0);
    assert_eq!(get(&after, "fvd_disk_size_bytes"), SIZE as f64);
    drop(c);
    promtool_check(&scrape_text(addr));
}

#[test]
fn unix_socket_endpoint_counts_requests_under_seccomp() {
    let d = dir();
    let image = create_image(d.path(), "m.fvd", "64M");
    let sock = d.path().join("vhost.sock");
    let msock = d.path().join("metrics.sock");
    let m = msock.to_str().unwrap();
    // The default is --seccomp on: a call outside the metrics thread's list kills the server.
    let mut srv = ServerProc::start(&image, &sock, &["--num-queues", "2", "--metrics", m]);
    assert!(
        srv.banner.contains(&format!("fvd: metrics at {m}")),
        "{}",
        srv.banner
    );
    let _guard = srv.kill_after(Duration::from_secs(120));
    let addr = Addr::Unix(&msock);
    let mode =
        std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&msock).unwrap().permissions());
    assert_eq!(mode & 0o777, 0o600);

    // A scraper that sends nothing holds only its own connection.
    let idle = UnixStream::connect(&msock).unwrap();
    let idle_since = std::time::Instant::now();
    counts_exactly(&srv, &addr);
    assert_eq!(filters_of(srv.pid(), "fvd-metrics"), Some(2));

    // Statistics survive a reconnection.
    let before = scrape(&addr);
    let mut c = connect(&sock, 2, false).unwrap();
    assert_eq!(c.run(1, Req::Read, 0, 0, 4096), 0);
    drop(c);
    let after = scrape(&addr);
    assert_eq!(
        delta(
            &before,
            &after,
            "fvd_requests_total{queue=\"1\",op=\"read\"}"
        ),
        1.0
    );
    assert!(get(&after, "fvd_requests_total{queue=\"0\",op=\"write\"}") >= 5.0);

    // Only GET /metrics is served; an endless header is cut off.
    let (st, _) = http(&addr, "GET / HTTP/1.1\r\n\r\n");
    assert!(st.starts_with("HTTP/1.1 404"), "{st}");
    let (st, _) = http(&addr, "DELETE /metrics HTTP/1.1\r\n\r\n");
    assert!(st.starts_with("HTTP/1.1 405"), "{st}");
    // Exactly the server's limit, so that it leaves nothing unread (which would reset the
    // connection under the answer).
    let head = "GET /metrics HTTP/1.1\r\nX: ";
    let long = format!("{head}{}", "a".repeat(8192 - head.len()));
    let (st, _) = http(&addr, &long);
    assert!(st.starts_with("HTTP/1.1 431"), "{st}");
    // OpenMetrics on request.
    let (st, body) = http(
        &addr,
        "GET /metrics HTTP/1.1\r\nAccept: application/openmetrics-text; version=1.0.0\r\n\r\n",
    );
    assert_eq!(st, "HTTP/1.1 200 OK");
    assert!(body.ends_with("# EOF\n"));
    // The idle scraper is cut off once its 10 s are up (the server's CONN_TIMEOUT).
    let mut idle = idle;
    idle.set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let mut buf = [0u8; 16];
    assert_eq!(
        idle.read(&mut buf).unwrap(),
        0,
        "the idle connection was not closed"
    );
    assert!(idle_since.elapsed() >= Duration::from_secs(9));

    assert!(srv.alive(), "the server died (its seccomp filter?)");
    let st = srv.terminate();
    assert!(st.success(), "{st}");
    assert!(!msock.exists(), "the metrics socket was left behind");
}

#[test]
fn loopback_tcp_endpoint_counts_requests() {
    let d = dir();
    let image = create_image(d.path(), "t.fvd", "64M");
    let sock = d.path().join("vhost.sock");
    let srv = ServerProc::start(
        &image,
        &sock,
        &["--num-queues", "2", "--metrics", "127.0.0.1:0"],
    );
    let _guard = srv.kill_after(Duration::from_secs(120));
    let bound = srv
        .banner
        .lines()
        .find_map(|l| l.strip_prefix("fvd: metrics at "))
        .and_then(|l| l.split(' ').next())
        .expect("the banner names the metrics address")
        .to_string();
    assert!(
        bound.starts_with("127.0.0.1:") && !bound.ends_with(":0"),
        "{bound}"
    );
    counts_exactly(&srv, &Addr::Tcp(bound));
    assert!(srv.terminate().success());
}

#[test]
fn non_loopback_addresses_are_refused() {
    for addr in ["0.0.0.0:9100", "10.1.2.3:9100", "[::]:9100"] {
        let o = fvd()
            .args(["serve", "x.fvd", "--socket", "x.sock", "--metrics", addr])
            .output()
            .unwrap();
        assert!(!o.status.success());
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(err.contains("not a loopback address"), "{addr}: {err}");
    }
}

/// Copy-on-read of a base image: the engine's copy counter and what remains in the base move
/// by exactly the blocks the guest read (64 KiB blocks, the default).
#[test]
fn copy_on_read_and_base_remaining_follow_guest_reads() {
    let d = dir();
    let base = d.path().join("base.raw");
    std::fs::write(&base, vec![5u8; 4 << 20]).unwrap();
    let image = d.path().join("o.fvd");
    fvd_create(&image, &["-b", "base.raw", "-F", "raw"]);
    let sock = d.path().join("vhost.sock");
    let msock = d.path().join("metrics.sock");
    let srv = ServerProc::start(
        &image,
        &sock,
        &[
            "--num-queues",
            "1",
            "--copy-on-read",
            "on",
            "--no-prefetch",
            "--metrics",
            msock.to_str().unwrap(),
        ],
    );
    let _guard = srv.kill_after(Duration::from_secs(120));
    let addr = Addr::Unix(&msock);
    let before = scrape(&addr);
    assert_eq!(get(&before, "fvd_base_remaining_bytes"), (4 << 20) as f64);
    assert_eq!(get(&before, "fvd_copy_on_read_bytes_total"), 0.0);
    let mut c = connect(&sock, 1, false).unwrap();
    // Two whole blocks and 4 KiB of a third: three blocks copied after the reads complete.
    assert!(c.read(0, 0, 128 << 10).iter().all(|&b| b == 5));
    assert!(c.read(0, 1 << 20, 4096).iter().all(|&b| b == 5));
    let mut after = scrape(&addr);
    // The copies run after the guest has its data: wait for them, boundedly.
    for _ in 0..200 {
        if get(&after, "fvd_copy_on_read_bytes_total") >= (3 * 65536) as f64 {
            break;
        }
        std::thread::sleep(Duration::from_millis(25));
        after = scrape(&addr);
    }
    assert_eq!(
        get(&after, "fvd_copy_on_read_bytes_total"),
        (3 * 65536) as f64
    );
    assert_eq!(
        get(&after, "fvd_base_remaining_bytes"),
        ((4 << 20) - 3 * 65536) as f64
    );
    assert_eq!(get(&after, "fvd_prefetch_bytes_total"), 0.0);
    drop(c);
    assert!(srv.terminate().success());
}

/// A thin image on a block device: the free space falls by one chunk (1 MiB) per chunk the
/// guest's first writes allocate.
#[test]
fn storage_free_bytes_of_a_thin_image_on_a_block_device() {
    let d = dir();
    let backing = d.path().join("lv.img");
    std::fs::File::create(&backing)
        .unwrap()
        .set_len(64 << 20)
        .unwrap();
    let Some(dev) = Loop::attach(&backing) else {
        return;
    };
    fvd_create(&dev.0, &["--size", "256M"]);
    let sock = d.path().join("vhost.sock");
    let msock = d.path().join("metrics.sock");
    let srv = ServerProc::start(
        &dev.0,
        &sock,
        &["--num-queues", "1", "--metrics", msock.to_str().unwrap()],
    );
    let _guard = srv.kill_after(Duration::from_secs(120));
    let addr = Addr::Unix(&msock);
    let before = scrape(&addr);
    let free = get(&before, "fvd_storage_free_bytes");
    assert!(free > 0.0 && free < (64 << 20) as f64, "{free}");
    let mut c = connect(&sock, 1, false).unwrap();
    c.buf(0, 4096).fill(1);
    assert_eq!(c.run(0, Req::Write, 0, 0, 4096), 0);
    assert_eq!(c.run(0, Req::Write, 100 << 20, 0, 4096), 0);
    let after = scrape(&addr);
    assert_eq!(delta(&before, &after, "fvd_chunks_allocated_total"), 2.0);
    assert_eq!(
        free - get(&after, "fvd_storage_free_bytes"),
        (2 << 20) as f64
    );
    drop(c);
    assert!(srv.terminate().success());
}
