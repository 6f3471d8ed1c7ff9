#!/usr/bin/env bash
# VM-level test suite: serves images with `fvd serve` (vhost-user-blk) and boots QEMU TCG guests
# (integration/run-vm.sh) that run the guest tests in integration/guest/tests/. Ends with the line
# "N passed, N failed" and exits non-zero if anything failed.
#
# Usage: integration/run-tests.sh [CASE...]      (default: every case; --list shows them)
# Environment:
#   FVD_INTEGRATION_BACKEND=fvd|qsd  backend to test (default fvd). qsd = qemu-storage-daemon on raw
#                                    or qcow2 images: checks the harness and the guest themselves.
#   FVD_BIN=PATH                     use this fvd binary instead of `cargo build --release`
#   FVD_BIN_OLD=PATH                 the other build the restart cases start with and upgrade
#                                    from (default: the tree built with the other cargo profile
#                                    than FVD_BIN's: dev, or release when FVD_BIN is the dev build)
#   FVD_RESTART_SEED=N               the restart cases' kill schedule (default: from the clock;
#                                    the log prints the seed used)
#   FVD_RESTART_STRESS=1             restart-load with 30 restarts 2..5 s apart, 150 s of writes
#   FVD_KEEP=1                       keep the run directory (images) for inspection
# Logs: integration/.cache/logs/ (one console log per VM, one log per server start).
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(dirname "$here")
backend=${FVD_INTEGRATION_BACKEND:-fvd}
logs=$here/.cache/logs
all_cases=(config fio-verify fio-flush trim reboot fs-restart fs-kill wt-kill wb-kill crash readonly base fio-nocompact
    qmp metrics throttle resize restart-load restart-fs)

case "$backend" in fvd | qsd) ;; *) echo "FVD_INTEGRATION_BACKEND must be fvd or qsd" >&2; exit 2 ;; esac
if [ "${1:-}" = --list ]; then printf '%s\n' "${all_cases[@]}"; exit 0; fi
cases=("$@")
[ ${#cases[@]} -gt 0 ] || cases=("${all_cases[@]}")
for c in "${cases[@]}"; do
    case " ${all_cases[*]} " in *" $c "*) ;; *) echo "unknown case $c (--list)" >&2; exit 2 ;; esac
done

say() { echo "run-tests: $*" >&2; }

# --- processes we own; the trap ends each of them by its pid ---
declare -A server_pid=() server_sock=() server_img=()
# Extra `fvd serve` arguments for the next start_server (the qmp case's --control).
serve_extra=()
vm_pid=
run='' sockets=''
cleanup() {
    local name pid
    if [ -n "$vm_pid" ]; then
        kill -TERM "$vm_pid" 2>/dev/null || true
        wait "$vm_pid" 2>/dev/null || true
    fi
    for name in "${!server_pid[@]}"; do
        pid=${server_pid[$name]}
        kill -TERM "$pid" 2>/dev/null || true
        for _ in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        kill -KILL "$pid" 2>/dev/null || true
        wait "$pid" 2>/dev/null || true
        rm -f "${server_sock[$name]}"
    done
    server_pid=()
    [ -z "$sockets" ] || rm -rf "$sockets"
    if [ -n "$run" ] && [ -d "$run" ]; then
        if [ "${FVD_KEEP:-0}" = 1 ]; then say "kept $run"; else rm -rf "$run"; fi
    fi
}
trap cleanup EXIT
trap 'echo run-tests: interrupted >&2; cleanup; exit 130' INT TERM

# --- setup ---
command -v qemu-system-x86_64 >/dev/null || { say "QEMU missing: run integration/setup-host.sh as root"; exit 2; }
FVD_GUEST_DIR=$("$here/build-guest.sh")
export FVD_GUEST_DIR
if [ "$backend" = fvd ]; then
    if [ -z "${FVD_BIN:-}" ]; then
        say "cargo build --release"
        (cd "$repo" && cargo build --release --quiet)
        FVD_BIN=${CARGO_TARGET_DIR:-$repo/target}/release/fvd
    fi
    [ -x "$FVD_BIN" ] || { say "no fvd binary at $FVD_BIN"; exit 2; }
    if [[ " ${cases[*]} " == *" restart-"* ]] && [ -z "${FVD_BIN_OLD:-}" ]; then
        # The restart cases upgrade from another build of the same tree: the dev profile, or the
        # release profile when FVD_BIN is the dev build (as in test-all.sh).
        target=${CARGO_TARGET_DIR:-$repo/target}
        if [ "$(realpath "$FVD_BIN")" = "$(realpath -m "$target/debug/fvd")" ]; then
            say "cargo build --release (the other build for the restart cases)"
            (cd "$repo" && cargo build --release --quiet)
            FVD_BIN_OLD=$target/release/fvd
        else
            say "cargo build (the other build for the restart cases)"
            (cd "$repo" && cargo build --quiet)
            FVD_BIN_OLD=$target/debug/fvd
        fi
    fi
    if [[ " ${cases[*]} " == *" restart-"* ]]; then
        [ -x "$FVD_BIN_OLD" ] || { say "no fvd binary at $FVD_BIN_OLD"; exit 2; }
        cmp -s "$FVD_BIN" "$FVD_BIN_OLD" && { say "FVD_BIN_OLD is the same build as FVD_BIN"; exit 2; }
    fi
else
    command -v qemu-storage-daemon >/dev/null || { say "qemu-storage-daemon missing"; exit 2; }
fi
mkdir -p "$logs" "$here/.cache"
rm -f "$logs"/*.log
# Images on the disk the project lives on (the server opens them with O_DIRECT, which tmpfs
# refuses); sockets in a short directory (a unix socket path has at most 107 bytes).
run=$(mktemp -d "$here/.cache/run.XXXXXX")
sockets=$(mktemp -d /tmp/fvd-it.XXXXXX)

# create_image NAME SIZE [nocompact|base=FILE]: prints the image path. fvd images are compact
# (thin) unless nocompact; the qsd backend uses raw files (qcow2 over a raw base).
create_image() {
    local img=$run/$1.img
    if [ "$backend" = fvd ]; then
        local extra=()
        case "${3:-}" in
        nocompact) extra=(--no-compact) ;;
        base=*) extra=(--base "${3#base=}" --base-format raw --copy-on-read --prefetch) ;;
        esac
        "$FVD_BIN" create "$img" --size "$2" "${extra[@]}" >"$logs/create-$1.log" 2>&1 ||
            { cat "$logs/create-$1.log" >&2; return 1; }
    else
        case "${3:-}" in
        base=*) qemu-img create -q -f qcow2 -b "${3#base=}" -F raw "$img" "$2" ;;
        *) truncate -s "$2" "$img" ;;
        esac
    fi
    echo "$img"
}

# I/O limits for the next start_server, as QEMU names them: "bps-read=N iops-write=N ...".
server_limits=""
# start_server NAME IMAGE QUEUES [readonly]: serves IMAGE on $sockets/NAME.sock until stop_server.
start_server() {
    local name=$1 img=$2 queues=$3 ro=${4:-} sock=$sockets/$1.sock log=$logs/server-$1.log pid l
    rm -f "$sock"
    if [ "$backend" = fvd ]; then
        local extra=(--num-queues "$queues" --serial "fvd-$name" "${serve_extra[@]}")
        [ "$ro" = readonly ] && extra+=(--readonly)
        for l in $server_limits; do extra+=("--${l%%=*}" "${l#*=}"); done
        "$FVD_BIN" serve "$img" --socket "$sock" "${extra[@]}" >>"$log" 2>&1 &
    else
        local fmt=raw file_ro="" writable=on
        [ "$(od -An -tx1 -N4 "$img" | tr -d ' ')" = 514649fb ] && fmt=qcow2
        [ "$ro" = readonly ] && file_ro=,read-only=on && writable=off
        local node=file0 blockdevs=(--blockdev
            "driver=file,node-name=file0,filename=$img,cache.direct=on,aio=native,discard=unmap$file_ro")
        if [ "$fmt" = qcow2 ]; then
            blockdevs+=(--blockdev "driver=qcow2,node-name=fmt0,file=file0,discard=unmap$file_ro")
            node=fmt0
        fi
        if [ -n "$server_limits" ]; then
            local tg=throttle-group,id=tg0
            for l in $server_limits; do tg+=",x-$l"; done
            blockdevs=(--object "$tg" "${blockdevs[@]}"
                --blockdev "driver=throttle,node-name=thr0,throttle-group=tg0,file=$node")
            node=thr0
        fi
        qemu-storage-daemon "${blockdevs[@]}" --export \
            "type=vhost-user-blk,id=e0,node-name=$node,addr.type=unix,addr.path=$sock,writable=$writable,num-queues=$queues" \
            >>"$log" 2>&1 &
    fi
    pid=$!
    server_pid[$name]=$pid
    server_sock[$name]=$sock
    server_img[$name]=$img
    for _ in $(seq 1 300); do
        [ -S "$sock" ] && return 0
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.1
    done
    say "server $name did not come up (log $log):"
    tail -n 20 "$log" >&2
    return 1
}

# stop_server NAME [KILL]: SIGTERM (must exit 0 within 30 s, leaving an image that checks clean)
# or SIGKILL (a crash).
stop_server() {
    local name=$1 sig=${2:-TERM} pid=${server_pid[$1]} rc=0 st=0 hung=0
    # Bash reports a job killed by a signal whenever it reaps it; this block's stderr hides that.
    {
        kill "-$sig" "$pid"
        for _ in $(seq 1 300); do kill -0 "$pid" || break; sleep 0.1; done
        if kill -0 "$pid"; then
            hung=1
            kill -KILL "$pid"
        fi
        wait "$pid" || st=$?
    } 2>/dev/null
    if [ "$hung" = 1 ]; then
        say "server $name still running 30 s after SIG$sig: killed it"
        rc=1
    elif [ "$sig" = TERM ] && [ "$st" != 0 ]; then
        say "server $name exited with status $st after SIGTERM (log $logs/server-$name.log)"
        rc=1
    fi
    unset "server_pid[$name]"
    rm -f "${server_sock[$name]}"
    if [ "$sig" = TERM ] && [ "$rc" = 0 ]; then
        check_image "${server_img[$name]}" || rc=1
    fi
    return "$rc"
}

# check_image IMAGE [crashed]: the host's own consistency check of an image no server has open.
# Unless crashed, the fvd server was stopped by SIGTERM and must have marked the image clean.
check_image() {
    local out st=0
    if [ "$backend" = fvd ]; then
        out=$("$FVD_BIN" check --output json "$1" 2>&1) || st=$?
        # Exit 3 is leaks only: chunks mapped by a crash before any of their blocks was written.
        if [ "$st" = 3 ] && [ "${2:-}" = crashed ]; then st=0; fi
        if [ "$st" = 0 ] && [ "${2:-}" != crashed ] && ! grep -q '"clean_shutdown": true' <<<"$out"; then
            say "$1 is not marked clean after SIGTERM"
            st=clean
        fi
    elif [ "$(od -An -tx1 -N4 "$1" | tr -d ' ')" = 514649fb ]; then
        out=$(qemu-img check -q "$1" 2>&1) || st=$?
    fi
    if [ "$st" != 0 ]; then
        say "image check of $1 failed (exit $st):"
        printf '%s\n' "$out" | head -n 20 >&2
        return 1
    fi
}

# vm [--reboot] TEST SERVER QUEUES [KEY=VALUE...]: one guest test against a running server.
vm() {
    local a args=() rc=0
    if [ "$1" = --reboot ]; then
        args+=(--reboot --timeout 200)
        shift
    fi
    local test=$1 name=$2 queues=$3
    shift 3
    for a in "$@"; do args+=(--arg "$a"); done
    "$here/run-vm.sh" --test "$test" --socket "${server_sock[$name]}" --queues "$queues" \
        --log "$logs/$current-$test.log" "${args[@]}" &
    vm_pid=$!
    wait "$vm_pid" || rc=$?
    vm_pid=
    if [ "$rc" != 0 ]; then
        say "server log: $logs/server-$name.log"
    fi
    return "$rc"
}

wc_mode() { if [ "$backend" = fvd ]; then echo back; else echo through; fi; }
# The I/O sizes fvd announces for an image with the default 64 KiB blocks (README.md, "What the
# guest sees"); qemu-storage-daemon announces its own, not checked.
topology() { if [ "$backend" = fvd ]; then echo minio=4096 optio=65536; fi; }

# More `fvd serve` options for the next start_server (fvd backend only).
serve_extra=()

# --- cases: each returns non-zero on failure. They run in this shell (servers outlive a case and
# the trap must see them), so every step checks its own status: `set -e` is off inside `if`. ---
G=1073741824
case_config() {
    local img serial=()
    img=$(create_image config 1G) || return 1
    start_server config "$img" 2 || return 1
    [ "$backend" = fvd ] && serial=(serial=fvd-config)
    # shellcheck disable=SC2046 # topology: zero or more words
    vm config config 2 size=$G queues=2 "wc=$(wc_mode)" discard=1 ro=0 "${serial[@]}" $(topology) ||
        return 1
    stop_server config
}
# One server for the next four cases: every VM after the first reconnects to it.
shared_server() {
    local img
    [ -n "${server_pid[shared]:-}" ] && return 0
    img=$(create_image shared 1G) || return 1
    start_server shared "$img" 2
}
case_fio_verify() { shared_server && vm fio-verify shared 2 size_mb=64; }
case_fio_flush() {
    local wb=()
    [ "$backend" = qsd ] && wb=(force_wb=1)
    shared_server && vm fio-flush shared 2 size_mb=4 "${wb[@]}"
}
case_trim() { shared_server && vm trim shared 2; }
case_reboot() {
    # The guest reboots inside one QEMU: the backend sees a device reset on a live connection.
    shared_server && vm --reboot reboot shared 2
}
fs_image='' fs_sum=''
fs_case() { # SIGNAL [compact]: fs-write, restart the server after SIGNAL, fs-check
    local img sum
    img=$(create_image "$current" 1G "$2") || return 1
    start_server "$current" "$img" 1 || return 1
    vm fs-write "$current" 1 || return 1
    sum=$(tr -d '\r' <"$logs/$current-fs-write.log" |
        sed -n 's/^FVD-MANIFEST \([0-9a-f]\{64\}\)$/\1/p' | tail -n1)
    [ -n "$sum" ] || { say "no FVD-MANIFEST line in the fs-write log"; return 1; }
    stop_server "$current" "$1" || return 1
    start_server "$current" "$img" 1 || return 1
    vm fs-check "$current" 1 "manifest=$sum" || return 1
    stop_server "$current" || return 1
    fs_image=$img fs_sum=$sum
}
case_fs_restart() { fs_case TERM nocompact; }
case_fs_kill() { fs_case KILL ""; }
case_wt_kill() {
    # Write-through: the guest never sends FLUSH, so every write the server completed must survive
    # a SIGKILL right after (the metadata too: a compact image allocates on these writes).
    local img wt=(cache=through)
    [ "$backend" = qsd ] && wt=() # qsd is write-through already and refuses the switch
    img=$(create_image wt-kill 1G) || return 1
    start_server wt-kill "$img" 1 || return 1
    vm raw-write wt-kill 1 "${wt[@]}" || return 1
    stop_server wt-kill KILL || return 1
    start_server wt-kill "$img" 1 || return 1
    vm raw-verify wt-kill 1 || return 1
    stop_server wt-kill
}
case_wb_kill() {
    # Write-back, and still no FLUSH: fio's direct writes complete, then, with the guest still
    # connected (a disconnect flushes), the server is SIGKILLed with the host up, and every
    # completed write must read back (the process-crash contract, docs/FORMAT.md). A compact
    # image allocates on these writes, so their metadata is at stake.
    local img log=$logs/$current-raw-write.log held=0 wb=(--arg cache=back)
    [ "$backend" = qsd ] && wb=() # qsd is write-through and refuses the switch (see wt-kill)
    img=$(create_image wb-kill 1G) || return 1
    start_server wb-kill "$img" 1 || return 1
    rm -f "$log"
    "$here/run-vm.sh" --test raw-write --socket "${server_sock[wb-kill]}" --log "$log" \
        "${wb[@]}" --arg hold=1 2>/dev/null &
    vm_pid=$!
    # A synchronisation point, not a timing assertion: the guest has written and verified.
    for _ in $(seq 1 3000); do
        if tr -d '\r' 2>/dev/null <"$log" | grep -q '^FVD-HOLD$'; then held=1; break; fi
        kill -0 "$vm_pid" 2>/dev/null || break
        sleep 0.1
    done
    stop_server wb-kill KILL
    kill -TERM "$vm_pid" 2>/dev/null
    wait "$vm_pid" 2>/dev/null
    vm_pid=
    [ "$held" = 1 ] || { say "raw-write did not finish (log $log)"; return 1; }
    tr -d '\r' <"$log" | grep -q ", 0 flushes" ||
        { say "the guest sent FLUSHes: this case would not test unflushed writes"; return 1; }
    check_image "$img" crashed || return 1
    start_server wb-kill "$img" 1 || return 1
    vm raw-verify wb-kill 1 || return 1
    stop_server wb-kill
}
case_crash() {
    # The server is SIGKILLed while the guest writes and fsyncs files (fs-stress). The image must
    # check without problems; after a restart, every file the guest had recorded as fsync'ed must be
    # intact and the filesystem clean once its journal is replayed (fs-recover).
    local img log=$logs/$current-fs-stress.log progress=0
    img=$(create_image crash 1G) || return 1
    start_server crash "$img" 1 || return 1
    # Judged by the markers in its log, not by its status: this VM is killed on purpose.
    rm -f "$log"
    "$here/run-vm.sh" --test fs-stress --socket "${server_sock[crash]}" --log "$log" 2>/dev/null &
    vm_pid=$!
    # A synchronisation point, not a timing assertion: wait until 30 files are durable.
    for _ in $(seq 1 3000); do
        progress=$(tr -d '\r' 2>/dev/null <"$log" | sed -n 's/^FVD-PROGRESS \([0-9]*\)$/\1/p' | tail -n1)
        [ "${progress:-0}" -ge 30 ] && break
        kill -0 "$vm_pid" 2>/dev/null || break
        sleep 0.1
    done
    stop_server crash KILL
    kill -TERM "$vm_pid" 2>/dev/null
    wait "$vm_pid" 2>/dev/null
    vm_pid=
    [ "${progress:-0}" -ge 30 ] || { say "fs-stress did not get going (log $log)"; return 1; }
    say "server killed after the guest reported $progress durable files"
    check_image "$img" crashed || return 1
    start_server crash "$img" 1 || return 1
    vm fs-recover crash 1 "min=$progress" || return 1
    stop_server crash
}
case_readonly() {
    # Serves the filesystem fs-restart left (making one if that case did not run) read-only: the
    # guest sees a read-only disk, its write fails, and the filesystem still checks clean.
    if [ -z "$fs_image" ]; then
        current=fs-restart fs_case TERM nocompact || return 1
    fi
    start_server readonly "$fs_image" 1 readonly || return 1
    # shellcheck disable=SC2046 # topology: zero or more words
    vm config readonly 1 size=$G queues=1 "wc=$(wc_mode)" discard=any ro=1 $(topology) || return 1
    vm fs-check readonly 1 "manifest=$fs_sum" || return 1
    stop_server readonly
}
case_base() {
    # A 192 MiB raw base under a 1 GiB overlay (fvd: copy-on-read and prefetch on). The guest reads
    # the first 128 MiB through the overlay and overwrites parts of 96..192 MiB; the base file must
    # not change. Then the base is streamed into the overlay and detached (fvd stream --drop-base;
    # qsd: qemu-img rebase -b ''), the base file is moved away, and a new VM must read the same data.
    local base=$run/base.raw img before after sum mb=128 total=192
    head -c $((total * 1048576)) /dev/urandom >"$base"
    before=$(head -c $((mb * 1048576)) "$base" | sha256sum | cut -d' ' -f1)
    img=$(create_image base 1G "base=$base") || return 1
    start_server base "$img" 1 || return 1
    vm base base 1 base_mb=$mb total_mb=$total "base_sum=$before" || return 1
    stop_server base || return 1
    sum=$(tr -d '\r' <"$logs/$current-base.log" | sed -n 's/^FVD-DATA \([0-9a-f]\{64\}\)$/\1/p' | tail -n1)
    [ -n "$sum" ] || { say "no FVD-DATA line in the base log"; return 1; }
    after=$(head -c $((mb * 1048576)) "$base" | sha256sum | cut -d' ' -f1)
    [ "$before" = "$after" ] || { say "the base image changed"; return 1; }
    if [ "$backend" = fvd ]; then
        "$FVD_BIN" stream -q --drop-base "$img" >"$logs/stream-base.log" 2>&1 ||
            { say "fvd stream --drop-base failed:"; cat "$logs/stream-base.log" >&2; return 1; }
    else
        qemu-img rebase -q -f qcow2 -b '' "$img" || return 1
    fi
    mv "$base" "$base.gone"
    check_image "$img" || return 1
    start_server base "$img" 1 || return 1
    vm sha base 1 mb=$total "sum=$sum" || return 1
    stop_server base
}
case_fio_nocompact() {
    local img
    img=$(create_image nocompact 1G nocompact) || return 1
    start_server nocompact "$img" 1 || return 1
    vm fio-verify nocompact 1 size_mb=64 || return 1
    stop_server nocompact
}

# restart_case TEST KILLS TERMS DELAY TIMEOUT [KEY=VALUE...]: the guest test runs while
# chaos.sh SIGKILLs the backend KILLS times and SIGTERMs it TERMS times (seeded order, DELAY
# seconds apart, e.g. 3-7), restarting it each time, once into another build; QEMU reconnects
# (reconnect-ms=1000). fvd gets the socket from systemd-socket-activate when it is installed, as
# fvd@.socket would pass it. Passes when the guest test passes, the guest never stalls for 60 s,
# every planned restart happened and every SIGTERM exited 0, and the image checks clean after
# the final SIGTERM.
# metrics: fio in a guest on two queues, then the metrics endpoint (a unix socket) must show
# the guest's writes and their verify reads on both queues, every completed request in its
# latency histogram, no error, nothing in flight, and pass promtool.
case_metrics() {
    if [ "$backend" != fvd ]; then
        say "metrics: fvd only, nothing to do for $backend"
        return 0
    fi
    local img msock=$sockets/metrics.prom scrape=$logs/metrics-scrape.txt
    img=$(create_image metrics 1G) || return 1
    serve_extra=(--metrics "$msock")
    start_server metrics "$img" 2 || { serve_extra=(); return 1; }
    serve_extra=()
    vm fio-verify metrics 2 size_mb=32 jobs=2 || return 1
    curl -sf --unix-socket "$msock" http://fvd/metrics >"$scrape" ||
        { say "metrics: the scrape failed"; return 1; }
    # Sums over queues (and kinds where none is given) of a metric's samples matching RE.
    sum() { awk -v m="$1" -v re="$2" '$1 ~ "^" m "[{]" && $1 ~ re { s += $2 } END { printf "%d", s }' "$scrape"; }
    local w r wb q0 q1 hist reqs errs inflight
    w=$(sum fvd_requests_total 'op="write"')
    wb=$(sum fvd_request_bytes_total 'op="write"')
    r=$(sum fvd_requests_total 'op="read"')
    q0=$(sum fvd_requests_total 'queue="0",op="write"')
    q1=$(sum fvd_requests_total 'queue="1",op="write"')
    reqs=$(sum fvd_requests_total '')
    errs=$(sum fvd_request_errors_total '')
    hist=$(sum fvd_request_duration_seconds_count '')
    inflight=$(sum fvd_requests_in_flight '')
    say "metrics: $w writes ($wb bytes: q0 $q0, q1 $q1 requests), $r reads, $reqs requests, $errs errors, histogram count $hist, in flight $inflight"
    # Two jobs of 32 MiB of writes, each read back by fio's verify pass.
    [ "$wb" -ge $((64 << 20)) ] && [ "$q0" -gt 0 ] && [ "$q1" -gt 0 ] && [ "$r" -gt 0 ] &&
        [ "$errs" = 0 ] && [ "$hist" = "$reqs" ] && [ "$inflight" = 0 ] ||
        { say "metrics: unexpected figures (scrape in $scrape)"; return 1; }
    if command -v promtool >/dev/null; then
        promtool check metrics <"$scrape" || { say "metrics: promtool check failed"; return 1; }
    fi
    stop_server metrics
}

# hang_report CHAOS_PID METRICS_SOCKET QMP_SOCKET FILE VHOST_SOCKET: what a hung guest's I/O is waiting for,
# taken while everything still runs: the server's requests in flight and its threads' stacks,
# QEMU's view of the virtqueues and the rings in guest memory.
hang_report() {
    local chaos=$1 msock=$2 qmp=$3 out=$4 sock=$5 spid='' p
    for p in $(pgrep -P "$chaos"); do
        [ "$(cat "/proc/$p/comm" 2>/dev/null)" = sleep ] || spid=$p
    done
    {
        echo "== $(date +%T.%N): server pid ${spid:-none} (child of chaos.sh $chaos)"
        if [ -n "$backend" ] && [ "$backend" = fvd ] && [ -S "$msock" ]; then
            echo "== server metrics (requests, in flight)"
            curl -sf --max-time 5 --unix-socket "$msock" http://fvd/metrics |
                grep -E '^fvd_(requests_total|requests_in_flight|request_errors_total)' || echo "(scrape failed)"
        fi
        # A signal written but never read (the kick or call eventfd) shows as a count; the same
        # eventfd has the same id in both processes.
        local who pid fd
        for who in server qemu; do
            [ "$who" = server ] && pid=$spid || pid=$(pgrep -f -- "^qemu-system.*path=$sock" | head -n1)
            [ -n "$pid" ] || continue
            echo "== $who (pid $pid) eventfds"
            for fd in /proc/"$pid"/fd/*; do
                [ "$(readlink "$fd" 2>/dev/null)" = "anon_inode:[eventfd]" ] || continue
                echo "fd ${fd##*/}: $(grep -E '^eventfd-(count|id)' "/proc/$pid/fdinfo/${fd##*/}" | tr -s ' \t\n' ' ')"
            done
        done
        echo "== QEMU virtqueues"
        python3 "$here/vm_queues.py" "$qmp"
        if [ -n "$spid" ] && command -v gdb >/dev/null; then
            echo "== server threads"
            timeout 60 gdb -p "$spid" -batch -nx -ex "thread apply all bt" 2>&1 | grep -vE '^\[New LWP|^warning:'
        fi
    } >"$out" 2>&1
    say "$current: hang report in $out:"
    sed -n '1,/^== server threads/p' "$out" | sed 's/^/  | /' >&2
}

restart_case() {
    local test=$1 kills=$2 terms=$3 delay=$4 timeout=$5
    shift 5
    local img sock=$sockets/$current.sock slog=$logs/server-$current.log
    local clog=$logs/chaos-$current.log vlog=$logs/$current-$test.log
    local seed=${FVD_RESTART_SEED:-$(($(date +%s%N) / 1000 % 32768))} a args=() rc=0 st=0
    local old new chaos_pid progress last='' last_t=$SECONDS
    local msock=$sockets/$current-metrics.sock qmp=$sockets/$current-vm.qmp
    img=$(create_image "$current" 1G) || return 1
    say "$current: seed $seed (FVD_RESTART_SEED=$seed repeats the kill schedule)"
    for a in "$@"; do args+=(--arg "$a"); done
    local chaos=("$here/chaos.sh" --seed "$seed" --kill "$kills" --term "$terms" --delay "$delay"
        --log "$slog" --wait-go)
    rm -f "$sock" "$slog"
    if [ "$backend" = fvd ]; then
        # The metrics socket: a hang report reads the requests each server holds; info: connections
        # and resubmitted requests in the log.
        local serve="serve $img -f fvd --num-queues 1 --serial fvd-$current --metrics $msock --log-level info"
        if command -v systemd-socket-activate >/dev/null; then
            # Listens now; execs chaos.sh (same pid) when QEMU first connects.
            systemd-socket-activate -l "$sock" "${chaos[@]}" \
                --old "$FVD_BIN_OLD $serve" --new "$FVD_BIN $serve" >"$clog" 2>&1 &
        else
            say "systemd-socket-activate missing: each server binds the socket itself"
            "${chaos[@]}" --old "$FVD_BIN_OLD $serve --socket $sock" \
                --new "$FVD_BIN $serve --socket $sock" >"$clog" 2>&1 &
        fi
    else
        # qemu-storage-daemon binds the socket itself; there is no other build to upgrade to.
        local qsd="qemu-storage-daemon --blockdev driver=file,node-name=file0,filename=$img,cache.direct=on,aio=native"
        qsd+=" --export type=vhost-user-blk,id=e0,node-name=file0,addr.type=unix,addr.path=$sock,writable=on,num-queues=1"
        "${chaos[@]}" --old "$qsd" --new "$qsd" >"$clog" 2>&1 &
    fi
    chaos_pid=$!
    # Registered like a server, so that the exit trap stops it (it then stops its server).
    server_pid[$current]=$chaos_pid server_sock[$current]=$sock server_img[$current]=$img
    rm -f "$vlog"
    "$here/run-vm.sh" --test "$test" --socket "$sock" --reconnect-ms 1000 --timeout "$timeout" \
        --qmp "$qmp" --log "$vlog" "${args[@]}" &
    vm_pid=$!
    # The kill schedule starts with the guest's workload (its first FVD-PROGRESS line). A guest
    # whose I/O hangs (a request lost across a restart) would sit until the timeout: no new
    # FVD-PROGRESS line for 60 s ends the VM.
    while kill -0 "$vm_pid" 2>/dev/null; do
        progress=$(tr -d '\r' 2>/dev/null <"$vlog" | grep -E '^FVD-PROGRESS ' | tail -n1)
        if [ "$progress" != "$last" ]; then
            # chaos.sh runs by then: QEMU connected before the guest booted.
            [ -n "$last" ] || kill -USR1 "$chaos_pid"
            last=$progress last_t=$SECONDS
        elif [ $((SECONDS - last_t)) -ge 60 ]; then
            say "$current: no guest progress for 60 s (last: ${last:-none}): guest I/O hangs"
            hang_report "$chaos_pid" "$msock" "$qmp" "$logs/hang-$current.txt" "$sock"
            rc=1
            kill -TERM "$vm_pid" 2>/dev/null
            break
        fi
        sleep 1
    done
    wait "$vm_pid" || rc=1
    vm_pid=
    kill -TERM "$chaos_pid" 2>/dev/null
    wait "$chaos_pid" || st=$?
    unset "server_pid[$current]"
    sed -n 's/^chaos: /  chaos: /p' "$clog" | grep -E 'seed|PROBLEM|summary' >&2
    if [ "$st" != 0 ]; then
        say "$current: the restarts went wrong (exit $st; $clog, server log $slog)"
        rc=1
    fi
    check_image "$img" || rc=1
    return "$rc"
}
case_qmp() {
    # The control socket while a QEMU guest runs fio: frontend events, the guest's requests in
    # query-blockstats, then `quit` stops the server as SIGTERM does.
    if [ "$backend" != fvd ]; then
        say "qmp: the control socket is fvd's; nothing to run against $backend"
        return 0
    fi
    local img ctl=$sockets/qmp.qmp ev=$run/qmp-events.jsonl evpid pid st=0 stats
    img=$(create_image qmp 256M) || return 1
    serve_extra=(--control "$ctl")
    start_server qmp "$img" 1 || { serve_extra=(); return 1; }
    serve_extra=()
    for _ in $(seq 1 50); do [ -S "$ctl" ] && break; sleep 0.1; done
    "$FVD_BIN" ctl "$ctl" --events >"$ev" 2>"$ev.err" &
    evpid=$!
    for _ in $(seq 1 100); do grep -q "until interrupted" "$ev.err" && break; sleep 0.1; done
    vm fio-verify qmp 1 size_mb=16 || { kill "$evpid"; return 1; }
    stats=$("$FVD_BIN" ctl "$ctl" query-blockstats) || { kill "$evpid"; return 1; }
    for _ in $(seq 1 100); do grep -q X_FVD_FRONTEND_DISCONNECTED "$ev" && break; sleep 0.1; done
    kill "$evpid"
    wait "$evpid" 2>/dev/null || true
    if ! grep -q X_FVD_FRONTEND_CONNECTED "$ev" || ! grep -q X_FVD_FRONTEND_DISCONNECTED "$ev"; then
        say "qmp: frontend events missing; got: $(cat "$ev")"
        return 1
    fi
    if ! grep -Eq '"wr_operations": [1-9]' <<<"$stats" || ! grep -Eq '"rd_operations": [1-9]' <<<"$stats"; then
        say "qmp: query-blockstats does not count the guest's requests: $stats"
        return 1
    fi
    "$FVD_BIN" ctl "$ctl" quit >/dev/null || return 1
    pid=${server_pid[qmp]}
    for _ in $(seq 1 300); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    wait "$pid" 2>/dev/null || st=$?
    unset "server_pid[qmp]"
    if [ "$st" != 0 ] || [ -e "$ctl" ] || [ -e "${server_sock[qmp]}" ]; then
        say "qmp: after quit the server exited with status $st (sockets left: $(ls "$sockets"))"
        return 1
    fi
    check_image "$img"
}
case_throttle() {
    # Limits set on the server: the guest's writes and reads take at least what they imply.
    local img
    img=$(create_image throttle 256M) || return 1
    server_limits="iops-write=20 bps-read=2097152"
    start_server throttle "$img" 1 || { server_limits=""; return 1; }
    server_limits=""
    vm throttle throttle 1 iops_write=20 bps_read=2097152 || return 1
    stop_server throttle
}
case_resize() {
    # block_resize on the control socket while the guest's fio writes with verify: the guest
    # sees the new size (kernel: "detected capacity change"), the new range reads zeros and
    # takes writes, the size persists across a restart.
    if [ "$backend" != fvd ]; then
        say "resize: block_resize on fvd's control socket; nothing to run against $backend"
        return 0
    fi
    local img ctl=$sockets/resize.qmp vlog=$logs/$current-resize.log new=$((128 << 20)) rc=0
    img=$(create_image resize 64M) || return 1 # default room: 4x
    serve_extra=(--control "$ctl")
    start_server resize "$img" 1 || { serve_extra=(); return 1; }
    serve_extra=()
    rm -f "$vlog"
    "$here/run-vm.sh" --test resize --socket "${server_sock[resize]}" --queues 1 --log "$vlog" \
        --timeout 600 --arg "new_size=$new" &
    vm_pid=$!
    until grep -q "FVD-PROGRESS start" "$vlog" 2>/dev/null; do
        kill -0 "$vm_pid" 2>/dev/null || break
        sleep 0.2
    done
    sleep 3 # fio is writing
    if ! "$FVD_BIN" ctl "$ctl" block_resize "{\"node-name\": \"fvd0\", \"size\": $new}" \
        >"$logs/resize-ctl.log" 2>&1; then
        say "resize: block_resize failed: $(cat "$logs/resize-ctl.log")"
        kill "$vm_pid" 2>/dev/null
    fi
    wait "$vm_pid" || rc=$?
    vm_pid=
    if [ "$rc" != 0 ]; then
        # Which side stopped: requests the server still holds, or none (the guest stopped
        # sending).
        "$FVD_BIN" ctl "$ctl" query-blockstats >"$logs/resize-stats.json" 2>&1
        say "resize: server statistics at the failure in $logs/resize-stats.json; server log: $logs/server-resize.log"
        return 1
    fi
    stop_server resize || return 1
    "$FVD_BIN" info "$img" | grep -q "$new" || { say "resize: the size did not persist"; return 1; }
    start_server resize "$img" 1 || return 1
    vm config resize 1 "size=$new" queues=1 "wc=$(wc_mode)" discard=1 ro=0 $(topology) || return 1
    stop_server resize
}
case_restart_load() {
    # >= 60 s of fio writes (rounds of 128 MiB) under 5 SIGKILLs and 5 SIGTERMs; with
    # FVD_RESTART_STRESS=1, >= 150 s under 15 and 15, 2..5 s apart (to hunt rare failures).
    if [ "${FVD_RESTART_STRESS:-0}" = 1 ]; then
        restart_case fio-restart 15 15 2-5 500 size_mb=128 write_secs=150
    else
        restart_case fio-restart 5 5 3-9 300 size_mb=128 write_secs=60
    fi
}
case_restart_fs() {
    # 40 s of ext4 file writes without sync under 3 SIGKILLs and 3 SIGTERMs.
    restart_case fs-restart 3 3 3-7 240 write_secs=40
}

say "backend $backend; cases: ${cases[*]}"
passed=0 failed=0 failures=()
for current in "${cases[@]}"; do
    t0=$SECONDS
    if "case_${current//-/_}"; then
        say "PASS $current ($((SECONDS - t0))s)"
        passed=$((passed + 1))
    else
        say "FAIL $current ($((SECONDS - t0))s)"
        failed=$((failed + 1))
        failures+=("$current")
    fi
done
if [ -n "${server_pid[shared]:-}" ]; then
    stop_server shared || { failed=$((failed + 1)); failures+=("shared-server-stop"); }
fi
[ "$failed" = 0 ] || say "failed: ${failures[*]} (logs in $logs)"
echo "$passed passed, $failed failed"
[ "$failed" = 0 ]
