#!/usr/bin/env bash
# Installs the host packages the project needs on a fresh Debian bookworm machine:
# QEMU 10 from bookworm-backports (system emulator, qemu-storage-daemon, qemu-img, qemu-nbd),
# fio, perf (the benchmark harness counts host I/O with it), the pieces used to build the tiny
# test guest, and what integration/package.sh builds and checks the .deb with (lintian,
# cargo-deb). Idempotent; safe to run every time.
set -euo pipefail

# cargo-deb from crates.io, pinned (its output is what users install); compiles once, in under a
# minute on 2 cores.
if [ "$(cargo deb --version 2>/dev/null)" != "cargo-deb 3.8.0" ]; then
    cargo install cargo-deb --locked --version 3.8.0
fi

# The qemu.qmp Python package (PyPI), pinned: tests/qmp.rs drives the control socket with it
# (integration/qmp_client.py) and fails without it under CI=true. It also brings qmp-shell.
if ! python3 -c 'import qemu.qmp' 2>/dev/null \
    || [ "$(python3 -m pip show qemu.qmp 2>/dev/null | awk '/^Version:/ {print $2}')" != "0.0.3" ]; then
    python3 -m pip install --quiet 'qemu.qmp==0.0.3'
fi

need=()
command -v qemu-system-x86_64 >/dev/null || need+=(qemu-system-x86)
command -v qemu-storage-daemon >/dev/null || need+=(qemu-utils)
qemu-img --version 2>/dev/null | grep -q 'version 10\.' || need+=(qemu-utils)
for p in fio linux-perf busybox-static e2fsprogs cpio zstd kmod lintian; do
    dpkg -s "$p" >/dev/null 2>&1 || need+=("$p")
done
if [ ${#need[@]} -eq 0 ]; then
    exit 0
fi

export DEBIAN_FRONTEND=noninteractive
src=/etc/apt/sources.list.d/bookworm-backports.sources
if [ ! -f "$src" ]; then
    # Same mirror as the machine's own Debian source.
    uri=$(awk '/^URIs:/ {print $2; exit}' /etc/apt/sources.list.d/debian.sources 2>/dev/null || true)
    [ -n "$uri" ] || uri=http://deb.debian.org/debian
    cat >"$src" <<SRC
Types: deb
URIs: $uri
Suites: bookworm-backports
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
SRC
fi
apt-get update -qq
apt-get install -y -qq -t bookworm-backports qemu-system-x86 qemu-utils qemu-block-extra >/dev/null
# systemd: systemd-socket-activate, which passes the socket in the restart cases.
apt-get install -y -qq fio linux-perf busybox-static e2fsprogs cpio zstd kmod systemd lintian >/dev/null
# prometheus: promtool, which checks the metrics endpoint's output (tests/metrics.rs).
apt-get install -y -qq --no-install-recommends prometheus curl >/dev/null
