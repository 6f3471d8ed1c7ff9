//! `fvd info`.

use super::Output;
use crate::engine::{self, Disk};
use crate::format::header::{COMPAT_COPY_ON_READ, COMPAT_PREFETCH};
use crate::io::executor::block_on;
use crate::io::sync::SyncIo;
use crate::io::IoFile;
use anyhow::{Context, Result};
use serde::Serialize;
use std::os::unix::fs::MetadataExt;

#[derive(Serialize)]
struct Info {
    filename: String,
    format: &'static str,
    virtual_size: u64,
    /// Bytes the storage actually uses (allocated file blocks, or the device size).
    actual_size: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    fvd: Option<FvdInfo>,
}

#[derive(Serialize)]
struct FvdInfo {
    compact: bool,
    /// Largest size `fvd resize` can grow the image to.
    max_size: u64,
    block_size: u64,
    chunk_size: u64,
    clean: bool,
    generation: u64,
    journal_size: u64,
    journal_epoch: u64,
    data_offset: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    base: Option<BaseInfo>,
    present_bytes: u64,
    allocated_chunks: u64,
    copy_on_read: bool,
    prefetch: bool,
}

#[derive(Serialize)]
struct BaseInfo {
    filename: String,
    format: &'static str,
    size: u64,
    /// Bytes still read from the base image (not yet present in this image).
    bytes_remaining: u64,
}

pub fn run(a: super::InspectArgs) -> Result<i32> {
    let io = SyncIo;
    let disk = block_on(engine::open_disk_with(
        &io,
        &a.image,
        super::ro_mode(a.force_share),
        a.format.map(Into::into),
    ))
    .with_context(|| format!("cannot open {}", a.image.display()))?;
    let meta = std::fs::metadata(&a.image)?;
    let actual_size = match &disk {
        Disk::Fvd(img) if img.file().is_block_device() => img.file().size()?,
        Disk::Raw(r) if r.file().is_block_device() => r.file().size()?,
        _ => meta.blocks() * 512,
    };
    let info = match &disk {
        Disk::Raw(r) => Info {
            filename: a.image.display().to_string(),
            format: "raw",
            virtual_size: r.virtual_size(),
            actual_size,
            fvd: None,
        },
        Disk::Fvd(img) => {
            let h = img.header();
            let geo = img.geometry();
            let present_bytes = (img.present_blocks() * geo.block_size).min(geo.virtual_size);
            let base = h.base.as_ref().map(|b| {
                let reachable = b.size.min(geo.virtual_size);
                let covered: u64 = img
                    .extents()
                    .iter()
                    .filter(|e| e.location == engine::map::Location::Base)
                    .map(|e| e.length)
                    .sum();
                BaseInfo {
                    filename: b.path.clone(),
                    format: b.format.name(),
                    size: b.size,
                    bytes_remaining: covered.min(reachable),
                }
            });
            Info {
                filename: a.image.display().to_string(),
                format: "fvd",
                virtual_size: geo.virtual_size,
                actual_size,
                fvd: Some(FvdInfo {
                    compact: img.compact(),
                    max_size: h.capacity(),
                    block_size: geo.block_size,
                    chunk_size: geo.chunk_size,
                    clean: h.clean(),
                    generation: h.generation,
                    journal_size: h.journal_len,
                    journal_epoch: h.journal_epoch,
                    data_offset: h.data_offset,
                    base,
                    present_bytes,
                    allocated_chunks: img.allocated_chunks(),
                    copy_on_read: h.compat & COMPAT_COPY_ON_READ != 0,
                    prefetch: h.compat & COMPAT_PREFETCH != 0,
                }),
            }
        }
    };
    let mut o = String::new();
    match a.output {
        Output::Json => outln!(o, "{}", serde_json::to_string_pretty(&info)?),
        Output::Human => print_human(&mut o, &info),
    }
    super::emit(&o)?;
    Ok(0)
}

fn human_size(b: u64) -> String {
    const U: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut v = b as f64;
    let mut i = 0;
    while v >= 1024.0 && i < U.len() - 1 {
        v /= 1024.0;
        i += 1;
    }
    if i == 0 {
        format!("{b} B")
    } else {
        format!("{v:.3} {}", U[i]).replace(".000 ", " ")
    }
}

fn print_human(o: &mut String, i: &Info) {
    outln!(o, "image: {}", i.filename);
    outln!(o, "file format: {}", i.format);
    outln!(
        o,
        "virtual size: {} ({} bytes)",
        human_size(i.virtual_size),
        i.virtual_size
    );
    outln!(o, "disk size: {}", human_size(i.actual_size));
    if let Some(f) = &i.fvd {
        outln!(
            o,
            "layout: {}",
            if f.compact {
                "compact (thin)"
            } else {
                "raw-like"
            }
        );
        outln!(
            o,
            "max size: {} ({} bytes)",
            human_size(f.max_size),
            f.max_size
        );
        outln!(o, "block size: {}", f.block_size);
        outln!(o, "chunk size: {}", f.chunk_size);
        outln!(
            o,
            "present in image: {} ({} bytes)",
            human_size(f.present_bytes),
            f.present_bytes
        );
        if f.compact {
            outln!(o, "allocated chunks: {}", f.allocated_chunks);
        }
        if let Some(b) = &f.base {
            outln!(
                o,
                "base image: {} (format {}, {} bytes)",
                b.filename,
                b.format,
                b.size
            );
            outln!(o, "base bytes remaining: {}", b.bytes_remaining);
        }
        outln!(
            o,
            "journal: {} (epoch {})",
            human_size(f.journal_size),
            f.journal_epoch
        );
        outln!(o, "clean shutdown: {}", if f.clean { "yes" } else { "no" });
        outln!(
            o,
            "copy-on-read: {}",
            if f.copy_on_read { "on" } else { "off" }
        );
        outln!(o, "prefetch: {}", if f.prefetch { "on" } else { "off" });
    }
}
