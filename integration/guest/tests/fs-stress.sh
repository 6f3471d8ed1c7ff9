#!/bin/sh
# First half of the crash test: files written and fsync'ed one after another, each then recorded
# (sha256) in /mnt/LIST, which is fsync'ed too, so every complete LIST line names a file that was
# durable before the line was. Prints "FVD-PROGRESS N" every 10 files; the host kills the server in
# the middle of this and fs-recover checks the result. Stops by itself after fvd.max files.
# shellcheck source-path=SCRIPTDIR source=lib.sh
. /tests/lib.sh

mkfs.ext4 -F -q -E lazy_itable_init=0,lazy_journal_init=0 "$DEV" || fail "mkfs.ext4 failed"
mount -t ext4 -o discard "$DEV" /mnt || fail "mount failed"
fio --name=pool --filename=/tmp/pool --rw=write --bs=64k --size=32M --refill_buffers \
    --randrepeat=0 --ioengine=psync --minimal >/dev/null || fail "fio could not make the data pool"
: >/mnt/LIST
sync /mnt/LIST
i=0
while [ "$i" -lt "${FVD_max:-5000}" ]; do
    i=$((i + 1))
    dd if=/tmp/pool of="/mnt/f$i" bs=1k count=$((i * 37 % 1024 + 1)) skip=$((i * 13 % 30000)) \
        2>/dev/null || fail "writing f$i failed"
    sync "/mnt/f$i" || fail "fsync of f$i failed"
    sha256sum "/mnt/f$i" >>/mnt/LIST
    sync /mnt/LIST || fail "fsync of LIST failed"
    if [ $((i % 10)) = 0 ]; then
        # Churn for the allocator and discard: a file that lives for one round.
        rm -f /mnt/churn
        dd if=/tmp/pool of=/mnt/churn bs=64k count=$((i % 64 + 1)) 2>/dev/null
        echo "FVD-PROGRESS $i"
    fi
done
umount /mnt
echo "info: reached fvd.max=$i without being stopped"
