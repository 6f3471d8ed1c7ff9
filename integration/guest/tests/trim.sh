#!/bin/sh
# DISCARD and WRITE ZEROES: a zeroed range must read back as zeros; a discarded range must still be
# readable, and data next to both ranges must be intact.
# shellcheck source-path=SCRIPTDIR source=lib.sh
. /tests/lib.sh

mb=1048576
dd if=/dev/urandom of=/tmp/pattern bs=1M count=4 2>/dev/null
dd if=/tmp/pattern of="$DEV" bs=1M seek=8 oflag=direct conv=fsync 2>/dev/null || fail "pattern write failed"
# Zero-out the middle 2 MiB (BLKZEROOUT: WRITE ZEROES if advertised, else written zeros).
/usr/sbin/blkdiscard -z -o $((9 * mb)) -l $((2 * mb)) "$DEV" || fail "blkdiscard -z failed"
dd if="$DEV" of=/tmp/back bs=1M skip=8 count=4 iflag=direct 2>/dev/null || fail "read back failed"
cmp -n $mb /tmp/pattern /tmp/back || fail "data before the zeroed range changed"
head -c $((2 * mb)) /dev/zero >/tmp/zero
dd if=/tmp/back of=/tmp/mid bs=1M skip=1 count=2 2>/dev/null
cmp /tmp/zero /tmp/mid || fail "zeroed range does not read as zeros"
dd if=/tmp/back of=/tmp/tail bs=1M skip=3 count=1 2>/dev/null
dd if=/tmp/pattern of=/tmp/ptail bs=1M skip=3 count=1 2>/dev/null
cmp /tmp/ptail /tmp/tail || fail "data after the zeroed range changed"
echo "ok: write-zeroes"
# Discard: must succeed, the range must stay readable and data next to it must be intact.
if [ "$(cat "$BLK/queue/discard_max_bytes")" -gt 0 ]; then
    /usr/sbin/blkdiscard -o $((16 * mb)) -l $((3 * mb)) "$DEV" || fail "blkdiscard failed"
    dd if="$DEV" of=/dev/null bs=1M skip=16 count=3 iflag=direct 2>/dev/null || fail "read of discarded range failed"
    dd if="$DEV" of=/tmp/back bs=1M skip=8 count=1 iflag=direct 2>/dev/null
    cmp -n $mb /tmp/pattern /tmp/back || fail "data outside the discarded range changed"
    echo "ok: discard"
fi
