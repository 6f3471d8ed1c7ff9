#!/bin/sh
# Second half of the crash test, after the server was killed during fs-stress and restarted:
# mounting replays the ext4 journal; every file with a complete LIST line must match, at least
# fvd.min of them (the host saw that much progress before the kill); then e2fsck -fn must be clean.
# shellcheck source-path=SCRIPTDIR source=lib.sh
. /tests/lib.sh

mount -t ext4 "$DEV" /mnt || fail "mount (journal replay) failed"
# A line being appended at the crash may be torn: only complete lines count.
grep -E '^[0-9a-f]{64}  /mnt/f[0-9]+$' /mnt/LIST >/tmp/list || true
n=$(wc -l </tmp/list)
echo "info: $n files were recorded as durable"
[ "$n" -ge "${FVD_min:?fvd.min= missing}" ] ||
    fail "only $n durable files listed, the guest had reported $FVD_min before the crash"
sha256sum -c /tmp/list >/tmp/check.out 2>&1 || { grep -v ': OK$' /tmp/check.out | head; fail "durable files differ"; }
echo "ok: all $n durable files match"
umount /mnt || fail "umount failed"
e2fsck -fn "$DEV" >/tmp/fsck.out 2>&1 || { cat /tmp/fsck.out; fail "e2fsck -fn found problems after recovery"; }
echo "ok: e2fsck -fn clean after journal recovery"
