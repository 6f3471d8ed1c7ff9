//! `fvd map`.

use super::Output;
use crate::engine::{self, map::Location};
use crate::io::executor::block_on;
use crate::io::sync::SyncIo;
use anyhow::{Context, Result};

pub fn run(a: super::InspectArgs) -> Result<i32> {
    super::require_fvd("map", a.format)?;
    let img = block_on(engine::open_image_with(
        &SyncIo,
        &a.image,
        super::ro_mode(a.force_share),
    ))
    .with_context(|| format!("cannot open {}", a.image.display()))?;
    let extents = img.extents();
    let mut o = String::new();
    match a.output {
        Output::Json => outln!(o, "{}", serde_json::to_string_pretty(&extents)?),
        Output::Human => {
            outln!(
                o,
                "{:<20}{:<20}{:<20}Location",
                "Offset",
                "Length",
                "Mapped to"
            );
            for e in &extents {
                let mapped = e.offset.map(|o| format!("{o:#x}")).unwrap_or_default();
                let loc = match e.location {
                    Location::Data => a.image.display().to_string(),
                    Location::Base => "base".into(),
                    Location::Zero => "zero".into(),
                };
                outln!(o, "{:<#20x}{:<#20x}{:<20}{loc}", e.start, e.length, mapped);
            }
        }
    }
    super::emit(&o)?;
    Ok(0)
}
