//! A small FVD image on the simulated disk (in memory, deterministic), written by the real
//! engine, and structure-aware corruption of it: header fields (checksum resealed), metadata
//! sectors (resealed), journal sectors of the current epoch (valid framing, arbitrary
//! records), and raw byte patches (not resealed). Data written through the engine uses
//! self-describing 8-byte words, so a read can tell written data from anything else.

use super::Input;
use fvd::engine::storage::Storage;
use fvd::engine::{Base, CreateParams, Image};
use fvd::format::{checksum, BaseFormat, BaseRef, Header, SECTOR};
use fvd::io::sim::{SimConfig, SimFile, SimIo, SimWorld};
use fvd::io::Buf;
use fvd::units::VirtOffset;
use std::collections::HashSet;
use std::sync::Arc;

pub struct Built {
    pub world: Arc<SimWorld>,
    pub file: SimFile,
    pub base: Option<(SimFile, u64)>,
    pub header: Header,
    /// Every 8-byte word ever written to the image or the base (besides zero).
    pub written: HashSet<u64>,
}

/// (offset, length) of every header field a mutation may overwrite.
const FIELDS: [(usize, usize); 22] = [
    (8, 4),
    (12, 4),
    (16, 8),
    (24, 8),
    (32, 8),
    (40, 8),
    (48, 4),
    (52, 4),
    (56, 8),
    (64, 8),
    (72, 8),
    (80, 8),
    (88, 8),
    (96, 8),
    (104, 4),
    (112, 8),
    (120, 8),
    (128, 8),
    (136, 8),
    (144, 4),
    (148, 4),
    (152, 8),
];

/// The word of generation `tag` at word `i` of image block `b` (never zero).
fn word(tag: u64, b: u64, i: u64) -> u64 {
    (tag << 48) | (b << 12) | i | (1 << 63)
}

impl Built {
    pub fn io(&self) -> SimIo {
        self.world.io()
    }

    pub fn base(&self) -> Option<Base<SimIo>> {
        self.base.as_ref().map(|(f, size)| Base::Raw {
            store: Storage::new(f.read_only()),
            size: *size,
        })
    }

    /// Whether the header in force names a base this image was not built with (a crafted
    /// header may add the base reference; only the real tools would open what it names).
    pub fn names_unknown_base(&self) -> bool {
        self.header_names_base() == Some(true) && self.base.is_none()
    }

    fn header_names_base(&self) -> Option<bool> {
        let (io, f) = (self.io(), self.file.clone());
        self.world
            .block_on(async move { Image::read_header(&io, &f).await })
            .ok()
            .map(|h| h.base.is_some())
    }

    pub fn open(&self, read_only: bool) -> fvd::engine::Result<Arc<Image<SimIo>>> {
        // The base follows the header in force: a crafted header may drop the base reference.
        let base = match self.header_names_base() {
            Some(false) => None,
            _ => self.base(),
        };
        let (io, file) = (self.io(), self.file.clone());
        self.world
            .block_on(async move { Image::open(&io, file, base, read_only).await.map(Arc::new) })
    }

    /// Reads the whole disk; every non-zero word must have been written by the model.
    pub fn read_all(&self, img: &Arc<Image<SimIo>>) -> fvd::engine::Result<()> {
        // A crafted header may shrink the base to a size that ends inside a word: that word
        // reads as the base's bytes up to the end and zeros after it.
        let base_end = match (&self.base, img.header().base) {
            (Some((_, size)), Some(r)) => r.size.min(*size),
            _ => 0,
        };
        let step = img.geometry().chunk_size.min(256 << 10);
        let size = img.virtual_size();
        let mut off = 0;
        while off < size {
            let len = step.min(size - off);
            let (io, img2) = (self.io(), img.clone());
            let buf = Buf::alloc(len as usize);
            let b2 = buf.clone();
            self.world
                .block_on(async move { img2.read(&io, VirtOffset(off), b2).await })?;
            for (i, w) in buf.to_vec().chunks_exact(8).enumerate() {
                let w = u64::from_le_bytes(w.try_into().unwrap());
                let at = off + 8 * i as u64;
                assert!(
                    w == 0 || self.written.contains(&w) || w == base_tail(at, base_end),
                    "offset {at} reads {w:#x}, which was never written"
                );
            }
            off += len;
        }
        Ok(())
    }

    /// Writes block `b` with generation `tag` through the engine.
    pub fn write_block(
        &mut self,
        img: &Arc<Image<SimIo>>,
        b: u64,
        tag: u64,
    ) -> fvd::engine::Result<()> {
        let bs = img.geometry().block_size;
        // The last block may be partial.
        let len = bs.min(img.virtual_size() - b * bs);
        let words: Vec<u8> = (0..len / 8)
            .flat_map(|i| word(tag, b, i).to_le_bytes())
            .collect();
        self.written.extend((0..len / 8).map(|i| word(tag, b, i)));
        let buf = Buf::alloc(len as usize);
        buf.copy_from_slice(0, &words);
        let (io, img2) = (self.io(), img.clone());
        self.world
            .block_on(async move { img2.write(&io, VirtOffset(b * bs), buf).await })
    }

    pub fn flush(&self, img: &Arc<Image<SimIo>>) -> fvd::engine::Result<()> {
        let (io, img2) = (self.io(), img.clone());
        self.world.block_on(async move { img2.flush(&io).await })
    }

    pub fn close(&self, img: &Arc<Image<SimIo>>) -> fvd::engine::Result<()> {
        let (io, img2) = (self.io(), img.clone());
        self.world.block_on(async move { img2.close(&io).await })
    }

    pub fn check(&self) -> fvd::engine::Result<fvd::engine::check::CheckReport> {
        let (io, file) = (self.io(), self.file.clone());
        self.world
            .block_on(async move { fvd::engine::check::check(&io, file).await })
    }

    /// `fvd check --repair` (the only call of the repair API here, so an API change is local).
    pub fn repair(&self) -> Result<Vec<fvd::engine::check::Problem>, String> {
        let (io, file) = (self.io(), self.file.clone());
        self.world
            .block_on(async move { fvd::engine::check::repair(&io, file).await })
            .map(|r| r.fixed)
            .map_err(|e| e.to_string())
    }

    fn patch_sealed(&self, off: u64, f: impl FnOnce(&mut [u8])) {
        let mut s = self.file.read_now(off, SECTOR);
        f(&mut s);
        let crc = checksum(&s[..SECTOR - 4]);
        s[SECTOR - 4..].copy_from_slice(&crc.to_le_bytes());
        self.file.write_now(off, &s);
    }

    /// Applies the corruptions the rest of the input describes. Journal sectors carry epochs
    /// from the previous to two past the current one: open and repair must start every new epoch
    /// above all of them (sectors left in the journal area never become records).
    pub fn corrupt(&self, inp: &mut Input) {
        // The current header: a read-write open since `build` started a new journal epoch.
        let (io, f) = (self.io(), self.file.clone());
        let h = &self
            .world
            .block_on(async move { Image::read_header(&io, &f).await })
            .expect("header of the uncorrupted image");
        let meta_sectors = h.bitmap_sectors + h.table_sectors;
        let journal_sectors = h.journal_len / SECTOR as u64;
        for _ in 0..16 {
            if inp.is_empty() {
                break;
            }
            match inp.u8() % 6 {
                0 => {
                    // One header field of one slot, checksum resealed.
                    let slot = inp.below(2);
                    let (at, len) = FIELDS[inp.below(FIELDS.len() as u64) as usize];
                    let v = inp.u64().to_le_bytes();
                    self.patch_sealed(slot * SECTOR as u64, |s| {
                        s[at..at + len].copy_from_slice(&v[..len])
                    });
                }
                1 | 2 => {
                    // A journal sector near the current epoch with arbitrary records.
                    let seq = inp.below(journal_sectors.min(4));
                    // The previous, current or next epoch, and sometimes the one after that
                    // (inputs from before that choice existed keep their meaning mostly).
                    let r = inp.u64();
                    let ahead = u64::from(r % 3 == 2 && (r / 3) % 2 == 1);
                    let epoch = h.journal_epoch.wrapping_add(r % 3 + ahead).wrapping_sub(1);
                    let n = inp.below(6) as usize;
                    let mut s = vec![0u8; SECTOR];
                    s[0..4].copy_from_slice(b"FVDJ");
                    s[4..6].copy_from_slice(&(n as u16).to_le_bytes());
                    s[8..16].copy_from_slice(&epoch.to_le_bytes());
                    s[16..24].copy_from_slice(&seq.to_le_bytes());
                    for j in 0..n {
                        let kind = 1 + inp.below(4);
                        // Mostly small indexes, so records hit the image rather than miss it.
                        let (idx, arg) = if inp.bool() {
                            (inp.u64() & ((1 << 56) - 1), inp.u64())
                        } else {
                            (inp.below(600), inp.below(600))
                        };
                        let at = 24 + 16 * j;
                        s[at..at + 8].copy_from_slice(&((kind << 56) | idx).to_le_bytes());
                        s[at + 8..at + 16].copy_from_slice(&arg.to_le_bytes());
                    }
                    self.patch_sealed(h.journal_offset + seq * SECTOR as u64, |d| {
                        d.copy_from_slice(&s)
                    });
                }
                3 => {
                    // Metadata words of one sector of one copy, trailer resealed.
                    let copy = inp.below(2) as usize;
                    let sec = inp.below(meta_sectors.max(1));
                    let at = inp.below(1020) as usize * 4;
                    let v = inp.u32().to_le_bytes();
                    self.patch_sealed(h.meta_offset[copy] + sec * SECTOR as u64, |s| {
                        s[at..at + 4].copy_from_slice(&v)
                    });
                }
                4 => {
                    // A table entry of the active copy pointing at a physical chunk near others.
                    if h.table_sectors > 0 {
                        let e = inp.below(h.table_sectors * 1020);
                        let v = inp.below(40) as u32;
                        let sec = h.bitmap_sectors + e / 1020;
                        let at = (e % 1020) as usize * 4;
                        self.patch_sealed(
                            h.meta_offset[h.active_meta as usize] + sec * SECTOR as u64,
                            |s| s[at..at + 4].copy_from_slice(&v.to_le_bytes()),
                        );
                    }
                }
                _ => {
                    // Raw bytes anywhere before the data area, not resealed. All 8 of them: data
                    // has no checksum, so bytes spilling into it are legitimate new contents,
                    // not damage the engine could see (such a spill once passed for a defect).
                    let off = inp.below(h.data_offset - 8);
                    let b = inp.bytes(8).to_vec();
                    self.file.write_now(off, &b);
                }
            }
        }
    }
}

/// The word at byte `at` that a base ending at `base_end` inside it reads as (none otherwise).
fn base_tail(at: u64, base_end: u64) -> u64 {
    if !(at < base_end && base_end < at + 8) {
        return 0;
    }
    let i = at / 8;
    let keep = (base_end - at) * 8;
    word(0xba5e, i / 512, i) & ((1u64 << keep) - 1)
}

/// Builds an image from the input's first bytes: geometry, layout, optional raw base.
pub fn build(inp: &mut Input) -> Built {
    let block_size = 4096u64 << inp.below(3);
    let chunk_size = block_size << inp.below(4);
    let blocks = 1 + inp.below(160);
    let virtual_size = blocks * block_size - 512 * inp.below(2);
    let compact = inp.bool();
    let journal_size = SECTOR as u64 * (1 + inp.below(4));
    let with_base = inp.bool();
    let world = SimWorld::new(0, SimConfig::default());
    let mut written = HashSet::new();
    let base = with_base.then(|| {
        let size = virtual_size / 2 / 512 * 512 + 512;
        let f = world.create_disk(size, 512);
        let words: Vec<u8> = (0..size / 8)
            .flat_map(|i| {
                let w = word(0xba5e, i / 512, i);
                written.insert(w);
                w.to_le_bytes()
            })
            .collect();
        f.write_now(0, &words);
        (f, size)
    });
    let p = CreateParams {
        virtual_size,
        block_size,
        chunk_size,
        journal_size,
        compact,
        base: base.as_ref().map(|(_, size)| BaseRef {
            path: "base.raw".into(),
            format: BaseFormat::Raw,
            size: *size,
        }),
        compat: 0,
        max_size: None,
    };
    let file = world.create_disk(0, 512);
    let (io, f2) = (world.io(), file.clone());
    world
        .block_on(async move { Image::create(&io, f2, &p).await })
        .expect("create a small image");
    let (io, f2) = (world.io(), file.clone());
    let header = world
        .block_on(async move { Image::read_header(&io, &f2).await })
        .expect("read back the header");
    Built {
        world,
        file,
        base,
        header,
        written,
    }
}

/// Writes the blocks the input names (generation `tag`), then flushes: their records are then
/// in the journal, not yet in a metadata copy.
pub fn write_some(b: &mut Built, inp: &mut Input, tag: u64) {
    let img = b.open(false).expect("open the fresh image");
    let blocks = img.geometry().block_count();
    for _ in 0..inp.below(6) {
        let blk = inp.below(blocks);
        b.write_block(&img, blk, tag)
            .expect("write to a fresh image");
    }
    b.flush(&img).expect("flush a fresh image");
    if inp.bool() {
        b.close(&img).expect("close a fresh image");
    }
}
