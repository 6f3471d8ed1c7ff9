//! The `fvd` tool end to end: create/info/check/map/convert, corrupt images and bad arguments.

use std::path::Path;
use std::process::{Command, Output};

fn fvd(dir: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_fvd"))
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap()
}

fn ok(dir: &Path, args: &[&str]) -> String {
    let o = fvd(dir, args);
    assert!(
        o.status.success(),
        "fvd {args:?} failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8(o.stdout).unwrap()
}

/// Fails with exactly one line on stderr, and returns it.
fn fails(dir: &Path, args: &[&str]) -> String {
    let o = fvd(dir, args);
    assert!(!o.status.success(), "fvd {args:?} should fail");
    let err = String::from_utf8(o.stderr).unwrap();
    assert_eq!(
        err.trim_end().lines().count(),
        1,
        "want one error line, got: {err}"
    );
    assert!(err.starts_with("fvd: "), "{err}");
    err
}

fn dir() -> tempfile::TempDir {
    tempfile::tempdir_in("/var/tmp").unwrap()
}

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
