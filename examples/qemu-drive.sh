#!/usr/bin/env bash
# Boot a VM whose second disk is a thinnbd volume, reached by QEMU's own NBD client (no kernel
# NBD driver on the host needed).
#
#   qemu-drive.sh BOOT_DISK [--host 127.0.0.1] [--port 10809] [--export default]
#                 [--socket PATH] [--dry-run] [-- extra qemu args]
#   qemu-drive.sh --print-drive [--host ...] [--port ...] [--export ...] [--socket PATH]
#
#   BOOT_DISK      the guest's system disk (qcow2 or raw), e.g. a Debian cloud image
#   --socket       use the server's unix socket (`thinnbd serve --socket PATH`) instead of TCP
#   --dry-run      print the command instead of running it
#   --print-drive  print only the -drive value for the volume (the VM tests use it)
#
# In the guest the volume is /dev/vdb. discard=unmap passes the guest's TRIM (fstrim, mount -o
# discard, blkdiscard) to the pool; without it QEMU drops discards and the pool never shrinks.
# detect-zeroes=unmap also turns writes of zeros into discards.
set -euo pipefail

usage() {
    sed -n '2,/^set -e/p' "$0" | sed '$d; s/^# \{0,1\}//'
    exit 2
}

boot="" host=127.0.0.1 port=10809 export_name=default socket="" mode=run
while [ $# -gt 0 ]; do
    case $1 in
    --host) host=$2; shift 2 ;;
    --port) port=$2; shift 2 ;;
    --export) export_name=$2; shift 2 ;;
    --socket) socket=$2; shift 2 ;;
    --dry-run) mode=dry; shift ;;
    --print-drive) mode=drive; shift ;;
    --) shift; break ;;
    -*) echo "unknown option $1" >&2; usage ;;
    *) boot=$1; shift ;;
    esac
done

# The short form `file=nbd:HOST:PORT:exportname=NAME` (or nbd://HOST:PORT/NAME) works too; the
# dotted form below also covers unix sockets.
if [ -n "$socket" ]; then
    server="file.server.type=unix,file.server.path=$socket"
else
    server="file.server.type=inet,file.server.host=$host,file.server.port=$port"
fi
thin="driver=raw,file.driver=nbd,$server,file.export=$export_name"
thin="$thin,if=virtio,cache=none,discard=unmap,detect-zeroes=unmap"
if [ "$mode" = drive ]; then
    echo "$thin"
    exit 0
fi
[ -n "$boot" ] || usage

accel=kvm
[ -w /dev/kvm ] || { echo "no usable /dev/kvm: falling back to slow TCG" >&2; accel=tcg; }

# shellcheck disable=SC2054 # commas are inside qemu option values
qemu=(qemu-system-x86_64 -accel "$accel" -m 2G -smp 2
    -drive "file=$boot,if=virtio"
    -drive "$thin"
    -nic user,model=virtio-net-pci
    -nographic "$@")

if [ "$mode" = dry ]; then
    printf '%q ' "${qemu[@]}"
    echo
else
    exec "${qemu[@]}"
fi
