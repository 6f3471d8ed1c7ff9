#!/usr/bin/env bash
# The whole test suite: host packages, unit/integration tests (engine, simulator, CLI, server
# with the libblkio client and the vhost-user protocol), then the VM tests with a real QEMU guest.
set -euo pipefail
cd "$(dirname "$0")/.."

bash integration/setup-host.sh
cargo test --all-targets -- --test-threads=2
if [ -x integration/run-tests.sh ] || [ -f integration/run-tests.sh ]; then
    bash integration/run-tests.sh
fi
