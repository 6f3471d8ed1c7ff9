#!/bin/sh
# (a) Random writes with crc32c verification, direct I/O on the raw device:
#  1. one job per queue (each on its own region) so every virtqueue carries traffic, request sizes
#     from 4 KiB to 1 MiB (many descriptors per request);
#  2. requests of the logical block size up to 128 KiB from buffers that start at a 512-byte offset
#     in a page, so guest buffers are not page-aligned and segments are not 4 KiB multiples.
# Arguments: [fvd.size_mb=MiB per job] [fvd.jobs=N] [fvd.engine=libaio|psync] [fvd.bs=BSRANGE]
# shellcheck source-path=SCRIPTDIR source=lib.sh
. /tests/lib.sh

jobs=${FVD_jobs:-$(nproc)}
mb=${FVD_size_mb:-64}
if [ -n "${FVD_bs:-}" ]; then bs="--bsrange=$FVD_bs"; else bs="--bssplit=4k/40:16k/20:64k/20:256k/15:1m/5"; fi

# run_fio NAME FIO-OPTIONS...: fails the test on any fio error.
run_fio() {
    name=$1
    shift
    fio --name="$name" --filename="$DEV" --direct=1 --rw=randwrite \
        --verify=crc32c --do_verify=1 --verify_fatal=1 --verify_dump=0 \
        --randrepeat=0 --group_reporting --minimal "$@" >/tmp/fio.out 2>/tmp/fio.err ||
        { cat /tmp/fio.err /tmp/fio.out; fail "fio $name failed"; }
    # Terse (--minimal) version 3 line: field 5 is the error count of the group.
    expect "fio $name errors" "$(awk -F';' '$1 == "3" {e = $5} END {print e}' /tmp/fio.out)" 0
}

run_fio randwrite-verify --ioengine="${FVD_engine:-libaio}" --iodepth=16 "$bs" \
    --size="${mb}M" --numjobs="$jobs" --offset_increment="${mb}M"
echo "ok: $jobs job(s) x ${mb} MiB written and verified"

lbs=$(cat "$BLK/queue/logical_block_size")
if [ "$lbs" -lt 4096 ]; then
    run_fio unaligned-verify --ioengine="${FVD_engine:-libaio}" --iodepth=8 \
        --bsrange="$lbs-128k" --mem_align="$lbs" --offset=$((jobs * mb))M --size=16M
    echo "ok: 16 MiB in $lbs-byte-aligned requests from unaligned buffers written and verified"
else
    echo "info: logical block size $lbs: no unaligned-buffer pass"
fi
