//! Pure decoders of src/format: header slots, journal sectors, metadata sectors. The harness
//! repairs magic and checksum when the input asks, so the fuzzer reaches the field checks
//! behind them. Whatever decodes must encode back to the same bytes' meaning (round trip).

use super::Input;
use fvd::format::{checksum, header, journal, metadata, Header, SECTOR};

fn seal_crc(s: &mut [u8]) {
    let crc = checksum(&s[..SECTOR - 4]);
    s[SECTOR - 4..SECTOR].copy_from_slice(&crc.to_le_bytes());
}

pub fn run(data: &[u8]) {
    let mut inp = Input::new(data);
    let what = inp.u8();
    let fix = what & 0x80 != 0;
    let arg = inp.u64();
    let mut s = vec![0u8; SECTOR];
    let body = inp.rest();
    s[..body.len().min(SECTOR)].copy_from_slice(&body[..body.len().min(SECTOR)]);
    match what % 3 {
        0 => {
            if fix {
                s[0..8].copy_from_slice(header::MAGIC);
                s[8..12].copy_from_slice(&header::VERSION.to_le_bytes());
                seal_crc(&mut s);
            }
            let other = vec![0u8; SECTOR];
            let picked = header::pick_header(&s, &other);
            match Header::decode(&s) {
                Ok(h) => {
                    assert_eq!(picked.as_ref(), Ok(&h));
                    let again = Header::decode(&h.encode()).expect("encoded header decodes");
                    assert_eq!(again, h);
                    let _ = h.geometry().block_count();
                    let _ = h.geometry().chunk_count();
                }
                Err(e) => assert!(picked.is_err(), "{e}"),
            }
        }
        1 => {
            let epoch = u64::from_le_bytes(s[8..16].try_into().unwrap());
            let seq = u64::from_le_bytes(s[16..24].try_into().unwrap());
            if fix {
                s[0..4].copy_from_slice(b"FVDJ");
                seal_crc(&mut s);
            }
            // The engine never encodes an empty record list (flush.rs skips the journal then).
            if let Some(entries) = journal::decode(&s, epoch, seq).filter(|e| !e.is_empty()) {
                let enc = journal::encode(&entries, epoch, seq);
                let mut back = Vec::new();
                for (i, sec) in enc.chunks(SECTOR).enumerate() {
                    back.extend(journal::decode(sec, epoch, seq + i as u64).expect("re-decodes"));
                }
                assert_eq!(back, entries);
            }
        }
        _ => {
            let index = arg % 4096;
            if fix {
                metadata::seal(&mut s, index);
            }
            if metadata::verify(&s, 0, index).is_ok() {
                // Any slice length: the decoders must stay inside both the sector and the slice.
                let n = (arg >> 32) as usize % 3000;
                let mut words = vec![0u64; n];
                metadata::decode_bitmap_sector(&s, index % 8, &mut words);
                let mut entries = vec![0u32; n];
                metadata::decode_table_sector(&s, index % 8, &mut entries);
                let mut out = vec![0u8; SECTOR];
                metadata::encode_table_sector(&entries, index % 8, index, &mut out);
                metadata::verify(&out, 0, index).expect("encoded sector verifies");
            }
        }
    }
}
