#!/usr/bin/env bash
# The demo: installs the host packages, builds fvd, creates integration/.cache/demo.fvd (4G,
# compact) if missing, serves it with `fvd serve` and boots a QEMU (TCG) guest on it that shows the
# disk and writes/reads a block. On a terminal you then get a busybox shell in the guest ('exit'
# or ^A x leaves); without a terminal (CI) it runs the smoke test and powers off.
#
# Usage: integration/demo.sh [--queues N]
# Environment: FVD_BIN=PATH uses that fvd instead of building one; FVD_INTEGRATION_BACKEND=qsd
# serves a raw demo.img with qemu-storage-daemon instead.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(dirname "$here")
cache=$here/.cache
backend=${FVD_INTEGRATION_BACKEND:-fvd}
queues=2
if [ "${1:-}" = --queues ]; then queues=${2:?}; fi
say() { echo "demo: $*" >&2; }

if [ "$(id -u)" = 0 ]; then
    bash "$here/setup-host.sh"
elif ! command -v qemu-system-x86_64 >/dev/null; then
    say "QEMU is missing: run 'sudo integration/setup-host.sh' first"
    exit 2
fi
mkdir -p "$cache/logs"
say "building the guest (cached after the first run)"
FVD_GUEST_DIR=$("$here/build-guest.sh")
export FVD_GUEST_DIR

# A short path: a unix socket path has at most 107 bytes.
sockdir=$(mktemp -d /tmp/fvd-demo.XXXXXX)
sock=$sockdir/demo.sock
server=
cleanup() {
    if [ -n "$server" ]; then
        kill -TERM "$server" 2>/dev/null || true
        wait "$server" 2>/dev/null || true
    fi
    rm -rf "$sockdir"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

if [ "$backend" = qsd ]; then
    img=$cache/demo.img
    [ -f "$img" ] || truncate -s 4G "$img"
    qemu-storage-daemon \
        --blockdev "driver=file,node-name=f,filename=$img,cache.direct=on,aio=native,discard=unmap" \
        --export "type=vhost-user-blk,id=e,node-name=f,addr.type=unix,addr.path=$sock,writable=on,num-queues=$queues" \
        >"$cache/logs/demo-server.log" 2>&1 &
    server=$!
else
    fvd=${FVD_BIN:-}
    if [ -z "$fvd" ]; then
        say "cargo build --release"
        (cd "$repo" && cargo build --release --quiet)
        fvd=${CARGO_TARGET_DIR:-$repo/target}/release/fvd
    fi
    img=$cache/demo.fvd
    if [ ! -f "$img" ]; then
        "$fvd" create "$img" --size 4G --compact
    fi
    "$fvd" serve "$img" -f fvd --socket "$sock" --num-queues "$queues" >"$cache/logs/demo-server.log" 2>&1 &
    server=$!
fi
for _ in $(seq 1 300); do
    [ -S "$sock" ] && break
    kill -0 "$server" 2>/dev/null || break
    sleep 0.1
done
if [ ! -S "$sock" ]; then
    say "the server did not start:"
    cat "$cache/logs/demo-server.log" >&2
    exit 1
fi
say "serving $img on $sock ($backend, $queues queues); server output:"
sed 's/^/  /' "$cache/logs/demo-server.log" >&2

if [ -t 0 ] && [ -t 1 ]; then
    say "booting the guest (about 10 s under TCG); in the guest shell, 'exit' powers it off"
    "$here/run-vm.sh" --test demo --socket "$sock" --queues "$queues" --shell
else
    say "no terminal: running the smoke test only"
    rc=0
    "$here/run-vm.sh" --test demo --socket "$sock" --queues "$queues" --log "$cache/logs/demo.log" || rc=$?
    tr -d '\r' <"$cache/logs/demo.log" | sed -n '/^=== /,/^FVD-TEST-/p' | grep -v '^\[ *[0-9.]*\]' >&2 || true
    exit "$rc"
fi
