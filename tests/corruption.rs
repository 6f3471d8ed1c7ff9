//! Damaged images built with the real engine and damaged precisely (crafted sectors with valid
//! checksums, flipped bytes, truncation): open refuses them with a corruption error, and the
//! `fvd` commands report them within a time and memory bound, never hanging, never exiting 0
//! from `check`, never silently dropping flushed data.

use fvd::engine::{Corruption, CreateParams, EngineError, Image};
use fvd::format::header::pick_header;
use fvd::format::{journal, metadata, Header, JournalEntry, SECTOR};
use fvd::io::executor::block_on;
use fvd::io::host_file::OpenMode;
use fvd::io::sync::SyncIo;
use fvd::io::{Buf, HostFile};
use fvd::units::VirtOffset;
use std::os::unix::fs::FileExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

mod engine_support;
use engine_support::{pattern, read, write};

fn tmpdir() -> tempfile::TempDir {
    // O_DIRECT needs a real filesystem; /var/tmp is on disk.
    tempfile::tempdir_in("/var/tmp").unwrap()
}

const BS: u64 = 16 << 10;
const CS: u64 = 64 << 10;

fn create(path: &Path, size: u64, compact: bool) {
    let p = CreateParams {
        virtual_size: size,
        block_size: BS,
        chunk_size: CS,
        journal_size: 256 << 10,
        compact,
        ..Default::default()
    };
    let f = HostFile::open(path, OpenMode::Create).unwrap();
    block_on(Image::create(&SyncIo, f, &p)).unwrap();
}

fn open(path: &Path, ro: bool) -> fvd::engine::Result<Image<SyncIo>> {
    block_on(fvd::engine::open_image(&SyncIo, path, ro))
}

fn header(path: &Path) -> Header {
    let raw = std::fs::read(path).unwrap();
    pick_header(&raw[..SECTOR], &raw[SECTOR..2 * SECTOR]).unwrap()
}

fn file(path: &Path) -> std::fs::File {
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .unwrap()
}

fn read_at(path: &Path, off: u64, len: usize) -> Vec<u8> {
    let mut v = vec![0u8; len];
    file(path).read_exact_at(&mut v, off).unwrap();
    v
}

fn write_at(path: &Path, off: u64, data: &[u8]) {
    file(path).write_all_at(data, off).unwrap();
}

/// Rewrites entry `chunk` of the active table with `phys`, resealing the sector (valid CRC).
fn set_table_entry(path: &Path, chunk: u64, phys: u32) {
    let h = header(path);
    let t = chunk / metadata::ENTRIES_PER_SECTOR as u64;
    let index = h.bitmap_sectors + t;
    let off = h.meta_offset[h.active_meta as usize] + index * SECTOR as u64;
    let mut s = read_at(path, off, SECTOR);
    let at = (chunk as usize % metadata::ENTRIES_PER_SECTOR) * 4;
    s[at..at + 4].copy_from_slice(&phys.to_le_bytes());
    metadata::seal(&mut s, index);
    write_at(path, off, &s);
}

/// Writes `entries` as one journal write at sector `seq` of the header's epoch (valid CRCs).
fn append_journal(path: &Path, seq: u64, entries: &[JournalEntry]) {
    let h = header(path);
    let bytes = journal::encode(entries, h.journal_epoch, seq);
    write_at(path, h.journal_offset + seq * SECTOR as u64, &bytes);
}

fn assert_corrupt(r: fvd::engine::Result<Image<SyncIo>>, what: &str) {
    match r {
        Err(e @ (EngineError::Corrupt(_) | EngineError::Format(_))) => {
            let msg = e.to_string();
            assert!(
                msg.contains(what),
                "error {msg:?} does not mention {what:?}"
            );
        }
        Err(e) => panic!("want a corruption error mentioning {what:?}, got {e:?}"),
        Ok(_) => panic!("a corrupt image ({what}) was opened"),
    }
}

fn fvd_stdout(dir: &Path, args: &[&str]) -> (Option<i32>, String) {
    let (code, out, _) = run_fvd(dir, args);
    (code, out)
}

fn fvd(dir: &Path, args: &[&str]) -> (Option<i32>, String) {
    let (code, _, err) = run_fvd(dir, args);
    (code, err)
}

/// Runs `fvd args` with a 20 s timeout and a 2 GiB address-space limit; returns the exit code
/// (None: killed by a signal), stdout and stderr. A hang fails the test.
fn run_fvd(dir: &Path, args: &[&str]) -> (Option<i32>, String, String) {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_fvd"));
    cmd.args(args)
        .current_dir(dir)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    // SAFETY: setrlimit is async-signal-safe; the closure touches nothing else.
    unsafe {
        cmd.pre_exec(|| {
            let lim = libc::rlimit {
                rlim_cur: 2 << 30,
                rlim_max: 2 << 30,
            };
            if libc::setrlimit(libc::RLIMIT_AS, &lim) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = cmd.spawn().unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            let out = child.wait_with_output().unwrap();
            return (
                status.code(),
                String::from_utf8_lossy(&out.stdout).into(),
                String::from_utf8_lossy(&out.stderr).into(),
            );
        }
        if Instant::now() > deadline {
            child.kill().unwrap();
            child.wait().unwrap();
            panic!("fvd {args:?} hung (killed after 20 s)");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// `info`, `map`, `convert` and `serve` fail cleanly and `check` exits neither 0 nor by a signal.
fn assert_tools_refuse(dir: &Path, img: &str, what: &str) {
    for args in [
        vec!["info", img],
        vec!["map", img],
        vec!["convert", img, "out.raw", "-O", "raw"],
        vec!["serve", img, "--socket", "s.sock", "--once"],
    ] {
        let (code, err) = fvd(dir, &args);
        assert!(
            code.is_some_and(|c| c != 0),
            "fvd {args:?} exited {code:?}: {err}"
        );
        assert!(err.contains(what), "fvd {args:?}: {err:?} lacks {what:?}");
    }
    let (code, err) = fvd(dir, &["check", img]);
    assert!(
        code.is_some_and(|c| c != 0),
        "fvd check exited {code:?}: {err}"
    );
}

/// A compact image whose chunks 0..3 hold data; closed cleanly (the table is in a metadata
/// copy) or left with its records in the journal.
fn compact_with_data(dir: &Path, close: bool) -> (PathBuf, u64) {
    let path = dir.join("img.fvd");
    create(&path, 4 << 20, true);
    let img = open(&path, false).unwrap();
    for c in 0..3 {
        write(&img, c * CS, &pattern(c, CS as usize));
    }
    block_on(img.flush(&SyncIo)).unwrap();
    let tail = block_on(img.journal_used());
    if close {
        block_on(img.close(&SyncIo)).unwrap();
    }
    (path, tail)
}

#[test]
fn table_entries_past_the_storage_are_corruption_not_a_hang() {
    for phys in [1u32 << 30, 0xFFFF_FFFE] {
        let d = tmpdir();
        let (path, _) = compact_with_data(d.path(), true);
        set_table_entry(&path, 1, phys);
        assert_corrupt(open(&path, true), "past the end of the storage");
        assert_corrupt(open(&path, false), "past the end of the storage");
        assert_tools_refuse(d.path(), "img.fvd", "past the end of the storage");
        let (code, err) = fvd(d.path(), &["check", "img.fvd"]);
        assert_eq!(code, Some(2), "{err}");
        // Repair unmaps the chunk; the others keep their data.
        let (code, err) = fvd(d.path(), &["check", "--repair", "img.fvd"]);
        assert_eq!(code, Some(0), "{err}");
        let img = open(&path, true).unwrap();
        assert!(read(&img, 0, CS as usize) == pattern(0, CS as usize));
        assert!(read(&img, CS, CS as usize) == vec![0; CS as usize]);
        assert!(read(&img, 2 * CS, CS as usize) == pattern(2, CS as usize));
    }
}

#[test]
fn journal_records_with_huge_values_are_corruption_not_a_hang() {
    let huge_map = [
        JournalEntry::Map {
            chunk: 5,
            phys: 1 << 30,
        },
        JournalEntry::Map {
            chunk: 5,
            phys: 0xFFFF_FFFE,
        },
    ];
    for e in huge_map {
        let d = tmpdir();
        let (path, tail) = compact_with_data(d.path(), false);
        append_journal(&path, tail, &[e]);
        assert_corrupt(open(&path, true), "past the end of the storage");
        assert_tools_refuse(d.path(), "img.fvd", "past the end of the storage");
    }
    // Records outside the bitmap or the table.
    for e in [
        JournalEntry::SetBits {
            start: 3,
            count: u64::MAX - 1,
        },
        JournalEntry::ClearBits {
            start: 1 << 40,
            count: 1 << 40,
        },
        JournalEntry::Map {
            chunk: 1 << 40,
            phys: 7,
        },
        JournalEntry::Unmap { chunk: 1 << 50 },
    ] {
        let d = tmpdir();
        let (path, tail) = compact_with_data(d.path(), false);
        append_journal(&path, tail, &[e]);
        assert_corrupt(open(&path, true), "corrupt journal");
        assert_tools_refuse(d.path(), "img.fvd", "corrupt journal");
    }
    // Two virtual chunks on one physical chunk.
    let d = tmpdir();
    let (path, tail) = compact_with_data(d.path(), false);
    // Chunk 0 was the first allocated: it holds physical chunk 0.
    append_journal(&path, tail, &[JournalEntry::Map { chunk: 3, phys: 0 }]);
    assert_corrupt(open(&path, true), "another chunk uses");
    let (code, _) = fvd(d.path(), &["check", "img.fvd"]);
    assert_eq!(code, Some(2));
}

/// A bitmap record of zero blocks decodes (no writer makes one): replaying it changes nothing,
/// at the start of the bitmap or at its end. The image opens and its data reads back.
#[test]
fn journal_records_of_zero_blocks_change_nothing() {
    let blocks = (4 << 20) / BS;
    for e in [
        JournalEntry::SetBits { start: 0, count: 0 },
        JournalEntry::ClearBits { start: 0, count: 0 },
        JournalEntry::SetBits {
            start: blocks,
            count: 0,
        },
    ] {
        let d = tmpdir();
        let (path, tail) = compact_with_data(d.path(), false);
        append_journal(&path, tail, &[e]);
        let img = open(&path, false).unwrap_or_else(|err| panic!("{e:?}: {err}"));
        for c in 0..3 {
            assert!(read(&img, c * CS, CS as usize) == pattern(c, CS as usize));
        }
        assert!(read(&img, 3 * CS, CS as usize) == vec![0; CS as usize]);
    }
}

#[test]
fn damaged_newest_header_slot_is_corruption_not_a_rollback() {
    let d = tmpdir();
    let (path, _) = compact_with_data(d.path(), false);
    // Open bumped the epoch with a new generation; the data's records carry that epoch. It
    // wrote that header to both slots; an earlier version wrote only one, leaving the clean
    // header it opened in the other, as here.
    let h = header(&path);
    let mut before = h.clone();
    before.generation -= 1;
    before.journal_epoch -= 1;
    before.flags |= fvd::format::header::FLAG_CLEAN;
    before.incompat &= !fvd::format::header::INCOMPAT_INTENTS;
    before.boot_id = [0; 16];
    write_at(&path, before.slot_offset(), &before.encode());
    let slot = h.slot_offset();
    let mut s = read_at(&path, slot, SECTOR);
    s[200] ^= 1;
    write_at(&path, slot, &s);
    assert_eq!(
        header(&path).journal_epoch + 1,
        h.journal_epoch,
        "older slot"
    );
    assert_corrupt(open(&path, true), "newest header slot is damaged");
    assert_corrupt(open(&path, false), "newest header slot is damaged");
    assert_tools_refuse(d.path(), "img.fvd", "newest header slot is damaged");
    assert_repair_drops_the_rest(d.path());
    // The older slot marks a clean shutdown, so the lost one was the next open's epoch bump on
    // the same copy: repair rebuilds it exactly and the flushed data survives.
    let img = open(&path, true).unwrap();
    assert!(
        read(&img, 0, CS as usize) == pattern(0, CS as usize),
        "the newer epoch's records are kept"
    );
}

/// `check` reports journal damage as corruption (exit 2); `check --repair` keeps the records
/// before it, and its new epoch lies past every epoch in the journal, so no stale sector of a
/// later epoch is ever replayed: the image then checks clean and opens.
fn assert_repair_drops_the_rest(dir: &Path) {
    let (code, err) = fvd(dir, &["check", "img.fvd"]);
    assert_eq!(code, Some(2), "{err}");
    let (code, err) = fvd(dir, &["check", "--repair", "img.fvd"]);
    assert_eq!(code, Some(0), "{err}");
    assert!(err.contains("Repaired: "), "{err}");
    let (code, out) = fvd_stdout(dir, &["check", "img.fvd", "--output", "json"]);
    assert_eq!(code, Some(0));
    let report: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(
        report["journal_records"], 0,
        "a stale sector was taken as new: {out}"
    );
    let img = open(&dir.join("img.fvd"), false).unwrap();
    block_on(img.close(&SyncIo)).unwrap();
    drop(img);
    let (code, err) = fvd(dir, &["check", "img.fvd"]);
    assert_eq!(code, Some(0), "{err}");
}

#[test]
fn bad_journal_sector_before_later_records_is_corruption() {
    let d = tmpdir();
    let path = d.path().join("img.fvd");
    create(&path, 4 << 20, true);
    let img = open(&path, false).unwrap();
    for c in 0..3 {
        write(&img, c * CS, &pattern(c, CS as usize));
        block_on(img.flush(&SyncIo)).unwrap();
    }
    assert_eq!(block_on(img.journal_used()), 3, "one sector per flush");
    drop(img);
    let h = header(&path);
    let off = h.journal_offset + SECTOR as u64;
    let mut s = read_at(&path, off, SECTOR);
    s[100] ^= 0x40;
    write_at(&path, off, &s);
    assert_corrupt(open(&path, true), "was written after sector 1");
    assert_tools_refuse(d.path(), "img.fvd", "was written after sector 1");
    assert_repair_drops_the_rest(d.path());
    let img = open(&path, true).unwrap();
    assert!(
        read(&img, 0, CS as usize) == pattern(0, CS as usize),
        "sector 0 kept"
    );
}

#[test]
fn torn_last_journal_write_stays_a_torn_tail() {
    let d = tmpdir();
    let path = d.path().join("img.fvd");
    create(&path, 64 << 20, true);
    let img = open(&path, false).unwrap();
    write(&img, 0, &pattern(1, BS as usize));
    block_on(img.flush(&SyncIo)).unwrap();
    // Separate blocks: one record each, three sectors in one journal write.
    for b in 0..600u64 {
        write(&img, (2 * b + 4) * BS, &pattern(b, 4096));
    }
    let before = block_on(img.journal_used());
    block_on(img.flush(&SyncIo)).unwrap();
    assert!(block_on(img.journal_used()) >= before + 3);
    drop(img);
    // Tear the middle sector of the last write: the sectors after it are part of the same
    // unacknowledged write, so this is a torn tail and open accepts it.
    let h = header(&path);
    let off = h.journal_offset + (before + 1) * SECTOR as u64;
    write_at(&path, off, &vec![0u8; SECTOR]);
    let img = open(&path, false).unwrap();
    assert!(read(&img, 0, BS as usize) == pattern(1, BS as usize));
    block_on(img.close(&SyncIo)).unwrap();
    drop(img);
    let (code, err) = fvd(d.path(), &["check", "img.fvd"]);
    assert_eq!(code, Some(0), "{err}");
}

#[test]
fn truncated_compact_image_is_corruption() {
    let d = tmpdir();
    let (path, _) = compact_with_data(d.path(), true);
    let h = header(&path);
    file(&path).set_len(h.data_offset + CS).unwrap();
    assert_corrupt(open(&path, true), "past the end of the storage");
    assert_tools_refuse(d.path(), "img.fvd", "past the end of the storage");
    // Into the metadata: refused before anything is sized by the header.
    file(&path).set_len(h.meta_offset[1] + 4096).unwrap();
    assert_corrupt(open(&path, true), "truncated");
    assert_tools_refuse(d.path(), "img.fvd", "truncated");
}

#[test]
fn truncated_flat_image_is_corruption_but_a_new_one_is_not() {
    let d = tmpdir();
    let path = d.path().join("flat.fvd");
    create(&path, 4 << 20, false);
    // Never opened read-write: short, and fine.
    drop(open(&path, true).unwrap());
    let (code, err) = fvd(d.path(), &["check", "flat.fvd"]);
    assert_eq!(code, Some(0), "{err}");
    let img = open(&path, false).unwrap();
    write(&img, 3 << 20, &pattern(3, BS as usize));
    block_on(img.close(&SyncIo)).unwrap();
    drop(img);
    let h = header(&path);
    file(&path).set_len(h.data_offset + (2 << 20)).unwrap();
    assert_corrupt(open(&path, true), "past the end of the file");
    assert_corrupt(open(&path, false), "past the end of the file");
    assert_tools_refuse(d.path(), "flat.fvd", "past the end of the file");
}

/// A crash may keep a journaled mapping while losing the file growth it needed only if the
/// record was written without a flush after the growth: the first flush after a growth orders it.
#[test]
fn growth_is_durable_before_a_mapping_into_it() {
    let d = tmpdir();
    let path = d.path().join("img.fvd");
    create(&path, 256 << 20, true);
    let img = open(&path, false).unwrap();
    let grown = std::fs::metadata(&path).unwrap().len();
    let h = header(&path);
    assert!(grown > h.data_offset, "grown ahead at open: {grown}");
    let flush = |img: &Image<SyncIo>| {
        let before = img.counters().snapshot();
        block_on(img.flush(&SyncIo)).unwrap();
        let after = img.counters().snapshot();
        after.host_flushes - before.host_flushes
    };
    write(&img, 0, &pattern(1, 4096));
    assert_eq!(flush(&img), 1, "inside the growth at open: one flush");
    // Chunks are allocated lowest-first: fill the grown length, then one more grows the file
    // and its record waits for a data flush.
    let inside = (grown - h.data_offset) / CS;
    for c in 1..inside {
        write(&img, c * CS, &pattern(c, 4096));
    }
    assert_eq!(std::fs::metadata(&path).unwrap().len(), grown);
    assert_eq!(flush(&img), 1, "still inside: one flush");
    write(&img, inside * CS, &pattern(2, 4096));
    assert!(std::fs::metadata(&path).unwrap().len() > grown);
    assert_eq!(flush(&img), 2, "growth made durable first");
    write(&img, (inside + 1) * CS, &pattern(3, 4096));
    assert_eq!(flush(&img), 1, "growth already durable");
    block_on(img.close(&SyncIo)).unwrap();
}

/// Power loss while a flush journals the mapping of a chunk in a growth of the file: the
/// mapping may survive only together with the growth, so the image always reopens (a mapping
/// past the end of the file would be refused as truncation).
#[test]
fn power_loss_after_file_growth_never_leaves_a_mapping_past_the_end() {
    use fvd::io::executor::Executor;
    use fvd::io::sim::{SimConfig, SimWorld};
    use fvd::io::IoFile;
    use std::sync::Arc;
    let params = CreateParams {
        virtual_size: 128 << 20,
        block_size: BS,
        chunk_size: CS,
        journal_size: 256 << 10,
        compact: true,
        ..Default::default()
    };
    for seed in 0..60u64 {
        let world = SimWorld::new(seed, SimConfig::default());
        let f = world.create_disk(0, 512);
        let (io, file, p) = (world.io(), f.clone(), params.clone());
        world
            .block_on(async move { Image::create(&io, file, &p).await })
            .unwrap();
        let (io, file) = (world.io(), f.clone());
        let img = Arc::new(
            world
                .block_on(async move { Image::open(&io, file, None, false).await })
                .unwrap(),
        );
        let data_offset = img.header().data_offset;
        let inside = (f.size().unwrap() - data_offset) / CS;
        let put = |c: u64| {
            let (io, img) = (world.io(), img.clone());
            let b = Buf::alloc(4096);
            b.copy_from_slice(0, &pattern(c, 4096));
            world
                .block_on(async move { img.write(&io, VirtOffset(c * CS), b).await })
                .unwrap();
        };
        for c in 0..inside {
            put(c);
        }
        let (io, i2) = (world.io(), img.clone());
        world.block_on(async move { i2.flush(&io).await }).unwrap();
        // This chunk grows the file; power fails somewhere in the flush that journals it.
        put(inside);
        assert!(f.size().unwrap() > data_offset + inside * CS);
        let mut ex = Executor::default();
        let (io, i2) = (world.io(), img.clone());
        ex.spawn(async move {
            let _ = i2.flush(&io).await;
        });
        // Power fails once a device flush of that FLUSH is in flight (at once, or after one more
        // completion): the writes before it have completed but are not yet durable.
        let mut flushes_seen = 0;
        loop {
            ex.run_ready();
            if world.pending_flushes() > 0 {
                flushes_seen += 1;
                if flushes_seen > seed % 2 {
                    break;
                }
            }
            if !world.complete_one() {
                break;
            }
        }
        ex.run_ready();
        world.power_loss();
        ex.run_ready();
        drop(ex);
        drop(img);
        let (io, file) = (world.io(), f.clone());
        let reopened = world.block_on(async move { Image::open(&io, file, None, true).await });
        if let Err(e) = reopened {
            panic!("seed {seed}: reopen after power loss failed: {e}");
        }
    }
}

/// Rewrites both header slots with `change` applied, checksums resealed.
fn patch_headers(path: &Path, change: impl Fn(&mut Header)) {
    let raw = read_at(path, 0, 2 * SECTOR);
    for slot in 0..2 {
        if let Ok(mut h) = Header::decode(&raw[slot * SECTOR..(slot + 1) * SECTOR]) {
            change(&mut h);
            write_at(path, (slot * SECTOR) as u64, &h.encode());
        }
    }
}

/// A header whose journal and data area lie terabytes past the end of a small file (valid
/// checksum, regions ordered) once made `check` read zeros for hours. Every region the header
/// names must lie within the storage: anything else is truncation, found before any read.
#[test]
fn regions_past_the_end_of_the_storage_are_truncation_not_a_hang() {
    let d = tmpdir();
    let (path, _) = compact_with_data(d.path(), true);
    patch_headers(&path, |h| {
        h.journal_len = 10 << 40;
        h.data_offset = 1 << 48;
    });
    assert!(
        header(&path).validate().is_ok(),
        "the header alone is valid"
    );
    // In-process opens, bounded like the commands below.
    let (tx, rx) = std::sync::mpsc::channel();
    let p = path.clone();
    std::thread::spawn(move || {
        let _ = tx.send((open(&p, true).err(), open(&p, false).err()));
    });
    let (ro, rw) = rx
        .recv_timeout(Duration::from_secs(10))
        .expect("open still running after 10 s");
    for e in [ro, rw] {
        let e = e.expect("the image opened");
        assert!(
            matches!(
                e,
                EngineError::Corrupt(Corruption::StorageTruncated { data_offset, .. })
                    if data_offset == 1 << 48
            ),
            "{e:?}"
        );
        assert_corrupt(Err(e), "truncated");
    }
    let t = Instant::now();
    let (code, out, err) = run_fvd(d.path(), &["check", "img.fvd"]);
    assert_eq!(code, Some(2), "{out}{err}");
    assert!(
        t.elapsed() < Duration::from_secs(5),
        "check took {:?}",
        t.elapsed()
    );
    assert!(out.contains("truncated"), "{out}{err}");
    assert_tools_refuse(d.path(), "img.fvd", "truncated");
    let (code, err) = fvd(d.path(), &["check", "--repair", "img.fvd"]);
    assert_eq!(code, Some(2), "{err}");
    // A new image holds its whole journal: checks clean before any read-write open.
    let path = d.path().join("new.fvd");
    create(&path, 4 << 20, true);
    assert!(std::fs::metadata(&path).unwrap().len() >= header(&path).data_offset);
    let (code, err) = fvd(d.path(), &["check", "new.fvd"]);
    assert_eq!(code, Some(0), "{err}");
}

/// Writes one journal sector holding `entries` at position `seq` with `epoch` (valid CRC).
fn plant_sector(path: &Path, epoch: u64, seq: u64, entries: &[JournalEntry]) {
    let h = header(path);
    let bytes = journal::encode(entries, epoch, seq);
    write_at(
        path,
        h.journal_offset + seq * SECTOR as u64,
        &bytes[..SECTOR],
    );
}

/// Opens read-write and closes `rounds` times (each moves the journal epoch on at least twice),
/// reading the data back each time.
fn cycle_and_verify(path: &Path, rounds: usize) {
    for round in 0..rounds {
        let img = open(path, false).unwrap();
        for c in 0..3 {
            assert!(
                read(&img, c * CS, CS as usize) == pattern(c, CS as usize),
                "round {round}: chunk {c} lost its data to stale journal records"
            );
        }
        block_on(img.close(&SyncIo)).unwrap();
    }
    let (code, err) = fvd(path.parent().unwrap(), &["check", "img.fvd"]);
    assert_eq!(code, Some(0), "{err}");
}

/// Journal sectors of later epochs left in the journal area (a crafted image, a stale header's
/// sectors, an older image on the same device) must never become records of an epoch that open,
/// checkpoint or repair starts: each new epoch lies above every epoch in the journal area.
#[test]
fn journal_sectors_of_later_epochs_are_never_applied() {
    let wipe = [
        JournalEntry::ClearBits {
            start: 0,
            count: (4 << 20) / BS,
        },
        JournalEntry::Unmap { chunk: 1 },
    ];
    // Open, close, reopen: epochs E + 2 and E + 3 at the journal's start.
    let d = tmpdir();
    let (path, _) = compact_with_data(d.path(), true);
    let e = header(&path).journal_epoch;
    plant_sector(&path, e + 2, 0, &wipe);
    plant_sector(&path, e + 3, 1, &wipe);
    let (code, err) = fvd(d.path(), &["check", "img.fvd"]);
    assert_eq!(
        code,
        Some(0),
        "sectors of later epochs are no damage: {err}"
    );
    cycle_and_verify(&path, 3);
    plant_sector(&path, header(&path).journal_epoch + 2, 0, &wipe);
    cycle_and_verify(&path, 2);

    // Repair: epoch E + 2 at the start and E + 1 further on (journal damage, exit 2).
    let d = tmpdir();
    let (path, _) = compact_with_data(d.path(), true);
    let e = header(&path).journal_epoch;
    plant_sector(&path, e + 2, 0, &wipe);
    plant_sector(&path, e + 1, 2, &wipe);
    assert_corrupt(open(&path, false), "belongs to epoch");
    let (code, err) = fvd(d.path(), &["check", "img.fvd"]);
    assert_eq!(code, Some(2), "{err}");
    let (code, err) = fvd(d.path(), &["check", "--repair", "img.fvd"]);
    assert_eq!(code, Some(0), "{err}");
    let (code, out) = fvd_stdout(d.path(), &["check", "img.fvd", "--output", "json"]);
    assert_eq!(code, Some(0), "{out}");
    let report: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(
        report["journal_records"], 0,
        "a stale sector was taken as new: {out}"
    );
    cycle_and_verify(&path, 3);
}
