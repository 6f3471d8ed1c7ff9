//! `fvd serve` on a listening socket passed the way systemd passes it (socket activation:
//! descriptor 3, `LISTEN_PID`, `LISTEN_FDS`): the real libblkio client is served, the server is
//! killed and replaced by a second one on the same socket while a client is connecting, and the
//! socket file never goes away. Bad hand-overs are refused with a clear error.

mod serve_support;

use serve_support::client::{connect, Req};
use serve_support::{check_passes, create_image, dir, ServerProc};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixListener;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// `fvd serve IMAGE ARGS...` with `fd` as descriptor 3 and the `LISTEN_*` variables as a
/// service manager sets them; `listen_pid: None` means the child's own pid (the sh wrapper
/// execs fvd, so `$$` is fvd's pid).
fn activated(
    image: &Path,
    fd: RawFd,
    listen_pid: Option<u32>,
    fds: &str,
    args: &[&str],
) -> Command {
    let pid = listen_pid.map_or("$$".to_string(), |p| p.to_string());
    let mut c = Command::new("sh");
    c.arg("-c")
        .arg(format!(
            "LISTEN_PID={pid} LISTEN_FDS={fds} LISTEN_FDNAMES=disk.socket exec \"$0\" \"$@\""
        ))
        .arg(env!("CARGO_BIN_EXE_fvd"))
        .arg("serve")
        .arg(image)
        .args(["-f", "fvd", "--num-queues", "1"])
        .args(args);
    // SAFETY: dup2 and fcntl are async-signal-safe; the closure touches no shared state.
    unsafe {
        c.pre_exec(move || {
            if fd == 3 {
                // dup2 onto itself keeps close-on-exec: clear it instead.
                if libc::fcntl(3, libc::F_SETFD, 0) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
            } else if libc::dup2(fd, 3) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    c
}

fn pattern(seed: u8, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31) ^ seed)
        .collect()
}

/// Watches the socket file from another thread; counts the times it was found missing.
struct Watch {
    stop: Arc<AtomicBool>,
    missing: Arc<AtomicU64>,
    looks: Arc<AtomicU64>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Watch {
    fn new(path: &Path) -> Watch {
        let (stop, missing, looks) = (
            Arc::new(AtomicBool::new(false)),
            Arc::new(AtomicU64::new(0)),
            Arc::new(AtomicU64::new(0)),
        );
        let (s, m, l, p) = (
            stop.clone(),
            missing.clone(),
            looks.clone(),
            path.to_path_buf(),
        );
        let thread = std::thread::spawn(move || {
            use std::os::unix::fs::FileTypeExt;
            while !s.load(Ordering::SeqCst) {
                let ok = std::fs::symlink_metadata(&p).is_ok_and(|m| m.file_type().is_socket());
                if !ok {
                    m.fetch_add(1, Ordering::SeqCst);
                }
                l.fetch_add(1, Ordering::SeqCst);
                std::thread::yield_now();
            }
        });
        Watch {
            stop,
            missing,
            looks,
            thread: Some(thread),
        }
    }

    /// (times missing, times looked).
    fn finish(mut self) -> (u64, u64) {
        self.stop.store(true, Ordering::SeqCst);
        self.thread.take().unwrap().join().unwrap();
        (
            self.missing.load(Ordering::SeqCst),
            self.looks.load(Ordering::SeqCst),
        )
    }
}

#[test]
fn passed_socket_is_served_across_a_kill_and_a_restart() {
    let d = dir();
    let img = create_image(d.path(), "disk.fvd", "32M");
    let path = d.path().join("disk.sock");
    // The service manager's socket: bound once, held by the test for the whole run.
    let l = UnixListener::bind(&path).unwrap();
    let watch = Watch::new(&path);

    let first = ServerProc::spawn(activated(&img, l.as_raw_fd(), None, "1", &[]), &path);
    {
        let mut c = connect(&path, 1, false).unwrap();
        c.write(0, 1 << 20, &pattern(1, 256 << 10));
        assert_eq!(c.run(0, Req::Flush, 0, 0, 0), 0);
        assert_eq!(c.read(0, 1 << 20, 256 << 10), pattern(1, 256 << 10));
        // The client stays connected: the kill below cuts a live connection.
        first.signal(libc::SIGKILL);
        assert_eq!(first.wait().code(), None, "killed by the signal");
    }
    // A client that connects while no server runs: the manager's socket queues it, and the
    // next server accepts it.
    let p = path.clone();
    let client = std::thread::spawn(move || {
        let mut c = connect(&p, 1, false).expect("connect while the server restarts");
        let back = c.read(0, 1 << 20, 256 << 10);
        c.write(0, 8 << 20, &pattern(2, 64 << 10));
        assert_eq!(c.run(0, Req::Flush, 0, 0, 0), 0);
        back
    });
    std::thread::sleep(Duration::from_millis(300));
    let second = ServerProc::spawn(activated(&img, l.as_raw_fd(), None, "1", &[]), &path);
    let back = client.join().unwrap();
    assert!(
        back == pattern(1, 256 << 10),
        "flushed data lost across the restart"
    );
    second.signal(libc::SIGTERM);
    let st = second.wait();
    assert!(st.success(), "SIGTERM: {st}");
    // A third server on the same socket reads what the second wrote: the socket still
    // listens after a clean stop (it was not shut down or unlinked).
    let third = ServerProc::spawn(activated(&img, l.as_raw_fd(), None, "1", &[]), &path);
    {
        let mut c = connect(&path, 1, false).unwrap();
        assert_eq!(c.read(0, 8 << 20, 64 << 10), pattern(2, 64 << 10));
    }
    third.signal(libc::SIGTERM);
    assert!(third.wait().success());
    let (missing, looks) = watch.finish();
    assert!(looks > 100, "the watcher looked only {looks} times");
    assert_eq!(
        missing, 0,
        "the socket file was missing {missing} of {looks} times"
    );
    check_passes(&img, "after the restarts");
}

fn fails(mut cmd: Command) -> String {
    let o: Output = cmd.stdout(Stdio::null()).output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr).into_owned();
    assert!(!o.status.success(), "fvd serve must refuse; stderr: {err}");
    err
}

#[test]
fn bad_hand_overs_are_refused() {
    let d = dir();
    let img = create_image(d.path(), "disk.fvd", "8M");
    let path = d.path().join("disk.sock");
    let l = UnixListener::bind(&path).unwrap();
    let fd = l.as_raw_fd();

    let e = fails(activated(&img, fd, Some(1), "1", &[]));
    assert!(e.contains("LISTEN_PID=1 names another process"), "{e}");
    let e = fails(activated(&img, fd, None, "0", &[]));
    assert!(e.contains("LISTEN_FDS=0, no socket was passed"), "{e}");
    let e = fails(activated(&img, fd, None, "2", &[]));
    assert!(e.contains("2 sockets passed"), "{e}");
    let other = d.path().join("other.sock");
    let e = fails(activated(
        &img,
        fd,
        None,
        "1",
        &["--socket", other.to_str().unwrap()],
    ));
    assert!(e.contains("differs from the passed socket's path"), "{e}");

    // Descriptor 3 is a regular file, a connected socket, a datagram socket.
    let f = std::fs::File::open(&img).unwrap();
    let e = fails(activated(&img, f.as_raw_fd(), None, "1", &[]));
    assert!(e.contains("descriptor 3 is a regular file"), "{e}");
    let (a, _b) = std::os::unix::net::UnixStream::pair().unwrap();
    let e = fails(activated(&img, a.as_raw_fd(), None, "1", &[]));
    assert!(e.contains("not listening"), "{e}");
    let dg = std::os::unix::net::UnixDatagram::bind(d.path().join("dg.sock")).unwrap();
    let e = fails(activated(&img, dg.as_raw_fd(), None, "1", &[]));
    assert!(e.contains("not SOCK_STREAM"), "{e}");

    // Refusals leave the socket alone, and a good hand-over with the same --socket works.
    assert!(path.exists());
    let cmd = activated(&img, fd, None, "1", &["--socket", path.to_str().unwrap()]);
    let s = ServerProc::spawn(cmd, &path);
    {
        let mut c = connect(&path, 1, false).unwrap();
        assert_eq!(c.read(0, 0, 4096), vec![0; 4096]);
    }
    s.signal(libc::SIGTERM);
    assert!(s.wait().success());
    assert!(path.exists(), "a passed socket's file is never removed");
}

#[test]
fn without_a_passed_socket_the_socket_option_is_required() {
    let d = dir();
    let img = create_image(d.path(), "disk.fvd", "8M");
    let o = Command::new(env!("CARGO_BIN_EXE_fvd"))
        .arg("serve")
        .arg(&img)
        .env_remove("LISTEN_PID")
        .env_remove("LISTEN_FDS")
        .output()
        .unwrap();
    assert!(!o.status.success());
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(e.contains("--socket PATH is required"), "{e}");
}

/// The tool systemd ships for trying socket units by hand: it listens, and execs the server on
/// the first connection with descriptor 3 and the `LISTEN_*` variables set.
#[test]
fn systemd_socket_activate_hands_over_its_socket() {
    let tool = Path::new("/usr/bin/systemd-socket-activate");
    if !tool.exists() {
        eprintln!("SKIP: systemd-socket-activate is not installed (apt-get install systemd)");
        return;
    }
    let d = dir();
    let img = create_image(d.path(), "disk.fvd", "8M");
    let path = d.path().join("disk.sock");
    let mut sa = Command::new(tool)
        .arg("-l")
        .arg(&path)
        .arg(env!("CARGO_BIN_EXE_fvd"))
        .arg("serve")
        .arg(&img)
        .args(["-f", "fvd", "--num-queues", "1"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    // Not ready until the socket exists; then the first connection starts the server.
    for _ in 0..100 {
        if path.exists() {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    {
        let mut c = connect(&path, 1, false).unwrap();
        c.write(0, 0, &pattern(3, 4096));
        assert_eq!(c.read(0, 0, 4096), pattern(3, 4096));
    }
    // The tool exec'd the server: the child is fvd now.
    // SAFETY: kill with a pid we spawned and have not reaped yet.
    assert_eq!(unsafe { libc::kill(sa.id() as i32, libc::SIGTERM) }, 0);
    let st = sa.wait().unwrap();
    assert!(st.success(), "SIGTERM: {st}");
    assert!(path.exists(), "the socket file stays with its owner");
}
