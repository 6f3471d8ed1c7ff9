//! `fvd check`: exit codes as qemu-img check: 0 consistent, 1 the check could not be done
//! (cannot open or read the file, not an FVD image), 2 corruption found (also when a repair
//! could not fix it), 3 only leaks found.

use super::Output;
use crate::engine;
use crate::engine::check::{check, CheckReport, RepairError};
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
    /// Rebuild the metadata from what survives (the other metadata copy, the journal) and fix
    /// every inconsistency; reports what was lost (needs exclusive access).
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
    if !a.repair {
        let r = block_on(check(&io, file))
            .with_context(|| format!("cannot check {}", a.image.display()))?;
        return report(&a, r);
    }
    drop(file);
    let (fixed, lost) = match block_on(engine::repair_image(&io, &a.image)) {
        Ok(r) => (r.fixed, r.lost),
        // Damage repair cannot get past: report it like a check does (exit 2).
        Err(RepairError::Unrepairable(p)) => {
            super::warn_line(format_args!(
                "fvd: cannot repair {}: {p}",
                a.image.display()
            ));
            let file = HostFile::open(&a.image, OpenMode::ReadOnly)?;
            return report(&a, block_on(check(&io, file))?);
        }
        Err(RepairError::Engine(e)) => {
            return Err(e).with_context(|| format!("cannot repair {}", a.image.display()))
        }
    };
    let file = HostFile::open(&a.image, OpenMode::ReadOnly)?;
    let mut r = block_on(check(&io, file))
        .with_context(|| format!("cannot check {} after repair", a.image.display()))?;
    r.repaired = fixed;
    r.lost = lost;
    report(&a, r)
}

fn report(a: &Args, r: CheckReport) -> Result<i32> {
    let mut o = String::new();
    match a.output {
        Output::Json => outln!(o, "{}", serde_json::to_string_pretty(&r)?),
        Output::Human => {
            // What repair did goes to stderr (as before), the state of the image to stdout.
            for p in &r.repaired {
                super::warn_line(format_args!("Repaired: {p}"));
            }
            for l in &r.lost {
                super::warn_line(format_args!("{l}"));
            }
            for p in &r.problems {
                if p.is_leak() {
                    outln!(o, "LEAK {p}");
                } else {
                    outln!(o, "ERROR {p}");
                }
            }
            if r.journal_records > 0 {
                outln!(
                    o,
                    "The image was not shut down cleanly: {} journal records in {} sectors will be replayed on the next open.",
                    r.journal_records, r.journal_sectors
                );
            }
            if r.generation.is_some() && !r.header_slots_valid.iter().all(|&v| v) {
                outln!(o, "One header slot is invalid (an interrupted header update); the other is in use.");
            }
            if r.corruptions == 0 && r.leaks == 0 {
                outln!(o, "No errors were found on the image.");
            }
            if r.corruptions > 0 {
                outln!(o, "{} errors were found on the image.", r.corruptions);
            }
            if r.leaks > 0 {
                outln!(
                    o,
                    "{} leaked chunks were found on the image (space wasted, no harm to data).",
                    r.leaks
                );
            }
            if r.corruptions > 0 || r.leaks > 0 {
                outln!(o, "Run 'fvd check --repair' to fix them.");
            }
            if r.generation.is_some() {
                outln!(
                    o,
                    "{} chunks allocated, {} blocks present.",
                    r.allocated_chunks,
                    r.present_blocks
                );
            }
        }
    }
    super::emit(&o)?;
    Ok(r.exit_code())
}
