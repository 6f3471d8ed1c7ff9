#!/bin/sh
# (a) Random writes with crc32c verification, direct I/O on the raw device, one job per queue
# (each job on its own region), so every virtqueue carries traffic.
# Arguments: [fvd.size_mb=MiB per job] [fvd.jobs=N] [fvd.engine=libaio|psync] [fvd.bs=BSRANGE]
# shellcheck source-path=SCRIPTDIR source=lib.sh
. /tests/lib.sh

jobs=${FVD_jobs:-$(nproc)}
mb=${FVD_size_mb:-64}
fio --name=randwrite-verify --filename="$DEV" --direct=1 \
    --ioengine="${FVD_engine:-libaio}" --iodepth=16 --rw=randwrite \
    --bsrange="${FVD_bs:-4k-64k}" --size="${mb}M" --numjobs="$jobs" --offset_increment="${mb}M" \
    --verify=crc32c --do_verify=1 --verify_fatal=1 --verify_dump=0 \
    --randrepeat=0 --group_reporting --minimal >/tmp/fio.out 2>/tmp/fio.err ||
    { cat /tmp/fio.err /tmp/fio.out; fail "fio randwrite+verify failed"; }
# Terse (--minimal) version 3 line: field 5 is the error count of the group.
errs=$(awk -F';' '$1 == "3" {e = $5} END {print e}' /tmp/fio.out)
expect "fio errors" "$errs" 0
echo "ok: $jobs job(s) x ${mb} MiB written and verified"
