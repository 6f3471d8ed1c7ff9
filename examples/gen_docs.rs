//! Writes the man pages (`fvd.1` and one `fvd-SUBCOMMAND.1` per subcommand) and the bash, zsh
//! and fish completions, all generated from the clap definitions, into a directory:
//!
//!     cargo run --example gen_docs -- target/assets
//!
//! integration/package.sh runs it before `cargo deb` (the asset list in Cargo.toml points at
//! its output); tests/generated_docs.rs checks it covers every subcommand. Nothing it writes is
//! committed, so the pages cannot go stale.

use clap_complete::Shell;
use std::path::{Path, PathBuf};

/// Completion files, named as `clap_complete` names them for the command `fvd`.
pub const COMPLETIONS: [(Shell, &str); 3] = [
    (Shell::Bash, "fvd.bash"),
    (Shell::Zsh, "_fvd"),
    (Shell::Fish, "fvd.fish"),
];

/// Writes `out/man/*.1` and `out/completions/*` (replacing what an earlier run wrote).
pub fn generate(out: &Path) -> std::io::Result<()> {
    let man = out.join("man");
    let completions = out.join("completions");
    for d in [&man, &completions] {
        // A subcommand removed since the last run must not leave its page behind.
        match std::fs::remove_dir_all(d) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
            _ => {}
        }
        std::fs::create_dir_all(d)?;
    }
    // As clap_mangen::generate_to, but every page (not only fvd.1) names the version.
    let mut cmd = fvd::cli::command().disable_help_subcommand(true);
    cmd.build();
    let source = format!("fvd {}", fvd::cli::VERSION);
    for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set()) {
        clap_mangen::Man::new(sub.clone())
            .source(source.clone())
            .generate_to(&man)?;
    }
    clap_mangen::Man::new(cmd)
        .source(source)
        .generate_to(&man)?;
    for (shell, _) in COMPLETIONS {
        clap_complete::generate_to(shell, &mut fvd::cli::command(), "fvd", &completions)?;
    }
    Ok(())
}

#[allow(dead_code)] // tests/generated_docs.rs includes this file for `generate` only.
fn main() {
    let Some(out) = std::env::args_os().nth(1).map(PathBuf::from) else {
        eprintln!("usage: gen_docs OUTPUT_DIR");
        std::process::exit(2);
    };
    if let Err(e) = generate(&out) {
        eprintln!("gen_docs: cannot write to {}: {e}", out.display());
        std::process::exit(1);
    }
}
