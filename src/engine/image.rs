//! An open FVD image: creation, opening (with journal replay), closing.
//! The I/O paths live in read.rs, write.rs, flush.rs and discard.rs.

use super::allocator::Allocator;
use super::base::Base;
use super::block_locks::BlockLocks;
use super::cor::Cor;
use super::counters::Counters;
use super::error::{Corruption, EngineError, InvalidParams, IoContext, IoOp, NoSpace, Result};
use super::journal::Journal;
use super::metadata::{ChunkRefs, Committed, LiveMetadata};
use super::replay::{check_regions_fit, next_epoch, read_region, replay, storage_len, Replayed};
use super::space::{Space, SpacePolicy};
use super::storage::Storage;
use crate::format::header::{pick_header, FLAG_CLEAN};
use crate::format::layout::Layout;
use crate::format::{BaseRef, FormatError, Header, SECTOR};
use crate::io::{Buf, Growth, Io, IoFile};
use crate::units::{ChunkIndex, Geometry, PhysOffset};
use std::sync::atomic::{AtomicBool, Ordering};

/// Parameters of `fvd create`.
#[derive(Clone, Debug)]
pub struct CreateParams {
    pub virtual_size: u64,
    pub block_size: u64,
    pub chunk_size: u64,
    pub journal_size: u64,
    pub compact: bool,
    pub base: Option<BaseRef>,
    pub compat: u64,
    /// Largest size the image can be resized to without moving its regions: the metadata is
    /// sized for it (see docs/FORMAT.md, "Resizing"). `None`: the virtual size.
    pub max_size: Option<u64>,
}

impl Default for CreateParams {
    fn default() -> Self {
        CreateParams {
            virtual_size: 0,
            block_size: 64 << 10,
            chunk_size: 1 << 20,
            journal_size: 16 << 20,
            compact: true,
            base: None,
            compat: 0,
            max_size: None,
        }
    }
}

impl CreateParams {
    /// The header of a new image with these parameters, validated.
    pub fn header(&self) -> Result<Header> {
        let p = self;
        if p.block_size > u32::MAX as u64 || p.chunk_size > u32::MAX as u64 || p.block_size == 0 {
            return Err(EngineError::Invalid(InvalidParams::SizeTooLarge));
        }
        if p.base
            .as_ref()
            .is_some_and(|b| b.path.len() > crate::format::header::MAX_BASE_PATH)
        {
            return Err(EngineError::Invalid(InvalidParams::BasePathTooLong {
                max: crate::format::header::MAX_BASE_PATH,
            }));
        }
        let max_size = p.max_size.unwrap_or(p.virtual_size);
        if max_size < p.virtual_size || max_size > crate::format::header::MAX_VIRTUAL_SIZE {
            return Err(EngineError::Invalid(InvalidParams::MaxSize {
                max_size,
                size: p.virtual_size,
            }));
        }
        // The metadata regions are laid out for the maximum size.
        let l = Layout::compute(
            &Geometry {
                virtual_size: max_size,
                block_size: p.block_size,
                chunk_size: p.chunk_size,
            },
            p.compact,
            p.journal_size,
        );
        // Generation 0, metadata copy 0 active and no boot id come from `with_layout`; the
        // size from `set_virtual_size`, which also sets the capacity flag.
        let mut h = Header {
            incompat: if p.compact {
                crate::format::header::INCOMPAT_COMPACT
            } else {
                0
            },
            compat: p.compat,
            block_size: p.block_size as u32,
            chunk_size: p.chunk_size as u32,
            flags: FLAG_CLEAN,
            // A random starting epoch: journal sectors of an earlier image on the same device
            // can never match.
            journal_epoch: rand::random::<u32>() as u64 + 1,
            base: p.base.clone(),
            ..Header::with_layout(&l)
        };
        h.set_virtual_size(p.virtual_size);
        h.validate().map_err(|e| match e {
            // The caller's parameters make an invalid header: say what is wrong with them.
            FormatError::InvalidHeader(why) => EngineError::Invalid(InvalidParams::Header { why }),
            e => EngineError::Format(e),
        })?;
        Ok(h)
    }
}

/// An open FVD image. Its parts own their state behind narrow interfaces (docs/ARCHITECTURE.md,
/// "Engine parts"): `journal` (queued records, the flush state, the header), `space` (the
/// allocator and waiting for space), `cor` (copy-on-read and prefetch bookkeeping), `live` (the
/// bitmap and table requests read) and `locks` (fill locks). The request paths (read.rs,
/// write.rs, discard.rs, fill.rs, flush.rs, resize.rs) are `Image` methods that call them; no
/// part knows `Image`.
pub struct Image<I: Io> {
    pub(super) store: Storage<I>,
    /// Block and chunk sizes. Its `virtual_size` is the capacity (the most the metadata can
    /// describe, which the live metadata covers so that a resize never reallocates it), not the
    /// disk's size: that is `size`.
    pub(super) geo: Geometry,
    /// The virtual disk's size in bytes; changed only by a resize, after its header is durable.
    pub(super) size: std::sync::atomic::AtomicU64,
    /// Taken first by a resize (before fill locks and the flush state): one at a time.
    pub(super) resizing: futures::lock::Mutex<()>,
    pub(super) read_only: bool,
    pub(super) live: LiveMetadata,
    pub(super) locks: BlockLocks,
    pub(super) journal: Journal,
    pub(super) space: Space,
    pub(super) cor: Cor,
    pub(super) base: Option<Base<I>>,
    /// Bytes of the base this image reads: its size, but no more than the header records (the
    /// base's size at create, lowered by a resize so a grown range reads zeros, never base data).
    pub(super) base_end: std::sync::atomic::AtomicU64,
    pub(super) counters: Counters,
    /// Storage with a logical block larger than 512 bytes: every write may need a
    /// read-modify-write, so every write takes block locks.
    pub(super) lock_all_writes: bool,
    /// Set when a device flush failed: durability of earlier writes is unknown, so the image
    /// refuses further writes and flushes until reopened (never journal possibly lost data).
    pub(super) failed: AtomicBool,
    pub(super) closed: AtomicBool,
}

/// A flat image on a file: chunks past the end of the file at open read zeros this session
/// (their first writes need no zeroing, and no flush before their journal records), and the file
/// is grown to its full size now, sparse, so that direct writes never extend it (file systems
/// serialize extending direct writes).
pub(super) fn prepare_flat_file<I: Io>(
    store: &Storage<I>,
    live: &LiveMetadata,
    size: u64,
) -> Result<()> {
    let data_offset = live.data_offset;
    let geo = Geometry {
        virtual_size: size,
        ..live.geo
    };
    let len = store.file.size().ctx(IoOp::Size, "size flat image file")?;
    let first = len.saturating_sub(data_offset).div_ceil(geo.chunk_size);
    // Only a speed-up: a file system that refuses the size still takes extending writes. Its
    // chunks are then not fresh: a bit journaled before its data could outlive an extension
    // lost in a crash, and a present block past the end of the file means a truncated image.
    match store.file.grow(
        data_offset + geo.block_count() * geo.block_size,
        Growth::Sparse,
    ) {
        Ok(()) => live.set_fresh_from(ChunkIndex(first)),
        Err(e) => {
            tracing::warn!("cannot grow the flat image file to its full size ({e}); continuing")
        }
    }
    Ok(())
}

impl<I: Io> Image<I> {
    /// Writes a new, empty image onto `file`.
    pub async fn create(io: &I, file: I::File, p: &CreateParams) -> Result<()> {
        let mut h = p.header()?;
        let geo = h.geometry();
        let l = h.layout();
        let store = Storage::<I>::new(file);
        if store.file.is_block_device() {
            let need = if p.compact {
                l.data_offset + p.chunk_size
            } else {
                l.data_offset + geo.block_count() * p.block_size
            };
            let have = store.file.size().ctx(IoOp::Size, "size of device")?;
            if have < need {
                return Err(EngineError::NoSpace(NoSpace::DeviceTooSmall { have, need }));
            }
        }
        let c = Counters::default();
        // Both metadata copies, fully written with valid checksums.
        let committed = Committed::new(&geo, p.compact, l.bitmap_sectors, l.table_sectors);
        let per_write = 256u64; // sectors per write: 1 MiB
        for copy in 0..2 {
            let mut s = 0;
            while s < committed.sectors() {
                let n = per_write.min(committed.sectors() - s);
                let mut bytes = vec![0u8; (n as usize) * SECTOR];
                for i in 0..n {
                    committed.encode_sector(
                        s + i,
                        &mut bytes[i as usize * SECTOR..(i as usize + 1) * SECTOR],
                    );
                }
                let buf = Buf::alloc(bytes.len());
                buf.copy_from_slice(0, &bytes);
                store
                    .write(
                        io,
                        &c,
                        PhysOffset(l.meta_offset[copy] + s * SECTOR as u64),
                        buf,
                    )
                    .await?;
                s += n;
            }
        }
        // Invalidate the first journal sector in case the device held an older image.
        store
            .write(io, &c, PhysOffset(l.journal_offset), Buf::alloc(SECTOR))
            .await?;
        // A file holds every region up to the data area (sparse): open refuses shorter storage
        // as truncated. Durable with the flush below.
        if !store.file.is_block_device() {
            store
                .file
                .grow(l.data_offset, Growth::Sparse)
                .ctx(IoOp::Grow, "size new image file")?;
        }
        // Both header slots, so a stale header of an earlier image can never win.
        for g in 0..2 {
            h.generation = g;
            let buf = Buf::alloc(SECTOR);
            buf.copy_from_slice(0, &h.encode());
            store
                .write(io, &c, PhysOffset(h.slot_offset()), buf)
                .await?;
        }
        store.flush(io, &c).await
    }

    /// Reads and validates the header of `file`.
    pub async fn read_header(io: &I, file: &I::File) -> Result<Header> {
        let store = Storage::<I>::new(file.clone());
        let raw = read_region(io, &store, &Counters::default(), 0, 2 * SECTOR as u64).await?;
        Ok(pick_header(&raw[..SECTOR], &raw[SECTOR..])?)
    }

    /// Opens an image. `base` must be the opened base image named in the header (if any).
    /// Replays the journal; a read-write open then checkpoints and starts a new journal epoch.
    pub async fn open(
        io: &I,
        file: I::File,
        base: Option<Base<I>>,
        read_only: bool,
    ) -> Result<Image<I>> {
        Ok(Self::open_inner(io, file, base, read_only, false).await?.0)
    }

    /// Opens; with `repair`, inconsistencies are fixed (and returned) instead of refused.
    pub(super) async fn open_inner(
        io: &I,
        file: I::File,
        base: Option<Base<I>>,
        read_only: bool,
        repair: bool,
    ) -> Result<(Image<I>, Vec<super::problem::Problem>)> {
        let store = Storage::<I>::new(file);
        let c = Counters::default();
        let raw = read_region(io, &store, &c, 0, 2 * SECTOR as u64).await?;
        let header = pick_header(&raw[..SECTOR], &raw[SECTOR..])?;
        if header.base.is_some() != base.is_some() {
            return Err(EngineError::Invalid(InvalidParams::BaseMismatch));
        }
        if !read_only && store.file.is_read_only() {
            return Err(EngineError::ReadOnly);
        }
        let geo = header.geometry();
        let storage_size = storage_len(&store)?;
        let mut damaged = None;
        check_regions_fit(&header, storage_size)?;
        if store.file.is_block_device() && !header.compact() {
            let need = header.data_offset + geo.block_count() * geo.block_size;
            let have = store.file.size().ctx(IoOp::Size, "size of device")?;
            if have < need {
                return Err(EngineError::Corrupt(Corruption::DeviceTooSmall {
                    have,
                    need,
                }));
            }
        }
        let mut committed = Committed::new(
            &geo,
            header.compact(),
            header.bitmap_sectors,
            header.table_sectors,
        );
        let active = header.active_meta;
        let meta = read_region(
            io,
            &store,
            &c,
            header.meta_offset[active as usize],
            committed.sectors() * SECTOR as u64,
        )
        .await?;
        committed.load(active, &meta)?;
        let Replayed {
            entries,
            tail,
            damage,
            newest_epoch,
            intents,
            ..
        } = replay(io, &store, &c, &header).await?;
        let mut header = header;
        if let Some(d) = damage {
            if !repair || read_only {
                return Err(EngineError::Corrupt(Corruption::JournalDamage {
                    damage: d,
                    tail,
                }));
            }
            damaged = Some(d);
        }
        if !read_only {
            // The new epoch written below (one above this) must exceed every epoch in the
            // journal area, or sectors left there would become valid records of it.
            header.journal_epoch = header.journal_epoch.max(newest_epoch);
        }
        committed.apply(&entries)?;
        let mut problems = super::check::find_problems(&committed, &header, Some(storage_size));
        if !problems.is_empty() {
            if !repair || read_only {
                return Err(EngineError::Corrupt(Corruption::Problems {
                    more: problems.len() - 1,
                    first: problems.swap_remove(0),
                }));
            }
            super::check::fix_problems(&mut committed, &header, &problems);
        }
        // Fixed by replaying only up to the damage; the checkpoint below starts a new epoch.
        problems.extend(damaged);
        let capacity = Geometry {
            virtual_size: header.capacity().max(geo.virtual_size),
            ..geo
        };
        let live = LiveMetadata::from_committed(capacity, header.data_offset, &committed);
        let mut alloc = Allocator::from_table(&committed.table, &header, &store)?;
        if !read_only && !store.file.is_block_device() {
            if live.compact() {
                alloc.grow_ahead(&store)?;
            } else {
                prepare_flat_file(&store, &live, geo.virtual_size)?;
            }
        }
        let lock_all_writes = store.align > 512;
        let img = Image {
            store,
            geo: capacity,
            size: geo.virtual_size.into(),
            resizing: Default::default(),
            read_only,
            live,
            locks: BlockLocks::default(),
            journal: Journal::new(header.clone(), committed, tail),
            space: Space::new(alloc),
            cor: Cor::default(),
            base_end: match (&base, &header.base) {
                (Some(b), Some(r)) => b.size().min(r.size),
                _ => 0,
            }
            .into(),
            base,
            counters: c,
            lock_all_writes,
            failed: AtomicBool::new(false),
            closed: AtomicBool::new(false),
        };
        img.set_copy_on_read(img.cor_default());
        if !read_only {
            let mut fs = img.journal.lock_state().await;
            if intents {
                // The intents describe writes that only the storage's volatile cache may hold
                // (the process died, the host did not): durable before anything records them.
                img.store.flush(io, &img.counters).await?;
            }
            if !entries.is_empty() || !problems.is_empty() {
                // Fold the replayed records into the inactive copy so the journal starts empty.
                img.checkpoint(io, &mut fs, false).await?;
            } else {
                // New epoch even so: sectors past the torn tail of the old epoch must never be
                // mistaken for new ones.
                let epoch = next_epoch(fs.header.journal_epoch)?;
                img.write_header(io, &mut fs, |h| {
                    h.journal_epoch = epoch;
                    h.flags &= !FLAG_CLEAN;
                })
                .await?;
                fs.tail = 0;
            }
            // The header just written announces intents; the other slot still holds the one
            // read at open, which a reader that does not know intents would fall back to (a
            // slot it cannot decode looks like a torn update). Writing the other slot too makes
            // such a reader refuse the image until the clean-shutdown header.
            img.write_header(io, &mut fs, |_| {}).await?;
            // Both paths ended with a flush: the growth at open is durable.
            let mut alloc = img.space.alloc();
            if let Some(len) = alloc.undurable_growth() {
                alloc.growth_durable(len);
            }
        }
        Ok((img, problems))
    }

    /// Flushes, checkpoints and marks the image clean. Further writes fail.
    pub async fn close(&self, io: &I) -> Result<()> {
        if self.read_only || self.closed.load(Ordering::Acquire) {
            return Ok(());
        }
        self.flush(io).await?;
        let mut fs = self.journal.lock_state().await;
        self.checkpoint(io, &mut fs, true).await?;
        self.closed.store(true, Ordering::Release);
        Ok(())
    }

    pub fn virtual_size(&self) -> u64 {
        self.size.load(Ordering::Acquire)
    }
    /// Block and chunk sizes, and the current size.
    pub fn geometry(&self) -> Geometry {
        Geometry {
            virtual_size: self.virtual_size(),
            ..self.geo
        }
    }
    pub fn read_only(&self) -> bool {
        self.read_only
    }
    pub fn compact(&self) -> bool {
        self.live.compact()
    }
    /// True after a failed device flush (from any path: a FLUSH, a checkpoint, a write or a
    /// deferred copy-on-read recycling space): writes and flushes are refused until reopened.
    pub fn failed(&self) -> bool {
        self.failed.load(Ordering::Acquire)
    }
    pub fn counters(&self) -> &Counters {
        &self.counters
    }
    pub fn base(&self) -> Option<&Base<I>> {
        self.base.as_ref()
    }
    pub fn file(&self) -> &I::File {
        &self.store.file
    }
    /// The header as last written.
    pub fn header(&self) -> Header {
        self.journal.header()
    }
    /// Blocks whose data is in this image (live view).
    pub fn present_blocks(&self) -> u64 {
        self.live.present_blocks()
    }
    pub fn block_present(&self, b: crate::units::BlockIndex) -> bool {
        self.live.present(b)
    }
    /// Physical chunk of a virtual chunk (compact images).
    pub fn chunk_phys(&self, c: crate::units::ChunkIndex) -> crate::units::PhysChunk {
        self.live.phys(c)
    }
    /// Physical chunks in use (compact images).
    pub fn allocated_chunks(&self) -> u64 {
        self.space.alloc().allocated()
    }
    /// Logical block size of the storage (what to advertise to guests).
    pub fn alignment(&self) -> u32 {
        self.store.align.max(512) as u32
    }
    pub fn set_space_policy(&self, policy: SpacePolicy) {
        self.space.set_policy(policy);
    }
    /// Something changed (the device grew, or a timer ticked): re-read the device size and let
    /// waiting writes try again.
    pub fn notify_space(&self) {
        self.space.notify(&self.store);
    }
    /// Number of writes waiting for space (the server ticks `notify_space` while non-zero).
    pub fn space_waiting(&self) -> usize {
        self.space.waiting()
    }
    /// Free bytes in the data area, if the storage is bounded (a block device).
    pub fn free_bytes(&self) -> Option<u64> {
        self.space.free_bytes(self.geo.chunk_size)
    }
    /// Blocks with a fill in progress (tests: must be 0 when idle).
    pub fn locked_blocks(&self) -> usize {
        self.locks.held()
    }

    /// References the chunks of `[off, end)` for a request's run. First in the lock order: it
    /// may wait for an unmap that runs under the allocator, so no synchronous lock may be held.
    pub(super) fn enter_chunks(&self, off: u64, end: u64) -> ChunkRefs<'_> {
        super::lock_order::assert_none_held("chunk references");
        self.live.enter(off, end)
    }

    /// Checks a guest request's range.
    pub(super) fn check_range(&self, off: u64, len: u64) -> Result<()> {
        let size = self.virtual_size();
        if off % 512 != 0 || len % 512 != 0 || off.checked_add(len).is_none_or(|e| e > size) {
            return Err(EngineError::OutOfRange {
                offset: off,
                len,
                size,
            });
        }
        Ok(())
    }

    pub(super) fn check_writable(&self) -> Result<()> {
        if self.read_only {
            return Err(EngineError::ReadOnly);
        }
        if self.failed.load(Ordering::Acquire) {
            return Err(EngineError::Failed);
        }
        if self.closed.load(Ordering::Acquire) {
            return Err(EngineError::Closed);
        }
        Ok(())
    }
}
