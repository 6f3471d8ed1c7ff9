#!/bin/sh
# shellcheck shell=sh
# Sourced by every guest test. $FVD_* come from fvd.KEY=VALUE on the kernel command line.
set -eu
DEV=${FVD_dev:-/dev/vda}
BLK=/sys/block/${DEV#/dev/}

# fail REASON: record the reason for the FAIL marker and stop the test.
fail() {
    echo "$*" >/tmp/fail-reason
    echo "FAIL: $*" >&2
    exit 1
}

# expect WHAT ACTUAL EXPECTED
expect() {
    if [ "$2" = "$3" ]; then
        echo "ok: $1 = $2"
    else
        fail "$1 is '$2', expected '$3'"
    fi
}

# Flush requests the block layer completed for $DEV (field 16 of the stat file, Linux >= 5.5).
flush_count() {
    awk '{print $16}' "$BLK/stat"
}
