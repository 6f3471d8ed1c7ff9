#!/bin/sh
# Online resize (host case resize): fio writes with verify into the old range while the host
# grows the disk to fvd.new_size bytes; the guest must see the new size (kernel: "detected
# capacity change"), read zeros in the new range, write there, and see no I/O error.
# Arguments: fvd.new_size=BYTES
# shellcheck source-path=SCRIPTDIR source=lib.sh
. /tests/lib.sh

new=$((${FVD_new_size:?fvd.new_size= missing} / 512))
old=$(cat "$BLK/size")
[ "$old" -lt "$new" ] || fail "the disk already has $old sectors"
dmesg_mark
fio --name=during --filename="$DEV" --direct=1 --ioengine=libaio --iodepth=8 \
    --rw=randwrite --bs=4k --size=16m --time_based --runtime=15 \
    --verify=crc32c --verify_fatal=1 --verify_dump=0 --minimal >/tmp/fio.out 2>/tmp/fio.err &
fio_pid=$!
echo "FVD-PROGRESS start"
t0=$(uptime_cs)
while [ "$(cat "$BLK/size")" = "$old" ]; do
    [ $(($(uptime_cs) - t0)) -lt 6000 ] || fail "size still $old sectors after 60 s"
    sleep 0.2
done
echo "info: size changed after $(($(uptime_cs) - t0)) cs while fio ran"
expect "size (sectors)" "$(cat "$BLK/size")" "$new"
dmesg | grep -q "detected capacity change" || fail "no 'detected capacity change' in dmesg"
echo "ok: $(dmesg | grep 'detected capacity change' | head -n1)"
# virtio_blk announces the new size in a line that names virtio: not a problem.
dmesg -c >/tmp/dmesg.resize
if grep -E "$DMESG_PROBLEMS" /tmp/dmesg.resize | grep -Ev '\[vda\] new size: [0-9]+ 512-byte logical blocks'; then
    fail "device/I/O problem reported around the resize"
fi
wait "$fio_pid" || { cat /tmp/fio.err /tmp/fio.out; fail "fio during the resize failed"; }
echo "ok: fio with verify during the resize"
nz=$(dd if="$DEV" bs=512 skip="$old" count=$((new - old)) iflag=direct 2>/dev/null | tr -d '\000' | wc -c)
expect "non-zero bytes in the new range" "$nz" 0
fio --name=after --filename="$DEV" --direct=1 --ioengine=libaio --iodepth=8 --rw=randwrite \
    --bs=64k --offset=$((old * 512)) --size=$(((new - old) * 512)) --verify=crc32c \
    --verify_fatal=1 --verify_dump=0 --minimal >/tmp/fio.out 2>/tmp/fio.err ||
    { cat /tmp/fio.err /tmp/fio.out; fail "fio in the new range failed"; }
echo "ok: writes in the new range verify"
dmesg_problems
