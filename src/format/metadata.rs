//! Bitmap (F1) and table (F2) sectors. A metadata copy is `bitmap_sectors` sectors of bitmap
//! followed by `table_sectors` sectors of table; each 4 KiB sector carries `PAYLOAD` bytes and a
//! trailer with magic, its own index and a crc32c, so a misplaced or corrupt sector is detected.

use super::{checksum, get_u32, put_u32, FormatError, SECTOR};

/// Payload bytes per metadata sector.
pub const PAYLOAD: usize = SECTOR - 16;
/// Bitmap bits per sector.
pub const BITS_PER_SECTOR: usize = PAYLOAD * 8;
/// Table entries (u32 physical chunk numbers) per sector.
pub const ENTRIES_PER_SECTOR: usize = PAYLOAD / 4;

const MAGIC: u32 = u32::from_le_bytes(*b"FVDM");
const O_MAGIC: usize = PAYLOAD;
const O_INDEX: usize = PAYLOAD + 4;
const O_CRC: usize = SECTOR - 4;

/// Seals a sector whose payload is filled: writes magic, index and checksum.
pub fn seal(sector: &mut [u8], index: u64) {
    put_u32(sector, O_MAGIC, MAGIC);
    put_u32(sector, O_INDEX, index as u32);
    put_u32(sector, PAYLOAD + 8, 0);
    let crc = checksum(&sector[..O_CRC]);
    put_u32(sector, O_CRC, crc);
}

/// Verifies a sector's trailer.
pub fn verify(sector: &[u8], copy: u32, index: u64) -> Result<(), FormatError> {
    let err = |what| Err(FormatError::MetadataSector { copy, index, what });
    if get_u32(sector, O_MAGIC) != MAGIC {
        return err("bad magic");
    }
    if get_u32(sector, O_INDEX) != index as u32 {
        return err("sector index mismatch");
    }
    if checksum(&sector[..O_CRC]) != get_u32(sector, O_CRC) {
        return err("checksum mismatch");
    }
    Ok(())
}

/// Encodes bitmap words (bit i of the image = bit i%64 of word i/64) into sector `s` of the bitmap.
pub fn encode_bitmap_sector(words: &[u64], s: u64, out: &mut [u8]) {
    out[..SECTOR].fill(0);
    let first_bit = s as usize * BITS_PER_SECTOR;
    // BITS_PER_SECTOR is a multiple of 64, so sectors hold whole words.
    let first_word = first_bit / 64;
    let n = (BITS_PER_SECTOR / 64).min(words.len().saturating_sub(first_word));
    for i in 0..n {
        out[i * 8..i * 8 + 8].copy_from_slice(&words[first_word + i].to_le_bytes());
    }
    seal(out, s);
}

/// Decodes bitmap sector `s` into `words`.
pub fn decode_bitmap_sector(sector: &[u8], s: u64, words: &mut [u64]) {
    let first_word = s as usize * BITS_PER_SECTOR / 64;
    let n = (BITS_PER_SECTOR / 64).min(words.len().saturating_sub(first_word));
    for i in 0..n {
        words[first_word + i] = u64::from_le_bytes(sector[i * 8..i * 8 + 8].try_into().unwrap());
    }
}

/// Encodes table entries into table sector `t` (its index in the copy is `index`).
pub fn encode_table_sector(entries: &[u32], t: u64, index: u64, out: &mut [u8]) {
    out[..SECTOR].fill(0xff);
    let first = t as usize * ENTRIES_PER_SECTOR;
    let n = ENTRIES_PER_SECTOR.min(entries.len().saturating_sub(first));
    for i in 0..n {
        put_u32(out, i * 4, entries[first + i]);
    }
    seal(out, index);
}

/// Decodes table sector `t` into `entries`.
pub fn decode_table_sector(sector: &[u8], t: u64, entries: &mut [u32]) {
    let first = t as usize * ENTRIES_PER_SECTOR;
    let n = ENTRIES_PER_SECTOR.min(entries.len().saturating_sub(first));
    for i in 0..n {
        entries[first + i] = get_u32(sector, i * 4);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bitmap_and_table_round_trip_and_detect_corruption() {
        let words: Vec<u64> = (0..2000u64)
            .map(|i| i.wrapping_mul(0x9e37_79b9_7f4a_7c15))
            .collect();
        let mut back = vec![0u64; words.len()];
        let mut s = vec![0u8; SECTOR];
        for i in 0..words.len().div_ceil(BITS_PER_SECTOR / 64) as u64 {
            encode_bitmap_sector(&words, i, &mut s);
            verify(&s, 0, i).unwrap();
            decode_bitmap_sector(&s, i, &mut back);
        }
        assert_eq!(back, words);

        let entries: Vec<u32> = (0..3000u32)
            .map(|i| if i % 3 == 0 { u32::MAX } else { i * 7 })
            .collect();
        let mut eback = vec![0u32; entries.len()];
        for t in 0..3u64 {
            encode_table_sector(&entries, t, 5 + t, &mut s);
            verify(&s, 1, 5 + t).unwrap();
            assert!(
                verify(&s, 1, 4 + t).is_err(),
                "misplaced sector must be detected"
            );
            decode_table_sector(&s, t, &mut eback);
        }
        assert_eq!(eback, entries);
        s[17] ^= 1;
        assert!(matches!(
            verify(&s, 1, 7),
            Err(FormatError::MetadataSector {
                what: "checksum mismatch",
                ..
            })
        ));
    }
}

/// The byte layout docs/FORMAT.md gives ("Metadata sectors"): images written by earlier versions
/// must keep reading the same.
#[cfg(test)]
mod on_disk_tests {
    use super::*;

    #[test]
    fn sectors_are_laid_out_as_documented() {
        assert_eq!(
            (PAYLOAD, BITS_PER_SECTOR, ENTRIES_PER_SECTOR),
            (4080, 32640, 1020)
        );
        // Bit i of the image is bit i % 8 of byte i / 8; a sector holds whole words.
        let mut words = vec![0u64; 2 * BITS_PER_SECTOR / 64];
        words[1] = 1 << 9; // bit 73
        words[BITS_PER_SECTOR / 64] = 1 << 63; // bit 63 of the second sector
        let mut s = vec![0xaau8; SECTOR];
        encode_bitmap_sector(&words, 0, &mut s);
        let set: Vec<usize> = (0..PAYLOAD * 8)
            .filter(|i| s[i / 8] & (1 << (i % 8)) != 0)
            .collect();
        assert_eq!(set, [73]);
        assert_eq!(&s[4080..4084], b"FVDM");
        assert_eq!(get_u32(&s, 4084), 0);
        assert_eq!(get_u32(&s, 4088), 0);
        assert_eq!(get_u32(&s, 4092), checksum(&s[..4092]));
        encode_bitmap_sector(&words, 1, &mut s);
        assert_eq!(s[7], 0x80);
        assert!(s[..7].iter().chain(&s[8..PAYLOAD]).all(|&b| b == 0));
        assert_eq!(get_u32(&s, 4084), 1);
        // Decoding writes only the words of its own sector.
        let mut back = vec![u64::MAX; words.len()];
        decode_bitmap_sector(&s, 1, &mut back);
        assert_eq!(back[BITS_PER_SECTOR / 64 - 1], u64::MAX);
        assert_eq!(back[BITS_PER_SECTOR / 64..], words[BITS_PER_SECTOR / 64..]);

        // Table entry c is the u32 at byte 4 (c % 1020); entries past the table read unallocated.
        let entries: Vec<u32> = (0..1030).collect();
        encode_table_sector(&entries, 1, 9, &mut s);
        assert_eq!(get_u32(&s, 0), 1020);
        assert_eq!(get_u32(&s, 36), 1029);
        assert!((40..PAYLOAD).step_by(4).all(|o| get_u32(&s, o) == u32::MAX));
        assert_eq!(&s[4080..4084], b"FVDM");
        assert_eq!((get_u32(&s, 4084), get_u32(&s, 4088)), (9, 0));
        assert_eq!(get_u32(&s, 4092), checksum(&s[..4092]));
        let mut back = vec![7u32; 1030];
        decode_table_sector(&s, 1, &mut back);
        assert!(back[..1020].iter().all(|&e| e == 7));
        assert_eq!(back[1020..], entries[1020..]);
    }

    #[test]
    fn every_trailer_field_is_checked() {
        let mut s = vec![0u8; SECTOR];
        encode_bitmap_sector(&[1, 2, 3], 4, &mut s);
        verify(&s, 0, 4).unwrap();
        let fails = |change: &dyn Fn(&mut Vec<u8>), what: &'static str| {
            let mut bad = s.clone();
            change(&mut bad);
            assert_eq!(
                verify(&bad, 1, 4),
                Err(FormatError::MetadataSector {
                    copy: 1,
                    index: 4,
                    what
                })
            );
        };
        fails(&|b| b[4080] = b'X', "bad magic");
        fails(&|b| put_u32(b, 4084, 5), "sector index mismatch");
        fails(&|b| b[4088] = 1, "checksum mismatch");
        fails(&|b| b[0] ^= 1, "checksum mismatch");
    }
}
