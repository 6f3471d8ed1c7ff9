#!/usr/bin/env bash
# The whole test suite: host packages, unit/integration tests (engine, simulator, CLI, server
# with the libblkio client and the vhost-user protocol), the Debian package (built, linted,
# installed, served from, purged), AddressSanitizer, the fuzz targets for 20 s each, then the VM
# tests with a real QEMU guest (last: its 'N passed, N failed' line ends the run).
set -euo pipefail
cd "$(dirname "$0")/.."

bash integration/setup-host.sh
cargo test --all-targets
bash integration/package.sh
bash integration/sanitizers.sh
bash integration/fuzz.sh 20
# The VM tests use the binary cargo test just built (dev profile, opt-level 1): the guest runs
# under TCG, so a release build would only add compile time. The restart cases build the release
# profile too, as the other build they upgrade between.
FVD_BIN=${CARGO_TARGET_DIR:-$(pwd)/target}/debug/fvd bash integration/run-tests.sh
