#!/bin/sh
# Copy-on-write over a base image. The guest reads the first fvd.base_mb MiB (whose sha256 the host
# computed from the base: fvd.base_sum) through the overlay, overwrites scattered ranges of the
# second half of fvd.total_mb MiB and verifies them, then prints "FVD-DATA <sha256 of the first
# fvd.total_mb MiB>" for a later VM (sha.sh) to compare after the base has been streamed in.
# shellcheck source-path=SCRIPTDIR source=lib.sh
. /tests/lib.sh

mb=${FVD_base_mb:?fvd.base_mb= missing}
total=${FVD_total_mb:-$mb}
got=$(dd if="$DEV" bs=1M count="$mb" iflag=direct 2>/dev/null | sha256sum | cut -d' ' -f1)
expect "sha256 of the base range seen through the overlay" "$got" "${FVD_base_sum:?}"
half=$((total / 2))
fio --name=cow --filename="$DEV" --direct=1 --ioengine=libaio --iodepth=8 --rw=randwrite \
    --bsrange=4k-128k --offset="${half}M" --size=$((total - half))M --io_size=$((half / 2))M \
    --verify=crc32c --do_verify=1 --verify_fatal=1 --verify_dump=0 --minimal \
    >/tmp/fio.out 2>/tmp/fio.err || { cat /tmp/fio.err /tmp/fio.out; fail "fio over the base failed"; }
echo "ok: partial overwrites over the base verified"
sum=$(dd if="$DEV" bs=1M count="$total" iflag=direct 2>/dev/null | sha256sum | cut -d' ' -f1)
echo "FVD-DATA $sum"
