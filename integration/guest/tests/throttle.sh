#!/bin/sh
# I/O limits set on the server (fvd.iops_write=N, fvd.bps_read=BYTES): 64 direct 64 KiB writes and
# 4 MiB of direct reads all succeed, read back what was written, and take at least the time the
# limits imply (a lower bound only: a slow host may always take longer). No I/O error in dmesg.
# shellcheck source-path=SCRIPTDIR source=lib.sh
. /tests/lib.sh

iops=${FVD_iops_write:?fvd.iops_write missing}
bps=${FVD_bps_read:?fvd.bps_read missing}
dmesg_mark
dd if=/dev/urandom of=/tmp/pattern bs=64k count=64 2>/dev/null
t0=$(uptime_cs)
dd if=/tmp/pattern of="$DEV" bs=64k count=64 seek=16 oflag=direct 2>/dev/null || fail "throttled writes failed"
t1=$(uptime_cs)
# One request per write at least; a tenth of a second's worth passes at once, then one per 1/iops s.
least=$(((63 * 100 - iops * 10) / iops))
echo "64 writes under --iops-write $iops: $((t1 - t0)) cs (at least $least)"
[ $((t1 - t0)) -ge "$least" ] || fail "64 writes took $((t1 - t0)) cs, less than the $least cs --iops-write $iops allows"
echo "ok: write limit"
t0=$(uptime_cs)
dd if="$DEV" of=/tmp/back bs=64k count=64 skip=16 iflag=direct 2>/dev/null || fail "throttled reads failed"
t1=$(uptime_cs)
# 4 MiB; the last 64 KiB and a tenth of a second's worth need no wait.
least=$(((4194304 - 65536 - bps / 10) * 100 / bps))
echo "4 MiB read under --bps-read $bps: $((t1 - t0)) cs (at least $least)"
[ $((t1 - t0)) -ge "$least" ] || fail "4 MiB read in $((t1 - t0)) cs, less than the $least cs --bps-read $bps allows"
cmp /tmp/pattern /tmp/back || fail "data read back differs from what was written"
echo "ok: read limit, data verified"
dmesg_problems
