//! The systemd unit `packaging/fvd@.service`: it parses, runs the server unprivileged with only
//! its image writable and the seccomp filters on, and systemd rates it as well confined.

use std::path::{Path, PathBuf};
use std::process::Command;

fn unit_path() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("packaging/fvd@.service")
}

fn unit() -> String {
    std::fs::read_to_string(unit_path()).unwrap()
}

/// Values of `key=` lines in the unit, comments skipped.
fn values(unit: &str, key: &str) -> Vec<String> {
    let prefix = format!("{key}=");
    unit.lines()
        .filter(|l| !l.trim_start().starts_with('#'))
        .filter_map(|l| l.strip_prefix(&prefix))
        .map(str::to_string)
        .collect()
}

fn have_systemd_analyze() -> bool {
    Command::new("systemd-analyze")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
}

#[test]
fn runs_unprivileged_with_only_its_image_writable_and_seccomp_on() {
    let u = unit();
    assert_eq!(
        values(&u, "User"),
        ["fvd"],
        "the server must not run as root"
    );
    assert_eq!(values(&u, "Group"), ["fvd"]);
    assert!(values(&u, "DynamicUser").iter().all(|v| v == "no"));
    assert_eq!(
        values(&u, "ReadWritePaths"),
        ["/var/lib/fvd/%i.fvd /run/fvd"],
        "only the served image and the socket directory may be writable"
    );
    assert_eq!(values(&u, "ProtectSystem"), ["strict"]);
    assert_eq!(values(&u, "NoNewPrivileges"), ["yes"]);
    assert_eq!(values(&u, "CapabilityBoundingSet"), [""]);
    assert!(values(&u, "SystemCallFilter")
        .iter()
        .any(|v| v.contains("@system-service")));
    let exec = values(&u, "ExecStart");
    assert_eq!(exec.len(), 1);
    // Where the package installs the binary.
    assert!(exec[0].starts_with("/usr/bin/fvd serve /var/lib/fvd/%i.fvd"));
    // The default is --seccomp on; the unit must not turn the filters off.
    assert!(!exec[0].contains("--seccomp"), "{}", exec[0]);
}

/// Rewrites ExecStart to the binary under test, as `systemd-analyze verify` checks that it
/// exists.
fn unit_for_this_build(dir: &Path) -> PathBuf {
    let path = dir.join("fvd@.service");
    let text = unit().replace("/usr/bin/fvd", env!("CARGO_BIN_EXE_fvd"));
    std::fs::write(&path, text).unwrap();
    path
}

#[test]
fn systemd_analyze_verify_finds_no_problem() {
    if !have_systemd_analyze() {
        eprintln!("SKIP: systemd-analyze is not installed (apt-get install systemd)");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let path = unit_for_this_build(dir.path());
    let o = Command::new("systemd-analyze")
        .arg("verify")
        .arg("--man=no")
        .arg(&path)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "systemd-analyze verify: {stderr}");
    // Unknown keys and bad values are only warnings: any output is a problem.
    assert!(stderr.trim().is_empty(), "systemd-analyze verify: {stderr}");
}

#[test]
fn systemd_rates_the_unit_safe() {
    if !have_systemd_analyze() {
        eprintln!("SKIP: systemd-analyze is not installed (apt-get install systemd)");
        return;
    }
    let o = Command::new("systemd-analyze")
        .args(["security", "--offline=yes", "--no-pager"])
        .arg(unit_path())
        .output()
        .unwrap();
    let out = String::from_utf8_lossy(&o.stdout);
    let line = out
        .lines()
        .find(|l| l.contains("Overall exposure level"))
        .unwrap_or_else(|| panic!("no exposure level in: {out}"));
    let score: f64 = line
        .split(':')
        .nth(1)
        .and_then(|s| s.split_whitespace().next())
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("cannot read the score in {line:?}"));
    // 0.5 at the time of writing; "SAFE" ends at 1.9 on systemd's scale.
    assert!(score <= 1.0, "exposure {score}: {line}");
}
