//! Contents and durability state of one simulated disk.
//!
//! The current (volatile) contents live in a sparse map of 64 KiB pieces. For durability, every
//! 512-byte sector written since it was last made durable keeps its durable content plus each
//! unflushed version, tagged with the completion sequence number of the write that produced it.
//! A flush makes the versions older than its cut-off durable. A power loss decides per unflushed
//! write whether it reached the media (whole, not at all, or torn); every sector then holds its
//! newest version that did, else its durable content. Any of {durable, each unflushed version}
//! can survive, so torn and reordered writes happen.

use rand::rngs::SmallRng;
use rand::Rng;
use std::collections::{BTreeMap, HashMap};

const SECTOR: u64 = 512;
const PIECE: u64 = 64 * 1024;

type Sector = Box<[u8; SECTOR as usize]>;

/// A sector written since its content last became durable.
struct Dirty {
    durable: Sector,
    /// (completion sequence number, content after that write), oldest first.
    versions: Vec<(u64, Sector)>,
}

#[derive(Copy, Clone)]
enum Fate {
    Kept,
    Lost,
    Torn,
}

pub(super) struct Disk {
    pieces: HashMap<u64, Box<[u8]>>,
    dirty: BTreeMap<u64, Dirty>,
    pub size: u64,
    /// Size a power loss may fall back to: the size covered by the last completed flush.
    pub durable_size: u64,
    pub fixed_size: bool,
    pub align: u32,
}

impl Disk {
    pub fn new(size: u64, align: u32, fixed_size: bool) -> Disk {
        Disk {
            pieces: HashMap::new(),
            dirty: BTreeMap::new(),
            size,
            durable_size: size,
            fixed_size,
            align,
        }
    }

    /// Copies current contents at `off` into `dst`; bytes past the end read as zeros.
    pub fn read(&self, off: u64, dst: &mut [u8]) {
        let mut pos = 0usize;
        while pos < dst.len() {
            let at = off + pos as u64;
            let in_piece = (at % PIECE) as usize;
            let n = (PIECE as usize - in_piece).min(dst.len() - pos);
            let out = &mut dst[pos..pos + n];
            match self.pieces.get(&(at / PIECE)) {
                Some(p) if at < self.size => out.copy_from_slice(&p[in_piece..in_piece + n]),
                _ => out.fill(0),
            }
            pos += n;
        }
        // Anything past the end reads as zeros even if a piece still holds stale bytes.
        if off + dst.len() as u64 > self.size {
            let keep = self.size.saturating_sub(off) as usize;
            dst[keep..].fill(0);
        }
    }

    /// Overwrites current contents without touching durability state.
    fn store(&mut self, off: u64, src: &[u8]) {
        let mut pos = 0usize;
        while pos < src.len() {
            let at = off + pos as u64;
            let in_piece = (at % PIECE) as usize;
            let n = (PIECE as usize - in_piece).min(src.len() - pos);
            let chunk = &src[pos..pos + n];
            let idx = at / PIECE;
            if let Some(p) = self.pieces.get_mut(&idx) {
                p[in_piece..in_piece + n].copy_from_slice(chunk);
            } else if chunk.iter().any(|&b| b != 0) {
                let mut p = vec![0u8; PIECE as usize].into_boxed_slice();
                p[in_piece..in_piece + n].copy_from_slice(chunk);
                self.pieces.insert(idx, p);
            }
            pos += n;
        }
    }

    fn sector(&self, lba: u64) -> Sector {
        let mut s: Sector = Box::new([0u8; SECTOR as usize]);
        self.read(lba * SECTOR, &mut s[..]);
        s
    }

    /// A completed write of `src` at `off` (sequence number `seq`). `torn` (a failed write)
    /// applies only the sectors for which it returns true. Extends the size.
    pub fn write(&mut self, off: u64, src: &[u8], seq: u64, mut torn: Option<&mut SmallRng>) {
        if src.is_empty() {
            return;
        }
        let end = off + src.len() as u64;
        let mut lba = off / SECTOR;
        while lba * SECTOR < end {
            let s_start = (lba * SECTOR).max(off);
            let s_end = ((lba + 1) * SECTOR).min(end);
            let apply = match torn.as_deref_mut() {
                Some(rng) => rng.gen_bool(0.5),
                None => true,
            };
            if apply {
                if s_end > self.size {
                    self.size = s_end;
                }
                let before = self.sector(lba);
                let src_part = &src[(s_start - off) as usize..(s_end - off) as usize];
                self.store(s_start, src_part);
                let after = self.sector(lba);
                self.dirty
                    .entry(lba)
                    .or_insert_with(|| Dirty {
                        durable: before,
                        versions: Vec::new(),
                    })
                    .versions
                    .push((seq, after));
            }
            lba += 1;
        }
    }

    /// A completed flush submitted when the write sequence stood at `cutoff` and the size at
    /// `size`: every version older than the cut-off becomes durable. A failed flush (`partial`)
    /// makes a random subset of them durable.
    pub fn flush(&mut self, cutoff: u64, size: u64, mut partial: Option<&mut SmallRng>) {
        let mut clean = Vec::new();
        for (&lba, d) in self.dirty.iter_mut() {
            let covered = d
                .versions
                .iter()
                .take_while(|(seq, _)| *seq < cutoff)
                .count();
            if covered == 0 {
                continue;
            }
            if let Some(rng) = partial.as_deref_mut() {
                if !rng.gen_bool(0.5) {
                    continue;
                }
            }
            let mut taken: Vec<_> = d.versions.drain(..covered).collect();
            d.durable = taken.pop().expect("covered > 0").1;
            if d.versions.is_empty() {
                clean.push(lba);
            }
        }
        for lba in clean {
            self.dirty.remove(&lba);
        }
        if partial.is_none() && size > self.durable_size {
            self.durable_size = size.min(self.size);
        }
    }

    /// Power loss. Each unflushed write (or punch) reached the media entirely, not at all, or
    /// (rarely) torn sector by sector; each dirty sector keeps its newest version that reached
    /// the media, else its durable content. Growth since the last flush may be lost.
    pub fn power_loss(&mut self, rng: &mut SmallRng) {
        // A per-crash bias, so some crashes keep almost everything and some almost nothing.
        let keep_p = rng.gen_range(0.0..1.0);
        let mut fates: HashMap<u64, Fate> = HashMap::new();
        let dirty = std::mem::take(&mut self.dirty);
        for (lba, d) in dirty {
            let mut content = d.durable;
            for (seq, version) in d.versions.into_iter().rev() {
                let fate = *fates.entry(seq).or_insert_with(|| {
                    if rng.gen_bool(0.1) {
                        Fate::Torn
                    } else if rng.gen_bool(keep_p) {
                        Fate::Kept
                    } else {
                        Fate::Lost
                    }
                });
                let reached = match fate {
                    Fate::Kept => true,
                    Fate::Lost => false,
                    Fate::Torn => rng.gen_bool(0.5),
                };
                if reached {
                    content = version;
                    break;
                }
            }
            self.store(lba * SECTOR, &content[..]);
        }
        if !self.fixed_size && self.size > self.durable_size && rng.gen_bool(0.5) {
            let keep = self.durable_size;
            self.zero_beyond(keep);
            self.size = keep;
        }
        self.durable_size = self.size;
    }

    /// Extends a growing disk to `len` bytes of zeros (ftruncate); like any growth, a power loss
    /// before the next flush may undo it.
    pub fn grow(&mut self, len: u64) {
        if self.fixed_size || len <= self.size {
            return;
        }
        self.zero_beyond(self.size);
        self.size = len;
    }

    /// Drops stored bytes at and past `end` so later growth reads zeros there.
    fn zero_beyond(&mut self, end: u64) {
        let first_whole = end.div_ceil(PIECE);
        self.pieces.retain(|&idx, _| idx < first_whole);
        if end % PIECE != 0 {
            let tail = PIECE - end % PIECE;
            self.store(end, &vec![0u8; tail as usize]);
        }
    }

    /// Test setup: writes `src` immediately and durably.
    pub fn write_durable(&mut self, off: u64, src: &[u8]) {
        let end = off + src.len() as u64;
        self.size = self.size.max(end);
        self.durable_size = self.durable_size.max(end);
        self.store(off, src);
        // Whole sectors touched become durable as they stand now.
        let first = off / SECTOR;
        let last = end.div_ceil(SECTOR);
        let lbas: Vec<u64> = self.dirty.range(first..last).map(|(&l, _)| l).collect();
        for lba in lbas {
            self.dirty.remove(&lba);
        }
    }

    /// Number of sectors with unflushed versions.
    pub fn dirty_sectors(&self) -> usize {
        self.dirty.len()
    }
}
