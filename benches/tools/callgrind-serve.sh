#!/bin/bash
# Instructions per request of `fvd serve`, counted by callgrind (deterministic, unlike timings):
# runs one peers-harness workload on tmpfs with the server under valgrind, then divides the
# server's instructions (start-up included) by its requests (one Worker::spawn each) and counts
# its heap allocations.
#
#   benches/tools/callgrind-serve.sh [FVD_BINARY] [WORKLOAD]     (defaults: target/release/fvd,
#                                                                  randread-4k-qd32)
# Leaves callgrind.PID and the annotations in $CG_DIR (default /tmp/fvd-callgrind) for
# `callgrind_annotate --inclusive=yes` or kcachegrind.
set -euo pipefail
cd "$(dirname "$0")/../.."
bin=$(realpath "${1:-target/release/fvd}")
w=${2:-randread-4k-qd32}
out=${CG_DIR:-/tmp/fvd-callgrind}
command -v valgrind >/dev/null || { echo "valgrind is not installed" >&2; exit 2; }
rm -rf "$out" && mkdir -p "$out"
wrapper=$out/fvd
cat >"$wrapper" <<WRAP
#!/bin/sh
if [ "\$1" = serve ] && [ "\$2" != --help ]; then
  # No seccomp filters: valgrind's own system calls are not on their lists.
  exec valgrind --tool=callgrind --callgrind-out-file=$out/callgrind.%p -q "$bin" "\$@" --seccomp off
fi
exec "$bin" "\$@"
WRAP
chmod +x "$wrapper"
FVD_BIN=$wrapper cargo bench --bench peers -- --quick --reps 1 --storage tmpfs --only "$w" \
    --targets fvd --no-probes >"$out/harness.txt" 2>&1
f=$(ls "$out"/callgrind.* | head -1)
callgrind_annotate --inclusive=yes "$f" >"$out/inclusive.txt" 2>/dev/null
callgrind_annotate --tree=calling "$f" >"$out/calling.txt" 2>/dev/null
total=$(awk '/PROGRAM TOTALS/ {gsub(",", "", $1); print $1}' "$out/inclusive.txt")
count() { # calls of functions matching $1, summed over their callers
    grep -E ">   .*$1 \(" "$out/calling.txt" | grep -o '([0-9,]*x)' | tr -dc '0-9\n' |
        paste -sd+ | bc
}
# One Worker::spawn a request (Executor::spawn may be inlined, e.g. with codegen-units=1).
requests=$(count 'Worker::spawn')
allocs=$(count ':malloc')
echo "$w, $(basename "$bin"): $total instructions, $requests requests:" \
    "$((total / requests)) instructions and $(echo "scale=2; $allocs / $requests" | bc)" \
    "allocations per request"
