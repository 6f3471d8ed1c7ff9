//! Storage features through `fvd serve` with the libblkio client: copy-on-read, prefetching, a
//! base image on NBD (real qemu-nbd), and thin provisioning on a loop device that the server
//! grows while the client keeps writing and verifying.

mod serve_support;

use serve_support::client::{connect, Client, Req};
use serve_support::{dir, fvd, ServerProc};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const MIB: usize = 1 << 20;

fn run(dir: &Path, args: &[&str]) -> String {
    let o = fvd().args(args).current_dir(dir).output().unwrap();
    assert!(
        o.status.success(),
        "fvd {args:?}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8(o.stdout).unwrap()
}

fn info(dir: &Path, image: &str) -> serde_json::Value {
    serde_json::from_str(&run(dir, &["info", "-U", image, "--output", "json"])).unwrap()
}

fn base_bytes_remaining(dir: &Path, image: &str) -> u64 {
    info(dir, image)["fvd"]["base"]["bytes_remaining"]
        .as_u64()
        .unwrap()
}

/// Reads `len` bytes in pieces that fit the client's buffer.
fn read_all(c: &mut Client, off: usize, len: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(len);
    for pos in (off..off + len).step_by(2 * MIB) {
        out.extend(c.read(0, pos as u64, (2 * MIB).min(off + len - pos)));
    }
    out
}

fn pattern(seed: u8, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| {
            (i as u8)
                .wrapping_mul(31)
                .wrapping_add(seed)
                .wrapping_add((i >> 9) as u8)
        })
        .collect()
}

/// Polls `cond` until it holds; the deadline only guards against a hang, it measures nothing.
fn eventually(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for: {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn copy_on_read_through_the_server() {
    let d = dir();
    let p = d.path();
    let base = pattern(1, 8 * MIB);
    std::fs::write(p.join("base.raw"), &base).unwrap();
    run(p, &["create", "vm.fvd", "-b", "base.raw", "--copy-on-read"]);
    let sock = p.join("s.sock");
    let srv = ServerProc::start(&p.join("vm.fvd"), &sock, &["--num-queues", "1"]);
    let mut c = connect(&sock, 1, false).unwrap();
    assert_eq!(c.read(0, 0, 2 * MIB), base[..2 * MIB]);
    // The copies run after the reads completed; the image soon holds those 2 MiB. `fvd info`
    // reads the durable state, so the guest flushes while we wait.
    eventually("copy-on-read to finish", || {
        assert_eq!(c.run(0, Req::Flush, 0, 0, 0), 0);
        base_bytes_remaining(p, "vm.fvd") == 6 * MIB as u64
    });
    // Change the base behind the image's back: copied ranges must still read the old data.
    std::fs::write(p.join("base.raw"), vec![0xAAu8; 8 * MIB]).unwrap();
    assert_eq!(c.read(0, 0, 2 * MIB), base[..2 * MIB]);
    assert_eq!(c.read(0, (4 * MIB) as u64, 4096), vec![0xAAu8; 4096]);
    drop(c);
    assert!(srv.terminate().success());
}

#[test]
fn prefetch_copies_the_base_while_the_guest_works_then_the_base_can_be_dropped() {
    let d = dir();
    let p = d.path();
    let base = pattern(2, 16 * MIB);
    std::fs::write(p.join("base.raw"), &base).unwrap();
    run(p, &["create", "vm.fvd", "-b", "base.raw"]);
    let sock = p.join("s.sock");
    let srv = ServerProc::start(
        &p.join("vm.fvd"),
        &sock,
        &[
            "--num-queues",
            "1",
            "--prefetch",
            "--prefetch-delay",
            "0",
            "--prefetch-rate",
            "64M",
        ],
    );
    let mut c = connect(&sock, 1, false).unwrap();
    // Guest writes while prefetch runs: they must win over the base data prefetch copies.
    let mine = pattern(9, MIB);
    c.write(0, (5 * MIB) as u64 + 512, &mine);
    eventually("prefetch to finish", || {
        base_bytes_remaining(p, "vm.fvd") == 0
    });
    let mut want = base.clone();
    want[5 * MIB + 512..6 * MIB + 512].copy_from_slice(&mine);
    assert_eq!(read_all(&mut c, 0, 16 * MIB), want);
    drop(c);
    assert!(srv.terminate().success());
    run(p, &["rebase", "--drop-base", "vm.fvd"]);
    std::fs::remove_file(p.join("base.raw")).unwrap();
    let srv = ServerProc::start(&p.join("vm.fvd"), &sock, &["--num-queues", "1"]);
    let mut c = connect(&sock, 1, false).unwrap();
    assert_eq!(read_all(&mut c, 0, 16 * MIB), want);
    drop(c);
    assert!(srv.terminate().success());
}

struct QemuNbd(Child);

impl Drop for QemuNbd {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn base_image_on_nbd_through_the_server() {
    let d = dir();
    let p = d.path();
    let base = pattern(3, 4 * MIB);
    std::fs::write(p.join("base.raw"), &base).unwrap();
    let nbd_sock = p.join("nbd.sock");
    let _nbd = QemuNbd(
        Command::new("qemu-nbd")
            .args([
                "--read-only",
                "--persistent",
                "--shared=8",
                "--format=raw",
                "--export-name=base",
            ])
            .arg(format!("--socket={}", nbd_sock.display()))
            .arg(p.join("base.raw"))
            .stdout(Stdio::null())
            .spawn()
            .expect("qemu-nbd must be installed (integration/setup-host.sh)"),
    );
    eventually("qemu-nbd to listen", || nbd_sock.exists());
    let uri = format!("nbd+unix:///base?socket={}", nbd_sock.display());
    run(p, &["create", "vm.fvd", "-b", &uri, "--copy-on-read"]);
    let sock = p.join("s.sock");
    let srv = ServerProc::start(&p.join("vm.fvd"), &sock, &["--num-queues", "2"]);
    let mut c = connect(&sock, 2, false).unwrap();
    assert_eq!(read_all(&mut c, 0, 4 * MIB), base);
    let mine = pattern(7, 64 << 10);
    c.write(1, 4096, &mine);
    let mut want = base.clone();
    want[4096..4096 + mine.len()].copy_from_slice(&mine);
    assert_eq!(read_all(&mut c, 0, 4 * MIB), want);
    drop(c);
    assert!(srv.terminate().success());
    let srv = ServerProc::start(&p.join("vm.fvd"), &sock, &["--num-queues", "1"]);
    let mut c = connect(&sock, 1, false).unwrap();
    assert_eq!(read_all(&mut c, 0, 4 * MIB), want);
    drop(c);
    assert!(srv.terminate().success());
}

#[test]
fn thin_image_on_a_loop_device_grows_while_the_client_writes() {
    let d = dir();
    let p = d.path();
    let backing = p.join("lv.img");
    std::fs::File::create(&backing)
        .unwrap()
        .set_len(8 * MIB as u64)
        .unwrap();
    let Some(dev) = serve_support::Loop::attach(&backing) else {
        return;
    };
    let devs = dev.0.to_str().unwrap().to_string();
    run(
        p,
        &["create", &devs, "--size", "1G", "--journal-size", "1M"],
    );
    // The "LV resize": grow the backing file, then tell the loop driver.
    let grow = format!(
        "truncate -s +{{unit_bytes}} {} && losetup -c {{device}}",
        backing.display()
    );
    let sock = p.join("s.sock");
    let srv = ServerProc::start(&dev.0, &sock, &serve_support::thin_grow_args(&grow));
    let mut c = connect(&sock, 1, false).unwrap();
    // 48 MiB of distinct data, six times the initial device, verified as it goes.
    for i in 0..48u64 {
        let data = pattern(i as u8, MIB);
        c.write(0, i * 7 * MIB as u64, &data);
        assert_eq!(c.read(0, i * 7 * MIB as u64, MIB), data, "chunk {i}");
    }
    drop(c);
    assert!(srv.terminate().success());
    let grown = std::fs::metadata(&backing).unwrap().len();
    assert!(grown >= 48 * MIB as u64, "device grew to {grown} bytes");
    let srv = ServerProc::start(&dev.0, &sock, &["--num-queues", "1"]);
    let mut c = connect(&sock, 1, false).unwrap();
    for i in 0..48u64 {
        assert_eq!(
            c.read(0, i * 7 * MIB as u64, MIB),
            pattern(i as u8, MIB),
            "chunk {i} after restart"
        );
    }
    drop(c);
    assert!(srv.terminate().success());
    assert!(run(p, &["check", &devs]).contains("No errors"));
}
