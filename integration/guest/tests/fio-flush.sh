#!/bin/sh
# (c) Writes each followed by fsync: the guest must send FLUSH (the disk is write-back), and data
# must verify. Checks that the flush count of the device grew by at least the number of writes.
# Arguments: [fvd.size_mb=MiB] [fvd.force_wb=1: switch the guest's cache mode to write back first]
# shellcheck source-path=SCRIPTDIR source=lib.sh
. /tests/lib.sh

mb=${FVD_size_mb:-8}
if [ "${FVD_force_wb:-0}" = 1 ]; then
    # For backends that start write-through but let the guest switch (VIRTIO_BLK_F_CONFIG_WCE).
    echo "write back" >"$BLK/cache_type" || fail "cannot switch the cache to write back"
fi
expect "write cache" "$(cat "$BLK/queue/write_cache")" "write back"
before=$(flush_count)
fio --name=fsync-verify --filename="$DEV" --direct=1 --ioengine=psync --rw=randwrite \
    --bs=4k --size="${mb}M" --fsync=1 --end_fsync=1 \
    --verify=crc32c --do_verify=1 --verify_fatal=1 --verify_dump=0 --minimal \
    >/tmp/fio.out 2>/tmp/fio.err || { cat /tmp/fio.err /tmp/fio.out; fail "fio fsync+verify failed"; }
after=$(flush_count)
writes=$((mb * 256))
flushes=$((after - before))
echo "info: $writes writes, $flushes flushes"
[ "$flushes" -ge "$writes" ] || fail "only $flushes flushes for $writes fsync'ed writes"
echo "ok: every write was followed by a flush and the data verified"
