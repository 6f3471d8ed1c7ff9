#!/usr/bin/env bash
# AddressSanitizer (with LeakSanitizer) over the lib unit tests, the engine tests and the
# power-loss simulator: the code that owns the DMA buffers (src/io/buf.rs), the executor and the
# engine's shared state. Nightly only (-Zsanitizer); its own target dir keeps the normal build.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! rustup run nightly rustc --version >/dev/null 2>&1; then
    rustup toolchain install nightly --profile minimal
fi
# Sanitize our code only: with an explicit --target, build scripts and proc macros stay plain.
target=x86_64-unknown-linux-gnu
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$(pwd)/target}/asan"
export RUSTFLAGS="-Zsanitizer=address"
export ASAN_OPTIONS="detect_leaks=1"
cargo +nightly test --target "$target" --lib --test engine --test sim_engine
