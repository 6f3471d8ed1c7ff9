//! The QMP control socket of a real `fvd serve --control` (under its default `--seccomp on`):
//! protocol, every command, errors, several clients, hostile clients, events from a real
//! frontend (libblkio), `quit`, `fvd ctl`, and the real `qemu.qmp` Python package
//! (integration/qmp_client.py).

mod serve_support;

use serde_json::{json, Value};
use serve_support::{client, create_image, dir, fvd, Loop, ServerProc};
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

const TIMEOUT: Duration = Duration::from_secs(30);

struct Qmp {
    r: BufReader<UnixStream>,
    w: UnixStream,
    /// Events read while waiting for replies.
    events: Vec<Value>,
    next_id: u64,
}

impl Qmp {
    /// Connects and reads the greeting (not negotiated yet).
    fn raw(path: &Path) -> (Qmp, Value) {
        let s = UnixStream::connect(path).unwrap();
        s.set_read_timeout(Some(TIMEOUT)).unwrap();
        let mut q = Qmp {
            r: BufReader::new(s.try_clone().unwrap()),
            w: s,
            events: Vec::new(),
            next_id: 100,
        };
        let g = q.read().expect("greeting");
        (q, g)
    }

    fn connect(path: &Path) -> Qmp {
        let (mut q, _) = Qmp::raw(path);
        assert_eq!(q.execute("qmp_capabilities", None), json!({"return": {}}));
        q
    }

    fn read(&mut self) -> Option<Value> {
        let mut line = String::new();
        match self.r.read_line(&mut line) {
            Ok(0) | Err(_) => None,
            Ok(_) => {
                assert!(line.ends_with("\r\n"), "line ends: {line:?}");
                Some(serde_json::from_str(&line).unwrap())
            }
        }
    }

    fn send(&mut self, raw: &[u8]) {
        self.w.write_all(raw).unwrap();
    }

    /// Sends a command with a fresh id; returns the reply (id removed), keeping events aside.
    fn execute(&mut self, cmd: &str, args: Option<Value>) -> Value {
        self.next_id += 1;
        let id = self.next_id;
        let mut m = json!({"execute": cmd, "id": id});
        if let Some(a) = args {
            m["arguments"] = a;
        }
        self.send(format!("{m}\n").as_bytes());
        self.reply(json!(id))
    }

    fn reply(&mut self, id: Value) -> Value {
        loop {
            let mut v = self.read().expect("a reply");
            if v.get("event").is_some() {
                self.events.push(v);
                continue;
            }
            assert_eq!(v["id"], id, "reply {v}");
            v.as_object_mut().unwrap().remove("id");
            return v;
        }
    }

    fn ok(&mut self, cmd: &str, args: Option<Value>) -> Value {
        let v = self.execute(cmd, args);
        v.get("return")
            .cloned()
            .unwrap_or_else(|| panic!("{cmd}: {v}"))
    }

    fn error(&mut self, cmd: &str, args: Option<Value>) -> (String, String) {
        let v = self.execute(cmd, args);
        let e = &v["error"];
        assert!(e.is_object(), "{cmd} did not fail: {v}");
        (
            e["class"].as_str().unwrap().into(),
            e["desc"].as_str().unwrap().into(),
        )
    }

    /// Waits for event `name` (or takes it from those already read).
    fn event(&mut self, name: &str) -> Value {
        if let Some(i) = self.events.iter().position(|e| e["event"] == name) {
            return self.events.remove(i);
        }
        let deadline = Instant::now() + TIMEOUT;
        while Instant::now() < deadline {
            let v = self
                .read()
                .unwrap_or_else(|| panic!("connection ended waiting for {name}"));
            if v["event"] == name {
                return v;
            }
            self.events.push(v);
        }
        panic!("no {name} event; got {:?}", self.events);
    }
}

struct Setup {
    _dir: tempfile::TempDir,
    image: PathBuf,
    control: PathBuf,
    server: ServerProc,
}

fn serve(image: PathBuf, d: tempfile::TempDir, args: &[&str]) -> Setup {
    let control = d.path().join("ctl.sock");
    let mut a = vec!["--control", control.to_str().unwrap()];
    a.extend_from_slice(args);
    let server = ServerProc::start(&image, &d.path().join("vhost.sock"), &a);
    Setup {
        _dir: d,
        image,
        control,
        server,
    }
}

fn serve_new(args: &[&str]) -> Setup {
    let d = dir();
    let image = create_image(d.path(), "disk.fvd", "64M");
    serve(image, d, args)
}

#[test]
fn greeting_negotiation_commands_and_errors() {
    let s = serve_new(&[]);
    let mode = std::fs::metadata(&s.control).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600);
    let (mut q, g) = Qmp::raw(&s.control);
    assert_eq!(g["QMP"]["capabilities"], json!([]));
    assert_eq!(
        g["QMP"]["version"]["package"],
        json!(format!("fvd {}", env!("CARGO_PKG_VERSION")))
    );
    // Commands before negotiation are refused.
    let (class, desc) = q.error("query-block", None);
    assert_eq!(class, "CommandNotFound");
    assert!(desc.contains("qmp_capabilities"), "{desc}");
    assert_eq!(
        q.error("qmp_capabilities", Some(json!({"enable": ["oob"]})))
            .0,
        "GenericError"
    );
    assert_eq!(q.ok("qmp_capabilities", None), json!({}));
    assert_eq!(q.error("qmp_capabilities", None).0, "CommandNotFound");

    let names: Vec<String> = q
        .ok("query-commands", None)
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["name"].as_str().unwrap().to_string())
        .collect();
    // The commands the issue names, and ours.
    for c in "query-version query-block query-blockstats query-block-jobs block-job-pause \
              block-job-resume block-job-set-speed block-job-cancel block_resize \
              block_set_io_throttle x-fvd-copy-on-read x-fvd-flush quit"
        .split_whitespace()
    {
        assert!(names.iter().any(|n| n == c), "{c} missing from {names:?}");
    }
    assert_eq!(q.ok("query-version", None), g["QMP"]["version"]);

    let b = q.ok("query-block", None);
    let ins = &b[0]["inserted"];
    assert_eq!(b[0]["device"], "fvd0");
    assert_eq!(ins["file"], json!(s.image.display().to_string()));
    assert_eq!(ins["drv"], "fvd");
    assert_eq!(ins["ro"], false);
    assert_eq!(ins["image"]["virtual-size"], 64 << 20);
    assert_eq!(ins["x-fvd-copy-on-read"], false);
    assert_eq!(b[0]["x-fvd-frontend-connected"], false);

    let st = q.ok("query-blockstats", None);
    assert_eq!(st[0]["device"], "fvd0");
    assert_eq!(st[0]["stats"]["wr_operations"], 0);
    assert!(
        st[0]["stats"]["x-fvd-engine"]["host_reads"]
            .as_u64()
            .unwrap()
            > 0
    );

    assert_eq!(q.ok("query-block-jobs", None), json!([]));
    let (class, desc) = q.error("block-job-pause", Some(json!({"device": "prefetch"})));
    assert_eq!(class, "GenericError");
    assert!(desc.contains("not found"), "{desc}");
    assert_eq!(
        q.error(
            "block-job-set-speed",
            Some(json!({"device": "x", "speed": 1}))
        )
        .0,
        "GenericError"
    );
    // No base image: copy-on-read cannot be turned on.
    assert_eq!(
        q.error("x-fvd-copy-on-read", Some(json!({"enable": true})))
            .0,
        "GenericError"
    );
    assert_eq!(
        q.ok("x-fvd-copy-on-read", Some(json!({"enable": false}))),
        json!({})
    );
    assert_eq!(q.ok("x-fvd-flush", None), json!({}));
    let flushes = q.ok("query-blockstats", None)[0]["stats"]["x-fvd-engine"]["host_flushes"]
        .as_u64()
        .unwrap();
    assert!(flushes > 0);

    // Errors: wrong types, unknown arguments, unknown commands, malformed input. The connection
    // stays.
    let (class, desc) = q.error("x-fvd-copy-on-read", Some(json!({"enable": "yes"})));
    assert_eq!(class, "GenericError");
    assert!(desc.contains("'enable'"), "{desc}");
    assert!(q
        .error("query-block-jobs", Some(json!({"x": 1})))
        .1
        .contains("'x' is unexpected"));
    assert_eq!(q.error("nope", Some(json!({}))).0, "CommandNotFound");
    q.send(b"{\"execute\": \n\"query-version\", \"id\": \"split\"}\n");
    assert!(q.reply(json!("split"))["return"]["package"].is_string());
    q.send(b"{bad json\n");
    let v = q.read().unwrap();
    assert_eq!(v["error"]["class"], "GenericError", "{v}");
    q.send(b"[1, 2]\n{\"id\": 5}\n");
    assert_eq!(
        q.read().unwrap()["error"]["desc"],
        "QMP input must be a JSON object"
    );
    let v = q.read().unwrap();
    assert_eq!(v["id"], 5);
    assert_eq!(v["error"]["desc"], "QMP input lacks member 'execute'");
    assert_eq!(q.ok("query-block-jobs", None), json!([]));
    // Everything above ran under the control thread's own filter (no-open + its list), after
    // it served a flush on the shared ring.
    assert_eq!(
        serve_support::thread_filters(s.server.pid()).remove("fvd-qmp"),
        Some(vec![2])
    );
    assert!(s.server.terminate().success());
}

#[test]
fn clients_at_once_oversize_input_and_a_client_that_never_reads() {
    let mut s = serve_new(&[]);
    let mut a = Qmp::connect(&s.control);
    let mut b = Qmp::connect(&s.control);
    assert_eq!(a.ok("query-block-jobs", None), json!([]));
    assert_eq!(b.ok("query-block-jobs", None), json!([]));

    // One message over 64 KiB: skipped, answered with an error, the client stays.
    let mut big = b"{\"execute\": \"query-version\", \"arguments\": {\"x\": \"".to_vec();
    big.resize(200 << 10, b'a');
    big.extend_from_slice(b"\"}}\n");
    a.send(&big);
    let v = a.read().unwrap();
    assert_eq!(v["error"]["class"], "GenericError");
    assert!(v["error"]["desc"].as_str().unwrap().contains("longer"));
    assert!(a.ok("query-version", None)["package"].is_string());

    // A client that sends commands and never reads: disconnected once its unread replies pass
    // the bound, while the others are served all along.
    let (mut c, _) = Qmp::raw(&s.control);
    c.send(b"{\"execute\": \"qmp_capabilities\"}\n");
    let mut w = c.w.try_clone().unwrap();
    let writer = std::thread::spawn(move || {
        let cmd = b"{\"execute\": \"query-block\"}\n".repeat(256);
        // ~ 4 MiB of replies requested; the writes fail once the server has disconnected.
        for _ in 0..24 {
            if w.write_all(&cmd).is_err() {
                return;
            }
        }
    });
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(a.ok("query-block-jobs", None), json!([]));
    writer.join().unwrap();
    // What the server wrote before giving up is bounded; then end of file (or a reset).
    let mut total = 0usize;
    let mut buf = vec![0u8; 1 << 16];
    let t0 = Instant::now();
    loop {
        match c.r.get_mut().read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => total += n,
        }
        assert!(
            t0.elapsed() < TIMEOUT,
            "the slow client was not disconnected"
        );
    }
    assert!(total < 3 << 20, "{total} bytes reached the slow client");
    assert!(b.ok("query-version", None)["package"].is_string());

    // At most 16 clients: with a and b, 14 more get greetings; the next is closed unanswered.
    drop(c);
    let mut more: Vec<Qmp> = (0..14).map(|_| Qmp::raw(&s.control).0).collect();
    let extra = UnixStream::connect(&s.control).unwrap();
    extra.set_read_timeout(Some(TIMEOUT)).unwrap();
    assert_eq!(
        (&extra).read(&mut [0u8; 64]).unwrap(),
        0,
        "a 17th client was served"
    );
    more.pop();
    let t0 = Instant::now();
    loop {
        // The freed place is taken once the server has seen the close.
        let s2 = UnixStream::connect(&s.control).unwrap();
        s2.set_read_timeout(Some(TIMEOUT)).unwrap();
        if (&s2).read(&mut [0u8; 64]).unwrap() > 0 {
            break;
        }
        assert!(t0.elapsed() < TIMEOUT, "no place after a client left");
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(s.server.alive());
    assert!(s.server.terminate().success());
}

#[test]
fn events_for_a_frontend_and_for_io_errors() {
    let d = dir();
    // A probed raw image: a guest write that would make it look like an FVD image fails with an
    // I/O error, which is the BLOCK_IO_ERROR to see.
    let image = d.path().join("disk.raw");
    std::fs::File::create(&image)
        .unwrap()
        .set_len(16 << 20)
        .unwrap();
    let s = serve(image, d, &[]);
    let mut q = Qmp::connect(&s.control);
    let mut cl = client::connect(&s.server.socket, 1, false).unwrap();
    let e = q.event("X_FVD_FRONTEND_CONNECTED");
    assert!(e["timestamp"]["seconds"].as_u64().unwrap() > 0);
    assert!(e["timestamp"]["microseconds"].as_u64().unwrap() < 1_000_000);
    assert_eq!(
        q.ok("query-block", None)[0]["x-fvd-frontend-connected"],
        true
    );
    assert_eq!(q.ok("query-block", None)[0]["inserted"]["drv"], "raw");

    cl.write(0, 1 << 20, &[0x5a; 4096]);
    let mut magic = vec![0u8; 4096];
    magic[..8].copy_from_slice(b"FVDIMAGE");
    cl.buf(0, 4096).copy_from_slice(&magic);
    assert_ne!(cl.run(0, client::Req::Write, 0, 0, 4096), 0);
    // Rate-limited: a burst of failures gives one event.
    for _ in 0..20 {
        assert_ne!(cl.run(0, client::Req::Write, 0, 0, 4096), 0);
    }
    let e = q.event("BLOCK_IO_ERROR");
    assert_eq!(e["data"]["device"], "fvd0");
    assert_eq!(e["data"]["operation"], "write");
    assert_eq!(e["data"]["action"], "report");
    assert_eq!(e["data"]["nospace"], false);
    let st = q.ok("query-blockstats", None);
    // The one write that landed, and the 21 refused.
    assert_eq!(st[0]["stats"]["wr_operations"], 1);
    assert_eq!(st[0]["stats"]["failed_wr_operations"], 21);
    assert!(
        q.events.iter().all(|e| e["event"] != "BLOCK_IO_ERROR"),
        "more than one BLOCK_IO_ERROR within a second: {:?}",
        q.events
    );

    drop(cl);
    q.event("X_FVD_FRONTEND_DISCONNECTED");
    assert_eq!(
        q.ok("query-block", None)[0]["x-fvd-frontend-connected"],
        false
    );
    // SIGTERM: SHUTDOWN names the signal, then the connection ends.
    s.server.signal(libc::SIGTERM);
    assert_eq!(
        q.event("SHUTDOWN")["data"],
        json!({"guest": false, "reason": "host-signal"})
    );
    assert!(q.read().is_none());
    assert!(s.server.terminate().success());
}

/// An image whose base must be prefetched, served with prefetching on at `rate`.
fn serve_prefetching(rate: &str) -> Setup {
    let d = dir();
    let base = d.path().join("base.raw");
    let data: Vec<u8> = (0..8 << 20).map(|i: u32| (i % 251) as u8).collect();
    std::fs::write(&base, &data).unwrap();
    let image = d.path().join("disk.fvd");
    let o = fvd()
        .arg("create")
        .arg(&image)
        .args(["-b", base.to_str().unwrap(), "-F", "raw"])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    serve(
        image,
        d,
        &[
            "--prefetch",
            "--prefetch-delay",
            "0",
            "--prefetch-rate",
            rate,
            "--prefetch-min-throughput",
            "0",
        ],
    )
}

#[test]
fn prefetch_is_a_block_job_that_pauses_resumes_changes_speed_and_cancels() {
    let s = serve_prefetching("64K");
    let mut q = Qmp::connect(&s.control);
    let jobs = q.ok("query-block-jobs", None);
    let j = &jobs[0];
    assert_eq!(j["type"], "stream");
    assert_eq!(j["device"], "prefetch");
    assert_eq!(j["len"], 8 << 20);
    assert_eq!(j["speed"], 64 << 10);
    assert_eq!(j["paused"], false);
    let dev = || Some(json!({"device": "prefetch"}));

    let offset = |q: &mut Qmp| {
        q.ok("query-block-jobs", None)[0]["offset"]
            .as_u64()
            .unwrap()
    };
    let wait_progress = |q: &mut Qmp, from: u64, what: &str| {
        let t0 = Instant::now();
        while offset(q) == from {
            assert!(t0.elapsed() < TIMEOUT, "no progress {what}");
            std::thread::sleep(Duration::from_millis(50));
        }
    };
    assert!(q
        .error(
            "block-job-set-speed",
            Some(json!({"device": "prefetch", "speed": -1}))
        )
        .1
        .contains("non-negative"));
    // At 64 KiB/s a 1 MiB step holds the next one back 16 s; a new speed applies at once.
    let first = offset(&mut q);
    let speed = |q: &mut Qmp, v: u64| {
        assert_eq!(
            q.ok(
                "block-job-set-speed",
                Some(json!({"device": "prefetch", "speed": v}))
            ),
            json!({})
        );
    };
    speed(&mut q, 2 << 20);
    assert_eq!(q.ok("query-block-jobs", None)[0]["speed"], 2 << 20);
    wait_progress(&mut q, first, "after raising the speed");

    assert_eq!(q.ok("block-job-pause", dev()), json!({}));
    assert_eq!(q.error("block-job-pause", dev()).0, "GenericError");
    let j = &q.ok("query-block-jobs", None)[0];
    assert_eq!(j["paused"], true);
    assert_eq!(j["status"], "paused");
    // Paused (once the step in flight is done): no progress, though 2 MiB/s would allow it.
    std::thread::sleep(Duration::from_millis(500));
    let before = offset(&mut q);
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(offset(&mut q), before);
    assert_eq!(q.ok("block-job-resume", dev()), json!({}));
    assert_eq!(q.error("block-job-resume", dev()).0, "GenericError");
    wait_progress(&mut q, before, "after resume");
    speed(&mut q, 64 << 10);

    assert_eq!(q.ok("block-job-cancel", dev()), json!({}));
    let e = q.event("BLOCK_JOB_CANCELLED");
    assert_eq!(e["data"]["device"], "prefetch");
    assert_eq!(e["data"]["type"], "stream");
    assert_eq!(e["data"]["len"], 8 << 20);
    assert!(e["data"]["offset"].as_u64().unwrap() < 8 << 20);
    assert_eq!(q.ok("query-block-jobs", None), json!([]));
    assert_eq!(q.error("block-job-resume", dev()).0, "GenericError");
    assert!(s.server.terminate().success());
}

#[test]
fn prefetch_completion_is_an_event() {
    let s = serve_prefetching("0");
    let mut q = Qmp::connect(&s.control);
    let e = q.event("BLOCK_JOB_COMPLETED");
    assert_eq!(e["data"]["device"], "prefetch");
    assert_eq!(e["data"]["offset"], 8 << 20);
    assert_eq!(e["data"]["len"], 8 << 20);
    assert_eq!(q.ok("query-block-jobs", None), json!([]));
    assert!(s.server.terminate().success());
}

#[test]
fn quit_stops_the_server_as_sigterm_does() {
    let mut s = serve_new(&[]);
    let mut other = Qmp::connect(&s.control);
    let mut q = Qmp::connect(&s.control);
    let mut cl = client::connect(&s.server.socket, 1, false).unwrap();
    cl.write(0, 0, &[0xa5; 65536]);
    assert_eq!(q.ok("quit", None), json!({}));
    let e = other.event("SHUTDOWN");
    assert_eq!(
        e["data"],
        json!({"guest": false, "reason": "host-qmp-quit"})
    );
    assert_eq!(q.event("SHUTDOWN")["data"]["reason"], "host-qmp-quit");
    // Then the server closes every client, removes both sockets and exits cleanly.
    assert!(q.read().is_none());
    drop(cl);
    let t0 = Instant::now();
    while s.server.alive() {
        assert!(t0.elapsed() < TIMEOUT, "still running after quit");
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(!s.control.exists());
    assert!(!s.server.socket.exists());
    serve_support::check_passes(&s.image, "after quit");
}

#[test]
fn fvd_ctl_prints_the_return_and_fails_with_the_error() {
    let s = serve_new(&[]);
    let ctl = |args: &[&str]| {
        fvd()
            .arg("ctl")
            .arg(&s.control)
            .args(args)
            .output()
            .unwrap()
    };
    let o = ctl(&["query-block"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let v: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v[0]["device"], "fvd0");
    // Pretty-printed.
    assert!(String::from_utf8_lossy(&o.stdout).contains("\n  "));
    let o = ctl(&["x-fvd-copy-on-read", r#"{"enable": false}"#]);
    assert!(o.status.success());
    assert_eq!(String::from_utf8_lossy(&o.stdout).trim(), "{}");
    let o = ctl(&["nope", r#"{"device": "fvd0"}"#]);
    assert_eq!(o.status.code(), Some(1));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("CommandNotFound"), "{err}");
    assert!(err.contains("nope"), "{err}");
    let o = ctl(&["query-block", "[1]"]);
    assert_ne!(o.status.code(), Some(0));

    // --events: one event a line, until killed.
    let mut ev = fvd()
        .arg("ctl")
        .arg(&s.control)
        .arg("--events")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = BufReader::new(ev.stdout.take().unwrap());
    // Negotiated (so it gets the event) once it says so.
    let mut note = String::new();
    BufReader::new(ev.stderr.take().unwrap())
        .read_line(&mut note)
        .unwrap();
    assert!(note.contains("until interrupted"), "{note}");
    let cl = client::connect(&s.server.socket, 1, false).unwrap();
    let mut line = String::new();
    out.read_line(&mut line).unwrap();
    let v: Value = serde_json::from_str(&line).unwrap();
    assert_eq!(v["event"], "X_FVD_FRONTEND_CONNECTED");
    drop(cl);
    ev.kill().unwrap();
    ev.wait().unwrap();
    assert!(s.server.terminate().success());
}

/// CI must have python3 and qemu.qmp (integration/setup-host.sh installs them); elsewhere the
/// test says it skipped.
fn python_with_qemu_qmp() -> bool {
    let ok = std::process::Command::new("python3")
        .args(["-c", "import qemu.qmp"])
        .status()
        .is_ok_and(|s| s.success());
    if !ok {
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "python3 with the qemu.qmp package is required under CI (integration/setup-host.sh)"
        );
        eprintln!("skipped: python3 with qemu.qmp not found (integration/setup-host.sh)");
    }
    ok
}

#[test]
fn the_qemu_qmp_package_drives_the_socket() {
    if !python_with_qemu_qmp() {
        return;
    }
    let mut s = serve_new(&[]);
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("integration/qmp_client.py");
    let mut py = std::process::Command::new("python3")
        .arg(&script)
        .arg(&s.control)
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = BufReader::new(py.stdout.take().unwrap());
    let mut expect = |want: &str| {
        let mut line = String::new();
        out.read_line(&mut line).unwrap();
        assert_eq!(line.trim(), want, "qmp_client.py");
    };
    expect("ready");
    let cl = client::connect(&s.server.socket, 1, false).unwrap();
    expect("connected");
    drop(cl);
    expect("disconnected");
    expect("done");
    assert!(py.wait().unwrap().success());
    let t0 = Instant::now();
    while s.server.alive() {
        assert!(t0.elapsed() < TIMEOUT, "still running after quit");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A thin image on a loop device over an 8 MiB file, served with `grow_cmd`; None (skipped)
/// where loop devices cannot be set up.
fn thin_on_loop(grow_cmd: impl Fn(&Path) -> String, extra: &[&str]) -> Option<(Setup, Loop)> {
    let d = dir();
    let backing = d.path().join("lv.img");
    std::fs::File::create(&backing)
        .unwrap()
        .set_len(8 << 20)
        .unwrap();
    let dev = Loop::attach(&backing)?;
    let c = fvd()
        .arg("create")
        .arg(&dev.0)
        .args(["--size", "1G", "--journal-size", "1M"])
        .output()
        .unwrap();
    assert!(c.status.success(), "{}", String::from_utf8_lossy(&c.stderr));
    let grow = grow_cmd(&backing);
    let mut args = serve_support::thin_grow_args(&grow);
    args.extend_from_slice(extra);
    Some((serve(dev.0.clone(), d, &args), dev))
}

#[test]
fn thin_storage_growing_and_running_out_are_events() {
    // Grown: the "LV resize" extends the file and tells the loop driver.
    let grow = |backing: &Path| {
        format!(
            "truncate -s +{{unit_bytes}} {} && losetup -c {{device}}",
            backing.display()
        )
    };
    let Some((s, dev)) = thin_on_loop(grow, &[]) else {
        return;
    };
    let mut q = Qmp::connect(&s.control);
    let mut cl = client::connect(&s.server.socket, 1, false).unwrap();
    for i in 0..12u64 {
        cl.write(0, i * (7 << 20), &vec![i as u8 + 1; 1 << 20]);
    }
    let low = q.event("X_FVD_STORAGE_LOW");
    assert_eq!(low["data"]["watermark"], 3 << 20);
    assert!(low["data"]["free"].as_u64().unwrap() < 3 << 20);
    let grown = q.event("X_FVD_STORAGE_GROWN");
    assert!(grown["data"]["free"].as_u64().unwrap() > 0);
    drop(cl);
    assert!(s.server.terminate().success());
    drop(dev);

    // Running out: the grow command fails, writes wait --grow-timeout and then fail with
    // ENOSPC, which BLOCK_IO_ERROR reports as `nospace`.
    let Some((s, _dev)) = thin_on_loop(|_| "false".into(), &["--grow-timeout", "1"]) else {
        return;
    };
    let mut q = Qmp::connect(&s.control);
    let mut cl = client::connect(&s.server.socket, 1, false).unwrap();
    let mut failed = false;
    for i in 0..12u64 {
        cl.buf(0, 1 << 20).fill(i as u8 + 1);
        if cl.run(0, client::Req::Write, i * (7 << 20), 0, 1 << 20) != 0 {
            failed = true;
            break;
        }
    }
    assert!(failed, "12 MiB of writes fit an 8 MiB device");
    assert!(q.event("X_FVD_STORAGE_GROW_FAILED")["data"]["reason"]
        .as_str()
        .unwrap()
        .contains("grow command failed"));
    let e = q.event("BLOCK_IO_ERROR");
    assert_eq!(e["data"]["operation"], "write");
    assert_eq!(e["data"]["nospace"], true);
    drop(cl);
    assert!(s.server.terminate().success());
}

#[test]
fn qmp_shell_runs_commands() {
    if !python_with_qemu_qmp() {
        return;
    }
    let mut s = serve_new(&[]);
    let mut sh = std::process::Command::new("python3")
        .args(["-m", "qemu.qmp.qmp_shell"])
        .arg(&s.control)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    sh.stdin
        .take()
        .unwrap()
        .write_all(b"query-version\nblock-job-pause device=prefetch\nquit\n")
        .unwrap();
    let o = sh.wait_with_output().unwrap();
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(
        out.contains(&format!(
            "\"package\": \"fvd {}\"",
            env!("CARGO_PKG_VERSION")
        )),
        "{out}"
    );
    assert!(out.contains("\"class\": \"GenericError\""), "{out}");
    let t0 = Instant::now();
    while s.server.alive() {
        assert!(
            t0.elapsed() < TIMEOUT,
            "still running after quit from qmp-shell"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn a_control_socket_in_use_or_unbindable_stops_the_start() {
    let s = serve_new(&[]);
    let d = dir();
    let image = create_image(d.path(), "other.fvd", "16M");
    let vhost = d.path().join("other.sock");
    for (control, want) in [
        (s.control.clone(), "in use"),
        (d.path().join("no-such-dir/c.sock"), "cannot bind"),
    ] {
        let o = fvd()
            .arg("serve")
            .arg(&image)
            .arg("--socket")
            .arg(&vhost)
            .arg("--control")
            .arg(&control)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success());
        assert!(
            err.contains("control socket") && err.contains(want),
            "{err}"
        );
        // Nothing left behind: the vhost-user socket is removed, the image closed clean.
        assert!(!vhost.exists());
        serve_support::check_passes(&image, "after a refused start");
    }
    // The running server's control socket still works.
    assert!(Qmp::connect(&s.control).ok("query-version", None)["package"].is_string());
    assert!(s.server.terminate().success());
}

/// `block_set_io_throttle` with QEMU's arguments: the limits show in `query-block` and hold
/// back a real frontend's writes; invalid ones are refused with QEMU's messages and change
/// nothing. `block_resize` grows the served disk (the frontend then reads the new size, the
/// new range reads zeros), refuses to shrink it or to pass its reserved room, and the size
/// persists.
#[test]
fn block_set_io_throttle_and_block_resize() {
    let s = serve_new(&[]);
    let mut q = Qmp::connect(&s.control);
    let none = json!({"device": "fvd0", "bps": 0, "bps_rd": 0, "bps_wr": 0,
                      "iops": 0, "iops_rd": 0, "iops_wr": 0});
    let mut wr10 = none.clone();
    wr10["iops_wr"] = json!(10);
    assert_eq!(q.ok("block_set_io_throttle", Some(wr10)), json!({}));
    let ins = &q.ok("query-block", None)[0]["inserted"];
    assert_eq!(ins["iops_wr"], 10);
    assert_eq!(ins["iops"], 0);
    assert_eq!(ins["iops_wr_max_length"], 1);

    // Refused, and the limits stay.
    let mut both = none.clone();
    both["iops"] = json!(5);
    both["iops_rd"] = json!(5);
    let mut neg = none.clone();
    neg["bps"] = json!(-1);
    let mut other = none.clone();
    other["device"] = json!("fvd9");
    for (args, want) in [
        (both, "cannot be used at the same time"),
        (neg, "must be within"),
        (json!({"device": "fvd0", "bps": 0}), "'bps_rd' is missing"),
        (other, "'fvd9' not found"),
    ] {
        let (class, desc) = q.error("block_set_io_throttle", Some(args));
        assert_eq!(class, "GenericError");
        assert!(desc.contains(want), "{desc} lacks {want}");
    }
    assert_eq!(q.ok("query-block", None)[0]["inserted"]["iops_wr"], 10);

    // 15 writes at 10 a second: the first goes at once, each next one a tenth of a second
    // later (a lower bound: the limit holds them back).
    let mut cl = client::connect(&s.server.socket, 1, false).unwrap();
    let t = Instant::now();
    for i in 0..15u64 {
        cl.write(0, i * 4096, &[0x11; 4096]);
    }
    let took = t.elapsed();
    assert!(
        took >= Duration::from_millis(1200),
        "15 writes took {took:?}"
    );
    assert_eq!(q.ok("block_set_io_throttle", Some(none)), json!({}));

    // Grow 64M -> 96M while the frontend is connected (libblkio does not take the backend
    // request channel: the size is in the configuration space for it to read).
    assert_eq!(
        q.ok(
            "block_resize",
            Some(json!({"node-name": "fvd0", "size": 96 << 20}))
        ),
        json!({})
    );
    assert_eq!(
        q.ok("query-block", None)[0]["inserted"]["image"]["virtual-size"],
        96 << 20
    );
    assert_eq!(cl.read(0, 80 << 20, 4096), vec![0u8; 4096]);
    cl.write(0, 90 << 20, &[0x22; 4096]);
    assert_eq!(cl.read(0, 90 << 20, 4096), vec![0x22; 4096]);
    for (args, want) in [
        (json!({"device": "fvd0", "size": 32 << 20}), "shrink"),
        (json!({"device": "fvd0", "size": 1u64 << 40}), "max"),
        (json!({"device": "fvd0", "size": -1}), "'size'"),
        (json!({"device": "fvd0"}), "'size' is missing"),
    ] {
        let (class, desc) = q.error("block_resize", Some(args.clone()));
        assert_eq!(class, "GenericError", "{args}");
        assert!(
            desc.to_lowercase().contains(want),
            "{args}: {desc} lacks {want}"
        );
    }
    drop(cl);
    drop(q);
    let image = s.image.clone();
    let dir = s._dir;
    drop(s.server);
    let info = fvd().arg("info").arg(&image).output().unwrap();
    assert!(
        String::from_utf8_lossy(&info.stdout).contains(&format!("{}", 96u64 << 20)),
        "{}",
        String::from_utf8_lossy(&info.stdout)
    );
    drop(dir);
}
