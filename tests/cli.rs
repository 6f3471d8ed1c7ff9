//! The `fvd` tool end to end: create/info/check/map/convert, corrupt images and bad arguments.

mod cli_support;

use cli_support::{dir, fails, fvd, ok};
use std::path::Path;
use std::process::{Command, Output};

#[test]
fn create_info_map_check_convert_round_trip() {
    let d = dir();
    let p = d.path();
    let base: Vec<u8> = (0..4u32 << 20).map(|i| (i % 253) as u8).collect();
    std::fs::write(p.join("base.raw"), &base).unwrap();
    ok(p, &["create", "img.fvd", "-b", "base.raw"]);
    let info: serde_json::Value =
        serde_json::from_str(&ok(p, &["info", "img.fvd", "--output", "json"])).unwrap();
    assert_eq!(info["format"], "fvd");
    assert_eq!(info["virtual_size"], 4 << 20);
    assert_eq!(info["fvd"]["base"]["format"], "raw");
    assert_eq!(info["fvd"]["base"]["bytes_remaining"], 4 << 20);
    assert_eq!(info["fvd"]["compact"], true);
    let map: serde_json::Value =
        serde_json::from_str(&ok(p, &["map", "img.fvd", "--output", "json"])).unwrap();
    assert_eq!(map[0]["location"], "base");
    assert_eq!(map[0]["length"], 4 << 20);
    assert!(ok(p, &["check", "img.fvd"]).contains("No errors"));
    // Flatten through the chain to raw, and to a raw-layout FVD, then back to raw.
    ok(p, &["convert", "img.fvd", "flat.raw", "-O", "raw", "-q"]);
    assert_eq!(std::fs::read(p.join("flat.raw")).unwrap(), base);
    ok(
        p,
        &["convert", "flat.raw", "copy.fvd", "--no-compact", "-q"],
    );
    let info: serde_json::Value =
        serde_json::from_str(&ok(p, &["info", "copy.fvd", "--output", "json"])).unwrap();
    assert_eq!(info["fvd"]["compact"], false);
    assert_eq!(info["fvd"]["present_bytes"], 4 << 20);
    ok(p, &["convert", "copy.fvd", "back.raw", "-O", "raw", "-q"]);
    assert_eq!(std::fs::read(p.join("back.raw")).unwrap(), base);
    // Zero ranges stay unallocated in a compact output.
    std::fs::write(p.join("zeros.raw"), vec![0u8; 8 << 20]).unwrap();
    ok(p, &["convert", "zeros.raw", "z.fvd", "-q"]);
    let info: serde_json::Value =
        serde_json::from_str(&ok(p, &["info", "z.fvd", "--output", "json"])).unwrap();
    assert_eq!(info["fvd"]["allocated_chunks"], 0);
}

#[test]
fn bad_arguments_give_one_line_and_change_nothing() {
    let d = dir();
    let p = d.path();
    ok(p, &["create", "keep.fvd", "--size", "1M"]);
    let before = std::fs::read(p.join("keep.fvd")).unwrap();
    assert!(fails(p, &["create", "keep.fvd", "--size", "12Q"]).contains("invalid size suffix"));
    assert!(fails(
        p,
        &["create", "keep.fvd", "--size", "1M", "--block-size", "3K"]
    )
    .contains("block size"));
    assert!(fails(p, &["create", "keep.fvd", "--size", "1000"]).contains("multiple of 512"));
    assert!(fails(p, &["create", "keep.fvd", "-b", "missing.raw"]).contains("missing.raw"));
    assert!(fails(p, &["create", "new.fvd"]).contains("--size is required"));
    assert_eq!(
        std::fs::read(p.join("keep.fvd")).unwrap(),
        before,
        "a failed create modified the image"
    );
    assert!(!p.join("new.fvd").exists());
    fails(p, &["info", "nothing-here.fvd"]);
    fails(p, &["frobnicate"]);
    fails(p, &["map", "keep.fvd", "--output", "yaml"]);
    std::fs::write(p.join("plain.raw"), vec![1u8; 4096]).unwrap();
    assert!(fails(p, &["check", "plain.raw"]).contains("not an FVD image"));
    assert!(fails(p, &["convert", "keep.fvd", "keep.fvd"]).contains("same file"));
}

#[test]
fn corrupt_images_are_reported_and_repaired() {
    let d = dir();
    let p = d.path();
    ok(
        p,
        &["create", "img.fvd", "--size", "8M", "--chunk-size", "1M"],
    );
    ok(p, &["convert", "img.fvd", "unused.raw", "-O", "raw", "-q"]);
    // Header says: metadata copy 0 at 8 KiB; bitmap sector 0, then table sectors.
    let path = p.join("img.fvd");
    let mut raw = std::fs::read(&path).unwrap();
    // Mark block 0 present in the bitmap of the active copy (chunk 0 is unallocated) and
    // re-seal the sector so only the semantic check can catch it.
    let sec = &mut raw[8192..8192 + 4096];
    sec[0] |= 1;
    let crc = crc32c::crc32c(&sec[..4092]);
    sec[4092..].copy_from_slice(&crc.to_le_bytes());
    std::fs::write(&path, &raw).unwrap();
    let o = fvd(p, &["check", "img.fvd"]);
    assert_eq!(o.status.code(), Some(2), "corruption must exit 2");
    assert!(String::from_utf8_lossy(&o.stdout).contains("chunk 0 has blocks marked present"));
    let err = fails(p, &["info", "img.fvd"]);
    assert!(err.contains("fvd check --repair"), "{err}");
    ok(p, &["check", "--repair", "img.fvd"]);
    assert!(ok(p, &["check", "img.fvd"]).contains("No errors"));
    // A flipped bit without re-sealing is a checksum error in the active copy.
    let report: serde_json::Value =
        serde_json::from_str(&ok(p, &["check", "img.fvd", "--output", "json"])).unwrap();
    let active = report["active_copy"].as_u64().unwrap() as usize;
    // 8 MiB image: one bitmap and one table sector per copy, copies at 8 KiB and 16 KiB.
    let mut raw = std::fs::read(&path).unwrap();
    raw[8192 + active * 8192 + 10] ^= 0x40;
    std::fs::write(&path, &raw).unwrap();
    let o = fvd(p, &["check", "img.fvd"]);
    assert_eq!(o.status.code(), Some(2), "corruption must exit 2");
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(out.contains("checksum mismatch"), "{out}");
}

#[test]
fn force_share_inspects_an_image_that_is_open_for_writing() {
    use fvd::io::executor::block_on;
    use fvd::io::sync::SyncIo;
    let d = dir();
    let p = d.path();
    ok(p, &["create", "img.fvd", "--size", "4M"]);
    // Held open read-write, as a running server holds it.
    let img = block_on(fvd::engine::open_image(&SyncIo, &p.join("img.fvd"), false)).unwrap();
    assert!(fails(p, &["info", "img.fvd"]).contains("in use"));
    let info: serde_json::Value =
        serde_json::from_str(&ok(p, &["info", "-U", "img.fvd", "--output", "json"])).unwrap();
    assert_eq!(info["virtual_size"], 4 << 20);
    assert!(ok(p, &["map", "-U", "img.fvd"]).contains("zero"));
    assert!(ok(p, &["check", "-U", "img.fvd"]).contains("No errors"));
    drop(img);
}

#[test]
fn every_tool_takes_the_format_and_checks_it() {
    let d = dir();
    let p = d.path();
    ok(p, &["create", "img.fvd", "--size", "4M"]);
    // A raw file holding an FVD image's bytes past offset 0: raw by any probe.
    let data: Vec<u8> = (0..1u32 << 20).map(|i| (i % 251) as u8 + 1).collect();
    std::fs::write(p.join("disk.raw"), &data).unwrap();

    let info = |args: &[&str]| -> serde_json::Value {
        serde_json::from_str(&ok(p, &[&["info", "--output", "json"], args].concat())).unwrap()
    };
    assert_eq!(info(&["img.fvd"])["format"], "fvd");
    assert_eq!(info(&["-f", "fvd", "img.fvd"])["format"], "fvd");
    assert_eq!(info(&["--format", "raw", "img.fvd"])["format"], "raw");
    assert_eq!(info(&["-f", "raw", "disk.raw"])["format"], "raw");
    for args in [
        &["info", "-f", "fvd", "disk.raw"][..],
        &["check", "-f", "fvd", "disk.raw"],
        &["map", "-f", "fvd", "disk.raw"],
        &["amend", "-f", "fvd", "disk.raw", "--prefetch", "on"],
        &["stream", "-f", "fvd", "disk.raw"],
        &["rebase", "-f", "fvd", "disk.raw", "--drop-base"],
        &["convert", "-f", "fvd", "disk.raw", "out.raw", "-O", "raw"],
    ] {
        let err = fails(p, args);
        assert!(err.contains("not an FVD image"), "{args:?}: {err}");
    }
    for cmd in [
        &["check", "-f", "raw", "img.fvd"][..],
        &["map", "-f", "raw", "img.fvd"],
        &["amend", "-f", "raw", "img.fvd", "--prefetch", "on"],
        &["stream", "-f", "raw", "img.fvd"],
        &["rebase", "-f", "raw", "img.fvd", "--drop-base"],
    ] {
        let err = fails(p, cmd);
        assert!(err.contains("FVD images only"), "{cmd:?}: {err}");
    }
    ok(p, &["check", "-f", "fvd", "img.fvd"]);
    ok(p, &["map", "-f", "fvd", "img.fvd"]);
    ok(
        p,
        &["amend", "--format", "fvd", "img.fvd", "--prefetch", "on"],
    );
    // convert -f raw copies the bytes of an FVD file as they are; probed, it reads the disk.
    ok(
        p,
        &[
            "convert",
            "-f",
            "raw",
            "img.fvd",
            "bytes.raw",
            "-O",
            "raw",
            "-q",
        ],
    );
    assert_eq!(
        std::fs::read(p.join("bytes.raw")).unwrap(),
        std::fs::read(p.join("img.fvd")).unwrap()
    );
    ok(p, &["convert", "img.fvd", "disk2.raw", "-O", "raw", "-q"]);
    assert_eq!(
        std::fs::read(p.join("disk2.raw")).unwrap(),
        vec![0u8; 4 << 20]
    );
    ok(p, &["convert", "-f", "raw", "disk.raw", "d.fvd", "-q"]);
    ok(
        p,
        &["convert", "d.fvd", "-f", "fvd", "d.raw", "-O", "raw", "-q"],
    );
    assert_eq!(std::fs::read(p.join("d.raw")).unwrap(), data);
    assert!(fails(p, &["info", "-f", "qcow2", "img.fvd"]).contains("qcow2"));
}

#[test]
fn a_short_file_with_the_magic_is_a_truncated_image() {
    let d = dir();
    let p = d.path();
    let mut v = vec![0u8; 4096];
    v[..8].copy_from_slice(b"FVDIMAGE");
    std::fs::write(p.join("short.img"), &v).unwrap();
    for cmd in ["info", "check", "map", "stream"] {
        let err = fails(p, &[cmd, "short.img"]);
        assert!(err.contains("truncated FVD image"), "{cmd}: {err}");
    }
    let err = fails(p, &["convert", "short.img", "o.fvd", "-q"]);
    assert!(err.contains("truncated FVD image"), "{err}");
    let err = fails(p, &["create", "top.fvd", "-b", "short.img"]);
    assert!(err.contains("truncated FVD image"), "{err}");
    // Named raw, it is an ordinary 4 KiB disk.
    let info: serde_json::Value = serde_json::from_str(&ok(
        p,
        &["info", "-f", "raw", "short.img", "--output", "json"],
    ))
    .unwrap();
    assert_eq!(info["virtual_size"], 4096);
    ok(p, &["create", "top.fvd", "-b", "short.img", "-F", "raw"]);
}

#[test]
fn create_takes_an_fvd_base_only_when_named() {
    let d = dir();
    let p = d.path();
    ok(p, &["create", "base.fvd", "--size", "2M"]);
    let err = fails(p, &["create", "top.fvd", "-b", "base.fvd"]);
    assert!(err.contains("-F fvd"), "{err}");
    assert!(!p.join("top.fvd").exists());
    ok(p, &["create", "top.fvd", "-b", "base.fvd", "-F", "fvd"]);
    let info: serde_json::Value =
        serde_json::from_str(&ok(p, &["info", "top.fvd", "--output", "json"])).unwrap();
    assert_eq!(info["fvd"]["base"]["format"], "fvd");
    // Named raw, its bytes are the base (the header is never followed).
    ok(p, &["create", "top2.fvd", "-b", "base.fvd", "-F", "raw"]);
    let info: serde_json::Value =
        serde_json::from_str(&ok(p, &["info", "top2.fvd", "--output", "json"])).unwrap();
    assert_eq!(info["fvd"]["base"]["format"], "raw");
    // A raw base is still probed and taken as raw without -F.
    std::fs::write(p.join("b.raw"), vec![3u8; 1 << 20]).unwrap();
    ok(p, &["create", "top3.fvd", "-b", "b.raw"]);
}

/// Runs `fvd ARGS` with standard output a pipe whose reader has gone (`fvd info x | head -c0`).
fn with_closed_stdout(dir: &Path, args: &[&str]) -> Output {
    use std::os::fd::{FromRawFd, OwnedFd};
    let mut fds = [0; 2];
    // SAFETY: pipe2 writes two new descriptors into the array.
    assert_eq!(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) }, 0);
    // SAFETY: both descriptors were just created and are owned by nobody else.
    let (reader, writer) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    drop(reader);
    Command::new(env!("CARGO_BIN_EXE_fvd"))
        .args(args)
        .current_dir(dir)
        .stdout(std::process::Stdio::from(writer))
        .stderr(std::process::Stdio::piped())
        .output()
        .unwrap()
}

#[test]
fn a_closed_stdout_ends_every_tool_quietly() {
    let d = dir();
    let p = d.path();
    ok(p, &["create", "img.fvd", "--size", "4M"]);
    for args in [
        &["info", "img.fvd"][..],
        &["info", "img.fvd", "--output", "json"],
        &["map", "img.fvd"],
        &["map", "img.fvd", "--output", "json"],
        &["check", "img.fvd"],
        &["check", "img.fvd", "--output", "json"],
        &["create", "new.fvd", "--size", "1M"],
        &["--help"],
    ] {
        let o = with_closed_stdout(p, args);
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(!err.contains("panicked"), "{args:?}: {err}");
        assert_ne!(o.status.code(), Some(101), "{args:?}");
        if args[0] != "--help" {
            assert_eq!(o.status.code(), Some(141), "{args:?}: {err}");
            assert!(err.is_empty(), "{args:?}: {err}");
        }
    }
    // The work was done before the report: the image exists and is sound.
    assert!(ok(p, &["check", "new.fvd"]).contains("No errors"));
}

#[test]
fn serve_waits_for_the_lock_a_killed_predecessor_still_holds() {
    use fvd::io::executor::block_on;
    use fvd::io::sync::SyncIo;
    use std::io::{BufRead, BufReader};
    use std::process::Stdio;
    use std::sync::mpsc;
    use std::time::Duration;
    let d = dir();
    let p = d.path();
    ok(p, &["create", "img.fvd", "--size", "4M"]);
    // What a killed server leaves while the kernel completes its I/O in flight: the image's
    // lock, held by an open file that is not ours.
    let holder = block_on(fvd::engine::open_image(&SyncIo, &p.join("img.fvd"), false)).unwrap();
    let e = fails(
        p,
        &["serve", "img.fvd", "--socket", "s.sock", "--lock-wait", "0"],
    );
    assert!(e.contains("in use by another process (locked)"), "{e}");

    let mut server = Command::new(env!("CARGO_BIN_EXE_fvd"))
        .args([
            "serve",
            "img.fvd",
            "--socket",
            "s.sock",
            "--lock-wait",
            "600",
        ])
        .current_dir(p)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let lines = |r: Box<dyn std::io::Read + Send>| {
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for l in BufReader::new(r).lines().map_while(Result::ok) {
                let _ = tx.send(l);
            }
        });
        rx
    };
    let out = lines(Box::new(server.stdout.take().unwrap()));
    let err = lines(Box::new(server.stderr.take().unwrap()));
    let said = err
        .recv_timeout(Duration::from_secs(60))
        .expect("a line on stderr");
    assert!(
        said.contains("is locked by another process; waiting up to 600.0 s"),
        "{said}"
    );
    assert!(out.try_recv().is_err(), "serving before the lock was free");
    drop(holder);
    let serving = out.recv_timeout(Duration::from_secs(60)).expect("serving");
    assert!(serving.starts_with("fvd: serving"), "{serving}");
    // SAFETY: kill with the pid of a child we have not reaped.
    unsafe { libc::kill(server.id() as i32, libc::SIGTERM) };
    assert!(server.wait().unwrap().success());
    ok(p, &["check", "img.fvd"]);
}
