#!/usr/bin/env bash
# Build the test guest's initramfs (gzip'd newc cpio).
#
# Usage: build-initramfs.sh --out FILE --conf FILE [--server-bin PATH] [--server-kind thinnbd|nbdkit]
#          [--extra-bin PATH]... [--tls-dir DIR]
#
# Contents: static busybox (shell, insmod, fstrim, blkdiscard, dd with O_DIRECT, sha256sum),
# nbd-client, mkfs.ext4 with its libraries and /etc/mke2fs.conf, the modules for ext4, virtio-blk
# and nbd of the guest kernel (tests/vm/lib.sh picks it), /init = tests/vm/guest-init.sh,
# /vmtest.conf = --conf, and the server binary with its libraries (for nbdkit also the file and
# memory plugins), and any --extra-bin in /bin with its libraries. With --tls-dir, its `server`
# and `client` certificate directories (tests/common/tls.rs makes them) go to /tls.
set -euo pipefail
. "$(dirname "$0")/lib.sh"

out="" conf="" server_bin="" extra=() tls_dir=""
while [ $# -gt 0 ]; do
    case $1 in
    --out) out=$2; shift 2 ;;
    --conf) conf=$2; shift 2 ;;
    --server-bin) server_bin=$2; shift 2 ;;
    --server-kind) shift 2 ;; # accepted for callers; nbdkit is recognised by its name
    --extra-bin) extra+=("$2"); shift 2 ;;
    --tls-dir) tls_dir=$2; shift 2 ;;
    *) vm_die "build-initramfs.sh: unknown argument $1" ;;
    esac
done
{ [ -n "$out" ] && [ -n "$conf" ]; } || vm_die "usage: build-initramfs.sh --out FILE --conf FILE [--server-bin PATH]"

kver=$(vm_kernel_version) || vm_die "no guest kernel (install linux-image-amd64)"
root=$(mktemp -d "${TMPDIR:-/tmp}/vm-initramfs.XXXXXX")
trap 'rm -rf "$root"' EXIT

mkdir -p "$root/bin" "$root/sbin" "$root/etc" "$root/tmp"
cp /bin/busybox "$root/bin/busybox"
install -m 0755 "$VM_DIR/guest-init.sh" "$root/init"
cp "$conf" "$root/vmtest.conf"
# The user-facing example runs in the guest as the attach/trim/detach steps of test 1.
cp "$VM_DIR/../../examples/nbd-client-attach.sh" "$root/nbd-client-attach.sh"

vm_copy_with_libs "$root" "$(command -v nbd-client || echo /usr/sbin/nbd-client)" /sbin/nbd-client
# mkfs.ext4 from e2fsprogs: busybox's mke2fs cannot make ext4.
mkfs=$(command -v mkfs.ext4 || echo /usr/sbin/mkfs.ext4)
vm_copy_with_libs "$root" "$mkfs" /sbin/mkfs.ext4
[ -r /etc/mke2fs.conf ] && cp /etc/mke2fs.conf "$root/etc/mke2fs.conf"
if [ -n "$tls_dir" ]; then
    mkdir -p "$root/tls"
    cp -r "$tls_dir/server" "$tls_dir/client" "$root/tls/"
fi

: >"$root/modules.list"
vm_add_modules "$root" "$kver" ext4 virtio_blk virtio_pci nbd

# A binary in /bin with its libraries; nbdkit also gets the plugins the tests use.
add_bin() {
    [ -x "$1" ] || vm_die "not an executable: $1"
    vm_copy_with_libs "$root" "$1" "/bin/$(basename "$1")"
    # Debug info (a cargo test build carries lots) only slows the guest's unpacking under TCG.
    if command -v strip >/dev/null && head -c 4 "$1" | grep -q ELF; then
        strip -g "$root/bin/$(basename "$1")" 2>/dev/null || true
    fi
    if [ "$(basename "$1")" = nbdkit ]; then
        local plugdir p
        plugdir=$("$1" --dump-config | sed -n 's/^plugindir=//p')
        for p in file memory; do
            vm_copy_with_libs "$root" "$plugdir/nbdkit-$p-plugin.so"
        done
    fi
}
[ -z "$server_bin" ] || add_bin "$server_bin"
for b in "${extra[@]}"; do
    add_bin "$b"
done

vm_pack_initramfs "$root" "$out"
vm_log "initramfs $out ($(du -h "$out" | cut -f1)) for kernel $kver"
