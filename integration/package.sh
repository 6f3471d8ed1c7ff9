#!/usr/bin/env bash
# The Debian package as users install it. Builds the .deb (packaging/build-deb.sh: a release
# build, man pages and completions generated from the clap definitions), runs lintian (an error or
# warning fails the run unless packaging/lintian-overrides documents it), installs it with
# dpkg, checks its files, user and directories, serves an image with the installed binary as
# the packaged unit runs it (user fvd, umask 0077, the unit's ExecStart with its paths
# /var/lib/fvd/NAME.fvd and /run/fvd/NAME.sock; systemd-socket-activate holds the socket when
# the package has fvd@.socket) to the libblkio client, then purges the package
# and checks nothing is left. Purging again with an image in /var/lib/fvd must keep the image
# and its user. Needs root; cleans up on failure; safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "$(id -u)" != 0 ]; then
    echo "package.sh: needs root (dpkg -i)" >&2
    exit 1
fi

name=fvd-package-test
img=/var/lib/fvd/$name.fvd
sock=/run/fvd/$name.sock
# The unit's RuntimeDirectory (systemd makes it for User=, removes it at stop) and the control
# socket the server binds in it.
rundir=/run/fvd/$name
ctl=$rundir/qmp.sock
unit=/lib/systemd/system/fvd@.service
target=${CARGO_TARGET_DIR:-$(pwd)/target}
server_pid=

fail() {
    echo "package.sh: FAIL: $*" >&2
    exit 1
}

pkg_known() {
    dpkg-query -W -f='${db:Status-Status}' fvd 2>/dev/null | grep -qv '^not-installed$'
}

# Leaves the machine as it was: no server, no package, no user, no directories of ours.
cleanup() {
    if [ -n "$server_pid" ]; then
        kill "$server_pid" 2>/dev/null || true
        wait "$server_pid" 2>/dev/null || true
        server_pid=
    fi
    rm -f "$img" "$sock"
    rm -rf "$rundir"
    if pkg_known; then
        dpkg --purge fvd >/dev/null 2>&1 || true
    fi
    rmdir /run/fvd /var/lib/fvd 2>/dev/null || true
    # A purge that kept the image kept the user too.
    if ! pkg_known && [ ! -e /var/lib/fvd ] && getent passwd fvd >/dev/null; then
        deluser --system --quiet fvd >/dev/null 2>&1 || true
        delgroup --system --quiet fvd >/dev/null 2>&1 || true
    fi
}

# Only a leftover of this test (its image, alone in /var/lib/fvd) is cleaned up here: an
# administrator's fvd package or user is never removed.
if pkg_known || getent passwd fvd >/dev/null; then
    if [ ! -e "$img" ] || [ -n "$(find /var/lib/fvd -mindepth 1 ! -name "$name.fvd" | head -1)" ]; then
        echo "package.sh: fvd is installed here (package or user fvd); this test would remove it" >&2
        exit 1
    fi
    cleanup
fi
trap cleanup EXIT

# The package's own checks, named so that a failure says which.
check_installed() {
    for f in /usr/bin/fvd "$unit" /usr/lib/tmpfiles.d/fvd.conf; do
        [ -f "$f" ] || fail "$f is not installed"
    done
    cmp -s "$unit" packaging/fvd@.service || fail "$unit differs from packaging/fvd@.service"
    if [ -f packaging/fvd@.socket ]; then
        cmp -s "$socket_unit" packaging/fvd@.socket || fail "$socket_unit differs from packaging/fvd@.socket"
    fi
    # The installed unit as systemd reads it: ExecStart's binary exists, and (where man pages
    # are installed) its Documentation= page is found.
    if command -v systemd-analyze >/dev/null; then
        local man=no out
        [ -e /usr/share/man/man1/fvd-serve.1.gz ] && man=yes
        out=$(systemd-analyze verify --man=$man "$unit" 2>&1) || fail "systemd-analyze verify: $out"
        [ -z "$out" ] || fail "systemd-analyze verify: $out"
    fi
    # Documentation is checked in the .deb: minimal images may exclude /usr/share/{man,doc}
    # from installation (dpkg path-exclude).
    local contents
    contents=$(dpkg-deb --contents "$deb" | awk '{print $6}')
    for f in ./usr/share/bash-completion/completions/fvd ./usr/share/zsh/vendor-completions/_fvd \
        ./usr/share/fish/vendor_completions.d/fvd.fish ./usr/share/doc/fvd/copyright \
        ./usr/share/doc/fvd/changelog.gz ./usr/share/doc/fvd/changelog.Debian.gz ./usr/share/man/man1/fvd.1.gz; do
        grep -qxF "$f" <<<"$contents" || fail "the package lacks $f"
    done
    # A man page and completions per subcommand (the list comes from the installed binary).
    local subs
    subs=$(/usr/bin/fvd --help | awk '/^Commands:/ {on=1; next} on && /^  [a-z]/ {print $1} on && /^$/ {exit}')
    [ "$(wc -w <<<"$subs")" -ge 9 ] || fail "subcommands in fvd --help: $subs"
    for s in $subs; do
        [ "$s" = help ] && continue
        grep -qxF "./usr/share/man/man1/fvd-$s.1.gz" <<<"$contents" || fail "no man page for fvd $s"
    done
    /usr/bin/fvd --version | grep -Eq '^fvd [0-9]+\.[0-9]+\.[0-9]+( \([0-9a-f]+(-dirty)?\))?$' ||
        fail "fvd --version: $(/usr/bin/fvd --version)"
    getent passwd fvd >/dev/null || fail "no user fvd"
    getent group fvd >/dev/null || fail "no group fvd"
    [ "$(getent passwd fvd | cut -d: -f7)" = /usr/sbin/nologin ] || fail "fvd can log in"
    [ "$(stat -c '%U:%G %a' /var/lib/fvd)" = "fvd:fvd 750" ] || fail "/var/lib/fvd: $(stat -c '%U:%G %a' /var/lib/fvd)"
    [ "$(stat -c '%U:%G %a' /run/fvd)" = "root:root 755" ] || fail "/run/fvd: $(stat -c '%U:%G %a' /run/fvd)"
}

# With a socket unit in the package (fvd@.socket, socket activation), systemd owns the socket:
# systemd-socket-activate stands in for it (binds as root, SocketMode, passes the listening
# socket to the server it starts on the first connection). Without one, the server binds it.
socket_unit=/lib/systemd/system/fvd@.socket
activated() { [ -f "$socket_unit" ]; }
# A [Socket] setting of the socket unit, or systemd's default.
socket_setting() {
    local v
    v=$(sed -n "s/^$1=//p" "$socket_unit")
    echo "${v:-$2}"
}

# Starts the server as the unit would: its ExecStart (instance $name, no FVD_SERVE_ARGS) as
# User=fvd Group=fvd with UMask=0077 and NoNewPrivileges=yes.
start_server() {
    local exec activate=() listen
    exec=$(sed -n 's/^ExecStart=//p' "$unit")
    exec=${exec//%i/$name}
    exec=${exec//\$FVD_SERVE_ARGS/}
    # As systemd does for RuntimeDirectory=fvd/%i, RuntimeDirectoryMode=0700.
    [ "$(sed -n 's/^RuntimeDirectory=//p' "$unit")" = "fvd/%i" ] || fail "$unit: RuntimeDirectory is not fvd/%i"
    install -d -o fvd -g fvd -m "$(sed -n 's/^RuntimeDirectoryMode=//p' "$unit")" "$rundir"
    if activated; then
        listen=$(sed -n 's/^ListenStream=//p' "$socket_unit")
        [ "${listen//%i/$name}" = "$sock" ] || fail "$socket_unit listens on $listen, not $sock"
        # A socket unit left behind by a stopped server is replaced when it starts again.
        rm -f "$sock"
        activate=(systemd-socket-activate -l "$sock")
    fi
    # shellcheck disable=SC2086 # ExecStart is split into words, as systemd does.
    (umask 0077 && exec "${activate[@]}" setpriv --reuid fvd --regid fvd --init-groups \
        --no-new-privs --bounding-set -all $exec) >"$target/package-serve.log" 2>&1 &
    server_pid=$!
    for _ in $(seq 100); do
        if [ -S "$sock" ]; then
            if activated; then
                chown "$(socket_setting SocketUser root):$(socket_setting SocketGroup root)" "$sock"
                chmod "$(socket_setting SocketMode 0666)" "$sock"
            fi
            return 0
        fi
        kill -0 "$server_pid" 2>/dev/null || break
        sleep 0.1
    done
    cat "$target/package-serve.log" >&2
    fail "the server did not listen on $sock"
}

# SIGTERM, as systemctl stop sends: the server must exit 0 and remove the socket it bound (a
# socket unit's socket is systemd's to remove).
stop_server() {
    kill -TERM "$server_pid"
    local rc=0
    wait "$server_pid" || rc=$?
    server_pid=
    [ "$rc" = 0 ] || { cat "$target/package-serve.log" >&2; fail "the server exited with status $rc"; }
    activated || [ ! -e "$sock" ] || fail "the server left $sock behind"
    [ ! -e "$ctl" ] || fail "the server left its control socket $ctl behind"
    rm -f "$sock"
    rm -rf "$rundir"   # as systemd does when the service stops
}

# The control socket of the unit's ExecStart: bound by the server (as fvd, mode 0600) in its
# runtime directory, and root's fvd ctl talks QMP on it.
check_control() {
    for _ in $(seq 100); do
        [ -S "$ctl" ] && break
        sleep 0.1
    done
    [ -S "$ctl" ] || { cat "$target/package-serve.log" >&2; fail "no control socket $ctl"; }
    [ "$(stat -c '%U %a' "$ctl")" = "fvd 600" ] || fail "$ctl: $(stat -c '%U %a' "$ctl"), not fvd 600"
    [ "$(stat -c '%U %a' "$rundir")" = "fvd 700" ] || fail "$rundir: $(stat -c '%U %a' "$rundir")"
    local out
    out=$(/usr/bin/fvd ctl "$ctl" query-block) || fail "fvd ctl $ctl query-block failed: $out"
    grep -q '"virtual-size": 67108864' <<<"$out" || fail "query-block on $ctl: $out"
}

echo "== package: build"
cargo build -q --example blkio_io
# cargo deb prints the paths of the .deb and of the debug-info .ddeb (not linted: Debian
# generates and checks those itself).
deb=$(bash packaging/build-deb.sh | grep '\.deb$')
echo "$deb"
dpkg-deb --contents "$deb"

echo "== package: lintian"
lintian --display-info --fail-on error,warning "$deb"

echo "== package: install"
dpkg -i "$deb"
check_installed

echo "== package: serve $img on $sock as the unit would"
/usr/bin/fvd create "$img" --size 64M >/dev/null
chown fvd:fvd "$img"
start_server
want="fvd 600"
activated && want="$(socket_setting SocketUser root) $(socket_setting SocketMode 0666 | sed 's/^0*//')"
[ "$(stat -c '%U %a' "$sock")" = "$want" ] || fail "$sock: $(stat -c '%U %a' "$sock"), not $want"
"$target/debug/examples/blkio_io" "$sock" write
# Checked while it serves: with socket activation the server starts on the first connection.
[ "$(ps -o user= -p "$server_pid")" = fvd ] || fail "the server does not run as fvd"
[ "$(ps -o comm= -p "$server_pid")" = fvd ] || fail "pid $server_pid is not the server"
check_control
stop_server
/usr/bin/fvd check "$img" || fail "fvd check after a clean stop"
start_server
"$target/debug/examples/blkio_io" "$sock" verify
stop_server

echo "== package: purge"
rm -f "$img"
dpkg --purge fvd
for f in /usr/bin/fvd "$unit" /usr/lib/tmpfiles.d/fvd.conf /usr/share/man/man1/fvd.1.gz \
    /usr/share/doc/fvd /var/lib/fvd /run/fvd; do
    [ ! -e "$f" ] || fail "$f is left after the purge"
done
! getent passwd fvd >/dev/null || fail "the user fvd is left after the purge"
! getent group fvd >/dev/null || fail "the group fvd is left after the purge"
! pkg_known || fail "dpkg still knows fvd"

echo "== package: a purge keeps images in /var/lib/fvd"
dpkg -i "$deb" >/dev/null
/usr/bin/fvd create "$img" --size 1M >/dev/null
dpkg --purge fvd
[ -f "$img" ] || fail "the purge removed $img"
getent passwd fvd >/dev/null || fail "the purge removed the user owning $img"
[ ! -e /usr/bin/fvd ] || fail "/usr/bin/fvd is left after the purge"
cleanup
! getent passwd fvd >/dev/null || fail "cleanup left the user fvd"
echo "package.sh: passed"
