//! Consistency checks of loaded metadata, shared by open (refuse), `fvd check` (report) and
//! `fvd check --repair` (fix).

use super::counters::Counters;
use super::error::Result;
use super::image::Image;
use super::metadata::Committed;
use super::storage::Storage;
use crate::format::header::pick_header;
use crate::format::{Header, SECTOR};
use crate::io::{Buf, Io};
use crate::units::PhysChunk;
use serde::Serialize;
use std::collections::HashMap;

/// One inconsistency and how repair resolves it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Problem {
    /// Blocks marked present in a chunk that has no physical chunk: repair clears the bits.
    BitsInUnallocatedChunk { chunk: u64 },
    /// Two virtual chunks share one physical chunk: repair unmaps the later one (its blocks then
    /// read from the base image or as zeros; no other chunk's data is exposed).
    DuplicateMapping { chunk: u64, phys: u32 },
    /// A chunk is mapped past the end of the block device or file (a truncated file, or a
    /// corrupt table entry): repair unmaps it.
    ChunkBeyondDevice { chunk: u64, phys: u32 },
    /// Raw-like images: blocks from `block` on are marked present but lie past the end of the
    /// file (it was truncated; their data is gone): repair clears their bits.
    DataBeyondEnd { block: u64 },
}

impl std::fmt::Display for Problem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Problem::BitsInUnallocatedChunk { chunk } => {
                write!(
                    f,
                    "chunk {chunk} has blocks marked present but no physical chunk"
                )
            }
            Problem::DuplicateMapping { chunk, phys } => {
                write!(
                    f,
                    "chunk {chunk} maps to physical chunk {phys}, which another chunk uses"
                )
            }
            Problem::ChunkBeyondDevice { chunk, phys } => {
                write!(
                    f,
                    "chunk {chunk} maps to physical chunk {phys}, past the end of the storage"
                )
            }
            Problem::DataBeyondEnd { block } => {
                write!(
                    f,
                    "block {block} is marked present but lies past the end of the file \
                     (truncated image)"
                )
            }
        }
    }
}

/// Finds inconsistencies in committed metadata.
pub(super) fn find_problems(c: &Committed, h: &Header, storage_size: Option<u64>) -> Vec<Problem> {
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
    let mut owner: HashMap<u32, u64> = HashMap::new();
    let cap = storage_size.map(|s| s.saturating_sub(h.data_offset) / geo.chunk_size);
    for (v, &p) in c.table.iter().enumerate() {
        let v = v as u64;
        if p == PhysChunk::UNALLOCATED.0 {
            let first = v * bpc;
            let last = ((v + 1) * bpc).min(geo.block_count());
            if (first..last).any(|b| c.bits[(b / 64) as usize] & (1 << (b % 64)) != 0) {
                out.push(Problem::BitsInUnallocatedChunk { chunk: v });
            }
            continue;
        }
        if owner.insert(p, v).is_some() {
            out.push(Problem::DuplicateMapping { chunk: v, phys: p });
        } else if cap.is_some_and(|cap| p as u64 >= cap) {
            out.push(Problem::ChunkBeyondDevice { chunk: v, phys: p });
        }
    }
    out
}

/// Applies the repairs for `problems` to committed metadata.
pub(super) fn fix_problems(c: &mut Committed, h: &Header, problems: &[Problem]) {
    use crate::format::JournalEntry;
    let bpc = h.geometry().blocks_per_chunk();
    let nblocks = h.geometry().block_count();
    let mut entries = Vec::new();
    for p in problems {
        let chunk = match *p {
            Problem::DataBeyondEnd { block } => {
                entries.push(JournalEntry::ClearBits {
                    start: block,
                    count: nblocks - block,
                });
                continue;
            }
            Problem::BitsInUnallocatedChunk { chunk } => chunk,
            Problem::DuplicateMapping { chunk, .. } | Problem::ChunkBeyondDevice { chunk, .. } => {
                entries.push(JournalEntry::Unmap { chunk });
                chunk
            }
        };
        let start = chunk * bpc;
        entries.push(JournalEntry::ClearBits {
            start,
            count: bpc.min(nblocks - start),
        });
    }
    // Entries are built from the table itself, so they are in range.
    let _ = c.apply(&entries);
}

/// What `fvd check` reports.
#[derive(Debug, Serialize)]
pub struct CheckReport {
    pub header_slots_valid: [bool; 2],
    pub generation: u64,
    pub clean_shutdown: bool,
    pub active_copy: u32,
    pub inactive_copy_valid: bool,
    /// Journal records not yet folded into the metadata copy (an unclean shutdown left them).
    pub journal_records: usize,
    pub journal_sectors: u64,
    pub problems: Vec<Problem>,
    pub allocated_chunks: u64,
    pub present_blocks: u64,
}

impl CheckReport {
    /// Corruptions found (not counting a journal that needs replay, which open handles).
    pub fn corrupt(&self) -> bool {
        !self.problems.is_empty()
    }
}

/// Inspects an image without modifying it.
pub async fn check<I: Io>(io: &I, file: I::File) -> Result<CheckReport> {
    let store = Storage::<I>::new(file);
    let c = Counters::default();
    let buf = Buf::alloc(2 * SECTOR);
    store.read(io, &c, 0, buf.clone()).await?;
    let raw = buf.to_vec();
    let slots = [
        crate::format::Header::decode(&raw[..SECTOR]).is_ok(),
        crate::format::Header::decode(&raw[SECTOR..]).is_ok(),
    ];
    let h = pick_header(&raw[..SECTOR], &raw[SECTOR..])?;
    let size = super::image::storage_len(&store)?;
    super::image::check_regions_fit(&h, size)?;
    let geo = h.geometry();
    let mut committed = Committed::new(&geo, h.compact(), h.bitmap_sectors, h.table_sectors);
    let len = committed.sectors() * SECTOR as u64;
    let read = |off: u64| {
        let b = Buf::alloc(len as usize);
        let store = &store;
        let c = &c;
        async move { store.read(io, c, off, b.clone()).await.map(|_| b.to_vec()) }
    };
    let active = read(h.meta_offset[h.active_meta as usize]).await?;
    committed.load(h.active_meta, &active)?;
    let inactive = read(h.meta_offset[1 - h.active_meta as usize]).await?;
    let mut scratch = Committed::new(&geo, h.compact(), h.bitmap_sectors, h.table_sectors);
    let inactive_ok = scratch.load(1 - h.active_meta, &inactive).is_ok();
    let (entries, tail) = super::image::replay(io, &store, &c, &h).await?;
    committed.apply(&entries)?;
    let problems = find_problems(&committed, &h, Some(size));
    let present_blocks = committed.bits.iter().map(|w| w.count_ones() as u64).sum();
    let allocated_chunks = committed
        .table
        .iter()
        .filter(|&&p| p != PhysChunk::UNALLOCATED.0)
        .count() as u64;
    Ok(CheckReport {
        header_slots_valid: slots,
        generation: h.generation,
        clean_shutdown: h.clean(),
        active_copy: h.active_meta,
        inactive_copy_valid: inactive_ok,
        journal_records: entries.len(),
        journal_sectors: tail,
        problems,
        allocated_chunks,
        present_blocks,
    })
}

impl<I: Io> Image<I> {
    /// Opens read-write, fixing any [`Problem`]s, and closes cleanly. Returns what was fixed.
    pub async fn repair(
        io: &I,
        file: I::File,
        base: Option<super::Base<I>>,
    ) -> Result<Vec<Problem>> {
        let (img, fixed) = Image::open_inner(io, file, base, false, true).await?;
        img.close(io).await?;
        Ok(fixed)
    }
}
