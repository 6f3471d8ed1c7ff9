//! Journal (F3) sectors. Each 4 KiB sector is self-checking: magic, epoch, sequence number and a
//! crc32c. Replay accepts sector `i` only if it carries the current epoch and sequence `i`, so torn
//! writes and records left over from earlier epochs are ignored.
//!
//! An *intent* sector (flag [`FLAG_INTENT`]) holds records that no FLUSH covered yet, written so
//! that they survive a crash of the process (not of the host): see docs/FORMAT.md, "Crash
//! contract: process crash vs power loss".

use super::{checksum, get_u16, get_u32, get_u64, put_u16, put_u32, put_u64, SECTOR};

const MAGIC: u32 = u32::from_le_bytes(*b"FVDJ");
const O_MAGIC: usize = 0;
const O_COUNT: usize = 4;
/// u16 of sector flags (zero in sectors written before flags existed).
const O_FLAGS: usize = 6;
const O_EPOCH: usize = 8;
const O_SEQ: usize = 16;
const O_ENTRIES: usize = 24;
const ENTRY_SIZE: usize = 16;
/// Position of the sector within the write that appended it, plus one (0: not recorded, as
/// in sectors written before this field existed). Lies in the bytes entries never use.
const O_COMMIT_INDEX: usize = SECTOR - 8;
const O_CRC: usize = SECTOR - 4;
/// Records per journal sector.
pub const ENTRIES_PER_SECTOR: usize = (O_COMMIT_INDEX - O_ENTRIES) / ENTRY_SIZE;

/// Sector flag: the records are an intent, replayed only under the boot that wrote them.
pub const FLAG_INTENT: u16 = 1;
/// Sector flags this program understands; a sector with others is not valid.
const FLAGS_KNOWN: u16 = FLAG_INTENT;

const KIND_SET: u64 = 1;
const KIND_CLEAR: u64 = 2;
const KIND_MAP: u64 = 3;
const KIND_UNMAP: u64 = 4;
const INDEX_MASK: u64 = (1 << 56) - 1;

/// One metadata change. Replaying a sequence of entries in order is idempotent.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum JournalEntry {
    /// Blocks `[start, start + count)` now hold their data in this image.
    SetBits { start: u64, count: u64 },
    /// Blocks `[start, start + count)` read from the base image (or as zeros) again.
    ClearBits { start: u64, count: u64 },
    /// Virtual chunk `chunk` is stored in physical chunk `phys`.
    Map { chunk: u64, phys: u32 },
    /// Virtual chunk `chunk` no longer has a physical chunk.
    Unmap { chunk: u64 },
}

impl JournalEntry {
    fn encode(&self, out: &mut [u8]) {
        let (kind, a, b) = match *self {
            JournalEntry::SetBits { start, count } => (KIND_SET, start, count),
            JournalEntry::ClearBits { start, count } => (KIND_CLEAR, start, count),
            JournalEntry::Map { chunk, phys } => (KIND_MAP, chunk, phys as u64),
            JournalEntry::Unmap { chunk } => (KIND_UNMAP, chunk, 0),
        };
        debug_assert!(a <= INDEX_MASK);
        put_u64(out, 0, kind << 56 | a);
        put_u64(out, 8, b);
    }

    fn decode(b: &[u8]) -> Option<JournalEntry> {
        let w0 = get_u64(b, 0);
        let w1 = get_u64(b, 8);
        let a = w0 & INDEX_MASK;
        Some(match w0 >> 56 {
            KIND_SET => JournalEntry::SetBits {
                start: a,
                count: w1,
            },
            KIND_CLEAR => JournalEntry::ClearBits {
                start: a,
                count: w1,
            },
            KIND_MAP => JournalEntry::Map {
                chunk: a,
                phys: u32::try_from(w1).ok()?,
            },
            KIND_UNMAP => JournalEntry::Unmap { chunk: a },
            _ => return None,
        })
    }
}

/// Encodes `entries` into consecutive sectors starting at sequence number `seq`.
pub fn encode(entries: &[JournalEntry], epoch: u64, seq: u64) -> Vec<u8> {
    encode_part(entries, epoch, seq, 0, false)
}

/// Encodes sectors `first..` of a write of records starting at sequence number `start`
/// (`entries` begins with the first record of sector `first`), as intents or normal records.
pub fn encode_part(
    entries: &[JournalEntry],
    epoch: u64,
    start: u64,
    first: u64,
    intent: bool,
) -> Vec<u8> {
    let nsec = entries.len().div_ceil(ENTRIES_PER_SECTOR).max(1);
    let mut out = vec![0u8; nsec * SECTOR];
    for (i, chunk) in entries.chunks(ENTRIES_PER_SECTOR).enumerate() {
        let s = &mut out[i * SECTOR..(i + 1) * SECTOR];
        let index = first + i as u64;
        put_u32(s, O_MAGIC, MAGIC);
        put_u16(s, O_COUNT, chunk.len() as u16);
        put_u16(s, O_FLAGS, if intent { FLAG_INTENT } else { 0 });
        put_u64(s, O_EPOCH, epoch);
        put_u64(s, O_SEQ, start + index);
        put_u32(s, O_COMMIT_INDEX, index as u32 + 1);
        for (j, e) in chunk.iter().enumerate() {
            e.encode(&mut s[O_ENTRIES + j * ENTRY_SIZE..]);
        }
        let crc = checksum(&s[..O_CRC]);
        put_u32(s, O_CRC, crc);
    }
    out
}

/// Number of sectors `encode` produces for `n` entries.
pub fn sectors_for(n: usize) -> u64 {
    n.div_ceil(ENTRIES_PER_SECTOR).max(1) as u64
}

/// What a journal sector with a valid magic and checksum says about itself, whatever its epoch
/// and position: replay uses it to tell a torn tail from damage before later records.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct SectorId {
    pub epoch: u64,
    pub seq: u64,
    /// Sequence number of the first sector of the write that appended this one, if recorded.
    pub commit_start: Option<u64>,
    /// An intent sector (see [`FLAG_INTENT`]).
    pub intent: bool,
}

/// Identifies a journal sector; `None` if it is torn or not a journal sector.
pub fn identify(sector: &[u8]) -> Option<SectorId> {
    if get_u32(sector, O_MAGIC) != MAGIC
        || checksum(&sector[..O_CRC]) != get_u32(sector, O_CRC)
        || get_u16(sector, O_FLAGS) & !FLAGS_KNOWN != 0
    {
        return None;
    }
    let seq = get_u64(sector, O_SEQ);
    let index = get_u32(sector, O_COMMIT_INDEX) as u64;
    Some(SectorId {
        epoch: get_u64(sector, O_EPOCH),
        seq,
        commit_start: index.checked_sub(1).and_then(|i| seq.checked_sub(i)),
        intent: get_u16(sector, O_FLAGS) & FLAG_INTENT != 0,
    })
}

/// Decodes normal (not intent) sector `seq` of epoch `epoch`; `None` if it is torn, stale, an
/// intent or not a journal sector.
pub fn decode(sector: &[u8], epoch: u64, seq: u64) -> Option<Vec<JournalEntry>> {
    decode_any(sector, epoch, seq).and_then(|(e, intent)| (!intent).then_some(e))
}

/// Decodes sector `seq` of epoch `epoch`, normal or intent (true); `None` if it is torn, stale
/// or not a journal sector.
pub fn decode_any(sector: &[u8], epoch: u64, seq: u64) -> Option<(Vec<JournalEntry>, bool)> {
    let id = identify(sector)?;
    if id.epoch != epoch || id.seq != seq {
        return None;
    }
    let n = get_u16(sector, O_COUNT) as usize;
    if n > ENTRIES_PER_SECTOR {
        return None;
    }
    let entries = (0..n)
        .map(|j| JournalEntry::decode(&sector[O_ENTRIES + j * ENTRY_SIZE..]))
        .collect::<Option<Vec<_>>>()?;
    Some((entries, id.intent))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_rejects_stale_or_torn() {
        let entries: Vec<JournalEntry> = (0..600u64)
            .map(|i| match i % 4 {
                0 => JournalEntry::SetBits {
                    start: i,
                    count: i + 1,
                },
                1 => JournalEntry::ClearBits {
                    start: i * 3,
                    count: 1,
                },
                2 => JournalEntry::Map {
                    chunk: i,
                    phys: i as u32 * 2,
                },
                _ => JournalEntry::Unmap { chunk: i },
            })
            .collect();
        let bytes = encode(&entries, 7, 10);
        assert_eq!(
            bytes.len() as u64,
            sectors_for(entries.len()) * SECTOR as u64
        );
        let mut back = Vec::new();
        for (i, s) in bytes.chunks(SECTOR).enumerate() {
            back.extend(decode(s, 7, 10 + i as u64).unwrap());
        }
        assert_eq!(back, entries);
        assert!(
            decode(&bytes[..SECTOR], 6, 10).is_none(),
            "stale epoch accepted"
        );
        assert!(
            decode(&bytes[..SECTOR], 7, 11).is_none(),
            "wrong position accepted"
        );
        for (i, s) in bytes.chunks(SECTOR).enumerate() {
            assert_eq!(
                identify(s),
                Some(SectorId {
                    epoch: 7,
                    seq: 10 + i as u64,
                    commit_start: Some(10),
                    intent: false,
                })
            );
        }
        let mut torn = bytes[..SECTOR].to_vec();
        torn[2000..].fill(0);
        assert!(decode(&torn, 7, 10).is_none(), "torn sector accepted");
        assert!(identify(&torn).is_none(), "torn sector identified");
        assert!(decode(&vec![0u8; SECTOR], 0, 0).is_none());
    }

    #[test]
    fn intent_sectors_are_told_apart_and_continue_a_write() {
        let entries: Vec<JournalEntry> = (0..300u64)
            .map(|i| JournalEntry::SetBits { start: i, count: 1 })
            .collect();
        // Sector 1 of a write that starts at sequence 20: the records from the 255th on.
        let bytes = encode_part(&entries[ENTRIES_PER_SECTOR..], 9, 20, 1, true);
        assert_eq!(bytes.len(), SECTOR);
        assert!(decode(&bytes, 9, 21).is_none(), "intent read as normal");
        let (back, intent) = decode_any(&bytes, 9, 21).unwrap();
        assert!(intent);
        assert_eq!(back, entries[ENTRIES_PER_SECTOR..]);
        let id = identify(&bytes).unwrap();
        assert_eq!((id.seq, id.commit_start, id.intent), (21, Some(20), true));
        // An unknown flag makes the sector invalid rather than misread.
        let mut odd = bytes.clone();
        put_u16(&mut odd, O_FLAGS, 4);
        let crc = checksum(&odd[..O_CRC]);
        put_u32(&mut odd, O_CRC, crc);
        assert!(identify(&odd).is_none() && decode_any(&odd, 9, 21).is_none());
    }
}

#[cfg(test)]
mod crafted_tests {
    use super::*;

    /// Re-seals a modified sector so only the intended check can refuse it.
    fn reseal(s: &mut [u8]) {
        let crc = checksum(&s[..O_CRC]);
        put_u32(s, O_CRC, crc);
    }

    #[test]
    fn a_count_past_the_sector_is_refused_not_read() {
        let entries: Vec<JournalEntry> = (0..ENTRIES_PER_SECTOR as u64)
            .map(|i| JournalEntry::Unmap { chunk: i })
            .collect();
        let mut s = encode(&entries, 3, 4);
        assert_eq!(s.len(), SECTOR);
        assert_eq!(decode(&s, 3, 4).unwrap().len(), ENTRIES_PER_SECTOR);
        for n in [ENTRIES_PER_SECTOR + 1, u16::MAX as usize] {
            put_u16(&mut s, O_COUNT, n as u16);
            reseal(&mut s);
            assert_eq!(decode_any(&s, 3, 4), None, "count {n}");
        }
    }

    #[test]
    fn record_fields_use_their_full_width() {
        let entries = [
            JournalEntry::SetBits {
                start: INDEX_MASK,
                count: u64::MAX,
            },
            JournalEntry::ClearBits {
                start: INDEX_MASK - 1,
                count: 1 << 60,
            },
            JournalEntry::Map {
                chunk: INDEX_MASK,
                phys: u32::MAX,
            },
            JournalEntry::Unmap { chunk: 1 << 55 },
        ];
        let s = encode(&entries, u64::MAX, u64::MAX - 1);
        assert_eq!(decode(&s, u64::MAX, u64::MAX - 1).unwrap(), entries);
        // A Map whose physical chunk does not fit 32 bits, or an unknown kind, is not a record.
        for (word, value) in [(8, 1u64 << 32), (0, 5 << 56), (0, 0)] {
            let mut bad = s.clone();
            put_u64(&mut bad, O_ENTRIES + 2 * ENTRY_SIZE + word, value);
            reseal(&mut bad);
            assert_eq!(decode(&bad, u64::MAX, u64::MAX - 1), None);
        }
    }

    #[test]
    fn sector_counts_and_commit_starts() {
        assert_eq!(sectors_for(0), 1);
        assert_eq!(sectors_for(ENTRIES_PER_SECTOR), 1);
        assert_eq!(sectors_for(ENTRIES_PER_SECTOR + 1), 2);
        let s = encode(&[JournalEntry::Unmap { chunk: 9 }], 1, 0);
        assert_eq!(s.len(), SECTOR);
        let id = identify(&s).unwrap();
        assert_eq!((id.commit_start, id.intent), (Some(0), false));
        // Sectors written before the commit index existed carry 0 there: no start recorded.
        let mut old = s.clone();
        put_u32(&mut old, O_COMMIT_INDEX, 0);
        reseal(&mut old);
        assert_eq!(identify(&old).unwrap().commit_start, None);
        // An index larger than the sequence number is damage, not a start before sector 0.
        let mut odd = s.clone();
        put_u32(&mut odd, O_COMMIT_INDEX, 2);
        reseal(&mut odd);
        assert_eq!(identify(&odd).unwrap().commit_start, None);
    }
}

/// The byte layout docs/FORMAT.md gives ("Journal (F3)"): journals written by earlier versions
/// must keep replaying the same.
#[cfg(test)]
mod on_disk_tests {
    use super::*;

    #[test]
    fn sectors_are_laid_out_as_documented() {
        assert_eq!(ENTRIES_PER_SECTOR, 254);
        let entries: Vec<JournalEntry> = (0..256u64)
            .map(|i| JournalEntry::SetBits { start: i, count: 2 })
            .chain([
                JournalEntry::ClearBits {
                    start: 0x12_3456,
                    count: 3,
                },
                JournalEntry::Map {
                    chunk: 5,
                    phys: 0xdead_beef,
                },
                JournalEntry::Unmap { chunk: 6 },
            ])
            .collect();
        let b = encode_part(&entries[..], 0x1122_3344_5566_7788, 40, 2, true);
        assert_eq!(b.len(), 2 * SECTOR);
        let s = &b[SECTOR..];
        assert_eq!(&s[0..4], b"FVDJ");
        assert_eq!(get_u16(s, 4), 5);
        assert_eq!(get_u16(s, 6), 1);
        assert_eq!(get_u64(s, 8), 0x1122_3344_5566_7788);
        assert_eq!(get_u64(s, 16), 43);
        let words: Vec<(u64, u64)> = (0..5)
            .map(|j| (get_u64(s, 24 + 16 * j), get_u64(s, 32 + 16 * j)))
            .collect();
        assert_eq!(
            words,
            [
                (1 << 56 | 254, 2),
                (1 << 56 | 255, 2),
                (2 << 56 | 0x12_3456, 3),
                (3 << 56 | 5, 0xdead_beef),
                (4 << 56 | 6, 0),
            ]
        );
        assert!(s[24 + 16 * 5..4088].iter().all(|&x| x == 0));
        assert_eq!(get_u32(s, 4088), 4);
        assert_eq!(get_u32(s, 4092), checksum(&s[..4092]));
        // The first sector is full and a normal write has no flags.
        assert_eq!(get_u16(&b, 4), 254);
        let n = encode(&entries[..1], 1, 0);
        assert_eq!((get_u16(&n, 6), get_u32(&n, 4088)), (0, 1));
    }
}
