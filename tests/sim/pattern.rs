//! Sector contents that identify themselves: (write id, sector number) plus a checkable filler,
//! so a read can tell exactly which write's data, for which sector, it returned.

/// Value of a sector that reads as zeros.
pub const ZERO: u64 = 0;
/// Value of a sector holding base-image data (zeros past the end of the base).
pub const BASE: u64 = 1;
/// First id handed to writes.
pub const FIRST_WRITE: u64 = 2;

fn mix(mut x: u64) -> u64 {
    // splitmix64 finaliser
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58476d1ce4e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d049bb133111eb);
    x ^ (x >> 31)
}

/// Fills `out` (512 bytes) with value `id` of sector `lba`.
pub fn fill(id: u64, lba: u64, out: &mut [u8]) {
    out[..8].copy_from_slice(&id.to_le_bytes());
    out[8..16].copy_from_slice(&lba.to_le_bytes());
    let seed = mix(id ^ lba.rotate_left(29));
    for (i, w) in out[16..512].chunks_exact_mut(8).enumerate() {
        w.copy_from_slice(&mix(seed.wrapping_add(i as u64)).to_le_bytes());
    }
}

pub enum Decoded {
    Value(u64),
    OtherSector { id: u64, lba: u64 },
    Garbage,
}

/// What a sector read at `lba` holds.
pub fn decode(lba: u64, sec: &[u8]) -> Decoded {
    if sec.iter().all(|&b| b == 0) {
        return Decoded::Value(ZERO);
    }
    let id = u64::from_le_bytes(sec[..8].try_into().unwrap());
    let at = u64::from_le_bytes(sec[8..16].try_into().unwrap());
    if id == ZERO {
        return Decoded::Garbage;
    }
    let mut want = [0u8; 512];
    fill(id, at, &mut want);
    if want[..] != sec[..] {
        return Decoded::Garbage;
    }
    if at != lba {
        return Decoded::OtherSector { id, lba: at };
    }
    Decoded::Value(id)
}

/// Contents of a raw base image of `sectors` sectors.
pub fn base_image(sectors: u64) -> Vec<u8> {
    let mut v = vec![0u8; sectors as usize * 512];
    for (lba, s) in v.chunks_exact_mut(512).enumerate() {
        fill(BASE, lba as u64, s);
    }
    v
}
