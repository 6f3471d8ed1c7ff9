#!/usr/bin/env bash
# Plays the service manager under a running guest: starts the vhost-user backend, then kills it
# at seeded random moments (SIGKILL: a crash; SIGTERM: a stop or `systemctl restart`) and starts
# it again right away, once with another build (an upgrade). Used by run-tests.sh (restart-load,
# restart-fs); the guest reconnects with QEMU's reconnect-ms.
#
# Usage: integration/chaos.sh --seed N --kill N --term N --delay MIN-MAX --log FILE \
#            --old 'CMD ARGS...' --new 'CMD ARGS...'
#   The signals (--kill SIGKILLs and --term SIGTERMs) come in an order shuffled with --seed, each
#   MIN..MAX seconds (whole seconds, seeded) after the server started. Servers use --old until the
#   restart the seed picks for the upgrade, --new from then on. Command words must not contain
#   spaces. After the last restart the server runs until this script gets SIGTERM; then it is
#   stopped with SIGTERM too. With --wait-go the schedule starts only when this script gets
#   SIGUSR1 (run-tests.sh sends it once the guest's workload runs), so no kill is spent on boot.
# Socket: started by `systemd-socket-activate -l PATH integration/chaos.sh ...` (LISTEN_FDS is
# set), every server gets that listening socket as descriptor 3 with LISTEN_PID/LISTEN_FDS, the
# way systemd passes it, and the socket file never goes away. Otherwise the commands bind the
# socket themselves.
# Output: "chaos: ..." lines on stdout, the servers' output in --log. Exit status 0 when every
# planned restart happened, every SIGTERM stop exited 0 within 30 s and no server died on its
# own; 1 otherwise (each problem is a "chaos: PROBLEM ..." line).
set -uo pipefail

seed='' kills=0 terms=0 delay=3-7 log=/dev/null old='' new='' wait_go=0
die() { echo "chaos: $*" >&2; exit 2; }
while [ $# -gt 0 ]; do
    case "$1" in
    --seed) seed=${2:?}; shift ;;
    --kill) kills=${2:?}; shift ;;
    --term) terms=${2:?}; shift ;;
    --delay) delay=${2:?}; shift ;;
    --log) log=${2:?}; shift ;;
    --old) old=${2:?}; shift ;;
    --new) new=${2:?}; shift ;;
    --wait-go) wait_go=1 ;;
    *) die "unknown argument $1" ;;
    esac
    shift
done
[ -n "$seed" ] && [ -n "$old" ] && [ -n "$new" ] || die "--seed, --old and --new are required"
dmin=${delay%-*} dmax=${delay#*-}
read -ra old_cmd <<<"$old"
read -ra new_cmd <<<"$new"

say() { echo "chaos: $*"; }
problems=0
problem() {
    problems=$((problems + 1))
    say "PROBLEM $*"
}

# The plan, all from the seed: the signal order, each delay, the restart that upgrades.
RANDOM=$seed
plan=()
for _ in $(seq 1 "$kills"); do plan+=(KILL); done
for _ in $(seq 1 "$terms"); do plan+=(TERM); done
n=${#plan[@]}
for ((i = n - 1; i > 0; i--)); do
    j=$((RANDOM % (i + 1)))
    t=${plan[i]} && plan[i]=${plan[j]} && plan[j]=$t
done
delays=()
for ((i = 0; i < n; i++)); do delays+=($((dmin + RANDOM % (dmax - dmin + 1)))); done
upgrade_at=$((n > 0 ? 1 + RANDOM % n : 0))
mode=bind
[ -n "${LISTEN_FDS:-}" ] && mode="socket activation (descriptor 3)"
say "seed $seed: $n restarts planned (${plan[*]}), delays ${delays[*]} s, upgrade at restart $upgrade_at; $mode"

stop_requested=0 go=0
trap 'stop_requested=1' TERM INT
trap 'go=1' USR1
# nap SECS: a sleep that a SIGTERM to this script ends at once.
nap() {
    sleep "$1" &
    local p=$!
    wait "$p" 2>/dev/null
    kill "$p" 2>/dev/null
    wait "$p" 2>/dev/null
}

pid='' build=''
start() { # INDEX
    local cmd
    if [ "$1" -gt "$upgrade_at" ] && [ "$upgrade_at" -gt 0 ]; then
        cmd=("${new_cmd[@]}") build=new
    else
        cmd=("${old_cmd[@]}") build=old
    fi
    echo "=== chaos: server $1 ($build build: ${cmd[0]}) at $(date +%T.%N) ===" >>"$log"
    if [ -n "${LISTEN_FDS:-}" ]; then
        (
            export LISTEN_PID=$BASHPID LISTEN_FDS=1
            exec "${cmd[@]}"
        ) >>"$log" 2>&1 &
    else
        (
            unset LISTEN_PID LISTEN_FDS LISTEN_FDNAMES
            exec "${cmd[@]}"
        ) >>"$log" 2>&1 &
    fi
    pid=$!
    say "server $1 started: pid $pid, $build build"
}

# stop SIG: signals the server and waits (30 s at most, then SIGKILL); checks how it ended.
stop() {
    local sig=$1 st=0 t0=$SECONDS
    if ! kill -0 "$pid" 2>/dev/null; then
        wait "$pid" 2>/dev/null || st=$?
        problem "server pid $pid had died on its own (status $st) before SIG$sig"
        return
    fi
    # Bash reports a job killed by a signal whenever it reaps it; this block's stderr hides that.
    {
        kill "-$sig" "$pid"
        for _ in $(seq 1 300); do
            kill -0 "$pid" || break
            sleep 0.1
        done
        if kill -0 "$pid"; then
            problem "server pid $pid still running 30 s after SIG$sig: killed"
            kill -KILL "$pid"
        fi
        wait "$pid" || st=$?
    } 2>/dev/null
    if [ "$sig" = TERM ] && [ "$st" != 0 ]; then
        # 3: the server's own stop watchdog gave up on a wedged drain (listener::EXIT_ABANDONED).
        problem "server pid $pid exited with status $st after SIGTERM"
    fi
    say "server pid $pid ended after SIG$sig (status $st, $((SECONDS - t0)) s)"
}

done_restarts=0 kill_count=0 term_count=0
start 1
if [ "$wait_go" = 1 ]; then
    while [ "$go" = 0 ] && [ "$stop_requested" = 0 ]; do nap 3600; done
    say "go: the schedule starts"
fi
for ((i = 0; i < n; i++)); do
    nap "${delays[i]}"
    [ "$stop_requested" = 1 ] && break
    stop "${plan[i]}"
    done_restarts=$((done_restarts + 1))
    if [ "${plan[i]}" = KILL ]; then kill_count=$((kill_count + 1)); else term_count=$((term_count + 1)); fi
    start $((i + 2))
    say "restart $done_restarts: SIG${plan[i]} then server $((i + 2))"
done
while [ "$stop_requested" = 0 ]; do nap 3600; done
say "stop requested: final SIGTERM"
stop TERM
[ "$done_restarts" = "$n" ] || problem "only $done_restarts of $n planned restarts happened before the stop"
say "summary: seed $seed, $done_restarts restarts ($kill_count SIGKILL, $term_count SIGTERM), upgrade at restart $upgrade_at, $problems problem(s)"
[ "$problems" = 0 ]
