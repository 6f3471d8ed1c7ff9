//! The FLUSH / journal / checkpoint contract (src/engine/flush.rs) in exact situations the
//! randomized runs rarely or never reach: a journal batch of several sectors at the end of the
//! journal, a checkpoint of metadata runs that do not start at sector 0, header flags after a
//! runtime checkpoint, a retry after a failed journal write, and a table record that maps into
//! a file growth no flush covered yet. Each test kills mutants that survived the randomized
//! suite (docs/TESTING.md lists them).

use super::pattern::{base_image, decode, fill, Decoded, BASE};
use fvd::engine::base::Base;
use fvd::engine::storage::Storage;
use fvd::engine::{CreateParams, EngineError, Image, IoOp};
use fvd::format::header::FLAG_BASE_NOT_NEEDED;
use fvd::format::{BaseFormat, BaseRef, JournalEntry};
use fvd::io::executor::Executor;
use fvd::io::sim::{SimConfig, SimFile, SimIo, SimWorld};
use fvd::io::Buf;
use fvd::units::{BlockIndex, VirtOffset};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

const BS: u64 = 4096;
const SECTOR: u64 = 4096;

struct Env {
    world: Arc<SimWorld>,
    file: SimFile,
    base: Option<SimFile>,
    io: SimIo,
    img: Arc<Image<SimIo>>,
}

fn make_base(base: &Option<SimFile>) -> Option<Base<SimIo>> {
    base.as_ref().map(|f| Base::Raw {
        store: Storage::new(f.clone()),
        size: fvd::io::IoFile::size(f).unwrap(),
    })
}

impl Env {
    /// A new image on a growing simulated disk; `base_blocks` > 0 adds a raw base that long.
    fn new(seed: u64, mut p: CreateParams, base_blocks: u64) -> Env {
        let world = SimWorld::new(seed, SimConfig::default());
        let file = world.create_disk(0, 512);
        let base = (base_blocks > 0).then(|| {
            let f = world.create_disk(0, 512);
            f.write_now(0, &base_image(base_blocks * BS / 512));
            f.read_only()
        });
        if base.is_some() {
            p.base = Some(BaseRef {
                path: "sim-base.raw".into(),
                format: BaseFormat::Raw,
                size: base_blocks * BS,
            });
        }
        let (io, f) = (world.io(), file.clone());
        world
            .block_on(async move { Image::create(&io, f, &p).await })
            .unwrap();
        let io = world.io();
        let img = Self::open(&world, &io, &file, &base);
        Env {
            world,
            file,
            base,
            io,
            img,
        }
    }

    fn open(
        world: &Arc<SimWorld>,
        io: &SimIo,
        file: &SimFile,
        base: &Option<SimFile>,
    ) -> Arc<Image<SimIo>> {
        let (io, f, b) = (io.clone(), file.clone(), make_base(base));
        Arc::new(
            world
                .block_on(async move { Image::open(&io, f, b, false).await })
                .unwrap(),
        )
    }

    /// Power loss (with nothing in flight) and reopen: journal replay.
    fn crash_and_reopen(&mut self) {
        self.world.power_loss();
        self.io = self.world.io();
        self.img = Self::open(&self.world, &self.io, &self.file, &self.base);
    }

    /// The process dies (the host keeps every completed write) and the image is reopened.
    fn process_crash_and_reopen(&mut self) {
        self.world.process_crash();
        self.io = self.world.io();
        self.img = Self::open(&self.world, &self.io, &self.file, &self.base);
    }

    /// Makes every completed write durable behind the engine's back (a flush of the storage
    /// alone, no journal write).
    fn flush_storage(&self) {
        let (io, f) = (self.io.clone(), self.file.clone());
        self.world
            .block_on(async move { fvd::io::Io::flush(&io, &f).await })
            .unwrap();
    }

    /// What journal sector `i` of the current header is: `Some(intent?)` if it is a valid
    /// sector of the header's epoch at that position.
    fn journal_sector(&self, i: u64) -> Option<bool> {
        let h = self.img.header();
        let raw = self
            .file
            .read_now(h.journal_offset + i * SECTOR, SECTOR as usize);
        fvd::format::journal::decode_any(&raw, h.journal_epoch, i).map(|(_, intent)| intent)
    }

    /// Writes each block of `blocks` whole, one after the other, with value `id`.
    fn write_blocks(&self, id: u64, blocks: impl IntoIterator<Item = u64>) {
        let blocks: Vec<u64> = blocks.into_iter().collect();
        let (img, io) = (self.img.clone(), self.io.clone());
        self.world
            .block_on(async move {
                for b in blocks {
                    img.write(&io, VirtOffset(b * BS), block_data(id, b))
                        .await?;
                }
                Ok::<_, fvd::engine::EngineError>(())
            })
            .unwrap();
    }

    fn flush(&self) {
        let (img, io) = (self.img.clone(), self.io.clone());
        self.world
            .block_on(async move { img.flush(&io).await })
            .unwrap();
    }

    /// What the first sector of block `b` holds.
    fn read_block(&self, b: u64) -> Decoded {
        let (img, io) = (self.img.clone(), self.io.clone());
        let sec = self.world.block_on(async move {
            let buf = Buf::alloc(512);
            img.read(&io, VirtOffset(b * BS), buf.clone())
                .await
                .unwrap();
            buf.to_vec()
        });
        decode(b * BS / 512, &sec)
    }

    fn expect_block(&self, b: u64, id: u64) {
        match self.read_block(b) {
            Decoded::Value(v) if v == id => {}
            Decoded::Value(v) => panic!("block {b}: value {v}, expected {id}"),
            _ => panic!("block {b}: garbage, expected value {id}"),
        }
    }

    /// The pending write into the journal area, if any: (offset, length).
    fn pending_journal_write(&self) -> Option<(u64, u64)> {
        let h = self.img.header();
        let journal = h.journal_offset..h.journal_offset + h.journal_len;
        self.world
            .pending_writes()
            .into_iter()
            .find(|(off, _)| journal.contains(off))
    }

    /// A FLUSH whose journal write (at the journal's tail) fails, with the sector it was
    /// writing left as garbage if `torn`; returns once the FLUSH returned its write error.
    fn flush_with_failed_journal_write(&self, torn: bool) {
        let mut ex = Executor::default();
        let done = Arc::new(AtomicBool::new(false));
        let (img, io, flag) = (self.img.clone(), self.io.clone(), done.clone());
        ex.spawn(async move {
            let e = img.flush(&io).await.unwrap_err();
            assert_eq!(e.io_op(), Some(IoOp::Write), "{e}");
            flag.store(true, Ordering::SeqCst);
        });
        loop {
            ex.run_ready();
            if let Some((off, len)) = self.pending_journal_write() {
                assert_eq!(
                    off,
                    self.img.header().journal_offset,
                    "the commit writes the tail"
                );
                assert!(self.world.complete_write_at(off, true));
                if torn {
                    self.file.write_now(off, &vec![0xA5; len as usize]);
                }
                break;
            }
            assert!(self.world.complete_one(), "the FLUSH wrote no journal");
        }
        run_until(&self.world, &mut ex, &done);
    }

    fn checkpoints(&self) -> u64 {
        self.img.counters().checkpoints.load(Ordering::Relaxed)
    }

    fn journal_used(&self) -> u64 {
        let img = self.img.clone();
        self.world.block_on(async move { img.journal_used().await })
    }
}

/// A whole block of value `id`.
fn block_data(id: u64, block: u64) -> Buf {
    let b = Buf::alloc(BS as usize);
    let mut s = [0u8; 512];
    for i in 0..BS / 512 {
        fill(id, block * BS / 512 + i, &mut s);
        b.copy_from_slice(i as usize * 512, &s);
    }
    b
}

/// Journal sectors hold 254 records: 300 writes of non-adjacent blocks make a 2-sector batch.
/// A batch that ends exactly at the end of the journal is journalled; one that would run past
/// it goes into a checkpoint instead, and nothing is written past the journal. Each write puts
/// its record in the journal as an intent first, so the checkpoint comes at the first write
/// whose intent does not fit (batch 4's first, batch 5's 255th), and the records queued after it
/// start the new epoch. All of it survives a power loss.
#[test]
fn multi_sector_batches_at_the_end_of_the_journal() {
    let p = image(2048, 4, 3, false);
    let mut env = Env::new(1, p, 0);
    assert_eq!(env.img.header().journal_len, 3 * SECTOR);
    let c0 = env.checkpoints();
    let batches: [(u64, Vec<u64>); 5] = [
        (2, vec![0]),
        (3, (1..=300).map(|i| 2 * i).collect()),
        (4, (0..300).map(|i| 1001 + 2 * i).collect()),
        (5, (0..300).map(|i| 1 + 2 * i).collect()),
        (6, (0..300).map(|i| 1002 + 2 * i).collect()),
    ];
    // (journal sectors used, checkpoints so far) after each batch's flush.
    let expect = [(1, 0), (3, 0), (2, 1), (1, 2), (3, 2)];
    for ((id, blocks), (used, ckpts)) in batches.iter().zip(expect) {
        env.write_blocks(*id, blocks.iter().copied());
        env.flush();
        assert_eq!(
            (env.journal_used(), env.checkpoints() - c0),
            (used, ckpts),
            "after batch {id}: (journal sectors used, checkpoints)"
        );
    }
    env.crash_and_reopen();
    for (id, blocks) in &batches {
        for &b in blocks {
            env.expect_block(b, *id);
        }
    }
}

/// Checkpoints after the first one after open rewrite only the metadata sectors changed since
/// that copy was written: here runs [0, 2) and [3, 5) of copy 0, then [0, 1), [2, 3) and
/// [4, 5) of copy 1 (a copy is 6 sectors: bitmap, then 5 table sectors). Nothing outside the
/// inactive copy and the new header slot may change, the flags stay as they were
/// (FLAG_BASE_NOT_NEEDED kept, FLAG_CLEAN clear), and the data survives a power loss.
#[test]
fn checkpoint_writes_only_the_inactive_copy_and_keeps_the_flags() {
    let p = image(4096, 1, 1, true);
    let mut env = Env::new(2, p, 2);
    let h = env.img.header();
    assert_eq!((h.bitmap_sectors, h.table_sectors), (1, 5));
    // Every base block present: the header gets FLAG_BASE_NOT_NEEDED (journal: 1 sector used).
    env.write_blocks(2, [0, 1]);
    let (img, io) = (env.img.clone(), env.io.clone());
    assert!(env
        .world
        .block_on(async move { img.mark_base_not_needed(&io).await })
        .unwrap());
    assert_eq!(env.img.header().flags, FLAG_BASE_NOT_NEEDED);
    let c0 = env.checkpoints();
    // With a 1-sector journal, even steps checkpoint and odd ones journal. Chunk c's entry is
    // in copy sector 1 + c / 1020.
    let steps: [(u64, u64); 5] = [(3, 2100), (4, 3100), (5, 3101), (6, 1100), (7, 3102)];
    for (i, &(id, block)) in steps.iter().enumerate() {
        // Taken before the write: when the journal is full, the write's intent does not fit
        // and the write checkpoints (the FLUSH then has nothing left to journal).
        let before = env.img.header();
        let target = 1 - before.active_meta as usize;
        let meta = before.meta_offset[target]..before.meta_offset[target] + before.meta_len;
        let old = env.file.read_now(0, before.data_offset as usize);
        env.write_blocks(id, [block]);
        env.flush();
        let after = env.img.header();
        assert_eq!(
            after.flags, FLAG_BASE_NOT_NEEDED,
            "header flags after a runtime checkpoint"
        );
        if i % 2 == 1 {
            // The journal was empty: this flush journals.
            assert_eq!(env.checkpoints() - c0, (i as u64).div_ceil(2));
            continue;
        }
        assert_eq!(
            after.active_meta as usize, target,
            "step {i}: no checkpoint"
        );
        let slot = after.slot_offset()..after.slot_offset() + SECTOR;
        let new = env.file.read_now(0, before.data_offset as usize);
        for (s, (a, b)) in old
            .chunks(SECTOR as usize)
            .zip(new.chunks(SECTOR as usize))
            .enumerate()
        {
            let off = s as u64 * SECTOR;
            if a != b && !meta.contains(&off) && !slot.contains(&off) {
                panic!(
                    "step {i}: checkpoint changed sector at {off}, outside the inactive copy \
                     {meta:?} and the header slot {slot:?}"
                );
            }
        }
    }
    assert_eq!(env.checkpoints() - c0, 3);
    env.crash_and_reopen();
    assert_eq!(env.img.header().flags, FLAG_BASE_NOT_NEEDED);
    for (b, id) in [
        (0, 2),
        (1, 2),
        (2100, 3),
        (3100, 4),
        (3101, 5),
        (1100, 6),
        (3102, 7),
    ] {
        env.expect_block(b, id);
    }
}

/// Runs the executor and the world until `flag` is set.
fn run_until(world: &SimWorld, ex: &mut Executor, flag: &AtomicBool) {
    while !flag.load(Ordering::SeqCst) {
        ex.run_ready();
        if !world.complete_one() && !ex.has_ready() && !flag.load(Ordering::SeqCst) {
            panic!("stalled");
        }
    }
}

fn small_image() -> CreateParams {
    image(16, 4, 4, false)
}

/// An image of `blocks` blocks of BS, `chunk_blocks` blocks a chunk, a journal of
/// `journal_sectors` sectors.
fn image(blocks: u64, chunk_blocks: u64, journal_sectors: u64, compact: bool) -> CreateParams {
    CreateParams {
        virtual_size: blocks * BS,
        block_size: BS,
        chunk_size: chunk_blocks * BS,
        journal_size: journal_sectors * SECTOR,
        compact,
        ..Default::default()
    }
}

/// A failed device flush leaves what is durable unknown: the image refuses further writes and
/// FLUSHes until reopened, and the reopened image still has the data of the FLUSH before.
#[test]
fn a_failed_device_flush_poisons_the_image() {
    for seed in 0..8 {
        let mut env = Env::new(seed, small_image(), 0);
        env.write_blocks(1, [0]);
        env.flush();
        env.write_blocks(2, [5]);
        env.world.set_config(SimConfig {
            flush_error_prob: 1.0,
            ..Default::default()
        });
        let (img, io) = (env.img.clone(), env.io.clone());
        let e = env
            .world
            .block_on(async move { img.flush(&io).await })
            .unwrap_err();
        assert_eq!(e.io_op(), Some(IoOp::Flush), "seed {seed}: {e}");
        env.world.set_config(SimConfig::default());
        let (img, io) = (env.img.clone(), env.io.clone());
        let later = env.world.block_on(async move {
            let w = img.write(&io, VirtOffset(6 * BS), block_data(3, 6)).await;
            (w, img.flush(&io).await)
        });
        assert!(
            matches!(later, (Err(EngineError::Failed), Err(EngineError::Failed))),
            "seed {seed}: the image took a write and a FLUSH after a failed device flush"
        );
        env.crash_and_reopen();
        env.expect_block(0, 1);
    }
}

/// A FLUSH whose journal write fails is an ordinary write error: its records are queued again
/// and the image keeps serving; the next FLUSH makes everything durable.
#[test]
fn a_failed_journal_write_does_not_poison_the_image() {
    for seed in 0..8 {
        let mut env = Env::new(seed, small_image(), 0);
        env.write_blocks(1, [0]);
        env.flush_with_failed_journal_write(false);
        env.write_blocks(2, [5]);
        env.flush();
        env.crash_and_reopen();
        env.expect_block(0, 1);
        env.expect_block(5, 2);
    }
}

/// A FLUSH's journal write goes where the intents of completed writes are (the tail), so a
/// failed one may leave that sector damaged: the intents are written again before the FLUSH
/// returns its error, and a crash of the process right after still keeps those writes.
#[test]
fn intents_a_failed_journal_write_damaged_are_written_again() {
    for seed in 0..8 {
        let mut env = Env::new(seed, small_image(), 0);
        env.write_blocks(1, [0]);
        assert_eq!(env.journal_sector(0), Some(true), "the write's intent");
        // The failed write tore what it was writing over.
        env.flush_with_failed_journal_write(true);
        assert!(!env.img.failed(), "seed {seed}: the intents were put back");
        assert_eq!(
            env.journal_sector(0),
            Some(true),
            "seed {seed}: the intent is back"
        );
        env.process_crash_and_reopen();
        env.expect_block(0, 1);
    }
}

/// A FLUSH whose journal write fails queues its records again. A write that completed while
/// that FLUSH was in flight queued a record that needs its data durable first (the block read
/// the base before); the retry must still flush the data before journaling, or a power loss
/// can keep the record and lose the data: the block would read neither the base nor the write.
#[test]
fn retry_after_a_failed_journal_write_still_flushes_data_first() {
    for seed in 0..64 {
        let mut env = Env::new(seed, small_image(), 16);
        env.write_blocks(2, [2]);
        env.flush();
        // DISCARD queues a record that needs no data first.
        let (img, io) = (env.img.clone(), env.io.clone());
        env.world
            .block_on(async move { img.discard(&io, VirtOffset(2 * BS), BS).await })
            .unwrap();
        let mut ex = Executor::default();
        let f1 = Arc::new(AtomicBool::new(false));
        let (img, io, flag) = (env.img.clone(), env.io.clone(), f1.clone());
        ex.spawn(async move {
            assert!(img.flush(&io).await.is_err(), "the journal write failed");
            flag.store(true, Ordering::SeqCst);
        });
        ex.run_ready();
        let (j1, _) = env
            .pending_journal_write()
            .expect("FLUSH 1 writes the journal");
        // While FLUSH 1 waits for its journal write, write block 1 (it read the base).
        let w = Arc::new(AtomicBool::new(false));
        let (img, io, flag) = (env.img.clone(), env.io.clone(), w.clone());
        ex.spawn(async move {
            img.write(&io, VirtOffset(BS), block_data(3, 1))
                .await
                .unwrap();
            flag.store(true, Ordering::SeqCst);
        });
        ex.run_ready();
        let data: Vec<u64> = env
            .world
            .pending_writes()
            .into_iter()
            .map(|(off, _)| off)
            .filter(|&off| off != j1)
            .collect();
        assert_eq!(data.len(), 1, "the write of block 1 is in flight");
        assert!(env.world.complete_write_at(data[0], false));
        ex.run_ready();
        // Its record is queued; it waits for FLUSH 1 to journal it as an intent.
        assert!(
            !w.load(Ordering::SeqCst),
            "the write of block 1 returned unjournaled"
        );
        assert!(env.world.complete_write_at(j1, true));
        run_until(&env.world, &mut ex, &f1);
        run_until(&env.world, &mut ex, &w);
        // The retry: power fails just after its journal write completed.
        let (img, io) = (env.img.clone(), env.io.clone());
        ex.spawn(async move {
            let _ = img.flush(&io).await;
        });
        let mut seen = None;
        loop {
            ex.run_ready();
            let pending = env.pending_journal_write();
            if pending.is_some() {
                seen = pending;
            } else if seen.is_some() {
                break;
            }
            assert!(env.world.complete_one(), "the retry wrote no journal");
        }
        drop(ex);
        env.crash_and_reopen();
        match env.read_block(1) {
            Decoded::Value(v) if v == BASE || v == 3 => {}
            Decoded::Value(v) => panic!("seed {seed}: block 1 reads value {v}, not base or 3"),
            _ => panic!("seed {seed}: block 1 reads garbage"),
        }
    }
}

/// A FLUSH that returned made its writes durable: power lost right after it must keep them
/// (the journal write is flushed before the FLUSH returns).
#[test]
fn data_of_a_returned_flush_survives_a_power_loss() {
    for seed in 0..32 {
        let p = image(16, 4, 4, seed % 2 == 0);
        let mut env = Env::new(seed, p, 0);
        env.write_blocks(2, [3, 9]);
        env.flush();
        env.crash_and_reopen();
        env.expect_block(3, 2);
        env.expect_block(9, 2);
    }
}

/// Power lost during a checkpoint just after the new header reached the disk, before its own
/// flush: the header may survive and point at the new metadata copy, which must then be
/// durable already, or writes made durable by the FLUSH before would be lost with it.
#[test]
fn power_loss_after_the_header_flip_keeps_flushed_data() {
    for seed in 0..32 {
        let p = image(4096, 1, 1, true);
        let mut env = Env::new(seed, p, 0);
        env.write_blocks(2, [2100]);
        env.flush();
        let header = 0..2 * SECTOR;
        let mut ex = Executor::default();
        let (img, io) = (env.img.clone(), env.io.clone());
        // The journal is full: the write's intent does not fit, so the write checkpoints.
        ex.spawn(async move {
            let _ = img
                .write(&io, VirtOffset(3100 * BS), block_data(3, 3100))
                .await;
        });
        let c0 = env.checkpoints();
        let mut seen = false;
        loop {
            ex.run_ready();
            let pending = env
                .world
                .pending_writes()
                .iter()
                .any(|(off, _)| header.contains(off));
            if pending {
                seen = true;
            } else if seen {
                break;
            }
            assert!(env.world.complete_one(), "the checkpoint wrote no header");
        }
        assert_eq!(env.checkpoints() - c0, 1);
        drop(ex);
        env.crash_and_reopen();
        env.expect_block(2100, 2);
        match env.read_block(3100) {
            Decoded::Value(0 | 3) => {}
            _ => panic!("seed {seed}: block 3100 reads neither zeros nor its write"),
        }
    }
}

/// A write that completed without a FLUSH survives a crash of the process: its record is in
/// the journal as an intent, which reopening under the same boot adopts, after flushing the
/// storage (the data may still be only in its volatile cache): a power loss right after the
/// reopen keeps the write.
#[test]
fn intents_are_adopted_after_a_process_crash_and_made_durable() {
    for seed in 0..16 {
        let p = image(64, 4, 4, seed % 2 == 0);
        let mut env = Env::new(seed, p, if seed % 4 < 2 { 0 } else { 64 });
        let h = env.img.header();
        assert!(
            h.intents() && h.boot_id != [0; 16],
            "open read-write announces intents"
        );
        env.write_blocks(2, [3, 40]);
        assert_eq!(
            env.journal_sector(0),
            Some(true),
            "an intent sector at the tail"
        );
        assert_eq!(env.journal_used(), 0, "intents take no journal space");
        env.process_crash_and_reopen();
        env.expect_block(3, 2);
        env.expect_block(40, 2);
        env.crash_and_reopen();
        env.expect_block(3, 2);
        env.expect_block(40, 2);
        // A clean close leaves no intents: an older reader may open the image again.
        let (img, io) = (env.img.clone(), env.io.clone());
        env.world
            .block_on(async move { img.close(&io).await })
            .unwrap();
        let h = env.img.header();
        assert!(!h.intents() && h.boot_id == [0; 16]);
    }
}

/// After a power loss the boot differs and intents are ignored, even where they survived with
/// their data (no FLUSH promised them): the journal replays as if they had never been written,
/// and the image opens without reporting damage.
#[test]
fn intents_of_another_boot_are_ignored() {
    for seed in 0..8 {
        let p = image(64, 4, 4, seed % 2 == 0);
        let mut env = Env::new(seed, p, 0);
        env.write_blocks(2, [5]);
        env.flush();
        env.write_blocks(3, [6, 7]);
        assert_eq!(env.journal_sector(0), Some(false));
        assert_eq!(env.journal_sector(1), Some(true));
        // Intent and data durable, then the host loses power.
        env.flush_storage();
        env.crash_and_reopen();
        env.expect_block(5, 2);
        for b in [6, 7] {
            match env.read_block(b) {
                Decoded::Value(0) => {}
                _ => panic!("seed {seed}: block {b} does not read zeros: intent adopted"),
            }
        }
    }
}

/// Intents past a damaged or missing one (a power loss keeps unflushed sectors in any pattern)
/// are not corruption: the journal is only torn there. Open and `fvd check` accept it, under
/// the same boot (adopting the intents before the gap) and under another (ignoring them all).
#[test]
fn a_damaged_intent_sector_before_later_ones_is_tolerated() {
    for process in [true, false] {
        let p = image(2048, 4, 4, false);
        let mut env = Env::new(7, p, 0);
        // 300 records: intents in journal sectors 0 and 1.
        let blocks: Vec<u64> = (0..300).map(|i| 2 * i).collect();
        env.write_blocks(2, blocks.iter().copied());
        assert_eq!(
            (env.journal_sector(0), env.journal_sector(1)),
            (Some(true), Some(true))
        );
        env.flush_storage();
        let h = env.img.header();
        env.file.write_now(h.journal_offset + 100, &[0xEE; 8]);
        if process {
            env.world.process_crash();
        } else {
            env.world.power_loss();
        }
        env.io = env.world.io();
        super::assert_not_corrupt(&env.world, &env.file, &format!("process crash {process}"));
        env.img = Env::open(&env.world, &env.io, &env.file, &env.base);
        // Sector 0 (the first 254 records) is gone, so is everything after it.
        for &b in &blocks {
            match env.read_block(b) {
                Decoded::Value(0) => {}
                _ => panic!("process crash {process}: block {b} does not read zeros"),
            }
        }
    }
}

/// An intent that does not fit the journal: the write commits like a FLUSH (here a checkpoint)
/// before it completes, so it survives a process crash. (Not necessarily a power loss: block 9
/// read zeros in a fresh chunk, so its data write overlaps the commit.)
#[test]
fn an_intent_that_does_not_fit_commits_instead() {
    let p = image(64, 4, 1, true);
    let mut env = Env::new(3, p, 0);
    env.write_blocks(2, [1]);
    env.flush();
    assert_eq!(env.journal_used(), 1, "the journal is full");
    let c0 = env.checkpoints();
    let i0 = env.img.counters().journal_intents.load(Ordering::Relaxed);
    env.write_blocks(3, [9]);
    assert_eq!(env.checkpoints() - c0, 1, "the write checkpointed");
    assert_eq!(
        env.img.counters().journal_intents.load(Ordering::Relaxed),
        i0,
        "no intent written"
    );
    env.process_crash_and_reopen();
    env.expect_block(1, 2);
    env.expect_block(9, 3);
}

/// A first write into a fresh chunk without a base: its intent write is in flight together
/// with its data write, and the write completes only after both (and then survives a process
/// crash). When the data write fails instead, the block stays absent, also after a process crash
/// or a FLUSH and a power loss: the clearing record follows the journaled set record.
#[test]
fn an_intent_overlaps_the_data_write_of_a_fresh_block() {
    for (fail_data, power_loss) in [(false, false), (true, false), (true, true)] {
        let p = image(16, 4, 4, true);
        let mut env = Env::new(5, p, 0);
        env.write_blocks(2, [1]);
        env.flush();
        let mut ex = Executor::default();
        let done = Arc::new(AtomicBool::new(false));
        let (img, io, flag) = (env.img.clone(), env.io.clone(), done.clone());
        ex.spawn(async move {
            let r = img.write(&io, VirtOffset(9 * BS), block_data(3, 9)).await;
            assert_eq!(r.is_err(), fail_data, "the write's result");
            flag.store(true, Ordering::SeqCst);
        });
        // Complete anything but writes (e.g. the chunk's allocation) until both are issued.
        let (j, data) = loop {
            ex.run_ready();
            let writes = env.world.pending_writes();
            if writes.len() == 2 {
                let j = env
                    .pending_journal_write()
                    .expect("the intent write is in flight with the data write");
                let data = writes.iter().find(|w| w.0 != j.0).unwrap().0;
                break (j.0, data);
            }
            assert!(
                writes.is_empty() && env.world.complete_one(),
                "fail_data {fail_data}: stalled with writes {writes:?}"
            );
        };
        assert!(env.world.complete_write_at(j, false));
        ex.run_ready();
        assert!(
            !done.load(Ordering::SeqCst),
            "the write completed before its data write"
        );
        assert!(env.world.complete_write_at(data, fail_data));
        run_until(&env.world, &mut ex, &done);
        drop(ex);
        let b9 = fvd::units::BlockIndex(9);
        if fail_data {
            assert!(
                !env.img.block_present(b9),
                "a failed first write set its bit"
            );
            // The set record was journaled: the clearing record must follow it into the journal
            // (as an intent before the error is returned, and committed by the next FLUSH).
            if power_loss {
                env.flush();
                env.crash_and_reopen();
            } else {
                env.process_crash_and_reopen();
            }
            assert!(
                !env.img.block_present(b9),
                "power loss {power_loss}: the failed write's bit was adopted"
            );
            env.expect_block(9, 0);
        } else {
            env.process_crash_and_reopen();
            assert!(env.img.block_present(b9));
            env.expect_block(9, 3);
        }
        env.expect_block(1, 2);
    }
}

/// A first write into a chunk past the file's grown length grows the file (by a 64 MiB step);
/// the FLUSH that journals the chunk's table record makes that growth durable first. Power lost
/// right after the journal write, before the FLUSH's own device flush, may keep the record but
/// never the record without the length it maps into: the image opens, the data of the FLUSH
/// before reads back, and the new block reads its write or zeros. 64 seeds: a power loss keeps
/// a random part of what was not flushed.
#[test]
fn a_table_record_is_journaled_only_after_the_file_growth_it_maps_into() {
    const CHUNK_BLOCKS: u64 = (64 << 20) / BS;
    for seed in 0..64 {
        let p = image(4 * CHUNK_BLOCKS, CHUNK_BLOCKS, 4, true);
        let mut env = Env::new(seed, p, 0);
        // Chunk 0 lies in the step grown at open (made durable by the open); chunk 1 does not.
        env.write_blocks(2, [0]);
        env.flush();
        env.write_blocks(3, [CHUNK_BLOCKS]);
        let mut ex = Executor::default();
        let (img, io) = (env.img.clone(), env.io.clone());
        ex.spawn(async move {
            let _ = img.flush(&io).await;
        });
        loop {
            ex.run_ready();
            if let Some((off, _)) = env.pending_journal_write() {
                assert!(env.world.complete_write_at(off, false));
                break;
            }
            assert!(env.world.complete_one(), "the FLUSH wrote no journal");
        }
        drop(ex);
        env.world.power_loss();
        env.io = env.world.io();
        let (io, f) = (env.io.clone(), env.file.clone());
        match env
            .world
            .block_on(async move { Image::open(&io, f, None, false).await })
        {
            Ok(img) => env.img = Arc::new(img),
            Err(e) => panic!("seed {seed}: the image does not open after the power loss: {e}"),
        }
        env.expect_block(0, 2);
        match env.read_block(CHUNK_BLOCKS) {
            Decoded::Value(0 | 3) => {}
            _ => panic!("seed {seed}: the new block reads neither zeros nor its write"),
        }
    }
}

/// Records that reach the image's last block are in range: a FLUSH journals them and replay
/// after a power loss applies them (with and without a partial last block: images of 16
/// blocks and of 15.5; and a flat image of 32640 blocks, as many as its one bitmap sector
/// holds, so the record ends at the end of the metadata).
#[test]
fn records_of_the_last_block_are_journaled_and_replayed() {
    for (size, compact) in [(16 * BS, true), (16 * BS - 2048, true), (32640 * BS, false)] {
        let mut p = small_image();
        p.virtual_size = size;
        p.compact = compact;
        let mut env = Env::new(7, p, 0);
        let last = size.div_ceil(BS) - 1;
        env.write_blocks(2, [0]);
        env.flush();
        let (img, io) = (env.img.clone(), env.io.clone());
        let b = Buf::alloc((size - last * BS) as usize);
        b.copy_from_slice(0, &block_data(3, last).to_vec()[..b.len()]);
        env.world
            .block_on(async move { img.write(&io, VirtOffset(last * BS), b).await })
            .unwrap();
        env.flush();
        env.crash_and_reopen();
        assert_eq!(env.img.header().bitmap_sectors, 1);
        env.expect_block(0, 2);
        env.expect_block(last, 3);
    }
}

/// Replay reads the journal in pieces of 256 sectors: records past the first piece are read
/// from their own place (300 FLUSHes, one journal sector each, then a power loss).
#[test]
fn replay_reads_a_journal_longer_than_one_read() {
    for seed in 0..2 {
        let mut env = Env::new(seed, image(320, 4, 400, seed % 2 == 1), 0);
        for b in 0..300 {
            env.write_blocks(b + 1, [b]);
            env.flush();
        }
        assert_eq!(
            env.checkpoints(),
            0,
            "seed {seed}: all 300 are in the journal"
        );
        assert!(env.journal_used() > 256, "seed {seed}: past the first read");
        env.crash_and_reopen();
        for b in 0..300 {
            env.expect_block(b, b + 1);
        }
    }
}

/// Replay stops at the end of the journal: a sector just past it that looks like the next
/// journal sector of this epoch (the data area is the guest's to fill) is neither replayed nor
/// taken for a later write that proves damage.
#[test]
fn replay_reads_nothing_past_the_journal() {
    for journal_sectors in [1, 300] {
        let mut env = Env::new(journal_sectors, image(64, 4, journal_sectors, false), 0);
        // Block 0 lies right after the journal, where the forged sector goes.
        env.write_blocks(1, [5]);
        env.flush();
        let h = env.img.header();
        let total = h.journal_len / SECTOR;
        let forged = fvd::format::journal::encode(
            &[JournalEntry::SetBits { start: 9, count: 1 }],
            h.journal_epoch,
            total,
        );
        env.file
            .write_now(h.journal_offset + h.journal_len, &forged);
        env.crash_and_reopen();
        env.expect_block(5, 1);
        assert!(
            !env.img.block_present(BlockIndex(9)),
            "{journal_sectors} sectors: a record past the journal was replayed"
        );
    }
}
