//! `fvd stream` (copy every base block into the image, offline) and `fvd rebase --drop-base`.

use crate::engine;
use crate::format::header::FLAG_BASE_NOT_NEEDED;
use crate::io::executor::block_on;
use crate::io::sync::SyncIo;
use anyhow::{bail, Context, Result};
use std::path::PathBuf;

#[derive(clap::Args)]
pub struct StreamArgs {
    image: PathBuf,
    /// Image format (probed when omitted).
    #[arg(short = 'f', long, value_enum)]
    format: Option<super::ImageFormat>,
    /// Detach the base image when done.
    #[arg(long)]
    drop_base: bool,
    #[arg(short = 'q', long)]
    quiet: bool,
}

#[derive(clap::Args)]
pub struct RebaseArgs {
    image: PathBuf,
    /// Image format (probed when omitted).
    #[arg(short = 'f', long, value_enum)]
    format: Option<super::ImageFormat>,
    /// Detach the base image; only allowed once every block is in the image (after prefetch
    /// or `fvd stream`).
    #[arg(long, required = true)]
    drop_base: bool,
}

pub fn stream(a: StreamArgs) -> Result<i32> {
    super::require_fvd("stream", a.format)?;
    let io = SyncIo;
    let img = block_on(engine::open_image(&io, &a.image, false))
        .with_context(|| format!("cannot open {}", a.image.display()))?;
    if img.base().is_none() {
        bail!("{} has no base image", a.image.display());
    }
    let total = img.base_blocks_remaining();
    let bar = if a.quiet || !std::io::IsTerminal::is_terminal(&std::io::stderr()) {
        indicatif::ProgressBar::hidden()
    } else {
        indicatif::ProgressBar::new(total * img.geometry().block_size)
    };
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{bar:40} {percent:>3}% {bytes}/{total_bytes} {bytes_per_sec}",
        )
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    loop {
        let step = block_on(img.prefetch_step(&io, 256))?;
        bar.inc(step.bytes);
        if step.done {
            break;
        }
    }
    block_on(img.mark_base_not_needed(&io))?;
    if a.drop_base {
        block_on(img.update_header(&io, |h| {
            h.base = None;
            h.flags &= !FLAG_BASE_NOT_NEEDED;
        }))?;
    }
    block_on(img.close(&io))?;
    bar.finish_and_clear();
    Ok(0)
}

pub fn rebase(a: RebaseArgs) -> Result<i32> {
    super::require_fvd("rebase", a.format)?;
    let io = SyncIo;
    let img = block_on(engine::open_image(&io, &a.image, false))
        .with_context(|| format!("cannot open {}", a.image.display()))?;
    if img.base().is_none() {
        bail!("{} has no base image", a.image.display());
    }
    let remaining = img.base_blocks_remaining();
    if remaining != 0 {
        bail!(
            "{} still reads {} blocks from its base image; run 'fvd stream' (or let prefetch finish) first",
            a.image.display(),
            remaining
        );
    }
    block_on(img.update_header(&io, |h| {
        h.base = None;
        h.flags &= !FLAG_BASE_NOT_NEEDED;
    }))?;
    block_on(img.close(&io))?;
    Ok(0)
}
