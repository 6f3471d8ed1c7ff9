//! The image header: geometry, region offsets, base image reference, flags.

use super::{checksum, get_u32, get_u64, put_u32, put_u64, FormatError, SECTOR};

pub const MAGIC: &[u8; 8] = b"FVDIMAGE";
pub const VERSION: u32 = 1;

/// Incompatible feature: the F2 chunk table is in use (compact / thin layout).
pub const INCOMPAT_COMPACT: u64 = 1 << 0;
/// Incompatible feature: the journal may hold intent sectors (records no FLUSH covered yet, see
/// docs/FORMAT.md). Set while the image is open read-write, cleared by a clean shutdown, so a
/// reader that would take intents for committed records refuses the image instead.
pub const INCOMPAT_INTENTS: u64 = 1 << 1;
/// Incompatible feature: the metadata copies hold more bitmap/table sectors than the virtual
/// size needs (room reserved with `fvd create --max-size`, or left by a shrink), so that the
/// image can grow without moving its regions. Set exactly when the sector counts differ from
/// those the virtual size needs: older readers, which demand that they match, refuse the image
/// by this bit instead of by a puzzling geometry error.
pub const INCOMPAT_CAPACITY: u64 = 1 << 2;
/// Incompatible features this program understands.
pub const INCOMPAT_KNOWN: u64 = INCOMPAT_COMPACT | INCOMPAT_INTENTS | INCOMPAT_CAPACITY;

/// Compatible feature: copy data read from the base image into this image.
pub const COMPAT_COPY_ON_READ: u64 = 1 << 0;
/// Compatible feature: prefetch the base image in the background while served.
pub const COMPAT_PREFETCH: u64 = 1 << 1;

/// Flag: the image was closed cleanly (journal empty, metadata copy current).
pub const FLAG_CLEAN: u64 = 1 << 0;
/// Flag: every block is present in this image; the base image is no longer read.
pub const FLAG_BASE_NOT_NEEDED: u64 = 1 << 1;

/// Largest virtual size (and metadata capacity) of an image: 64 PiB.
pub const MAX_VIRTUAL_SIZE: u64 = 1 << 56;

/// Longest base image path that fits the header.
pub const MAX_BASE_PATH: usize = 2048;

// Field offsets inside a header slot.
const O_MAGIC: usize = 0;
const O_VERSION: usize = 8;
const O_HEADER_SIZE: usize = 12;
const O_GENERATION: usize = 16;
const O_INCOMPAT: usize = 24;
const O_COMPAT: usize = 32;
const O_VIRTUAL_SIZE: usize = 40;
const O_BLOCK_SIZE: usize = 48;
const O_CHUNK_SIZE: usize = 52;
const O_FLAGS: usize = 56;
const O_META0: usize = 64;
const O_META1: usize = 72;
const O_META_LEN: usize = 80;
const O_BITMAP_SECTORS: usize = 88;
const O_TABLE_SECTORS: usize = 96;
const O_ACTIVE_META: usize = 104;
const O_JOURNAL_OFFSET: usize = 112;
const O_JOURNAL_LEN: usize = 120;
const O_JOURNAL_EPOCH: usize = 128;
const O_DATA_OFFSET: usize = 136;
const O_BASE_FORMAT: usize = 144;
const O_BASE_PATH_LEN: usize = 148;
const O_BASE_SIZE: usize = 152;
const O_BASE_PATH: usize = 160;
/// Boot of the host that started the journal epoch (after the longest base path).
const O_BOOT_ID: usize = O_BASE_PATH + MAX_BASE_PATH;
const O_CRC: usize = SECTOR - 4;

/// Format of the base (backing) image.
#[derive(Copy, Clone, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum BaseFormat {
    Raw,
    Fvd,
}

impl BaseFormat {
    pub fn name(self) -> &'static str {
        match self {
            BaseFormat::Raw => "raw",
            BaseFormat::Fvd => "fvd",
        }
    }
}

/// Reference to the base image: where it is, what format, and its size when this image was made.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BaseRef {
    pub path: String,
    pub format: BaseFormat,
    pub size: u64,
}

/// The decoded header.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Header {
    pub generation: u64,
    pub incompat: u64,
    pub compat: u64,
    pub virtual_size: u64,
    pub block_size: u32,
    pub chunk_size: u32,
    pub flags: u64,
    pub meta_offset: [u64; 2],
    pub meta_len: u64,
    pub bitmap_sectors: u64,
    pub table_sectors: u64,
    pub active_meta: u32,
    pub journal_offset: u64,
    pub journal_len: u64,
    pub journal_epoch: u64,
    pub data_offset: u64,
    pub base: Option<BaseRef>,
    /// Linux boot_id of the host when the current journal epoch started (zeros: none). Intent
    /// sectors of the epoch are replayed only under this same boot.
    pub boot_id: [u8; 16],
}

impl Header {
    pub fn compact(&self) -> bool {
        self.incompat & INCOMPAT_COMPACT != 0
    }
    pub fn clean(&self) -> bool {
        self.flags & FLAG_CLEAN != 0
    }
    /// The journal may hold intent sectors.
    pub fn intents(&self) -> bool {
        self.incompat & INCOMPAT_INTENTS != 0
    }
    /// Byte offset of the header slot this generation is written to.
    pub fn slot_offset(&self) -> u64 {
        (self.generation % 2) * SECTOR as u64
    }
    /// The largest virtual size the metadata sectors can describe: how far the image can grow
    /// without moving its regions (at most 64 PiB, the format's limit).
    pub fn capacity(&self) -> u64 {
        let bits = self.bitmap_sectors * super::metadata::BITS_PER_SECTOR as u64;
        let mut cap = bits.saturating_mul(self.block_size as u64);
        if self.compact() {
            let entries = self.table_sectors * super::metadata::ENTRIES_PER_SECTOR as u64;
            cap = cap.min(entries.saturating_mul(self.chunk_size as u64));
        }
        cap.min(MAX_VIRTUAL_SIZE)
    }

    /// Sets the virtual size (which must fit [`Header::capacity`]) and the capacity feature bit
    /// that goes with it.
    pub fn set_virtual_size(&mut self, size: u64) {
        self.virtual_size = size;
        let needed = super::layout::Layout::compute(&self.geometry(), self.compact(), 0);
        if needed.bitmap_sectors == self.bitmap_sectors
            && needed.table_sectors == self.table_sectors
        {
            self.incompat &= !INCOMPAT_CAPACITY;
        } else {
            self.incompat |= INCOMPAT_CAPACITY;
        }
    }

    pub fn geometry(&self) -> crate::units::Geometry {
        crate::units::Geometry {
            virtual_size: self.virtual_size,
            block_size: self.block_size as u64,
            chunk_size: self.chunk_size as u64,
        }
    }

    /// A header with `l`'s regions and every other field zero or empty: the base of a literal
    /// that sets the rest (`Header { generation, .., ..Header::with_layout(&l) }`).
    pub fn with_layout(l: &super::layout::Layout) -> Header {
        Header {
            generation: 0,
            incompat: 0,
            compat: 0,
            virtual_size: 0,
            block_size: 0,
            chunk_size: 0,
            flags: 0,
            meta_offset: l.meta_offset,
            meta_len: l.meta_len,
            bitmap_sectors: l.bitmap_sectors,
            table_sectors: l.table_sectors,
            active_meta: 0,
            journal_offset: l.journal_offset,
            journal_len: l.journal_len,
            journal_epoch: 0,
            data_offset: l.data_offset,
            base: None,
            boot_id: [0; 16],
        }
    }

    /// The regions this header records.
    pub fn layout(&self) -> super::layout::Layout {
        super::layout::Layout {
            bitmap_sectors: self.bitmap_sectors,
            table_sectors: self.table_sectors,
            meta_offset: self.meta_offset,
            meta_len: self.meta_len,
            journal_offset: self.journal_offset,
            journal_len: self.journal_len,
            data_offset: self.data_offset,
        }
    }

    /// Encodes into one 4 KiB slot with a trailing crc32c.
    pub fn encode(&self) -> Vec<u8> {
        let mut b = vec![0u8; SECTOR];
        b[O_MAGIC..O_MAGIC + 8].copy_from_slice(MAGIC);
        put_u32(&mut b, O_VERSION, VERSION);
        put_u32(&mut b, O_HEADER_SIZE, SECTOR as u32);
        put_u64(&mut b, O_GENERATION, self.generation);
        put_u64(&mut b, O_INCOMPAT, self.incompat);
        put_u64(&mut b, O_COMPAT, self.compat);
        put_u64(&mut b, O_VIRTUAL_SIZE, self.virtual_size);
        put_u32(&mut b, O_BLOCK_SIZE, self.block_size);
        put_u32(&mut b, O_CHUNK_SIZE, self.chunk_size);
        put_u64(&mut b, O_FLAGS, self.flags);
        put_u64(&mut b, O_META0, self.meta_offset[0]);
        put_u64(&mut b, O_META1, self.meta_offset[1]);
        put_u64(&mut b, O_META_LEN, self.meta_len);
        put_u64(&mut b, O_BITMAP_SECTORS, self.bitmap_sectors);
        put_u64(&mut b, O_TABLE_SECTORS, self.table_sectors);
        put_u32(&mut b, O_ACTIVE_META, self.active_meta);
        put_u64(&mut b, O_JOURNAL_OFFSET, self.journal_offset);
        put_u64(&mut b, O_JOURNAL_LEN, self.journal_len);
        put_u64(&mut b, O_JOURNAL_EPOCH, self.journal_epoch);
        put_u64(&mut b, O_DATA_OFFSET, self.data_offset);
        if let Some(base) = &self.base {
            let fmt = match base.format {
                BaseFormat::Raw => 1,
                BaseFormat::Fvd => 2,
            };
            put_u32(&mut b, O_BASE_FORMAT, fmt);
            let p = base.path.as_bytes();
            assert!(p.len() <= MAX_BASE_PATH, "base path checked by the caller");
            put_u32(&mut b, O_BASE_PATH_LEN, p.len() as u32);
            put_u64(&mut b, O_BASE_SIZE, base.size);
            b[O_BASE_PATH..O_BASE_PATH + p.len()].copy_from_slice(p);
        }
        b[O_BOOT_ID..O_BOOT_ID + 16].copy_from_slice(&self.boot_id);
        let crc = checksum(&b[..O_CRC]);
        put_u32(&mut b, O_CRC, crc);
        b
    }

    /// Decodes one slot. Checks magic, checksum, version, features and internal consistency.
    pub fn decode(b: &[u8]) -> Result<Header, FormatError> {
        if b.len() < SECTOR || &b[O_MAGIC..O_MAGIC + 8] != MAGIC {
            return Err(FormatError::BadMagic);
        }
        if checksum(&b[..O_CRC]) != get_u32(b, O_CRC) {
            return Err(FormatError::HeaderChecksum);
        }
        let version = get_u32(b, O_VERSION);
        if version != VERSION {
            return Err(FormatError::UnsupportedVersion(version));
        }
        let incompat = get_u64(b, O_INCOMPAT);
        if incompat & !INCOMPAT_KNOWN != 0 {
            return Err(FormatError::UnknownIncompatFeatures(
                incompat & !INCOMPAT_KNOWN,
            ));
        }
        let base = match get_u32(b, O_BASE_FORMAT) {
            0 => None,
            f @ (1 | 2) => {
                let len = get_u32(b, O_BASE_PATH_LEN) as usize;
                if len == 0 || len > MAX_BASE_PATH {
                    return Err(FormatError::InvalidHeader("bad base path length".into()));
                }
                let path = std::str::from_utf8(&b[O_BASE_PATH..O_BASE_PATH + len])
                    .map_err(|_| FormatError::InvalidHeader("base path is not UTF-8".into()))?;
                Some(BaseRef {
                    path: path.to_string(),
                    format: if f == 1 {
                        BaseFormat::Raw
                    } else {
                        BaseFormat::Fvd
                    },
                    size: get_u64(b, O_BASE_SIZE),
                })
            }
            f => {
                return Err(FormatError::InvalidHeader(format!(
                    "unknown base format {f}"
                )))
            }
        };
        let h = Header {
            generation: get_u64(b, O_GENERATION),
            incompat,
            compat: get_u64(b, O_COMPAT),
            virtual_size: get_u64(b, O_VIRTUAL_SIZE),
            block_size: get_u32(b, O_BLOCK_SIZE),
            chunk_size: get_u32(b, O_CHUNK_SIZE),
            flags: get_u64(b, O_FLAGS),
            meta_offset: [get_u64(b, O_META0), get_u64(b, O_META1)],
            meta_len: get_u64(b, O_META_LEN),
            bitmap_sectors: get_u64(b, O_BITMAP_SECTORS),
            table_sectors: get_u64(b, O_TABLE_SECTORS),
            active_meta: get_u32(b, O_ACTIVE_META),
            journal_offset: get_u64(b, O_JOURNAL_OFFSET),
            journal_len: get_u64(b, O_JOURNAL_LEN),
            journal_epoch: get_u64(b, O_JOURNAL_EPOCH),
            data_offset: get_u64(b, O_DATA_OFFSET),
            base,
            boot_id: b[O_BOOT_ID..O_BOOT_ID + 16].try_into().unwrap_or_default(),
        };
        h.validate()?;
        Ok(h)
    }

    /// Checks that sizes are sane and regions are ordered and do not overlap, so that nothing
    /// later computes an offset from garbage.
    pub fn validate(&self) -> Result<(), FormatError> {
        let bad = |m: &str| Err(FormatError::InvalidHeader(m.to_string()));
        let bs = self.block_size as u64;
        let cs = self.chunk_size as u64;
        if !bs.is_power_of_two() || !(4096..=(1 << 24)).contains(&bs) {
            return bad("block size must be a power of two between 4 KiB and 16 MiB");
        }
        if !cs.is_power_of_two() || cs < bs || cs > (1 << 30) {
            return bad(
                "chunk size must be a power of two, at least the block size, at most 1 GiB",
            );
        }
        if self.virtual_size == 0
            || self.virtual_size % 512 != 0
            || self.virtual_size > MAX_VIRTUAL_SIZE
        {
            return bad("virtual size must be a non-zero multiple of 512 bytes, at most 64 PiB");
        }
        let geo = self.geometry();
        let l = super::layout::Layout::compute(&geo, self.compact(), self.journal_len);
        let exact =
            self.bitmap_sectors == l.bitmap_sectors && self.table_sectors == l.table_sectors;
        if self.incompat & INCOMPAT_CAPACITY == 0 {
            if !exact {
                return bad("metadata sector counts do not match the geometry");
            }
        } else {
            // Room to grow: at least what the size needs, no more than the largest size needs
            // (which also bounds what a reader allocates by these counts).
            let most = super::layout::Layout::compute(
                &crate::units::Geometry {
                    virtual_size: MAX_VIRTUAL_SIZE,
                    ..geo
                },
                self.compact(),
                0,
            );
            if self.bitmap_sectors < l.bitmap_sectors
                || self.table_sectors < l.table_sectors
                || self.bitmap_sectors > most.bitmap_sectors
                || self.table_sectors > most.table_sectors
                || (!self.compact() && self.table_sectors != 0)
            {
                return bad("metadata sector counts do not fit the geometry");
            }
        }
        if self.meta_len < (self.bitmap_sectors + self.table_sectors) * SECTOR as u64 {
            return bad("metadata region too small");
        }
        if self.active_meta > 1 {
            return bad("active metadata copy must be 0 or 1");
        }
        let aligned = |v: u64| v % SECTOR as u64 == 0;
        let regions = [
            (self.meta_offset[0], self.meta_len),
            (self.meta_offset[1], self.meta_len),
            (self.journal_offset, self.journal_len),
        ];
        let mut end = 2 * SECTOR as u64;
        for (off, len) in regions {
            if !aligned(off) || !aligned(len) || off < end {
                return bad("metadata regions overlap or are misaligned");
            }
            end = off
                .checked_add(len)
                .ok_or(FormatError::InvalidHeader("region overflow".into()))?;
        }
        if self.journal_len < SECTOR as u64 {
            return bad("journal too small");
        }
        if self.data_offset < end || self.data_offset % cs != 0 {
            return bad("data area overlaps metadata or is not chunk-aligned");
        }
        Ok(())
    }
}

/// Picks the current header from the two slots: the valid one with the highest generation.
pub fn pick_header(slot0: &[u8], slot1: &[u8]) -> Result<Header, FormatError> {
    match (Header::decode(slot0), Header::decode(slot1)) {
        (Ok(a), Ok(b)) => Ok(if b.generation > a.generation { b } else { a }),
        (Ok(a), Err(_)) => Ok(a),
        (Err(_), Ok(b)) => Ok(b),
        // Report the more specific problem: a magic mismatch in one slot is expected for a torn
        // first write, so prefer the other slot's error.
        (Err(FormatError::BadMagic), Err(e)) | (Err(e), Err(_)) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::format::layout::Layout;
    use crate::units::Geometry;

    /// A compact header laid out for `max` bytes holding `size`.
    fn header(size: u64, max: u64) -> Header {
        let geo = Geometry {
            virtual_size: max,
            block_size: 64 << 10,
            chunk_size: 1 << 20,
        };
        let l = Layout::compute(&geo, true, 1 << 20);
        let mut h = Header {
            generation: 1,
            incompat: INCOMPAT_COMPACT,
            compat: 0,
            virtual_size: max,
            block_size: 64 << 10,
            chunk_size: 1 << 20,
            flags: 0,
            active_meta: 0,
            journal_epoch: 7,
            base: None,
            boot_id: [0; 16],
            ..Header::with_layout(&l)
        };
        h.set_virtual_size(size);
        h
    }

    /// `h` with the capacity bit and `bitmap` + `table` metadata sectors, its regions laid out
    /// again around them (so only the counts can make it invalid).
    fn with_counts(h: &Header, bitmap: u64, table: u64) -> Header {
        let mut h = h.clone();
        h.incompat |= INCOMPAT_CAPACITY;
        h.bitmap_sectors = bitmap;
        h.table_sectors = table;
        h.meta_len = (bitmap + table) * SECTOR as u64;
        h.meta_offset = [2 * SECTOR as u64, 2 * SECTOR as u64 + h.meta_len];
        h.journal_offset = h.meta_offset[1] + h.meta_len;
        h.data_offset = (h.journal_offset + h.journal_len).next_multiple_of(h.chunk_size as u64);
        h
    }

    fn counts_refused(h: &Header) -> bool {
        matches!(h.validate(), Err(FormatError::InvalidHeader(m)) if m.contains("counts do not fit"))
    }

    #[test]
    fn capacity_counts_are_checked_at_each_bound() {
        // 3 GiB needs 2 bitmap sectors (2040 MiB each) and 4 table sectors (1020 MiB each).
        let h = header(3 << 30, 3 << 30);
        let need = Layout::compute(&h.geometry(), true, 0);
        let most = Layout::compute(
            &Geometry {
                virtual_size: MAX_VIRTUAL_SIZE,
                ..h.geometry()
            },
            true,
            0,
        );
        assert_eq!((need.bitmap_sectors, need.table_sectors), (2, 4));
        let ok = |b, t| with_counts(&h, b, t).validate().is_ok();
        let refused = |b, t| counts_refused(&with_counts(&h, b, t));
        // Exactly what the size needs, and exactly the most any size needs: accepted.
        assert!(ok(2, 4));
        assert!(ok(most.bitmap_sectors, 4));
        assert!(ok(2, most.table_sectors));
        // One short of the size, or one past the largest size, in either count: refused.
        assert!(refused(1, 4));
        assert!(refused(2, 3));
        assert!(refused(most.bitmap_sectors + 1, 4));
        assert!(refused(2, most.table_sectors + 1));
        // A flat image has no table: with room in its bitmap it is valid, with a table not.
        let mut flat = h.clone();
        flat.incompat &= !INCOMPAT_COMPACT;
        assert!(with_counts(&flat, 3, 0).validate().is_ok());
        assert!(counts_refused(&with_counts(&flat, 3, 1)));
    }

    #[test]
    fn capacity_bit_follows_the_sector_counts_and_is_checked() {
        // 1 GiB in 4 GiB of room: 5 table sectors (1020 chunks each) where 2 would do.
        let h = header(1 << 30, 4 << 30);
        assert_ne!(h.incompat & INCOMPAT_CAPACITY, 0);
        assert_eq!(h.capacity(), (5 * 1020) << 20);
        assert_eq!(Header::decode(&h.encode()).unwrap(), h);
        // Without the bit, an older reader's rule: the counts must match the size exactly.
        let mut old = h.clone();
        old.incompat &= !INCOMPAT_CAPACITY;
        assert!(matches!(
            Header::decode(&old.encode()),
            Err(FormatError::InvalidHeader(_))
        ));
        // Grown into its room: the counts match again and the bit goes.
        let mut grown = h.clone();
        grown.set_virtual_size(h.capacity());
        assert_eq!(grown.incompat & INCOMPAT_CAPACITY, 0);
        Header::decode(&grown.encode()).unwrap();
        // Room smaller than the size, or absurdly large, is refused.
        let mut small = h.clone();
        small.virtual_size = h.capacity() + (1 << 20);
        assert!(small.validate().is_err());
        let mut huge = h.clone();
        huge.table_sectors = u64::MAX / 8192;
        assert!(huge.validate().is_err());
        // Room in the table only (a table sector maps 1020 MiB, a bitmap sector 2040 MiB): the
        // table's count alone differs from the size's, and the bit is still needed.
        let h = header(100 << 20, 1500 << 20);
        let exact = Layout::compute(&h.geometry(), true, 1 << 20);
        assert_eq!(exact.bitmap_sectors, h.bitmap_sectors);
        assert_ne!(exact.table_sectors, h.table_sectors);
        assert_ne!(h.incompat & INCOMPAT_CAPACITY, 0);
    }
}

#[cfg(test)]
mod decode_tests {
    use super::super::layout::Layout;
    use super::*;

    /// A valid header for `virtual_size` bytes, laid out as `fvd create` does.
    fn valid(virtual_size: u64, block_size: u32, chunk_size: u32, compact: bool) -> Header {
        let geo = crate::units::Geometry {
            virtual_size,
            block_size: block_size as u64,
            chunk_size: chunk_size as u64,
        };
        let l = Layout::compute(&geo, compact, 64 << 10);
        Header {
            generation: 5,
            incompat: if compact { INCOMPAT_COMPACT } else { 0 },
            compat: COMPAT_PREFETCH,
            virtual_size,
            block_size,
            chunk_size,
            flags: FLAG_BASE_NOT_NEEDED,
            active_meta: 1,
            journal_epoch: 77,
            base: None,
            boot_id: [0; 16],
            ..Header::with_layout(&l)
        }
    }

    fn invalid(h: &Header) -> bool {
        matches!(h.validate(), Err(FormatError::InvalidHeader(_)))
    }

    #[test]
    fn every_field_round_trips() {
        for (compact, base) in [
            (true, None),
            (
                false,
                Some(BaseRef {
                    path: "/images/base.raw".into(),
                    format: BaseFormat::Raw,
                    size: 1 << 30,
                }),
            ),
            (
                true,
                Some(BaseRef {
                    path: "b".repeat(MAX_BASE_PATH),
                    format: BaseFormat::Fvd,
                    size: 12345 * 512,
                }),
            ),
        ] {
            let mut h = valid(8 << 30, 64 << 10, 1 << 20, compact);
            h.base = base;
            h.incompat |= INCOMPAT_INTENTS;
            h.boot_id = *b"0123456789abcdef";
            let b = h.encode();
            assert_eq!(b.len(), SECTOR);
            assert_eq!(Header::decode(&b), Ok(h.clone()));
            assert_eq!(h.compact(), compact);
            assert!(h.intents() && !h.clean());
        }
        // The flag and feature helpers read their own bit only.
        let mut h = valid(1 << 20, 4096, 4096, false);
        assert!(!h.compact() && !h.intents() && !h.clean());
        h.flags = FLAG_CLEAN;
        assert!(h.clean());
        h.flags = !FLAG_CLEAN;
        assert!(!h.clean());
        h.incompat = !(INCOMPAT_COMPACT | INCOMPAT_INTENTS);
        assert!(!h.compact() && !h.intents());
        // Generations alternate between the two slots.
        assert_eq!((h.slot_offset(), h.generation), (SECTOR as u64, 5));
        h.generation = 6;
        assert_eq!(h.slot_offset(), 0);
    }

    #[test]
    fn damaged_or_foreign_slots_are_refused() {
        let mut h = valid(1 << 30, 64 << 10, 1 << 20, true);
        h.base = Some(BaseRef {
            path: "base".into(),
            format: BaseFormat::Fvd,
            size: 4096,
        });
        let good = h.encode();
        // Re-seals a modified slot so only the intended check can refuse it.
        let reseal = |change: &dyn Fn(&mut Vec<u8>)| {
            let mut b = good.clone();
            change(&mut b);
            let crc = checksum(&b[..O_CRC]);
            put_u32(&mut b, O_CRC, crc);
            Header::decode(&b)
        };
        assert_eq!(
            Header::decode(&good[..SECTOR - 1]),
            Err(FormatError::BadMagic)
        );
        assert_eq!(reseal(&|b| b[O_MAGIC] = b'X'), Err(FormatError::BadMagic));
        let mut torn = good.clone();
        torn[O_VIRTUAL_SIZE] ^= 1;
        assert_eq!(Header::decode(&torn), Err(FormatError::HeaderChecksum));
        assert_eq!(
            reseal(&|b| put_u32(b, O_VERSION, 2)),
            Err(FormatError::UnsupportedVersion(2))
        );
        assert_eq!(
            reseal(&|b| put_u64(b, O_INCOMPAT, INCOMPAT_COMPACT | 1 << 7 | 1 << 40)),
            Err(FormatError::UnknownIncompatFeatures(1 << 7 | 1 << 40))
        );
        assert!(matches!(
            reseal(&|b| put_u32(b, O_BASE_FORMAT, 3)),
            Err(FormatError::InvalidHeader(m)) if m.contains("base format 3")
        ));
        for len in [0, MAX_BASE_PATH as u32 + 1, u32::MAX] {
            assert!(matches!(
                reseal(&|b| put_u32(b, O_BASE_PATH_LEN, len)),
                Err(FormatError::InvalidHeader(m)) if m.contains("base path length")
            ));
        }
        assert!(matches!(
            reseal(&|b| b[O_BASE_PATH] = 0xff),
            Err(FormatError::InvalidHeader(m)) if m.contains("UTF-8")
        ));
        // The longest path is read whole.
        let decoded = reseal(&|b| {
            put_u32(b, O_BASE_PATH_LEN, MAX_BASE_PATH as u32);
            b[O_BASE_PATH..O_BASE_PATH + MAX_BASE_PATH].fill(b'p');
        })
        .unwrap();
        assert_eq!(decoded.base.unwrap().path, "p".repeat(MAX_BASE_PATH));
        // A valid slot whose content does not validate is refused too.
        assert!(matches!(
            reseal(&|b| put_u32(b, O_ACTIVE_META, 2)),
            Err(FormatError::InvalidHeader(_))
        ));
    }

    #[test]
    fn sizes_are_accepted_up_to_their_limits_and_refused_past_them() {
        // Block size: 4 KiB to 16 MiB, a power of two.
        assert!(valid(1 << 30, 4096, 4096, true).validate().is_ok());
        assert!(valid(1 << 30, 1 << 24, 1 << 24, true).validate().is_ok());
        assert!(invalid(&valid(1 << 30, 2048, 4096, true)));
        assert!(invalid(&valid(1 << 30, 1 << 25, 1 << 25, true)));
        assert!(invalid(&valid(1 << 30, 3 << 12, 3 << 12, true)));
        // Chunk size: a power of two, at least the block size, at most 1 GiB.
        assert!(valid(4 << 30, 4096, 1 << 30, true).validate().is_ok());
        assert!(invalid(&valid(4 << 30, 4096, 1 << 31, true)));
        assert!(invalid(&valid(1 << 30, 8192, 4096, true)));
        assert!(invalid(&valid(1 << 30, 4096, 3 << 12, true)));
        // Virtual size: a non-zero multiple of 512, at most 64 PiB.
        assert!(valid(512, 4096, 4096, false).validate().is_ok());
        assert!(valid(1 << 56, 1 << 24, 1 << 30, false).validate().is_ok());
        assert!(invalid(&valid((1 << 56) + 512, 1 << 24, 1 << 30, false)));
        assert!(invalid(&valid(1000, 4096, 4096, false)));
        let mut h = valid(4096, 4096, 4096, false);
        h.virtual_size = 0;
        assert!(invalid(&h));
    }

    #[test]
    fn regions_must_match_the_geometry_be_ordered_and_aligned() {
        let good = valid(1 << 30, 64 << 10, 1 << 20, true);
        assert!(good.validate().is_ok());
        let refused = |change: &dyn Fn(&mut Header)| {
            let mut h = good.clone();
            change(&mut h);
            invalid(&h)
        };
        let accepted = |change: &dyn Fn(&mut Header)| {
            let mut h = good.clone();
            change(&mut h);
            h.validate().is_ok()
        };
        let s = SECTOR as u64;
        assert!(refused(&|h| h.bitmap_sectors += 1));
        assert!(refused(&|h| h.table_sectors -= 1));
        // A flat header's counts are those of a flat layout (no table).
        assert!(refused(&|h| h.incompat = 0));
        // The metadata region may be larger than its sectors, never smaller.
        assert!(refused(&|h| h.meta_len -= s));
        assert!(accepted(&|h| {
            h.meta_len += s;
            h.meta_offset[1] += s;
            h.journal_offset += 2 * s;
        }));
        assert!(accepted(&|h| h.active_meta = 0));
        assert!(refused(&|h| h.active_meta = 2));
        // Copy 0 starts right after the two header slots at the earliest.
        assert!(refused(&|h| h.meta_offset[0] -= s));
        assert!(refused(&|h| h.meta_offset[0] += 1));
        assert!(refused(&|h| h.meta_offset[1] -= s));
        assert!(refused(&|h| h.journal_offset -= s));
        assert!(refused(&|h| h.journal_offset += 512));
        assert!(refused(&|h| h.journal_len += 512));
        // Gaps between regions are allowed.
        assert!(accepted(&|h| h.journal_offset += s));
        assert!(refused(&|h| h.journal_offset = u64::MAX - s + 1));
        assert!(refused(&|h| h.journal_len = 0));
        assert!(accepted(&|h| h.journal_len = s));
        // The data area starts after the journal, on a chunk boundary.
        assert!(refused(&|h| h.data_offset -= 1 << 20));
        assert!(refused(&|h| h.data_offset += s));
        assert!(accepted(&|h| h.data_offset += 1 << 20));
        assert!(accepted(&|h| {
            h.journal_len = h.data_offset - h.journal_offset;
        }));
        assert!(refused(&|h| {
            h.journal_len = h.data_offset - h.journal_offset + s;
        }));
    }

    #[test]
    fn the_newest_valid_slot_wins() {
        let mut old = valid(1 << 30, 64 << 10, 1 << 20, true);
        old.generation = 8;
        let mut new = old.clone();
        new.generation = 9;
        new.journal_epoch += 1;
        let (a, b) = (old.encode(), new.encode());
        assert_eq!(pick_header(&a, &b), Ok(new.clone()));
        assert_eq!(pick_header(&b, &a), Ok(new.clone()));
        let mut torn = b.clone();
        torn[100] ^= 1;
        assert_eq!(pick_header(&a, &torn), Ok(old.clone()));
        assert_eq!(pick_header(&torn, &a), Ok(old.clone()));
        // Neither valid: a blank slot (a torn first write) says less than a bad checksum.
        let blank = vec![0u8; SECTOR];
        assert_eq!(pick_header(&blank, &torn), Err(FormatError::HeaderChecksum));
        assert_eq!(pick_header(&torn, &blank), Err(FormatError::HeaderChecksum));
        assert_eq!(pick_header(&blank, &blank), Err(FormatError::BadMagic));
        // Equal generations never come from fvd (each write goes to slot generation % 2), but
        // a crafted image gets one answer, slot 0, from open and `fvd check` alike.
        let mut twin = old.clone();
        twin.journal_epoch += 5;
        assert_eq!(pick_header(&a, &twin.encode()), Ok(old.clone()));
        assert_eq!(pick_header(&twin.encode(), &a), Ok(twin));
    }
}

/// The byte layout docs/FORMAT.md gives ("Header (two slots)"): images written by earlier
/// versions must keep opening the same.
#[cfg(test)]
mod on_disk_tests {
    use super::*;

    #[test]
    fn fields_are_at_their_documented_offsets() {
        let h = Header {
            generation: 0x10,
            incompat: INCOMPAT_COMPACT | INCOMPAT_INTENTS,
            compat: COMPAT_COPY_ON_READ | COMPAT_PREFETCH,
            virtual_size: 0x18,
            block_size: 0x30,
            chunk_size: 0x34,
            flags: FLAG_CLEAN | FLAG_BASE_NOT_NEEDED,
            meta_offset: [0x40, 0x48],
            meta_len: 0x50,
            bitmap_sectors: 0x58,
            table_sectors: 0x60,
            active_meta: 1,
            journal_offset: 0x70,
            journal_len: 0x78,
            journal_epoch: 0x80,
            data_offset: 0x88,
            base: Some(BaseRef {
                path: "nbd://host/x".into(),
                format: BaseFormat::Fvd,
                size: 0x98,
            }),
            boot_id: [0xb0; 16],
        };
        let b = h.encode();
        assert_eq!(&b[0..8], b"FVDIMAGE");
        let u32s = [
            (8, 1),
            (12, 4096),
            (48, 0x30),
            (52, 0x34),
            (104, 1),
            (144, 2),
            (148, 12),
        ];
        for (off, v) in u32s {
            assert_eq!(get_u32(&b, off), v, "u32 at {off}");
        }
        let u64s = [
            (16, 0x10),
            (24, 3),
            (32, 3),
            (40, 0x18),
            (56, 3),
            (64, 0x40),
            (72, 0x48),
            (80, 0x50),
            (88, 0x58),
            (96, 0x60),
            (112, 0x70),
            (120, 0x78),
            (128, 0x80),
            (136, 0x88),
            (152, 0x98),
        ];
        for (off, v) in u64s {
            assert_eq!(get_u64(&b, off), v, "u64 at {off}");
        }
        assert_eq!(&b[160..172], b"nbd://host/x");
        assert!(b[172..2208].iter().all(|&x| x == 0));
        assert_eq!(b[2208..2224], [0xb0; 16]);
        assert!(b[2224..4092].iter().all(|&x| x == 0));
        assert_eq!(get_u32(&b, 4092), checksum(&b[..4092]));
        let mut raw = h.clone();
        raw.base.as_mut().unwrap().format = BaseFormat::Raw;
        assert_eq!(get_u32(&raw.encode(), 144), 1);
        raw.base = None;
        assert_eq!(get_u32(&raw.encode(), 144), 0);
        assert_eq!(
            (BaseFormat::Raw.name(), BaseFormat::Fvd.name()),
            ("raw", "fvd")
        );
    }
}
