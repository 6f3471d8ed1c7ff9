//! An inconsistency found in an image and how repair resolves it (open, `fvd check`, the
//! journal replay).

use serde::Serialize;

/// One inconsistency and how repair resolves it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Problem {
    /// No header slot is valid: nothing else can be located, and repair cannot proceed.
    NoValidHeader { what: String },
    /// The storage ends before the metadata copies do (the image was truncated): repair cannot
    /// proceed.
    Truncated { size: u64, need: u64 },
    /// A sector of the active metadata copy is damaged. Repair takes it from the other copy when
    /// that copy's sector is valid (`recovered`; it may predate the last checkpoint, so virtual
    /// bytes `[start, end)` it describes are possibly lost); otherwise they are lost: their blocks
    /// read from the base image or as zeros.
    MetadataSector {
        copy: u32,
        index: u64,
        what: String,
        recovered: bool,
        start: u64,
        end: u64,
    },
    /// The journal holds sectors of a newer epoch than the header in force: a newer header was
    /// written (journal sectors of an epoch follow its header) and its slot is damaged, so the
    /// older slot, which names an older metadata copy or journal epoch, is in force. Repair
    /// rebuilds the newer header: exactly when the older one marks a clean shutdown (the newer
    /// one was then the next open's, on the same copy); otherwise it takes the other copy (the
    /// newer header was then a checkpoint's, unless the next open found no records) and every
    /// byte is possibly lost.
    StaleHeader {
        header_epoch: u64,
        journal_epoch: u64,
        exact: bool,
    },
    /// A journal record with a valid checksum names blocks or chunks outside the image: it is
    /// skipped (the change it stood for is possibly lost).
    JournalRecord { position: u64, record: String },
    /// Blocks marked present in a chunk that has no physical chunk: repair clears the bits.
    BitsInUnallocatedChunk { chunk: u64 },
    /// Two virtual chunks share one physical chunk: repair unmaps both (their blocks then read
    /// from the base image or as zeros and are reported lost; neither can read the other's
    /// data), except that an entry taken from the other metadata copy alone loses to one that
    /// was not.
    DuplicateMapping { chunk: u64, phys: u32 },
    /// A chunk is mapped past the end of the block device or file (a truncated file, or a
    /// corrupt table entry): repair unmaps it.
    ChunkBeyondDevice { chunk: u64, phys: u32 },
    /// Raw-like images: blocks from `block` on are marked present but lie past the end of the
    /// file (it was truncated; their data is gone): repair clears their bits.
    DataBeyondEnd { block: u64 },
    /// A journal sector proves that records after the replayed journal were lost (damage, not a
    /// torn last write): repair keeps the records before it and applies the valid sectors of later flushes after it
    /// (their mappings win any conflict).
    JournalDamaged { sector: u64, what: String },
    /// A leak: a physical chunk mapped by a virtual chunk none of whose blocks is present. It
    /// holds no reachable data but takes space; repair unmaps it.
    EmptyChunk { chunk: u64, phys: u32 },
}

impl Problem {
    /// Leaks waste space but lose no data (`fvd check` exits 3 when they are all it finds).
    pub fn is_leak(&self) -> bool {
        matches!(self, Problem::EmptyChunk { .. })
    }
}

impl std::fmt::Display for Problem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Problem::NoValidHeader { what } => write!(f, "no valid header slot ({what})"),
            Problem::Truncated { size, need } => write!(
                f,
                "the storage holds {size} bytes but its metadata and journal end at byte {need} \
                 (the data area's start): truncated"
            ),
            Problem::MetadataSector {
                copy,
                index,
                what,
                recovered,
                ..
            } => write!(
                f,
                "metadata sector {index} of copy {copy} is corrupt ({what}); {}",
                if *recovered {
                    "the other copy's sector is valid"
                } else {
                    "the other copy's sector is corrupt too"
                }
            ),
            Problem::StaleHeader {
                header_epoch,
                journal_epoch,
                ..
            } => write!(
                f,
                "the header in force (journal epoch {header_epoch}) is older than the journal \
                 (epoch {journal_epoch}): the newer header slot is damaged"
            ),
            Problem::JournalRecord { position, record } => write!(
                f,
                "journal record {position} is outside the image ({record})"
            ),
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
            Problem::JournalDamaged { sector, what } => write!(f, "journal sector {sector} {what}"),
            Problem::DataBeyondEnd { block } => {
                write!(
                    f,
                    "block {block} is marked present but lies past the end of the file \
                     (truncated image)"
                )
            }
            Problem::EmptyChunk { chunk, phys } => write!(
                f,
                "chunk {chunk} holds physical chunk {phys} but none of its blocks is present"
            ),
        }
    }
}
