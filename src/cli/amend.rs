//! `fvd amend`: switch image features.

use crate::engine;
use crate::format::header::{COMPAT_COPY_ON_READ, COMPAT_PREFETCH};
use crate::io::executor::block_on;
use crate::io::sync::SyncIo;
use anyhow::{bail, Context, Result};
use std::path::PathBuf;

#[derive(clap::Args)]
pub struct Args {
    image: PathBuf,
    /// Image format (probed when omitted).
    #[arg(short = 'f', long, value_enum)]
    format: Option<super::ImageFormat>,
    /// Copy data read from the base image into this image.
    #[arg(long, value_enum)]
    copy_on_read: Option<OnOff>,
    /// Prefetch the base image in the background while served.
    #[arg(long, value_enum)]
    prefetch: Option<OnOff>,
}

#[derive(Copy, Clone, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum OnOff {
    On,
    Off,
}

pub fn run(a: Args) -> Result<i32> {
    if a.copy_on_read.is_none() && a.prefetch.is_none() {
        bail!("nothing to change: give --copy-on-read and/or --prefetch");
    }
    super::require_fvd("amend", a.format)?;
    let io = SyncIo;
    let img = block_on(engine::open_image(&io, &a.image, false))
        .with_context(|| format!("cannot open {}", a.image.display()))?;
    let set = |compat: &mut u64, bit: u64, v: Option<OnOff>| match v {
        Some(OnOff::On) => *compat |= bit,
        Some(OnOff::Off) => *compat &= !bit,
        None => {}
    };
    block_on(img.update_header(&io, |h| {
        set(&mut h.compat, COMPAT_COPY_ON_READ, a.copy_on_read);
        set(&mut h.compat, COMPAT_PREFETCH, a.prefetch);
    }))?;
    block_on(img.close(&io))?;
    Ok(0)
}
