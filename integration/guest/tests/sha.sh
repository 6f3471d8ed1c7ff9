#!/bin/sh
# The first fvd.mb MiB of the disk must have the sha256 fvd.sum.
# shellcheck source-path=SCRIPTDIR source=lib.sh
. /tests/lib.sh

got=$(dd if="$DEV" bs=1M count="${FVD_mb:?}" iflag=direct 2>/dev/null | sha256sum | cut -d' ' -f1)
expect "sha256 of the first $FVD_mb MiB" "$got" "${FVD_sum:?}"
