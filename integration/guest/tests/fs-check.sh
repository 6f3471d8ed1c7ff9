#!/bin/sh
# (b, second half) After the backend restarted: the filesystem must be clean (e2fsck -fn) and every
# file must match the manifest written by fs-write, whose own sha256 is fvd.manifest=SUM.
# shellcheck source-path=SCRIPTDIR source=lib.sh
. /tests/lib.sh

want=${FVD_manifest:?fvd.manifest= missing}
e2fsck -fn "$DEV" >/tmp/fsck.out 2>&1 || { cat /tmp/fsck.out; fail "e2fsck -fn found problems (exit $?)"; }
tail -n1 /tmp/fsck.out
echo "ok: e2fsck -fn clean"
mount -t ext4 -o ro "$DEV" /mnt || fail "mount failed"
cd /mnt || fail "cd /mnt"
expect "manifest sha256" "$(sha256sum MANIFEST | cut -d' ' -f1)" "$want"
sha256sum -c MANIFEST >/tmp/check.out 2>&1 || { grep -v ': OK$' /tmp/check.out; fail "file checksums differ"; }
echo "ok: $(wc -l <MANIFEST) files match"
cd /
umount /mnt
