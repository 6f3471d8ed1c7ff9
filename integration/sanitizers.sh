#!/usr/bin/env bash
# Sanitizer runs (nightly -Zsanitizer), each in its own target dir so the normal build stays.
#   sanitizers.sh [address]  AddressSanitizer + LeakSanitizer over the lib unit tests, the engine
#                            tests and the power-loss simulator: the code that owns the DMA
#                            buffers (src/io/buf.rs), the executor and the engine's shared state.
#                            CI runs this.
#   sanitizers.sh thread     ThreadSanitizer over the lib unit tests (executor, worker queue,
#                            request parsing). Opt-in: std must be rebuilt with it (-Zbuild-std,
#                            the rust-src component), which costs as much as the ASan run.
set -euo pipefail
cd "$(dirname "$0")/.."

kind=${1:-address}
if ! rustup run nightly rustc --version >/dev/null 2>&1; then
    rustup toolchain install nightly --profile minimal
fi
# Sanitize our code only: with an explicit --target, build scripts and proc macros stay plain.
target=x86_64-unknown-linux-gnu
base="${CARGO_TARGET_DIR:-$(pwd)/target}"
case "$kind" in
address)
    export CARGO_TARGET_DIR="$base/asan"
    export RUSTFLAGS="-Zsanitizer=address"
    export ASAN_OPTIONS="detect_leaks=1"
    cargo +nightly test --target "$target" --lib --test engine --test sim_engine
    ;;
thread)
    if ! rustup component list --toolchain nightly --installed | grep '^rust-src' >/dev/null; then
        rustup component add rust-src --toolchain nightly
    fi
    export CARGO_TARGET_DIR="$base/tsan"
    export RUSTFLAGS="-Zsanitizer=thread"
    cargo +nightly test -Zbuild-std --target "$target" --lib
    ;;
*)
    echo "usage: $0 [address|thread]" >&2
    exit 2
    ;;
esac
