#!/usr/bin/env bash
# Builds the tiny test guest into integration/.cache/guest/: a Debian cloud kernel (vmlinuz) and an
# initramfs holding busybox, fio, e2fsprogs, the virtio-blk modules, /init and the guest tests
# (integration/guest/). Cached: does nothing when the inputs (these scripts, the guest files, the
# kernel and tool package versions) are unchanged. Prints the output directory on stdout.
#
# Usage: integration/build-guest.sh [--force]
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
cache=$here/.cache
out=$cache/guest
force=0
[ "${1:-}" = --force ] && force=1

log() { echo "build-guest: $*" >&2; }
die() { log "error: $*"; exit 1; }

for tool in apt-cache apt-get dpkg-deb dpkg-query depmod cpio ldd sha256sum busybox fio mke2fs e2fsck; do
    command -v "$tool" >/dev/null || die "$tool not found: run integration/setup-host.sh as root"
done

# The package (and version) the cloud kernel meta-package depends on, e.g.
# "linux-image-6.1.0-56-cloud-amd64 6.1.192-2" (Debian pins it with "(= version)").
resolve_kernel() {
    apt-cache show --no-all-versions linux-image-cloud-amd64 2>/dev/null |
        sed -n 's/^Depends:.*\(linux-image-[0-9][^ ,]*\) (= \([^)]*\)).*/\1 \2/p' | head -n1
}
kernel=$(resolve_kernel)
if [ -z "$kernel" ]; then
    # Fresh machine: the package lists have never been fetched.
    log "apt-get update (no package lists yet)"
    apt-get update -qq >&2
    kernel=$(resolve_kernel)
fi
[ -n "$kernel" ] || die "cannot resolve the dependency of linux-image-cloud-amd64 with apt-cache"
kpkg=${kernel% *}
kver=${kernel#* }

tool_versions=$(dpkg-query -W -f '${Package}=${Version}\n' busybox-static fio e2fsprogs util-linux libc6 2>/dev/null | sort)
key=$(
    {
        echo "$kpkg=$kver"
        echo "$tool_versions"
        cd "$here" && find build-guest.sh guest -type f -print0 | sort -z | xargs -0 sha256sum
    } | sha256sum | cut -d' ' -f1
)
if [ "$force" = 0 ] && [ -f "$out/stamp" ] && [ "$(cat "$out/stamp")" = "$key" ] &&
    [ -f "$out/vmlinuz" ] && [ -f "$out/initramfs.cpio" ]; then
    echo "$out"
    exit 0
fi

log "building guest ($kpkg $kver)"
mkdir -p "$cache"
work=$(mktemp -d "$cache/build.XXXXXX")
trap 'rm -rf "$work"' EXIT

# --- kernel package (cached separately: it only changes with the Debian kernel version) ---
kdir=$cache/kernel/$kpkg-$kver
if [ ! -f "$kdir/.done" ]; then
    rm -rf "$kdir"
    mkdir -p "$kdir"
    (cd "$work" && apt-get download -q -o APT::Sandbox::User=root "$kpkg=$kver" >&2)
    dpkg-deb -x "$work"/"$kpkg"_*.deb "$kdir"
    rm -f "$work"/"$kpkg"_*.deb
    touch "$kdir/.done"
fi
krel=$(basename "$(find "$kdir/lib/modules" -mindepth 1 -maxdepth 1 -type d | head -n1)")
[ -n "$krel" ] || die "no modules directory in $kpkg"
moddir=$kdir/lib/modules/$krel
# The package ships no modules.dep (the postinst generates it): make it.
[ -f "$moddir/modules.dep" ] || depmod -b "$kdir" "$krel"

root=$work/root
mkdir -p "$root"/{bin,sbin,usr/bin,usr/sbin,etc,proc,sys,dev,tmp,mnt,lib/modules,tests}

# --- modules: dependency order from modules.dep, decompressed on the host ---
declare -A seen=()
modorder=()
modpath() { # module name -> path relative to $moddir (empty if not a loadable module)
    local want=${1//-/_}
    awk -F: -v want="$want" '{
        n = $1; sub(/.*\//, "", n); sub(/\.ko(\.(xz|zst|gz))?$/, "", n); gsub(/-/, "_", n)
        if (n == want) { print $1; exit }
    }' "$moddir/modules.dep"
}
builtin() {
    local want=${1//-/_}
    awk -v want="$want" '{ n = $0; sub(/.*\//, "", n); sub(/\.ko$/, "", n); gsub(/-/, "_", n)
        if (n == want) { found = 1; exit } } END { exit !found }' "$moddir/modules.builtin"
}
add_module() {
    local name=${1//-/_} path dep
    [ -n "${seen[$name]:-}" ] && return 0
    seen[$name]=1
    if builtin "$name"; then
        return 0
    fi
    path=$(modpath "$name")
    [ -n "$path" ] || die "kernel module $name is neither built in nor in modules.dep"
    # shellcheck disable=SC2013 # the dependency list is one line of words
    for dep in $(awk -F: -v p="$path" '$1 == p {print $2; exit}' "$moddir/modules.dep"); do
        dep=${dep##*/}
        add_module "${dep%%.ko*}"
    done
    case "$path" in
    *.ko.xz) xz -dc "$moddir/$path" >"$root/lib/modules/$name.ko" ;;
    *.ko.zst) zstd -qdc "$moddir/$path" >"$root/lib/modules/$name.ko" ;;
    *.ko.gz) gzip -dc "$moddir/$path" >"$root/lib/modules/$name.ko" ;;
    *.ko) cp "$moddir/$path" "$root/lib/modules/$name.ko" ;;
    *) die "unexpected module file $path" ;;
    esac
    modorder+=("$name")
}
# virtio_pci pulls in virtio_ring, virtio, virtio_pci_modern_dev and virtio_pci_legacy_dev.
for m in virtio_ring virtio virtio_pci_modern_dev virtio_pci_legacy_dev virtio_pci virtio_blk; do
    add_module "$m"
done
# ext4 (with jbd2 and mbcache through modules.dep) if it is a module; it also needs crc32c through
# the crypto API, a soft dependency that modules.dep does not list.
if ! builtin ext4; then
    if ! builtin crc32c_generic && [ -n "$(modpath crc32c_generic)" ]; then
        add_module crc32c_generic
    fi
    add_module ext4
fi
printf '%s\n' "${modorder[@]}" >"$root/etc/modules"
log "modules: ${modorder[*]}"

# --- programs and their shared libraries ---
copy_file() { # copy $1 (following links) to the same path inside the root
    local dst=$root$1
    [ -e "$dst" ] && return 0
    mkdir -p "$(dirname "$dst")"
    cp -L "$1" "$dst"
}
copy_prog() { # program path, destination path; then every library ldd names
    local src=$1 dst=$2 lib
    mkdir -p "$root$(dirname "$dst")"
    cp -L "$src" "$root$dst"
    for lib in $(ldd "$src" 2>/dev/null | awk '$2 == "=>" && $3 ~ /^\// {print $3} $1 ~ /^\// {print $1}'); do
        copy_file "$lib"
    done
}
cp -L "$(command -v busybox)" "$root/bin/busybox"
for applet in $(busybox --list); do
    [ "$applet" = busybox ] || ln -sf busybox "$root/bin/$applet"
done
copy_prog "$(command -v fio)" /usr/bin/fio
copy_prog "$(command -v mke2fs)" /sbin/mke2fs
copy_prog "$(command -v e2fsck)" /sbin/e2fsck
ln -sf mke2fs "$root/sbin/mkfs.ext4"
ln -sf e2fsck "$root/sbin/fsck.ext4"
# util-linux blkdiscard can zero-out (BLKZEROOUT -> WRITE_ZEROES); busybox's cannot. Busybox sh
# prefers its own applets to $PATH, so tests call this one by its full path.
copy_prog "$(command -v blkdiscard)" /usr/sbin/blkdiscard
if command -v lsblk >/dev/null; then copy_prog "$(command -v lsblk)" /usr/bin/lsblk; fi
[ -f /etc/mke2fs.conf ] && cp /etc/mke2fs.conf "$root/etc/"
echo 'root:x:0:0:root:/root:/bin/sh' >"$root/etc/passwd"
echo 'root:x:0:' >"$root/etc/group"

cp "$here/guest/init" "$root/init"
chmod 755 "$root/init"
cp "$here"/guest/tests/*.sh "$root/tests/"

mkdir -p "$out"
# Uncompressed: a TCG guest copies 90 MB faster than it decompresses 33 MB (about 1 s of boot).
(cd "$root" && find . -print0 | LC_ALL=C sort -z |
    cpio --null -o -H newc --owner 0:0 --quiet) >"$work/initramfs.cpio"
mv "$work/initramfs.cpio" "$out/initramfs.cpio"
rm -f "$out/initramfs.cpio.zst"
cp "$kdir/boot/vmlinuz-$krel" "$out/vmlinuz"
echo "$key" >"$out/stamp"
log "done: $(du -h "$out/initramfs.cpio" | cut -f1) initramfs, kernel $krel"
echo "$out"
