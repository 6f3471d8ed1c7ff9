#!/bin/sh
# (d) The guest sees the configuration the backend was started with.
# Arguments: fvd.size=BYTES fvd.queues=N fvd.wc=back|through fvd.discard=0|1|any [fvd.ro=0|1]
#            [fvd.serial=S] [fvd.lbs=512|4096] [fvd.minio=BYTES] [fvd.optio=BYTES]
# shellcheck source-path=SCRIPTDIR source=lib.sh
. /tests/lib.sh

sectors=$(cat "$BLK/size")
expect "size (bytes)" "$((sectors * 512))" "${FVD_size:?fvd.size= missing}"
expect "hardware queues" "$(find "$BLK/mq" -mindepth 1 -maxdepth 1 | wc -l)" "${FVD_queues:?fvd.queues= missing}"
expect "write cache" "$(cat "$BLK/queue/write_cache")" "write ${FVD_wc:-back}"
dmax=$(cat "$BLK/queue/discard_max_bytes")
if [ "${FVD_discard:-1}" = any ]; then
    echo "info: discard_max_bytes = $dmax"
elif [ "${FVD_discard:-1}" = 1 ]; then
    [ "$dmax" -gt 0 ] || fail "discard_max_bytes is 0: discard not advertised"
    echo "ok: discard_max_bytes = $dmax"
else
    expect "discard_max_bytes" "$dmax" 0
fi
expect "read-only" "$(cat "$BLK/ro")" "${FVD_ro:-0}"
if [ -n "${FVD_serial:-}" ]; then
    expect "serial" "$(cat "$BLK/serial")" "$FVD_serial"
fi
if [ -n "${FVD_lbs:-}" ]; then
    expect "logical block size" "$(cat "$BLK/queue/logical_block_size")" "$FVD_lbs"
fi
# Topology: the I/O sizes the server announced (VIRTIO_BLK_F_TOPOLOGY).
if [ -n "${FVD_minio:-}" ]; then
    expect "minimum_io_size" "$(cat "$BLK/queue/minimum_io_size")" "$FVD_minio"
fi
if [ -n "${FVD_optio:-}" ]; then
    expect "optimal_io_size" "$(cat "$BLK/queue/optimal_io_size")" "$FVD_optio"
fi
echo "info: write_zeroes_max_bytes = $(cat "$BLK/queue/write_zeroes_max_bytes")"

# A read from both ends of the device must work.
dd if="$DEV" of=/dev/null bs=4096 count=16 2>/dev/null || fail "read at offset 0 failed"
dd if="$DEV" of=/dev/null bs=4096 skip=$((sectors / 8 - 16)) count=16 2>/dev/null ||
    fail "read of the last 64 KiB failed"
if [ "${FVD_ro:-0}" = 1 ]; then
    if dd if=/dev/zero of="$DEV" bs=4096 count=1 oflag=direct 2>/dev/null; then
        fail "a write to the read-only disk succeeded"
    fi
    echo "ok: write to the read-only disk was refused"
fi
