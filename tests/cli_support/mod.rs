//! Running the `fvd` tool in a test: its output, its one-line errors, a scratch directory on
//! a disk that takes O_DIRECT.
#![allow(dead_code)] // each test file uses what it needs

use std::path::Path;
use std::process::{Command, Output};

pub fn fvd(dir: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_fvd"))
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap()
}

pub fn ok(dir: &Path, args: &[&str]) -> String {
    let o = fvd(dir, args);
    assert!(
        o.status.success(),
        "fvd {args:?} failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8(o.stdout).unwrap()
}

/// Fails with exactly one line on stderr, and returns it.
pub fn fails(dir: &Path, args: &[&str]) -> String {
    let o = fvd(dir, args);
    assert!(!o.status.success(), "fvd {args:?} should fail");
    let err = String::from_utf8(o.stderr).unwrap();
    assert_eq!(
        err.trim_end().lines().count(),
        1,
        "want one error line, got: {err}"
    );
    assert!(err.starts_with("fvd: "), "{err}");
    err
}

pub fn dir() -> tempfile::TempDir {
    tempfile::tempdir_in("/var/tmp").unwrap()
}
