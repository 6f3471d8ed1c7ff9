#!/bin/sh
# Throughput jobs for integration/bench-guest.sh (not a pass/fail test). Prints one line per job:
#   BENCH NAME IOPS KIB_PER_S
# Arguments: [fvd.secs=N seconds per job (default 8)] [fvd.size_mb=MiB of the disk used (default 256)]
# shellcheck source-path=SCRIPTDIR source=lib.sh
. /tests/lib.sh

secs=${FVD_secs:-8}
mb=${FVD_size_mb:-256}
# job NAME RW BS DEPTH
job() {
    fio --name="$1" --filename="$DEV" --direct=1 --ioengine=libaio --rw="$2" --bs="$3" \
        --iodepth="$4" --size="${mb}M" --runtime="$secs" --time_based --randseed=7 \
        --output-format=terse --terse-version=3 >/tmp/fio.out 2>/tmp/fio.err ||
        { cat /tmp/fio.err; fail "fio $1 failed"; }
    # terse v3: read bw KiB/s and IOPS are fields 7 and 8, write bw and IOPS fields 48 and 49.
    case "$2" in
    *read) awk -F';' -v n="$1" '{print "BENCH", n, $8, $7}' /tmp/fio.out ;;
    *) awk -F';' -v n="$1" '{print "BENCH", n, $49, $48}' /tmp/fio.out ;;
    esac
}
job randread-4k-qd1 randread 4k 1
job randread-4k-qd32 randread 4k 32
job seqread-1m-qd4 read 1M 4
job randwrite-4k-qd1 randwrite 4k 1
job randwrite-4k-qd32 randwrite 4k 32
job seqwrite-1m-qd4 write 1M 4
