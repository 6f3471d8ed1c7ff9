//! `fvd check` and `fvd check --repair` on damaged images: qemu-img's exit codes (0 clean, 1 the
//! check could not be done, 2 corruption, 3 only leaks), repair from the other metadata copy, and
//! "Lost:" reports that name what a repair could not recover.

use fvd::engine::Image;
use fvd::format::{Header, SECTOR};
use fvd::io::executor::block_on;
use fvd::io::sync::SyncIo;
use fvd::io::Buf;
use fvd::units::{ChunkIndex, VirtOffset};
use std::path::Path;
mod serve_support;
use serve_support::fvd_in as fvd;

/// Runs `fvd check [args] img.fvd` and returns its exit code and stdout.
fn check(dir: &Path, args: &[&str]) -> (i32, String) {
    let mut all = vec!["check"];
    all.extend_from_slice(args);
    all.push("img.fvd");
    let o = fvd(dir, &all);
    (
        o.status.code().unwrap(),
        String::from_utf8_lossy(&o.stdout).into_owned() + &String::from_utf8_lossy(&o.stderr),
    )
}

fn dir() -> tempfile::TempDir {
    tempfile::tempdir_in("/var/tmp").unwrap()
}

/// A directory holding a new image `img.fvd` made by `fvd create` with `args`, and its path.
fn created(args: &[&str]) -> (tempfile::TempDir, std::path::PathBuf) {
    let d = dir();
    let o = fvd(d.path(), &[&["create", "img.fvd"], args].concat());
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let img = d.path().join("img.fvd");
    (d, img)
}

/// A directory holding a new 8 MiB compact image `img.fvd`, and the image's path.
fn new_image() -> (tempfile::TempDir, std::path::PathBuf) {
    created(&["--size", "8M"])
}

fn header(path: &Path) -> Header {
    let raw = std::fs::read(path).unwrap();
    fvd::format::header::pick_header(&raw[..SECTOR], &raw[SECTOR..2 * SECTOR]).unwrap()
}

fn pattern(seed: u8, len: usize) -> Vec<u8> {
    (0..len).map(|i| (i as u8).wrapping_mul(7) ^ seed).collect()
}

/// Writes `data` at each offset, flushes and closes the image cleanly.
fn write_and_close(path: &Path, writes: &[(u64, &[u8])]) {
    let img: Image<SyncIo> = block_on(fvd::engine::open_image(&SyncIo, path, false)).unwrap();
    for (off, data) in writes {
        let b = Buf::alloc(data.len());
        b.copy_from_slice(0, data);
        block_on(img.write(&SyncIo, VirtOffset(*off), b)).unwrap();
    }
    block_on(img.close(&SyncIo)).unwrap();
}

/// The image's virtual contents, read through `fvd convert -O raw`.
fn contents(dir: &Path) -> Vec<u8> {
    let o = fvd(dir, &["convert", "-O", "raw", "-q", "img.fvd", "out.raw"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let v = std::fs::read(dir.join("out.raw")).unwrap();
    std::fs::remove_file(dir.join("out.raw")).unwrap();
    v
}

fn edit(path: &Path, f: impl FnOnce(&mut Vec<u8>)) {
    let mut raw = std::fs::read(path).unwrap();
    f(&mut raw);
    std::fs::write(path, &raw).unwrap();
}

/// Recomputes the crc32c of the 4 KiB sector at `off` (a damaged but well-formed sector).
fn reseal(raw: &mut [u8], off: usize) {
    let crc = crc32c::crc32c(&raw[off..off + SECTOR - 4]);
    raw[off + SECTOR - 4..off + SECTOR].copy_from_slice(&crc.to_le_bytes());
}

/// Byte offset of the first table sector of metadata copy `copy`.
fn table_sector(h: &Header, copy: u32) -> usize {
    (h.meta_offset[copy as usize] + h.bitmap_sectors * SECTOR as u64) as usize
}

/// Sets table entry `chunk` (of the first table sector) of the active copy to `phys`, resealed:
/// a well-formed but wrong mapping.
fn map_chunk(img: &Path, chunk: usize, phys: u32) {
    let h = header(img);
    let t = table_sector(&h, h.active_meta);
    edit(img, |raw| {
        raw[t + 4 * chunk..t + 4 * chunk + 4].copy_from_slice(&phys.to_le_bytes());
        reseal(raw, t);
    });
}

#[test]
fn exit_codes_follow_qemu_img() {
    let (d, img) = new_image();
    let p = d.path();
    write_and_close(&img, &[(0, &pattern(1, 65536))]);
    assert_eq!(check(p, &[]).0, 0);

    // 1: the check cannot be done at all.
    assert_eq!(fvd(p, &["check", "missing.fvd"]).status.code(), Some(1));
    std::fs::write(p.join("plain.raw"), vec![1u8; 16384]).unwrap();
    assert_eq!(fvd(p, &["check", "plain.raw"]).status.code(), Some(1));

    // 2: a damaged sector of the active metadata copy (the open that check used to do refused it,
    // and check exited 1), reported as a problem, also in JSON.
    let clean = std::fs::read(&img).unwrap();
    let h = header(&img);
    let active = h.meta_offset[h.active_meta as usize] as usize;
    edit(&img, |raw| raw[active + 10] ^= 0x40);
    let (code, out) = check(p, &[]);
    assert_eq!(code, 2, "{out}");
    assert!(out.contains("metadata sector 0 of copy"), "{out}");
    let (code, out) = check(p, &["--output", "json"]);
    assert_eq!(code, 2, "{out}");
    let j: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(j["corruptions"], 1);
    assert_eq!(j["problems"][0]["kind"], "metadata_sector");

    // 2: both header slots damaged (the magic intact, so it is still an FVD image).
    std::fs::write(&img, &clean).unwrap();
    edit(&img, |raw| {
        raw[100] ^= 1;
        raw[SECTOR + 100] ^= 1;
    });
    let (code, out) = check(p, &[]);
    assert_eq!(code, 2, "{out}");
    assert!(out.contains("no valid header slot"), "{out}");

    // 3: a leak, a chunk mapped with none of its blocks present (check said 0).
    std::fs::write(&img, &clean).unwrap();
    map_chunk(&img, 1, 7);
    let (code, out) = check(p, &[]);
    assert_eq!(code, 3, "{out}");
    assert!(out.contains("leak"), "{out}");
    let (code, out) = check(p, &["--repair"]);
    assert_eq!(code, 0, "{out}");
    assert_eq!(check(p, &[]).0, 0);
    assert_eq!(&contents(p)[..65536], &pattern(1, 65536)[..]);
}

#[test]
fn repair_takes_a_damaged_sector_from_the_other_copy() {
    let (d, img) = new_image();
    let p = d.path();
    let a = pattern(3, 3 << 16);
    write_and_close(&img, &[(1 << 20, &a)]);
    // A second clean open and close writes the full state to the other copy as well.
    write_and_close(&img, &[]);
    let want = contents(p);
    let h = header(&img);
    let (_, out) = check(p, &["--output", "json"]);
    let before: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(before["generation"], h.generation);
    let active = h.meta_offset[h.active_meta as usize] as usize;
    // One bad byte in the active bitmap sector and one in the active table sector.
    edit(&img, |raw| {
        raw[active + 20] ^= 0x10;
        raw[active + SECTOR + 20] ^= 0x10;
        // And the other header slot (the one in force must stay: it names the active copy).
        raw[SECTOR - h.slot_offset() as usize + 200] ^= 1;
    });
    assert_eq!(check(p, &[]).0, 2);
    let (code, out) = check(p, &["--repair"]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("Possibly lost: bytes 0x0..0x800000"), "{out}");
    let (code, out) = check(p, &["--output", "json"]);
    assert_eq!(code, 0, "{out}");
    let j: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(j["header_slots_valid"], serde_json::json!([true, true]));
    assert_eq!(j["inactive_copy_valid"], true);
    // Repair wrote both header slots, each a generation on, and left the image clean.
    assert_eq!(j["generation"], h.generation + 2, "{out}");
    assert_eq!(j["clean_shutdown"], true, "{out}");
    // The 3 blocks written, in one chunk.
    assert_eq!(
        (&j["allocated_chunks"], &j["present_blocks"]),
        (&1.into(), &3.into()),
        "{out}"
    );
    assert_eq!(
        contents(p),
        want,
        "the other copy's sectors hold the same data"
    );
}

/// A damaged sector of the inactive copy is no problem (the next checkpoint rewrites that copy),
/// but check says the copy is not valid: a repair could not take sectors from it.
#[test]
fn a_damaged_inactive_copy_is_reported_not_valid() {
    let (d, img) = new_image();
    let p = d.path();
    write_and_close(&img, &[(0, &pattern(4, 65536))]);
    let h = header(&img);
    let inactive = h.meta_offset[1 - h.active_meta as usize] as usize;
    edit(&img, |raw| raw[inactive + SECTOR + 20] ^= 0x10);
    let (code, out) = check(p, &["--output", "json"]);
    assert_eq!(code, 0, "{out}");
    let j: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(j["inactive_copy_valid"], false, "{out}");
}

/// Bitmap sector 1 and table sector 1 damaged in both copies (4 GiB in 64 KiB blocks and
/// 1 MiB chunks: 32640 blocks and 1020 chunks a sector): exactly their ranges are lost.
#[test]
fn metadata_sectors_lost_in_both_copies_lose_their_ranges() {
    let (d, img) = created(&["--size", "4G"]);
    let p = d.path();
    write_and_close(&img, &[(0, &pattern(5, 65536))]);
    let h = header(&img);
    assert!(h.bitmap_sectors >= 2 && h.table_sectors >= 2);
    edit(&img, |raw| {
        for m in h.meta_offset {
            raw[m as usize + SECTOR + 20] ^= 0x10;
            raw[m as usize + (h.bitmap_sectors as usize + 1) * SECTOR + 20] ^= 0x10;
        }
    });
    let (code, out) = check(p, &["--repair"]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("Lost: bytes 0x7f800000..0xff000000"), "{out}");
    assert!(out.contains("Lost: bytes 0x3fc00000..0x7f800000"), "{out}");
    assert_eq!(check(p, &[]).0, 0);
}

#[test]
fn repair_reports_what_is_lost_and_never_exposes_other_data() {
    let (d, img) = new_image();
    let p = d.path();
    write_and_close(
        &img,
        &[(0, &pattern(1, 1 << 20)), (2 << 20, &pattern(2, 1 << 20))],
    );
    write_and_close(&img, &[]);
    let h = header(&img);
    // The table sector is damaged in both copies: which physical chunk holds what is unknown.
    let t = h.bitmap_sectors as usize * SECTOR;
    edit(&img, |raw| {
        raw[h.meta_offset[0] as usize + t + 3] ^= 0x01;
        raw[h.meta_offset[1] as usize + t + 3] ^= 0x01;
    });
    assert_eq!(check(p, &[]).0, 2);
    let (code, out) = check(p, &["--repair"]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("Lost: bytes 0x0..0x800000"), "{out}");
    assert_eq!(check(p, &[]).0, 0);
    assert!(
        contents(p).iter().all(|&b| b == 0),
        "lost chunks must read as zeros"
    );
}

#[test]
fn truncated_images_are_corrupt_not_unreadable() {
    let (d, img) = new_image();
    let p = d.path();
    write_and_close(&img, &[(3 << 20, &pattern(5, 1 << 20))]);
    let h = header(&img);
    // Cut into the data area: the chunk holding virtual chunk 3 is gone, and a clean image's
    // checkpointed blocks can never lie past the end of its file (check used to say 0).
    let f = std::fs::OpenOptions::new().write(true).open(&img).unwrap();
    f.set_len(h.data_offset + 4096).unwrap();
    let out = found_and_repaired(p, "past the end of the storage");
    assert!(out.contains("Lost: bytes 0x300000..0x400000"), "{out}");
    assert!(contents(p).iter().all(|&b| b == 0));
    // Cut into the metadata: reported as corruption, and repair cannot proceed.
    f.set_len(h.meta_offset[1] + 100).unwrap();
    let (code, out) = check(p, &[]);
    assert_eq!(code, 2, "{out}");
    let (code, out) = check(p, &["--repair"]);
    assert_eq!(code, 2, "{out}");
    assert!(out.contains("cannot repair"), "{out}");
}

/// Writes each piece and flushes after each, then drops the image without closing it, as a
/// killed server leaves it: dirty, its records in the journal, one sector per flush.
/// `fvd check` finds corruption saying `what` (exit 2), then `--repair` fixes it (exit 0);
/// returns what the repair printed.
fn found_and_repaired(dir: &Path, what: &str) -> String {
    let (code, out) = check(dir, &[]);
    assert_eq!(code, 2, "{out}");
    assert!(out.contains(what), "{out}");
    let (code, out) = check(dir, &["--repair"]);
    assert_eq!(code, 0, "{out}");
    out
}

fn write_flush_and_abandon(path: &Path, writes: &[(u64, &[u8])]) {
    let img: Image<SyncIo> = block_on(fvd::engine::open_image(&SyncIo, path, false)).unwrap();
    for (off, data) in writes {
        let b = Buf::alloc(data.len());
        b.copy_from_slice(0, data);
        block_on(img.write(&SyncIo, VirtOffset(*off), b)).unwrap();
        block_on(img.flush(&SyncIo)).unwrap();
    }
    drop(img);
}

#[test]
fn a_damaged_journal_sector_followed_by_later_flushes_is_corruption() {
    let (d, img) = new_image();
    let p = d.path();
    let pieces: Vec<Vec<u8>> = (0..4).map(|i| pattern(i, 65536)).collect();
    let writes: Vec<(u64, &[u8])> = (0..4)
        .map(|i| ((i as u64) << 20, pieces[i].as_slice()))
        .collect();
    write_flush_and_abandon(&img, &writes);
    let h = header(&img);
    // Sector 0 (the first flush's records) is damaged; the three later flushes' sectors are
    // intact, which a torn write cannot leave (check used to say 0, replay silently dropping
    // the three later flushes as well).
    edit(&img, |raw| raw[h.journal_offset as usize + 40] ^= 0x08);
    let out = found_and_repaired(p, "after sector 0, which is damaged");
    assert!(out.contains("Possibly lost"), "{out}");
    // The image was left open; the repaired one is clean.
    let (_, out) = check(p, &["--output", "json"]);
    let j: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(j["clean_shutdown"], true, "{out}");
    let v = contents(p);
    assert!(v[..65536].iter().all(|&b| b == 0), "first flush lost");
    for (i, piece) in pieces.iter().enumerate().skip(1) {
        assert_eq!(&v[i << 20..(i << 20) + 65536], &piece[..], "flush {i}");
    }
}

/// The same damage found after a reboot (the header's boot id is another boot's, so intents
/// are not adopted): the later flushes' sectors are still kept by the repair, and an intent
/// written after them (a write that completed without FLUSH before the host went down) is not:
/// the reboot may have dropped its data.
#[test]
fn repair_after_a_reboot_keeps_later_flushes_and_drops_intents() {
    let (d, img) = new_image();
    let p = d.path();
    let pieces: Vec<Vec<u8>> = (0..5).map(|i| pattern(i, 65536)).collect();
    {
        // Four flushed writes, then a fifth completed and not flushed (its record is an intent
        // past the last flush's sector), then the process dies.
        let i: Image<SyncIo> = block_on(fvd::engine::open_image(&SyncIo, &img, false)).unwrap();
        for (n, piece) in pieces.iter().enumerate() {
            let b = Buf::alloc(piece.len());
            b.copy_from_slice(0, piece);
            block_on(i.write(&SyncIo, VirtOffset((n as u64) << 20), b)).unwrap();
            if n < 4 {
                block_on(i.flush(&SyncIo)).unwrap();
            }
        }
    }
    let mut h = header(&img);
    assert!(h.intents(), "left open: intents on");
    h.boot_id = [0x5a; 16];
    edit(&img, |raw| {
        let o = h.slot_offset() as usize;
        raw[o..o + SECTOR].copy_from_slice(&h.encode());
        raw[h.journal_offset as usize + 40] ^= 0x08;
    });
    found_and_repaired(p, "after sector 0, which is damaged");
    let v = contents(p);
    assert!(v[..65536].iter().all(|&b| b == 0), "first flush lost");
    for (i, piece) in pieces.iter().enumerate().take(4).skip(1) {
        assert_eq!(&v[i << 20..(i << 20) + 65536], &piece[..], "flush {i}");
    }
    assert!(
        v[4 << 20..(4 << 20) + 65536].iter().all(|&b| b == 0),
        "another boot's intent replayed"
    );
}

#[test]
fn a_damaged_newer_header_slot_is_detected_by_the_journal_and_rebuilt() {
    // Once from each metadata copy: a clean close before switches the active copy to 1.
    for closed_before in [false, true] {
        let (d, img) = created(&["--size", "8M", "--journal-size", "4K"]);
        let p = d.path();
        let (a, b, c, e) = (
            pattern(9, 65536),
            pattern(10, 65536),
            pattern(11, 65536),
            pattern(12, 65536),
        );
        if closed_before {
            write_and_close(&img, &[(5 << 20, &e)]);
        }
        let old_active = header(&img).active_meta;
        assert_eq!(old_active, u32::from(closed_before));
        // A one-sector journal: the first write's records fill it, so the second write
        // checkpoints (a new epoch and the other metadata copy, in one header slot only), and
        // the third write's records start the new epoch's journal.
        write_flush_and_abandon(&img, &[(1 << 20, &a), (2 << 20, &b), (3 << 20, &c)]);
        let h = header(&img);
        assert_eq!(h.active_meta, 1 - old_active);
        // The slot the checkpoint wrote is damaged: the older slot takes over and its epoch
        // ignores the journal (check used to report a clean image that lost the write).
        edit(&img, |raw| raw[h.slot_offset() as usize + 300] ^= 0x02);
        assert_eq!(header(&img).active_meta, old_active);
        found_and_repaired(p, "older than the journal");
        let all = contents(p);
        assert_eq!(&all[1 << 20..(1 << 20) + 65536], &a[..]);
        assert_eq!(&all[2 << 20..(2 << 20) + 65536], &b[..]);
        assert_eq!(&all[3 << 20..(3 << 20) + 65536], &c[..]);
        if closed_before {
            assert_eq!(&all[5 << 20..(5 << 20) + 65536], &e[..]);
        }
    }
}

/// The header written by the open after a clean close is lost (both slots hold the clean
/// header of the close): the journal is one epoch on and the open did not checkpoint, so the
/// header in force names the right metadata copy and repair loses nothing.
#[test]
fn a_lost_header_of_the_open_after_a_clean_close_loses_nothing() {
    let (d, img) = new_image();
    let p = d.path();
    let (a, b) = (pattern(13, 1 << 20), pattern(14, 65536));
    write_and_close(&img, &[(0, &a)]);
    let clean = std::fs::read(&img).unwrap()[..2 * SECTOR].to_vec();
    assert!(header(&img).clean());
    write_flush_and_abandon(&img, &[(4 << 20, &b)]);
    edit(&img, |raw| raw[..2 * SECTOR].copy_from_slice(&clean));
    let out = found_and_repaired(p, "older than the journal");
    assert!(!out.contains("Lost"), "{out}");
    let all = contents(p);
    assert_eq!(&all[..1 << 20], &a[..]);
    assert_eq!(&all[4 << 20..(4 << 20) + 65536], &b[..]);
}

/// A read-write open writes its header to both slots (so that a reader that does not know
/// intents refuses the image, docs/FORMAT.md): either slot damaged, the other is the same
/// header, and nothing is lost.
#[test]
fn a_damaged_header_slot_written_at_open_loses_nothing() {
    for damaged_newest in [true, false] {
        let (d, img) = new_image();
        let p = d.path();
        let a = pattern(9, 65536);
        write_flush_and_abandon(&img, &[(1 << 20, &a)]);
        let h = header(&img);
        let slot = if damaged_newest {
            h.slot_offset()
        } else {
            SECTOR as u64 - h.slot_offset()
        };
        edit(&img, |raw| raw[slot as usize + 300] ^= 0x02);
        let (code, out) = check(p, &[]);
        assert_eq!(code, 0, "{out}");
        assert!(!out.contains("lost"), "{out}");
        assert_eq!(&contents(p)[1 << 20..(1 << 20) + 65536], &a[..]);
    }
}

/// Chunk 0 and the last chunk, which is partial (one 64 KiB block), name the same physical
/// chunk: nothing tells which entry is right, so repair drops both (and clears the last chunk's
/// bits only up to the last block).
#[test]
fn a_duplicate_mapping_is_repaired_without_exposing_either_chunk_to_the_other() {
    let (d, img) = created(&["--size", "8256K"]);
    let p = d.path();
    write_and_close(
        &img,
        &[(0, &pattern(1, 1 << 20)), (8 << 20, &pattern(2, 1 << 16))],
    );
    // A well-formed table sector in which chunk 0 names chunk 8's physical chunk (repair used
    // to unmap only one of them, and the other then read its data).
    let h = header(&img);
    let t = table_sector(&h, h.active_meta);
    let e8 = u32::from_le_bytes(
        std::fs::read(&img).unwrap()[t + 32..t + 36]
            .try_into()
            .unwrap(),
    );
    map_chunk(&img, 0, e8);
    assert_eq!(check(p, &[]).0, 2);
    let (code, out) = check(p, &["--repair"]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("Lost: bytes 0x0..0x100000"), "{out}");
    assert!(out.contains("Lost: bytes 0x800000..0x810000"), "{out}");
    assert_eq!(check(p, &[]).0, 0);
    assert!(
        contents(p).iter().all(|&b| b == 0),
        "both chunks read zeros"
    );
}

/// A table entry taken from the other metadata copy (the active copy's sector is damaged) that
/// names the physical chunk a journal record maps: the journal is newer, so its mapping keeps
/// the chunk and its data, and only the stale entry is dropped (it would read that data).
#[test]
fn a_duplicate_mapping_from_the_other_copy_loses_to_the_journal() {
    let (d, img) = new_image();
    let p = d.path();
    let (a, b, c) = (
        pattern(1, 1 << 20),
        pattern(2, 1 << 20),
        pattern(3, 1 << 20),
    );
    write_and_close(&img, &[(0, &a), (2 << 20, &b)]);
    // Chunk 3 is mapped by a journal record only.
    write_flush_and_abandon(&img, &[(3 << 20, &c)]);
    let ro: Image<SyncIo> = block_on(fvd::engine::open_image(&SyncIo, &img, true)).unwrap();
    let phys3 = ro.chunk_phys(ChunkIndex(3)).0;
    drop(ro);
    let h = header(&img);
    let (active, other) = (
        table_sector(&h, h.active_meta),
        table_sector(&h, 1 - h.active_meta),
    );
    edit(&img, |raw| {
        // The other copy: the active table with chunk 0 naming chunk 3's physical chunk.
        raw.copy_within(active..active + SECTOR, other);
        raw[other..other + 4].copy_from_slice(&phys3.to_le_bytes());
        reseal(raw, other);
        // The active copy's table sector fails its checksum.
        raw[active + 100] ^= 1;
    });
    let out = found_and_repaired(p, "chunk 0");
    assert!(out.contains("Lost: bytes 0x0..0x100000"), "{out}");
    let v = contents(p);
    assert!(v[..1 << 20].iter().all(|&x| x == 0), "chunk 0 reads zeros");
    assert!(v[2 << 20..3 << 20] == b[..], "chunk 2 is kept");
    assert!(v[3 << 20..4 << 20] == c[..], "chunk 3 keeps its data");
}

/// A chunk with no present block mapped past the end of the storage is one corruption, not
/// also a leak (repair unmaps it once).
#[test]
fn a_mapping_past_the_storage_is_not_also_a_leak() {
    let (d, img) = new_image();
    let p = d.path();
    write_and_close(&img, &[(0, &pattern(1, 65536))]);
    map_chunk(&img, 1, 1000);
    let (code, out) = check(p, &["--output", "json"]);
    assert_eq!(code, 2, "{out}");
    let j: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(j["corruptions"], 1, "{out}");
    assert_eq!(j["leaks"], 0, "{out}");
    let (code, out) = check(p, &["--repair"]);
    assert_eq!(code, 0, "{out}");
    assert_eq!(check(p, &[]).0, 0);
    assert_eq!(&contents(p)[..65536], &pattern(1, 65536)[..]);
}

/// A flat image whose file was cut after a block was written past the cut: check finds it,
/// and repair drops exactly the blocks from the first one past the cut to the end, reports that
/// range lost, and keeps the blocks before the cut. 256 blocks: the bitmap words past the cut
/// are not the first (the block found is numbered from its word).
#[test]
fn repair_of_a_cut_flat_image_drops_only_what_lies_past_the_cut() {
    let (d, img) = created(&["--size", "16M", "--no-compact"]);
    let p = d.path();
    let (low, high) = (pattern(1, 6 << 20), pattern(2, 1 << 20));
    write_and_close(&img, &[(0, &low), (12 << 20, &high)]);
    let h = header(&img);
    let f = std::fs::OpenOptions::new().write(true).open(&img).unwrap();
    // Block 120, inside bitmap word 1; the first present block past it is 192 (word 3).
    f.set_len(h.data_offset + (15 << 19)).unwrap();
    let out = found_and_repaired(p, "past the end of the file");
    assert!(out.contains("Lost: bytes 0xc00000..0x1000000"), "{out}");
    let v = contents(p);
    assert!(
        v[..6 << 20] == low[..],
        "the blocks before the cut are kept"
    );
    assert!(v[6 << 20..].iter().all(|&b| b == 0));
    let (code, out) = check(p, &[]);
    assert_eq!(code, 0, "{out}");
}

/// A bit past the last block of a flat image (65 blocks: the last bitmap word is partial) is
/// not data: nothing reads it, so check does not call it data past the end of the file.
#[test]
fn a_bitmap_bit_past_the_last_block_is_not_data_past_the_end() {
    let (d, img) = created(&["--size", "4160K", "--no-compact"]);
    let p = d.path();
    let h = header(&img);
    assert_eq!(h.geometry().block_count(), 65);
    // Block 65: bitmap byte 8, bit 1, in both copies.
    edit(&img, |raw| {
        for m in h.meta_offset {
            raw[m as usize + 8] |= 1 << 1;
            reseal(raw, m as usize);
        }
    });
    let (code, out) = check(p, &[]);
    assert_eq!(code, 0, "{out}");
}

/// An image whose metadata copies are larger than one write (1 MiB: 300 GiB in 64 KiB blocks
/// and 1 MiB chunks has 452 sectors per copy) is created whole, checks clean, and a repair
/// rewrites both copies whole (an image damaged in its last table sector checks clean after).
#[test]
fn metadata_larger_than_one_write_is_created_and_repaired_whole() {
    let (d, img) = created(&["--size", "300G"]);
    let p = d.path();
    let h = header(&img);
    assert!(h.bitmap_sectors + h.table_sectors > 256);
    let (code, out) = check(p, &[]);
    assert_eq!(code, 0, "{out}");
    write_and_close(&img, &[((300 << 30) - 65536, &pattern(3, 65536))]);
    // Damage the last table sector of both copies: the last chunk's data is lost.
    let last = (h.bitmap_sectors + h.table_sectors - 1) as usize * SECTOR;
    edit(&img, |raw| {
        raw[h.meta_offset[0] as usize + last + 20] ^= 0x10;
        raw[h.meta_offset[1] as usize + last + 20] ^= 0x10;
    });
    let (code, out) = check(p, &["--repair"]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("Lost:"), "{out}");
    // Each repair makes the other copy the active one: twice covers both orders.
    for round in 0..3 {
        let (code, out) = check(p, &["--output", "json"]);
        assert_eq!(code, 0, "round {round}: {out}");
        assert!(
            out.contains("\"inactive_copy_valid\": true"),
            "round {round}: {out}"
        );
        if round < 2 {
            let (code, out) = check(p, &["--repair"]);
            assert_eq!(code, 0, "{out}");
        }
    }
}
