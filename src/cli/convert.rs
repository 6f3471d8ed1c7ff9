//! `fvd convert`: copies a disk (raw or FVD, probed unless `-f`; an FVD chain is flattened) into a new FVD
//! or raw image. All-zero ranges are skipped, so the output stays sparse/thin.

use super::size_arg;
use crate::engine::{self, CreateParams, Disk};
use crate::io::executor::block_on;
use crate::io::host_file::OpenMode;
use crate::io::sync::SyncIo;
use crate::io::{Buf, HostFile};
use crate::units::VirtOffset;
use anyhow::{bail, Context, Result};
use std::path::PathBuf;

#[derive(clap::Args)]
pub struct Args {
    /// Source image (raw or FVD).
    src: PathBuf,
    /// Destination file or block device.
    dst: PathBuf,
    /// Source image format (probed when omitted).
    #[arg(short = 'f', long = "format", value_enum)]
    src_format: Option<super::ImageFormat>,
    /// Output format.
    #[arg(short = 'O', long = "output-format", value_enum, default_value = "fvd")]
    format: OutFmt,
    /// Raw-like FVD layout instead of compact.
    #[arg(long)]
    no_compact: bool,
    #[arg(long, value_parser = size_arg, default_value = "64K")]
    block_size: u64,
    #[arg(long, value_parser = size_arg, default_value = "1M")]
    chunk_size: u64,
    /// Do not show a progress bar.
    #[arg(short = 'q', long)]
    quiet: bool,
}

#[derive(Copy, Clone, PartialEq, Eq, clap::ValueEnum)]
enum OutFmt {
    Fvd,
    Raw,
}

const STEP: u64 = 1 << 20;

pub fn run(a: Args) -> Result<i32> {
    let io = SyncIo;
    let src = block_on(engine::open_disk_with(
        &io,
        &a.src,
        OpenMode::ReadOnly,
        a.src_format.map(Into::into),
    ))
    .with_context(|| format!("cannot open {}", a.src.display()))?;
    if a.src.canonicalize().ok() == a.dst.canonicalize().ok() {
        bail!("source and destination are the same file");
    }
    let size = src.virtual_size();
    let existed = a.dst.exists();
    let r = copy(&io, &src, &a, size);
    if r.is_err() && !existed {
        let _ = std::fs::remove_file(&a.dst);
    }
    r?;
    Ok(0)
}

fn copy(io: &SyncIo, src: &Disk<SyncIo>, a: &Args, size: u64) -> Result<()> {
    let dst: Disk<SyncIo> = match a.format {
        OutFmt::Fvd => {
            let params = CreateParams {
                virtual_size: size,
                block_size: a.block_size,
                chunk_size: a.chunk_size,
                compact: !a.no_compact,
                max_size: Some(super::create::default_max_size(size)),
                ..Default::default()
            };
            let f = HostFile::open(&a.dst, OpenMode::Create)
                .with_context(|| format!("cannot create {}", a.dst.display()))?;
            block_on(engine::create_image(io, f, &params))
                .with_context(|| format!("cannot create {}", a.dst.display()))?;
            block_on(engine::open_disk_with(
                io,
                &a.dst,
                OpenMode::ReadWrite,
                Some(engine::Format::Fvd),
            ))?
        }
        OutFmt::Raw => {
            let f = HostFile::open(&a.dst, OpenMode::Create)
                .with_context(|| format!("cannot create {}", a.dst.display()))?;
            f.ensure_len(size)?;
            Disk::Raw(engine::RawDisk::open(f, false, false)?)
        }
    };
    let bar = if a.quiet || !std::io::IsTerminal::is_terminal(&std::io::stderr()) {
        indicatif::ProgressBar::hidden()
    } else {
        indicatif::ProgressBar::new(size)
    };
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{bar:40} {percent:>3}% {bytes}/{total_bytes} {bytes_per_sec}",
        )
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    let buf = Buf::alloc(STEP as usize);
    let mut host = vec![0u8; STEP as usize];
    let mut off = 0;
    while off < size {
        let n = STEP.min(size - off);
        let piece = buf.slice(0, n as usize);
        block_on(src.read(io, VirtOffset(off), piece.clone()))
            .with_context(|| format!("read error at offset {off}"))?;
        piece.copy_to_slice(0, &mut host[..n as usize]);
        if host[..n as usize].iter().any(|&b| b != 0) {
            block_on(dst.write(io, VirtOffset(off), piece))
                .with_context(|| format!("write error at offset {off}"))?;
        }
        off += n;
        bar.set_position(off);
    }
    block_on(dst.close(io))?;
    bar.finish_and_clear();
    Ok(())
}
