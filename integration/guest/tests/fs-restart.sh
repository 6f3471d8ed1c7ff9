#!/bin/sh
# Restart under a filesystem (host case restart-fs): ext4 files written without any sync while the
# host kills and restarts the backend; writeback is made to run every second so the writes reach
# the device during the restarts. Each file's sha256 is taken right after it is written (from the
# page cache) and kept in /tmp (RAM). After fvd.write_secs seconds: sync, drop the page cache
# (still mounted) and check every file against its sum, so each is read back from the device;
# then unmount and e2fsck -fn must find the filesystem clean. Prints "FVD-PROGRESS start" before
# the first file, then "FVD-PROGRESS N" every 20 files and one line per final phase.
# Arguments: [fvd.write_secs=S]
# shellcheck source-path=SCRIPTDIR source=lib.sh
. /tests/lib.sh

want=$((${FVD_write_secs:-40} * 100))
mkfs.ext4 -F -q -E lazy_itable_init=0,lazy_journal_init=0 "$DEV" || fail "mkfs.ext4 failed"
dmesg_mark
mount -t ext4 "$DEV" /mnt || fail "mount failed"
echo 100 >/proc/sys/vm/dirty_writeback_centisecs
echo 100 >/proc/sys/vm/dirty_expire_centisecs
fio --name=pool --filename=/tmp/pool --rw=write --bs=64k --size=32M --refill_buffers \
    --randrepeat=0 --ioengine=psync --minimal >/dev/null || fail "fio could not make the data pool"
: >/tmp/SUMS
echo "FVD-PROGRESS start"
start=$(uptime_cs)
i=0
while [ $(($(uptime_cs) - start)) -lt "$want" ]; do
    i=$((i + 1))
    d=/mnt/d$((i % 16))
    mkdir -p "$d"
    # 1 KiB .. 2 MiB, from varying places in the pool.
    dd if=/tmp/pool of="$d/f$i" bs=1k count=$((i * 211 % 2048 + 1)) skip=$((i * 13 % 30000)) \
        2>/dev/null || fail "writing f$i failed"
    sha256sum "$d/f$i" >>/tmp/SUMS
    if [ $((i % 7)) = 0 ]; then
        # Rewrite part of an earlier file in place; its sum is taken again below.
        j=$((i / 2))
        f=/mnt/d$((j % 16))/f$j
        dd if=/tmp/pool of="$f" bs=1k count=64 skip=$((i % 20000)) seek=1 conv=notrunc \
            2>/dev/null || fail "rewriting f$j failed"
        sha256sum "$f" >>/tmp/SUMS
    fi
    if [ $((i % 20)) = 0 ]; then
        echo "FVD-PROGRESS $i"
    fi
done
# The last sum of each file is its final content.
awk '{ last[$2] = $0 } END { for (f in last) print last[f] }' /tmp/SUMS | sort -k2 >/tmp/FINAL
echo "info: $i files written without sync in $(($(uptime_cs) - start))0 ms"
echo "FVD-PROGRESS sync"
sync
echo 3 >/proc/sys/vm/drop_caches
echo "FVD-PROGRESS verify"
sha256sum -c /tmp/FINAL >/tmp/check.out 2>&1 ||
    { grep -v ': OK$' /tmp/check.out | head -n 20; fail "$(grep -vc ': OK$' /tmp/check.out) file(s) differ from what was written"; }
echo "ok: $(wc -l </tmp/FINAL) files read back from the device match"
umount /mnt || fail "umount failed"
echo "FVD-PROGRESS fsck"
e2fsck -fn "$DEV" >/tmp/fsck.out 2>&1 || { cat /tmp/fsck.out; fail "e2fsck -fn found problems"; }
echo "ok: e2fsck -fn clean"
dmesg_problems
