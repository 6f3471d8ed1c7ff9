#!/bin/sh
# shellcheck shell=sh
# Sourced by every guest test. $FVD_* come from fvd.KEY=VALUE on the kernel command line.
set -eu
DEV=${FVD_dev:-/dev/vda}
BLK=/sys/block/${DEV#/dev/}

# fail REASON: record the reason for the FAIL marker and stop the test.
fail() {
    echo "$*" >/tmp/fail-reason
    echo "FAIL: $*" >&2
    exit 1
}

# expect WHAT ACTUAL EXPECTED
expect() {
    if [ "$2" = "$3" ]; then
        echo "ok: $1 = $2"
    else
        fail "$1 is '$2', expected '$3'"
    fi
}

# Flush requests the block layer completed for $DEV (field 16 of the stat file, Linux >= 5.5).
flush_count() {
    awk '{print $16}' "$BLK/stat"
}

# raw_job FIO-OPTIONS...: the fio job shared by raw-write and raw-verify. A fixed seed makes both
# runs choose the same offsets; each block's verify header records where it belongs.
raw_job() {
    fio --name=durable --filename="$DEV" --direct=1 --ioengine=libaio --iodepth=8 \
        --rw=randwrite --bsrange=4k-64k --size="${FVD_size_mb:-32}M" --randseed=4242 \
        --verify=crc32c --verify_fatal=1 --verify_dump=0 --minimal "$@" \
        >/tmp/fio.out 2>/tmp/fio.err || { cat /tmp/fio.err /tmp/fio.out; fail "fio $* failed"; }
}

# Kernel messages that mean the guest saw a device or I/O problem (block layer, virtio ring,
# ext4). dmesg_mark sets the messages so far aside (the host may already have restarted the
# backend during boot); dmesg_problems checks all of them, except the two lines virtio_blk prints
# when it finds the disk, which are not problems.
DMESG_PROBLEMS='I/O error|virtio|blk_update_request|not a head|Buffer I/O|EXT4-fs error'
DMESG_PROBE='virtio_blk virtio[0-9]+: (\[vda\] [0-9]+ 512-byte logical blocks|[0-9]+/[0-9]+/[0-9]+ default/read/poll queues)'
dmesg_mark() {
    dmesg -c >/tmp/dmesg.before
}
dmesg_problems() {
    {
        grep -E "$DMESG_PROBLEMS" /tmp/dmesg.before | grep -Ev "$DMESG_PROBE" || true
        dmesg | grep -E "$DMESG_PROBLEMS" || true
    } >/tmp/dmesg.problems
    if [ -s /tmp/dmesg.problems ]; then
        sed 's/^/dmesg: /' /tmp/dmesg.problems | head -n 20
        fail "kernel reported $(wc -l </tmp/dmesg.problems) device/I/O problem line(s), first: $(head -n1 /tmp/dmesg.problems)"
    fi
    echo "ok: no I/O or virtio errors in dmesg ($(grep -cE "$DMESG_PROBE" /tmp/dmesg.before || true) disk probe line(s) from before the test set aside)"
}

# uptime_cs: seconds since boot, in hundredths (integer arithmetic in sh).
uptime_cs() {
    awk '{ printf "%d\n", $1 * 100 }' /proc/uptime
}
