#!/bin/sh
# (b, first half) mkfs.ext4, write files of varied shapes, record their sha256 sums in /MANIFEST on
# the filesystem, unmount. Prints "FVD-MANIFEST <sha256 of MANIFEST>": the host passes it to the
# second half (fs-check, another VM after a server restart) so the manifest itself is trusted.
# Online discard is on, so deletes send DISCARD to the backend.
# shellcheck source-path=SCRIPTDIR source=lib.sh
. /tests/lib.sh

mkfs.ext4 -F -q -E lazy_itable_init=0,lazy_journal_init=0 "$DEV" || fail "mkfs.ext4 failed"
mount -t ext4 -o discard "$DEV" /mnt || fail "mount failed"
cd /mnt || fail "cd /mnt"
mkdir -p small deep/a/b/c
for i in $(seq 1 200); do
    head -c $((i * 37)) /dev/urandom >"small/f$i"
done
dd if=/dev/urandom of=big1 bs=1M count=24 2>/dev/null
dd if=/dev/urandom of=odd bs=1 count=1000003 2>/dev/null
# Sparse file: data at both ends of a 64 MiB range with a hole between.
dd if=/dev/urandom of=sparse bs=4096 count=8 2>/dev/null
dd if=/dev/urandom of=sparse bs=4096 count=8 seek=16376 conv=notrunc 2>/dev/null
echo deep >deep/a/b/c/leaf
# Churn: create then delete files (discards), rewrite part of a file in place.
for i in $(seq 1 8); do dd if=/dev/urandom of="tmp$i" bs=1M count=4 2>/dev/null; done
sync
rm -f tmp*
dd if=/dev/urandom of=big1 bs=4096 count=100 seek=777 conv=notrunc 2>/dev/null
fstrim /mnt 2>/dev/null || echo "info: fstrim not supported"
find . -type f ! -path './lost+found/*' | sort | xargs sha256sum >/tmp/MANIFEST
mv /tmp/MANIFEST MANIFEST
count=$(wc -l <MANIFEST)
sum=$(sha256sum MANIFEST | cut -d' ' -f1)
cd /
umount /mnt || fail "umount failed"
echo "ok: $count files written"
echo "FVD-MANIFEST $sum"
