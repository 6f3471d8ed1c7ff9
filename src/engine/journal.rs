//! The journal's state: what the request paths queue for the next FLUSH, and what the flush path
//! (flush.rs, one journal write at a time) works on. Owns no I/O: flush.rs writes the sectors.

use super::lock_order::{assert_none_held, Level, Ordered};
use super::metadata::Committed;
use crate::format::{Header, JournalEntry, SECTOR};
use std::sync::atomic::{AtomicU64, Ordering};

/// Metadata records queued for the next flush.
#[derive(Default)]
struct Pending {
    records: Vec<JournalEntry>,
    /// Some record must not become durable before the data it describes (see flush.rs).
    data_first: bool,
    /// Queue number of `records[0]` (records are numbered from the open on).
    base: u64,
}

impl Pending {
    /// Queue number after the newest record.
    fn end(&self) -> u64 {
        self.base + self.records.len() as u64
    }
}

/// State owned by the flush path (one flush at a time): the header, the committed metadata and
/// the journal's write position.
pub(super) struct FlushState {
    pub header: Header,
    pub committed: Committed,
    /// Journal sectors used in the current epoch (intents past it are not counted).
    pub tail: u64,
    /// Queue number up to which queued records are in the journal of this epoch, as normal
    /// records or intents (see [`Pending::base`]).
    pub journaled: u64,
}

/// What a flush took from the queue: the records, and the chunks their unmaps free.
pub(super) struct Taken {
    pub records: Vec<JournalEntry>,
    pub data_first: bool,
    /// Queue number of `records[0]`.
    pub from: u64,
    pub freed: Vec<u32>,
}

pub(super) struct Journal {
    pending: Ordered<Pending>,
    /// Physical chunks unmapped since the last flush: allocatable once their unmap is durable.
    freed: Ordered<Vec<u32>>,
    state: futures::lock::Mutex<FlushState>,
    /// `FlushState::journaled`, readable without the lock (writers that queued nothing new).
    journaled: AtomicU64,
    /// The header as last written, readable without the flush state.
    header: Ordered<Header>,
    /// Byte offset and length in sectors of the journal area.
    offset: u64,
    sectors: u64,
}

impl Journal {
    pub(super) fn new(header: Header, committed: Committed, tail: u64) -> Journal {
        Journal {
            pending: Ordered::default_at(Level::Pending, "pending"),
            freed: Ordered::default_at(Level::Freed, "freed"),
            offset: header.journal_offset,
            sectors: header.journal_len / SECTOR as u64,
            header: Ordered::new(Level::Leaf, "header_snapshot", header.clone()),
            state: futures::lock::Mutex::new(FlushState {
                header,
                committed,
                tail,
                journaled: 0,
            }),
            journaled: AtomicU64::new(0),
        }
    }

    /// The flush state, waited for with no synchronous lock held (see [`super::lock_order`]).
    pub(super) async fn lock_state(&self) -> futures::lock::MutexGuard<'_, FlushState> {
        assert_none_held("flush_state");
        self.state.lock().await
    }

    /// The header as last written.
    pub(super) fn header(&self) -> Header {
        self.header.lock().clone()
    }

    /// Journal sectors in the area.
    pub(super) fn sectors(&self) -> u64 {
        self.sectors
    }

    /// Byte offset of journal sector `sector`.
    pub(super) fn sector_offset(&self, sector: u64) -> u64 {
        self.offset + sector * SECTOR as u64
    }

    /// Queue number up to which records are in the journal, without the flush state.
    pub(super) fn journaled(&self) -> u64 {
        self.journaled.load(Ordering::Acquire)
    }

    /// Records that queued records up to `upto` are in the journal (`fs.journaled`, published).
    pub(super) fn set_journaled(&self, fs: &mut FlushState, upto: u64) {
        fs.journaled = upto;
        self.journaled.store(upto, Ordering::Release);
    }

    /// After a durable header write: `fs` and the snapshot both hold `h`.
    pub(super) fn header_written(&self, fs: &mut FlushState, h: Header) {
        *self.header.lock() = h.clone();
        fs.header = h;
    }

    /// Queues `records`; `data_first` if one must not be durable before its data. Returns the
    /// queue number after them.
    pub(super) fn queue(
        &self,
        data_first: bool,
        records: impl IntoIterator<Item = JournalEntry>,
    ) -> u64 {
        let mut pending = self.pending.lock();
        pending.data_first |= data_first;
        pending.records.extend(records);
        pending.end()
    }

    /// Queues `record` and runs `then` before another flush can take it (a change of the live
    /// metadata that must not be seen by a flush without its record).
    pub(super) fn queue_with(&self, record: JournalEntry, then: impl FnOnce()) {
        let mut pending = self.pending.lock();
        pending.records.push(record);
        then();
    }

    /// Queues the unmap of virtual chunk `chunk` whose physical chunk `phys` becomes free once
    /// the record is durable.
    pub(super) fn queue_unmap(&self, chunk: u64, phys: u32) {
        let mut pending = self.pending.lock();
        pending.records.push(JournalEntry::Unmap { chunk });
        self.freed.lock().push(phys);
    }

    /// Queue number after the newest queued record.
    pub(super) fn end(&self) -> u64 {
        self.pending.lock().end()
    }

    /// Takes every queued record (and the chunks they free) for a flush.
    pub(super) fn take(&self) -> Taken {
        let mut pending = self.pending.lock();
        let freed = std::mem::take(&mut *self.freed.lock());
        let from = pending.base;
        pending.base = pending.end();
        let records = std::mem::take(&mut pending.records);
        let data_first = std::mem::take(&mut pending.data_first);
        Taken {
            records,
            data_first,
            from,
            freed,
        }
    }

    /// Puts back what a failed flush took, ahead of records queued since.
    pub(super) fn requeue(&self, t: Taken) {
        let mut pending = self.pending.lock();
        let newer = std::mem::replace(&mut pending.records, t.records);
        pending.records.extend(newer);
        pending.base = t.from;
        pending.data_first |= t.data_first;
        self.freed.lock().extend(t.freed);
    }

    /// The queued records from the journal sector past the tail that holds the oldest one not
    /// yet journaled (`journaled`): that sector's index past the tail, its records and the rest,
    /// and the queue number after them.
    pub(super) fn unjournaled(
        &self,
        journaled: u64,
        per_sector: u64,
    ) -> (Vec<JournalEntry>, u64, u64) {
        let p = self.pending.lock();
        let first = (journaled - p.base) / per_sector;
        (
            p.records[(first * per_sector) as usize..].to_vec(),
            first,
            p.end(),
        )
    }
}
