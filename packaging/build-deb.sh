#!/usr/bin/env bash
# Builds the Debian package: target/debian/fvd_VERSION-1_ARCH.deb, and fvd-dbgsym_*.ddeb with
# the debug info; prints their paths. The man pages and shell completions are generated from
# the clap definitions into target/assets (examples/gen_docs.rs), with a one-entry Debian
# changelog (the changes themselves are in CHANGELOG.md, installed as the upstream changelog);
# then `cargo deb` makes a release build and packages what the asset list in Cargo.toml names.
# Needs cargo-deb (`cargo install cargo-deb --locked`).
set -euo pipefail
cd "$(dirname "$0")/.."

# cargo-deb reads assets relative to the crate, so target/assets is used even when
# CARGO_TARGET_DIR points elsewhere.
out=target/assets
cargo run -q --example gen_docs -- "$out"

version=$(cargo pkgid | sed 's/.*[#@]//')
maintainer=$(sed -n 's/^maintainer = "\(.*\)"$/\1/p' Cargo.toml)
commit=$(git rev-parse --short HEAD 2>/dev/null || true)
# The commit's date keeps the package reproducible; a tarball build has only the clock.
date=$(git log -1 --format=%aD 2>/dev/null || date -R)
cat >"$out/changelog.Debian" <<CHANGELOG
fvd ($version-1) unstable; urgency=medium

  * Upstream fvd $version${commit:+ (commit $commit)}, packaged with cargo-deb.
    The changes are listed in /usr/share/doc/fvd/changelog.gz.

 -- $maintainer  $date
CHANGELOG

cargo deb "$@"
