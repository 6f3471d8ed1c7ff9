//! Replays the fuzzing inputs committed under fuzz/ through the fuzz harnesses
//! (fuzz/harness/, the same code the cargo-fuzz targets run), on stable `cargo test`:
//! * fuzz/regressions/<target>/*: inputs that once crashed a target; each must now pass.
//! * fuzz/seeds/<target>/*: the seed corpus, which must also match its generator
//!   (fuzz/harness/seeds.rs).
//!
//! See fuzz/README.md for running the fuzzers themselves.

#[path = "../fuzz/harness/mod.rs"]
mod harness;

use std::path::{Path, PathBuf};

fn fuzz_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz")
}

/// The files of fuzz/<kind>/<target>, sorted (none if the directory does not exist).
fn inputs(kind: &str, target: &str) -> Vec<(PathBuf, Vec<u8>)> {
    let dir = fuzz_dir().join(kind).join(target);
    let mut out: Vec<_> = std::fs::read_dir(&dir)
        .map(|rd| {
            rd.map(|e| e.expect("directory entry").path())
                .filter(|p| p.is_file())
                .collect()
        })
        .unwrap_or_default();
    out.sort();
    out.into_iter()
        .map(|p| {
            let b = std::fs::read(&p).expect("read input");
            (p, b)
        })
        .collect()
}

/// Runs every seed and regression input of `target`; returns how many ran.
fn replay(target: &str, run: fn(&[u8])) -> usize {
    let mut n = 0;
    for kind in ["seeds", "regressions"] {
        for (path, data) in inputs(kind, target) {
            eprintln!("{}", path.display());
            run(&data);
            n += 1;
        }
    }
    n
}

#[test]
fn format() {
    assert!(replay("format", harness::format::run) >= 3);
}

#[test]
fn open_replay() {
    assert!(replay("open_replay", harness::open_replay::run) >= 5);
}

#[test]
fn repair() {
    assert!(replay("repair", harness::repair::run) >= 5);
}

#[test]
fn request() {
    assert!(replay("request", harness::request::run) >= 5);
}

#[test]
fn vhost_user() {
    assert!(replay("vhost_user", harness::vhost_user::run) >= 5);
}

#[test]
fn seeds_match_their_generator() {
    for (target, name, bytes) in harness::seeds::all() {
        let path = fuzz_dir().join("seeds").join(target).join(name);
        let committed = std::fs::read(&path).unwrap_or_default();
        assert!(
            committed == bytes,
            "{} differs from fuzz/harness/seeds.rs; regenerate with \
             `cargo test --test fuzz_regressions -- --ignored write_seeds`",
            path.display()
        );
    }
}

/// Writes fuzz/seeds/ from fuzz/harness/seeds.rs.
#[test]
#[ignore = "writes the seed corpus into the source tree"]
fn write_seeds() {
    let root = fuzz_dir().join("seeds");
    for (target, name, bytes) in harness::seeds::all() {
        std::fs::create_dir_all(root.join(target)).unwrap();
        std::fs::write(root.join(target).join(name), bytes).unwrap();
    }
}
