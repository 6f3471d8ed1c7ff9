//! Running `fvd serve` as a real process for the end-to-end server tests.

#![allow(dead_code)]

pub mod client;
pub mod guest;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdout, Command, ExitStatus, Stdio};

pub fn fvd() -> Command {
    Command::new(env!("CARGO_BIN_EXE_fvd"))
}

/// Runs `fvd ARGS` in `dir` to completion.
pub fn fvd_in(dir: &Path, args: &[&str]) -> std::process::Output {
    fvd().args(args).current_dir(dir).output().unwrap()
}

/// A scratch directory on a filesystem with O_DIRECT (tmpfs may lack it).
pub fn dir() -> tempfile::TempDir {
    tempfile::tempdir_in("/var/tmp").unwrap()
}

/// Creates an FVD image with `fvd create`.
pub fn create_image(dir: &Path, name: &str, size: &str) -> PathBuf {
    let path = dir.join(name);
    fvd_create(&path, &["-s", size]);
    path
}

/// Runs `fvd create TARGET ARGS` and asserts that it succeeds.
pub fn fvd_create(target: &Path, args: &[&str]) {
    let o = fvd().arg("create").arg(target).args(args).output().unwrap();
    assert!(
        o.status.success(),
        "fvd create: {}",
        String::from_utf8_lossy(&o.stderr)
    );
}

/// Runs `fvd check IMAGE`, asserts that it passes (`what` names the case in the failure
/// message) and returns its report.
pub fn check_passes(image: &Path, what: &str) -> String {
    let o = fvd().arg("check").arg(image).output().unwrap();
    let out = String::from_utf8_lossy(&o.stdout).into_owned();
    assert!(
        o.status.success(),
        "fvd check {what}: {out} {}",
        String::from_utf8_lossy(&o.stderr)
    );
    out
}

pub struct ServerProc {
    child: Child,
    pub socket: PathBuf,
    /// Kept open: the server may still write to stdout.
    _stdout: BufReader<ChildStdout>,
    /// What the server printed before it was ready.
    pub banner: String,
}

impl ServerProc {
    /// Starts `fvd serve IMAGE --socket SOCKET ARGS...` and waits until it has bound the socket.
    pub fn start(image: &Path, socket: &Path, args: &[&str]) -> ServerProc {
        let mut cmd = fvd();
        cmd.arg("serve")
            .arg(image)
            .arg("--socket")
            .arg(socket)
            .args(args);
        ServerProc::spawn(cmd, socket)
    }

    /// Spawns `cmd`, an `fvd serve` that serves on `socket` (given or passed to it), and waits
    /// until it is ready.
    pub fn spawn(mut cmd: Command, socket: &Path) -> ServerProc {
        let mut child = cmd.stdout(Stdio::piped()).spawn().unwrap();
        let mut out = BufReader::new(child.stdout.take().unwrap());
        let mut banner = String::new();
        // The banner ends with the cloud-hypervisor line, printed after the socket is bound.
        while !banner.contains("--disk vhost_user=true") {
            let mut line = String::new();
            if out.read_line(&mut line).unwrap() == 0 {
                let status = child.wait().unwrap();
                panic!("fvd serve exited before it was ready ({status}); printed: {banner}");
            }
            banner.push_str(&line);
        }
        ServerProc {
            child,
            socket: socket.to_path_buf(),
            _stdout: out,
            banner,
        }
    }

    pub fn alive(&mut self) -> bool {
        self.child.try_wait().unwrap().is_none()
    }

    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    /// Sends SIGTERM and waits for the exit.
    pub fn terminate(mut self) -> ExitStatus {
        // SAFETY: kill with a pid we spawned and have not reaped yet.
        unsafe { libc::kill(self.pid(), libc::SIGTERM) };
        self.child.wait().unwrap()
    }

    /// Bounds a test that may wedge the server: SIGKILLs it if the returned guard is still alive
    /// after `limit` (a killed server closes its socket, so a frontend blocked on it fails).
    pub fn kill_after(&self, limit: std::time::Duration) -> KillGuard {
        let (tx, rx) = std::sync::mpsc::channel::<()>();
        let pid = self.pid();
        std::thread::spawn(move || {
            if let Err(std::sync::mpsc::RecvTimeoutError::Timeout) = rx.recv_timeout(limit) {
                eprintln!("server {pid} still running after {limit:?}: killing it");
                // SAFETY: kill with a pid we spawned; the guard outlives neither the child nor
                // the test.
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
        });
        KillGuard(tx)
    }

    /// Sends `sig` to the server.
    pub fn signal(&self, sig: i32) {
        // SAFETY: kill with a pid we spawned and have not reaped yet.
        assert_eq!(unsafe { libc::kill(self.pid(), sig) }, 0);
    }

    /// Sends SIGTERM and waits at most `timeout` for the exit (None: still running, killed).
    pub fn terminate_within(mut self, timeout: std::time::Duration) -> Option<ExitStatus> {
        self.signal(libc::SIGTERM);
        let deadline = std::time::Instant::now() + timeout;
        while std::time::Instant::now() < deadline {
            if let Some(status) = self.child.try_wait().unwrap() {
                return Some(status);
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        None
    }

    /// Waits for the server to exit on its own (e.g. `--once`).
    pub fn wait(mut self) -> ExitStatus {
        self.child.wait().unwrap()
    }
}

impl Drop for ServerProc {
    fn drop(&mut self) {
        if self.alive() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// See [`ServerProc::kill_after`]: dropping it cancels the kill.
pub struct KillGuard(std::sync::mpsc::Sender<()>);

/// `fvd serve` options of the thin-on-loop tests: one queue, and `grow` run whenever less than
/// 3 MiB is free, asking for 8 MiB at a time.
pub fn thin_grow_args(grow: &str) -> Vec<&str> {
    vec![
        "--num-queues",
        "1",
        "--grow-cmd",
        grow,
        "--grow-unit",
        "8M",
        "--grow-watermark",
        "3M",
    ]
}

/// Thread name -> seccomp filter counts of process `pid`'s threads (from /proc).
pub fn thread_filters(pid: i32) -> std::collections::BTreeMap<String, Vec<u32>> {
    let mut out = std::collections::BTreeMap::<String, Vec<u32>>::new();
    for t in std::fs::read_dir(format!("/proc/{pid}/task")).unwrap() {
        let t = t.unwrap().path();
        let (Ok(comm), Ok(status)) = (
            std::fs::read_to_string(t.join("comm")),
            std::fs::read_to_string(t.join("status")),
        ) else {
            continue; // the thread ended meanwhile
        };
        let n = status
            .lines()
            .find_map(|l| l.strip_prefix("Seccomp_filters:"))
            .map_or(0, |v| v.trim().parse().unwrap());
        out.entry(comm.trim().to_string()).or_default().push(n);
    }
    out
}

/// A loop device over a file (direct I/O), detached on drop: a block device for tests, as a
/// logical volume would be.
pub struct Loop(pub PathBuf);

impl Loop {
    /// None (and a SKIP line) where loop devices cannot be set up.
    pub fn attach(file: &Path) -> Option<Loop> {
        let o = Command::new("losetup")
            .args(["--direct-io=on", "-f", "--show"])
            .arg(file)
            .output()
            .ok()?;
        if !o.status.success() {
            eprintln!(
                "SKIP: losetup failed: {}",
                String::from_utf8_lossy(&o.stderr)
            );
            return None;
        }
        Some(Loop(PathBuf::from(
            String::from_utf8(o.stdout).ok()?.trim(),
        )))
    }
}

impl Drop for Loop {
    fn drop(&mut self) {
        let _ = Command::new("losetup").arg("-d").arg(&self.0).status();
    }
}
