//! The systemd units `packaging/fvd@.service` and `packaging/fvd@.socket`: they parse, the
//! service runs the server unprivileged with only its image writable and the seccomp filters on
//! and on the socket the socket unit holds, and systemd rates it as well confined. (The server on
//! a passed socket: tests/socket_activation.rs.)

use std::path::{Path, PathBuf};
use std::process::Command;

fn unit_path() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("packaging/fvd@.service")
}

fn unit() -> String {
    std::fs::read_to_string(unit_path()).unwrap()
}

fn socket_unit() -> String {
    std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("packaging/fvd@.socket"))
        .unwrap()
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
        ["/var/lib/fvd/%i.fvd"],
        "only the served image may be writable (the socket is passed by systemd)"
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

#[test]
fn the_control_socket_is_in_a_runtime_directory_of_the_servers_own() {
    let u = unit();
    // /run/fvd belongs to root (fvd.tmpfiles): the server, as fvd, can bind only in a directory
    // systemd makes for it, which ProtectSystem=strict leaves writable.
    assert_eq!(values(&u, "RuntimeDirectory"), ["fvd/%i"]);
    assert_eq!(values(&u, "RuntimeDirectoryMode"), ["0700"]);
    let exec = &values(&u, "ExecStart")[0];
    let words: Vec<&str> = exec.split_whitespace().collect();
    let at = words
        .iter()
        .position(|w| *w == "--control")
        .unwrap_or_else(|| panic!("no --control in {exec}"));
    assert_eq!(words.get(at + 1), Some(&"/run/fvd/%i/qmp.sock"));
    // The default mode (0600) stays: no --control-mode widening it.
    assert!(!exec.contains("--control-mode"), "{exec}");
}

#[test]
fn the_socket_unit_holds_the_socket_the_service_serves() {
    let (u, s) = (unit(), socket_unit());
    let listen = values(&s, "ListenStream");
    assert_eq!(listen, ["/run/fvd/%i.sock"]);
    assert_eq!(values(&s, "SocketMode"), ["0600"], "no access for others");
    assert!(
        values(&s, "Accept").iter().all(|v| v == "no"),
        "one server for all connections"
    );
    // Left in place when the units stop: QEMU finds the path during a restart.
    assert!(values(&s, "RemoveOnStop").iter().all(|v| v == "no"));
    assert_eq!(values(&u, "Requires"), ["fvd@%i.socket"]);
    assert!(values(&u, "After")[0]
        .split(' ')
        .any(|v| v == "fvd@%i.socket"));
    // fvd refuses a --socket that differs from the passed socket's path.
    let exec = &values(&u, "ExecStart")[0];
    assert!(exec.contains(&format!("--socket {}", listen[0])), "{exec}");
    // The service's unit name is what the socket activates (no Service= override).
    assert!(values(&s, "Service").is_empty());
    assert_eq!(values(&u, "Also"), ["fvd@%i.socket"]);
}

/// Both units, with ExecStart rewritten to the binary under test, as `systemd-analyze verify`
/// checks that it exists. Returns the service's path.
fn unit_for_this_build(dir: &Path) -> PathBuf {
    let path = dir.join("fvd@.service");
    let text = unit().replace("/usr/bin/fvd", env!("CARGO_BIN_EXE_fvd"));
    std::fs::write(&path, text).unwrap();
    std::fs::write(dir.join("fvd@.socket"), socket_unit()).unwrap();
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
    // Instances: a template itself is not loadable.
    let service = dir.path().join("fvd@vm1.service");
    let socket = dir.path().join("fvd@vm1.socket");
    std::fs::copy(&path, &service).unwrap();
    std::fs::copy(dir.path().join("fvd@.socket"), &socket).unwrap();
    let o = Command::new("systemd-analyze")
        .arg("verify")
        .arg("--man=no")
        .arg(&socket)
        .arg(&service)
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
