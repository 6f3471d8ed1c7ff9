//! Sets `FVD_VERSION` for `fvd --version`: the crate version and, when built from this crate's
//! git checkout, the commit (`0.1.0 (abc1234)`, `-dirty` when its sources differ from it).
//! Without git (a source tarball) it is the crate version alone.

use std::path::{Path, PathBuf};
use std::process::Command;

fn git(dir: &Path, args: &[&str]) -> Option<String> {
    let o = Command::new("git")
        .arg("-C")
        .arg(dir)
        .args(args)
        .output()
        .ok()?;
    if !o.status.success() {
        return None;
    }
    Some(String::from_utf8(o.stdout).ok()?.trim_end().to_string())
}

/// What the binary is built from: a change elsewhere (docs, tests) leaves it as the commit builds
/// it, so it neither marks the build dirty nor reruns this script (which rebuilds the crate).
/// tests/version.rs uses the same list.
const SOURCES: [&str; 5] = ["src", "build.rs", "Cargo.toml", "Cargo.lock", "vendor"];

/// The commit and the paths whose change can change the answer, when `dir` is the top of a git
/// work tree (not a tarball unpacked inside some other repository).
fn commit(dir: &Path) -> Option<(String, Vec<PathBuf>)> {
    let top = PathBuf::from(git(dir, &["rev-parse", "--show-toplevel"])?);
    if top.canonicalize().ok()? != dir.canonicalize().ok()? {
        return None;
    }
    let hash = git(dir, &["rev-parse", "--short", "HEAD"])?;
    let mut status = vec!["status", "--porcelain", "--untracked-files=no", "--"];
    status.extend(SOURCES);
    let dirty = !git(dir, &status)?.is_empty();
    // A commit moves HEAD or the branch it names (--git-path resolves both inside linked work
    // trees); an edit changes a source (cargo scans directories).
    let mut watch: Vec<PathBuf> = SOURCES.iter().map(|s| dir.join(s)).collect();
    let mut refs = vec!["HEAD".to_string(), "packed-refs".into()];
    if let Some(r) = git(dir, &["symbolic-ref", "-q", "HEAD"]) {
        refs.push(r);
    }
    for r in refs {
        if let Some(path) = git(dir, &["rev-parse", "--git-path", &r]) {
            watch.push(dir.join(path));
        }
    }
    let suffix = if dirty { "-dirty" } else { "" };
    Some((format!("{hash}{suffix}"), watch))
}

fn main() {
    let dir = PathBuf::from(std::env::var_os("CARGO_MANIFEST_DIR").expect("set by cargo"));
    let version = std::env::var("CARGO_PKG_VERSION").expect("set by cargo");
    println!("cargo:rerun-if-changed=build.rs");
    match commit(&dir) {
        Some((commit, watch)) => {
            // Missing paths would make cargo rerun this script on every build.
            for p in watch.iter().filter(|p| p.exists()) {
                println!("cargo:rerun-if-changed={}", p.display());
            }
            println!("cargo:rustc-env=FVD_VERSION={version} ({commit})");
        }
        None => println!("cargo:rustc-env=FVD_VERSION={version}"),
    }
}
