#!/bin/sh
# The demo: show the disk, then (if writable) write, read back and restore its last MiB.
# With fvd.shell=1, init opens a shell on the console afterwards.
# shellcheck source-path=SCRIPTDIR source=lib.sh
. /tests/lib.sh

echo "=== the vhost-user-blk disk, as the guest sees it ==="
if command -v lsblk >/dev/null; then lsblk -o NAME,SIZE,RO,DISC-MAX,LOG-SEC "$DEV" || true; fi
fdisk -l "$DEV" 2>/dev/null | head -n 3 || true
echo "serial: $(cat "$BLK/serial" 2>/dev/null), queues: $(find "$BLK/mq" -mindepth 1 -maxdepth 1 | wc -l), cache: $(cat "$BLK/queue/write_cache")"
sectors=$(cat "$BLK/size")
last=$((sectors / 2048 - 1))
if [ "$(cat "$BLK/ro")" = 0 ]; then
    echo "=== smoke test: write + read back 1 MiB at MiB $last ==="
    dd if="$DEV" of=/tmp/saved bs=1M skip="$last" count=1 iflag=direct 2>/dev/null || fail "read failed"
    dd if=/dev/urandom of=/tmp/data bs=1M count=1 2>/dev/null
    dd if=/tmp/data of="$DEV" bs=1M seek="$last" oflag=direct conv=fsync 2>/dev/null || fail "write failed"
    dd if="$DEV" of=/tmp/back bs=1M skip="$last" count=1 iflag=direct 2>/dev/null || fail "read back failed"
    cmp /tmp/data /tmp/back || fail "read back differs"
    # Put the old content back so the demo leaves the disk as it found it.
    dd if=/tmp/saved of="$DEV" bs=1M seek="$last" oflag=direct conv=fsync 2>/dev/null || fail "restore failed"
    echo "ok: 1 MiB written, read back and restored"
fi
