#!/bin/sh
# Second half of raw-write (same fio job, verify only): every block must carry the header and data
# raw-write put there, in another VM after the server was restarted or killed.
# Arguments: [fvd.size_mb=MiB] (as for raw-write)
# shellcheck source-path=SCRIPTDIR source=lib.sh
. /tests/lib.sh

raw_job --verify_only=1
echo "ok: all blocks verified"
