#!/bin/sh
# Copy-on-write over a base image: the guest first reads the base's content through the overlay
# (fvd.base_mb=MiB of base data, fvd.base_sum=its sha256), then overwrites scattered ranges and
# reads them back. The host checks afterwards that the base file is unchanged.
# shellcheck source-path=SCRIPTDIR source=lib.sh
. /tests/lib.sh

mb=${FVD_base_mb:?fvd.base_mb= missing}
got=$(dd if="$DEV" bs=1M count="$mb" iflag=direct 2>/dev/null | sha256sum | cut -d' ' -f1)
expect "sha256 of the base range seen through the overlay" "$got" "${FVD_base_sum:?}"
fio --name=cow --filename="$DEV" --direct=1 --ioengine=libaio --iodepth=8 --rw=randwrite \
    --bsrange=4k-128k --size="${mb}M" --io_size=$((mb / 4))M --norandommap \
    --verify=crc32c --do_verify=1 --verify_fatal=1 --verify_dump=0 --minimal \
    >/tmp/fio.out 2>/tmp/fio.err || { cat /tmp/fio.err /tmp/fio.out; fail "fio over the base failed"; }
echo "ok: partial overwrites over the base verified"
