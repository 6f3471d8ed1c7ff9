#!/usr/bin/env bash
# Boots the test guest (integration/build-guest.sh) under QEMU TCG with one disk and runs one guest
# test. Succeeds only if the console shows "FVD-TEST-PASS NAME".
#
# Usage: integration/run-vm.sh --test NAME (--socket PATH | --drive FILE) [options]
#   --socket PATH     vhost-user-blk backend listening on PATH (fvd serve, qemu-storage-daemon)
#   --drive FILE      QEMU's own virtio-blk on a raw FILE instead (to check the guest itself)
#   --queues N        num-queues of the vhost-user-blk device (default 1)
#   --reconnect-ms N  reconnect to the socket N ms after the backend went away (restart tests)
#   --smp N           guest CPUs (default: the queue count; the guest uses at most one queue per CPU)
#   --arg KEY=VALUE   passed to the test as $FVD_KEY (repeatable)
#   --log FILE        console log (default integration/.cache/logs/NAME.log)
#   --timeout SECS    kill QEMU after SECS (default 300)
#   --shell           interactive: console on this terminal, shell after the test, no timeout
#   --reboot          let a guest reboot (for tests that reboot once; a panic then reboots too)
#   --qmp PATH        a QMP socket at PATH (run-tests.sh reads the virtqueues through it on a hang)
# Environment: FVD_VM_APPEND=... is added to the kernel command line (e.g. loglevel=7).
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
test='' socket='' drive='' qmp=() queues=1 reconnect='' smp='' log='' timeout=300 shell=0 reboot=(-no-reboot)
args=()
die() { echo "run-vm: $*" >&2; exit 2; }
while [ $# -gt 0 ]; do
    case "$1" in
    --test) test=${2:?}; shift ;;
    --socket) socket=${2:?}; shift ;;
    --drive) drive=${2:?}; shift ;;
    --queues) queues=${2:?}; shift ;;
    --reconnect-ms) reconnect=,reconnect-ms=${2:?}; shift ;;
    --smp) smp=${2:?}; shift ;;
    --arg) args+=("fvd.${2:?}"); shift ;;
    --log) log=${2:?}; shift ;;
    --timeout) timeout=${2:?}; shift ;;
    --shell) shell=1 ;;
    --reboot) reboot=() ;;
    --qmp) qmp=(-qmp "unix:${2:?},server=on,wait=off"); shift ;;
    -h | --help) sed -n '2,/^set -e/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) die "unknown argument $1 (see --help)" ;;
    esac
    shift
done
[ -n "$test" ] || die "--test NAME is required"
[ -n "$socket" ] || [ -n "$drive" ] || die "one of --socket or --drive is required"
[ -z "$socket" ] || [ -z "$drive" ] || die "--socket and --drive exclude each other"
[ -n "$smp" ] || smp=$queues
for a in "${args[@]}"; do
    case "$a" in *[[:space:]]*) die "argument '$a' must not contain spaces" ;; esac
done

# FVD_GUEST_DIR: a guest the caller has just built (saves the cache check, about a second).
guest=${FVD_GUEST_DIR:-$("$here/build-guest.sh")}
log=${log:-$here/.cache/logs/$test.log}
mkdir -p "$(dirname "$log")"

if [ -n "$socket" ]; then
    # The backend may still be starting: QEMU needs the socket to be listening when it starts.
    for _ in $(seq 1 100); do
        [ -S "$socket" ] && break
        sleep 0.1
    done
    [ -S "$socket" ] || die "no vhost-user socket at $socket"
    disk=(-chardev "socket,id=c0,path=$socket$reconnect"
        -device "vhost-user-blk-pci,chardev=c0,num-queues=$queues")
else
    disk=(-drive "file=$drive,if=virtio,format=raw,cache=none,aio=native,discard=unmap")
fi

# quiet: kernel chatter would interleave with the test output; warnings and errors still show.
cmdline="console=ttyS0 panic=-1 quiet fvdtest=$test ${args[*]}"
[ "$shell" = 0 ] || cmdline+=" fvd.shell=1"
[ -z "${FVD_VM_APPEND:-}" ] || cmdline+=" $FVD_VM_APPEND"

# maxcpus of at least 2: TCG then translates the guest for parallel execution (CF_PARALLEL), so a
# guest's locked instruction is a real atomic, full barrier on the host. With maxcpus=1 it is a
# plain load and store, and Linux's virt_mb() (a locked add) orders nothing against the backend,
# a separate process: the guest's EVENT_IDX handshake (write used_event, barrier, re-read the used
# index) can then miss the backend's completions and wait for an interrupt that never comes
# (restart-load hung so, all requests answered; integration/README.md). One vCPU still runs.
maxcpus=$((smp > 2 ? smp : 2))
# vhost-user needs guest RAM the backend can map: a shared memfd backend.
qemu=(qemu-system-x86_64 -accel tcg -cpu max -smp "$smp,maxcpus=$maxcpus" -m 1G
    -object "memory-backend-memfd,id=mem,size=1G,share=on" -numa "node,memdev=mem"
    -kernel "$guest/vmlinuz" -initrd "$guest/initramfs.cpio" -append "$cmdline"
    -nographic -nodefaults -serial mon:stdio "${reboot[@]}" "${qmp[@]}" "${disk[@]}")

if [ "$shell" = 1 ]; then
    exec "${qemu[@]}"
fi

start=$(date +%s.%N)
rc=0
# In the background so that a signal to this script is handled at once: timeout(1) runs QEMU in its
# own process group (a terminal's ^C does not reach it) and passes our TERM on to it.
timeout --kill-after=5 "$timeout" "${qemu[@]}" </dev/null >"$log" 2>&1 &
vm=$!
trap 'kill -TERM "$vm" 2>/dev/null; wait "$vm"; exit 130' INT TERM
wait "$vm" || rc=$?
trap - INT TERM
secs=$(awk -v s="$start" -v e="$(date +%s.%N)" 'BEGIN {printf "%.1f", e - s}')
# Markers are printed on a line of their own; strip the serial console's carriage returns.
marker=$(tr -d '\r' <"$log" | grep -E "^FVD-TEST-(PASS|FAIL) $test( |$)" | tail -n1 || true)
case "$marker" in
FVD-TEST-PASS*)
    echo "run-vm: PASS $test (${secs}s)" >&2
    exit 0
    ;;
FVD-TEST-FAIL*)
    echo "run-vm: FAIL $test (${secs}s): ${marker#FVD-TEST-FAIL "$test"}" >&2
    ;;
*)
    [ "$rc" = 124 ] && why="timed out after ${timeout}s" || why="QEMU exited with status $rc"
    echo "run-vm: FAIL $test (${secs}s): no result marker, $why" >&2
    ;;
esac
echo "run-vm: last console lines ($log):" >&2
tr -d '\r' <"$log" | tail -n 25 | sed 's/^/  | /' >&2
exit 1
