//! Consistency checks of loaded metadata, shared by open (refuse), `fvd check` (report) and
//! `fvd check --repair` (fix).
//!
//! `check` and `repair` never trust one structure to read the next: every metadata sector is
//! verified on its own, a damaged sector of the active copy is taken from the other copy when that
//! one is valid there, journal records that name blocks or chunks outside the image are skipped,
//! and what could not be recovered is reported as lost byte ranges of the virtual disk.

use super::counters::Counters;
use super::error::{EngineError, IoContext, IoOp, Result};
use super::metadata::Committed;
use super::storage::Storage;
use crate::format::header::{pick_header, FLAG_CLEAN};
use crate::format::metadata::{self as md, BITS_PER_SECTOR, ENTRIES_PER_SECTOR};
use crate::format::{journal, FormatError, Header, JournalEntry, SECTOR};
use crate::io::{Buf, Io, IoFile};
use crate::units::{PhysChunk, PhysOffset};
use serde::Serialize;
use std::collections::HashMap;

pub use super::problem::Problem;

/// Virtual bytes whose data a repair dropped (`certain`) or may have replaced with an older
/// version or dropped (not `certain`). After repair they read from the base image or as zeros,
/// or (possibly lost) as the metadata copy taken from the other slot says.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Loss {
    pub certain: bool,
    pub start: u64,
    pub end: u64,
    pub why: String,
}

impl std::fmt::Display for Loss {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}: bytes {:#x}..{:#x} ({})",
            if self.certain {
                "Lost"
            } else {
                "Possibly lost"
            },
            self.start,
            self.end,
            self.why
        )
    }
}

/// The losses a repair of `problems` causes, merged where they overlap.
fn losses(problems: &[Problem], h: &Header) -> Vec<Loss> {
    let geo = h.geometry();
    let chunk = |c: u64| {
        (
            c * geo.chunk_size,
            ((c + 1) * geo.chunk_size).min(geo.virtual_size),
        )
    };
    let mut out: Vec<Loss> = Vec::new();
    for p in problems {
        let (certain, (start, end)) = match p {
            Problem::MetadataSector {
                recovered,
                start,
                end,
                ..
            } => (!recovered, (*start, *end)),
            Problem::BitsInUnallocatedChunk { chunk: c }
            | Problem::DuplicateMapping { chunk: c, .. }
            | Problem::ChunkBeyondDevice { chunk: c, .. } => (true, chunk(*c)),
            Problem::DataBeyondEnd { block } => (true, (block * geo.block_size, geo.virtual_size)),
            Problem::StaleHeader { exact: true, .. } => continue,
            Problem::StaleHeader { exact: false, .. } => (false, (0, geo.virtual_size)),
            Problem::JournalDamaged { sector, .. } => {
                out.push(Loss {
                    certain: false,
                    start: 0,
                    end: 0,
                    why: format!(
                        "the records of journal sector {sector} are unreadable; the ranges they \
                         named are unknown"
                    ),
                });
                continue;
            }
            Problem::JournalRecord { position, record } => {
                out.push(Loss {
                    certain: false,
                    start: 0,
                    end: 0,
                    why: format!("journal record {position} ({record}) was skipped; the range it stood for is unknown"),
                });
                continue;
            }
            Problem::NoValidHeader { .. }
            | Problem::Truncated { .. }
            | Problem::EmptyChunk { .. } => continue,
        };
        out.push(Loss {
            certain,
            start,
            end,
            why: p.to_string(),
        });
    }
    out
}

/// Finds inconsistencies in committed metadata (the rules open enforces).
pub(super) fn find_problems(c: &Committed, h: &Header, storage_size: Option<u64>) -> Vec<Problem> {
    find_problems_with(c, h, storage_size, &[])
}

/// Like [`find_problems`]; chunks marked in `suspect` (table entries taken from the other,
/// possibly older, metadata copy) lose to any other claim on the same physical chunk.
fn find_problems_with(
    c: &Committed,
    h: &Header,
    storage_size: Option<u64>,
    suspect: &[bool],
) -> Vec<Problem> {
    let mut out = Vec::new();
    let geo = h.geometry();
    if !h.compact() {
        // Raw-like: block b lives at data_offset + b * block_size; the file is grown to its
        // full size before any write (read-write open), so a present block past its end was cut.
        if let Some(size) = storage_size {
            let inside = size.saturating_sub(h.data_offset) / geo.block_size;
            let first_word = (inside / 64) as usize;
            let found = c
                .bits
                .iter()
                .enumerate()
                .skip(first_word)
                .find_map(|(i, &w)| {
                    let w = if i == first_word {
                        w & u64::MAX.checked_shl((inside % 64) as u32).unwrap_or(0)
                    } else {
                        w
                    };
                    (w != 0).then(|| i as u64 * 64 + w.trailing_zeros() as u64)
                });
            // Stray bits past the last block are not data (and nothing reads them).
            let found = found.filter(|&b| b < geo.block_count());
            if let Some(block) = found {
                out.push(Problem::DataBeyondEnd { block });
            }
        }
        return out;
    }
    let bpc = geo.blocks_per_chunk();
    // Physical chunk -> (first virtual chunk mapping it, whether that entry is suspect, whether
    // it was reported).
    let mut owner: HashMap<u32, (u64, bool, bool)> = HashMap::new();
    let cap = storage_size.map(|s| s.saturating_sub(h.data_offset) / geo.chunk_size);
    let is_suspect = |v: u64| suspect.get(v as usize).copied().unwrap_or(false);
    for pass_suspect in [false, true] {
        for (v, &p) in c.table.iter().enumerate() {
            let v = v as u64;
            if is_suspect(v) != pass_suspect {
                continue;
            }
            if p == PhysChunk::UNALLOCATED.0 {
                let first = v * bpc;
                let last = ((v + 1) * bpc).min(geo.block_count());
                if (first..last).any(|b| c.bits[(b / 64) as usize] & (1 << (b % 64)) != 0) {
                    out.push(Problem::BitsInUnallocatedChunk { chunk: v });
                }
                continue;
            }
            if let Some((first, first_suspect, reported)) = owner.get_mut(&p) {
                // Nothing tells which of two equally trusted entries is right: neither keeps
                // the chunk, so neither can read the other's data.
                if *first_suspect == pass_suspect && !*reported {
                    *reported = true;
                    out.push(Problem::DuplicateMapping {
                        chunk: *first,
                        phys: p,
                    });
                }
                out.push(Problem::DuplicateMapping { chunk: v, phys: p });
            } else if cap.is_some_and(|cap| p as u64 >= cap) {
                out.push(Problem::ChunkBeyondDevice { chunk: v, phys: p });
            } else {
                owner.insert(p, (v, pass_suspect, false));
            }
        }
    }
    out
}

/// Leaks: mapped chunks with no present block (not counting chunks other problems unmap).
fn find_leaks(c: &Committed, h: &Header, problems: &[Problem]) -> Vec<Problem> {
    let geo = h.geometry();
    let bpc = geo.blocks_per_chunk();
    let fixed: std::collections::HashSet<u64> = problems
        .iter()
        .filter_map(|p| match p {
            Problem::DuplicateMapping { chunk, .. } | Problem::ChunkBeyondDevice { chunk, .. } => {
                Some(*chunk)
            }
            _ => None,
        })
        .collect();
    let mut out = Vec::new();
    for (v, &p) in c.table.iter().enumerate() {
        let v = v as u64;
        if p == PhysChunk::UNALLOCATED.0 || fixed.contains(&v) {
            continue;
        }
        let first = v * bpc;
        let last = ((v + 1) * bpc).min(geo.block_count());
        if !(first..last).any(|b| c.bits[(b / 64) as usize] & (1 << (b % 64)) != 0) {
            out.push(Problem::EmptyChunk { chunk: v, phys: p });
        }
    }
    out
}

/// Applies the repairs for `problems` to committed metadata.
pub(super) fn fix_problems(c: &mut Committed, h: &Header, problems: &[Problem]) {
    let bpc = h.geometry().blocks_per_chunk();
    let nblocks = h.geometry().block_count();
    let mut entries = Vec::new();
    for p in problems {
        let chunk = match *p {
            Problem::JournalDamaged { .. } => continue,
            Problem::DataBeyondEnd { block } => {
                entries.push(JournalEntry::ClearBits {
                    start: block,
                    count: nblocks - block,
                });
                continue;
            }
            Problem::BitsInUnallocatedChunk { chunk } => chunk,
            Problem::DuplicateMapping { chunk, .. }
            | Problem::ChunkBeyondDevice { chunk, .. }
            | Problem::EmptyChunk { chunk, .. } => {
                entries.push(JournalEntry::Unmap { chunk });
                chunk
            }
            // Resolved while loading (sector taken from the other copy or left empty, record
            // skipped), or not repairable.
            Problem::NoValidHeader { .. }
            | Problem::Truncated { .. }
            | Problem::StaleHeader { .. }
            | Problem::MetadataSector { .. }
            | Problem::JournalRecord { .. } => continue,
        };
        let start = chunk * bpc;
        entries.push(JournalEntry::ClearBits {
            start,
            count: bpc.min(nblocks - start),
        });
    }
    // Entries are built from the table and the bitmap themselves, so they are in range.
    let _ = c.apply(&entries);
}

/// Metadata as far as it survives: the active copy, damaged sectors taken from the other copy
/// where valid, then the journal (records outside the image skipped), and what is wrong.
struct Salvaged {
    /// Highest epoch of a valid journal sector: the repaired image's epoch must exceed it, or
    /// sectors of a lost header's epoch could later be replayed as new ones.
    newest_epoch: u64,
    /// The header the metadata was read with (rebuilt if the one in force was stale).
    header: Header,
    committed: Committed,
    problems: Vec<Problem>,
    journal_records: usize,
    journal_sectors: u64,
    inactive_copy_valid: bool,
}

fn storage_size<I: Io>(store: &Storage<I>) -> Result<u64> {
    store.file.size().ctx(IoOp::Size, "size of image storage")
}

/// Reads both header slots: their validity and the header in force (or why there is none).
async fn read_header<I: Io>(
    io: &I,
    store: &Storage<I>,
    c: &Counters,
) -> Result<([bool; 2], std::result::Result<Header, FormatError>)> {
    let raw = super::replay::read_region(io, store, c, 0, 2 * SECTOR as u64).await?;
    let slots = [
        Header::decode(&raw[..SECTOR]).is_ok(),
        Header::decode(&raw[SECTOR..]).is_ok(),
    ];
    Ok((slots, pick_header(&raw[..SECTOR], &raw[SECTOR..])))
}

/// Problems that stop the check before the metadata is read: the storage must hold both copies
/// (`fvd create` writes them whole), or sizes from a damaged header could ask for any amount of
/// memory.
fn truncated<I: Io>(store: &Storage<I>, h: &Header) -> Result<Option<Problem>> {
    let size = storage_size(store)?;
    // Every region ends by the data area (see `replay::check_regions_fit`).
    let need = h.data_offset;
    Ok((size < need).then_some(Problem::Truncated { size, need }))
}

/// Detects a stale header in force (see [`Problem::StaleHeader`]) and rebuilds the newer one.
async fn newer_header<I: Io>(
    io: &I,
    store: &Storage<I>,
    c: &Counters,
    h: &Header,
) -> Result<Option<(Header, Problem)>> {
    let first = super::replay::read_region(io, store, c, h.journal_offset, SECTOR as u64).await?;
    let epoch = u64::from_le_bytes(first[8..16].try_into().unwrap_or_default());
    // Consecutive header generations differ by one epoch: anything further ahead is not a lost
    // header's journal but stale or crafted sectors, which the new epoch below skips.
    if Some(epoch) != h.journal_epoch.checked_add(1) || journal::decode(&first, epoch, 0).is_none()
    {
        return Ok(None);
    }
    // The lost header's flags are not rebuilt: repair sets the clean flag on what it writes.
    let mut nh = h.clone();
    nh.journal_epoch = epoch;
    // A clean shutdown leaves an empty journal, so the next open (the guard above: one epoch
    // on) only bumped the epoch and kept the metadata copy.
    let exact = h.clean();
    if !exact {
        nh.active_meta = 1 - h.active_meta;
    }
    Ok(Some((
        nh,
        Problem::StaleHeader {
            header_epoch: h.journal_epoch,
            journal_epoch: epoch,
            exact,
        },
    )))
}

async fn salvage<I: Io>(io: &I, store: &Storage<I>, c: &Counters, h: &Header) -> Result<Salvaged> {
    let mut problems = Vec::new();
    let h = &match newer_header(io, store, c, h).await? {
        Some((nh, p)) => {
            problems.push(p);
            nh
        }
        None => h.clone(),
    };
    let geo = h.geometry();
    let mut committed = Committed::new(&geo, h.compact(), h.bitmap_sectors, h.table_sectors);
    let n = committed.sectors();
    let len = n * SECTOR as u64;
    let act = h.active_meta;
    let a = super::replay::read_region(io, store, c, h.meta_offset[act as usize], len).await?;
    let b = super::replay::read_region(io, store, c, h.meta_offset[1 - act as usize], len).await?;
    let mut suspect = vec![false; committed.table.len()];
    let mut inactive_copy_valid = true;
    for s in 0..n {
        let at = s as usize * SECTOR..(s as usize + 1) * SECTOR;
        let (sa, sb) = (&a[at.clone()], &b[at]);
        let other_ok = md::verify(sb, 1 - act, s).is_ok();
        inactive_copy_valid &= other_ok;
        let src = match md::verify(sa, act, s) {
            Ok(()) => Some(sa),
            Err(e) => {
                let what = match e {
                    FormatError::MetadataSector { what, .. } => what.to_string(),
                    e => e.to_string(),
                };
                let (start, end) = if s < h.bitmap_sectors {
                    let first = s * BITS_PER_SECTOR as u64;
                    (
                        (first * geo.block_size).min(geo.virtual_size),
                        ((first + BITS_PER_SECTOR as u64) * geo.block_size).min(geo.virtual_size),
                    )
                } else {
                    let first = (s - h.bitmap_sectors) * ENTRIES_PER_SECTOR as u64;
                    let last = (first + ENTRIES_PER_SECTOR as u64).min(geo.chunk_count());
                    if other_ok {
                        suspect[first as usize..last as usize].fill(true);
                    }
                    (
                        (first * geo.chunk_size).min(geo.virtual_size),
                        (last * geo.chunk_size).min(geo.virtual_size),
                    )
                };
                problems.push(Problem::MetadataSector {
                    copy: act,
                    index: s,
                    what,
                    recovered: other_ok,
                    start,
                    end,
                });
                other_ok.then_some(sb)
            }
        };
        if let Some(sec) = src {
            if s < h.bitmap_sectors {
                md::decode_bitmap_sector(sec, s, &mut committed.bits);
            } else {
                md::decode_table_sector(sec, s - h.bitmap_sectors, &mut committed.table);
            }
        }
    }
    let super::replay::Replayed {
        mut entries,
        tail,
        damage,
        later,
        newest_epoch,
        ..
    } = super::replay::replay(io, store, c, h).await?;
    if let Some(d) = damage {
        problems.push(d);
        // The lost sector may have unmapped a chunk that a later record maps again: mappings
        // the journal does not set lose any conflict with those it sets.
        suspect.fill(true);
        entries.extend(later);
    }
    for (i, e) in entries.iter().enumerate() {
        if committed.apply(std::slice::from_ref(e)).is_err() {
            problems.push(Problem::JournalRecord {
                position: i as u64,
                record: format!("{e:?}"),
            });
        } else if let JournalEntry::Map { chunk, .. } | JournalEntry::Unmap { chunk } = *e {
            // The journal is newer than either copy: its mapping is authoritative.
            suspect[chunk as usize] = false;
        }
    }
    let dev_size = Some(storage_size(store)?);
    let found = find_problems_with(&committed, h, dev_size, &suspect);
    let leaks = find_leaks(&committed, h, &found);
    problems.extend(found);
    problems.extend(leaks);
    Ok(Salvaged {
        newest_epoch,
        header: h.clone(),
        committed,
        problems,
        journal_records: entries.len(),
        journal_sectors: tail,
        inactive_copy_valid,
    })
}

/// What `fvd check` reports.
#[derive(Debug, Serialize)]
pub struct CheckReport {
    pub header_slots_valid: [bool; 2],
    /// The header in force (absent when no slot is valid).
    pub generation: Option<u64>,
    pub clean_shutdown: Option<bool>,
    pub active_copy: Option<u32>,
    pub inactive_copy_valid: bool,
    /// Journal records not yet folded into the metadata copy (an unclean shutdown left them).
    pub journal_records: usize,
    pub journal_sectors: u64,
    /// Everything found, corruptions and leaks.
    pub problems: Vec<Problem>,
    pub corruptions: usize,
    pub leaks: usize,
    pub allocated_chunks: u64,
    pub present_blocks: u64,
    /// With `--repair`: what the repair fixed (`problems` then describes the repaired image).
    pub repaired: Vec<Problem>,
    /// With `--repair`: data the repair dropped or may have replaced.
    pub lost: Vec<Loss>,
}

impl CheckReport {
    /// Corruptions found (not counting a journal that needs replay, which open handles, nor
    /// leaks).
    pub fn corrupt(&self) -> bool {
        self.corruptions > 0
    }

    /// qemu-img's convention: 0 clean, 2 corrupt, 3 only leaks.
    pub fn exit_code(&self) -> i32 {
        if self.corruptions > 0 {
            2
        } else if self.leaks > 0 {
            3
        } else {
            0
        }
    }

    fn new(header_slots_valid: [bool; 2], problems: Vec<Problem>) -> Self {
        let leaks = problems.iter().filter(|p| p.is_leak()).count();
        CheckReport {
            header_slots_valid,
            generation: None,
            clean_shutdown: None,
            active_copy: None,
            inactive_copy_valid: false,
            journal_records: 0,
            journal_sectors: 0,
            corruptions: problems.len() - leaks,
            leaks,
            problems,
            allocated_chunks: 0,
            present_blocks: 0,
            repaired: Vec::new(),
            lost: Vec::new(),
        }
    }
}

/// Inspects an image without modifying it. Damage is reported as [`Problem`]s; only failures to
/// read the storage are errors.
pub async fn check<I: Io>(io: &I, file: I::File) -> Result<CheckReport> {
    let store = Storage::<I>::new(file);
    let c = Counters::default();
    let (slots, h) = read_header(io, &store, &c).await?;
    let h = match h {
        Ok(h) => h,
        Err(e) => {
            return Ok(CheckReport::new(
                slots,
                vec![Problem::NoValidHeader {
                    what: e.to_string(),
                }],
            ))
        }
    };
    if let Some(p) = truncated(&store, &h)? {
        let mut r = CheckReport::new(slots, vec![p]);
        r.generation = Some(h.generation);
        return Ok(r);
    }
    let s = salvage(io, &store, &c, &h).await?;
    let present_blocks = s.committed.bits.iter().map(|w| w.count_ones() as u64).sum();
    let allocated_chunks = s
        .committed
        .table
        .iter()
        .filter(|&&p| p != PhysChunk::UNALLOCATED.0)
        .count() as u64;
    let mut r = CheckReport::new(slots, s.problems);
    r.generation = Some(h.generation);
    r.clean_shutdown = Some(h.clean());
    r.active_copy = Some(s.header.active_meta);
    r.inactive_copy_valid = s.inactive_copy_valid;
    r.journal_records = s.journal_records;
    r.journal_sectors = s.journal_sectors;
    r.allocated_chunks = allocated_chunks;
    r.present_blocks = present_blocks;
    Ok(r)
}

/// What `fvd check --repair` did.
#[derive(Debug)]
pub struct Repair {
    pub fixed: Vec<Problem>,
    pub lost: Vec<Loss>,
}

/// Why a repair could not be done.
#[derive(Debug, thiserror::Error)]
pub enum RepairError {
    #[error("cannot repair: {0}")]
    Unrepairable(Problem),
    #[error(transparent)]
    Engine(#[from] EngineError),
}

/// Rebuilds the metadata from what survives (see [`salvage`]), fixes every [`Problem`], and
/// writes the result to both metadata copies and both header slots, as a cleanly closed image
/// with an empty journal. Needs exclusive read-write access; no base image is read.
pub async fn repair<I: Io>(io: &I, file: I::File) -> std::result::Result<Repair, RepairError> {
    let store = Storage::<I>::new(file);
    if store.file.is_read_only() {
        return Err(EngineError::ReadOnly.into());
    }
    let c = Counters::default();
    let (_, h) = read_header(io, &store, &c).await?;
    let h = h.map_err(|e| {
        RepairError::Unrepairable(Problem::NoValidHeader {
            what: e.to_string(),
        })
    })?;
    if let Some(p) = truncated(&store, &h)? {
        return Err(RepairError::Unrepairable(p));
    }
    let mut s = salvage(io, &store, &c, &h).await?;
    let h = s.header.clone();
    fix_problems(&mut s.committed, &h, &s.problems);
    // Chunks whose every block the fixes cleared would be leaks now.
    let leaks = find_leaks(&s.committed, &h, &[]);
    fix_problems(&mut s.committed, &h, &leaks);
    s.problems.extend(leaks);
    let lost = losses(&s.problems, &h);
    // First the inactive copy and a header pointing at it (so a crash during repair leaves either
    // the old image or the repaired one), then the old active copy and the other header slot, so
    // that both copies and both slots are valid afterwards.
    let mut nh = h.clone();
    nh.journal_epoch = super::replay::next_epoch(nh.journal_epoch.max(s.newest_epoch))?;
    nh.flags |= FLAG_CLEAN;
    for copy in [1 - h.active_meta, h.active_meta] {
        write_copy(io, &store, &c, &s.committed, nh.meta_offset[copy as usize]).await?;
        store.flush(io, &c).await?;
        nh.active_meta = 1 - h.active_meta;
        nh.generation += 1;
        let buf = Buf::alloc(SECTOR);
        buf.copy_from_slice(0, &nh.encode());
        store
            .write(io, &c, PhysOffset(nh.slot_offset()), buf)
            .await?;
        store.flush(io, &c).await?;
    }
    Ok(Repair {
        fixed: s.problems,
        lost,
    })
}

/// Writes every sector of `committed` as the metadata copy at `off`.
async fn write_copy<I: Io>(
    io: &I,
    store: &Storage<I>,
    c: &Counters,
    committed: &Committed,
    off: u64,
) -> Result<()> {
    let n = committed.sectors();
    let mut s = 0;
    while s < n {
        // At most 1 MiB per write.
        let k = (n - s).min(256);
        let buf = Buf::alloc(k as usize * SECTOR);
        let mut sector = vec![0u8; SECTOR];
        for i in 0..k {
            committed.encode_sector(s + i, &mut sector);
            buf.copy_from_slice(i as usize * SECTOR, &sector);
        }
        store
            .write(io, c, PhysOffset(off + s * SECTOR as u64), buf)
            .await?;
        s += k;
    }
    Ok(())
}
