//! What the server serves: an FVD image or a raw file/device, behind one set of methods.
//! Also opening images on host files, with their base chains.

use super::base::Base;
use super::counters::Counters;
use super::error::{EngineError, InvalidParams, IoContext, IoOp, Result};
use super::image::{CreateParams, Image};
use super::raw::RawDisk;
use super::storage::Storage;
use crate::format::BaseFormat;
use crate::io::host_file::{OpenMode, LOCK_RETRY_FOR};
use crate::io::nbd::{is_nbd_uri, NbdClient};
use crate::io::{Buf, HostFile, Io, IoFile};
use crate::units::{PhysOffset, VirtOffset};
use std::future::Future;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::time::Duration;

// One Disk exists per served image, so the size difference between variants is irrelevant.
#[allow(clippy::large_enum_variant)]
pub enum Disk<I: Io> {
    Fvd(Image<I>),
    Raw(RawDisk<I>),
}

macro_rules! both {
    ($self:ident, $d:ident => $e:expr) => {
        match $self {
            Disk::Fvd($d) => $e,
            Disk::Raw($d) => $e,
        }
    };
}

impl<I: Io> Disk<I> {
    pub fn virtual_size(&self) -> u64 {
        both!(self, d => d.virtual_size())
    }
    pub fn read_only(&self) -> bool {
        both!(self, d => d.read_only())
    }
    pub fn alignment(&self) -> u32 {
        both!(self, d => d.alignment())
    }
    /// Writes of this size and alignment cost least (0: no preference): an FVD image's block,
    /// which a first write fills whole. A raw disk passes each write through as it is.
    pub fn preferred_write_size(&self) -> u32 {
        match self {
            Disk::Fvd(d) => u32::try_from(d.geometry().block_size).unwrap_or(0),
            Disk::Raw(_) => 0,
        }
    }
    pub fn counters(&self) -> &Counters {
        both!(self, d => d.counters())
    }
    pub async fn read(&self, io: &I, off: VirtOffset, buf: Buf) -> Result<()> {
        both!(self, d => d.read(io, off, buf).await)
    }
    pub async fn write(&self, io: &I, off: VirtOffset, buf: Buf) -> Result<()> {
        both!(self, d => d.write(io, off, buf).await)
    }
    pub async fn flush(&self, io: &I) -> Result<()> {
        both!(self, d => d.flush(io).await)
    }
    pub async fn discard(&self, io: &I, off: VirtOffset, len: u64) -> Result<()> {
        both!(self, d => d.discard(io, off, len).await)
    }
    pub async fn write_zeroes(&self, io: &I, off: VirtOffset, len: u64, unmap: bool) -> Result<()> {
        both!(self, d => d.write_zeroes(io, off, len, unmap).await)
    }
    /// The most the disk can grow to ([`crate::format::Header::capacity`]; a raw disk's size).
    pub fn max_size(&self) -> u64 {
        match self {
            Disk::Fvd(d) => d.header().capacity().max(d.virtual_size()),
            Disk::Raw(d) => d.virtual_size(),
        }
    }
    /// Grows the disk while it is in use (see [`Image::grow`]). A raw disk is refused: its
    /// size is its file's, which this process does not own.
    pub async fn grow(&self, io: &I, size: u64) -> Result<()> {
        match self {
            Disk::Fvd(d) => d.grow(io, size).await,
            Disk::Raw(_) => Err(EngineError::Resize(super::error::ResizeRefused::RawInUse)),
        }
    }
    /// The NBD connections of the base chain (to tune them, or to cut them short at shutdown).
    pub fn nbd_clients(&self) -> Vec<&NbdClient> {
        match self {
            Disk::Fvd(d) => d.base().map_or_else(Vec::new, Base::nbd_clients),
            Disk::Raw(_) => Vec::new(),
        }
    }
    /// How first writes zero the rest of their block (an FVD image's storage).
    pub fn set_zero_ranges(&self, how: super::storage::ZeroRanges) {
        if let Disk::Fvd(d) = self {
            d.store.set_zero_ranges(how);
        }
    }
    /// Background work queued by requests (copy-on-read); run after completing them.
    pub async fn run_deferred(&self, io: &I) {
        if let Disk::Fvd(d) = self {
            d.run_deferred(io).await
        }
    }
    pub async fn close(&self, io: &I) -> Result<()> {
        match self {
            Disk::Fvd(d) => d.close(io).await,
            Disk::Raw(d) => d.flush(io).await,
        }
    }
}

impl<I: Io<File = HostFile>> Disk<I> {
    /// A stable identifier (for the default virtio serial): the image's file name.
    pub fn id(&self) -> String {
        let f = both!(self, d => d.file());
        f.path()
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "fvd".into())
    }
}

/// Image formats `probe` can tell apart.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum Format {
    Fvd,
    Raw,
}

/// Bytes `probe` looks at: both header slots. The FVD magic at offset 0 or 4096 means FVD.
pub(crate) const PROBE_LEN: u64 = 8192;
/// Offsets of the magic `probe` looks for.
pub(crate) const PROBE_MAGIC_AT: [u64; 2] = [0, 4096];

/// FVD if the file starts with the FVD magic (in either header slot), raw otherwise. A file too
/// short to hold both header slots but showing the magic is an error, not a raw disk: serving
/// it writable as raw would let its contents turn it into a (different) FVD image.
pub async fn probe<I: Io<File = HostFile>>(io: &I, file: &HostFile) -> Result<Format> {
    let size = file.size().ctx(IoOp::Size, "size of image")?;
    let store = Storage::<I>::new(file.clone());
    let buf = Buf::alloc(PROBE_LEN as usize);
    // Past the end of a short file this reads zeros, which never match the magic.
    store
        .read(io, &Counters::default(), PhysOffset(0), buf.clone())
        .await?;
    if !has_magic(&buf) {
        return Ok(Format::Raw);
    }
    if size < PROBE_LEN {
        return Err(EngineError::Truncated { size });
    }
    Ok(Format::Fvd)
}

/// Whether `buf` (the start of a disk) holds the FVD magic where `probe` looks for it.
pub(crate) fn has_magic(buf: &Buf) -> bool {
    let magic = crate::format::header::MAGIC;
    PROBE_MAGIC_AT.iter().any(|&at| {
        let at = at as usize;
        if at + magic.len() > buf.len() {
            return false;
        }
        let mut got = [0u8; 8];
        buf.copy_to_slice(at, &mut got);
        &got == magic
    })
}

fn open_host(path: &Path, mode: OpenMode, lock_wait: Duration) -> Result<HostFile> {
    HostFile::open_waiting(path, mode, lock_wait).ctx(IoOp::Open, "open image")
}

/// Opens `path` (FVD or raw, probed), with its base chain for FVD images.
pub async fn open_disk<I: Io<File = HostFile>>(
    io: &I,
    path: &Path,
    read_only: bool,
) -> Result<Disk<I>> {
    open_disk_with(io, path, OpenMode::for_read_only(read_only), None).await
}

/// Like [`open_disk`] with an explicit open mode (e.g. [`OpenMode::ReadOnlyShared`]) and
/// format. `None` probes; a raw image opened that way refuses writes that would make it probe
/// as FVD (see [`RawDisk`]). A format given is checked: FVD must have the magic.
pub async fn open_disk_with<I: Io<File = HostFile>>(
    io: &I,
    path: &Path,
    mode: OpenMode,
    format: Option<Format>,
) -> Result<Disk<I>> {
    open_disk_waiting(io, path, mode, format, LOCK_RETRY_FOR).await
}

/// Like [`open_disk_with`], waiting up to `lock_wait` for the image's lock if another process
/// holds it (see [`HostFile::open_waiting`]). Base images are opened without waiting.
pub async fn open_disk_waiting<I: Io<File = HostFile>>(
    io: &I,
    path: &Path,
    mode: OpenMode,
    format: Option<Format>,
    lock_wait: Duration,
) -> Result<Disk<I>> {
    let read_only = mode != OpenMode::ReadWrite;
    let file = open_host(path, mode, lock_wait)?;
    match format {
        Some(Format::Raw) => Ok(Disk::Raw(RawDisk::open(file, read_only, false)?)),
        Some(Format::Fvd) => match probe(io, &file).await? {
            Format::Fvd => Ok(Disk::Fvd(open_fvd_file(io, file, read_only, 0).await?)),
            Format::Raw => Err(EngineError::NotFvd),
        },
        None => match probe(io, &file).await? {
            Format::Fvd => Ok(Disk::Fvd(open_fvd_file(io, file, read_only, 0).await?)),
            Format::Raw => Ok(Disk::Raw(RawDisk::open(file, read_only, true)?)),
        },
    }
}

/// Opens an FVD image at `path`.
pub async fn open_image<I: Io<File = HostFile>>(
    io: &I,
    path: &Path,
    read_only: bool,
) -> Result<Image<I>> {
    open_image_with(io, path, OpenMode::for_read_only(read_only)).await
}

/// Like [`open_image`] with an explicit open mode.
pub async fn open_image_with<I: Io<File = HostFile>>(
    io: &I,
    path: &Path,
    mode: OpenMode,
) -> Result<Image<I>> {
    let file = open_host(path, mode, LOCK_RETRY_FOR)?;
    if probe(io, &file).await? != Format::Fvd {
        return Err(EngineError::NotFvd);
    }
    open_fvd_file(io, file, mode != OpenMode::ReadWrite, 0).await
}

/// Base chains deeper than this are refused (and loops are caught by it).
const MAX_CHAIN: usize = 16;

fn open_fvd_file<'a, I: Io<File = HostFile>>(
    io: &'a I,
    file: HostFile,
    read_only: bool,
    depth: usize,
) -> Pin<Box<dyn Future<Output = Result<Image<I>>> + Send + 'a>> {
    Box::pin(async move {
        let base = open_base_of(io, &file, depth).await?;
        Image::open(io, file, base, read_only).await
    })
}

/// Opens the base image named in `file`'s header, if any.
async fn open_base_of<I: Io<File = HostFile>>(
    io: &I,
    file: &HostFile,
    depth: usize,
) -> Result<Option<Base<I>>> {
    let h = Image::<I>::read_header(io, file).await?;
    let base = match &h.base {
        None => None,
        Some(b) => {
            if depth >= MAX_CHAIN {
                return Err(EngineError::Invalid(InvalidParams::BaseChainTooDeep {
                    max: MAX_CHAIN,
                }));
            }
            if is_nbd_uri(&b.path) {
                Some(open_nbd_base(&b.path, b.format)?)
            } else {
                Some(open_file_base(io, file, b, depth).await?)
            }
        }
    };
    // A base that lost its tail would read as zeros there, and copy-on-read would make those
    // zeros permanent in this image.
    if let (Some(base), Some(b)) = (&base, &h.base) {
        if base.size() < b.size {
            return Err(EngineError::BaseTooSmall {
                path: b.path.clone(),
                size: base.size(),
                recorded: b.size,
            });
        }
    }
    Ok(base)
}

/// Opens the base `b` on a host file (its format is the one the header names).
async fn open_file_base<I: Io<File = HostFile>>(
    io: &I,
    file: &HostFile,
    b: &crate::format::BaseRef,
    depth: usize,
) -> Result<Base<I>> {
    let path = resolve_base(file.path(), &b.path);
    let bf = HostFile::open(&path, OpenMode::ReadOnly).ctx(IoOp::Open, "open base image")?;
    Ok(match b.format {
        BaseFormat::Raw => {
            let size = bf.size().ctx(IoOp::Size, "size of base")?;
            Base::Raw {
                store: Storage::new(bf),
                size,
            }
        }
        BaseFormat::Fvd => Base::Fvd(Box::new(open_fvd_file(io, bf, true, depth + 1).await?)),
    })
}

/// A raw image exported over NBD. FVD images over NBD are not supported: the engine reads FVD
/// metadata through `Io` on host files.
fn open_nbd_base<I: Io>(uri: &str, format: BaseFormat) -> Result<Base<I>> {
    if format != BaseFormat::Raw {
        return Err(EngineError::Invalid(InvalidParams::NbdBaseNotRaw {
            uri: uri.to_string(),
        }));
    }
    // Connecting blocks briefly; opening an image is not on the I/O path.
    let client = NbdClient::connect(uri).ctx(IoOp::Connect, "connect to NBD base")?;
    Ok(Base::Nbd(client))
}

/// `fvd check --repair`: rebuilds the metadata from what survives and closes the image cleanly
/// (see [`super::check::repair`]).
pub async fn repair_image<I: Io<File = HostFile>>(
    io: &I,
    path: &Path,
) -> std::result::Result<super::check::Repair, super::check::RepairError> {
    let file = HostFile::open(path, OpenMode::ReadWrite).ctx(IoOp::Open, "open image")?;
    super::check::repair(io, file).await
}

/// Relative base paths are relative to the image's directory, as in qemu-img. NBD URIs are
/// returned unchanged.
pub fn resolve_base(image: &Path, base: &str) -> PathBuf {
    let p = Path::new(base);
    if p.is_absolute() || is_nbd_uri(base) {
        p.to_path_buf()
    } else {
        image.parent().unwrap_or(Path::new(".")).join(p)
    }
}

/// Creates an FVD image on a host file or block device.
pub async fn create_image<I: Io<File = HostFile>>(
    io: &I,
    file: HostFile,
    params: &CreateParams,
) -> Result<()> {
    Image::create(io, file, params).await
}
