//! FLUSH, the journal and checkpoints: the crash-consistency contract lives here.
//!
//! A guest FLUSH:
//! 1. takes the metadata records queued by writes that completed before it,
//! 2. flushes the storage: every completed data write is now durable,
//! 3. appends the records to the journal and flushes again.
//!
//! So a journal record never becomes durable before data it depends on, and a FLUSH costs one
//! device flush without metadata changes and two with. Step 2 is skipped when no record depends
//! on data: records that map chunks or clear bits expose no data by themselves, and a bit set
//! for a block that read zeros before (no base image) whose storage reads zeros until written
//! (a fresh chunk: past the end of the file at open, not discarded since) leaves the block
//! reading as before if its data is lost. Then the one flush after the journal write makes data
//! and records durable together.
//!
//! A write (or discard) that queued records does not complete before those records are in the
//! journal as *intent* sectors (written, not flushed), so they survive a crash of this process:
//! the host still holds every completed write. Intents fill the journal from the tail, where the
//! next FLUSH writes the same records (and newer ones) as normal sectors over them, so they use
//! no journal space of their own. Sector `i` past the tail always holds queued records
//! `[254 i, 254 (i + 1))` since the last FLUSH took its records, so a later intent only rewrites
//! the last partial sector and appends. Replay adopts intents only under the boot that wrote them
//! (the header records it); after a power loss they are ignored, and the journal up to the first
//! intent is exactly what it would have been without them. One journal write is in flight at a
//! time (the flush state lock); records queued meanwhile go into the next one.
//!
//! When the journal is full, the records go into a checkpoint instead: the committed metadata is
//! written to the *inactive* copy (nothing points at it yet), one flush makes data and that copy
//! durable, then the header flips to it with a new journal epoch and a second flush. Journal
//! space is reused only after that flip.

use super::counters::Counters;
use super::error::{IoOp, Result};
use super::image::Image;
use super::journal::FlushState;
use crate::format::header::{FLAG_CLEAN, INCOMPAT_INTENTS};
use crate::format::{journal, Header, JournalEntry, SECTOR};
use crate::io::{Buf, Io, IoFile};
use crate::units::PhysOffset;
use std::sync::atomic::Ordering;

impl<I: Io> Image<I> {
    /// Makes every write that completed before this call durable, with its metadata.
    pub async fn flush(&self, io: &I) -> Result<()> {
        Counters::inc(&self.counters.guest_flushes);
        self.sync(io).await
    }

    /// The work of a FLUSH, also done internally (to make freed chunks reusable).
    pub(super) async fn sync(&self, io: &I) -> Result<()> {
        if self.read_only {
            return Ok(());
        }
        self.check_writable()?;
        let mut fs = self.journal.lock_state().await;
        self.sync_locked(io, &mut fs).await
    }

    pub(super) async fn sync_locked(&self, io: &I, fs: &mut FlushState) -> Result<()> {
        // Their unmap records go with this flush.
        self.retry_unmaps();
        let taken = self.journal.take();
        let (records, data_first, taken_from) = (&taken.records, taken.data_first, taken.from);
        // Taken after the records (the allocator grows the file before queueing a table
        // record): a record mapping a chunk of a growth that no flush covered yet must wait for
        // the data flush, or a crash could keep the mapping and lose the file's new length.
        let growth = self.space.alloc().undurable_growth();
        let grows = growth.is_some()
            && records
                .iter()
                .any(|r| matches!(r, JournalEntry::Map { .. }));
        let r = self.commit(io, fs, records, data_first || grows).await;
        if r.is_ok() {
            // Normal sectors (or the checkpoint) hold them now; intents past the new tail are
            // for records queued from here on.
            let end = taken_from + records.len() as u64;
            let journaled = fs.journaled.max(end);
            self.journal.set_journaled(fs, journaled);
            // Their unmap records are durable now: the chunks may be reused.
            let mut alloc = self.space.alloc();
            alloc.release(taken.freed);
            if let Some(len) = growth {
                alloc.growth_durable(len);
            }
        } else if let Err(e) = &r {
            let device_flush_failed = e.io_op() == Some(IoOp::Flush);
            // The records describe data that is still in place: queue them again, ahead of newer ones.
            let had_records = !records.is_empty();
            self.journal.requeue(taken);
            // The failed journal write may have damaged intent sectors of completed requests.
            self.journal.set_journaled(fs, taken_from);
            if device_flush_failed {
                // After a failed device flush we cannot know what is durable; journaling the
                // records later could point at lost data.
                self.failed.store(true, Ordering::Release);
            } else if had_records
                && fs.header.boot_id != [0; 16]
                && !matches!(self.write_intents(io, fs).await, Ok(true))
            {
                // Their intents could not be put back: a crash of the process could now lose
                // completed requests, so refuse further ones until reopened.
                self.failed.store(true, Ordering::Release);
            }
        }
        r
    }

    /// Returns once the records queued up to queue number `upto` are in the journal (as intents
    /// or normal records), so that a crash of this process cannot lose them. Called before a
    /// write or discard that queued them completes.
    pub(super) async fn persist(&self, io: &I, upto: u64) -> Result<()> {
        if self.read_only || self.journal.journaled() >= upto {
            return Ok(());
        }
        let mut fs = self.journal.lock_state().await;
        if fs.journaled >= upto {
            // Another writer's journal write took ours along.
            return Ok(());
        }
        self.check_writable()?;
        if fs.header.boot_id == [0; 16] {
            // The storage's boot is unknown: replay would ignore intents.
            return Ok(());
        }
        match self.write_intents(io, &mut fs).await {
            Ok(true) => Ok(()),
            // No room for the intent, or its write failed (and may have damaged the sector
            // holding earlier requests' intents): the full FLUSH work instead, whose journal
            // write (or checkpoint) replaces the intent area.
            Ok(false) | Err(_) => self.sync_locked(io, &mut fs).await,
        }
    }

    /// Writes the queued records not yet in the journal as intents; `Ok(false)` if they do
    /// not fit in it.
    async fn write_intents(&self, io: &I, fs: &mut FlushState) -> Result<bool> {
        let per = journal::ENTRIES_PER_SECTOR as u64;
        // Sector `first` past the tail holds the oldest record not yet journaled; it is
        // rewritten whole (it may hold earlier records) and the rest appended.
        let (records, first, end) = self.journal.unjournaled(fs.journaled, per);
        if fs.tail + first + journal::sectors_for(records.len()) > self.journal.sectors() {
            return Ok(false);
        }
        let bytes = journal::encode_part(&records, fs.header.journal_epoch, fs.tail, first, true);
        Counters::inc(&self.counters.journal_intents);
        self.write_journal(io, fs.tail + first, &bytes).await?;
        self.journal.set_journaled(fs, end);
        Ok(true)
    }

    async fn commit(
        &self,
        io: &I,
        fs: &mut FlushState,
        records: &[JournalEntry],
        data_first: bool,
    ) -> Result<()> {
        if records.is_empty() {
            return self.store.flush(io, &self.counters).await;
        }
        let nsec = journal::sectors_for(records.len());
        if fs.tail + nsec > self.journal.sectors() {
            fs.committed.apply(records)?;
            return self.checkpoint(io, fs, false).await;
        }
        if data_first {
            self.store.flush(io, &self.counters).await?;
        } else {
            Counters::inc(&self.counters.journal_unordered);
        }
        let bytes = journal::encode(records, fs.header.journal_epoch, fs.tail);
        Counters::inc(&self.counters.journal_writes);
        self.write_journal(io, fs.tail, &bytes).await?;
        self.store.flush(io, &self.counters).await?;
        fs.tail += nsec;
        fs.committed.apply(records)?;
        Ok(())
    }

    /// Writes encoded journal sectors starting at journal sector `sector` (no flush).
    async fn write_journal(&self, io: &I, sector: u64, bytes: &[u8]) -> Result<()> {
        let buf = Buf::alloc(bytes.len());
        buf.copy_from_slice(0, bytes);
        self.store
            .write(
                io,
                &self.counters,
                PhysOffset(self.journal.sector_offset(sector)),
                buf,
            )
            .await
    }

    /// Writes the committed metadata to the inactive copy and flips the header to it with a new
    /// journal epoch. `clean` marks a clean shutdown.
    pub(super) async fn checkpoint(&self, io: &I, fs: &mut FlushState, clean: bool) -> Result<()> {
        self.checkpoint_changing(io, fs, clean, |_| {}).await
    }

    /// A checkpoint whose header also gets `change` (a resize: the new size takes effect with
    /// the copy that describes it, in one header write).
    pub(super) async fn checkpoint_changing(
        &self,
        io: &I,
        fs: &mut FlushState,
        clean: bool,
        change: impl FnOnce(&mut Header),
    ) -> Result<()> {
        Counters::inc(&self.counters.checkpoints);
        let target = 1 - fs.header.active_meta;
        let base_off = fs.header.meta_offset[target as usize];
        for (start, end) in fs.committed.dirty_runs(target) {
            // At most 1 MiB per write keeps the bounce buffer small.
            let mut s = start;
            while s < end {
                let n = (end - s).min(256);
                let buf = Buf::alloc(n as usize * SECTOR);
                let mut sector = vec![0u8; SECTOR];
                for i in 0..n {
                    fs.committed.encode_sector(s + i, &mut sector);
                    buf.copy_from_slice(i as usize * SECTOR, &sector);
                }
                self.store
                    .write(
                        io,
                        &self.counters,
                        PhysOffset(base_off + s * SECTOR as u64),
                        buf,
                    )
                    .await?;
                s += n;
            }
        }
        // Data and the new copy become durable before the header points at the copy.
        self.store.flush(io, &self.counters).await?;
        // Above every epoch in the journal area: open started this run's first epoch above
        // them all, and only this run's epochs were written since.
        let epoch = super::replay::next_epoch(fs.header.journal_epoch)?;
        self.write_header(io, fs, |h| {
            change(h);
            h.active_meta = target;
            h.journal_epoch = epoch;
            if clean {
                h.flags |= FLAG_CLEAN;
            } else {
                h.flags &= !FLAG_CLEAN;
            }
        })
        .await?;
        fs.committed.mark_written(target);
        fs.tail = 0;
        Ok(())
    }

    /// Writes the next header generation (to the other slot) and flushes it.
    pub(super) async fn write_header(
        &self,
        io: &I,
        fs: &mut FlushState,
        change: impl FnOnce(&mut Header),
    ) -> Result<()> {
        let mut h = fs.header.clone();
        change(&mut h);
        h.generation += 1;
        // Intents may be written in this epoch unless the image is being closed cleanly; they are
        // replayed only under the boot recorded here.
        if h.clean() {
            h.incompat &= !INCOMPAT_INTENTS;
            h.boot_id = [0; 16];
        } else {
            h.incompat |= INCOMPAT_INTENTS;
            h.boot_id = self.store.file.boot_id().unwrap_or([0; 16]);
        }
        let buf = Buf::alloc(SECTOR);
        buf.copy_from_slice(0, &h.encode());
        let written = async {
            self.store
                .write(io, &self.counters, PhysOffset(h.slot_offset()), buf)
                .await?;
            self.store.flush(io, &self.counters).await
        };
        if let Err(e) = written.await {
            // The new header may or may not be on disk; if it is, its epoch and active copy
            // differ from ours, and anything journaled next would be ignored on open.
            self.failed.store(true, Ordering::Release);
            return Err(e);
        }
        self.journal.header_written(fs, h);
        Ok(())
    }

    /// Journal sectors in use in the current epoch (tests, `fvd info`).
    pub async fn journal_used(&self) -> u64 {
        self.journal.lock_state().await.tail
    }
}
