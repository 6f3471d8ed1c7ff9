#!/bin/sh
# The guest reboots inside the same QEMU (run-vm.sh --reboot): QEMU resets the device, so the
# backend sees its rings stopped and set up again on the same connection. First boot: write data
# (raw_job), put a marker in the last 4 KiB and `reboot -f`. Second boot (marker present): verify.
# shellcheck source-path=SCRIPTDIR source=lib.sh
. /tests/lib.sh

last=$(($(cat "$BLK/size") / 8 - 1))
marker=$(dd if="$DEV" bs=4096 skip="$last" count=1 iflag=direct 2>/dev/null | head -c 16)
if [ "$marker" = "FVD-REBOOT-MARK1" ]; then
    echo "info: second boot"
    raw_job --verify_only=1
    echo "ok: data written before the reboot verified"
    exit 0
fi
raw_job --verify_only=0 --do_verify=1
{ printf 'FVD-REBOOT-MARK1'; head -c 4080 /dev/zero; } >/tmp/mark
dd if=/tmp/mark of="$DEV" bs=4096 seek="$last" oflag=direct conv=fsync 2>/dev/null || fail "marker write failed"
echo "info: first boot done, rebooting"
sync
reboot -f
sleep 60
fail "reboot -f did not reboot"
