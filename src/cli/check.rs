//! `fvd check`: exit 0 when consistent, 2 when corrupt (as qemu-img check), 1 on errors.

use super::Output;
use crate::engine;
use crate::engine::check::check;
use crate::io::executor::block_on;
use crate::io::host_file::OpenMode;
use crate::io::sync::SyncIo;
use crate::io::HostFile;
use anyhow::{bail, Context, Result};
use std::path::PathBuf;

#[derive(clap::Args)]
pub struct Args {
    /// Image file or block device.
    image: PathBuf,
    /// Image format (probed when omitted).
    #[arg(short = 'f', long, value_enum)]
    format: Option<super::ImageFormat>,
    /// Replay the journal and fix inconsistencies (needs exclusive access).
    #[arg(short = 'r', long)]
    repair: bool,
    #[arg(long, value_enum, default_value_t)]
    output: Output,
    /// Open without locking (read-only check of an image a server has open).
    #[arg(short = 'U', long, conflicts_with = "repair")]
    force_share: bool,
}

pub fn run(a: Args) -> Result<i32> {
    super::require_fvd("check", a.format)?;
    let io = SyncIo;
    let file = HostFile::open(&a.image, super::ro_mode(a.force_share))
        .with_context(|| format!("cannot open {}", a.image.display()))?;
    if block_on(engine::probe(&io, &file))
        .with_context(|| format!("cannot check {}", a.image.display()))?
        != engine::Format::Fvd
    {
        bail!("{} is not an FVD image", a.image.display());
    }
    if a.repair {
        drop(file);
        let fixed = block_on(engine::repair_image(&io, &a.image))
            .with_context(|| format!("cannot repair {}", a.image.display()))?;
        for p in &fixed {
            super::warn_line(format_args!("Repaired: {p}"));
        }
        let file = HostFile::open(&a.image, OpenMode::ReadOnly)?;
        return report(&a, block_on(check(&io, file))?);
    }
    let r = block_on(check(&io, file))
        .with_context(|| format!("cannot check {}", a.image.display()))?;
    report(&a, r)
}

fn report(a: &Args, r: engine::check::CheckReport) -> Result<i32> {
    let mut o = String::new();
    match a.output {
        Output::Json => outln!(o, "{}", serde_json::to_string_pretty(&r)?),
        Output::Human => {
            for p in &r.problems {
                outln!(o, "ERROR {p}");
            }
            if r.journal_records > 0 {
                outln!(o,
                    "The image was not shut down cleanly: {} journal records in {} sectors will be replayed on the next open.",
                    r.journal_records, r.journal_sectors
                );
            }
            if !r.header_slots_valid.iter().all(|&v| v) {
                outln!(o, "One header slot is invalid (an interrupted header update); the other is in use.");
            }
            if r.problems.is_empty() {
                outln!(o, "No errors were found on the image.");
            } else {
                outln!(o, "{} errors were found on the image.", r.problems.len());
                outln!(o, "Run 'fvd check --repair' to fix them.");
            }
            outln!(
                o,
                "{} chunks allocated, {} blocks present.",
                r.allocated_chunks,
                r.present_blocks
            );
        }
    }
    super::emit(&o)?;
    Ok(if r.corrupt() { 2 } else { 0 })
}
