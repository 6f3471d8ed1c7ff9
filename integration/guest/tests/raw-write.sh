#!/bin/sh
# First half of a durability check: random writes carrying fio verify headers (offset, seed and
# crc32c in every block), verified in place. fvd.cache=through first switches the guest to
# write-through (VIRTIO_BLK_F_CONFIG_WCE): then no FLUSH is ever sent and each completed write must
# already be durable. The host then kills or restarts the server; raw-verify checks the data.
# With fvd.hold=1 the guest then prints FVD-HOLD and waits, still connected (so the server gets
# no disconnect, whose flush would make everything durable), for the host to kill the server.
# Arguments: [fvd.cache=through|back] [fvd.size_mb=MiB] [fvd.hold=1]
# shellcheck source-path=SCRIPTDIR source=lib.sh
. /tests/lib.sh

if [ -n "${FVD_cache:-}" ]; then
    echo "write $FVD_cache" >"$BLK/cache_type" || fail "cannot switch the cache to write $FVD_cache"
    expect "write cache" "$(cat "$BLK/queue/write_cache")" "write $FVD_cache"
fi
mode=$(cat "$BLK/queue/write_cache")
before=$(flush_count)
raw_job --verify_only=0 --do_verify=1
echo "info: $mode, $(($(flush_count) - before)) flushes"
if [ "$mode" = "write through" ]; then
    expect "flushes sent in write-through mode" "$(($(flush_count) - before))" 0
fi
echo "ok: written and verified"
if [ "${FVD_hold:-0}" = 1 ]; then
    echo "FVD-HOLD"
    while :; do sleep 60; done
fi
