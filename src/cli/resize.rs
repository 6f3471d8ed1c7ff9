//! `fvd resize`: change an image's virtual size (qemu-img spelling).

use crate::engine::{self, Disk};
use crate::io::executor::block_on;
use crate::io::host_file::OpenMode;
use crate::io::sync::SyncIo;
use crate::io::IoFile;
use anyhow::{bail, Context, Result};
use std::path::PathBuf;

#[derive(clap::Args)]
pub struct Args {
    /// Image file or block device (an image a server has open is refused: it is locked).
    image: PathBuf,
    /// New size (K/M/G/T suffixes), or `+SIZE` / `-SIZE` relative to the current one.
    #[arg(allow_hyphen_values = true)]
    size: String,
    /// Allow the image to shrink (refused if anything is allocated past the new end).
    #[arg(long)]
    shrink: bool,
    /// Image format (probed when omitted).
    #[arg(short = 'f', long, value_enum)]
    format: Option<super::ImageFormat>,
}

/// A size argument: absolute, or relative to the current size.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
enum SizeArg {
    Absolute(u64),
    Grow(u64),
    Shrink(u64),
}

impl SizeArg {
    fn parse(s: &str) -> Result<SizeArg> {
        let parse = |t: &str| super::size_arg(t).map_err(anyhow::Error::msg);
        Ok(match s.trim().strip_prefix('+') {
            Some(t) => SizeArg::Grow(parse(t)?),
            None => match s.trim().strip_prefix('-') {
                Some(t) => SizeArg::Shrink(parse(t)?),
                None => SizeArg::Absolute(parse(s)?),
            },
        })
    }

    fn apply(self, current: u64) -> Result<u64> {
        match self {
            SizeArg::Absolute(n) => Ok(n),
            SizeArg::Grow(n) => current.checked_add(n).context("the new size is too large"),
            SizeArg::Shrink(n) => match current.checked_sub(n) {
                Some(v) if v > 0 => Ok(v),
                _ => bail!("cannot shrink {current} bytes by {n}: nothing would be left"),
            },
        }
    }
}

pub fn run(a: Args) -> Result<i32> {
    let size = SizeArg::parse(&a.size)?;
    let io = SyncIo;
    let what = || format!("cannot resize {}", a.image.display());
    let disk = block_on(engine::open_disk_with(
        &io,
        &a.image,
        OpenMode::ReadWrite,
        a.format.map(Into::into),
    ))
    .with_context(|| format!("cannot open {}", a.image.display()))?;
    let new = size.apply(disk.virtual_size()).with_context(what)?;
    if new == 0 || new % 512 != 0 {
        bail!(
            "{}: size must be a non-zero multiple of 512 bytes, not {new}",
            what()
        );
    }
    match disk {
        Disk::Fvd(mut img) => {
            block_on(img.resize(&io, new, a.shrink)).with_context(what)?;
            block_on(img.close(&io)).with_context(what)?;
        }
        Disk::Raw(r) => {
            if r.file().is_block_device() {
                bail!(
                    "{}: it is a raw block device; resize the device itself (lvresize, ...)",
                    what()
                );
            }
            let old = r.virtual_size();
            if new < old && !a.shrink {
                bail!(
                    "{}: the new size {new} is smaller than the current {old} bytes: shrinking \
                     needs --shrink",
                    what()
                );
            }
            // The lock taken by the open above is held while the length changes.
            std::fs::OpenOptions::new()
                .write(true)
                .open(&a.image)
                .and_then(|f| f.set_len(new).and_then(|()| f.sync_all()))
                .with_context(what)?;
            drop(r);
        }
    }
    super::emit("Image resized.\n")?;
    Ok(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_are_absolute_or_relative() {
        assert_eq!(SizeArg::parse("2G").unwrap(), SizeArg::Absolute(2 << 30));
        assert_eq!(SizeArg::parse("+1M").unwrap(), SizeArg::Grow(1 << 20));
        assert_eq!(SizeArg::parse("-64K").unwrap(), SizeArg::Shrink(64 << 10));
        assert!(SizeArg::parse("+").is_err());
        assert!(SizeArg::parse("x").is_err());
        assert_eq!(SizeArg::Grow(512).apply(1024).unwrap(), 1536);
        assert_eq!(SizeArg::Shrink(512).apply(1024).unwrap(), 512);
        assert!(SizeArg::Shrink(1024).apply(1024).is_err());
        assert!(SizeArg::Grow(u64::MAX).apply(1024).is_err());
    }
}
