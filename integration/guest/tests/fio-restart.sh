#!/bin/sh
# Restart under load (host case restart-load): random writes of 4 KiB..64 KiB at queue depth 16,
# direct I/O through libaio, no fsync, every block carrying a crc32c verify header, while the host
# kills (SIGKILL, SIGTERM) and restarts the backend and upgrades it to another build. Rounds of one
# fio write pass over fvd.size_mb MiB (its own seed, so a block left over from an earlier round
# fails the header's seed check) followed by a verify-only pass of that round, until the write
# passes add up to fvd.write_secs seconds. Prints "FVD-PROGRESS start", then "FVD-PROGRESS N"
# after each round. Any fio error, verify mismatch or kernel I/O/virtio message fails the test.
# Arguments: [fvd.size_mb=MiB] [fvd.write_secs=S]
# shellcheck source-path=SCRIPTDIR source=lib.sh
. /tests/lib.sh

mb=${FVD_size_mb:-128}
want=$((${FVD_write_secs:-60} * 100))
dmesg_mark
# job SEED FIO-OPTIONS...: the same offsets and sizes for the write pass and its verify pass.
job() {
    seed=$1
    shift
    fio --name="round$seed" --filename="$DEV" --direct=1 --ioengine=libaio --iodepth=16 \
        --rw=randwrite --bsrange=4k-64k --size="${mb}M" --randseed="$seed" \
        --verify=crc32c --verify_fatal=1 --verify_dump=0 --minimal "$@" \
        >/tmp/fio.out 2>/tmp/fio.err
}
round=0 wrote=0 verified=0
echo "FVD-PROGRESS start"
while [ "$wrote" -lt "$want" ]; do
    round=$((round + 1))
    t0=$(uptime_cs)
    job $((1000 + round)) --do_verify=0 ||
        { cat /tmp/fio.err /tmp/fio.out; fail "fio write pass of round $round failed (I/O error?)"; }
    t1=$(uptime_cs)
    job $((1000 + round)) --verify_only=1 ||
        { cat /tmp/fio.err /tmp/fio.out; fail "verify of round $round failed: a lost or torn write"; }
    t2=$(uptime_cs)
    wrote=$((wrote + t1 - t0))
    verified=$((verified + t2 - t1))
    echo "FVD-PROGRESS $round (write $((t1 - t0))0 ms, verify $((t2 - t1))0 ms)"
done
echo "ok: $round rounds x $mb MiB written (${wrote}0 ms) and verified (${verified}0 ms)"
dmesg_problems
