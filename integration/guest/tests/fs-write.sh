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
# Random data: a 32 MiB pool made by fio (a fast PRNG, new data in every block; /dev/urandom is slow
# under TCG), sliced into files with dd. piece FILE COUNT_KIB POOL_OFFSET_KIB [FILE_OFFSET_KIB]
fio --name=pool --filename=/tmp/pool --rw=write --bs=64k --size=32M --refill_buffers \
    --randrepeat=0 --ioengine=psync --minimal >/dev/null || fail "fio could not make the data pool"
piece() {
    dd if=/tmp/pool of="$1" bs=1k count="$2" skip="$3" seek="${4:-0}" conv=notrunc 2>/dev/null ||
        fail "writing $1 failed"
}
mkdir -p small deep/a/b/c
for i in $(seq 1 200); do
    { echo "$i"; dd if=/tmp/pool bs=37 count="$i" skip="$i" 2>/dev/null; } >"small/f$i"
done
piece big1 24576 0
dd if=/tmp/pool of=odd bs=1000003 count=1 skip=25 2>/dev/null
# Sparse file: data at both ends of a 64 MiB range with a hole between.
piece sparse 32 26000
piece sparse 32 26100 $((65536 - 32))
echo deep >deep/a/b/c/leaf
# Churn: create then delete files (discards), rewrite part of a file in place.
for i in $(seq 1 8); do piece "tmp$i" 4096 $((i * 1024)); done
sync
rm -f tmp*
piece big1 400 30000 3108
fstrim /mnt 2>/dev/null || echo "info: fstrim not supported"
find . -type f ! -path './lost+found/*' | sort | xargs sha256sum >/tmp/MANIFEST
mv /tmp/MANIFEST MANIFEST
count=$(wc -l <MANIFEST)
sum=$(sha256sum MANIFEST | cut -d' ' -f1)
cd /
umount /mnt || fail "umount failed"
echo "ok: $count files written"
echo "FVD-MANIFEST $sum"
