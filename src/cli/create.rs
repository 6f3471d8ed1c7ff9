//! `fvd create`.

use super::size_arg;
use crate::engine::{self, CreateParams, Format};
use crate::format::{BaseFormat, BaseRef};
use crate::io::executor::block_on;
use crate::io::host_file::OpenMode;
use crate::io::nbd::{is_nbd_uri, NbdClient};
use crate::io::sync::SyncIo;
use crate::io::{HostFile, IoFile};
use anyhow::{bail, Context, Result};
use std::path::PathBuf;

#[derive(clap::Args)]
pub struct Args {
    /// Image file or block device to create.
    image: PathBuf,
    /// Virtual disk size (K/M/G/T suffixes); defaults to the base image's size.
    #[arg(short = 's', long, value_parser = size_arg)]
    size: Option<u64>,
    /// Base (backing) image; relative paths are relative to IMAGE's directory. A raw image on
    /// an NBD server is named by URI: nbd://HOST[:PORT]/EXPORT or
    /// nbd+unix:///EXPORT?socket=PATH.
    #[arg(short = 'b', long)]
    base: Option<String>,
    /// Base image format. When omitted the base is probed, and must then be raw: an FVD base
    /// names a base of its own, so it must be named FVD with -F fvd.
    #[arg(short = 'F', long, value_enum)]
    base_format: Option<BaseFmt>,
    /// Thin layout: chunks are allocated on first write (F2 table). The default.
    #[arg(long, overrides_with = "no_compact")]
    compact: bool,
    /// Raw-like layout: virtual offset = physical offset in the data area.
    #[arg(long, overrides_with = "compact")]
    no_compact: bool,
    /// Bitmap block size (power of two, 4K..16M).
    #[arg(long, value_parser = size_arg, default_value = "64K")]
    block_size: u64,
    /// Table chunk size (power of two, at least the block size).
    #[arg(long, value_parser = size_arg, default_value = "1M")]
    chunk_size: u64,
    /// Copy data read from the base image into this image.
    #[arg(long)]
    copy_on_read: bool,
    /// Prefetch the base image in the background while served.
    #[arg(long)]
    prefetch: bool,
    /// Journal size.
    #[arg(long, value_parser = size_arg, default_value = "16M")]
    journal_size: u64,
    /// Largest size `fvd resize` can grow the image to: the metadata is sized for it. Defaults
    /// to 4 times the size, at most 16 TiB (never less than the size).
    #[arg(long, value_parser = size_arg)]
    max_size: Option<u64>,
}

/// The default `--max-size`: room to grow 4-fold costs 3 more metadata sectors per 2 GiB
/// (bitmap) and 1 GiB (table) of the size on disk, and as much memory while open (the live
/// metadata covers the maximum), so small images stay small; past 16 TiB that memory would
/// exceed 128 MiB, so only a given --max-size reserves more.
pub fn default_max_size(size: u64) -> u64 {
    size.max(size.saturating_mul(4).min(16 << 40))
}

#[derive(Copy, Clone, clap::ValueEnum)]
enum BaseFmt {
    Raw,
    Fvd,
}

pub fn run(a: Args) -> Result<i32> {
    let io = SyncIo;
    // Everything is validated before IMAGE is touched: a failed create modifies nothing.
    let base = match &a.base {
        None => {
            if a.base_format.is_some() {
                bail!("--base-format needs --base");
            }
            None
        }
        Some(b) if is_nbd_uri(b) => Some(nbd_base(b, a.base_format)?),
        Some(b) => {
            let path = engine::resolve_base(&a.image, b);
            let f = HostFile::open(&path, OpenMode::ReadOnly)
                .with_context(|| format!("cannot open base image {}", path.display()))?;
            let probed = || -> Result<Format> {
                block_on(engine::probe(&io, &f))
                    .with_context(|| format!("cannot open base image {}", path.display()))
            };
            let format = match a.base_format {
                Some(BaseFmt::Raw) => BaseFormat::Raw,
                Some(BaseFmt::Fvd) => match probed()? {
                    Format::Fvd => BaseFormat::Fvd,
                    Format::Raw => bail!("base image {} is not an FVD image", path.display()),
                },
                // A file that is a raw disk for some guest may hold a header the guest wrote:
                // taking it as FVD on a guess would follow that header's base path on the host.
                None => match probed()? {
                    Format::Raw => BaseFormat::Raw,
                    Format::Fvd => bail!(
                        "base image {} looks like an FVD image: give -F fvd to use it as one \
                         (or -F raw to use its bytes as a raw disk)",
                        path.display()
                    ),
                },
            };
            let size = match format {
                BaseFormat::Raw => f.size()?,
                BaseFormat::Fvd => {
                    block_on(engine::Image::<SyncIo>::read_header(&io, &f))?.virtual_size
                }
            };
            Some(BaseRef {
                path: b.clone(),
                format,
                size,
            })
        }
    };
    let size = match (a.size, &base) {
        (Some(s), _) => s,
        (None, Some(b)) => b.size.next_multiple_of(512),
        (None, None) => bail!("--size is required without a base image"),
    };
    if size == 0 || size % 512 != 0 {
        bail!("size must be a non-zero multiple of 512 bytes");
    }
    let params = CreateParams {
        virtual_size: size,
        block_size: a.block_size,
        chunk_size: a.chunk_size,
        journal_size: a.journal_size,
        compact: a.compact || !a.no_compact,
        base,
        compat: if a.copy_on_read {
            crate::format::header::COMPAT_COPY_ON_READ
        } else {
            0
        } | if a.prefetch {
            crate::format::header::COMPAT_PREFETCH
        } else {
            0
        },
        max_size: Some(a.max_size.unwrap_or_else(|| default_max_size(size))),
    };
    // Validate geometry by building the header before creating the file.
    validate(&params)?;
    let existed = a.image.exists();
    let file = HostFile::open(&a.image, OpenMode::Create)
        .with_context(|| format!("cannot create {}", a.image.display()))?;
    if let Err(e) = block_on(engine::create_image(&io, file, &params)) {
        if !existed {
            let _ = std::fs::remove_file(&a.image);
        }
        return Err(e).with_context(|| format!("cannot create {}", a.image.display()));
    }
    let mut o = String::new();
    outln!(
        o,
        "Formatting '{}', fmt=fvd size={} compact={} block_size={} chunk_size={}{}",
        a.image.display(),
        size,
        if params.compact { "on" } else { "off" },
        params.block_size,
        params.chunk_size,
        params
            .base
            .as_ref()
            .map(|b| format!(" base={} base_fmt={}", b.path, b.format.name()))
            .unwrap_or_default()
    );
    super::emit(&o)?;
    Ok(0)
}

/// An NBD export is used as a raw image (FVD over NBD is not supported).
fn nbd_base(uri: &str, format: Option<BaseFmt>) -> Result<BaseRef> {
    if let Some(BaseFmt::Fvd) = format {
        bail!("base image {uri}: FVD images over NBD are not supported (only raw exports)");
    }
    let client = NbdClient::connect(uri).context("cannot open base image")?;
    Ok(BaseRef {
        path: uri.to_string(),
        format: BaseFormat::Raw,
        size: client.size(),
    })
}

fn validate(p: &CreateParams) -> Result<()> {
    p.header()?;
    Ok(())
}
