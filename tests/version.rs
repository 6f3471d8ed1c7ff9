//! `fvd --version` names the crate version and the git commit the binary was built from.

use std::path::Path;
use std::process::Command;

fn git(args: &[&str]) -> Option<String> {
    let o = Command::new("git")
        .arg("-C")
        .arg(env!("CARGO_MANIFEST_DIR"))
        .args(args)
        .output()
        .ok()?;
    o.status
        .success()
        .then(|| String::from_utf8(o.stdout).unwrap().trim_end().to_string())
}

#[test]
fn version_names_the_commit_of_this_checkout() {
    let o = Command::new(env!("CARGO_BIN_EXE_fvd"))
        .arg("--version")
        .output()
        .unwrap();
    assert!(o.status.success());
    let out = String::from_utf8(o.stdout).unwrap();
    let version = env!("CARGO_PKG_VERSION");
    let top = git(&["rev-parse", "--show-toplevel"]);
    let from_git = top.is_some_and(|t| {
        Path::new(&t).canonicalize().unwrap()
            == Path::new(env!("CARGO_MANIFEST_DIR"))
                .canonicalize()
                .unwrap()
    });
    if !from_git {
        assert_eq!(out, format!("fvd {version}\n"));
        return;
    }
    let head = git(&["rev-parse", "--short", "HEAD"]).unwrap();
    // build.rs's SOURCES: only they make a build dirty.
    let dirty = !git(&[
        "status",
        "--porcelain",
        "--untracked-files=no",
        "--",
        "src",
        "build.rs",
        "Cargo.toml",
        "Cargo.lock",
        "vendor",
    ])
    .unwrap()
    .is_empty();
    let suffix = if dirty { "-dirty" } else { "" };
    assert_eq!(out, format!("fvd {version} ({head}{suffix})\n"));
}
