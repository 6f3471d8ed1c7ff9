//! `fvd resize` end to end: SIZE, +SIZE, -SIZE, --shrink, images held open, images made
//! without room to grow, raw files and block devices; data kept, the new range reads zeros,
//! `fvd check` clean after.

mod cli_support;

use cli_support::{dir, fails, ok};
use std::path::Path;

fn info(dir: &Path, image: &str) -> serde_json::Value {
    serde_json::from_str(&ok(dir, &["info", image, "--output", "json"])).unwrap()
}

/// Bytes of the image's virtual disk, read back through `fvd convert -O raw`.
fn contents(dir: &Path, image: &str) -> Vec<u8> {
    let out = dir.join("out.raw");
    let _ = std::fs::remove_file(&out);
    ok(dir, &["convert", image, "out.raw", "-O", "raw"]);
    std::fs::read(&out).unwrap()
}

#[test]
fn grow_and_shrink_keep_data_and_the_new_range_reads_zeros() {
    for layout in ["--compact", "--no-compact"] {
        let d = dir();
        let p = d.path();
        let data: Vec<u8> = (0..3u32 << 20).map(|i| (i % 251) as u8 | 1).collect();
        std::fs::write(p.join("src.raw"), &data).unwrap();
        ok(p, &["convert", "src.raw", "img.fvd", "-f", "raw"]);
        if layout == "--no-compact" {
            std::fs::remove_file(p.join("img.fvd")).unwrap();
            ok(
                p,
                &["convert", "src.raw", "img.fvd", "-f", "raw", "--no-compact"],
            );
        }
        // Room for at least four times the size by default (what whole metadata sectors hold).
        let max = info(p, "img.fvd")["fvd"]["max_size"].as_u64().unwrap();
        assert!(max >= 12 << 20, "{max}");

        ok(p, &["resize", "img.fvd", "8M"]);
        assert_eq!(info(p, "img.fvd")["virtual_size"], 8u64 << 20);
        ok(p, &["resize", "img.fvd", "+1M"]);
        assert_eq!(info(p, "img.fvd")["virtual_size"], 9u64 << 20);
        let c = contents(p, "img.fvd");
        assert_eq!(&c[..3 << 20], &data[..], "{layout}: data lost");
        assert!(
            c[3 << 20..].iter().all(|&b| b == 0),
            "{layout}: new range not zeros"
        );
        assert!(ok(p, &["check", "img.fvd"]).contains("No errors"));

        // Shrinking needs --shrink, and nothing allocated past the new end.
        let e = fails(p, &["resize", "img.fvd", "2M"]);
        assert!(e.contains("--shrink"), "{e}");
        let e = fails(p, &["resize", "img.fvd", "--shrink", "2M"]);
        assert!(e.contains("offset 2097152"), "{e}");
        assert_eq!(info(p, "img.fvd")["virtual_size"], 9u64 << 20);
        ok(p, &["resize", "img.fvd", "--shrink", "-6M"]);
        assert_eq!(info(p, "img.fvd")["virtual_size"], 3u64 << 20);
        assert_eq!(contents(p, "img.fvd"), data);
        assert!(ok(p, &["check", "img.fvd"]).contains("No errors"));

        // Past the reserved room: a clear error naming --max-size.
        let e = fails(p, &["resize", "img.fvd", &(max + 512).to_string()]);
        assert!(e.contains("--max-size"), "{e}");
    }
}

#[test]
fn max_size_sets_the_room_and_old_images_still_resize_within_theirs() {
    let d = dir();
    let p = d.path();
    ok(
        p,
        &["create", "big.fvd", "--size", "1M", "--max-size", "4G"],
    );
    ok(p, &["resize", "big.fvd", "4G"]);
    assert_eq!(info(p, "big.fvd")["virtual_size"], 4u64 << 30);
    assert!(ok(p, &["check", "big.fvd"]).contains("No errors"));
    let e = fails(
        p,
        &["create", "bad.fvd", "--size", "2M", "--max-size", "1M"],
    );
    assert!(e.contains("maximum size"), "{e}");

    // As images made before --max-size: metadata for exactly the size. One table sector
    // describes 1020 chunks of 1 MiB.
    ok(
        p,
        &["create", "old.fvd", "--size", "1M", "--max-size", "1M"],
    );
    assert_eq!(info(p, "old.fvd")["fvd"]["max_size"], 1020u64 << 20);
    ok(p, &["resize", "old.fvd", "1020M"]);
    let e = fails(p, &["resize", "old.fvd", "1021M"]);
    assert!(e.contains("1069547520 bytes"), "{e}");
}

#[test]
fn an_image_held_open_is_refused() {
    use fvd::io::executor::block_on;
    use fvd::io::sync::SyncIo;
    let d = dir();
    let p = d.path();
    ok(p, &["create", "img.fvd", "--size", "4M"]);
    // Held open read-write, as a running server holds it.
    let img = block_on(fvd::engine::open_image(&SyncIo, &p.join("img.fvd"), false)).unwrap();
    let e = fails(p, &["resize", "img.fvd", "8M"]);
    assert!(e.contains("in use"), "{e}");
    drop(img);
    assert_eq!(info(p, "img.fvd")["virtual_size"], 4u64 << 20);
}

#[test]
fn raw_files_are_resized_and_block_devices_refused() {
    let d = dir();
    let p = d.path();
    std::fs::write(p.join("disk.raw"), vec![7u8; 1 << 20]).unwrap();
    ok(p, &["resize", "-f", "raw", "disk.raw", "+1M"]);
    let c = std::fs::read(p.join("disk.raw")).unwrap();
    assert_eq!(c.len(), 2 << 20);
    assert!(c[..1 << 20].iter().all(|&b| b == 7) && c[1 << 20..].iter().all(|&b| b == 0));
    let e = fails(p, &["resize", "-f", "raw", "disk.raw", "1M"]);
    assert!(e.contains("--shrink"), "{e}");
    ok(p, &["resize", "-f", "raw", "disk.raw", "--shrink", "1M"]);
    assert_eq!(
        std::fs::metadata(p.join("disk.raw")).unwrap().len(),
        1 << 20
    );
    let e = fails(p, &["resize", "-f", "raw", "/dev/null", "1M"]);
    assert!(!e.is_empty());
    let e = fails(p, &["resize", "disk.raw", "12Q"]);
    assert!(e.contains("12Q"), "{e}");
}
