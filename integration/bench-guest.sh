#!/usr/bin/env bash
# In-guest comparison: fio inside the QEMU TCG test guest, on
#   fvd    - `fvd serve` (compact FVD image) over vhost-user-blk, and
#   qcow2  - QEMU's own virtio-blk on a qcow2 file (in-process block layer, cache=none, io_uring),
# both images converted from the same fully written raw file. TCG makes absolute numbers
# meaningless (the guest's CPU is emulated), so only fvd ÷ qcow2 ratios are printed.
#
# Usage: integration/bench-guest.sh [--reps N (default 3)] [--secs S per job (default 8)]
#                                   [--size-mb M (default 256)] [--dir DIR (default /var/tmp)]
# Environment: FVD_BIN=PATH uses that fvd binary instead of `cargo build --release`.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(dirname "$here")
reps=3 secs=8 size_mb=256 dir=/var/tmp
while [ $# -gt 0 ]; do
    case "$1" in
    --reps) reps=${2:?}; shift ;;
    --secs) secs=${2:?}; shift ;;
    --size-mb) size_mb=${2:?}; shift ;;
    --dir) dir=${2:?}; shift ;;
    -h | --help) sed -n '2,/^set -e/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) echo "bench-guest: unknown argument $1" >&2; exit 2 ;;
    esac
    shift
done
say() { echo "bench-guest: $*" >&2; }

if [ -z "${FVD_BIN:-}" ]; then
    say "cargo build --release"
    (cd "$repo" && cargo build --release --quiet)
    FVD_BIN=${CARGO_TARGET_DIR:-$repo/target}/release/fvd
fi
guest=$("$here/build-guest.sh")

work=$(mktemp -d "$dir/fvd-bench-guest.XXXXXX")
sockdir=$(mktemp -d /tmp/fvd-bg.XXXXXX)
server=
cleanup() {
    [ -z "$server" ] || kill "$server" 2>/dev/null || true
    rm -rf "$work" "$sockdir"
}
trap cleanup EXIT

# The same bytes in both images: random data, fully written, then converted.
head -c "$((size_mb << 20))" /dev/urandom >"$work/data.raw"
"$FVD_BIN" convert -q "$work/data.raw" "$work/disk.fvd"
qemu-img convert -f raw -O qcow2 "$work/data.raw" "$work/disk.qcow2"
rm -f "$work/data.raw"

# boot TARGET LOG: one VM running the bench guest test on TARGET's disk.
boot() {
    local target=$1 log=$2 disk
    if [ "$target" = fvd ]; then
        local sock=$sockdir/fvd.sock
        "$FVD_BIN" serve "$work/disk.fvd" --socket "$sock" --num-queues 1 >"$work/server.log" 2>&1 &
        server=$!
        for _ in $(seq 1 100); do [ -S "$sock" ] && break; sleep 0.1; done
        disk=(-chardev "socket,id=c0,path=$sock" -device "vhost-user-blk-pci,chardev=c0,num-queues=1")
    else
        disk=(-drive "file=$work/disk.qcow2,if=virtio,format=qcow2,cache=none,aio=io_uring")
    fi
    # Same machine for both: shared memfd RAM (vhost-user needs it; harmless for virtio-blk).
    timeout --kill-after=5 $((secs * 6 + 300)) qemu-system-x86_64 -accel tcg -cpu max -smp 1 -m 1G \
        -object memory-backend-memfd,id=mem,size=1G,share=on -numa node,memdev=mem \
        -kernel "$guest/vmlinuz" -initrd "$guest/initramfs.cpio" \
        -append "console=ttyS0 panic=-1 quiet fvdtest=bench fvd.secs=$secs fvd.size_mb=$size_mb" \
        -nographic -nodefaults -serial mon:stdio -no-reboot "${disk[@]}" </dev/null >"$log" 2>&1 || true
    if [ -n "$server" ]; then
        kill "$server" 2>/dev/null || true
        wait "$server" 2>/dev/null || true
        server=
    fi
    tr -d '\r' <"$log" | grep -q "^FVD-TEST-PASS bench" || {
        say "$target: the guest did not finish (log $log):"
        tr -d '\r' <"$log" | tail -n 15 >&2
        exit 1
    }
}

# Interleaved repetitions; results as "target job iops kib" lines.
results=$work/results
: >"$results"
for rep in $(seq 1 "$reps"); do
    order=(fvd qcow2)
    [ $((rep % 2)) = 0 ] && order=(qcow2 fvd)
    for t in "${order[@]}"; do
        say "rep $rep: $t"
        boot "$t" "$work/$t-$rep.log"
        tr -d '\r' <"$work/$t-$rep.log" | awk -v t="$t" '$1 == "BENCH" {print t, $2, $3, $4}' >>"$results"
    done
done

echo "In-guest fio (QEMU TCG, 1 vCPU), median of $reps boots; ratio = fvd ÷ qcow2 (above 1: fvd faster)."
echo
echo "| job | fvd ÷ qcow2 (IOPS) |"
echo "|---|---|"
# Median IOPS per target and job, then the ratio.
awk '{print $2}' "$results" | awk '!seen[$0]++' | while read -r j; do
    med() { awk -v t="$1" -v j="$j" '$1 == t && $2 == j {print $3}' "$results" | sort -g |
        awk '{v[NR] = $1} END {print (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2}'; }
    f=$(med fvd) q=$(med qcow2)
    awk -v j="$j" -v f="$f" -v q="$q" 'BEGIN {printf "| %s | %.2f |\n", j, (q > 0 ? f / q : 0)}'
done
