//! Child processes: vhost-user servers kept running for one measurement, one-shot tools
//! (qemu-img, fio), and perf counting a server's host I/O.

use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A running server with a vhost-user socket.
pub struct Server {
    child: Child,
    pub sock: PathBuf,
    log: PathBuf,
}

impl Server {
    /// Starts `cmd` and waits for `sock` to appear.
    pub fn start(mut cmd: Command, sock: &Path, log: &Path) -> Result<Server, String> {
        let _ = std::fs::remove_file(sock);
        let out = File::create(log).map_err(|e| format!("{}: {e}", log.display()))?;
        let err = out.try_clone().map_err(|e| e.to_string())?;
        let child = cmd
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .map_err(|e| format!("spawn {cmd:?}: {e}"))?;
        let mut s = Server {
            child,
            sock: sock.to_path_buf(),
            log: log.to_path_buf(),
        };
        let t0 = Instant::now();
        while !sock.exists() {
            if let Ok(Some(st)) = s.child.try_wait() {
                return Err(format!("server exited ({st}): {}", s.log_tail()));
            }
            if t0.elapsed() > Duration::from_secs(20) {
                s.kill();
                return Err(format!("server socket never appeared: {}", s.log_tail()));
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        Ok(s)
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn log_path(&self) -> &Path {
        &self.log
    }

    pub fn log_tail(&self) -> String {
        let s = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = s.lines().collect();
        lines[lines.len().saturating_sub(5)..].join(" | ")
    }

    /// Peak resident set size so far (VmHWM), in KiB.
    pub fn vm_hwm_kib(&self) -> u64 {
        status_field(self.pid(), "VmHWM:").unwrap_or(0)
    }

    /// User + system CPU time consumed so far, in seconds.
    pub fn cpu_secs(&self) -> f64 {
        let stat =
            std::fs::read_to_string(format!("/proc/{}/stat", self.pid())).unwrap_or_default();
        // Fields after the parenthesised command name; utime and stime are fields 14 and 15.
        let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
        let f: Vec<&str> = rest.split_whitespace().collect();
        let tick = 100.0; // USER_HZ on Linux
        let get = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
        (get(11) + get(12)) / tick
    }

    /// SIGTERM, then SIGKILL after 20 s. Returns whether it exited cleanly.
    pub fn stop(mut self) -> Result<(), String> {
        // SAFETY: kill() with the pid of a child we have not reaped yet.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let t0 = Instant::now();
        loop {
            match self.child.try_wait() {
                Ok(Some(st)) if st.success() || st.code().is_none() => return Ok(()),
                Ok(Some(st)) => return Err(format!("server exit {st}: {}", self.log_tail())),
                Ok(None) if t0.elapsed() > Duration::from_secs(20) => {
                    self.kill();
                    return Err("server ignored SIGTERM for 20 s".into());
                }
                Ok(None) => std::thread::sleep(Duration::from_millis(5)),
                Err(e) => return Err(e.to_string()),
            }
        }
    }

    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            self.kill();
        }
    }
}

pub fn status_field(pid: u32, name: &str) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = s.lines().find(|l| l.starts_with(name))?;
    line[name.len()..].split_whitespace().next()?.parse().ok()
}

/// Runs a tool to completion; returns its stdout and the CPU time (user + system, seconds) it
/// and its threads used, from wait4().
pub fn run_tool(cmd: &mut Command) -> Result<(String, f64), String> {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("spawn {cmd:?}: {e}"))?;
    let mut so = child.stdout.take().ok_or("no stdout")?;
    let mut se = child.stderr.take().ok_or("no stderr")?;
    let errt = std::thread::spawn(move || {
        let mut err = String::new();
        let _ = se.read_to_string(&mut err);
        err
    });
    let mut out = String::new();
    so.read_to_string(&mut out).map_err(|e| e.to_string())?;
    let err = errt.join().unwrap_or_default();
    let mut status = 0i32;
    // SAFETY: an all-zero rusage is a valid value for wait4 to overwrite.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: wait4 on our own unreaped child with valid out-pointers; the Child is not waited
    // on again (dropping a Child does not wait).
    let r = unsafe { libc::wait4(child.id() as i32, &mut status, 0, &mut ru) };
    if r < 0 {
        return Err(format!("wait4: {}", std::io::Error::last_os_error()));
    }
    if !(libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0) {
        return Err(format!("{cmd:?} failed (status {status}): {}", err.trim()));
    }
    Ok((out, tv_secs(ru.ru_utime) + tv_secs(ru.ru_stime)))
}

fn tv_secs(t: libc::timeval) -> f64 {
    t.tv_sec as f64 + t.tv_usec as f64 * 1e-6
}

/// CPU time (user + system, seconds) of the calling thread.
pub fn thread_cpu_secs() -> f64 {
    // SAFETY: an all-zero rusage is a valid value for getrusage to overwrite.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: getrusage with a valid out-pointer.
    unsafe { libc::getrusage(libc::RUSAGE_THREAD, &mut ru) };
    tv_secs(ru.ru_utime) + tv_secs(ru.ru_stime)
}

/// Write and flush operations a process submits to the kernel, counted by `perf stat` on
/// tracepoints: io_uring submissions by opcode, and the equivalent plain system calls.
#[derive(Clone, Copy, Debug, Default)]
pub struct HostOps {
    pub writes: u64,
    pub flushes: u64,
    pub fallocates: u64,
}

pub struct IoCounter {
    child: Child,
    out: PathBuf,
}

// io_uring opcodes (include/uapi/linux/io_uring.h) and x86_64 system call numbers.
const EVENTS: [(&str, &str); 6] = [
    (
        "io_uring:io_uring_submit_req",
        "opcode==2 || opcode==5 || opcode==23",
    ), // WRITEV, WRITE_FIXED, WRITE
    ("io_uring:io_uring_submit_req", "opcode==3"), // FSYNC
    ("io_uring:io_uring_submit_req", "opcode==17"), // FALLOCATE
    ("raw_syscalls:sys_enter", "id==18 || id==296 || id==328"), // pwrite64, pwritev, pwritev2
    ("raw_syscalls:sys_enter", "id==74 || id==75"), // fsync, fdatasync
    ("raw_syscalls:sys_enter", "id==285"),         // fallocate
];

/// Whether perf can count the tracepoints [`IoCounter`] uses on this machine.
pub fn perf_counts_tracepoints() -> bool {
    Command::new("perf")
        .args([
            "stat",
            "-x",
            ",",
            "-e",
            EVENTS[0].0,
            "-e",
            EVENTS[3].0,
            "true",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

impl IoCounter {
    /// Starts counting for process `pid` and the threads it creates from now on.
    pub fn attach(pid: u32, out: &Path) -> Result<IoCounter, String> {
        let mut c = Command::new("perf");
        c.args(["stat", "-x", ",", "-o"]).arg(out);
        c.args(["-p", &pid.to_string()]);
        for (ev, filter) in EVENTS {
            c.args(["-e", ev, "--filter", filter]);
        }
        let child = c
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| format!("perf: {e}"))?;
        // perf has no "attached" signal; give it time to open its counters.
        std::thread::sleep(Duration::from_millis(500));
        Ok(IoCounter {
            child,
            out: out.to_path_buf(),
        })
    }

    pub fn finish(mut self) -> Result<HostOps, String> {
        // SAFETY: kill() on our own child's pid; perf prints its counts on SIGINT.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGINT) };
        let _ = self.child.wait();
        let s = std::fs::read_to_string(&self.out).map_err(|e| format!("perf output: {e}"))?;
        let counts: Vec<u64> = s
            .lines()
            .filter(|l| !l.starts_with('#') && l.contains(','))
            .map(|l| l.split(',').next().unwrap_or("").parse().unwrap_or(0))
            .collect();
        if counts.len() != EVENTS.len() {
            return Err(format!("perf output not understood: {s}"));
        }
        Ok(HostOps {
            writes: counts[0] + counts[3],
            flushes: counts[1] + counts[4],
            fallocates: counts[2] + counts[5],
        })
    }
}
