//! Reading an image's regions and replaying its journal: what open and `fvd check` share.

use super::counters::Counters;
use super::error::{Corruption, EngineError, IoContext, IoOp, Result};
use super::problem::Problem;
use super::storage::Storage;
use crate::format::{journal, Header, JournalEntry, SECTOR};
use crate::io::{Buf, Io, IoFile};
use crate::units::PhysOffset;

/// Size of the image's file or block device.
pub(super) fn storage_len<I: Io>(store: &Storage<I>) -> Result<u64> {
    store.file.size().ctx(IoOp::Size, "size of image storage")
}

/// Every region the header names ends by `data_offset` (the header's validation orders them),
/// and the storage holds at least that much: `fvd create` writes both metadata copies and sizes
/// a file to the data area (a device is refused when smaller), and nothing ever shrinks the
/// storage. Storage that ends before it was truncated, or the header lies. Checked before
/// anything reads, scans or allocates by the header's sizes, so neither time nor memory follows
/// a size the storage cannot hold.
pub(super) fn check_regions_fit(h: &Header, len: u64) -> Result<()> {
    if len < h.data_offset {
        return Err(EngineError::Corrupt(Corruption::StorageTruncated {
            len,
            data_offset: h.data_offset,
        }));
    }
    Ok(())
}

/// The journal epoch after `epoch`. Epochs start below 2^33 and advance once per checkpoint, so
/// only a damaged header or journal can exhaust them.
pub(super) fn next_epoch(epoch: u64) -> Result<u64> {
    epoch
        .checked_add(1)
        .ok_or(EngineError::Corrupt(Corruption::EpochExhausted { epoch }))
}

/// Reads `len` bytes at `off` into a fresh buffer.
pub(super) async fn read_region<I: Io>(
    io: &I,
    store: &Storage<I>,
    c: &Counters,
    off: u64,
    len: u64,
) -> Result<Vec<u8>> {
    let buf = Buf::alloc(len as usize);
    store.read(io, c, PhysOffset(off), buf.clone()).await?;
    Ok(buf.to_vec())
}

/// What [`replay`] found in the journal.
pub(super) struct Replayed {
    pub entries: Vec<JournalEntry>,
    /// Valid sectors of the header's epoch, from the start.
    pub tail: u64,
    /// Damage that a torn write cannot explain: flushed records follow the tail.
    pub damage: Option<Problem>,
    /// Records of the valid sectors of the header's epoch past the tail, each at its own
    /// position (written by later flushes when the tail is damage): what repair keeps.
    pub later: Vec<JournalEntry>,
    /// Highest epoch of a valid sector at its position (the header's if none is newer): a new
    /// epoch must exceed it, or sectors left in the journal area (of a lost header's epoch, of an
    /// older image, or crafted) would be replayed as records of the new epoch.
    pub newest_epoch: u64,
    /// Some replayed records came from intent sectors.
    pub intents: bool,
}

/// True if the intent sectors of `h`'s epoch are to be replayed: they were written under the
/// storage's current boot, so every write that completed before them is still in the storage.
/// After a power loss they are ignored: no completed FLUSH needs them.
pub(super) fn adopt_intents<F: IoFile>(h: &Header, file: &F) -> bool {
    h.intents() && h.boot_id != [0; 16] && file.boot_id() == Some(h.boot_id)
}

/// Reads the journal of the header's epoch.
///
/// Replay ends at the first sector that is not a valid sector of the epoch at its position (or
/// at an intent sector, unless [`adopt_intents`]). That is a torn tail only if nothing written
/// later survives: the rest of the journal is scanned, and a valid sector of this epoch appended
/// by a later write, or any sector of the next epoch (whose header must then have been durable),
/// proves damage. Intents are written from the tail, as part of the next normal write there, so
/// lost or ignored intents never look like damage.
pub(super) async fn replay<I: Io>(
    io: &I,
    store: &Storage<I>,
    c: &Counters,
    h: &Header,
) -> Result<Replayed> {
    let adopt = adopt_intents(h, &store.file);
    let total = h.journal_len / SECTOR as u64;
    let per_read = 256u64; // 1 MiB
    let mut r = Replayed {
        entries: Vec::new(),
        tail: total,
        damage: None,
        later: Vec::new(),
        newest_epoch: h.journal_epoch,
        intents: false,
    };
    let mut ended = false;
    let mut pos = 0u64;
    while pos < total {
        let n = per_read.min(total - pos);
        let raw = read_region(
            io,
            store,
            c,
            h.journal_offset + pos * SECTOR as u64,
            n * SECTOR as u64,
        )
        .await?;
        for sector in raw.chunks(SECTOR) {
            if !ended {
                match journal::decode_any(sector, h.journal_epoch, pos) {
                    Some((e, intent)) if adopt || !intent => {
                        r.entries.extend(e);
                        r.intents |= intent;
                        pos += 1;
                        continue;
                    }
                    _ => {}
                }
                ended = true;
                r.tail = pos;
            }
            after_tail(&mut r, sector, h.journal_epoch, pos, adopt);
            pos += 1;
        }
    }
    Ok(r)
}

/// Journal sector at `pos`, at or after the end of the replayed journal of `epoch`: records
/// whether it proves that the journal was damaged rather than torn.
fn after_tail(r: &mut Replayed, sector: &[u8], epoch: u64, pos: u64, adopt: bool) {
    let Some(id) = journal::identify(sector) else {
        return;
    };
    if id.seq != pos {
        return;
    }
    let tail = r.tail;
    r.newest_epoch = r.newest_epoch.max(id.epoch);
    let ignored_intent = id.intent && !adopt;
    if id.epoch == epoch && pos > tail && !ignored_intent {
        if let Some((e, _)) = journal::decode_any(sector, epoch, pos) {
            r.later.extend(e);
        }
    }
    let damage = if Some(id.epoch) == epoch.checked_add(1) {
        Some(format!(
            "belongs to epoch {}, newer than the header's {epoch}: the newest header slot is damaged",
            id.epoch
        ))
    } else if id.epoch != epoch {
        None
    } else if pos == tail && !ignored_intent {
        Some("has a valid checksum but invalid records".into())
    } else if id.commit_start.is_some_and(|s| s > tail) {
        Some(format!(
            "was written after sector {tail}, which is damaged: flushed records would be lost"
        ))
    } else {
        None
    };
    if let Some(what) = damage {
        r.damage
            .get_or_insert(Problem::JournalDamaged { sector: pos, what });
    }
}
